"""Preference data for the reward_model and dpo stages: rows -> tokenized answers -> packed micro-batches.

A row (data/schemas.py: preference_row) holds a prompt and K >= 2 answers,
best first. Rows are tokenized once (prompt + each answer through the model's
chat template; only the answer's tokens carry loss) and every answer of a
micro-batch goes into one packed row, so chosen and rejected share a single
forward pass. The stages' rows are checked and tokenized on every core into the
run's shared, memory-mapped cache (data/tokenized.py); `load_rows` + `tokenize`
are the same rules on rows in memory.

What happens to bad rows:
- malformed (a field missing or of the wrong type, chosen and rejected with
  different prompts): an error naming the file, row and field, before anything trains;
- chosen identical to rejected (any two answers of a row identical): dropped and counted;
- an answer longer than max_seq_len: truncated (the start kept) or, with
  `truncation: drop`, the row dropped; both counted. A row whose prompt alone
  fills max_seq_len, or whose answers become identical once truncated, is dropped.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np
import torch

from posttrain_cli.data import packing, tokenized
from posttrain_cli.data.chat import apply_truncation, tokenize_response
from posttrain_cli.data.schemas import preference_row
from posttrain_cli.data.sources import load_mixture
from posttrain_cli.losses.sft import shifted_targets


def load_rows(sources: list[dict], where: str, seed: int, resolved_from: dict) -> tuple[list[dict], dict]:
    """Parsed rows with drops removed, and the counts."""
    rows = load_mixture(sources, where, preference_row, seed, resolved_from=resolved_from)
    kept = [r for r in rows if r["drop"] is None]
    return kept, {"rows": len(rows), "dropped_identical": len(rows) - len(kept)}


def ranked_pairs(k: int) -> list[tuple[int, int]]:
    """All (better, worse) index pairs of K answers ranked best first: K(K-1)/2 of them."""
    return list(combinations(range(k), 2))


def tokenize(tokenizer, rows: list[dict], max_seq_len: int, truncation: str) -> tuple[list[dict], dict]:
    """-> examples {"answers": [(ids, mask)], "margin"} and counts of truncated / dropped rows."""
    examples, truncated, too_long, same = [], 0, 0, 0
    for row in rows:
        answers = []
        for resp in row["responses"]:
            tok = apply_truncation(tokenize_response(tokenizer, row["prompt"], resp), max_seq_len, truncation)
            if tok is None:
                break
            truncated += tok.truncated
            answers.append((tok.input_ids, tok.loss_mask))
        if len(answers) < len(row["responses"]):
            too_long += 1
            continue
        if len({tuple(ids) for ids, _ in answers}) < len(answers):
            same += 1
            continue
        examples.append({"answers": answers, "margin": row["margin"], "src": row.get("src")})
    stats = {"examples": len(examples), "truncated_answers": truncated, "dropped_too_long": too_long,
             "dropped_identical_after_truncation": same,
             "tokens": sum(len(ids) for e in examples for ids, _ in e["answers"])}
    return examples, stats


class Pairs(Sequence):
    """DPO trains on pairs: a ranked row of K answers becomes its K(K-1)/2 (better, worse) pairs,
    made when asked for (the rows may be a memory-mapped cache of a million)."""

    def __init__(self, examples: Sequence[dict], counts: list[int]):
        self.examples, self.k = examples, np.asarray(counts, np.int64)
        per_row = self.k * (self.k - 1) // 2
        self.row = np.repeat(np.arange(len(per_row)), per_row)
        self.pair = np.arange(len(self.row)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        self._pairs = {int(k): ranked_pairs(int(k)) for k in set(self.k.tolist())}

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, n: int) -> dict:
        r = int(self.row[n])
        e = self.examples[r]
        i, j = self._pairs[int(self.k[r])][int(self.pair[n])]
        return {"answers": [e["answers"][i], e["answers"][j]], "margin": e["margin"], "src": e["src"]}


def as_pairs(examples: Sequence[dict]) -> Pairs:
    """Every example's (better, worse) pairs, in order."""
    counts = examples.answer_counts() if hasattr(examples, "answer_counts") else \
        [len(e["answers"]) for e in examples]
    return Pairs(examples, counts)


def pack_answers(seqs: list[tuple[list[int], list[bool]]], boundaries: str, mask_dtype, device) -> dict:
    """Pack sequences into one row. Returns the model inputs plus, for the positions whose next
    token is an answer token: `positions`, `targets`, `seq` (which sequence), and `ends`
    (each sequence's last position), `answer_tokens` [S]."""
    b = packing.pack(seqs, boundaries, mask_dtype)
    targets = shifted_targets(b.pop("labels"))[0]
    keep = targets != packing.IGNORE
    positions = keep.nonzero().squeeze(-1)
    lens = torch.tensor([len(ids) for ids, _ in seqs])
    seq = torch.repeat_interleave(torch.arange(len(seqs)), lens)
    return {
        "inputs": {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()},
        "positions": positions.to(device),
        "targets": targets[positions].to(device),
        "seq": seq[positions].to(device),
        "ends": (torch.cumsum(lens, 0) - 1).to(device),
        "answer_tokens": torch.tensor([sum(m) for _, m in seqs], dtype=torch.float32, device=device),
        "n": len(seqs),
        "tokens": float(lens.sum()),
    }


def prepare(ctx, tokenizer, *, need_margin: bool = False) -> dict:
    """The stage's training and held-out examples, tokenized once on every core into the run's shared
    cache (rank 0) -> {"train", "heldout", "stats"}; every rank reads the cache memory-mapped."""
    from posttrain_cli.errors import UserError

    cfg = ctx.cfg
    spec = tokenized.PreferenceTokenization(tokenizer, cfg["max_seq_len"], cfg["truncation"])
    root = tokenized.cache_root(ctx.stage_dir.parent)
    train = tokenized.locate(cfg["data"], ctx.where("data"), spec, root, ctx.datasets)
    held = tokenized.locate(cfg["heldout"], ctx.where("heldout"), spec, root, ctx.datasets) if cfg["heldout"] else []

    def build():
        for c in train + held:
            if not c.ready():
                c.build(progress=ctx.progress)

    ctx.once(lambda: all(c.ready() for c in train + held), build)
    # need_margin: checked before the run for local files; hub datasets are checked here
    train_rows, s = tokenized.preference_mixture(train, ctx.seed, margin_key=ctx.where("margin") if need_margin else None)
    held_rows, held_stats = tokenized.preference_mixture(held, ctx.seed) if held else ([], tokenize(tokenizer, [], 0, "")[1])
    if not train_rows:
        raise UserError(f"{ctx.where('data')}: no preference row is left to train on ({s['rows']} rows: "
                        f"{s['dropped_identical']} with identical answers, {s['dropped_too_long']} too long for "
                        f"max_seq_len={cfg['max_seq_len']} with truncation={cfg['truncation']})")
    ctx.info(f"{s['rows']} preference rows -> {s['examples']} examples; dropped: {s['dropped_identical']} with "
             f"identical answers, {s['dropped_too_long']} too long, {s['dropped_identical_after_truncation']} "
             f"identical once truncated; {s['truncated_answers']} answers truncated (max_seq_len {cfg['max_seq_len']})")
    return {"train": train_rows, "heldout": held_rows, "stats": {"train": s, "heldout": held_stats}}
