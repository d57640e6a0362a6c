"""Data sources: local JSONL / JSON / parquet, or a Hugging Face dataset by name; mixtures.

`weight` multiplies a source's rows: 0.5 takes a seeded half, 2.0 takes every
row twice, 1.5 every row once plus a seeded half. Local files are read here
without torch, so the runner can check every row before anything trains.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Iterator

from posttrain_cli.errors import UserError
from posttrain_cli.data.paths import is_local, resolve_source_path

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def _local_files(path: str, where: str) -> list[Path]:
    p = Path(resolve_source_path(path)).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in LOCAL_SUFFIXES)
        if not files:
            raise UserError(f"{where}: directory {path} holds no .jsonl, .json or .parquet files")
        return files
    if not p.is_file():
        raise UserError(f"{where}: data file not found: {path}")
    if p.suffix not in LOCAL_SUFFIXES:
        raise UserError(f"{where}: {path}: unsupported file type (use .jsonl, .json or .parquet)")
    return [p]


def _read_file(f: Path) -> Iterator[tuple[int, object]]:
    if f.suffix == ".jsonl":
        with f.open() as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{f}: row {n}: not valid JSON ({e.msg})") from None
    elif f.suffix == ".json":
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{f}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(data, list):
            raise UserError(f"{f}: a .json data file must hold a list of rows")
        yield from enumerate(data, 1)
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(f)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise UserError(f"{f}: cannot read parquet ({e})") from None
        yield from enumerate(table.to_pylist(), 1)


def _read_hub(src: dict, where: str) -> Iterator[tuple[int, object]]:
    import datasets

    try:
        # Hub datasets are data (parquet/JSON); datasets 4 runs no loading scripts,
        # so there is no remote code to trust here.
        ds = datasets.load_dataset(src["path"], src["name"], split=src["split"])
    except Exception as e:  # network, missing dataset, bad split
        raise UserError(f"{where}: cannot load dataset '{src['path']}' split '{src['split']}': "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    yield from enumerate(ds, 1)


def load_source(src: dict, where: str, parse: Callable) -> list:
    """Rows of one source, each checked by `parse(row, file, row_number)`."""
    rows = []
    if is_local(src["path"]):
        for f in _local_files(src["path"], where):
            rows.extend(parse(row, str(f), n) for n, row in _read_file(f))
        label = src["path"]
    else:
        label = f"{src['path']}[{src['split']}]"
        rows.extend(parse(row, label, n) for n, row in _read_hub(src, where))
    if not rows:
        raise UserError(f"{where}: {label} has no rows")
    return rows


def apply_weight(rows: list, weight: float, seed: int) -> list:
    whole, frac = int(weight), weight - int(weight)
    out = rows * whole
    if frac > 0:
        rng = random.Random(seed)
        out += rng.sample(rows, max(1, round(frac * len(rows))))
    return out


def load_mixture(sources: list[dict], where: str, parse: Callable, seed: int,
                 *, resolved_from: dict | None = None) -> list:
    """Every source's rows, weighted, concatenated (shuffling is the trainer's job)."""
    out = []
    for i, src in enumerate(sources):
        if src["from"] is not None:
            src = {**src, "path": resolved_from[src["from"]]}
        rows = load_source(src, f"{where}[{i}]", parse)
        out.extend(apply_weight(rows, src["weight"], seed + i))
    return out
