"""rejection_sampling: sample K completions per prompt, keep the best or all that pass, as an
SFT dataset (stages/rejection_sampling.py)."""

from __future__ import annotations

from posttrain_cli.errors import UserError
from posttrain_cli.kinds.base import (COMMON, GENERATION, RL, SCORER, TINY_GENERATION, TINY_PROMPTS, VERIFIER_KEYS,
                                      Kind, check_generation, check_verifier_rows, check_verifiers, names_a_verifier,
                                      positive, sampling_line, verifier_names)

SCHEMA = {
    **COMMON,
    **GENERATION,
    # K: completions sampled per prompt.
    "num_samples": ("int", 8),
    # best: the highest-scoring of the K (Llama 2 / 3); all_pass: every one that passes (R1).
    "keep": (("best", "all_pass"), "best"),
    # Minimum score to keep. all_pass with verifiers alone and no threshold: every
    # verifier of the row gives full marks (score >= 1).
    "threshold": ("?float", None),
    # all_pass: at most this many kept completions per prompt (distinct ones first); null: all.
    "max_per_prompt": ("?int", None),
    # Score = rm_weight x reward model (a reward_model stage or path) + verifiable_reward x verifiers.
    "reward_model": ("?str", None),
    "rm_weight": ("float", 1.0),
    "verifiable_reward": ("float", 1.0),
    **{k: RL[k] for k in VERIFIER_KEYS},
}


def uses_verifiers(cfg: dict) -> bool:
    """Without a reward model the verifiers score; with one, when a verifier key is set."""
    return cfg.get("reward_model") is None or names_a_verifier(cfg)


def validate(path: str, stage: dict) -> None:
    check_generation(path, stage)
    positive(path, stage, ("num_samples", "max_per_prompt"))
    # A row no verifier grades is an error naming the row, at pre-flight (check_rows).
    verifiers = uses_verifiers(stage)
    if stage["num_samples"] < 2 and stage["keep"] == "best":
        raise UserError(f"{path}.num_samples={stage['num_samples']}: best-of-K needs K >= 2")
    if stage["keep"] == "all_pass" and stage["threshold"] is None and stage["reward_model"] is not None:
        raise UserError(f"{path}.threshold is required with keep: all_pass and a reward model (the score "
                        f"a completion must reach)")
    if verifiers:
        check_verifiers(path, stage)


def check_rows(cfg: dict, rows: list, where: str) -> None:
    if uses_verifiers(cfg):
        # The stage could score with a reward model instead: a row no verifier grades says so.
        check_verifier_rows(cfg, rows, where, suggest_reward_model=True)


def describe(cfg: dict) -> list[str]:
    score = []
    if cfg["reward_model"]:
        score.append(f"{cfg['rm_weight']:g} x reward model {cfg['reward_model']}")
    names = verifier_names(cfg)
    if names or not cfg["reward_model"]:
        score.append(f"{cfg['verifiable_reward']:g} x verifiers {', '.join(names) or 'by dataset'}")
    keep = ("best of K" if cfg["keep"] == "best" else "all that pass"
            + (f" (at most {cfg['max_per_prompt']} per prompt)" if cfg["max_per_prompt"] else ""))
    threshold = (f", threshold {cfg['threshold']:g}" if cfg["threshold"] is not None else
                 ", pass = every verifier full marks" if cfg["keep"] == "all_pass" else "")
    return [sampling_line(cfg, cfg["num_samples"]), f"   score: {'; '.join(score)}; keep {keep}{threshold}"]


def tiny(stage: dict, out: dict) -> None:
    """all_pass keeps the best instead: a model trained a few steps passes nothing, and a stage
    that keeps nothing is an error."""
    if stage.get("keep") == "all_pass":
        out.update(keep="best", max_per_prompt=None, threshold=None)


KIND = Kind(
    name="rejection_sampling", schema=SCHEMA, module="posttrain_cli.stages.rejection_sampling", produces="dataset",
    samples=True, rows="open_prompt", output_rows="sft", model_refs={"reward_model": SCORER},
    validate=validate, uses_verifiers=uses_verifiers, check_rows=check_rows, describe=describe,
    tiny_data=(TINY_PROMPTS,), tiny_sizes=dict(TINY_GENERATION), tiny_caps={"num_samples": (2, 4)}, tiny=tiny,
)
