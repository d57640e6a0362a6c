"""The stage graph: who reads whose output, in which order, under which fingerprint.

A stage's model input is its `from` (default: the previous model-producing
stage, or `model.path` for the first); its data inputs are `data: [{from: X}]`.
References must point to earlier stages. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from posttrain_cli.config import schema
from posttrain_cli.errors import UserError

TINY = "tiny"


@dataclass
class Node:
    name: str
    kind: str
    cfg: dict
    # ("stage", name) | ("path", str) | ("tiny", arch) | None
    model_input: tuple | None
    deps: list[str] = field(default_factory=list)

    @property
    def produces_model(self) -> bool:
        return self.kind in schema.MODEL_PRODUCING


def _looks_like_model(value: str) -> bool:
    if Path(value).expanduser().exists():
        return True
    parts = value.split("/")
    # A hub id is org/name; anything else is most likely a misspelt stage.
    return len(parts) == 2 and all(parts) and not value.startswith((".", "/", "~"))


def build(run: dict) -> list[Node]:
    stages = run["stages"]
    names = list(stages)
    index = {n: i for i, n in enumerate(names)}
    edges = {n: _refs(n, s, stages) for n, s in stages.items()}
    _check_cycles(edges)
    nodes: list[Node] = []
    last_model: str | None = None
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
        if frm is not None and frm in stages:
            if stages[frm]["kind"] not in schema.MODEL_PRODUCING:
                raise UserError(
                    f"stages.{name}.from: stage '{frm}' is a {stages[frm]['kind']} stage and produces no model"
                )
            model_input = ("stage", frm)
        elif frm is not None:
            if not _looks_like_model(frm):
                raise UserError(
                    f"stages.{name}.from='{frm}' names no stage (stages: {', '.join(names)}) and is not a "
                    f"local directory or a hub id (org/name)"
                )
            model_input = ("path", frm)
        elif last_model is not None:
            model_input = ("stage", last_model)
            deps.append(last_model)
        elif run["model"]["path"] == TINY:
            model_input = ("tiny", run["model"]["tiny"] or {})
        else:
            model_input = ("path", run["model"]["path"])
        for src in cfg["data"] + (cfg["eval"]["data"] if cfg.get("eval") else []):
            ref = src["from"]
            if ref is not None and stages[ref]["kind"] not in schema.DATASET_PRODUCING:
                raise UserError(
                    f"stages.{name}.data: stage '{ref}' is a {stages[ref]['kind']} stage and produces no dataset"
                )
        node = Node(name, cfg["kind"], cfg, model_input, sorted(set(deps), key=index.get))
        nodes.append(node)
        if node.produces_model:
            last_model = name
    return nodes


def _refs(name: str, cfg: dict, stages: dict) -> list[tuple[str, str]]:
    refs = []
    if cfg["from"] is not None and cfg["from"] in stages:
        refs.append((cfg["from"], "from"))
    for src in cfg["data"] + (cfg["eval"]["data"] if cfg.get("eval") else []):
        if src["from"] is not None:
            if src["from"] not in stages:
                raise UserError(
                    f"stages.{name}.data: from='{src['from']}' names no stage (stages: {', '.join(stages)})"
                )
            refs.append((src["from"], "data"))
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


def resolve_source_path(path: str) -> str:
    """pkg://posttrain_cli/data/tiny/x.jsonl -> the file inside the installed package."""
    if path.startswith("pkg://"):
        rel = path[len("pkg://"):]
        root = Path(__file__).resolve().parent.parent.parent
        return str(root / rel)
    return path


def is_local(path: str) -> bool:
    p = resolve_source_path(path)
    return path.startswith(("pkg://", "/", "./", "../", "~")) or Path(p).expanduser().exists() or \
        p.endswith((".jsonl", ".json", ".parquet"))


def source_key(src: dict, fps: dict) -> dict:
    if src["from"] is not None:
        return {"from": fps[src["from"]]}
    key = {k: src[k] for k in ("path", "split", "name", "weight")}
    if is_local(src["path"]):
        key["content"] = _file_signature(resolve_source_path(src["path"]))
    return key


def model_key(node: Node, run: dict, fps: dict):
    kind, value = node.model_input
    if kind == "stage":
        return {"stage": fps[value]}
    if kind == "tiny":
        return {"tiny": value}
    local = Path(value).expanduser()
    m = run["model"]
    base = {k: m[k] for k in ("revision", "trust_remote_code", "dtype")}
    if local.exists():
        return {"path": str(local.resolve()), "content": _file_signature(str(local)), **base}
    return {"hub": value, **base}


def training_part(cfg: dict) -> dict:
    """What decides a stage's output: everything but where it runs and the eval block."""
    return {k: v for k, v in cfg.items() if k not in ("eval", "resources", "deepspeed")}


def fingerprints(run: dict, nodes: list[Node]) -> dict[str, dict[str, str]]:
    """-> {stage: {"fingerprint": ..., "eval_fingerprint": ...}}"""
    fps: dict[str, str] = {}
    out = {}
    for node in nodes:
        ds = effective_deepspeed(run, node)
        payload = {
            "kind": node.kind,
            "cfg": {**training_part(node.cfg), "data": [source_key(s, fps) for s in node.cfg["data"]]},
            "model": model_key(node, run, fps),
            "seed": run["seed"],
            "precision": ds["precision"],
            "attn": run["model"]["attn_implementation"],
        }
        fps[node.name] = _hash(payload)
        ev = node.cfg.get("eval")
        eval_fp = None
        if ev:
            eval_fp = _hash({"stage": fps[node.name], **ev,
                             "data": [source_key(s, fps) for s in ev["data"]]})
        out[node.name] = {"fingerprint": fps[node.name], "eval_fingerprint": eval_fp}
    return out


def effective_deepspeed(run: dict, node: Node) -> dict:
    ds = dict(run["deepspeed"])
    ds.update({k: v for k, v in (node.cfg["deepspeed"] or {}).items() if v is not None})
    return ds


def stage_dir(run: dict, name: str) -> Path:
    return Path(run["run_dir"]) / name


def local_source_files(node: Node) -> list[tuple[str, dict, str]]:
    """(where, source, row schema) for every local file source, for the pre-flight check."""
    out = []
    for i, src in enumerate(node.cfg["data"]):
        if src["path"] is not None and is_local(src["path"]):
            out.append((f"stages.{node.name}.data[{i}]", src, schema.DATA_ROWS[node.kind]))
    if node.cfg.get("eval"):
        for i, src in enumerate(node.cfg["eval"]["data"]):
            if src["path"] is not None and is_local(src["path"]):
                out.append((f"stages.{node.name}.eval.data[{i}]", src, "prompt"))
    return out


