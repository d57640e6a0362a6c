"""Validate a composed recipe: fill defaults, check types and names, then each stage's own rules.

Every failure is a UserError whose one line names the key (`stages.sft.lr`) and says what
would be accepted. The tables are checked by config/tables.py, each stage kind's rules are its
record's (posttrain_cli/kinds/), and what is checked here holds for every kind alike.
"""

from __future__ import annotations

import difflib
from typing import Any

from posttrain_cli.config import schema
from posttrain_cli.config.tables import _coerce, _suggest, check_sources, check_table, partial
from posttrain_cli.errors import UserError
from posttrain_cli.kinds import KINDS
from posttrain_cli.kinds.base import REQUIRED


def check_stage(name: str, given: Any, path: str | None = None) -> dict:
    path = path or f"stages.{name}"
    if not isinstance(given, dict):
        raise UserError(f"{path} must be a mapping with at least 'kind', got {given!r}")
    kind = given.get("kind")
    known = sorted([*KINDS, "rounds"])
    if kind is None:
        raise UserError(f"{path}.kind is required (one of: {', '.join(known)})")
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{path}.kind: unknown stage kind '{kind}' (known: {', '.join(known)}){hint}")
    record = KINDS[kind]
    stage = check_table(path, given, record.schema)
    stage["data"] = check_sources(f"{path}.data", stage["data"])
    if stage.get("eval"):
        stage["eval"]["data"] = check_sources(f"{path}.eval.data", stage["eval"]["data"])
        if not stage["eval"]["data"]:
            raise UserError(f"{path}.eval.data is empty: name at least one source of prompts")
    if not record.trains and record.rows is not None and not stage["data"]:
        raise UserError(f"{path}.data is empty: a {kind} stage needs prompts")
    if record.produces == "dataset" and stage.get("eval"):
        raise UserError(f"{path}.eval: a {kind} stage produces a dataset, not a model to evaluate; add an eval "
                        f"block to the stage that trains on it")
    for where, block in ((path, stage), (f"{path}.eval", stage.get("eval"))):
        if block and block.get("verifier") is not None:
            _check_verifier(f"{where}.verifier", block["verifier"])
    if record.produces == "scorer" and stage.get("eval"):
        raise UserError(f"{path}.eval: a {kind} stage generates nothing to verify; its held-out pairwise "
                        f"accuracy comes from '{path}.heldout'")
    if "heldout" in stage:
        stage["heldout"] = check_sources(f"{path}.heldout", stage["heldout"])
    record.validate(path, stage)
    if stage["deepspeed"] is not None:
        stage["deepspeed"] = check_table(f"{path}.deepspeed", stage["deepspeed"], partial(schema.SECTIONS["deepspeed"]))
    return stage


def _check_verifier(path: str, name: str) -> None:
    from posttrain_cli.rewards import VERIFIERS  # pure Python, no torch

    if name not in VERIFIERS:
        close = difflib.get_close_matches(name, list(VERIFIERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"{path}='{name}' is not a verifier (known: {', '.join(sorted(VERIFIERS))}){hint}")


def _check_has_template(path: str, stages: dict) -> None:
    """A local base model without a chat template stops here (a hub model is checked when its
    tokenizer loads); a recipe whose stages read no rows (merges only) renders no chat."""
    import json
    from pathlib import Path

    from posttrain_cli.data.chat import TEMPLATE_NAMES

    local = Path(path).expanduser()
    if not (local / "config.json").is_file() or all(KINDS[s["kind"]].rows is None for s in stages.values()):
        return
    if (local / "chat_template.jinja").is_file() or (local / "chat_template.json").is_file():
        return
    try:
        if json.loads((local / "tokenizer_config.json").read_text()).get("chat_template"):
            return
    except (OSError, ValueError):
        return  # no readable tokenizer config: the tokenizer's own load will say what is wrong
    raise UserError(f"model.chat_template: {path} has no chat template (a base model?); set model.chat_template "
                    f"to one of {', '.join(TEMPLATE_NAMES)}, a .jinja file or a template string")


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
        elif default is REQUIRED:
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
    template = out["model"]["chat_template"]
    if template is None:
        _check_has_template(out["model"]["path"], out["stages"])
    else:
        from pathlib import Path

        from posttrain_cli.data.chat import template_text

        template_text(template)  # a bad name or a missing file stops here, naming the key
        if not ("{{" in template or "{%" in template) and Path(template).expanduser().is_file():
            # A file: the stage workers (SLURM jobs too) may start elsewhere.
            out["model"]["chat_template"] = str(Path(template).expanduser().resolve())
    return out
