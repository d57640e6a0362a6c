"""Merging two models: posttrain's streaming merge vs a plain load + average + save, on CPU.

    python scripts/bench_merge.py                     # two ~300 MB bf16 models, 3 rounds, ~1-2 min on 2 cores
    python scripts/bench_merge.py --size 1GB --repeats 5
    python scripts/bench_merge.py --quick             # smoke run: two ~40 MB models, 1 round

Targets (the merge issue): posttrain's peak resident memory above the interpreter's
baseline stays below 1.5 N for two models of N bytes each, and its time is within 2x of
the plain baseline's (or faster).

Models: two random-init Llama checkpoints of N bytes each (bf16; hidden size, layers and a
32k vocabulary sized so N is about --size), written once as safetensors shards of ~100 MB
with an index, a config and the tiny tokenizer, into a temp dir.

Contestants, each in a fresh subprocess (so the peak is its own), both with --threads threads:

1. ``posttrain``: ``posttrain_cli.merge.stream.merge``, method linear, equal weights, default
   2 GB output shards: tensors read with plain file reads, merged in float32 slices, cast to
   bf16 and appended to the output file as they are computed.
2. ``baseline``: ``safetensors.torch.load_file`` of every shard of both models (the full
   state dicts), ``(a.float() + b.float()) / 2`` cast to bf16 per tensor, ``save_file`` of the
   result: what one writes by hand, and what a torch.load-based script does on .bin files.

Memory: the worker imports everything first, reads VmRSS (the baseline), resets the kernel's
peak counter (/proc/self/clear_refs), merges, and reads VmHWM: peak = VmHWM - baseline.
Time: the merge call alone, output written (not fsynced: both leave it in the page cache);
wall seconds, and CPU seconds of all the process's threads. The inputs are in the page cache
for both (written just before). Medians over --repeats rounds; the order of the two alternates
each round; the two of a round run back to back, so the median of the rounds' own time ratios
is the figure least moved by other work on a shared machine. The script checks that both
outputs hold the same bytes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO, add_worker_args, busy_before, rotated, run_in_subprocess, serve_worker

sys.path.insert(0, str(REPO))

VOCAB = 32000
INPUT_SHARD = 100 * 10**6


def llama_config(size: int):
    """A Llama config whose bf16 weights take about `size` bytes: the widest hidden size whose
    embedding and head stay under 40% of it, then as many layers as fill the rest."""
    from transformers import LlamaConfig

    hidden = 256
    for h in (512, 1024, 2048, 4096):
        if 2 * VOCAB * h * 2 <= 0.4 * size:
            hidden = h
    inter = int(hidden * 2.75) // 64 * 64
    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 2
    layers = max(1, round((size - 2 * VOCAB * hidden * 2) / per_layer))
    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, dtype="bfloat16",
                       tie_word_embeddings=False)


def write_model(out: Path, config, seed: int) -> int:
    """Random bf16 weights for every tensor of the config's model, in ~100 MB shards; -> bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from posttrain_cli.models.tiny import build_tokenizer

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    shards, part, part_size, total = [], {}, 0, 0
    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if part and part_size + t.nbytes > INPUT_SHARD:
            shards.append(part)
            part, part_size = {}, 0
        part[name] = t
        part_size += t.nbytes
        total += t.nbytes
    shards.append(part)
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(out)
    build_tokenizer().save_pretrained(out)
    return total


# --------------------------------------------------------------------------- workers


def worker(kind: str, spec: dict) -> dict:
    import torch  # noqa: F401  (imported before the baseline RSS is read, like everything else)
    from safetensors.torch import load_file, save_file

    from posttrain_cli.merge import memory, stream

    a, b, out = Path(spec["a"]), Path(spec["b"]), Path(spec["out"])
    baseline = memory.rss()
    if not memory.reset_peak_rss():
        raise SystemExit("this kernel cannot reset the peak-RSS counter (/proc/self/clear_refs)")
    start, cpu = time.perf_counter(), time.process_time()
    if kind == "posttrain":
        stream.merge([("models[0]", a), ("models[1]", b)], out, method="linear", weights=[1.0, 1.0])
    else:
        def load(path: Path) -> dict:
            files = set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())
            state = {}
            for f in sorted(files):
                state.update(load_file(path / f))
            return state

        sa, sb = load(a), load(b)
        merged = {k: ((sa[k].float() + sb[k].float()) / 2).to(sa[k].dtype) for k in sa}
        out.mkdir(parents=True)
        save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
        shutil.copyfile(a / "config.json", out / "config.json")
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"seconds": seconds, "cpu": cpu, "peak": memory.peak_rss() - baseline, "baseline_rss": baseline}


