"""Rounds: a block of stages repeated `count` times, without copy-paste (Llama 3: 6 rounds of
reward_model -> rejection_sampling -> sft -> dpo).

    stages:
      sft: {kind: sft, ...}
      round:
        kind: rounds
        count: 6                        # one override: stages.round.count=2
        initial: {dpo: sft}             # what prev.dpo means in round 1
        stages:
          rm:  {kind: reward_model, from: sft, data: [...]}
          rs:  {kind: rejection_sampling, from: prev.dpo, reward_model: rm, data: [...]}
          sft: {kind: sft, from: sft, data: [{from: rs}]}
          dpo: {kind: dpo, from: sft, data: [...]}
      final: {kind: eval, from: round.dpo, ...}   # <block>.<name>: the last round's stage

Round r's stages are named r<r>.<name> (r1.rm ... r6.dpo) and run in that order. Inside the
block a bare name is this round's stage, `prev.<name>` the previous round's (in round 1: the
block's `initial` entry, else the reference is dropped), and any other name a stage outside
the block or a path. `{round}` in a data path becomes the round number. Expansion happens
before anything else sees the recipe, so the graph, fingerprints and launchers only ever see
ordinary stages.
"""

from __future__ import annotations

from posttrain_cli.config import schema
from posttrain_cli.errors import UserError
from posttrain_cli.kinds import KINDS
from posttrain_cli.kinds.base import EVAL_MODEL_REFS

PREV = "prev."
# Rounds a block may repeat. Published recipes run a handful (Llama 2: 5, Llama 3: 6); each round is
# a stage directory and a job per stage, and 100 rounds already take `plan` about 10 s to lay out.
MAX_ROUNDS = 100


def is_block(stage) -> bool:
    return isinstance(stage, dict) and stage.get("kind") == "rounds"


def expand(stages: dict, check_stage, check_table) -> tuple[dict, dict]:
    """-> (stages with every rounds block replaced by its checked, renamed copies, in place and
    order; the blocks by name). `check_stage(name, given, path)` validates one stage; `check_table`
    a keyed table. Once every stage is checked, `resolve_last(stages, blocks)` rewrites
    `<block>.<name>` references outside the blocks."""
    blocks = {}
    out: dict = {}
    for name, given in stages.items():
        if not is_block(given):
            out[name] = given
            continue
        path = f"stages.{name}"
        block = check_table(path, given, schema.ROUNDS)
        if block["count"] < 1:
            raise UserError(f"{path}.count={block['count']} must be >= 1")
        if block["count"] > MAX_ROUNDS:
            raise UserError(f"{path}.count={block['count']} is more rounds than a run can lay out (at most "
                            f"{MAX_ROUNDS}; published recipes run 5 or 6)")
        inner = block["stages"]
        if not inner:
            raise UserError(f"{path}.stages is empty: a rounds block repeats at least one stage")
        for key, value in block["initial"].items():
            if key not in inner:
                raise UserError(f"{path}.initial.{key}: no stage '{key}' in the block (stages: {', '.join(inner)})")
            if not isinstance(value, str):
                raise UserError(f"{path}.initial.{key} must name a stage or a path")
        checked = {}
        for sub in inner:
            if sub in stages:
                raise UserError(f"{path}.stages.{sub}: a stage outside the block is also named '{sub}'; rename "
                                f"one (inside a block a bare name means this round's stage)")
            if "." in str(sub) or "/" in str(sub):
                raise UserError(f"{path}.stages.{sub}: a stage name may not contain '.' or '/'")
        for sub, cfg in inner.items():
            if is_block(cfg):
                raise UserError(f"{path}.stages.{sub}: rounds blocks do not nest")
            checked[sub] = check_stage(str(sub), cfg, f"{path}.stages.{sub}")
        for r in range(1, block["count"] + 1):
            for sub, cfg in checked.items():
                new = f"{block['prefix']}{r}.{sub}"
                if new in stages or new in out:
                    raise UserError(f"{path}: round stage name '{new}' clashes with another stage")
                out[new] = _rename(cfg, r, block, set(checked), f"{path}.stages.{sub}")
        blocks[name] = block
    return out, blocks


def resolve_last(stages: dict, blocks: dict) -> None:
    """`<block>.<name>` in a checked stage -> the last round's stage name, in place."""
    if blocks:
        for name, cfg in stages.items():
            _rewrite(cfg, lambda v, key, _n=name: _last_round(v, blocks, f"stages.{_n}.{key}"))


def _last_round(value, blocks: dict, where: str):
    """`<block>.<name>` outside a block -> the last round's stage."""
    if not isinstance(value, str) or "." not in value:
        return value
    head, sub = value.split(".", 1)
    block = blocks.get(head)
    if block is None:
        return value
    if sub not in block["stages"]:
        raise UserError(f"{where}='{value}': block '{head}' has no stage '{sub}' "
                        f"(stages: {', '.join(block['stages'])})")
    return f"{block['prefix']}{block['count']}.{sub}"


def _rename(cfg: dict, r: int, block: dict, names: set, where: str) -> dict:
    import copy

    cfg = copy.deepcopy(cfg)
    prefix = block["prefix"]

    def resolve(value, key):
        if not isinstance(value, str):
            return value
        if value in names:
            return f"{prefix}{r}.{value}"
        if value.startswith(PREV):
            sub = value[len(PREV):]
            if sub not in names:
                raise UserError(f"{where}.{key}='{value}': no stage '{sub}' in the block "
                                f"(stages: {', '.join(sorted(names))})")
            if r > 1:
                return f"{prefix}{r - 1}.{sub}"
            return block["initial"].get(sub)  # None drops the reference
        return value

    _rewrite(cfg, resolve)
    for src in _sources(cfg):
        if src.get("path"):
            src["path"] = src["path"].replace("{round}", str(r))
    return cfg


def _sources(cfg: dict) -> list[dict]:
    out = list(cfg.get("data") or []) + list(cfg.get("heldout") or [])
    if cfg.get("eval"):
        out += cfg["eval"].get("data") or []
    return out


def _rewrite(cfg: dict, fn) -> None:
    """Apply fn(value, key) to every stage reference of a checked stage config, in place;
    a data source whose `from` becomes None is dropped."""
    if cfg.get("from") is not None:
        cfg["from"] = fn(cfg["from"], "from")
    for key in KINDS[cfg["kind"]].model_refs:
        value = cfg.get(key)
        if isinstance(value, list):
            cfg[key] = [v for v in (fn(x, f"{key}[{i}]") for i, x in enumerate(value)) if v is not None]
        elif isinstance(value, dict):
            cfg[key] = {k: v for k, v in ((k, fn(x, f"{key}.{k}")) for k, x in value.items()) if v is not None}
        elif value is not None:
            cfg[key] = fn(value, key)
    ev = cfg.get("eval")
    for key in EVAL_MODEL_REFS:
        if ev and ev.get(key) is not None:
            ev[key] = fn(ev[key], f"eval.{key}")
    for holder, key in ((cfg, "data"), (cfg, "heldout"), (ev or {}, "data")):
        if holder.get(key):
            kept = []
            for i, src in enumerate(holder[key]):
                if src.get("from") is not None:
                    src = {**src, "from": fn(src["from"], f"{key}[{i}].from")}
                    if src["from"] is None:
                        continue
                kept.append(src)
            holder[key] = kept
