"""Safetensors checkpoints in and out, a tensor at a time.

Reading: a safetensors file is an 8-byte little-endian header length, a JSON header
(dtype, shape, data_offsets of every tensor), then the raw bytes. Tensors are read with
plain file reads into fresh buffers, not through `safe_open`: that memory-maps the file,
and every page it touches counts in the process's resident memory until it is unmapped,
so a streamed merge would grow to the size of all its inputs.

Writing: every output tensor's name, dtype and shape is known before any is merged, so
each shard's header (`shard_header`) is written first and each tensor's bytes are appended
as soon as they are computed (merge/stream.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain_cli.errors import UserError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model")
HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "*.model", "*.txt", "*.py"]


# ------------------------------------------------------------------ reading


@dataclass
class Entry:
    file: Path
    dtype: str
    shape: tuple
    start: int  # absolute byte offset in the file

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def read_header(path: Path, where: str) -> tuple[dict, int]:
    """-> (the JSON header without __metadata__, the byte offset where tensor data starts)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(size - 8, 100 << 20):
            raise UserError(f"{where}: {path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{where}: {path} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    for name, h in header.items():
        if h.get("dtype") not in DTYPES:
            raise UserError(f"{where}: {path} tensor '{name}' has dtype {h.get('dtype')}, which merge does not read")
        if 8 + n + h["data_offsets"][1] > size:
            raise UserError(f"{where}: {path} is truncated (tensor '{name}' runs past the end of the file)")
    return header, 8 + n


class Checkpoint:
    """A Hugging Face model directory's safetensors (one file or shards + index), read tensor by tensor."""

    def __init__(self, path: Path, where: str):
        self.path, self.where = Path(path), where
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise UserError(f"{where}: {self.path} has no config.json; is it a Hugging Face model directory?")
        self.config = json.loads(cfg.read_text())
        self.entries: dict[str, Entry] = {}
        for file in self._files():
            header, data_start = read_header(file, where)
            for name, h in header.items():
                self.entries[name] = Entry(file, h["dtype"], tuple(h["shape"]), data_start + h["data_offsets"][0])
        self.alias: dict[str, str] = {}  # a tied lm_head.weight -> the input embedding read in its place
        self._handles: dict[Path, object] = {}

    def _files(self) -> list[Path]:
        indexes = sorted(self.path.glob("*.safetensors.index.json"))
        if indexes:
            weight_map = json.loads(indexes[0].read_text()).get("weight_map", {})
            files = [self.path / f for f in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{self.where}: {indexes[0]} lists {missing[0]}, which is not in {self.path}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if files:
            return files
        other = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f"it has {', '.join(other[:3])} but" if other else "it has"
        raise UserError(f"{self.where}: {self.path}: {found} no *.safetensors; merge streams safetensors only "
                        f"(convert: from_pretrained(...).save_pretrained(dir, safe_serialization=True))")

    def names(self) -> set[str]:
        return set(self.entries) | set(self.alias)

    def entry(self, name: str) -> Entry:
        return self.entries[self.alias.get(name, name)]

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """The whole tensor (shaped), or `count` elements from element `start` of its flat view."""
        e = self.entry(name)
        dtype = DTYPES[e.dtype]
        whole = count is None
        if whole:
            start, count = 0, e.numel
        buf = torch.empty(count * dtype.itemsize, dtype=torch.uint8)
        f = self._handles.get(e.file)
        if f is None:
            f = self._handles[e.file] = open(e.file, "rb", buffering=0)
        f.seek(e.start + start * dtype.itemsize)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise UserError(f"{self.where}: {e.file} ended early while reading '{name}'")
            done += got
        out = buf.view(dtype)
        return out.reshape(e.shape) if whole else out

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()


def fetch(ref: str, where: str, revision: str | None = None) -> Path:
    """A local model directory as is; a hub id (org/name) downloaded (safetensors, configs, tokenizer)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{where}='{ref}' is a file; name a model directory")
    parts = ref.split("/")
    if len(parts) != 2 or not all(parts) or ref.startswith((".", "/", "~")):
        raise UserError(f"{where}='{ref}' does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, revision=revision, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline, no such repo, gated: all the user's to fix
        raise UserError(f"{where}='{ref}' is not a local directory and could not be fetched from the hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


# ------------------------------------------------------------------ writing


def plan_shards(layout: list[tuple[str, torch.dtype, tuple]], max_bytes: int) -> list[list[tuple]]:
    """Greedy: tensors in order, a new shard when the next would pass max_bytes (a larger tensor
    gets a shard of its own)."""
    shards, size = [[]], 0
    for name, dtype, shape in layout:
        n = dtype.itemsize
        for s in shape:
            n *= s
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, shape, n))
        size += n
    return shards


def shard_header(shard: list[tuple]) -> bytes:
    """The bytes of a shard before its tensor data: header length, then the JSON header."""
    header, offset = {}, 0
    for name, dtype, shape, n in shard:
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(blob).to_bytes(8, "little") + blob


def write_config(ref: Checkpoint, out_dir: Path, dtype: str, untied: bool) -> None:
    """The merged model's config.json (ref's, with its dtype and tying), generation config,
    tokenizer and custom code, all taken from `ref`."""
    config = dict(ref.config)
    if dtype != "auto":
        config["dtype"] = dtype
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype
    if untied:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in ("generation_config.json", *TOKENIZER_FILES):
        if (ref.path / f).is_file():
            shutil.copyfile(ref.path / f, out_dir / f)
    for f in ref.path.glob("*.py"):  # custom code of trust_remote_code models
        shutil.copyfile(f, out_dir / f.name)
