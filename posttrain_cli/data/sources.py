"""Data sources: local files, directories of them, `datasets` saved-to-disk directories, or a Hugging
Face dataset by name; mixtures.

Local formats: `.jsonl` (also compressed: `.jsonl.gz`, `.jsonl.zst`, the latter with the
`zstandard` package), `.json` (a list of rows), `.parquet`; a directory of such files (parquet
shards: sorted by path, read in that order); a directory written by `Dataset.save_to_disk` or
`DatasetDict.save_to_disk` (the source's `split` picks from a DatasetDict). An error names the file
(or `dir[split]`) and the 1-based row number (a JSONL row number is its line number).

Rows are read in chunks (`chunks`): raw JSON lines, parsed rows or Arrow tables, so a million-row
source never sits in memory as Python objects, and the chunks can be parsed, checked and tokenized
in worker processes (`map_chunks`, data/tokenized.py) rather than on one core. `load_source` and
`load_mixture` return every row as a list, for the stages whose data fits in memory.

`weight` multiplies a source's rows: 0.5 takes a seeded half, 2.0 takes every
row twice, 1.5 every row once plus a seeded half. Local files are read here
without torch, so the runner can check every row before anything trains (`SourceRows`).
"""

from __future__ import annotations

import io
import json
import os
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from posttrain_cli.errors import UserError
from posttrain_cli.data.paths import is_local, resolve_source_path

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".parquet")
METADATA = ("dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json")
# Rows per chunk: big enough that handing a chunk to a worker costs little, small enough for a
# steady progress bar and little memory per worker.
CHUNK_ROWS = 2000


@dataclass
class Chunk:
    """Consecutive rows of one file: raw JSON lines, parsed rows or an Arrow table (one is set)."""

    label: str
    # The 1-based row number of its first item.
    first: int
    lines: list[bytes] | None = None
    rows: list | None = None
    table: object | None = None

    def __len__(self) -> int:
        for part in (self.lines, self.rows, self.table):
            if part is not None:
                return len(part)
        return 0


def decode(chunk: Chunk) -> Iterator[tuple[int, object]]:
    """(row number, row) for every row of a chunk; a blank JSONL line is no row but keeps its number."""
    if chunk.lines is not None:
        for n, line in enumerate(chunk.lines, chunk.first):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
                raise UserError(f"{chunk.label}: row {n}: {_why_not_json(line, e)}") from None
    elif chunk.table is not None:
        yield from enumerate(chunk.table.to_pylist(), chunk.first)
    else:
        yield from enumerate(chunk.rows, chunk.first)


def _why_not_json(line: bytes, e: ValueError) -> str:
    if b"\x00" in line:
        return "not text (it holds NUL bytes: a binary file, or UTF-16 text; JSON lines are UTF-8)"
    if isinstance(e, UnicodeDecodeError):
        return (f"not UTF-8 text (byte {e.object[e.start]:#04x} at byte {e.start + 1} of the line; JSON lines are "
                f"UTF-8: convert the file, e.g. iconv -f latin1 -t utf-8)")
    return f"not valid JSON ({e.msg if isinstance(e, json.JSONDecodeError) else e})"


# ------------------------------------------------------------------ local files


def _suffix(p: Path) -> str | None:
    return next((s for s in LOCAL_SUFFIXES if p.name.endswith(s)), None)


