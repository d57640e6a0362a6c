"""LoRA (engine/lora.py): the merge arithmetic by hand, the merged model equal to peft's own merge,
the adapter a peft user loads, and the lora settings checked before anything runs."""

from __future__ import annotations

import types

import pytest
import torch

from posttrain_cli.config.compose import compose
from posttrain_cli.config.schema import stage_lora
from posttrain_cli.engine import lora
from posttrain_cli.errors import UserError
from posttrain_cli.pipeline import runner

CONFIG = types.SimpleNamespace(r=1, lora_alpha=2.0, use_rslora=False)  # scale alpha / r = 2


def test_merge_of_a_4x4_layer_by_hand():
    # W = I; A = [1 2 0 0] (r 1, 4 in); B = [0 0 1 0]^T (4 out): B A is [1 2 0 0] in row 2, 0 elsewhere.
    state = {
        "base_model.model.proj.base_layer.weight": torch.eye(4),
        "base_model.model.proj.base_layer.bias": torch.tensor([1.0, 2.0, 3.0, 4.0]),
        "base_model.model.proj.lora_A.default.weight": torch.tensor([[1.0, 2.0, 0.0, 0.0]]),
        "base_model.model.proj.lora_B.default.weight": torch.tensor([[0.0], [0.0], [1.0], [0.0]]),
        "base_model.model.norm.weight": torch.ones(4),
        "base_model.model.score.original_module.weight": torch.zeros(1, 4),
        "base_model.model.score.modules_to_save.default.weight": torch.full((1, 4), 5.0),
    }
    out = lora.merged_state(state, CONFIG)
    assert sorted(out) == ["norm.weight", "proj.bias", "proj.weight", "score.weight"]
    assert out["proj.weight"].tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [2, 4, 1, 0], [0, 0, 0, 1]]
    assert out["proj.bias"].tolist() == [1, 2, 3, 4]  # bias "none": the base's, untouched
    assert out["score.weight"].tolist() == [[5, 5, 5, 5]]  # the trained copy, not the original
    # rsLoRA: alpha / sqrt(r); r 4, alpha 4 -> 2 (plain LoRA would give 1).
    assert lora.scale(types.SimpleNamespace(r=4, lora_alpha=4.0, use_rslora=True)) == 2.0
    assert lora.scale(types.SimpleNamespace(r=4, lora_alpha=4.0, use_rslora=False)) == 1.0


def test_an_in_place_merge_writes_the_same_numbers_into_the_base_weights_and_copies_a_shared_one():
    # bf16 base: the merge is computed in fp32 and rounded once, in place as in a copy.
    torch.manual_seed(0)
    base = {"a": torch.randn(6, 5).to(torch.bfloat16), "b": torch.randn(6, 5).to(torch.bfloat16)}
    tied = torch.randn(6, 5).to(torch.bfloat16)
    adapter = {f"{n}.lora_{ab}.default.weight": torch.randn(*shape) for n in ("a", "b", "t")
               for ab, shape in (("A", (1, 5)), ("B", (6, 1)))}

    def state():
        s = {f"base_model.model.{n}.base_layer.weight": w for n, w in base.items()}
        s["base_model.model.t.base_layer.weight"] = tied
        s["base_model.model.emb.weight"] = tied  # the same storage under two names (tied embeddings)
        return {**s, **{f"base_model.model.{k}": v for k, v in adapter.items()}}

    want = lora.merged_state({k: v.clone() for k, v in state().items()}, CONFIG)
    before = {n: w.clone() for n, w in base.items()}
    s = state()
    got = lora.merged_state(s, CONFIG, in_place=True)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    for n in ("a", "b"):  # the merged tensor is the base weight itself, now holding W + 2 B A
        assert got[f"{n}.weight"] is s[f"base_model.model.{n}.base_layer.weight"]
        assert torch.equal(base[n], want[f"{n}.weight"]) and not torch.equal(base[n], before[n])
    assert got["t.weight"] is not tied and torch.equal(got["emb.weight"], tied)  # the tied one untouched
    assert not torch.equal(got["t.weight"], tied)
    # Without in_place the inputs stay as they were.
    s = {k: v.clone() for k, v in state().items()}
    kept = {k: v.clone() for k, v in s.items()}
    lora.merged_state(s, CONFIG)
    assert all(torch.equal(s[k], kept[k]) for k in s)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                        tie_word_embeddings=False))


SETTINGS = {"r": 4, "alpha": None, "dropout": 0.0, "target_modules": "all-linear", "modules_to_save": None,
            "use_rslora": False, "init": "default", "quantize": None}


