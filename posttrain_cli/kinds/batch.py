"""Batch arithmetic: global = micro x ranks x accumulation, or a UserError showing the numbers.

A training kind's record points its `batch` at one of these; `plan` prints the result and the
stage worker trains with it. Torch-free.
"""

from __future__ import annotations

from posttrain_cli.errors import UserError


def training_batch(path: str, stage: dict, world_size: int, answers: int = 1) -> dict:
    """global_batch_size rows per optimizer step; `answers`: sequences per row (a preference row
    holds two, each up to max_seq_len)."""
    g, m = stage["global_batch_size"], stage["micro_batch_size"]
    if m is None:
        if g % world_size:
            raise UserError(f"{path}.global_batch_size={g} does not split over {world_size} rank(s); use a "
                            f"multiple of {world_size}, e.g. {path}.global_batch_size={max(world_size, g - g % world_size)}")
        m = g // world_size
    per_pass = m * world_size
    if g % per_pass:
        lower = max(per_pass, g - g % per_pass)
        fits = f" or {path}.micro_batch_size={g // world_size} (or null: {g} / {world_size} rank(s))" \
            if g % world_size == 0 else ""
        raise UserError(
            f"{path}.global_batch_size={g} does not divide into micro_batch_size {m} x {world_size} "
            f"rank(s) = {per_pass} sequences per pass ({g} / {per_pass} = {g / per_pass:.3g}); "
            f"use a multiple of {per_pass}, e.g. {lower} or {lower + per_pass}{fits}"
        )
    return {
        "global_batch_size": g,
        "micro_batch_size": m,
        "world_size": world_size,
        "grad_accum": g // per_pass,
        "max_tokens_per_step": g * stage["max_seq_len"] * answers,
    }


def preference_batch(path: str, stage: dict, world_size: int) -> dict:
    """training_batch of preference rows: two answers per row."""
    return training_batch(path, stage, world_size, answers=2)


def rl_batch(path: str, stage: dict, world_size: int) -> dict:
    """RL batches: prompts_per_step x num_generations sequences per rollout, split into
    mini_batches updates, each split over ranks and micro-batches."""
    p, g, k, m = (stage["prompts_per_step"], stage["num_generations"], stage["mini_batches"],
                  stage["micro_batch_size"])
    # The fewest prompts per step that split over the ranks, each update's sequences too.
    fits = next(q for q in range(world_size, (p + 1) * world_size * k + 1, world_size) if q >= p and q * g % (k * world_size) == 0)
    if p % world_size:
        raise UserError(f"{path}.prompts_per_step={p} does not divide over {world_size} rank(s); "
                        f"use a multiple of {world_size}, e.g. {path}.prompts_per_step={fits}")
    seqs = p * g
    if seqs % k:
        raise UserError(f"{path}: prompts_per_step {p} x num_generations {g} = {seqs} sequences do not split "
                        f"into mini_batches={k}")
    per_update = seqs // k
    if m is None:
        if per_update % world_size:
            raise UserError(f"{path}: {seqs} sequences / mini_batches {k} = {per_update} per update do not split "
                            f"over {world_size} rank(s); use {path}.prompts_per_step={fits}")
        m = per_update // world_size
    per_pass = m * world_size
    if per_update % per_pass:
        raise UserError(f"{path}: {seqs} sequences / mini_batches {k} = {per_update} per update do not divide into "
                        f"micro_batch_size {m} x {world_size} rank(s) = {per_pass} per pass; pick micro_batch_size "
                        f"dividing {per_update // world_size if per_update % world_size == 0 else per_update}")
    return {"global_batch_size": per_update, "micro_batch_size": m, "world_size": world_size,
            "grad_accum": per_update // per_pass, "prompts_per_rank": p // world_size,
            "max_tokens_per_step": per_update * stage["max_seq_len"]}
