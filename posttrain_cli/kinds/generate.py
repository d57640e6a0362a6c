"""generate: sample completions from a model into an SFT dataset (stages/generate.py)."""

from __future__ import annotations

from posttrain_cli.kinds.base import (COMMON, GENERATION, TINY_GENERATION, TINY_PROMPTS, Kind, check_generation,
                                      positive, sampling_line)

SCHEMA = {
    **COMMON,
    **GENERATION,
    # Completions per prompt; each becomes one row.
    "num_generations": ("int", 1),
}


def validate(path: str, stage: dict) -> None:
    check_generation(path, stage)
    positive(path, stage, ("num_generations",))


def describe(cfg: dict) -> list[str]:
    return [sampling_line(cfg, cfg["num_generations"])]


KIND = Kind(
    name="generate", schema=SCHEMA, module="posttrain_cli.stages.generate", produces="dataset", samples=True,
    rows="open_prompt", output_rows="sft", validate=validate, describe=describe,
    tiny_data=(TINY_PROMPTS,), tiny_sizes=dict(TINY_GENERATION), tiny_caps={"num_generations": (1, 2)},
)
