"""The cached reference equals a live one: the log-probs precomputed for every pair before
training are, pair for pair, what a reference model computes on the training micro-batches."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_DATA

ARCH = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=128, seed=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain_cli.data import preference as pref
    from posttrain_cli.data.schemas import preference_row
    from posttrain_cli.engine.attention import register
    from posttrain_cli.models.tiny import build_tiny

    path = build_tiny(tmp_path_factory.mktemp("ref") / "model", ARCH)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=register()).eval()
    rows = [preference_row(json.loads(l), "p", i)
            for i, l in enumerate((TINY_DATA / "pref_train.jsonl").read_text().splitlines()[:23], 1)]
    examples, _ = pref.tokenize(tok, rows, 64, "truncate")
    return model, pref.as_pairs(examples)


def test_precomputed_log_probs_equal_live_ones_per_micro_batch(setup):
    from posttrain_cli.stages.dpo import answer_logps, logps_pass, micro_batch, split

    model, pairs = setup
    mb = dict(boundaries="varlen", mask_dtype=torch.float32, device=torch.device("cpu"))
    cached = logps_pass(model, pairs, 5, **mb)          # chunks of 5 pairs, 23 pairs -> 5 forwards
    assert cached.shape == (23, 2)
    for idx in ([0, 7, 22], [3], list(range(8, 16))):    # training micro-batches, other groupings
        with torch.no_grad():
            live = torch.stack(split(answer_logps(model, micro_batch(pairs, idx, **mb)).double()), dim=1)
        assert torch.allclose(live, cached[idx], atol=1e-5), (live, cached[idx])


def test_one_sequence_at_a_time_gives_the_same_log_probs(setup):
    """Packing does not leak between sequences: a pair alone, unpacked, scores the same."""
    from posttrain_cli.stages.dpo import logps_pass

    model, pairs = setup
    packed = logps_pass(model, pairs, 8, boundaries="varlen", mask_dtype=torch.float32, device="cpu")
    for i in (0, 11):
        for k in (0, 1):
            ids, mask = pairs[i]["answers"][k]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
            target = torch.tensor(ids[1:])
            keep = torch.tensor(mask[1:])
            alone = logits.gather(-1, target[:, None])[:, 0][keep].sum()
            assert alone.item() == pytest.approx(packed[i, k].item(), abs=1e-4)