def saved_dataset(p: Path) -> bool:
    """A directory written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file()
                                                   and (p / "dataset_info.json").is_file())


def local_files(path: str, where: str) -> list[Path]:
    """The data files of a local source (a saved `datasets` directory is one entry)."""
    p = Path(resolve_source_path(path)).expanduser()
    if p.is_dir():
        if saved_dataset(p):
            return [p]
        # Hidden folders (.cache/ of a hub download) and datasets' metadata files are no data.
        files = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) and f.name not in METADATA
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise UserError(f"{where}: directory {path} holds no {', '.join(LOCAL_SUFFIXES)} files "
                            f"(nor a datasets save_to_disk directory)")
        return files
    if not p.is_file():
        raise UserError(f"{where}: data file not found: {path}")
    if not _suffix(p):
        raise UserError(f"{where}: {path}: unsupported file type (use {', '.join(LOCAL_SUFFIXES)}, "
                        f"a directory of them or a datasets save_to_disk directory)")
    return [p]


def _open_binary(f: Path):
    """The file's bytes, decompressed for .gz and .zst."""
    if f.name.endswith(".gz"):
        import gzip

        return gzip.open(f, "rb")
    if f.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise UserError(f"{f}: reading .zst files needs the zstandard package (pip install zstandard)") from None
        raw = f.open("rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                                            closefd=True))
    return f.open("rb")


def _decompress_errors() -> tuple:
    errors = [OSError, EOFError]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _line_chunks(f: Path, size: int) -> Iterator[Chunk]:
    first, lines = 1, []
    with _open_binary(f) as fh:
        try:
            for line in fh:
                lines.append(line)
                if len(lines) == size:
                    yield Chunk(str(f), first, lines=lines)
                    first, lines = first + size, []
        except _decompress_errors() as e:
            raise UserError(f"{f}: cannot read past row {first + len(lines) - 1} ({e})") from None
    if lines:
        yield Chunk(str(f), first, lines=lines)


def _json_chunks(f: Path, size: int) -> Iterator[Chunk]:
    try:
        data = json.loads(f.read_bytes())
    except ValueError as e:
        where = f"line {e.lineno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise UserError(f"{f}: not valid JSON ({where})") from None
    if not isinstance(data, list):
        raise UserError(f"{f}: a .json data file must hold a list of rows")
    for i in range(0, len(data), size):
        yield Chunk(str(f), i + 1, rows=data[i:i + size])


def _parquet_chunks(f: Path, size: int) -> Iterator[Chunk]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f)
        first = 1
        for batch in pf.iter_batches(batch_size=size):
            yield Chunk(str(f), first, table=pa.Table.from_batches([batch]))
            first += batch.num_rows
    except (OSError, pa.ArrowException) as e:  # pyarrow raises several types for a bad file
        raise UserError(f"{f}: cannot read parquet ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _saved(p: Path, split: str, where: str):
    """(label, Dataset) of a save_to_disk directory; the split chooses from a DatasetDict."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises several types for a bad directory
        raise UserError(f"{where}: {p}: cannot load the saved dataset ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{where}: {p} has no split '{split}' (it has {', '.join(ds)}); set split")
        return f"{p}[{split}]", ds[split]
    return str(p), ds


def _dataset_chunks(label: str, ds, size: int) -> Iterator[Chunk]:
    first = 1
    for table in ds.with_format("arrow").iter(batch_size=size):
        yield Chunk(label, first, table=table)
        first += table.num_rows


def _file_chunks(f: Path, split: str, where: str, size: int) -> Iterator[Chunk]:
    if f.is_dir():
        yield from _dataset_chunks(*_saved(f, split, where), size)
        return
    suffix = _suffix(f)
    if suffix == ".json":
        yield from _json_chunks(f, size)
    elif suffix == ".parquet":
        yield from _parquet_chunks(f, size)
    else:
        yield from _line_chunks(f, size)


def _read_file(f: Path) -> Iterator[tuple[int, object]]:
    for chunk in _file_chunks(f, "train", str(f), CHUNK_ROWS):
        yield from decode(chunk)


# ------------------------------------------------------------------ hub datasets


def hub_dataset(src: dict, where: str):
    import datasets

    try:
        # Hub datasets are data (parquet/JSON); datasets 4 runs no loading scripts,
        # so there is no remote code to trust here.
        return datasets.load_dataset(src["path"], src["name"], split=src["split"])
    except Exception as e:  # network, missing dataset, bad split
        raise UserError(f"{where}: cannot load dataset '{src['path']}' split '{src['split']}': "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _read_hub(src: dict, where: str) -> Iterator[tuple[int, object]]:
    for chunk in _dataset_chunks(source_label(src), hub_dataset(src, where), CHUNK_ROWS):
        yield from decode(chunk)


# ------------------------------------------------------------------ one source


def source_label(src: dict) -> str:
    return src["path"] if is_local(src["path"]) else f"{src['path']}[{src['split']}]"


def chunks(src: dict, where: str, size: int | None = None) -> Iterator[Chunk]:
    """Every row of a source, in order, in chunks of `size` (default CHUNK_ROWS; a chunk never spans
    two files)."""
    size = size or CHUNK_ROWS
    if is_local(src["path"]):
        for f in local_files(src["path"], where):
            yield from _file_chunks(f, src["split"], where, size)
    else:
        yield from _dataset_chunks(source_label(src), hub_dataset(src, where), size)


def count_rows(src: dict, where: str) -> int:
    """Rows of a source, for a progress bar: JSONL lines are counted (blank ones included)."""
    if not is_local(src["path"]):
        return len(hub_dataset(src, where))
    total = 0
    for f in local_files(src["path"], where):
        if f.is_dir():
            total += len(_saved(f, src["split"], where)[1])
        elif _suffix(f) == ".parquet":
            import pyarrow.parquet as pq

            try:
                total += pq.ParquetFile(f).metadata.num_rows
            except Exception as e:  # a bad file: reading it names the error
                raise UserError(f"{f}: cannot read parquet ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        elif _suffix(f) == ".json":
            total += sum(len(c) for c in _json_chunks(f, 1 << 30))
        else:
            with _open_binary(f) as fh:
                last = b"\n"
                try:
                    while block := fh.read(1 << 22):
                        total += block.count(b"\n")
                        last = block[-1:]
                except _decompress_errors() as e:
                    raise UserError(f"{f}: cannot read ({e})") from None
                total += last != b"\n"
    return total


def load_source(src: dict, where: str, parse: Callable) -> list:
    """Rows of one source, each checked by `parse(row, file, row_number)`."""
    rows = [parse(row, c.label, n) for c in chunks(src, where) for n, row in decode(c)]
    if not rows:
        raise UserError(f"{where}: {source_label(src)} has no rows")
    return rows


_ROW_CHECK: Callable | None = None  # SourceRows' `check`, set in each worker at fork (and here)


def _set_row_check(check: Callable | None) -> None:
    global _ROW_CHECK
    _ROW_CHECK = check


def _check_chunk(task: tuple[Callable, Chunk]) -> int:
    parse, chunk = task
    rows = 0
    for n, row in decode(chunk):
        parsed = parse(row, chunk.label, n)
        if _ROW_CHECK is not None:
            _ROW_CHECK(parsed, chunk.label, n)
        rows += 1
    return rows


class SourceRows:
    """A source's rows, every one checked by `parse` up front (in worker processes), then parsed again
    on each pass over it: the runner's pre-flight of a million-row file holds one chunk at a time.
    `check(parsed_row, file, row_number)`, when given, runs on every row in that first pass only
    (data/render_check.py: the chat template's render); it reaches the workers by fork."""

    def __init__(self, src: dict, where: str, parse: Callable, workers: int | None = None,
                 check: Callable | None = None):
        self.src, self.where, self.parse = src, where, parse
        try:
            self.n = sum(map_chunks(((parse, c) for c in chunks(src, where)), _check_chunk, workers=workers,
                                    initializer=_set_row_check, initargs=(check,)))
        finally:
            _set_row_check(None)
        if not self.n:
            raise UserError(f"{where}: {source_label(src)} has no rows")

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator:
        for c in chunks(self.src, self.where):
            for n, row in decode(c):
                yield self.parse(row, c.label, n)


# ------------------------------------------------------------------ worker processes


def cpu_workers() -> int:
    """Worker processes for data work: the cores this process may use (POSTTRAIN_DATA_WORKERS overrides)."""
    env = os.environ.get("POSTTRAIN_DATA_WORKERS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def map_chunks(tasks: Iterable, work: Callable, *, workers: int | None = None,
               initializer: Callable | None = None, initargs: tuple = ()) -> Iterator:
    """work(task) for every task, results in task order, in `workers` forked processes (default: every
    core) with at most 2 tasks per worker in flight, so a huge source is never read ahead into memory.
    The first task's error (in task order) is raised; one worker, or a single task, runs here.

    `initializer(*initargs)` runs once in each worker (and here, when nothing forks): big read-only
    state such as a tokenizer reaches the workers by fork, not by pickling."""
    workers = cpu_workers() if workers is None else workers
    tasks = iter(tasks)
    head = [t for _, t in zip(range(2), tasks)]
    if workers <= 1 or len(head) < 2 or not _can_fork():
        if initializer is not None:
            initializer(*initargs)
        for t in head:
            yield work(t)
        for t in tasks:
            yield work(t)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_init, initargs=(initializer, initargs))
    pending: deque = deque()
    try:
        for t in head:
            pending.append(pool.submit(work, t))
        for t in tasks:
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
            pending.append(pool.submit(work, t))
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(initializer: Callable | None, initargs: tuple) -> None:
    """A worker leaves Ctrl-C to its parent, which stops the pool (a worker's own KeyboardInterrupt
    would print its traceback over the user's terminal)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)


def _can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods()


# ------------------------------------------------------------------ mixtures


def weighted_indices(n: int, weight: float, seed: int) -> list[int]:
    """Which of n rows a source of this weight contributes, in order (apply_weight on indices)."""
    return apply_weight(list(range(n)), weight, seed)


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
