"""Where a data source's path points: a file inside the installed package (pkg://), a local file,
or a hub dataset id. Pure standard library: the graph's fingerprints and the loaders share it."""

from __future__ import annotations

from pathlib import Path


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
        p.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet"))
