"""Rollout: sampling log-probs equal a full forward's, EOS is part of what RL trains on, prompt
streams and update splits."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain_cli.data.chat import prompt_ids
from posttrain_cli.models.tiny import build_tiny
from posttrain_cli.rollout import episodes as ep
from posttrain_cli.rollout import hf, onpolicy
from tests.conftest import TINY_DATA

ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=128, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = build_tiny(tmp_path_factory.mktemp("m") / "tiny", ARCH)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
    rows = [json.loads(l) for l in (TINY_DATA / "rl_train.jsonl").read_text().splitlines()[:6]]
    # Prompts of different lengths, so left padding is exercised.
    rows[0]["messages"][0]["content"] = "1+1"
    return model, tok, [prompt_ids(tok, r["messages"]) for r in rows]


def _forward_logps(model, prompt: list[int], sampled: list[int], temperature: float) -> torch.Tensor:
    ids = torch.tensor([prompt + sampled])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1] / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(sampled)[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_a_full_forward(tiny, temperature):
    model, tok, prompts = tiny
    torch.manual_seed(0)
    outs = hf.generate(model, tok, prompts, max_new_tokens=10, batch_size=6, temperature=temperature,
                       logprobs=True)
    for p, o in zip(prompts, outs):
        assert len(o.logprobs) == len(o.sampled)
        want = _forward_logps(model, p, o.sampled, temperature)
        assert torch.allclose(torch.tensor(o.logprobs), want, atol=1e-5)


def test_eos_ends_the_completion_and_is_trained_on(tiny):
    model, tok, prompts = tiny
    eos = tok.eos_token_id
    # Make EOS likely but not certain, so some completions stop early and some run to the limit.
    bias = torch.zeros(model.config.vocab_size)
    bias[eos] = 4.0
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias)
    try:
        torch.manual_seed(1)
        outs = hf.generate(model, tok, prompts * 4, max_new_tokens=6, batch_size=24, temperature=1.0, logprobs=True)
    finally:
        handle.remove()
    stopped = [o for o in outs if o.finish_reason == "eos"]
    cut = [o for o in outs if o.finish_reason == "length"]
    assert stopped and cut
    for o in stopped:
        assert eos not in o.token_ids and o.sampled[-1] == eos and len(o.sampled) <= 6
        assert len(o.logprobs) == len(o.token_ids) + 1
    for o in cut:
        assert o.stop_id is None and len(o.sampled) == 6 == len(o.logprobs)


def test_greedy_logprobs_use_temperature_one(tiny):
    model, tok, prompts = tiny
    out = hf.generate(model, tok, prompts[:2], max_new_tokens=5, batch_size=2, logprobs=True)
    for p, o in zip(prompts, out):
        assert torch.allclose(torch.tensor(o.logprobs), _forward_logps(model, p, o.sampled, 1.0), atol=1e-5)


def test_prompt_stream_deals_the_same_prompts_to_any_rank_count(monkeypatch):
    one = onpolicy.PromptStream(10, seed=3)
    drawn = one.draw(4) + one.draw(4) + one.draw(4)  # crosses an epoch boundary
    assert sorted(drawn[:10]) == list(range(10))
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(onpolicy.dist, "rank", lambda r=rank: r)
        monkeypatch.setattr(onpolicy.dist, "world", lambda: 2)
        s = onpolicy.PromptStream(10, seed=3)
        shares.append(s.draw(2) + s.draw(2) + s.draw(2))
    # Rank r takes every other prompt of the single-rank stream.
    assert sorted(shares[0] + shares[1]) == sorted(drawn)
    assert shares[0][:2] == drawn[0:4:2] and shares[1][:2] == drawn[1:4:2]


def test_split_updates_uses_every_episode_once():
    eps = [ep.Episode(i, [1], [2], [0.0], "", "eos") for i in range(12)]
    minis = onpolicy.split_updates(eps, 3, 2, seed=0)
    assert len(minis) == 3 and all(len(m) == 2 and all(len(x) == 2 for x in m) for m in minis)
    assert sorted(e.prompt for m in minis for x in m for e in x) == list(range(12))
