"""Merge safetensors checkpoints tensor by tensor, never holding a whole model.

    stats = merge([("stages.m.models[0]", dir_a), ("stages.m.models[1]", dir_b)], out_dir,
                  method="linear", weights=[1, 1], max_shard_size=2 * 10**9, seed=0)

Reading: a safetensors file is an 8-byte little-endian header length, a JSON header
(dtype, shape, data_offsets of every tensor), then the raw bytes. Tensors are read with
plain file reads into fresh buffers, not through `safe_open`: that memory-maps the file,
and every page it touches counts in the process's resident memory until it is unmapped,
so a streamed merge would grow to the size of all its inputs.

Writing: every output tensor's name, dtype and shape is known before any is merged, so
each shard's header is written first and each merged tensor's bytes are appended as soon
as it is computed: the output costs one tensor of memory, not one shard. Methods that are
elementwise (linear, task_arithmetic) go a slice of CHUNK_ELEMENTS at a time, so a large
embedding costs a few slices; the others take one whole tensor per input model.

Checks, each a UserError naming the stage key: no safetensors in a model directory, a
different architecture (config.json), different tensor names, a different shape for a
tensor, a different tokenizer (vocabulary and added tokens for every model, chat template
for the merged models; the base may be a base model with no template). A model whose
output embedding is tied (no lm_head.weight stored) reads its input embedding in its place
when another model stores one; the merged model then stores lm_head.weight and is untied.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from posttrain_cli.errors import UserError
from posttrain_cli.merge.methods import MERGE_METHODS

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Elements per slice of an elementwise merge (4 MB per input in float32).
CHUNK_ELEMENTS = 1 << 20

# Config keys that decide what a tensor of a given shape means (checked on top of the shapes).
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "num_local_experts",
             "num_experts")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "spiece.model")
OUTPUT_EMBEDDING = "lm_head.weight"
INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
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


# ------------------------------------------------------------------ checks


def _short(where: str) -> str:
    return where.rsplit(".", 1)[-1]


def _arch(config: dict) -> dict:
    out = {k: config.get(k) for k in ARCH_KEYS}
    if isinstance(config.get("text_config"), dict):
        out.update({f"text_config.{k}": config["text_config"].get(k) for k in ARCH_KEYS})
    return out


def _tie_outputs(ckpts: list[Checkpoint]) -> None:
    """Where some models store lm_head.weight and others tie it to the input embedding, the tied
    ones read their input embedding in its place."""
    stored = [c for c in ckpts if OUTPUT_EMBEDDING in c.entries]
    if not stored or len(stored) == len(ckpts):
        return
    shape = stored[0].entries[OUTPUT_EMBEDDING].shape
    for c in ckpts:
        if OUTPUT_EMBEDDING in c.entries:
            continue
        found = [n for n, e in c.entries.items() if n.endswith(INPUT_EMBEDDINGS) and e.shape == shape]
        if len(found) == 1:
            c.alias[OUTPUT_EMBEDDING] = found[0]


def _names(names: set[str], limit: int = 2) -> str:
    shown = sorted(names)[:limit]
    return ", ".join(f"'{n}'" for n in shown) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def tokenizer_signature(path: Path) -> dict | None:
    """What makes two tokenizers the same: vocabulary (with merges), added tokens, chat template.
    None when the directory holds no tokenizer."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    sig: dict = {}
    tj = path / "tokenizer.json"
    if tj.is_file():
        data = json.loads(tj.read_text())
        model = data.get("model") or {}
        vocab = json.dumps([model.get("type"), model.get("vocab"), model.get("merges")], sort_keys=True)
        sig["vocabulary"] = hashlib.sha256(vocab.encode()).hexdigest()
        sig["added tokens"] = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
    else:
        for f in ("tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json"):
            if (path / f).is_file():
                sig[f] = hashlib.sha256((path / f).read_bytes()).hexdigest()
    template = None
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    else:
        for f in ("tokenizer_config.json", "chat_template.json"):
            if (path / f).is_file():
                template = json.loads((path / f).read_text()).get("chat_template") or template
    sig["chat template"] = template
    return sig


def check(models: list[Checkpoint], base: Checkpoint | None) -> None:
    """Refuse models that cannot be merged, with one line naming the stage key."""
    ckpts = models + ([base] if base else [])
    ref, ref_name = models[0], _short(models[0].where)
    ref_arch = _arch(ref.config)
    for c in ckpts[1:]:
        diff = [k for k, v in _arch(c.config).items() if v != ref_arch[k]]
        if diff:
            k = diff[0]
            raise UserError(f"{c.where}: architecture differs from {ref_name}'s ({k} {_arch(c.config)[k]} vs "
                            f"{ref_arch[k]}); merged models must share one architecture")
    _tie_outputs(ckpts)
    for c in ckpts[1:]:
        lacks, extra = ref.names() - c.names(), c.names() - ref.names()
        if lacks or extra:
            parts = ([f"lacks {_names(lacks)}"] if lacks else []) + ([f"has {_names(extra)} that {ref_name} lacks"]
                                                                      if extra else [])
            raise UserError(f"{c.where}: tensor names differ from {ref_name}'s: it {' and '.join(parts)}")
        for name in sorted(ref.names()):
            if c.entry(name).shape != ref.entry(name).shape:
                raise UserError(f"{c.where}: tensor '{name}' has shape {list(c.entry(name).shape)}, "
                                f"{ref_name}'s has {list(ref.entry(name).shape)}")
    ref_tok = tokenizer_signature(ref.path)
    if ref_tok is None:
        raise UserError(f"{ref.where}: {ref.path} has no tokenizer files; the merged model takes its tokenizer "
                        f"from {ref_name}")
    for c in ckpts[1:]:
        tok = tokenizer_signature(c.path)
        if tok is None:
            continue
        keys = [k for k in ref_tok if k != "chat template" or c is not base]
        diff = [k for k in keys if tok.get(k) != ref_tok[k]] + [k for k in tok if k not in ref_tok]
        if diff:
            raise UserError(f"{c.where}: tokenizer differs from {ref_name}'s ({diff[0]}); merged models must "
                            f"share one tokenizer")


