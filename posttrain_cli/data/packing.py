"""Micro-batches: padding-free packing (default) or padded rows.

Packed: a micro-batch of sequences becomes one row with no padding at all;
position ids restart at every sequence, and attention stays inside each
sequence: flash-attention and posttrain's varlen SDPA (engine/attention.py)
read the boundaries from `cu_seq_lens_*`; plain SDPA and eager get a dense
block-diagonal causal mask.
"""

from __future__ import annotations

import torch

from posttrain_cli.losses.sft import IGNORE


def _labels(ids: list[int], mask: list[bool]) -> list[int]:
    return [t if m else IGNORE for t, m in zip(ids, mask)]


def pack(seqs: list[tuple[list[int], list[bool]]], boundaries: str = "varlen", dtype=torch.float32) -> dict:
    """boundaries: "varlen" (cu_seq_lens kwargs), "mask" (dense block mask) or "none"."""
    ids, labels, pos, lens = [], [], [], []
    for s_ids, s_mask in seqs:
        ids.extend(s_ids)
        labels.extend(_labels(s_ids, s_mask))
        pos.extend(range(len(s_ids)))
        lens.append(len(s_ids))
    batch = {
        "input_ids": torch.tensor([ids]),
        "labels": torch.tensor([labels]),
        "position_ids": torch.tensor([pos]),
    }
    if boundaries == "varlen":
        batch.update(varlen_kwargs(lens))
    elif boundaries == "mask":
        batch["attention_mask"] = block_causal_mask(lens, dtype)
    return batch


def block_causal_mask(lens: list[int], dtype=torch.float32) -> torch.Tensor:
    """Additive [1, 1, T, T] mask: 0 where query i may see key j, dtype-min elsewhere."""
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    T = seg.numel()
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    mask = torch.zeros(T, T, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def pad(seqs: list[tuple[list[int], list[bool]]], pad_id: int) -> dict:
    width = max(len(s) for s, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    labels = torch.full((len(seqs), width), IGNORE)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (s_ids, s_mask) in enumerate(seqs):
        ids[r, : len(s_ids)] = torch.tensor(s_ids)
        labels[r, : len(s_ids)] = torch.tensor(_labels(s_ids, s_mask))
        attn[r, : len(s_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def varlen_kwargs(lens: list[int]) -> dict:
    """Sequence boundaries of a packed row, under the names flash-attention reads (and the
    engine's varlen SDPA, engine/attention.py)."""
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    longest = max(lens)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
