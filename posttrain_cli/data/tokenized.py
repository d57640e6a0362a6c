"""Training data at scale (SFT and preference pairs): rows checked and tokenized once, on every core,
into memory-mapped Arrow files that every stage reading the same data with the same tokenizer shares.

    spec = SftTokenization(tokenizer, max_seq_len=2048, truncation="truncate", multi_turn="each")
    caches = locate(cfg["data"], "stages.sft.data", spec, cache_root(RUN_DIR), resolved_from)
    for c in caches:                        # rank 0, where c.ready() is False (ctx.once)
        c.build(progress=ctx.progress)
    examples, stats = mixture(caches, seed)  # every rank: examples[i] -> (input_ids, loss_mask)

    spec = PreferenceTokenization(tokenizer, max_seq_len, truncation)   # reward_model, dpo
    rows, stats = preference_mixture(caches, seed)   # rows[i] -> {"answers": [(ids, mask)], "margin", "src"}

- One cache per source, at `RUN_DIR/_cache/tokenized/<key>/`: `examples.arrow` (Arrow IPC file,
  one record batch per chunk of rows; SFT: `input_ids` list<int32>, `loss_mask` list<bool> per
  example; preference: a kept row's answers as list<list<...>>, `margin`, `src`), `index.npz` (SFT,
  per example: its row, tokens, loss tokens, truncated, and per row the examples truncation dropped;
  preference, per row: kept or why dropped, answers truncated, margin missing, row number) and
  `meta.json`.
- key = sha256 of: the source's content (a file's bytes up to 256 MB, else its path, size and mtime;
  a directory's file names, sizes and mtimes; a hub dataset's `datasets` fingerprint), the tokenizer
  (its tokenizer.json, or vocabulary, special tokens and class), the chat template, max_seq_len,
  truncation, multi_turn (SFT), the row schema, and the source of the code that checks and tokenizes rows
  (data/schemas.py, data/chat.py, this file). Weights are not in the key: a source is tokenized once
  whatever its weight, and the mixture picks its rows.
- Built in worker processes (sources.map_chunks: every core, chunks of 2000 rows handed out in
  order, at most two per worker in flight); each worker checks its rows with the row schema (errors
  name the file, row and field) and calls chat.tokenize_conversation (SFT) or tokenize_response
  (each answer of a preference row), then apply_truncation. A message longer than truncation can
  reach is cut first (`_bounded`: exact, and a 50 MB row costs what a short one does).
  Written into a temporary directory and renamed into place, so a crash leaves no half cache.
- Read back memory-mapped: no rank holds the token ids as Python objects; `Examples[i]` makes the
  two lists of one example when a micro-batch asks for it.
- The mixture is the rows load_mixture would give (apply_weight on row indices, seed + source
  number) and each row's examples in order, so the examples, their order and the counts are the
  ones a row-by-row loop over the mixture gives (stages/sft.py before, preference.tokenize).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from posttrain_cli.data import sources
from posttrain_cli.data.chat import apply_truncation, end_of_turn, render, tokenize_conversation, tokenize_response
from posttrain_cli.data.paths import is_local, resolve_source_path
from posttrain_cli.data.schemas import preference_row, sft_messages
from posttrain_cli.errors import UserError

# A file up to this size is keyed by its bytes; a bigger one by its path, size and mtime.
HASH_LIMIT = 256 << 20
# A source this big gets a progress bar (smaller ones take seconds).
PROGRESS_ROWS = 50_000
# The code whose behaviour the cached tokens depend on.
CODE = ("schemas.py", "chat.py", "tokenized.py")


def cache_root(run_dir: Path) -> Path:
    return Path(run_dir) / "_cache" / "tokenized"


@dataclass
class SftTokenization:
    tokenizer: object
    max_seq_len: int
    truncation: str
    multi_turn: str = "each"

    def key(self) -> dict:
        return {"rows": "sft", "tokenizer": tokenizer_hash(self.tokenizer),
                "chat_template": self.tokenizer.chat_template, "max_seq_len": self.max_seq_len,
                "truncation": self.truncation, "multi_turn": self.multi_turn, "code": _code_hash()}

    @property
    def worker(self) -> Callable:
        return _sft_chunk

    def schema(self):
        import pyarrow as pa

        return pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.bool_()))])


@dataclass
class PreferenceTokenization:
    tokenizer: object
    max_seq_len: int
    truncation: str

    def key(self) -> dict:
        return {"rows": "preference", "tokenizer": tokenizer_hash(self.tokenizer),
                "chat_template": self.tokenizer.chat_template, "max_seq_len": self.max_seq_len,
                "truncation": self.truncation, "code": _code_hash()}

    @property
    def worker(self) -> Callable:
        return _preference_chunk

    def schema(self):
        import pyarrow as pa

        return pa.schema([("input_ids", pa.list_(pa.list_(pa.int32()))),
                          ("loss_mask", pa.list_(pa.list_(pa.bool_()))),
                          ("margin", pa.float64()), ("src", pa.string())])


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@functools.cache
def _code_hash() -> str:
    """Read once a process: the code running is the code imported, whatever is edited on disk later."""
    here = Path(__file__).parent
    return _sha(b"".join((here / name).read_bytes() for name in CODE))[:16]


_code_hash()  # at import, next to the imports of chat and schemas


def tokenizer_hash(tokenizer) -> str:
    """The tokenizer's vocabulary and config: the fast tokenizer's whole tokenizer.json (vocabulary,
    merges, normalizer, pre-tokenizer, added tokens), else the vocabulary; plus the special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return _sha(f"{type(tokenizer).__name__}\n{special}\n{body}")[:16]


