"""RUN_DIR/<stage>/manifest.json: the record a re-run trusts, written last and atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"


def write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read(stage_dir: Path) -> dict | None:
    path = Path(stage_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write(stage_dir: Path, data: dict) -> None:
    write_json_atomic(Path(stage_dir) / MANIFEST, data)


def update(stage_dir: Path, **fields) -> dict:
    data = read(stage_dir) or {}
    data.update(fields)
    write(stage_dir, data)
    return data


def is_done(stage_dir: Path, fingerprint: str) -> bool:
    """Completed with this fingerprint, and every output it names still exists."""
    m = read(stage_dir)
    if not m or m.get("status") != "completed" or m.get("fingerprint") != fingerprint:
        return False
    return all((Path(stage_dir) / rel).exists() for rel in (m.get("outputs") or {}).values())


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": ".".join(map(str, __import__("sys").version_info[:3]))}
    for pkg in ("posttrain", "torch", "transformers", "deepspeed", "datasets"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out

