"""distill: on-policy distillation from per-domain teachers (stages/distill.py)."""

from __future__ import annotations

from posttrain_cli.errors import UserError
from posttrain_cli.kinds.base import (COMMON, POLICY, REQUIRED, RL, RL_TRAINING, TINY_DOMAINS, TINY_EVAL, TINY_PROMPTS,
                                      TINY_RL, Kind, check_rl, check_training, check_verifier_rows, check_verifiers,
                                      positive)
from posttrain_cli.kinds.batch import rl_batch

SCHEMA = {
    **COMMON,
    **RL_TRAINING,
    **{k: v for k, v in RL.items() if k not in ("beta", "kl_estimator", "ref_from", "no_eos_penalty")},
    "epochs": ("?float", 1.0),
    "lr": ("float", 1.0e-6),
    "schedule": (("constant", "linear", "cosine"), "constant"),
    "warmup_ratio": ("float", 0.0),
    "num_generations": ("int", 4),
    # Teachers by the value of a prompt row's `dataset` (or `domain`) field: stages or paths.
    "teachers": ("dict", REQUIRED),
    # route: each prompt's tokens are scored by its own teacher; mixture: by the teachers'
    # weighted mixture p = sum_k w_k p_k (weights from teacher_weights, default equal).
    "combine": (("route", "mixture"), "route"),
    "teacher_weights": ("dict", {}),
    # token: the per-token advantage sg[log p_teacher(y_t) - log p_student(y_t)] on the sampled
    # token (MiMo-V2-Flash); full: the full-vocabulary reverse KL at every position (DeepSeek V4).
    "kl": (("token", "full"), "token"),
    # The token advantage is clipped to [-adv_clip, adv_clip].
    "adv_clip": ("float", 2.0),
    # Importance weights pi/pi_sampler are truncated at this value; null: no truncation.
    "is_cap": ("?float", 2.0),
    # Outcome advantage weight: alpha x the group-centred verifier reward joins every token's
    # advantage (MiMo-V2-Flash); 0: pure distillation, no verifier needed.
    "alpha": ("float", 0.0),
    # Held-out prompts: reverse KL to the teachers on the student's own samples, measured
    # before training, every eval_every steps and after.
    "heldout": ("list", []),
    "eval_every": ("?int", None),
}


def validate(path: str, stage: dict) -> None:
    check_training(path, stage)
    check_rl(path, stage)
    teachers = stage["teachers"]
    if not teachers:
        raise UserError(f"{path}.teachers is empty: map each prompt domain (a row's dataset) to a teacher")
    for key, value in teachers.items():
        if not isinstance(value, str) or not value:
            raise UserError(f"{path}.teachers.{key} must name a stage or a model path, got {value!r}")
    for key, w in stage["teacher_weights"].items():
        if key not in teachers:
            raise UserError(f"{path}.teacher_weights.{key}: no such teacher (teachers: {', '.join(teachers)})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise UserError(f"{path}.teacher_weights.{key}={w!r} must be a number >= 0")
    if stage["teacher_weights"] and stage["combine"] != "mixture":
        raise UserError(f"{path}.teacher_weights is used only with combine: mixture")
    if stage["combine"] == "mixture" and stage["teacher_weights"] and \
            sum(stage["teacher_weights"].get(k, 0.0) for k in teachers) <= 0:
        raise UserError(f"{path}.teacher_weights must give some teacher a weight > 0")
    positive(path, stage, ("adv_clip", "is_cap", "eval_every"))
    if stage["alpha"] < 0:
        raise UserError(f"{path}.alpha={stage['alpha']} must be >= 0 (0: no outcome advantage)")
    if stage["alpha"] > 0:
        if stage["num_generations"] < 2:
            raise UserError(f"{path}.num_generations={stage['num_generations']}: the outcome advantage "
                            f"(alpha > 0) is centred within each prompt's group, which needs at least 2")
        check_verifiers(path, stage)
    if stage["eval_every"] is not None and not stage["heldout"]:
        raise UserError(f"{path}.eval_every needs held-out prompts in {path}.heldout")


def uses_verifiers(cfg: dict) -> bool:
    """Only the outcome advantage (alpha > 0) scores with verifiers."""
    return cfg.get("alpha", 0) > 0


def check_rows(cfg: dict, rows: list, where: str) -> None:
    """Rows the verifiers score (alpha > 0) and, routed, rows each teacher scores."""
    if uses_verifiers(cfg):
        check_verifier_rows(cfg, rows, where)
    if cfg["combine"] == "route":
        from posttrain_cli.data.routing import check_routes  # torch-free

        check_routes(rows, cfg["teachers"], where)


def describe(cfg: dict) -> list[str]:
    teachers = ", ".join(f"{k} -> {v}" for k, v in cfg["teachers"].items())
    how = "routed by dataset" if cfg["combine"] == "route" else "mixture" + (
        f" (weights {cfg['teacher_weights']})" if cfg["teacher_weights"] else " (equal weights)")
    return [f"   teachers: {teachers} ({how})",
            f"   reverse KL: {'sampled-token advantage' if cfg['kl'] == 'token' else 'full vocabulary'}, "
            f"adv_clip {cfg['adv_clip']:g}, is_cap {cfg['is_cap']}"
            + (f", outcome advantage alpha {cfg['alpha']:g}" if cfg["alpha"] else "")
            + (f"; held-out reverse KL every {cfg['eval_every']} steps" if cfg["eval_every"] else "")]


def tiny(stage: dict, out: dict) -> None:
    """The teachers take the tiny domains in order (the first teacher `add`, the second `sub`)."""
    if isinstance(stage.get("teachers"), dict) and stage["teachers"]:
        names = list(stage["teachers"])
        pick = {d: names[min(i, len(names) - 1)] for i, d in enumerate(TINY_DOMAINS)}
        out["teachers"] = {d: stage["teachers"][n] for d, n in pick.items()}
        if stage.get("teacher_weights"):
            out["teacher_weights"] = {d: stage["teacher_weights"].get(n, 1.0) for d, n in pick.items()}


KIND = Kind(
    name="distill", schema=SCHEMA, module="posttrain_cli.stages.distill", produces="policy", rows="open_prompt",
    model_refs={"teachers": POLICY},
    trains=True, rl=True, validate=validate, batch=rl_batch, uses_verifiers=uses_verifiers,
    check_rows=check_rows, describe=describe,
    tiny_data=(TINY_PROMPTS, "sub_rl_train.jsonl"), tiny_heldout=(TINY_EVAL, "sub_eval.jsonl"),
    tiny_sizes={"max_steps": 2, **TINY_RL}, tiny_caps={"num_generations": (1, 2), "mini_batches": (1, 2)},
    tiny=tiny,
)