def _file_signature(f: Path) -> dict:
    st = f.stat()
    if f.is_file() and st.st_size <= HASH_LIMIT:
        h = hashlib.sha256()
        with f.open("rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
        return {"sha256": h.hexdigest()}
    if f.is_dir():
        return {"dir": str(f.resolve()), "files": sorted(
            (str(p.relative_to(f)), p.stat().st_size, p.stat().st_mtime_ns) for p in f.rglob("*") if p.is_file())}
    return {"file": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def data_signature(src: dict, where: str) -> dict:
    """What identifies a source's rows (its content where that is cheap to read)."""
    if is_local(src["path"]):
        root = Path(resolve_source_path(src["path"])).expanduser()
        files = sources.local_files(src["path"], where)
        # A directory's files in order, by name; a single file by its content alone (copies share).
        return {"split": src["split"], "files": [
            {**({"name": str(f.relative_to(root))} if f != root else {}), **_file_signature(f)} for f in files]}
    ds = sources.hub_dataset(src, where)
    return {"hub": src["path"], "name": src["name"], "split": src["split"], "fingerprint": ds._fingerprint}


# ------------------------------------------------------------------ the worker side

_SPEC = None  # the worker's SftTokenization / PreferenceTokenization (set at fork by _init)


def _init(spec) -> None:
    global _SPEC
    _SPEC = spec


def _flat(lists: list[list], dtype) -> np.ndarray:
    return np.fromiter(chain.from_iterable(lists), dtype, sum(map(len, lists)))


def _offsets(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)


def _lists(lists: list[list], dtype):
    """Python lists of numbers -> an Arrow list array (built from flat numpy, not element by element)."""
    import pyarrow as pa

    return pa.ListArray.from_arrays(pa.array(_offsets(list(map(len, lists)))), pa.array(_flat(lists, dtype)))


def _max_token_chars(tokenizer) -> int:
    """The most characters one token covers: the longest vocabulary entry, added tokens included
    (a byte-level entry counts bytes, at least its characters)."""
    found = getattr(tokenizer, "_posttrain_max_token_chars", None)
    if found is None:
        found = max(map(len, tokenizer.get_vocab()), default=1) or 1
        tokenizer._posttrain_max_token_chars = found
    return found


def _bounded(spec, messages: list[dict]) -> list[dict]:
    """The messages with every content cut to 2 x max_seq_len x (the most characters a token covers)
    characters, so that one 50 MB message costs a tokenization of that much, not of 50 MB.

    Why it is exact: truncation keeps the *first* max_seq_len tokens (truncate) or drops an example
    longer than that (drop). Those first tokens cover at most max_seq_len x L characters of the rendered
    text (L: _max_token_chars), so they lie within its first max_seq_len x L characters, and the text
    past a cut 2 x max_seq_len x L characters in does not change them (the second max_seq_len x L is
    room for a BPE merge that looks past the cut). A message this long holds more than max_seq_len
    tokens on its own, so an example that includes it is truncated before its end (or dropped) with or
    without the cut. That holds where the template writes a content as given; one that rewrites it
    (drops the reasoning before </think>) may not, so the cut is used only where the rendered
    conversation, cut and uncut, agrees on those first characters; otherwise the row is tokenized
    whole (exact, at the old cost). Not for normalizers that delete characters or WordPiece's [UNK] of
    a whole word, which no chat model's tokenizer has."""
    limit = 2 * spec.max_seq_len * _max_token_chars(spec.tokenizer)
    if all(not isinstance(m.get("content"), str) or len(m["content"]) <= limit for m in messages):
        return messages
    cut = [{**m, "content": m["content"][:limit]} if isinstance(m.get("content"), str) and len(m["content"]) > limit
           else m for m in messages]
    end_of_turn(spec.tokenizer)  # the template's way of rendering content (strings or parts) found first
    whole, short = render(spec.tokenizer, messages), render(spec.tokenizer, cut)
    return cut if whole[:limit] == short[:limit] else messages


def _sft_chunk(chunk: sources.Chunk) -> dict:
    """Check and tokenize one chunk of SFT rows (in a worker) -> its record batch and index arrays."""
    import pyarrow as pa

    spec = _SPEC
    ids, masks, rows, truncated, dropped = [], [], [], [], []
    for k, (n, row) in enumerate(sources.decode(chunk)):
        messages = sft_messages(row, chunk.label, n)
        try:
            examples = tokenize_conversation(spec.tokenizer, _bounded(spec, messages), spec.multi_turn)
        except UserError as e:
            raise UserError(f"{chunk.label}: row {n}: {e}") from None
        lost = 0
        for ex in examples:
            ex = apply_truncation(ex, spec.max_seq_len, spec.truncation)
            if ex is None:
                lost += 1
                continue
            ids.append(ex.input_ids)
            masks.append(ex.loss_mask)
            rows.append(k)
            truncated.append(ex.truncated)
        dropped.append(lost)
    tokens = np.fromiter(map(len, ids), np.int32, len(ids))
    loss = np.fromiter(map(sum, masks), np.int32, len(masks))
    batch = pa.RecordBatch.from_arrays([_lists(ids, np.int32), _lists(masks, np.bool_)],
                                       schema=spec.schema())
    return {"lines": len(chunk), "rows": len(dropped), "batch": batch,
            "index": {"row": np.asarray(rows, np.int64), "tokens": tokens, "loss": loss,
                      "truncated": np.asarray(truncated, np.bool_), "dropped": np.asarray(dropped, np.int32)}}


# Why a preference row is not trained on (index.npz `status`).
KEPT, IDENTICAL, TOO_LONG, IDENTICAL_TRUNCATED = 0, 1, 2, 3


def _preference_chunk(chunk: sources.Chunk) -> dict:
    """Check and tokenize one chunk of preference rows (in a worker), as preference.tokenize does."""
    import pyarrow as pa

    spec = _SPEC
    ids, masks, margins, srcs = [], [], [], []
    status, truncated, no_margin, numbers = [], [], [], []
    for n, row in sources.decode(chunk):
        r = preference_row(row, chunk.label, n)
        numbers.append(n)
        no_margin.append(r["margin"] is None)
        if r["drop"] is not None:
            status.append(IDENTICAL)
            truncated.append(0)
            continue
        answers, cut = [], 0
        for resp in r["responses"]:
            try:
                *prompt, resp = _bounded(spec, r["prompt"] + [resp])
                tok = tokenize_response(spec.tokenizer, prompt, resp)
            except UserError as e:
                raise UserError(f"{chunk.label}: row {n}: {e}") from None
            tok = apply_truncation(tok, spec.max_seq_len, spec.truncation)
            if tok is None:
                break
            cut += tok.truncated
            answers.append(tok)
        truncated.append(cut)
        if len(answers) < len(r["responses"]):
            status.append(TOO_LONG)
        elif len({tuple(a.input_ids) for a in answers}) < len(answers):
            status.append(IDENTICAL_TRUNCATED)
        else:
            status.append(KEPT)
            ids.append([a.input_ids for a in answers])
            masks.append([a.loss_mask for a in answers])
            margins.append(r["margin"])
            srcs.append(r["src"])
    answers = [len(a) for a in ids]
    batch = pa.RecordBatch.from_arrays([
        pa.ListArray.from_arrays(pa.array(_offsets(answers)), _lists(list(chain.from_iterable(ids)), np.int32)),
        pa.ListArray.from_arrays(pa.array(_offsets(answers)), _lists(list(chain.from_iterable(masks)), np.bool_)),
        pa.array(margins, pa.float64()), pa.array(srcs, pa.string())], schema=spec.schema())
    tokens = np.fromiter((sum(map(len, a)) for a in ids), np.int64, len(ids))
    return {"lines": len(chunk), "rows": len(status), "batch": batch,
            "index": {"status": np.asarray(status, np.int8), "truncated": np.asarray(truncated, np.int32),
                      "no_margin": np.asarray(no_margin, np.bool_), "number": np.asarray(numbers, np.int64),
                      "tokens": tokens}}


# ------------------------------------------------------------------ one source's cache


@dataclass
class SourceCache:
    src: dict
    where: str
    spec: SftTokenization | PreferenceTokenization
    dir: Path
    key: str
    signature: dict

    def ready(self) -> bool:
        return (self.dir / "meta.json").is_file()

    def build(self, progress: Callable | None = None, workers: int | None = None) -> None:
        """Check and tokenize every row (worker processes), write the cache atomically."""
        import pyarrow as pa

        root = self.dir.parent
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob(f".tmp-{self.key}-*"):  # a build that died (its process is gone)
            if not _alive(old.name.split("-")[2]):
                shutil.rmtree(old, ignore_errors=True)
        tmp = root / f".tmp-{self.key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        label = sources.source_label(self.src)
        total = sources.count_rows(self.src, self.where) if progress else 0
        bar = progress(total, f"tokenizing {label}") if total >= PROGRESS_ROWS else None
        index: dict[str, list] = {}
        done = rows = examples = 0
        try:
            with pa.OSFile(str(tmp / "examples.arrow"), "wb") as sink, \
                    pa.ipc.new_file(sink, self.spec.schema()) as writer:
                for part in sources.map_chunks(sources.chunks(self.src, self.where), self.spec.worker,
                                               workers=workers, initializer=_init, initargs=(self.spec,)):
                    writer.write_batch(part["batch"])
                    for k, v in part["index"].items():
                        index.setdefault(k, []).append(v + rows if k == "row" else v)
                    done += part["lines"]
                    rows += part["rows"]
                    examples += part["batch"].num_rows
                    if bar:
                        bar.update(done, {"rows": rows, "examples": examples})
            if not rows:
                raise UserError(f"{self.where}: {label} has no rows")
            np.savez(tmp / "index.npz", **{k: np.concatenate(v) for k, v in index.items()})
            settings = {k: v for k, v in vars(self.spec).items() if k != "tokenizer"}
            (tmp / "meta.json").write_text(json.dumps({
                "source": label, "rows": rows, "examples": examples, "data": self.signature, **settings},
                indent=1, default=str) + "\n")
            try:
                tmp.rename(self.dir)
            except OSError:  # built meanwhile by another process: keep that one
                if not self.ready():
                    raise
        finally:
            _init(None)
            if bar:
                bar.close()
            shutil.rmtree(tmp, ignore_errors=True)

    @property
    def label(self) -> str:
        return sources.source_label(self.src)

    def open(self):
        """(the Arrow table, memory-mapped; the index arrays)."""
        import pyarrow as pa

        table = pa.ipc.open_file(pa.memory_map(str(self.dir / "examples.arrow"), "r")).read_all()
        with np.load(self.dir / "index.npz") as z:
            index = {k: z[k] for k in z.files}
        return table, index


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def locate(data: list[dict], where: str, spec, root: Path,
           resolved_from: dict | None = None) -> list[SourceCache]:
    """The cache of every source of a stage's `data` (built or not)."""
    common = spec.key()
    out = []
    for i, src in enumerate(data):
        if src["from"] is not None:
            src = {**src, "path": resolved_from[src["from"]]}
        at = f"{where}[{i}]"
        signature = data_signature(src, at)
        key = _sha(json.dumps({"data": signature, **common}, sort_keys=True, default=str))[:24]
        out.append(SourceCache(src, at, spec, Path(root) / key, key, signature))
    return out


# ------------------------------------------------------------------ the mixture


class _Cached(Sequence):
    """Records of memory-mapped Arrow tables, picked and ordered by `order` (global record numbers)."""

    def __init__(self, tables: list, order: np.ndarray):
        self.batches = [b for t in tables for b in t.to_batches()]
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])
        self.order = order

    def __len__(self) -> int:
        return len(self.order)

    def _at(self, i: int):
        g = int(self.order[i])
        b = int(np.searchsorted(self.starts, g, side="right")) - 1
        return self.batches[b], g - int(self.starts[b])


