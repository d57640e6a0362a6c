"""ppo: PPO with a value model, rewards from a reward model and / or verifiers (stages/ppo.py)."""

from __future__ import annotations

from posttrain_cli.errors import UserError
from posttrain_cli.kinds.base import (COMMON, KL_ESTIMATORS, MODELS, POLICY, RL, RL_TRAINING, SCORER, TINY_PROMPTS,
                                      TINY_RL, Kind, check_rl, check_training, check_verifier_rows, check_verifiers,
                                      names_a_verifier, rl_reward_line)
from posttrain_cli.kinds.batch import rl_batch

SCHEMA = {
    **COMMON,
    **RL_TRAINING,
    **RL,
    "epochs": ("?float", 1.0),
    "num_generations": ("int", 1),
    "lr": ("float", 1.0e-6),
    "schedule": (("constant", "linear", "cosine"), "constant"),
    "warmup_ratio": ("float", 0.0),
    # Per-token KL penalty in the reward: beta x KL estimate (Tulu 3: 0.05, k1).
    "beta": ("float", 0.05),
    "kl_estimator": (KL_ESTIMATORS, "k1"),
    # A reward_model stage (or path) scoring completions, times rm_weight.
    "reward_model": ("?str", None),
    "rm_weight": ("float", 1.0),
    # Verifier scores times this (Tulu 3: 10, with rm_weight 0).
    "verifiable_reward": ("float", 1.0),
    # The value model: a reward_model stage or a path; null: `reward_model`, else the input
    # policy with a new scalar head.
    "value_from": ("?str", None),
    "value_lr": ("?float", None),
    "vf_coef": ("float", 0.1),
    "gamma": ("float", 1.0),
    "lam": ("float", 0.95),
    "cliprange": ("float", 0.2),
    # Value predictions are clipped to old +- this; null: no clipping.
    "cliprange_value": ("?float", 0.2),
    # Passes over each rollout batch (each pass takes mini_batches updates).
    "ppo_epochs": ("int", 4),
    "whiten_advantages": ("bool", True),
    "whiten_rewards": ("bool", False),
}


def validate(path: str, stage: dict) -> None:
    check_training(path, stage)
    check_rl(path, stage)
    if stage["ppo_epochs"] <= 0:
        raise UserError(f"{path}.ppo_epochs={stage['ppo_epochs']} must be > 0")
    if not (0 <= stage["gamma"] <= 1 and 0 <= stage["lam"] <= 1):
        raise UserError(f"{path}: gamma and lam must be in [0, 1]")
    verifiers = names_a_verifier(stage)
    if stage["reward_model"] is None and not verifiers:
        raise UserError(f"{path}: a ppo stage needs a reward: set reward_model (a reward_model stage) "
                        f"and/or verifier / verifiers")
    if verifiers:  # rewards from the RM alone: no verifier config to check
        check_verifiers(path, stage)


def check_rows(cfg: dict, rows: list, where: str) -> None:
    if names_a_verifier(cfg):
        check_verifier_rows(cfg, rows, where)


def describe(cfg: dict) -> list[str]:
    return [rl_reward_line(cfg, f"{cfg['verifiable_reward']:g} x "),
            f"   value model: {cfg['value_from'] or cfg['reward_model'] or 'the input policy + new head'}"
            f", vf_coef {cfg['vf_coef']:g}, cliprange {cfg['cliprange']:g} / value "
            f"{cfg['cliprange_value']}, GAE gamma {cfg['gamma']:g} lam {cfg['lam']:g}, "
            f"{cfg['ppo_epochs']} epoch(s) x {cfg['mini_batches']} mini-batch(es)"]


KIND = Kind(
    name="ppo", schema=SCHEMA, module="posttrain_cli.stages.ppo", produces="policy", rows="prompt",
    model_refs={"ref_from": POLICY, "reward_model": SCORER, "value_from": MODELS},
    trains=True, rl=True, validate=validate, batch=rl_batch, uses_verifiers=names_a_verifier,
    check_rows=check_rows, describe=describe,
    tiny_data=(TINY_PROMPTS,), tiny_sizes={"max_steps": 2, **TINY_RL},
    tiny_caps={"num_generations": (1, 2), "mini_batches": (1, 2), "ppo_epochs": (1, 2)},
)