def test_the_merged_state_is_peft_merge_and_unload_and_the_adapter_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = lora.wrap(_tiny_llama(), SETTINGS, where="stages.sft.lora")
    trainable, total = lora.counts(model)
    # r (in + out) for every linear layer of the decoder, not lm_head nor the embeddings: q and o
    # 32 -> 32, k and v 32 -> 16 (2 KV heads of 8), gate and up 32 -> 64, down 64 -> 32; 2 layers.
    per_layer = 4 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 3)
    assert trainable == 2 * per_layer == 4096
    assert 0 < trainable < total / 5
    with torch.no_grad():  # a trained adapter: B away from its zero start
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want_logits = model(input_ids=ids).logits
    lora.save_adapter(model, state, tmp_path / "adapter")
    merged = lora.merged_state(state, model.peft_config["default"])
    reference = model.merge_and_unload().state_dict()
    assert sorted(merged) == sorted(reference)
    for k in merged:
        assert torch.allclose(merged[k], reference[k], atol=1e-6), k
    # alpha null: 2 x r; the merged weight moved by 2 x B A.
    assert model.peft_config["default"].lora_alpha == 8.0
    # A peft user's way back: the input model + the adapter directory.
    base = _tiny_llama()
    again = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, want_logits, atol=1e-5)
    plain = _tiny_llama()
    plain.load_state_dict(merged)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, want_logits, atol=1e-5)


def test_only_the_adapter_and_the_score_head_train():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    rm = LlamaForSequenceClassification(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=4, vocab_size=50, num_labels=1))
    model = lora.wrap(rm, SETTINGS, where="stages.rm.lora", score_head=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "modules_to_save" in n for n in names)
    assert any("score.modules_to_save" in n for n in names)


@pytest.mark.parametrize("targets, msg", [
    (["q_proj", "qq_proj"], "stages.sft.lora.target_modules: 'qq_proj' names no module of this model"),
    (["embed_tokens"], "stages.sft.lora.target_modules: 'embed_tokens' is not a linear layer of this model"),
])
def test_a_target_the_model_lacks_is_named(targets, msg):
    with pytest.raises(UserError) as e:
        lora.wrap(_tiny_llama(), {**SETTINGS, "target_modules": targets}, where="stages.sft.lora")
    assert str(e.value).startswith(msg) and "q_proj" in str(e.value)


def _error(args: list[str]) -> str:
    with pytest.raises(UserError) as e:
        compose(args)
    return str(e.value)


def test_a_stage_block_turns_lora_on_over_the_runs_default():
    cfg, _ = compose(["recipe=tiny", "stages.sft.lora={r: 8}", "lora.dropout=0.1"])
    assert stage_lora(cfg, cfg["stages"]["sft"]) == {**SETTINGS, "r": 8, "dropout": 0.1}
    assert stage_lora(cfg, cfg["stages"]["dpo"]) is None  # r null: the whole model trains
    assert stage_lora(cfg, cfg["stages"]["soup"]) is None  # merge trains nothing
    cfg, _ = compose(["recipe=tiny", "lora.r=16", "stages.dpo.lora.r=null"])
    assert stage_lora(cfg, cfg["stages"]["sft"])["r"] == 16 and stage_lora(cfg, cfg["stages"]["grpo"])["r"] == 16


def test_lora_is_in_the_fingerprint_of_the_stages_it_changes_only():
    base = {s.node.name: s.fingerprint for s in runner.plan(compose(["recipe=tiny"])[0])}
    on = {s.node.name: s.fingerprint for s in runner.plan(compose(["recipe=tiny", "stages.dpo.lora={r: 8}"])[0])}
    assert base["sft"] == on["sft"] and base["rm"] == on["rm"]
    assert base["dpo"] != on["dpo"] and base["grpo"] != on["grpo"]  # grpo starts from dpo's model
    r16 = {s.node.name: s.fingerprint for s in runner.plan(compose(["recipe=tiny", "stages.dpo.lora={r: 16}"])[0])}
    assert r16["dpo"] != on["dpo"]


