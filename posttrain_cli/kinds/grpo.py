"""grpo: group-relative policy optimisation on verifier rewards (stages/grpo.py)."""

from __future__ import annotations

from posttrain_cli.errors import UserError
from posttrain_cli.kinds.base import (COMMON, POLICY, RL, RL_TRAINING, TINY_PROMPTS, TINY_RL, Kind, check_rl,
                                      check_training, check_verifier_rows, check_verifiers, rl_reward_line)
from posttrain_cli.kinds.batch import rl_batch

# Names of the RL registries (posttrain_cli.losses.rl), for torch-free checks (a test keeps them equal).
ADV_NORMS = ("group_std", "centered", "none")
LOSS_AGGS = ("seq_mean_token_mean", "token_mean", "constant")

SCHEMA = {
    **COMMON,
    **RL_TRAINING,
    **RL,
    # Passes over the prompts when max_steps is unset.
    "epochs": ("?float", 1.0),
    "lr": ("float", 1.0e-6),
    "schedule": (("constant", "linear", "cosine"), "constant"),
    "warmup_ratio": ("float", 0.0),
    # Advantage within each prompt's group: group_std (GRPO), centered (Dr.GRPO, OLMo 3), none.
    "adv_norm": (ADV_NORMS, "group_std"),
    # seq_mean_token_mean (GRPO), token_mean (DAPO), constant (Dr.GRPO: / max_new_tokens).
    "loss_agg": (LOSS_AGGS, "seq_mean_token_mean"),
    # The ratio is clipped to [1 - clip_low, 1 + clip_high] (DAPO clip-higher: 0.28).
    "clip_low": ("float", 0.2),
    "clip_high": ("float", 0.2),
    # DAPO dynamic sampling: drop groups whose rewards are all equal and sample more
    # prompts, up to dynamic_sampling_rounds extra rounds per step.
    "dynamic_sampling": ("bool", False),
    "dynamic_sampling_rounds": ("int", 3),
    # DAPO overlong shaping: a linear penalty up to overlong_penalty over the last
    # overlong_buffer tokens before max_new_tokens; null: off.
    "overlong_buffer": ("?int", None),
    "overlong_penalty": ("float", 1.0),
    # R1-Zero: the reference becomes the current policy every N steps; null: never.
    "ref_refresh_every": ("?int", None),
}


def validate(path: str, stage: dict) -> None:
    check_training(path, stage)
    check_rl(path, stage)
    if stage["num_generations"] < 2 and stage["adv_norm"] != "none":
        raise UserError(f"{path}.num_generations={stage['num_generations']}: a group advantage "
                        f"({stage['adv_norm']}) needs at least 2 completions per prompt")
    if stage["clip_low"] < 0 or stage["clip_high"] < 0 or stage["clip_low"] >= 1:
        raise UserError(f"{path}: clip_low must be in [0, 1) and clip_high >= 0")
    if stage["overlong_buffer"] is not None and not 0 < stage["overlong_buffer"] < stage["max_new_tokens"]:
        raise UserError(f"{path}.overlong_buffer={stage['overlong_buffer']} must be in "
                        f"(0, max_new_tokens={stage['max_new_tokens']})")
    if stage["ref_refresh_every"] is not None and stage["ref_refresh_every"] <= 0:
        raise UserError(f"{path}.ref_refresh_every={stage['ref_refresh_every']} must be > 0")
    check_verifiers(path, stage)


def uses_verifiers(cfg: dict) -> bool:
    """Always: a row's dataset may name its verifier even when no verifier key is set."""
    return True


def check_rows(cfg: dict, rows: list, where: str) -> None:
    check_verifier_rows(cfg, rows, where)


def describe(cfg: dict) -> list[str]:
    return [rl_reward_line(cfg),
            f"   adv_norm {cfg['adv_norm']}, loss_agg {cfg['loss_agg']}, clip [{cfg['clip_low']:g}, "
            f"{cfg['clip_high']:g}], {cfg['mini_batches']} update(s) per rollout"
            + (", dynamic sampling" if cfg["dynamic_sampling"] else "")
            + (f", overlong buffer {cfg['overlong_buffer']}" if cfg["overlong_buffer"] else "")
            + (f", reference refreshed every {cfg['ref_refresh_every']} steps" if cfg["ref_refresh_every"] else "")]


KIND = Kind(
    name="grpo", schema=SCHEMA, module="posttrain_cli.stages.grpo", produces="policy", rows="prompt",
    model_refs={"ref_from": POLICY},
    trains=True, rl=True, validate=validate, batch=rl_batch, uses_verifiers=uses_verifiers,
    check_rows=check_rows, describe=describe,
    tiny_data=(TINY_PROMPTS,), tiny_sizes={"max_steps": 2, **TINY_RL},
    # A GRPO group needs two samples at least.
    tiny_caps={"num_generations": (2, 4), "mini_batches": (1, 2), "dynamic_sampling_rounds": (1, 1)},
)
