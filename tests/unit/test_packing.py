"""Packing keeps sequences apart: a packed row gives each sequence's own logits."""

from __future__ import annotations

import pytest
import torch

from posttrain_cli.data.packing import IGNORE, block_causal_mask, pack, pad


def test_block_causal_mask_by_hand():
    m = block_causal_mask([2, 1])[0, 0]
    allowed = (m == 0).int().tolist()
    assert allowed == [[1, 0, 0],
                       [1, 1, 0],
                       [0, 0, 1]]


def test_pack_positions_and_labels():
    b = pack([([1, 2, 3], [False, True, True]), ([4, 5], [False, True])], "varlen")
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5] and b["max_length_q"] == 3
    assert "attention_mask" not in b


def test_pad_rows():
    b = pad([([1, 2, 3], [False, True, True]), ([4], [True])], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 2, 3], [4, IGNORE, IGNORE]]


@pytest.mark.parametrize("impl,boundaries", [("sdpa", "mask"), ("eager", "mask"), ("posttrain_sdpa", "varlen")])
def test_packed_logits_and_grads_equal_separate(impl, boundaries, tmp_path):
    from transformers import AutoModelForCausalLM

    from posttrain_cli.engine.attention import register
    from posttrain_cli.models.tiny import build_tiny

    register()
    path = build_tiny(tmp_path / "m", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                       "num_attention_heads": 2, "max_position_embeddings": 64})
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl)
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    seqs = [[1, 20, 30, 40, 50, 2], [1, 60, 61, 2], [1, 9]]
    sep = [ref(torch.tensor([s]), use_cache=False).logits[0] for s in seqs]
    sum(x.sum() for x in sep).backward()
    batch = pack([(s, [True] * len(s)) for s in seqs], boundaries)
    batch.pop("labels")
    packed = model(**batch, use_cache=False).logits[0]
    packed.sum().backward()
    torch.testing.assert_close(packed, torch.cat(sep), atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("heads_kv", [4, 2])
def test_varlen_per_sequence_equals_padded_slots(heads_kv):
    """CPU's exact per-sequence calls and the accelerator / compile form (padded slots): same
    outputs and gradients, and both equal causal attention of each sequence alone (GQA too)."""
    import torch.nn.functional as F

    from posttrain_cli.engine.attention import padded_slots, per_sequence

    torch.manual_seed(0)
    lens = [5, 1, 9, 3]
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    q0, k0, v0 = (torch.randn(1, h, 18, 8) for h in (4, heads_kv, heads_kv))
    results = []
    for fn in (lambda q, k, v: per_sequence(q, k, v, cu, None, 0.0, heads_kv != 4),
               lambda q, k, v: padded_slots(q, k, v, cu, max(lens), None, 0.0, heads_kv != 4)):
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out = fn(q, k, v)
        assert out.shape == (1, 18, 4, 8)
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    s, e = 6, 15  # the third sequence alone
    alone = F.scaled_dot_product_attention(q0[:, :, s:e], k0[:, :, s:e], v0[:, :, s:e], is_causal=True,
                                           enable_gqa=heads_kv != 4)
    torch.testing.assert_close(results[0][0][:, s:e], alone.transpose(1, 2), atol=1e-6, rtol=1e-5)
