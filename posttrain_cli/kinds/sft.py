"""sft: supervised fine-tuning on chat rows (stages/sft.py)."""

from __future__ import annotations

from posttrain_cli.kinds.base import COMMON, TINY_SFT, TINY_TRAIN, TRAINING, Kind, check_training
from posttrain_cli.kinds.batch import training_batch

SCHEMA = {
    **COMMON,
    **TRAINING,
    # Pack several sequences per row with attention kept inside each sequence.
    "packing": ("bool", True),
    # Over max_seq_len: truncate (keep the start) or drop the row.
    "truncation": (("truncate", "drop"), "truncate"),
    # Which assistant turns of a conversation are trained (data/chat.py): each (every turn, in the
    # context the template gives it when it is generated: one example per turn where the template
    # rewrites earlier turns, as Qwen3 and R1 distills do) or last (the final turn only).
    "multi_turn": (("each", "last"), "each"),
}

KIND = Kind(
    name="sft", schema=SCHEMA, module="posttrain_cli.stages.sft", produces="policy", rows="sft",
    trains=True, validate=check_training, batch=training_batch,
    tiny_data=(TINY_SFT,), tiny_sizes={"max_steps": 10, **TINY_TRAIN},
)