# ------------------------------------------------------------------ writing


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one tensor, seeded by the run seed and the tensor's name: the same draws
    whatever the shard layout, the tensor order or the rank."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return torch.Generator().manual_seed((seed * 1_000_003 + digest) % (2**63 - 1))


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


def _header(shard: list[tuple]) -> bytes:
    header, offset = {}, 0
    for name, dtype, shape, n in shard:
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(blob).to_bytes(8, "little") + blob


def _write_config(ref: Checkpoint, out_dir: Path, dtype: str, untied: bool) -> None:
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


def merge(models: list[tuple[str, Path]], out_dir: Path, *, method: str, base: tuple[str, Path] | None = None,
          weights: list[float] | None = None, density: float | list[float] = 0.5, t: float = 0.5,
          normalize: bool = True, dtype: str = "auto", max_shard_size: int = 2 * 10**9, seed: int = 0,
          progress: Callable[[int], object] | None = None) -> dict:
    """Merge the (stage key, directory) `models` into a Hugging Face directory out_dir.
    -> {"tensors", "shards", "bytes_written"}."""
    fn = MERGE_METHODS[method]
    ckpts = [Checkpoint(path, where) for where, path in models]
    base_ckpt = Checkpoint(base[1], base[0]) if base and fn.uses_base else None
    try:
        check(ckpts, base_ckpt)
        n = len(ckpts)
        opts = {"weights": [float(w) for w in weights] if weights is not None else [1.0] * n,
                "density": [float(d) for d in density] if isinstance(density, list) else [float(density)] * n,
                "t": float(t), "normalize": normalize}
        ref = ckpts[0]
        files = {f: i for i, f in enumerate(dict.fromkeys(e.file for e in ref.entries.values()))}
        order = sorted(ref.names(), key=lambda k: (k in ref.alias, files[ref.entry(k).file], ref.entry(k).start))
        layout = []
        for name in order:
            src = DTYPES[ref.entry(name).dtype]
            layout.append((name, OUT_DTYPES[dtype] if dtype != "auto" and src.is_floating_point else src,
                           ref.entry(name).shape))
        shards = plan_shards(layout, max_shard_size)
        out_dir.mkdir(parents=True, exist_ok=True)
        bar = progress(len(layout)) if progress else None
        done, written, weight_map = 0, 0, {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with open(out_dir / fname, "wb") as f:
                f.write(_header(shard))
                for name, out_dtype, _, nbytes in shard:
                    size = 0
                    for piece in _merged(fn, name, ckpts, base_ckpt, opts, out_dtype, seed):
                        raw = piece.reshape(-1).view(torch.uint8).numpy()
                        f.write(raw)
                        size += raw.nbytes
                    assert size == nbytes, f"{name}: wrote {size} bytes, planned {nbytes}"
                    written += size
                    weight_map[name] = fname
                    done += 1
                    if bar:
                        bar.update(done, {"MB": written / 1e6})
        if bar:
            bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": written}, "weight_map": weight_map}
            (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        _write_config(ref, out_dir, dtype, untied=bool(ref.alias) or any(c.alias for c in ckpts[1:]))
        return {"tensors": len(layout), "shards": len(shards), "bytes_written": written}
    finally:
        for c in ckpts + ([base_ckpt] if base_ckpt else []):
            c.close()


def _merged(fn, name: str, ckpts: list[Checkpoint], base: Checkpoint | None, opts: dict, out_dtype: torch.dtype,
            seed: int):
    """Yield the merged tensor `name` in out_dtype: in flat slices for an elementwise method, else whole."""
    ref = ckpts[0].entry(name)
    if not DTYPES[ref.dtype].is_floating_point:
        # Integer and boolean buffers are not averaged: the first model's are kept.
        yield ckpts[0].read(name)
        return
    numel = ref.numel
    step = CHUNK_ELEMENTS if fn.elementwise else max(numel, 1)
    generator = tensor_generator(seed, name) if fn.random else None
    for start in range(0, max(numel, 1), step):
        count = min(step, numel - start) if fn.elementwise else None
        xs = [c.read(name, start, count).float() for c in ckpts]
        b = base.read(name, start, count).float() if base else None
        out = fn(xs, base=b, generator=generator, **opts)
        del xs, b
        yield out.to(out_dtype)


# ------------------------------------------------------------------ memory


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> int | None:
    """Resident memory of this process now, in bytes (Linux; None elsewhere)."""
    return _status("VmRSS")


def peak_rss() -> int | None:
    """The most resident memory since start, or since reset_peak_rss()."""
    return _status("VmHWM")


def reset_peak_rss() -> bool:
    """Make peak_rss() start over from now (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
