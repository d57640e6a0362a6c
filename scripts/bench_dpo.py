"""DPO optimizer steps per second: posttrain vs TRL's DPOTrainer, on CPU, one run.

    python scripts/bench_dpo.py                 # 3 interleaved rounds, ~6-8 min on 2 cores
    python scripts/bench_dpo.py --quick         # smoke run: small model, few steps, 1 round

Run it on a quiet machine (the script waits, like every benchmark here, until at
most --max-load/2 cores are busy before each contestant).

Every contestant gets the same (fp32, 1 process, --threads threads):

* Model: a tiny Llama (hidden 256, 4 layers, ~3.5M parameters, character
  tokenizer) built once with ``posttrain_cli.models.tiny.build_tiny``.
* Data: --steps x --global-batch seeded synthetic preference pairs (prompt and
  answers of log-normal length, 20..400 characters = tokens), conversational:
  ``prompt`` (a user turn), ``chosen`` / ``rejected`` (one assistant turn each).
  The TRL worker checks that TRL's prompt + answer token ids equal posttrain's
  for every row.
* Batches: --global-batch pairs per step as --micro-batch x accumulation, the
  same pairs in the same steps (TRL gets the rows in posttrain's StepPlan order,
  sequential sampling); sigmoid DPO loss, beta 0.1, AdamW lr 1e-6 linear, no
  warm-up, clip 1.0, dropout off (TRL's default, posttrain's rule).

Contestants (each a fresh subprocess):

1. ``posttrain``: the CLI, a ``dpo`` stage: reference log-probs computed once
   before training (the policy is the reference), chosen + rejected packed into
   one padding-free row per micro-batch, logits only at answer tokens.
2. ``trl_default``: ``trl.DPOTrainer`` as shipped: a live reference model
   (a second forward every micro-batch), padded batches, gradient checkpointing
   on (TRL's default). This is the target's baseline.
3. ``trl_tuned``: ``DPOTrainer`` with ``precompute_ref_log_probs=True`` and
   gradient checkpointing off: TRL set up fairly for this hardware.

Time = the reference pass (posttrain's, and TRL's precompute, which TRL runs
inside its constructor: the script times that call) plus training from its
start to the end of the last optimizer step; model loading and tokenization
are left out for everyone.
Steps/s = --steps / that time. Medians over --repeats rounds; the contestant
order rotates each round.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import (TRL_CPU, add_worker_args, busy_before, length, posttrain_run, rotated, run_in_subprocess,
                      serve_worker, stage_results, step_ends, step_order, steps_per_s, ratio_text, text, tiny_model,
                      trl_clock, write_recipe, write_rows)

BETA, LR = 0.1, 1e-6


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = text(rng, length(rng, 80, 0.7))
        chosen, rejected = text(rng, length(rng, 140, 0.6)), text(rng, length(rng, 140, 0.6))
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def plan_order(n: int, spec: dict) -> list[int]:
    return [i for step in step_order(n, spec) for i in step]


def posttrain_ids(model_dir: str, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    from transformers import AutoTokenizer

    from posttrain_cli.data.chat import tokenize_response

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tuple(tokenize_response(tok, r["prompt"], r[k][0]).input_ids for k in ("chosen", "rejected"))
            for r in rows]


# --------------------------------------------------------------------------- TRL worker

def worker_trl(spec: dict, tuned: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(spec["threads"])
    rows = json.loads(Path(spec["data"]).read_text())
    order = plan_order(len(rows), spec)
    ds = Dataset.from_list([rows[i] for i in order])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    out_dir = tempfile.mkdtemp(prefix="bench-trl-", dir=spec["tmp"])
    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["global_batch"] // spec["micro_batch"], max_steps=spec["steps"],
        learning_rate=LR, beta=BETA, **TRL_CPU, train_sampling_strategy="sequential", seed=spec["seed"],
        gradient_checkpointing=not tuned, precompute_ref_log_probs=tuned, max_length=spec["max_seq_len"],
    )
    # TRL precomputes reference log-probs inside the constructor; time that pass so it counts
    # like posttrain's reference pass does.
    ref_time = {"seconds": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            ref_time["seconds"] += time.perf_counter() - t

    DPOTrainer._precompute_ref_logps = timed
    trainer = DPOTrainer(model=spec["model"], args=args, train_dataset=ds, processing_class=tok)
    # Same tokens as posttrain, row for row.
    want = posttrain_ids(spec["model"], [rows[i] for i in order])
    tds = trainer.train_dataset
    for k in range(len(tds)):
        got = tds[k]
        p = list(got["prompt_ids"])
        for name, ids in (("chosen", want[k][0]), ("rejected", want[k][1])):
            assert p + list(got[f"{name}_ids"]) == ids, f"row {k}: TRL {name} tokens differ from posttrain's"

    clock = trl_clock()
    trainer.add_callback(clock)
    t0 = time.perf_counter()
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"seconds": ref_time["seconds"] + clock.ends[-1] - t0, "steps": len(clock.ends),
            **({"ref_seconds": ref_time["seconds"]} if tuned else {}),
            "steady": steps_per_s(clock.ends, t0, spec["skip"])[0], "loss_last": logs[-1]["loss"] if logs else None}


# --------------------------------------------------------------------------- posttrain

def run_posttrain(spec: dict, tmp: Path, rnd: int) -> dict:
    run_dir = tmp / f"pt-run-{rnd}"
    recipe = write_recipe(tmp, spec["model"], "dpo", f"""
        kind: dpo
        data: [{{path: {spec['data_jsonl']}}}]
        loss: dpo
        beta: {BETA}
        lr: {LR}
        schedule: linear
        warmup_ratio: 0.0
        max_steps: {spec['steps']}
        global_batch_size: {spec['global_batch']}
        micro_batch_size: {spec['micro_batch']}
        max_seq_len: {spec['max_seq_len']}
        """)
    posttrain_run(recipe, run_dir, spec["threads"], tmp)
    m, rows = stage_results(run_dir, "dpo")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"seconds": m["ref_seconds"] + m["train_seconds"], "steps": len(rows), "ref_seconds": m["ref_seconds"],
            "steady": steps_per_s(step_ends(rows), 0.0, spec["skip"])[0], "loss_last": rows[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the steady-state figure")
    ap.add_argument("--global-batch", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--micro-batch", type=int, default=4, help="pairs per micro-batch")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=1.0)
    ap.add_argument("--wait-quiet", type=float, default=300)
    ap.add_argument("--quick", action="store_true", help="smoke run: small model, 2 steps, 1 round, no waiting")
    add_worker_args(ap)
    a = ap.parse_args()
    if serve_worker(a, lambda kind, spec: worker_trl(spec, tuned=kind == "trl_tuned")):
        return
    if a.quick:
        a.steps, a.repeats, a.skip, a.wait_quiet = 2, 1, 1, 0

    tmp = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    try:
        model_dir, arch = tiny_model(tmp, a.quick)
        rows = make_rows(a.steps * a.global_batch, 0)
        spec = {"model": str(model_dir), **write_rows(tmp, rows), "steps": a.steps, "global_batch": a.global_batch,
                "micro_batch": a.micro_batch, "max_seq_len": a.max_seq_len, "seed": 0, "threads": a.threads, "skip": a.skip, "tmp": str(tmp)}
        ids = posttrain_ids(str(model_dir), rows)
        lens = sorted(len(c) + len(r) for c, r in ids)
        print(f"model: tiny Llama {arch}, fp32; {len(rows)} pairs, tokens per pair (chosen + rejected, "
              f"prompt in each) median {lens[len(lens) // 2]}, max {lens[-1]}")
        print(f"batch: {a.steps} steps x {a.global_batch} pairs ({a.micro_batch} micro x "
              f"{a.global_batch // a.micro_batch} accumulation); threads {a.threads}")
        contestants = ["posttrain", "trl_default", "trl_tuned"]
        results: dict[str, list] = {c: [] for c in contestants}
        for rnd in range(a.repeats):
            for c in rotated(contestants, rnd):
                busy = busy_before(a.max_load, a.wait_quiet)
                res = run_posttrain(spec, tmp, rnd) if c == "posttrain" else \
                    run_in_subprocess(c, spec, tmp, rnd, script=__file__)
                assert res["steps"] == a.steps, (c, res)
                results[c].append(res)
                extra = f" (reference pass {res['ref_seconds']:.1f}s)" if "ref_seconds" in res else ""
                print(f"round {rnd + 1} {c:12s} {a.steps / res['seconds']:.3f} steps/s over {res['seconds']:.1f}s"
                      f"{extra}; steady {res['steady']:.3f} steps/s; last logged loss "
                      f"{'n/a' if res['loss_last'] is None else round(res['loss_last'], 4)}; "
                      f"{busy:.2f} cores busy before", flush=True)
        med = {c: statistics.median(a.steps / r["seconds"] for r in results[c]) for c in contestants}
        steady = {c: statistics.median(r["steady"] for r in results[c]) for c in contestants}
        print(f"\nmedian over {a.repeats} round(s):")
        for c in contestants:
            print(f"  {c:12s} {med[c]:.3f} steps/s (steady state {steady[c]:.3f})")
        per_round = {c: [a.steps / r["seconds"] for r in results[c]] for c in contestants}
        print()
        for other in ("trl_default", "trl_tuned"):  # targets: 1.5x both (issue 21: against TRL tuned)
            print(f"posttrain / {other} = {ratio_text(per_round['posttrain'], per_round[other], 1.5)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