class Examples(_Cached):
    """The stage's training examples in mixture order: examples[i] -> (input_ids, loss_mask) lists,
    read from the memory-mapped caches."""

    def __getitem__(self, i: int) -> tuple[list[int], list[bool]]:
        batch, j = self._at(i)
        return batch.column(0)[j].values.to_pylist(), batch.column(1)[j].values.to_pylist()


def mixture(caches: list[SourceCache], seed: int) -> tuple[Examples, dict]:
    """Every source's rows weighted (sources.apply_weight on row indices), their examples in row
    order -> (examples, stats: rows, truncated, dropped, examples, tokens, loss_tokens)."""
    tables, order = [], []
    stats = dict.fromkeys(("rows", "truncated", "dropped", "examples", "tokens", "loss_tokens"), 0)
    offset = 0
    for i, c in enumerate(caches):
        table, index = c.open()
        n_rows = len(index["dropped"])
        picked = np.asarray(sources.weighted_indices(n_rows, c.src["weight"], seed + i), np.int64)
        per_row = np.bincount(index["row"], minlength=n_rows)
        first = np.concatenate([[0], np.cumsum(per_row)[:-1]])
        counts, starts = per_row[picked], first[picked]
        ends = np.cumsum(counts)
        ex = np.repeat(starts - (ends - counts), counts) + np.arange(int(ends[-1]) if len(ends) else 0)
        stats["rows"] += len(picked)
        stats["truncated"] += int(index["truncated"][ex].sum())
        stats["dropped"] += int(index["dropped"][picked].sum())
        stats["examples"] += len(ex)
        stats["tokens"] += int(index["tokens"][ex].astype(np.int64).sum())
        stats["loss_tokens"] += int(index["loss"][ex].astype(np.int64).sum())
        tables.append(table)
        order.append(ex + offset)
        offset += table.num_rows
    return Examples(tables, np.concatenate(order) if order else np.zeros(0, np.int64)), stats


