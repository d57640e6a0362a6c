"""Batched Hugging Face generation: left padding, KV cache, stop at EOS.

Under ZeRO-3 with several ranks every rank must take part in every forward
(parameters are gathered collectively), so generate runs with synced_gpus and
each rank makes the same number of calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from posttrain_cli.engine import dist


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "eos" | "length"


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
             temperature: float = 0.0, top_p: float = 1.0, synced: bool = False,
             calls: int | None = None) -> list[Completion]:
    """Complete every prompt (token ids). `calls` forces the number of generate calls
    (ZeRO-3: equal on every rank); surplus calls run on a dummy prompt."""
    was_training = model.training
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    dev = next(model.parameters()).device
    n_calls = calls if calls is not None else math.ceil(len(prompts) / batch_size)
    out: list[Completion] = []
    for c in range(n_calls):
        chunk = prompts[c * batch_size:(c + 1) * batch_size]
        real = len(chunk)
        if not chunk:
            chunk = [prompts[0] if prompts else [eos_id]]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            attn[r, width - len(p):] = 1
        sample = temperature > 0
        gen = model.generate(
            input_ids=ids.to(dev), attention_mask=attn.to(dev), max_new_tokens=max_new_tokens,
            do_sample=sample, temperature=temperature if sample else None,
            top_p=top_p if sample else None, top_k=None if not sample else 0,
            pad_token_id=pad_id, eos_token_id=eos_id, synced_gpus=synced,
        )
        for r in range(real):
            new = gen[r, width:].tolist()
            if eos_id in new:
                new = new[: new.index(eos_id)]
                reason = "eos"
            else:
                new = [t for t in new if t != pad_id]
                reason = "length"
            out.append(Completion(new, tokenizer.decode(new, skip_special_tokens=True), reason))
    if was_training:
        model.train()
    return out


def shard(items: list, batch_size: int) -> tuple[list, int]:
    """This rank's share of items and the number of generate calls every rank makes."""
    mine = items[dist.rank()::dist.world()]
    most = math.ceil(len(items) / dist.world())
    return mine, math.ceil(most / batch_size)
