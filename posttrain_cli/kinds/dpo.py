"""dpo: the DPO family of preference losses against a reference (stages/dpo.py)."""

from __future__ import annotations

from posttrain_cli.errors import UserError
from posttrain_cli.kinds.base import (COMMON, POLICY, PREFERENCE, TINY_PREF, TINY_PREF_EVAL, TINY_TRAIN, TRAINING,
                                      Kind, check_training)
from posttrain_cli.kinds.batch import preference_batch

# Names of the registered DPO-family losses (posttrain_cli.losses.preference);
# listed here so recipes are checked without importing torch (a test keeps them equal).
LOSSES = ("dpo", "dpo_norm", "ipo", "simpo", "hinge")

SCHEMA = {
    **COMMON,
    **TRAINING,
    **PREFERENCE,
    "loss": (LOSSES, "dpo"),
    "beta": ("float", 0.1),
    # Conservative DPO: probability that a preference label is flipped.
    "label_smoothing": ("float", 0.0),
    # Adds nll_weight x (mean token NLL of the chosen answer); Llama 3 uses 0.2.
    "nll_weight": ("float", 0.0),
    # SimPO's target margin gamma (loss: simpo).
    "simpo_gamma": ("float", 0.5),
    # The reference model: a stage or a path; null is the stage's input model.
    "ref_from": ("?str", None),
    # Reference log-probs computed once before training (one model in memory);
    # false keeps a live reference model next to the policy.
    "precompute_ref": ("bool", True),
}


def validate(path: str, stage: dict) -> None:
    check_training(path, stage)
    if stage["beta"] <= 0:
        raise UserError(f"{path}.beta={stage['beta']} must be > 0")
    if not 0 <= stage["label_smoothing"] < 0.5:
        raise UserError(f"{path}.label_smoothing={stage['label_smoothing']} must be in [0, 0.5)")
    if stage["nll_weight"] < 0:
        raise UserError(f"{path}.nll_weight={stage['nll_weight']} must be >= 0")


def describe(cfg: dict) -> list[str]:
    ref = "none (reference-free)" if cfg["loss"] == "simpo" else (
        cfg["ref_from"] or "the input model") + (", log-probs precomputed" if cfg["precompute_ref"] else ", live")
    return [f"   loss {cfg['loss']}, beta {cfg['beta']:g}, label_smoothing {cfg['label_smoothing']:g}, "
            f"nll_weight {cfg['nll_weight']:g}"
            + (f", simpo_gamma {cfg['simpo_gamma']:g}" if cfg["loss"] == "simpo" else "")
            + f"; reference: {ref}"]


KIND = Kind(
    name="dpo", schema=SCHEMA, module="posttrain_cli.stages.dpo", produces="policy", rows="preference",
    model_refs={"ref_from": POLICY},
    trains=True, validate=validate, batch=preference_batch, describe=describe,
    tiny_data=(TINY_PREF,), tiny_heldout=(TINY_PREF_EVAL,), tiny_sizes={"max_steps": 5, **TINY_TRAIN},
)
