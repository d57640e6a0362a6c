"""The stage graph: who reads whose output, in which order, under which fingerprint.

A stage's model input is its `from` (default: the previous model-producing
stage, or `model.path` for the first); its data inputs are `data: [{from: X}]`.
References must point to earlier stages. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from posttrain_cli.config.schema import stage_deepspeed, stage_lora
from posttrain_cli.data.chat import template_text
from posttrain_cli.data.paths import is_local, resolve_source_path
from posttrain_cli.errors import UserError
from posttrain_cli.kinds import KINDS
from posttrain_cli.kinds.base import EVAL_MODEL_REFS, MODELS, POLICY, SCORER

TINY = "tiny"


@dataclass
class Node:
    name: str
    kind: str
    cfg: dict
    # ("stage", name) | ("path", str) | ("tiny", arch) | None (merge: its models are refs)
    model_input: tuple | None
    deps: list[str] = field(default_factory=list)
    # Other models the stage reads, by key ("ref_from", "eval.reward_model"): ("stage", name) | ("path", str)
    refs: dict[str, tuple] = field(default_factory=dict)

    @property
    def produces_model(self) -> bool:
        return KINDS[self.kind].produces in MODELS


def _looks_like_model(value: str) -> bool:
    if Path(value).expanduser().exists():
        return True
    parts = value.split("/")
    # A hub id is org/name; anything else is most likely a misspelt stage.
    return len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))


def _what(accepts: frozenset) -> str:
    if accepts <= SCORER:
        return "a reward model"
    if accepts <= POLICY:
        return "a policy (a causal LM)"
    return "a model"


def _model_ref(name: str, key: str, value: str, stages: dict, accepts: frozenset) -> tuple:
    """A stage name or a model path given under stages.<name>.<key>; `accepts`: what a stage it
    names may produce (kinds/base.py: PRODUCES)."""
    if value in stages:
        if KINDS[stages[value]["kind"]].produces not in accepts:
            raise UserError(f"stages.{name}.{key}: stage '{value}' is a {stages[value]['kind']} stage and "
                            f"produces no {_what(accepts).removeprefix('a ')}; '{key}' needs {_what(accepts)}")
        return ("stage", value)
    if not _looks_like_model(value):
        raise UserError(
            f"stages.{name}.{key}='{value}' names no stage (stages: {', '.join(stages)}) and is not a "
            f"local directory or a hub id (org/name)"
        )
    return ("path", value)


def model_refs(cfg: dict) -> dict[str, str]:
    """{key: value} of the model references a stage config sets (besides `from`). A list key gives
    one entry per item (`models[0]`), a mapping key one per entry (`teachers.math`)."""
    out = {}
    for k in KINDS[cfg["kind"]].model_refs:
        value = cfg.get(k)
        if isinstance(value, list):
            out.update({f"{k}[{i}]": v for i, v in enumerate(value)})
        elif isinstance(value, dict):
            out.update({f"{k}.{name}": v for name, v in value.items()})
        elif value is not None:
            out[k] = value
    if cfg.get("eval"):
        out.update({f"eval.{k}": cfg["eval"][k] for k in EVAL_MODEL_REFS if cfg["eval"].get(k) is not None})
    return out


def _ref_accepts(kind: str, key: str) -> frozenset:
    if key.startswith("eval."):
        return EVAL_MODEL_REFS[key[len("eval."):]]
    return KINDS[kind].model_refs[re.split(r"[.\[]", key, maxsplit=1)[0]]


def data_sources(cfg: dict) -> list[tuple[str, dict]]:
    """(key, source) of every data source a stage reads: data, heldout, eval.data."""
    out = [(f"data[{i}]", s) for i, s in enumerate(cfg["data"])]
    out += [(f"heldout[{i}]", s) for i, s in enumerate(cfg.get("heldout") or [])]
    if cfg.get("eval"):
        out += [(f"eval.data[{i}]", s) for i, s in enumerate(cfg["eval"]["data"])]
    return out


def build(run: dict) -> list[Node]:
    stages = run["stages"]
    names = list(stages)
    index = {n: i for i, n in enumerate(names)}
    edges = {n: _refs(n, s, stages) for n, s in stages.items()}
    _check_cycles(edges)
    nodes: list[Node] = []
    last_policy: str | None = None
    for name, cfg in stages.items():
        deps = []
        for ref, key in edges[name]:
            if index[ref] >= index[name]:
                raise UserError(
                    f"stages.{name}.{key}: '{ref}' comes at or after '{name}'; a stage can only read "
                    f"an earlier stage's output (order: {' -> '.join(names)})"
                )
            deps.append(ref)
        frm = cfg["from"]
        if not KINDS[cfg["kind"]].has_from:
            model_input = None
        elif frm is not None and frm == run["model"]["path"] == TINY and frm not in stages:
            # `from: ${model.path}`: the base model, named explicitly (a later stage starting over).
            model_input = ("tiny", run["model"]["tiny"] or {})
        elif frm is not None:
            model_input = _model_ref(name, "from", frm, stages, KINDS[cfg["kind"]].from_accepts)
        elif last_policy is not None:
            model_input = ("stage", last_policy)
            deps.append(last_policy)
        elif run["model"]["path"] == TINY:
            model_input = ("tiny", run["model"]["tiny"] or {})
        else:
            model_input = ("path", run["model"]["path"])
        refs = {key: _model_ref(name, key, value, stages, _ref_accepts(cfg["kind"], key))
                for key, value in model_refs(cfg).items()}
        for key, src in data_sources(cfg):
            ref = src["from"]
            if ref is not None and KINDS[stages[ref]["kind"]].produces != "dataset":
                raise UserError(
                    f"stages.{name}.{key}: stage '{ref}' is a {stages[ref]['kind']} stage and produces no dataset"
                )
        node = Node(name, cfg["kind"], cfg, model_input, sorted(set(deps), key=index.get), refs)
        nodes.append(node)
        if KINDS[node.kind].produces == "policy":
            last_policy = name
    return nodes


def _refs(name: str, cfg: dict, stages: dict) -> list[tuple[str, str]]:
    refs = []
    if cfg["from"] is not None and cfg["from"] in stages:
        refs.append((cfg["from"], "from"))
    for key, value in model_refs(cfg).items():
        if value in stages:
            refs.append((value, key))
    for key, src in data_sources(cfg):
        if src["from"] is not None:
            if src["from"] not in stages:
                raise UserError(
                    f"stages.{name}.{key}: from='{src['from']}' names no stage (stages: {', '.join(stages)})"
                )
            refs.append((src["from"], key))
    return refs


def _check_cycles(edges: dict) -> None:
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for ref, _ in edges[n]:
            if state.get(ref) == 1:
                cycle = path[path.index(ref):] + [ref] if ref in path else [n, ref]
                raise UserError(f"stages form a cycle: {' -> '.join(cycle)}")
            if ref not in state:
                visit(ref, path + [ref])
        state[n] = 2

    for n in edges:
        if n not in state:
            visit(n, [n])


# ---------------------------------------------------------------- fingerprints

def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_signature(path: str) -> str:
    """Content hash for files up to 256 MB; size and mtime beyond (and for directories)."""
    p = Path(path).expanduser()
    if p.is_file():
        st = p.stat()
        if st.st_size <= 256 << 20:
            return hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        return f"{st.st_size}:{st.st_mtime_ns}"
    if p.is_dir():
        return _hash(sorted((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns)
                            for f in p.rglob("*") if f.is_file()))
    return "missing"


def source_key(src: dict, fps: dict) -> dict:
    if src["from"] is not None:
        return {"from": fps[src["from"]]}
    key = {k: src[k] for k in ("path", "split", "name", "weight")}
    if is_local(src["path"]):
        key["content"] = _file_signature(resolve_source_path(src["path"]))
    return key


def model_key(ref: tuple, run: dict, fps: dict):
    what, value = ref
    if what == "stage":
        return {"stage": fps[value]}
    if what == "tiny":
        return {"tiny": value}
    local = Path(value).expanduser()
    m = run["model"]
    base = {k: m[k] for k in ("revision", "trust_remote_code", "dtype")}
    if local.exists():
        return {"path": str(local.resolve()), "content": _file_signature(str(local)), **base}
    return {"hub": value, **base}


def training_part(cfg: dict) -> dict:
    """What decides a stage's output: everything but where it runs, the eval block, and the keys that
    decide only whether and where it stops (a completed stage's weights do not depend on them). The
    lora block is there as the stage's effective LoRA settings (fingerprints, below)."""
    return {k: v for k, v in cfg.items() if k not in ("eval", "resources", "deepspeed", "rollout", "save_every",
                                                      "nonfinite_patience", "lora")}


def fingerprints(run: dict, nodes: list[Node]) -> dict[str, dict[str, str]]:
    """-> {stage: {"fingerprint": ..., "eval_fingerprint": ...}}"""
    fps: dict[str, str] = {}
    out = {}
    for node in nodes:
        ds = effective_deepspeed(run, node)
        train_cfg = {**training_part(node.cfg), "data": [source_key(s, fps) for s in node.cfg["data"]]}
        if "heldout" in node.cfg:
            train_cfg["heldout"] = [source_key(s, fps) for s in node.cfg["heldout"]]
        payload = {
            "kind": node.kind,
            "cfg": train_cfg,
            "model": model_key(node.model_input, run, fps) if node.model_input else None,
            "refs": {k: model_key(r, run, fps) for k, r in node.refs.items() if not k.startswith("eval.")},
            "seed": run["seed"],
            "precision": ds["precision"],
            "attn": run["model"]["attn_implementation"],
        }
        lora = stage_lora(run, node.cfg)
        if lora is not None:  # only when on: a stage without an adapter keeps its fingerprint
            payload["lora"] = lora
        if run["model"]["chat_template"] is not None:
            # The template's text, not its name or path: editing the .jinja re-runs what used it.
            payload["chat_template"] = _hash(template_text(run["model"]["chat_template"]))
        fps[node.name] = _hash(payload)
        # What a mid-stage checkpoint must agree on to be resumed (engine/checkpoint.py).
        resume = {"data": _hash({"data": train_cfg["data"]}), "inputs": _hash([payload["model"], payload["refs"]]),
                  "config": {**{k: v for k, v in training_part(node.cfg).items() if k != "data"},
                             **({"lora": lora} if lora is not None else {})}}
        ev = node.cfg.get("eval")
        eval_fp = None
        if ev:
            eval_fp = _hash({"stage": fps[node.name], **ev,
                             "data": [source_key(s, fps) for s in ev["data"]],
                             "refs": {k: model_key(r, run, fps) for k, r in node.refs.items()
                                      if k.startswith("eval.")}})
        out[node.name] = {"fingerprint": fps[node.name], "eval_fingerprint": eval_fp, "resume_key": resume}
    return out


def effective_deepspeed(run: dict, node: Node) -> dict:
    return stage_deepspeed(run, node.cfg)


def effective_rollout(run: dict, node: Node) -> dict:
    return {**run["rollout"], **{k: v for k, v in (node.cfg.get("rollout") or {}).items() if v is not None}}


def stage_dir(run: dict, name: str) -> Path:
    return Path(run["run_dir"]) / name


def local_source_files(node: Node) -> list[tuple[str, dict, str]]:
    """(where, source, row schema) for every local file source, for the pre-flight check."""
    out = []
    for key, src in data_sources(node.cfg):
        if src["path"] is not None and is_local(src["path"]):
            rows = "prompt" if key.startswith("eval.") else KINDS[node.kind].rows
            if rows is None:
                continue
            out.append((f"stages.{node.name}.{key}", src, rows))
    return out


