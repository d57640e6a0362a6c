"""Preference data for the reward_model and dpo stages: rows -> tokenized answers -> packed micro-batches.

A row (data/schemas.py: preference_row) holds a prompt and K >= 2 answers,
best first. Rows are tokenized once (prompt + each answer through the model's
chat template; only the answer's tokens carry loss) and every answer of a
micro-batch goes into one packed row, so chosen and rejected share a single
forward pass.

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

import torch

from posttrain_cli.data import packing
from posttrain_cli.data.chat import apply_truncation, tokenize_response
from posttrain_cli.data.schemas import preference_row, require_margins
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


def as_pairs(examples: list[dict]) -> list[dict]:
    """DPO trains on pairs: a ranked row of K answers becomes its K(K-1)/2 (better, worse) pairs."""
    out = []
    for e in examples:
        for i, j in ranked_pairs(len(e["answers"])):
            out.append({"answers": [e["answers"][i], e["answers"][j]], "margin": e["margin"], "src": e["src"]})
    return out


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
    """The stage's training and held-out examples, tokenized once (rank 0, cached) -> {"train", "heldout", "stats"}."""
    from posttrain_cli.errors import UserError

    cfg = ctx.cfg
    train_rows, train_drops = load_rows(cfg["data"], ctx.where("data"), ctx.seed, ctx.datasets)
    held_rows, held_drops = (load_rows(cfg["heldout"], ctx.where("heldout"), ctx.seed, ctx.datasets)
                             if cfg["heldout"] else ([], {}))
    if need_margin:  # checked before the run for local files; hub datasets are checked here
        require_margins(train_rows, ctx.where("margin"))

    def build():
        train, train_stats = tokenize(tokenizer, train_rows, cfg["max_seq_len"], cfg["truncation"])
        held, held_stats = tokenize(tokenizer, held_rows, cfg["max_seq_len"], cfg["truncation"])
        return {"train": train, "heldout": held,
                "stats": {"train": {**train_drops, **train_stats}, "heldout": {**held_drops, **held_stats}}}

    blob = ctx.cached(f"{ctx.kind}-data", build)
    s = blob["stats"]["train"]
    if not blob["train"]:
        raise UserError(f"{ctx.where('data')}: no preference row is left to train on ({s['rows']} rows: "
                        f"{s['dropped_identical']} with identical answers, {s['dropped_too_long']} too long for "
                        f"max_seq_len={cfg['max_seq_len']} with truncation={cfg['truncation']})")
    ctx.info(f"{s['rows']} preference rows -> {s['examples']} examples; dropped: {s['dropped_identical']} with "
             f"identical answers, {s['dropped_too_long']} too long, {s['dropped_identical_after_truncation']} "
             f"identical once truncated; {s['truncated_answers']} answers truncated (max_seq_len {cfg['max_seq_len']})")
    return blob
