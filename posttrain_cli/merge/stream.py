"""Merge safetensors checkpoints tensor by tensor, never holding a whole model.

    stats = merge([("stages.m.models[0]", dir_a), ("stages.m.models[1]", dir_b)], out_dir,
                  method="linear", weights=[1, 1], max_shard_size=2 * 10**9, seed=0)

The models are read and the output written by merge/shards.py and checked against each other
by merge/checks.py; this is the loop. The output costs one tensor of memory, not one shard:
each merged tensor is appended to its shard as soon as it is computed. Methods that are
elementwise (linear, task_arithmetic) go a slice of CHUNK_ELEMENTS at a time, so a large
embedding costs a few slices; the others take one whole tensor per input model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from posttrain_cli.errors import Diverged
from posttrain_cli.merge.checks import check
from posttrain_cli.merge.methods import MERGE_METHODS
from posttrain_cli.merge.shards import DTYPES, Checkpoint, plan_shards, shard_header, write_config

OUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Elements per slice of an elementwise merge (4 MB per input in float32).
CHUNK_ELEMENTS = 1 << 20


def merge(models: list[tuple[str, Path]], out_dir: Path, *, method: str, base: tuple[str, Path] | None = None,
          weights: list[float] | None = None, density: float | list[float] = 0.5, t: float = 0.5,
          normalize: bool = True, dtype: str = "auto", max_shard_size: int = 2 * 10**9, seed: int = 0,
          progress: Callable[[int], object] | None = None, where: str = "merge") -> dict:
    """Merge the (stage key, directory) `models` into a Hugging Face directory out_dir.
    -> {"tensors", "shards", "bytes_written"}. A merged tensor with a nan or inf raises Diverged
    naming `where` (the stage key), the tensor and the input that holds one, if any: the stage
    publishes nothing."""
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
                f.write(shard_header(shard))
                for name, out_dtype, _, nbytes in shard:
                    size = 0
                    for piece in _merged(fn, name, ckpts, base_ckpt, opts, out_dtype, seed, where):
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
        write_config(ref, out_dir, dtype, untied=bool(ref.alias) or any(c.alias for c in ckpts[1:]))
        return {"tensors": len(layout), "shards": len(shards), "bytes_written": written}
    finally:
        for c in ckpts + ([base_ckpt] if base_ckpt else []):
            c.close()


def _merged(fn, name: str, ckpts: list[Checkpoint], base: Checkpoint | None, opts: dict, out_dtype: torch.dtype,
            seed: int, where: str = "merge"):
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
        out = fn(xs, base=b, generator=generator, **opts).to(out_dtype)
        if not torch.isfinite(out).all():
            raise Diverged(_nonfinite_message(where, name, out_dtype, ckpts, xs, base, b))
        del xs, b
        yield out


def _nonfinite_message(where: str, name: str, out_dtype: torch.dtype, ckpts: list[Checkpoint], xs: list,
                       base: Checkpoint | None, b) -> str:
    """One line: the merged tensor is not finite, and why: an input holds nan or inf, or the result
    overflows the output dtype."""
    inputs = [(c.where, x) for c, x in zip(ckpts, xs)] + ([(base.where, b)] if base is not None else [])
    culprit = next((w for w, x in inputs if not torch.isfinite(x).all()), None)
    why = (f"the input {culprit} holds nan or inf there" if culprit else
           f"the result overflows {str(out_dtype).removeprefix('torch.')}")
    return f"{where}: the merged tensor {name} holds non-finite values ({why}); the merge is not published"


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one tensor, seeded by the run seed and the tensor's name: the same draws
    whatever the shard layout, the tensor order or the rank."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return torch.Generator().manual_seed((seed * 1_000_003 + digest) % (2**63 - 1))
