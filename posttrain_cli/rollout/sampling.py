"""Sampling a model into a dataset: what `generate` and `rejection_sampling` share.

    prompts = load(ctx, tokenizer)                     # rows, token ids, long ones dropped
    sampler = input_sampler(ctx, tokenizer)            # rollout/backend.py, over the input model
    samples = sample(ctx, sampler, prompts, n=4)       # this rank's prompts x n completions
    write_rows(ctx, [output_row(...) for s in kept])   # rank 0: data.jsonl, in prompt order

Prompts are dealt round-robin over ranks and a prompt's n completions stay on its rank, so
per-prompt decisions (best-of-K) need no communication. Every rank makes the same number of
generate calls (ZeRO-3 gathers parameters collectively). Sampling is seeded per rank
(seed, rank), so a re-run on the same ranks writes the same rows.
"""

from __future__ import annotations

import heapq
import json
import math
import os
from dataclasses import dataclass, field

from posttrain_cli.data.chat import prompt_ids
from posttrain_cli.data.schemas import open_prompt_row
from posttrain_cli.data.sources import load_mixture
from posttrain_cli.engine import dist
from posttrain_cli.errors import UserError

# Fields of a prompt row that an output row does not carry over: ours (src), or the shapes
# its conversation came in (messages takes their place).
NOT_CARRIED = ("src", "prompt", "completion")


@dataclass
class Prompts:
    rows: list[dict]  # prompt rows that fit (data/schemas.py: open_prompt_row)
    ids: list[list[int]]  # their chat-template token ids, generation prompt included
    index: list[int]  # each one's position among the loaded rows (an output row's prompt_index)
    too_long: int  # prompts dropped for leaving no room for max_new_tokens


@dataclass
class Sample:
    prompt: int  # index into Prompts.rows
    index: int  # 0 .. n-1 among its prompt's completions
    text: str
    finish_reason: str  # "eos" | "length"
    length: int  # tokens, EOS not counted
    score: float = 0.0
    scores: dict = field(default_factory=dict)  # verifier -> raw score
    rm_score: float | None = None

    @property
    def truncated(self) -> bool:
        return self.finish_reason != "eos"


def fitting(lengths: list[int], max_seq_len: int, max_new_tokens: int) -> list[int]:
    """Indices of the prompts with room for max_new_tokens within max_seq_len."""
    budget = max_seq_len - max_new_tokens
    return [i for i, n in enumerate(lengths) if n <= budget]


def load(ctx, tokenizer) -> Prompts:
    """The stage's prompt rows (the first `limit`), tokenized; prompts too long are dropped and
    counted, and a stage left with none is a UserError."""
    cfg = ctx.cfg
    budget = cfg["max_seq_len"] - cfg["max_new_tokens"]
    if budget <= 0:
        raise UserError(f"{ctx.where('max_seq_len')}={cfg['max_seq_len']} leaves no room for a prompt before "
                        f"max_new_tokens={cfg['max_new_tokens']}")
    rows = load_mixture(cfg["data"], ctx.where("data"), open_prompt_row, ctx.seed, resolved_from=ctx.datasets)
    if cfg["limit"]:
        rows = rows[: cfg["limit"]]
    ids = [prompt_ids(tokenizer, r["messages"]) for r in rows]
    keep = fitting([len(p) for p in ids], cfg["max_seq_len"], cfg["max_new_tokens"])
    if not keep:
        raise UserError(f"{ctx.where('data')}: every one of {len(rows)} prompts is longer than max_seq_len - "
                        f"max_new_tokens = {budget} tokens; raise {ctx.where('max_seq_len')}")
    too_long = len(rows) - len(keep)
    ctx.info(f"{len(keep)} prompts" + (f" ({too_long} longer than {budget} tokens dropped: raise max_seq_len "
                                       f"or lower max_new_tokens to keep them)" if too_long else ""))
    return Prompts([rows[i] for i in keep], [ids[i] for i in keep], keep, too_long)


def mine(n_prompts: int) -> tuple[list[int], int]:
    """This rank's prompts (round-robin) and the most any rank has."""
    return list(range(dist.rank(), n_prompts, dist.world())), math.ceil(n_prompts / dist.world())


def input_sampler(ctx, tokenizer):
    """A Sampler (rollout/backend.py) over the stage's input model."""
    from posttrain_cli.rollout.backend import frozen_sampler

    return frozen_sampler(ctx, ctx.input_model, tokenizer)


def sample(ctx, sampler, prompts: Prompts, n: int) -> list[Sample]:
    """n completions of each of this rank's prompts, a prompt's n together, in prompt order."""
    import torch

    cfg = ctx.cfg
    picks, most = mine(len(prompts.ids))
    flat = [(p, k) for p in picks for k in range(n)]
    bs = cfg["batch_size"]
    calls = math.ceil(most * n / bs)
    torch.manual_seed(ctx.seed * 1_000_003 + dist.rank())
    out: list[Sample] = []
    bar = ctx.progress(calls, "sampling")
    for c in range(calls):
        chunk = flat[c * bs:(c + 1) * bs]
        got = sampler.generate([prompts.ids[p] for p, _ in chunk], max_new_tokens=cfg["max_new_tokens"],
                               temperature=cfg["temperature"], top_p=cfg["top_p"], batch_size=bs, calls=1)
        out += [Sample(p, k, o.text, o.finish_reason, len(o.token_ids)) for (p, k), o in zip(chunk, got)]
        bar.update(c + 1, {"completions": len(out)})
    bar.close()
    return out


def output_row(prompt_row: dict, sample: Sample, prompt_index: int, **extra) -> dict:
    """An SFT row: the prompt turns + the completion, the prompt row's own fields, where it came from."""
    carried = {k: v for k, v in prompt_row.items() if k not in NOT_CARRIED and k != "messages" and v is not None}
    return {"messages": prompt_row["messages"] + [{"role": "assistant", "content": sample.text}], **carried,
            "prompt_index": prompt_index, "sample_index": sample.index, "finish_reason": sample.finish_reason,
            **extra}


def write_rows(ctx, rows: list[dict], name: str = "data.jsonl") -> None:
    """Every rank's rows -> ctx.work_dir/name on rank 0, ordered by (prompt_index, sample_index).

    Each rank writes its own (already ordered) part; rank 0 merges the parts as they stream in
    and renames the result into place, so a crash never leaves a half-written dataset."""
    key = lambda r: (r["prompt_index"], r["sample_index"])  # noqa: E731
    part = ctx.work_dir / f".part-{dist.rank()}.jsonl"
    with part.open("w") as f:
        for row in sorted(rows, key=key):
            f.write(json.dumps(row) + "\n")
    dist.barrier()
    if dist.is_main():
        parts = [ctx.work_dir / f".part-{r}.jsonl" for r in range(dist.world())]
        files = [p.open() for p in parts]
        tmp = ctx.work_dir / f".{name}.tmp"
        try:
            with tmp.open("w") as out:
                streams = [(json.loads(line) for line in f) for f in files]
                for row in heapq.merge(*streams, key=key):
                    out.write(json.dumps(row) + "\n")
        finally:
            for f in files:
                f.close()
        os.replace(tmp, ctx.work_dir / name)
        for p in parts:
            p.unlink()
    dist.barrier()


def generation_sums(samples: list[Sample]) -> list[float]:
    """[completions, ended with EOS, tokens] of this rank, for all_sum."""
    return [len(samples), sum(not s.truncated for s in samples), sum(s.length for s in samples)]
