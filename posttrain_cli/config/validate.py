"""Fill defaults, check types and names, and do the batch arithmetic.

Every failure is a UserError whose one line names the key (`stages.sft.lr`)
and says what would be accepted.
"""

from __future__ import annotations

import difflib
from typing import Any

from posttrain_cli.config import schema
from posttrain_cli.errors import UserError


def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"


def _coerce(path: str, value: Any, typ) -> Any:
    if isinstance(typ, tuple):
        if value in typ:
            return value
        choices = ", ".join(str(c) for c in typ)
        raise UserError(f"{path}={value!r} is not one of: {choices}")
    optional = typ.startswith("?")
    base = typ.lstrip("?")
    if value is None:
        if optional:
            return None
        raise UserError(f"{path} must be set (a {base})")
    if base == "any":
        return value
    if base == "str":
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "list":
        if isinstance(value, (list, tuple)):
            return list(value)
    elif base == "dict":
        if isinstance(value, dict):
            return dict(value)
    elif base == "eval":
        return check_table(path, value, schema.EVAL)
    elif base == "resources":
        return check_table(path, value, schema.RESOURCES)
    else:  # pragma: no cover - a schema typo, not user input
        raise AssertionError(f"unknown schema type {typ}")
    raise UserError(f"{path}={value!r} is not a {base}")


def check_table(path: str, given: Any, spec: dict) -> dict:
    if not isinstance(given, dict):
        raise UserError(f"{path} must be a mapping of keys, got {given!r}")
    out = {}
    for key in given:
        if key not in spec:
            raise UserError(f"unknown key '{path}.{key}'{_suggest(key, spec)}")
    for key, (typ, default) in spec.items():
        if key in given:
            out[key] = _coerce(f"{path}.{key}", given[key], typ)
        elif default is schema.REQUIRED:
            raise UserError(f"{path}.{key} is required")
        else:
            out[key] = default.copy() if isinstance(default, (list, dict)) else default
    return out


def check_sources(path: str, sources: list) -> list:
    out = []
    for i, src in enumerate(sources):
        if isinstance(src, str):
            src = {"path": src}
        src = check_table(f"{path}[{i}]", src, schema.SOURCE)
        if (src["path"] is None) == (src["from"] is None):
            raise UserError(f"{path}[{i}] needs exactly one of 'path' or 'from'")
        if src["weight"] <= 0:
            raise UserError(f"{path}[{i}].weight={src['weight']} must be > 0")
        out.append(src)
    return out


