"""SFT peak memory: posttrain vs TRL's SFTTrainer (tuned) on a ~100M-parameter Llama with a 32k
vocabulary and 4k-token packed rows, on CPU, one run.

    python scripts/bench_memory.py              # 2 interleaved rounds (~6 min on 2 quiet cores)
    python scripts/bench_memory.py --quick      # smoke run: small model, 2 steps, 1 round

Every contestant gets the same (fp32, 1 process, --threads threads):

* Model: a random Llama (posttrain_cli.models.tiny.build_tiny): hidden 640, 12 layers, 10 heads
  of 64, MLP 1728, vocabulary 32,000 (embedding and head untied): 100.5M parameters. The text is
  the character tokenizer's (its 107 ids are a subset of the 32,000): the head costs what a real
  32k vocabulary's does (Llama 2, Mistral).
* Data: seeded synthetic chats of one user turn (~150 tokens) and one assistant answer (~800),
  --micro-batch (4) of them per forward: one packed row of ~4,000 tokens; --global-batch (8) per
  optimizer step; the loss on the assistant answer only (TRL: assistant_only_loss with a template
  of generation markers that renders byte-identically; its tokens and loss positions are checked
  against posttrain's, row for row).
* AdamW, lr 1e-4 linear decay, grad clip 1.0, --steps steps.

Contestants, each a fresh process:

1. ``posttrain``: ``posttrain run`` of one sft stage (DeepSpeed ZeRO-2, 1 rank, packing default):
   log-probs through the head in chunks (engine/lm_head.py), logits only at answer tokens.
2. ``trl_tuned``: ``trl.SFTTrainer`` padding-free (one packed row per forward, as posttrain) and
   without gradient checkpointing (bench_sft.py's tuned TRL).

Peak memory: the process's peak resident set (ru_maxrss), which includes the interpreter, torch
and the libraries; the ``baseline`` row is a process that imports them and loads the model. Also
printed: throughput (non-padding tokens/s over the steps after the first). Medians over --repeats
rounds; the contestant order rotates each round.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_lora import _peak_kb, run_posttrain, worker_baseline
import bench_sft
from bench_sft import throughput, tokenize_all
from benchlib import (add_worker_args, busy_before, rotated, run_in_subprocess, serve_worker, step_order,
                      text, write_rows)

ARCH = dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=12, num_attention_heads=10,
            max_position_embeddings=4096, vocab_size=32000, seed=0)
QUICK_ARCH = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=1024, vocab_size=2048, seed=0)
TARGET = 0.6  # posttrain's peak <= 0.6x TRL tuned's (issue 21)


def make_rows(n: int, seed: int, prompt: int, answer: int) -> list[dict]:
    """One user turn of ~prompt and one answer of ~answer characters (= tokens), +-20%."""
    rng = random.Random(seed)
    jitter = lambda m: int(m * rng.uniform(0.8, 1.2))  # noqa: E731
    return [{"messages": [{"role": "user", "content": text(rng, jitter(prompt))},
                          {"role": "assistant", "content": text(rng, jitter(answer))}]} for _ in range(n)]


# --------------------------------------------------------------------------- workers

def worker_trl(spec: dict) -> dict:
    """bench_sft's tuned TRL (padding-free, no checkpointing), logging every step (its first loss is
    compared with posttrain's), and its peak."""
    return {**bench_sft.worker_trl(spec, padding_free=True, gradient_checkpointing=False, logging_steps=1),
            "peak_kb": _peak_kb()}