def same_output(x: Path, y: Path) -> bool:
    """Both output directories hold the same tensors, byte for byte (read a tensor at a time)."""
    import torch

    from posttrain_cli.merge.shards import Checkpoint

    cx, cy = Checkpoint(x, "posttrain"), Checkpoint(y, "baseline")
    try:
        return cx.names() == cy.names() and all(
            cx.entry(k).dtype == cy.entry(k).dtype and torch.equal(cx.read(k), cy.read(k)) for k in cx.names())
    finally:
        cx.close()
        cy.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="300MB", help="bytes per model: 300MB, 1GB, ... (default 300MB)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported (default 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=2.0,
                    help="wait until at most max-load/2 cores are busy before each contestant")
    ap.add_argument("--wait", type=float, default=120, help="seconds to wait for a quiet machine (default 120)")
    ap.add_argument("--quick", action="store_true", help="two ~40 MB models, 1 round, no waiting for a quiet machine")
    ap.add_argument("--tmp", default=None, help="where to write the models (default: a temp dir)")
    add_worker_args(ap)
    args = ap.parse_args()
    if serve_worker(args, worker):
        return

    from posttrain_cli.kinds.merge import parse_size

    size = parse_size("--size", "40MB" if args.quick else args.size)
    repeats = 1 if args.quick else args.repeats
    if args.quick:
        args.wait = 0
    tmp = Path(tempfile.mkdtemp(prefix="bench_merge_", dir=args.tmp))
    try:
        config = llama_config(size)
        t0 = time.perf_counter()
        n = write_model(tmp / "a", config, 1)
        write_model(tmp / "b", config, 2)
        print(f"models: Llama hidden {config.hidden_size}, {config.num_hidden_layers} layers, vocab {VOCAB}, "
              f"bf16: N = {n / 1e6:.0f} MB each ({time.perf_counter() - t0:.0f}s to write both)", flush=True)
        results = {"posttrain": [], "baseline": []}
        for rnd in range(repeats):
            for kind in rotated(["posttrain", "baseline"], rnd):
                busy = busy_before(args.max_load, args.wait)
                out = tmp / f"out-{kind}"
                shutil.rmtree(out, ignore_errors=True)
                spec = {"a": str(tmp / "a"), "b": str(tmp / "b"), "out": str(out), "threads": args.threads}
                r = run_in_subprocess(kind, spec, tmp, rnd, script=__file__)
                results[kind].append(r)
                print(f"  round {rnd + 1} {kind:9s} {r['seconds']:6.2f}s (cpu {r['cpu']:5.2f}s)  "
                      f"peak +{r['peak'] / 1e6:6.0f} MB "
                      f"({r['peak'] / n:.2f} N)  [{busy:.1f} cores busy before]", flush=True)
            if rnd == 0:
                print(f"  outputs identical: {same_output(tmp / 'out-posttrain', tmp / 'out-baseline')}", flush=True)
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("seconds", "cpu", "peak")}
               for k, v in results.items()}
        ratio = med["posttrain"]["seconds"] / med["baseline"]["seconds"]
        cpu_ratio = med["posttrain"]["cpu"] / med["baseline"]["cpu"]
        # Each round runs the two back to back: the ratio within a round sees the same machine load.
        paired = statistics.median(p["seconds"] / b["seconds"]
                                   for p, b in zip(results["posttrain"], results["baseline"]))
        print(f"\nN = {n / 1e6:.0f} MB per model, medians over {repeats} round(s), {args.threads} threads:")
        for k in ("posttrain", "baseline"):
            print(f"  {k:9s} {med[k]['seconds']:6.2f}s (cpu {med[k]['cpu']:5.2f}s)  "
                  f"peak RSS +{med[k]['peak'] / 1e6:.0f} MB = "
                  f"{med[k]['peak'] / n:.2f} N")
        print(f"  posttrain peak / N = {med['posttrain']['peak'] / n:.2f} (target < 1.5); "
              f"time posttrain / baseline = {ratio:.2f} (target <= 2; cpu time {cpu_ratio:.2f}; "
              f"median of the rounds' own ratios {paired:.2f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