class PreferenceRows(_Cached):
    """The kept preference rows in mixture order: rows[i] -> {"answers": [(ids, mask)], "margin", "src"}
    (what preference.tokenize makes), read from the memory-mapped caches."""

    def answer_counts(self) -> list[int]:
        """How many answers each row has, in order (without reading the tokens)."""
        import pyarrow.compute as pc

        per = [pc.list_value_length(b.column(0)).to_numpy(zero_copy_only=False) for b in self.batches]
        return np.concatenate(per)[self.order].tolist() if per else []

    def __getitem__(self, i: int) -> dict:
        batch, j = self._at(i)
        ids, masks = batch.column(0)[j].as_py(), batch.column(1)[j].as_py()
        return {"answers": list(zip(ids, masks)), "margin": batch.column(2)[j].as_py(),
                "src": batch.column(3)[j].as_py()}


def preference_mixture(caches: list[SourceCache], seed: int, *, margin_key: str | None = None
                       ) -> tuple[PreferenceRows, dict]:
    """Every source's rows weighted as load_mixture weights them, the kept ones in order -> (rows,
    stats as preference.load_rows + preference.tokenize count them). With `margin_key` (a stage's
    `margin: true`), a training row without a number margin is an error naming it (require_margins)."""
    tables, order = [], []
    stats = dict.fromkeys(("rows", "dropped_identical", "examples", "truncated_answers", "dropped_too_long",
                           "dropped_identical_after_truncation", "tokens"), 0)
    offset = 0
    for i, c in enumerate(caches):
        table, index = c.open()
        status = index["status"]
        picked = np.asarray(sources.weighted_indices(len(status), c.src["weight"], seed + i), np.int64)
        st = status[picked]
        if margin_key is not None:
            missing = picked[(st != IDENTICAL) & index["no_margin"][picked]]
            if len(missing):
                raise UserError(f"{c.label}: row {int(index['number'][missing[0]])}: field 'margin' missing "
                                f"({margin_key} is true, so every training row needs a number 'margin')")
        example_of_row = np.cumsum(status == KEPT) - 1
        kept = example_of_row[picked[st == KEPT]]
        stats["rows"] += len(picked)
        stats["dropped_identical"] += int((st == IDENTICAL).sum())
        stats["examples"] += len(kept)
        stats["truncated_answers"] += int(index["truncated"][picked].sum())
        stats["dropped_too_long"] += int((st == TOO_LONG).sum())
        stats["dropped_identical_after_truncation"] += int((st == IDENTICAL_TRUNCATED).sum())
        stats["tokens"] += int(index["tokens"][kept].sum())
        tables.append(table)
        order.append(kept + offset)
        offset += table.num_rows
    return PreferenceRows(tables, np.concatenate(order) if order else np.zeros(0, np.int64)), stats