def run_worker(kind: str, spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    return worker_baseline(spec) if kind == "baseline" else worker_trl(spec)


# --------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=150, help="user turn, ~characters (= tokens)")
    ap.add_argument("--answer", type=int, default=800, help="assistant answer, ~characters (= tokens)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=1.0)
    ap.add_argument("--wait-quiet", type=float, default=300)
    ap.add_argument("--quick", action="store_true", help="smoke run: small model, 2 steps, 1 round")
    add_worker_args(ap)
    a = ap.parse_args()
    if serve_worker(a, run_worker):
        return
    if a.quick:
        a.steps, a.repeats, a.prompt, a.answer, a.wait_quiet = 2, 1, 40, 120, 0
    if a.global_batch % a.micro_batch or a.steps < 2:
        ap.error("--global-batch must be a multiple of --micro-batch, --steps at least 2")

    from posttrain_cli.models.tiny import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        arch = QUICK_ARCH if a.quick else ARCH
        model_dir = build_tiny(tmp / "model", arch)
        rows = make_rows(a.global_batch * a.steps, 0, a.prompt, a.answer)
        max_seq_len = int(1.25 * (a.prompt + a.answer)) + 16
        spec = {"model": str(model_dir), **write_rows(tmp, rows), "steps": a.steps, "global_batch": a.global_batch,
                "micro_batch": a.micro_batch, "max_seq_len": max_seq_len, "lr": a.lr, "seed": 0,
                "threads": a.threads, "tmp": str(tmp)}
        examples = tokenize_all(str(model_dir), rows)
        plan = step_order(len(examples), spec)
        per_step = [sum(len(examples[i][0]) for i in s) for s in plan]
        row = statistics.mean(sum(len(examples[i][0]) for i in s[k:k + a.micro_batch])
                              for s in plan for k in range(0, len(s), a.micro_batch))
        base = run_in_subprocess("baseline", spec, tmp, 0, script=__file__)
        print(f"model: Llama {arch}: {base['params'] / 1e6:.1f}M parameters, fp32; {a.steps} steps x "
              f"{a.global_batch} sequences, packed rows of {a.micro_batch} (~{row:.0f} tokens); threads {a.threads}")
        print(f"baseline process (python + torch + transformers + deepspeed + trl, the model loaded): "
              f"{base['peak_kb'] / 1024:.0f} MB peak resident")
        contestants = ["posttrain", "trl_tuned"]
        results: dict[str, list] = {c: [] for c in contestants}
        for rnd in range(a.repeats):
            for c in rotated(contestants, rnd):
                busy = busy_before(a.max_load, a.wait_quiet)
                t0 = time.perf_counter()
                res = run_posttrain(spec, tmp, rnd, lora=False) if c == "posttrain" else run_in_subprocess(c, spec, tmp, rnd,
                                                                                               script=__file__)
                if res["tokens"] != per_step:
                    raise SystemExit(f"{c}: per-step tokens {res['tokens'][:4]}... differ from the plan's "
                                     f"{per_step[:4]}...: not the same batches")
                res["steady"], _ = throughput(res, 1)
                results[c].append(res)
                print(f"round {rnd + 1} {c:10s} peak {res['peak_kb'] / 1024:6.0f} MB; {res['steady']:7.0f} tok/s; "
                      f"first loss {res['loss_first']:.4f}; process {time.perf_counter() - t0:.0f}s; "
                      f"{busy:.2f} cores busy before", flush=True)
        med = {c: {k: statistics.median(r[k] for r in results[c]) for k in ("steady", "peak_kb")} for c in contestants}
        print(f"\nmedian over {a.repeats} round(s):")
        for c in contestants:
            print(f"  {c:10s} peak {med[c]['peak_kb'] / 1024:6.0f} MB ({(med[c]['peak_kb'] - base['peak_kb']) / 1024:+6.0f}"
                  f" MB over the baseline)   {med[c]['steady']:7.0f} tok/s")
        ratio = med["posttrain"]["peak_kb"] / med["trl_tuned"]["peak_kb"]
        spread = [r["peak_kb"] / t["peak_kb"] for r, t in zip(results["posttrain"], results["trl_tuned"])]
        above = (med["posttrain"]["peak_kb"] - base["peak_kb"]) / max(1, med["trl_tuned"]["peak_kb"] - base["peak_kb"])
        print(f"posttrain / trl_tuned peak memory = {ratio:.2f}x (rounds {min(spread):.2f}-{max(spread):.2f}; "
              f"{above:.2f}x above the baseline)   (target <= {TARGET}x: {'met' if ratio <= TARGET else 'NOT met'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