@pytest.mark.parametrize("args, msg", [
    (["stages.sft.lora={r: 0}"], "stages.sft.lora.r=0 must be >= 1"),
    (["lora.r=8", "lora.alpha=0"], "lora.alpha=0.0 must be > 0"),
    (["stages.sft.lora={r: 8, dropout: 1}"], "stages.sft.lora.dropout=1 must be in [0, 1)"),
    (["stages.sft.lora={r: 8, target_modules: q_proj}"], "stages.sft.lora.target_modules='q_proj': all-linear"),
    (["stages.sft.lora={r: 8, init: svd}"], "stages.sft.lora.init"),
    (["stages.sft.lora={r: 8, quantize: 8bit}"], "stages.sft.lora.quantize='8bit': 4bit or null"),
])
def test_bad_lora_values_name_their_key(args, msg):
    assert msg in _error(["recipe=tiny", *args])


def test_an_unknown_lora_key_is_suggested():
    assert "did you mean 'alpha'" in _error(["recipe=tiny", "stages.sft.lora={r: 8, alhpa: 4}"])


@pytest.mark.skipif(lora_cuda := __import__("pathlib").Path("/proc/driver/nvidia/version").exists(),
                    reason="this machine has a CUDA GPU")
def test_qlora_without_a_gpu_is_refused_at_plan_time():
    msg = _error(["recipe=tiny", "stages.sft.lora={r: 8, quantize: 4bit}"])
    assert msg.startswith("stages.sft.lora.quantize=4bit (QLoRA) needs a CUDA GPU")
    # SLURM: the plan is made on a login node; the job's node is checked when it starts.
    compose(["recipe=tiny", "stages.sft.lora={r: 8, quantize: 4bit}", "cluster=slurm"])


def test_qlora_under_zero3_is_refused_at_plan_time():
    # cluster=slurm: the plan is made on a login node, so the GPU check waits for the job; ZeRO-3 does not.
    for args, key in [(["lora={r: 8, quantize: 4bit}", "deepspeed=zero3"], "lora.quantize"),
                      (["stages.dpo.lora={r: 8, quantize: 4bit}", "stages.dpo.deepspeed={zero_stage: 3}"],
                       "stages.dpo.lora.quantize")]:
        msg = _error(["recipe=tiny", "cluster=slurm", *args])
        assert msg.startswith(f"{key}=4bit keeps the whole 4-bit base on every GPU") and "deepspeed=zero2" in msg


@pytest.mark.parametrize("settings", [None, SETTINGS], ids=["full", "lora"])
def test_activation_checkpointing_gives_the_same_gradients(settings):
    from posttrain_cli.engine import deepspeed_engine as eng

    ids = torch.randint(0, 50, (2, 9))
    grads = []
    for checkpointing in (False, True):
        ctx = types.SimpleNamespace(run={"deepspeed": {"activation_checkpointing": checkpointing, "zero_stage": 2},
                                         "lora": settings}, info=lambda msg: None, where=lambda key: key)
        model = eng.trainable(ctx, _tiny_llama())
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert model.is_gradient_checkpointing == checkpointing
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_or_olora_start_is_the_input_model_and_its_adapter_loads_on_the_input_model(tmp_path, init):
    from peft import PeftModel

    ids = torch.randint(0, 50, (2, 9))
    model = _tiny_llama()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    peft_model = lora.wrap(model, {**SETTINGS, "init": init}, where="stages.sft.lora")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        # The base is now the residual W - scale B0 A0: it is not a reference for free.
        assert not lora.base_is_input(peft_model)
        assert lora.input_network(types.SimpleNamespace(module=peft_model)) is None
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)  # trained
        state = {k: v.detach().clone() for k, v in peft_model.state_dict().items()}
        lora.save_adapter(peft_model, state, tmp_path / "adapter")
        merged = _tiny_llama()
        merged.load_state_dict(lora.merged_state(state, peft_model.peft_config[lora.ADAPTER]))
        on_input = PeftModel.from_pretrained(_tiny_llama(), tmp_path / "adapter")
        assert on_input.peft_config["default"].r == 2 * SETTINGS["r"]
        torch.testing.assert_close(on_input(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(merged(input_ids=ids).logits, want, atol=1e-3)


def test_the_adapter_off_network_is_the_input_model_exactly():
    model = _tiny_llama()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        want = torch.log_softmax(model(input_ids=ids).logits, -1)
    peft_model = lora.wrap(model, SETTINGS, where="stages.dpo.lora")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained adapter
        ref = lora.input_network(types.SimpleNamespace(module=peft_model))
        got = torch.log_softmax(ref(input_ids=ids).logits, -1)
        on = torch.log_softmax(peft_model(input_ids=ids).logits, -1)
    assert torch.equal(got, want)
    assert not torch.allclose(on, want, atol=1e-3)  # the adapter is back on after the call
    assert ref.config is peft_model.config
