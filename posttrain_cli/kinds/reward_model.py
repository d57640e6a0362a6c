"""reward_model: a Bradley-Terry scorer trained on preference rows (stages/reward_model.py)."""

from __future__ import annotations

from posttrain_cli.kinds.base import (COMMON, MODELS, PREFERENCE, TINY_PREF, TINY_PREF_EVAL, TINY_TRAIN, TRAINING,
                                      Kind, check_training)
from posttrain_cli.kinds.batch import preference_batch

SCHEMA = {
    **COMMON,
    **TRAINING,
    **PREFERENCE,
    # Llama 2's margin term: subtract each row's `margin` inside the sigmoid.
    "margin": ("bool", False),
    # A row ranking K answers gives K(K-1)/2 pairs: `row` weighs each row once
    # (InstructGPT's 1/C(K,2)), `pair` weighs every pair once.
    "ranked_weighting": (("row", "pair"), "row"),
}


def describe(cfg: dict) -> list[str]:
    return [f"   Bradley-Terry{' with margin' if cfg['margin'] else ''}, "
            f"ranked rows weighted per {cfg['ranked_weighting']}"]


KIND = Kind(
    name="reward_model", schema=SCHEMA, module="posttrain_cli.stages.reward_model", produces="scorer",
    rows="preference",
    # A reward model may start from a policy or continue an earlier reward model.
    from_accepts=MODELS,
    trains=True, validate=check_training, batch=preference_batch, describe=describe,
    tiny_data=(TINY_PREF,), tiny_heldout=(TINY_PREF_EVAL,), tiny_sizes={"max_steps": 5, **TINY_TRAIN},
)
