"""merge: models merged weight by weight into one (stages/merge.py); the methods and what each
reads are declared in merge/spec.py."""

from __future__ import annotations

import re

from posttrain_cli.errors import UserError
from posttrain_cli.kinds.base import COMMON, POLICY, REQUIRED, Kind, model_names
from posttrain_cli.merge.spec import METHODS

SCHEMA = {
    **COMMON,
    # posttrain_cli/merge/methods.py: linear, slerp, task_arithmetic, ties, dare_linear, dare_ties.
    "method": (tuple(METHODS), "linear"),
    # Models to merge: stages or paths (slerp: exactly 2).
    "models": ("list", REQUIRED),
    # One weight per model (default equal: 1/N for linear, 1 for the task-vector methods).
    "weights": ("?list", None),
    # The common ancestor for task_arithmetic, ties and dare_*: its weights are subtracted
    # from each model's to get task vectors, and added back after merging them.
    "base": ("?str", None),
    # ties / dare: the fraction of each task vector kept (one number or one per model).
    "density": ("any", 0.5),
    # slerp: 0 is the first model, 1 the second.
    "t": ("float", 0.5),
    # ties / dare_ties: divide by the summed weights of the models agreeing in sign.
    "normalize": ("bool", True),
    # Output dtype; auto: the first model's.
    "dtype": (("auto", "float32", "bfloat16", "float16"), "auto"),
    # Output shard size in bytes (HF's "5GB" style strings accepted too).
    "max_shard_size": ("str", "2GB"),
}

_TASK = [m.name for m in METHODS.values() if m.task_vectors]


def validate(path: str, stage: dict) -> None:
    method, models = stage["method"], stage["models"]
    spec = METHODS[method]
    if stage["from"] is not None:
        raise UserError(f"{path}.from: a merge stage reads the models listed in '{path}.models', not 'from'")
    if stage["data"]:
        raise UserError(f"{path}.data: a merge stage reads no data")
    if stage["eval"] and stage["eval"]["before"]:
        raise UserError(f"{path}.eval.before: a merge stage has no single input model to evaluate before")
    model_names(f"{path}.models", models, "models")
    if not models:
        raise UserError(f"{path}.models is empty: name the models to merge")
    if len(set(models)) != len(models):
        raise UserError(f"{path}.models names a model twice: {models}")
    if spec.min_models == spec.max_models and len(models) != spec.max_models:
        raise UserError(f"{path}.models: {method} interpolates exactly {spec.max_models} models, got {len(models)}")
    if len(models) < spec.min_models:
        raise UserError(f"{path}.models: a {method} merge needs at least {spec.min_models} models")
    if spec.max_models is not None and len(models) > spec.max_models:
        raise UserError(f"{path}.models: a {method} merge takes at most {spec.max_models} models")
    if spec.task_vectors and stage["base"] is None:
        raise UserError(f"{path}.base is required for method {method}: the common ancestor whose weights "
                        f"are subtracted to get task vectors")
    if not spec.task_vectors and stage["base"] is not None:
        raise UserError(f"{path}.base is used only by {', '.join(_TASK[:-1])} and {_TASK[-1]}, not {method}")
    if stage["base"] is not None:
        model_names(f"{path}.base", [stage["base"]], "base")
        if stage["base"] in models:
            raise UserError(f"{path}.base '{stage['base']}' is also one of the models")
    weights = stage["weights"]
    if weights is not None and not spec.weights:
        raise UserError(f"{path}.weights: {method} interpolates with {', '.join(spec.params)}, not weights")
    if weights is not None:
        if len(weights) != len(models) or any(isinstance(w, bool) or not isinstance(w, (int, float))
                                               for w in weights):
            raise UserError(f"{path}.weights must be {len(models)} numbers, one per model, got {weights}")
        stage["weights"] = [float(w) for w in weights]
        # Task vectors may cancel (negative weights subtract a skill); an average may not.
        if not spec.task_vectors and sum(weights) <= 0:
            raise UserError(f"{path}.weights must sum to > 0")
    density = stage["density"]
    dens = density if isinstance(density, list) else [density]
    if (isinstance(density, list) and len(density) != len(models)) or any(
            isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1 for d in dens):
        raise UserError(f"{path}.density={density!r} must be a number in (0, 1] or one per model")
    if not 0 <= stage["t"] <= 1:
        raise UserError(f"{path}.t={stage['t']} must be in [0, 1]")
    parse_size(f"{path}.max_shard_size", stage["max_shard_size"])


def parse_size(path: str, value) -> int:
    """'2GB', '500MB', '1GiB' or a number of bytes -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in units or float(m.group(1)) <= 0:
        raise UserError(f"{path}={value!r} is not a size (e.g. 2GB, 500MB, 1GiB or a number of bytes)")
    return int(float(m.group(1)) * units[m.group(2).lower()])


def _param(cfg: dict, key: str) -> str:
    return f"{cfg[key]:g}" if SCHEMA[key][0] == "float" else f"{cfg[key]}"


def describe(cfg: dict) -> list[str]:
    models = ", ".join(cfg["models"])
    weights = ", ".join(f"{w:g}" for w in cfg["weights"]) if cfg["weights"] else "equal"
    extra = "".join(f", {key} {_param(cfg, key)}" for key in METHODS[cfg["method"]].params)
    return [f"   merge {cfg['method']} of {models} (weights {weights})"
            + (f", base {cfg['base']}" if cfg["base"] else "") + extra
            + f"; dtype {cfg['dtype']}, shards <= {cfg['max_shard_size']}"]


KIND = Kind(
    name="merge", schema=SCHEMA, module="posttrain_cli.stages.merge", produces="policy", rows=None,
    has_from=False, model_refs={"models": POLICY, "base": POLICY}, validate=validate, describe=describe,
)
