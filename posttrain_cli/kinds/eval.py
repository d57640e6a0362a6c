"""eval: generate on held-out prompts and score them with a verifier (stages/eval.py)."""

from __future__ import annotations

from posttrain_cli.kinds.base import COMMON, EVAL, SCORER, TINY_EVAL, Kind

SCHEMA = {
    **COMMON,
    **{k: v for k, v in EVAL.items() if k not in ("before",)},
}


def tiny(stage: dict, out: dict) -> None:
    """The tiny prompts are arithmetic: the number verifier grades them."""
    out["verifier"] = "number"


KIND = Kind(
    name="eval", schema=SCHEMA, module="posttrain_cli.stages.eval", produces=None, samples=True, rows="prompt",
    model_refs={"reward_model": SCORER},
    tiny_data=(TINY_EVAL,), tiny_sizes={"max_new_tokens": 8, "batch_size": 32, "limit": 32}, tiny=tiny,
)