def check_stage(name: str, given: Any, path: str | None = None) -> dict:
    path = path or f"stages.{name}"
    if not isinstance(given, dict):
        raise UserError(f"{path} must be a mapping with at least 'kind', got {given!r}")
    kind = given.get("kind")
    known = sorted([*schema.KINDS, "rounds"])
    if kind is None:
        raise UserError(f"{path}.kind is required (one of: {', '.join(known)})")
    if kind not in schema.KINDS:
        close = difflib.get_close_matches(str(kind), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{path}.kind: unknown stage kind '{kind}' (known: {', '.join(known)}){hint}")
    stage = check_table(path, given, schema.KINDS[kind])
    stage["data"] = check_sources(f"{path}.data", stage["data"])
    if stage.get("eval"):
        stage["eval"]["data"] = check_sources(f"{path}.eval.data", stage["eval"]["data"])
        if not stage["eval"]["data"]:
            raise UserError(f"{path}.eval.data is empty: name at least one source of prompts")
    if kind in ("eval", "generate", "rejection_sampling") and not stage["data"]:
        raise UserError(f"{path}.data is empty: a {kind} stage needs prompts")
    if kind in schema.DATASET_PRODUCING and stage.get("eval"):
        raise UserError(f"{path}.eval: a {kind} stage produces a dataset, not a model to evaluate; add an eval "
                        f"block to the stage that trains on it")
    for where, block in ((path, stage), (f"{path}.eval", stage.get("eval"))):
        if block and block.get("verifier") is not None:
            _check_verifier(f"{where}.verifier", block["verifier"])
    if kind in schema.SCORER_PRODUCING and stage.get("eval"):
        raise UserError(f"{path}.eval: a {kind} stage generates nothing to verify; its held-out pairwise "
                        f"accuracy comes from '{path}.heldout'")
    if "heldout" in stage:
        stage["heldout"] = check_sources(f"{path}.heldout", stage["heldout"])
    if kind in schema.TRAINING_KINDS:
        _check_training(path, stage)
    if kind in schema.RL_KINDS:
        _check_rl(path, stage)
    if kind in schema.DATASET_PRODUCING:
        _check_generation(path, stage)
    if kind == "merge":
        _check_merge(path, stage)
    if kind == "distill":
        _check_distill(path, stage)
    if kind == "dpo":
        if stage["beta"] <= 0:
            raise UserError(f"{path}.beta={stage['beta']} must be > 0")
        if not 0 <= stage["label_smoothing"] < 0.5:
            raise UserError(f"{path}.label_smoothing={stage['label_smoothing']} must be in [0, 0.5)")
        if stage["nll_weight"] < 0:
            raise UserError(f"{path}.nll_weight={stage['nll_weight']} must be >= 0")
    if stage["deepspeed"] is not None:
        stage["deepspeed"] = check_table(
            f"{path}.deepspeed", stage["deepspeed"], _partial(schema.SECTIONS["deepspeed"])
        )
    return stage


def _check_verifier(path: str, name: str) -> None:
    from posttrain_cli.rewards import VERIFIERS  # pure Python, no torch

    if name not in VERIFIERS:
        close = difflib.get_close_matches(name, list(VERIFIERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{path}='{name}' is not a verifier (known: {', '.join(sorted(VERIFIERS))}){hint}")


def _partial(spec: dict) -> dict:
    return {k: ("?any" if not isinstance(t, tuple) else t + (None,), None) for k, (t, _) in spec.items()}


def _check_training(path: str, stage: dict) -> None:
    if not stage["data"]:
        raise UserError(f"{path}.data is empty: a {stage['kind']} stage needs at least one source")
    for key in ("lr", "global_batch_size", "micro_batch_size", "max_seq_len"):
        if key in stage and stage[key] <= 0:
            raise UserError(f"{path}.{key}={stage[key]} must be > 0")
    if stage["max_steps"] is None and (stage["epochs"] is None or stage["epochs"] <= 0):
        raise UserError(f"{path}: set epochs > 0 or max_steps")
    if stage["max_steps"] is not None and stage["max_steps"] <= 0:
        raise UserError(f"{path}.max_steps={stage['max_steps']} must be > 0")
    if not 0 <= stage["warmup_ratio"] < 1:
        raise UserError(f"{path}.warmup_ratio={stage['warmup_ratio']} must be in [0, 1)")


def _check_rl(path: str, stage: dict) -> None:
    from posttrain_cli.rewards import dispatch  # pure Python, no torch

    for key in ("prompts_per_step", "num_generations", "mini_batches", "max_new_tokens", "rollout_batch_size"):
        if stage[key] <= 0:
            raise UserError(f"{path}.{key}={stage[key]} must be > 0")
    if stage["temperature"] < 0 or not 0 < stage["top_p"] <= 1:
        raise UserError(f"{path}: temperature must be >= 0 and top_p in (0, 1]")
    if stage.get("beta", 0) < 0:
        raise UserError(f"{path}.beta={stage['beta']} must be >= 0 (0 loads no reference)")
    if stage["kind"] == "grpo":
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
    if stage["kind"] == "distill":
        return  # _check_distill
    if stage["kind"] == "ppo":
        if stage["ppo_epochs"] <= 0:
            raise UserError(f"{path}.ppo_epochs={stage['ppo_epochs']} must be > 0")
        if not (0 <= stage["gamma"] <= 1 and 0 <= stage["lam"] <= 1):
            raise UserError(f"{path}: gamma and lam must be in [0, 1]")
        verifiers = dispatch.uses_verifiers(stage)
        if stage["reward_model"] is None and not verifiers:
            raise UserError(f"{path}: a ppo stage needs a reward: set reward_model (a reward_model stage) "
                            f"and/or verifier / verifiers")
        if not verifiers:
            return  # rewards from the RM alone: no verifier config to check
    dispatch.check_config(stage, path)


def _positive(path: str, stage: dict, keys) -> None:
    for key in keys:
        if stage[key] is not None and stage[key] <= 0:
            raise UserError(f"{path}.{key}={stage[key]} must be > 0")


def _model_names(path: str, value, what: str) -> None:
    bad = next((v for v in value if not isinstance(v, str) or not v), None) if value else None
    if bad is not None:
        raise UserError(f"{path}: {what} must be stage names or model paths, got {bad!r}")


def _check_generation(path: str, stage: dict) -> None:
    from posttrain_cli.rewards import dispatch  # pure Python, no torch

    _positive(path, stage, ("max_new_tokens", "batch_size", "max_seq_len", "limit"))
    if stage["temperature"] < 0 or not 0 < stage["top_p"] <= 1:
        raise UserError(f"{path}: temperature must be >= 0 and top_p in (0, 1]")
    if stage["kind"] == "generate":
        _positive(path, stage, ("num_generations",))
        return
    _positive(path, stage, ("num_samples", "max_per_prompt"))
    # Without a reward model the verifiers score (uses_verifiers); a row no verifier grades is an
    # error naming the row, at pre-flight.
    verifiers = dispatch.uses_verifiers(stage)
    if stage["num_samples"] < 2 and stage["keep"] == "best":
        raise UserError(f"{path}.num_samples={stage['num_samples']}: best-of-K needs K >= 2")
    if stage["keep"] == "all_pass" and stage["threshold"] is None and stage["reward_model"] is not None:
        raise UserError(f"{path}.threshold is required with keep: all_pass and a reward model (the score "
                        f"a completion must reach)")
    if verifiers:
        dispatch.check_config(stage, path)


def _check_merge(path: str, stage: dict) -> None:
    method, models = stage["method"], stage["models"]
    if stage["from"] is not None:
        raise UserError(f"{path}.from: a merge stage reads the models listed in '{path}.models', not 'from'")
    if stage["data"]:
        raise UserError(f"{path}.data: a merge stage reads no data")
    if stage["eval"] and stage["eval"]["before"]:
        raise UserError(f"{path}.eval.before: a merge stage has no single input model to evaluate before")
    _model_names(f"{path}.models", models, "models")
    if not models:
        raise UserError(f"{path}.models is empty: name the models to merge")
    if len(set(models)) != len(models):
        raise UserError(f"{path}.models names a model twice: {models}")
    task = method in ("task_arithmetic", "ties", "dare_linear", "dare_ties")
    if method == "slerp" and len(models) != 2:
        raise UserError(f"{path}.models: slerp interpolates exactly 2 models, got {len(models)}")
    if method == "linear" and len(models) < 2:
        raise UserError(f"{path}.models: a linear merge needs at least 2 models")
    if task and stage["base"] is None:
        raise UserError(f"{path}.base is required for method {method}: the common ancestor whose weights "
                        f"are subtracted to get task vectors")
    if not task and stage["base"] is not None:
        raise UserError(f"{path}.base is used only by task_arithmetic, ties, dare_linear and dare_ties, "
                        f"not {method}")
    if stage["base"] is not None:
        _model_names(f"{path}.base", [stage["base"]], "base")
        if stage["base"] in models:
            raise UserError(f"{path}.base '{stage['base']}' is also one of the models")
    weights = stage["weights"]
    if weights is not None and method == "slerp":
        raise UserError(f"{path}.weights: slerp interpolates with t, not weights")
    if weights is not None:
        if len(weights) != len(models) or any(isinstance(w, bool) or not isinstance(w, (int, float))
                                               for w in weights):
            raise UserError(f"{path}.weights must be {len(models)} numbers, one per model, got {weights}")
        stage["weights"] = [float(w) for w in weights]
        if method in ("linear", "slerp") and sum(weights) <= 0:
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
    import re

    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in units or float(m.group(1)) <= 0:
        raise UserError(f"{path}={value!r} is not a size (e.g. 2GB, 500MB, 1GiB or a number of bytes)")
    return int(float(m.group(1)) * units[m.group(2).lower()])


def _check_distill(path: str, stage: dict) -> None:
    from posttrain_cli.rewards import dispatch  # pure Python, no torch

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
    _positive(path, stage, ("adv_clip", "is_cap", "eval_every"))
    if stage["alpha"] < 0:
        raise UserError(f"{path}.alpha={stage['alpha']} must be >= 0 (0: no outcome advantage)")
    if stage["alpha"] > 0:
        if stage["num_generations"] < 2:
            raise UserError(f"{path}.num_generations={stage['num_generations']}: the outcome advantage "
                            f"(alpha > 0) is centred within each prompt's group, which needs at least 2")
        dispatch.check_config(stage, path)
    if stage["eval_every"] is not None and not stage["heldout"]:
        raise UserError(f"{path}.eval_every needs held-out prompts in {path}.heldout")


def batch_arithmetic(path: str, stage: dict, world_size: int) -> dict:
    """global = micro x ranks x accumulation, or a UserError showing the numbers."""
    if stage.get("kind") in schema.RL_KINDS:
        return _rl_arithmetic(path, stage, world_size)
    g, m = stage["global_batch_size"], stage["micro_batch_size"]
    per_pass = m * world_size
    if g % per_pass:
        lower = max(per_pass, g - g % per_pass)
        raise UserError(
            f"{path}.global_batch_size={g} does not divide into micro_batch_size {m} x {world_size} "
            f"rank(s) = {per_pass} sequences per pass ({g} / {per_pass} = {g / per_pass:.3g}); "
            f"use a multiple of {per_pass}, e.g. {lower} or {lower + per_pass}"
        )
    return {
        "global_batch_size": g,
        "micro_batch_size": m,
        "world_size": world_size,
        "grad_accum": g // per_pass,
        # A preference example holds two (or more) answers, each up to max_seq_len.
        "max_tokens_per_step": g * stage["max_seq_len"] * (2 if schema.DATA_ROWS.get(stage.get("kind")) == "preference"
                                                            else 1),
    }


def _rl_arithmetic(path: str, stage: dict, world_size: int) -> dict:
    """RL batches: prompts_per_step x num_generations sequences per rollout, split into
    mini_batches updates, each split over ranks and micro-batches."""
    p, g, k, m = (stage["prompts_per_step"], stage["num_generations"], stage["mini_batches"],
                  stage["micro_batch_size"])
    if p % world_size:
        raise UserError(f"{path}.prompts_per_step={p} does not divide over {world_size} rank(s); "
                        f"use a multiple of {world_size}")
    seqs = p * g
    if seqs % k:
        raise UserError(f"{path}: prompts_per_step {p} x num_generations {g} = {seqs} sequences do not split "
                        f"into mini_batches={k}")
    per_update = seqs // k
    per_pass = m * world_size
    if per_update % per_pass:
        raise UserError(f"{path}: {seqs} sequences / mini_batches {k} = {per_update} per update do not divide into "
                        f"micro_batch_size {m} x {world_size} rank(s) = {per_pass} per pass; pick micro_batch_size "
                        f"dividing {per_update // world_size if per_update % world_size == 0 else per_update}")
    return {"global_batch_size": per_update, "micro_batch_size": m, "world_size": world_size,
            "grad_accum": per_update // per_pass, "prompts_per_rank": p // world_size,
            "max_tokens_per_step": per_update * stage["max_seq_len"]}


def check_run(cfg: dict) -> dict:
    """Validate a composed recipe (plain dict) and fill every default."""
    for key in cfg:
        if key not in schema.TOP:
            raise UserError(f"unknown key '{key}'{_suggest(key, schema.TOP)}")
    out = {}
    for key, (typ, default) in schema.TOP.items():
        if typ == "section":
            out[key] = check_table(key, cfg.get(key) or {}, schema.SECTIONS[key])
        elif typ == "stages":
            stages = cfg.get("stages")
            if not stages:
                raise UserError("the recipe has no stages: add at least one under 'stages:'")
            if not isinstance(stages, dict):
                raise UserError("'stages' must be a mapping of stage name to stage")
            for n in stages:
                if "." in str(n) or "/" in str(n):
                    raise UserError(f"stages.{n}: a stage name may not contain '.' or '/' (dotted names "
                                    f"are those of rounds: r1.dpo)")
            from posttrain_cli.config import rounds

            stages, blocks = rounds.expand({str(n): s for n, s in stages.items()}, check_stage, check_table)
            out[key] = {n: check_stage(n, s) for n, s in stages.items()}
            rounds.resolve_last(out[key], blocks)
        elif key in cfg:
            out[key] = _coerce(key, cfg[key], typ)
        elif default is schema.REQUIRED:
            raise UserError(f"'{key}' is required at the top of the recipe")
        else:
            out[key] = default
    c = out["cluster"]
    if c["launcher"] == "local" and c["nproc_per_node"] is None:
        raise UserError("cluster.nproc_per_node=null: cluster=local needs a rank count (1, or the GPUs to use)")
    for key in ("nproc_per_node", "nnodes", "parallel_stages", "nodes"):
        if c[key] is not None and c[key] < 1:
            raise UserError(f"cluster.{key}={c[key]} must be >= 1")
    if c["gpus_per_node"] < 0 or c["signal_seconds"] < 0:
        key = "gpus_per_node" if c["gpus_per_node"] < 0 else "signal_seconds"
        raise UserError(f"cluster.{key}={c[key]} must be >= 0")
    if out["model"]["tiny"] is not None and out["model"]["path"] != "tiny":
        out["model"]["tiny"] = None
    return out


def job_resources(cluster: dict, stage: dict | None = None) -> dict:
    """cluster.* with a stage's `resources` laid over it (the keys it sets)."""
    res = (stage or {}).get("resources") or {}
    return {**cluster, **{k: v for k, v in res.items() if v is not None}}


def ranks_per_node(res: dict) -> int:
    """nproc_per_node, or (slurm, null) one rank per GPU, 1 without GPUs."""
    return res["nproc_per_node"] if res["nproc_per_node"] is not None else max(1, res["gpus_per_node"])


def world_size(cfg: dict, stage: dict | None = None) -> int:
    """Ranks of a stage: local runs nproc_per_node x nnodes (1); slurm nodes x ranks per node of the
    stage's job (its `resources` win over cluster.*)."""
    c = cfg["cluster"]
    if c["launcher"] == "slurm":
        res = job_resources(c, stage)
        return res["nodes"] * ranks_per_node(res)
    return c["nproc_per_node"] * c["nnodes"]
