"""LoRA SFT: peak memory and tokens/s of posttrain full SFT vs posttrain LoRA SFT vs TRL's LoRA SFT
(SFTTrainer with peft_config), on CPU, one run.

    python scripts/bench_lora.py            # 3 interleaved rounds (~12 min on 2 quiet cores)
    python scripts/bench_lora.py --quick    # smoke run: small model, 2 steps, 1 round
    python scripts/bench_lora.py --preload /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
                                            # every contestant on another allocator (LD_PRELOAD)

Every contestant gets the same (fp32, 1 process, --threads threads), as scripts/bench_sft.py sets it
up (its data, tokenization checks and step order are reused):

* Model: a random Llama built with posttrain_cli.models.tiny.build_tiny: hidden 640, 12 layers,
  10 heads of 64, MLP 1792, character tokenizer (vocab 107): 61.4M parameters.
* Data: bench_sft's seeded synthetic chats (log-normal lengths, some multi-turn), at most
  --max-seq-len tokens; the same sequences in the same micro-batches at every step; the loss on
  assistant turns only (TRL: assistant_only_loss with a template of generation markers that
  renders byte-identically; its tokens and loss positions are checked against posttrain's).
* Adapter (both LoRA contestants): r 16, alpha 32, dropout 0, every linear layer of the decoder
  (peft's all-linear), the base frozen; AdamW lr --lr, linear decay, grad clip 1.0.

Contestants, each a fresh process:

1. ``posttrain_full``: ``posttrain run`` of one sft stage (DeepSpeed ZeRO-2, 1 rank, packed rows).
2. ``posttrain_lora``: the same with ``lora: {r: 16, alpha: 32}``.
   ``posttrain_full_ckpt``, ``posttrain_lora_ckpt``: the two with deepspeed.activation_checkpointing
   (each decoder layer's activations recomputed in the backward pass, as TRL's default does).
3. ``trl_lora``: ``trl.SFTTrainer(peft_config=LoraConfig(...))`` as TRL ships it (right-padded
   micro-batches, gradient checkpointing on): the target's baseline.
4. ``trl_lora_tuned``: the same, padding-free and without gradient checkpointing.

Peak memory: the contestant process's peak resident set (ru_maxrss; posttrain's CLI runs a 1-rank
stage in its own process), which includes the interpreter, torch and the libraries (the
``baseline`` row: a process that imports them and loads the model, nothing else).
Throughput: non-padding tokens / s after --skip warm-up steps (bench_sft's definition). Medians
over --repeats rounds; the contestant order rotates each round.

The target (LoRA peak <= 0.5x full) is judged on the memory a run holds, as a GPU reports it
(torch.cuda.max_memory_allocated: model, gradients, optimizer states, activations; not the
libraries' code nor the allocator's cache of freed blocks). On CPU the timed rounds' resident peak
also counts glibc's heap, which keeps freed activation buffers (hundreds of MB here), so one more
round, untimed, runs the posttrain contestants with MALLOC_MMAP_THRESHOLD_=131072 (glibc returns
large freed blocks at once: resident = in use, at a cost in speed) and the target's ratio is taken
there, each run's peak less its own resident set as the model starts loading (the interpreter,
the libraries and the tokenized data). Both ratios are printed. With --preload (an allocator such
as tcmalloc that returns freed memory itself) every process runs on it and the memory round is
left out: the target's ratio is taken on the timed rounds' peaks, as close to what is in use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_sft import TRL_TEMPLATE, checked_token_clock, make_rows, throughput, tokenize_all
from benchlib import (TRL_CPU, add_worker_args, busy_before, child_env, rotated, run_in_subprocess,
                      serve_worker, stage_results, step_ends, step_order, target_met, write_recipe,
                      write_rows)

ARCH = dict(hidden_size=640, intermediate_size=1792, num_hidden_layers=12, num_attention_heads=10,
            max_position_embeddings=1024, seed=0)
QUICK_ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=1024, seed=0)
R, ALPHA = 16, 32
MMAP_THRESHOLD = 131072  # glibc's own default before its dynamic threshold raises it


def _peak_kb() -> int:
    import resource

    return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


# --------------------------------------------------------------------------- workers

def worker_baseline(spec: dict) -> dict:
    import deepspeed  # noqa: F401  (what posttrain's process imports too)
    import torch
    import transformers
    import trl  # noqa: F401

    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    return {"peak_kb": _peak_kb(), "params": sum(p.numel() for p in model.parameters())}


def worker_trl(spec: dict, tuned: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = json.loads(Path(spec["data"]).read_text())
    examples = tokenize_all(spec["model"], rows)
    order = [i for step in step_order(len(rows), spec) for i in step]
    ds = Dataset.from_list([rows[i] for i in order])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    tok.chat_template = TRL_TEMPLATE
    out_dir = tempfile.mkdtemp(prefix="bench-trl-", dir=spec["tmp"])
    args = SFTConfig(
        output_dir=out_dir, per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["global_batch"] // spec["micro_batch"], max_steps=spec["steps"],
        learning_rate=spec["lr"], **TRL_CPU, gradient_checkpointing=not tuned, train_sampling_strategy="sequential",
        assistant_only_loss=True, padding_free=tuned, max_length=None if tuned else spec["max_seq_len"],
        seed=spec["seed"])
    peft_config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=spec["model"], args=args, train_dataset=ds, processing_class=tok,
                         peft_config=peft_config)
    model = trainer.model
    assert next(model.parameters()).dtype == torch.float32
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    clock, tokens = checked_token_clock(trainer, model, examples, order)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"t_start": clock.t_start, "ends": clock.ends, "tokens": tokens, "trainable": trainable,
            "loss_last": logs[-1]["loss"] if logs else None, "peak_kb": _peak_kb()}


def run_worker(kind: str, spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if kind == "baseline":
        return worker_baseline(spec)
    return worker_trl(spec, tuned=kind == "trl_lora_tuned")


# --------------------------------------------------------------------------- posttrain

# `posttrain run` in a process that reports its own peak resident set when it ends.
RUN_MEASURED = """
import json, resource, sys
from posttrain_cli.cli import main
from posttrain_cli.engine import deepspeed_engine
out = sys.argv.pop(1)
before = []
load = deepspeed_engine.load_causal_lm
def measured_load(*args, **kwargs):  # the resident set as the model starts loading
    if not before:
        before.append(int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]))
    return load(*args, **kwargs)
deepspeed_engine.load_causal_lm = measured_load
sys.argv[0] = "posttrain"
rc = 0
try:
    main()
except SystemExit as e:
    rc = e.code or 0
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
open(out, "w").write(json.dumps({"rc": rc, "peak_kb": peak, "before_kb": before[0] if before else 0}))
sys.exit(rc)
"""


def run_posttrain(spec: dict, tmp: Path, rnd: int, lora: bool, ckpt: bool = False) -> dict:
    run_dir = tmp / f"pt-{'lora' if lora else 'full'}{'-ckpt' if ckpt else ''}-{rnd}"
    recipe = write_recipe(tmp, spec["model"], "sft", f"""
        kind: sft
        data: [{{path: {spec['data_jsonl']}}}]
        lr: {spec['lr']}
        schedule: linear
        warmup_ratio: 0.0
        weight_decay: 0.0
        grad_clip: 1.0
        max_steps: {spec['steps']}
        global_batch_size: {spec['global_batch']}
        micro_batch_size: {spec['micro_batch']}
        max_seq_len: {spec['max_seq_len']}
        """ + (f"lora: {{r: {R}, alpha: {ALPHA}}}\n" if lora else ""), top="logging: {progress: never}\n")
    out = tmp / f"peak-{run_dir.name}.json"
    cmd = [sys.executable, "-c", RUN_MEASURED, str(out), "run", f"recipe={recipe}", f"run_dir={run_dir}",
           "deepspeed.precision=fp32", f"deepspeed.activation_checkpointing={str(ckpt).lower()}"]
    p = subprocess.run(cmd, env=child_env(spec["threads"]), capture_output=True, text=True, cwd=tmp)
    if p.returncode != 0:
        raise SystemExit(f"posttrain failed (rc {p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    m, rows = stage_results(run_dir, "sft")
    log = (run_dir / "sft" / "logs" / "rank0.log").read_text()
    trainable = None
    if lora:
        import re

        trainable = int(re.search(r"([\d,]+) of [\d,]+ parameters train", log).group(1).replace(",", ""))
    shutil.rmtree(run_dir, ignore_errors=True)
    measured = json.loads(out.read_text())
    if not measured["before_kb"]:
        raise SystemExit("posttrain run: the model was not loaded through deepspeed_engine.load_causal_lm")
    return {"t_start": 0.0, "ends": step_ends(rows, m["train_seconds"]), "tokens": [int(r["tokens"]) for r in rows],
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"], "peak_kb": measured["peak_kb"],
            "before_kb": measured["before_kb"], "trainable": trainable}


# --------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=1.0)
    ap.add_argument("--wait-quiet", type=float, default=300)
    ap.add_argument("--preload", help="a malloc library every contestant runs on (LD_PRELOAD), e.g. tcmalloc's")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: small model, 2 steps of rows up to 256 tokens, 1 round, no waiting")
    add_worker_args(ap)
    a = ap.parse_args()
    if serve_worker(a, run_worker):
        return
    if a.quick:
        a.steps, a.repeats, a.skip, a.rows, a.max_seq_len, a.wait_quiet = 2, 1, 1, 16, 256, 0
    if a.global_batch % a.micro_batch or not 0 <= a.skip < a.steps:
        ap.error("--global-batch must be a multiple of --micro-batch and --skip in [0, steps)")

    if a.preload:
        if not Path(a.preload).is_file():
            ap.error(f"--preload {a.preload}: no such file")
        os.environ["LD_PRELOAD"] = a.preload  # the contestants' processes inherit it (benchlib.child_env)
        print(f"allocator: {a.preload} (LD_PRELOAD) in every process")
    from posttrain_cli.models.tiny import build_tiny

    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    try:
        arch = QUICK_ARCH if a.quick else ARCH
        model_dir = build_tiny(tmp / "model", arch)
        rows = make_rows(a.rows, 0, a.max_seq_len)
        spec = {"model": str(model_dir), **write_rows(tmp, rows), "steps": a.steps, "global_batch": a.global_batch,
                "micro_batch": a.micro_batch, "max_seq_len": a.max_seq_len, "lr": a.lr, "seed": 0,
                "threads": a.threads, "tmp": str(tmp)}
        examples = tokenize_all(str(model_dir), rows)
        per_step = [sum(len(examples[i][0]) for i in s) for s in step_order(len(examples), spec)]
        base = run_in_subprocess("baseline", spec, tmp, 0, script=__file__)
        print(f"model: Llama {arch}: {base['params'] / 1e6:.1f}M parameters, fp32; {a.steps} steps x "
              f"{a.global_batch} sequences ({a.micro_batch} micro), ~{statistics.mean(per_step):.0f} tokens/step; "
              f"LoRA r {R}, alpha {ALPHA}, all-linear; threads {a.threads}")
        print(f"baseline process (python + torch + transformers + deepspeed + trl, the model loaded): "
              f"{base['peak_kb'] / 1024:.0f} MB peak resident")
        contestants = ["posttrain_full", "posttrain_lora", "posttrain_full_ckpt", "posttrain_lora_ckpt",
                       "trl_lora", "trl_lora_tuned"]
        results: dict[str, list] = {c: [] for c in contestants}
        for rnd in range(a.repeats):
            for c in rotated(contestants, rnd):
                busy = busy_before(a.max_load, a.wait_quiet)
                t0 = time.perf_counter()
                res = (run_posttrain(spec, tmp, rnd, lora="lora" in c, ckpt=c.endswith("_ckpt")) if c.startswith("posttrain")
                       else run_in_subprocess(c, spec, tmp, rnd, script=__file__))
                if res["tokens"] != per_step:
                    raise SystemExit(f"{c}: per-step tokens {res['tokens'][:4]}... differ from the plan's "
                                     f"{per_step[:4]}...: not the same batches")
                res["steady"], _ = throughput(res, a.skip)
                results[c].append(res)
                trainable = f", {res['trainable']:,} trainable" if res.get("trainable") else ""
                print(f"round {rnd + 1} {c:19s} {res['steady']:8.0f} tok/s steady; peak {res['peak_kb'] / 1024:6.0f} MB"
                      f"{trainable}; last loss {'n/a' if res['loss_last'] is None else format(res['loss_last'], '.4g')}; process {time.perf_counter() - t0:.0f}s; "
                      f"{busy:.2f} cores busy before", flush=True)
        med = {c: {k: statistics.median(r[k] for r in results[c]) for k in ("steady", "peak_kb")} for c in contestants}
        print(f"\nmedian over {a.repeats} round(s):")
        for c in contestants:
            print(f"  {c:19s} {med[c]['steady']:8.0f} tok/s   peak {med[c]['peak_kb'] / 1024:6.0f} MB "
                  f"({(med[c]['peak_kb'] - base['peak_kb']) / 1024:+6.0f} MB over the baseline)")
        if a.preload:  # the preloaded allocator returns freed memory: the timed rounds' peaks
            used = {c: {k: statistics.median(r[k] for r in results[c]) for k in ("peak_kb", "before_kb")}
                    for c in contestants if c.startswith("posttrain")}
        else:  # the memory round: resident = in use (glibc hands large freed blocks back at once)
            in_use = [c for c in contestants if c.startswith("posttrain") and not (a.quick and c.endswith("_ckpt"))]
            os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
            try:
                used = {c: run_posttrain(spec, tmp, a.repeats, lora="lora" in c, ckpt=c.endswith("_ckpt"))
                        for c in in_use}
            finally:
                del os.environ["MALLOC_MMAP_THRESHOLD_"]
        held = {c: max(1, r["peak_kb"] - r["before_kb"]) for c, r in used.items()}
        if not a.preload:
            print(f"\nmemory round (MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}: resident = in use):")
            for c, r in used.items():
                print(f"  {c:19s} peak {r['peak_kb'] / 1024:6.0f} MB: {held[c] / 1024:6.0f} MB over its process "
                      f"as the model starts loading ({r['before_kb'] / 1024:.0f} MB)")
        print()
        for suffix, what in (("", "without"), ("_ckpt", "both with")):
            lora, full = f"posttrain_lora{suffix}", f"posttrain_full{suffix}"
            raw = med[lora]["peak_kb"] / med[full]["peak_kb"]
            line = f"posttrain LoRA / full peak memory, {what} activation checkpointing = {raw:.2f}x resident"
            if lora in used:
                ratio = held[lora] / held[full]
                line += (f"; held by training {ratio:.2f}x   "
                         f"(target <= 0.5x: {'met' if ratio <= 0.5 else 'NOT met'})")
            print(line)
        for mine, other, target in (("posttrain_lora", "trl_lora", 1.3), ("posttrain_lora_ckpt", "trl_lora", 1.3),
                                    ("posttrain_lora", "trl_lora_tuned", None)):
            r = med[mine]["steady"] / med[other]["steady"]
            print(f"{mine} / {other} tokens/s = {r:.2f}x" + (f"   ({target_met(r, target)})" if target else ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
