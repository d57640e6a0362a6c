"""SFT training throughput: posttrain vs TRL's SFTTrainer vs a bare PyTorch loop, on CPU.

    python scripts/bench_sft.py                 # default: 3 interleaved repeats, ~8-10 min on 2 cores
    python scripts/bench_sft.py --quick         # smoke run: tiny model, few steps, 1 repeat
    python scripts/bench_sft.py --steps 40 --repeats 3 --skip 2

Run it on a quiet machine: before each contestant the script measures how many
cores are busy (/proc/stat over 3 s) and waits (up to --wait-quiet seconds)
until at most --max-load/2 are; ratios measured while something else trains are
meaningless (each round line prints the busy cores seen before it started).

What every contestant gets (all the same, all fp32, 1 process, OMP/torch threads = --threads):

* Model: one tiny Llama (hidden 256, 4 layers, 4 heads, intermediate 768, ~3.5M
  parameters, character tokenizer, vocab 107) built once with
  ``posttrain_cli.models.tiny.build_tiny`` into a temp dir; every contestant loads it
  from that directory (``model.path=/abs/dir`` for posttrain).
* Data: a seeded synthetic chat set (4000 rows): prompt and answer lengths are
  log-normal, clipped to 20..400 characters (= tokens: the tokenizer is char-level),
  20% of rows have 2-3 user/assistant turns, 10% a system prompt. No row exceeds
  --max-seq-len, so no contestant truncates or drops anything.
* Batches: --global-batch sequences per optimizer step (default 8) as
  --micro-batch (4) x accumulation (2), --steps optimizer steps (30), AdamW
  (betas 0.9/0.999, eps 1e-8, weight decay 0), lr 1e-4 linear decay, no warmup,
  grad-norm clip 1.0. The SAME sequences in the same micro-batches at every step:
  the order is posttrain's own ``StepPlan`` (seed 0); TRL gets the rows in that
  order with ``train_sampling_strategy="sequential"``, the bare loop indexes the
  plan directly. The script checks that all contestants report the same
  non-padding token count per step.
* Loss: cross-entropy on every assistant turn incl. its end-of-turn token, never
  on system/user tokens (posttrain's rule). TRL gets the data as conversational
  ``messages`` with ``assistant_only_loss=True`` and a copy of the tiny chat
  template with ``{% generation %}`` markers around each assistant turn + EOS (it
  renders byte-identically); the worker asserts that TRL's tokenized
  ``input_ids`` and loss positions (``labels`` != -100) equal posttrain's ``tokenize_chat`` output for
  every row. (Prompt/completion rows with completion_only_loss would train only
  the last assistant turn of multi-turn rows, i.e. different tokens.)

Contestants (each run in its own fresh subprocess, so all start equally cold):

1. ``posttrain``: the real CLI, ``posttrain run recipe=<generated yaml> run_dir=...``
   (1 rank, DeepSpeed ZeRO-2 default, fp32, packing default). Per-step time comes
   from RUN_DIR/sft/metrics.jsonl and the loop total from manifest ``train_seconds``.
2. ``trl_default``: ``trl.SFTTrainer`` as a user gets it out of the box (the
   target's baseline): right-padded micro-batches and TRL's default
   ``gradient_checkpointing=True``. Padding tokens are not counted as work.
3. ``trl_tuned``: ``trl.SFTTrainer`` hand-tuned for this hardware, for honesty:
   ``padding_free=True`` and ``gradient_checkpointing=False``. TRL 1.16 documents
   padding-free as FlashAttention-only, but with transformers 5.x the SDPA mask
   builder detects packed ``position_ids`` when no attention_mask and no cache are
   passed (SFTTrainer passes ``use_cache=False``) and builds a block-diagonal
   causal mask, so it is correct on CPU (checked: max |diff| ~1e-7 against
   per-sequence logits). TRL's ``packing=True`` (BFD) was not used: it re-bins
   sequences into max_length blocks, so sequences per step would not match.
4. ``bare``: plain PyTorch, no DeepSpeed/Trainer: the same packed batches posttrain
   builds (``posttrain_cli.data.packing.pack`` with posttrain's varlen SDPA attention
   -- each sequence attends only within itself, no dense T x T mask -- the
   targets/``logits_to_keep`` trick and the chunked head (engine/lm_head.py) of posttrain's SFT
   loss, token-sum loss divided
   by the step's loss tokens), backward per micro-batch, clip_grad_norm_(1.0),
   ``torch.optim.AdamW`` (defaults), zero_grad. The floor of framework overhead.

TRL settings: TRL defaults kept except what matches the batch/steps/lr/precision
and turns off extras: per_device_train_batch_size/gradient_accumulation_steps/
max_steps/learning_rate, ``bf16=False`` (TRL defaults to bf16; everyone runs
fp32), ``use_cpu=True``, ``report_to="none"``, ``save_strategy="no"``,
``train_sampling_strategy="sequential"`` (same batches, see above),
``max_grad_norm=1.0`` and ``weight_decay=0`` (already TRL's defaults), optimizer
left at its default (``adamw_torch_fused``), logging_steps left at 10, tqdm on.
Gradient checkpointing (TRL's default) recomputes every forward pass to save
memory a 3.5M-parameter model does not need; ``trl_tuned`` shows TRL without it.

Throughput = non-padding tokens / seconds, over the steady-state part of the
loop: the first --skip steps (warm-up: allocator, thread pools, first-call
overheads) are dropped from every contestant alike: time runs from the end of
step --skip to the end of the last step. The "all steps" column includes
warm-up for every contestant. Medians over --repeats interleaved rounds (the
contestant order rotates each round).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import (TRL_CPU, add_worker_args, busy_before, length, posttrain_run, ratio_text, rotated,
                      run_in_subprocess, serve_worker, stage_results, step_ends, step_order, text, tiny_model, trl_clock,
                      write_recipe, write_rows)

# The tiny chat template with generation markers around each assistant turn and its EOS,
# so TRL's assistant_only_loss masks exactly what posttrain's tokenize_chat masks.
TRL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# --------------------------------------------------------------------------- data

def make_rows(n: int, seed: int, max_seq_len: int) -> list[dict]:
    """Seeded synthetic chats; rendered length (1 char = 1 token, +1 BOS, +2 per turn) <= max_seq_len."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        msgs = []
        if rng.random() < 0.10:
            msgs.append({"role": "system", "content": text(rng, length(rng, 60, 0.6))})
        turns = 1 if rng.random() < 0.8 else rng.choice([2, 2, 3])
        for _ in range(turns):
            msgs.append({"role": "user", "content": text(rng, length(rng, 70, 0.8))})
            msgs.append({"role": "assistant", "content": text(rng, length(rng, 140, 0.7))})
        if 1 + sum(len(m["content"]) + 2 for m in msgs) <= max_seq_len:
            rows.append({"messages": msgs})
    return rows


def tokenize_all(model_dir: str, rows: list[dict]) -> list[tuple[list[int], list[bool]]]:
    from transformers import AutoTokenizer

    from posttrain_cli.data.chat import tokenize_chat

    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for r in rows:
        t = tokenize_chat(tok, r["messages"])
        out.append((t.input_ids, t.loss_mask))
    return out


# --------------------------------------------------------------------------- workers

def worker_bare(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain_cli.data import packing
    from posttrain_cli.engine.deepspeed_engine import attn_implementation, packed_boundaries
    from posttrain_cli.engine.lm_head import target_logps
    from posttrain_cli.losses import LOSSES
    from posttrain_cli.losses.sft import shifted_targets

    attn = attn_implementation({})  # posttrain's own kernel: the same math, minus the framework
    boundaries = packed_boundaries(attn)
    torch.manual_seed(spec["seed"])
    rows = json.loads(Path(spec["data"]).read_text())
    examples = tokenize_all(spec["model"], rows)
    steps = step_order(len(examples), spec)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation=attn)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / spec["steps"]))
    m = spec["micro_batch"]
    t_start = time.perf_counter()
    ends, toks, losses = [], [], []
    for idx in steps:
        micros = []
        for i in range(0, len(idx), m):
            seqs = [examples[j] for j in idx[i:i + m]]
            b = packing.pack(seqs, boundaries, torch.float32)
            targets = shifted_targets(b.pop("labels"))
            keep = targets != packing.IGNORE
            micros.append((b, targets, keep, sum(len(s) for s, _ in seqs)))
        weight = float(sum(int(k.sum()) for _, _, k, _ in micros))
        total = 0.0
        for b, targets, keep, _ in micros:
            positions = keep[0].nonzero().squeeze(-1)
            logps, _ = target_logps(model, b, targets[0, positions], positions)
            loss_sum, _ = LOSSES["sft"](logps, targets[0, positions])
            (loss_sum / weight).backward()
            total += float(loss_sum.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
        toks.append(sum(t for *_, t in micros))
        losses.append(total / weight)
    return {"t_start": t_start, "ends": ends, "tokens": toks, "loss_first": losses[0], "loss_last": losses[-1]}


def checked_token_clock(trainer, model, examples: list, order: list[int]):
    """For a TRL SFTTrainer: check its tokens and loss positions equal posttrain's, row for row
    (examples: tokenize_all's; order: the rows in training order), count the non-padding tokens each
    step feeds `model`, and add a clock -> (the clock, the per-step token counts it fills)."""
    tds = trainer.train_dataset
    for k, i in enumerate(order):
        ids, mask = examples[i]
        got = tds[k]
        assert list(got["input_ids"]) == ids, f"row {i}: TRL input_ids differ from posttrain's"
        assert [x != -100 for x in got["labels"]] == mask, f"row {i}: TRL loss positions differ"

    counted = {"tokens": 0}

    def count(_module, args_, kwargs):
        am = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        counted["tokens"] += int(am.sum()) if am is not None else int(ids.numel())

    model.register_forward_pre_hook(count, with_kwargs=True)
    tokens = []

    def step_tokens():
        tokens.append(counted["tokens"])
        counted["tokens"] = 0

    clock = trl_clock(step_tokens)
    trainer.add_callback(clock)
    return clock, tokens


def worker_trl(spec: dict, padding_free: bool, gradient_checkpointing: bool, logging_steps: int = 10) -> dict:
    import torch
    from datasets import Dataset
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
        output_dir=out_dir,
        per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=spec["global_batch"] // spec["micro_batch"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        **TRL_CPU,
        gradient_checkpointing=gradient_checkpointing,
        train_sampling_strategy="sequential",
        assistant_only_loss=True,
        padding_free=padding_free,
        # padding-free without packing requires max_length=None (no row exceeds max_seq_len anyway)
        max_length=None if padding_free else spec["max_seq_len"],
        seed=spec["seed"],
        logging_steps=logging_steps,
    )
    trainer = SFTTrainer(model=spec["model"], args=args, train_dataset=ds, processing_class=tok)
    model = trainer.model
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation

    clock, tokens = checked_token_clock(trainer, model, examples, order)
    result = trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"t_start": clock.t_start, "ends": clock.ends, "tokens": tokens,
            "loss_first": logs[0]["loss"] if logs else None, "loss_last": logs[-1]["loss"] if logs else None,
            "train_runtime": result.metrics.get("train_runtime")}


def run_worker(kind: str, spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if kind == "bare":
        return worker_bare(spec)
    if kind == "trl_default":
        return worker_trl(spec, padding_free=False, gradient_checkpointing=True)
    if kind == "trl_tuned":
        return worker_trl(spec, padding_free=True, gradient_checkpointing=False)
    raise ValueError(kind)


# --------------------------------------------------------------------------- driver

def sft_recipe(tmp: Path, spec: dict) -> Path:
    return write_recipe(tmp, spec["model"], "sft", f"""
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
        """)


def run_posttrain(spec: dict, tmp: Path, rnd: int) -> dict:
    run_dir = tmp / f"pt-run-{rnd}"
    posttrain_run(spec["recipe"], run_dir, spec["threads"], tmp)
    m, rows = stage_results(run_dir, "sft")
    assert len(rows) == spec["steps"], f"posttrain logged {len(rows)} steps, expected {spec['steps']}"
    # A timeline on the same clock as the workers: the loop's total wall time (manifest
    # train_seconds) ends at the last step; per-step durations from metrics.jsonl.
    ends = step_ends(rows, m["train_seconds"])
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"t_start": 0.0, "ends": ends, "tokens": [int(r["tokens"]) for r in rows],
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
            "manifest_tokens_per_s": m["tokens_per_s"], "manifest_tokens": m["tokens"]}


def throughput(res: dict, skip: int) -> tuple[float, float]:
    ends, toks = res["ends"], res["tokens"]
    steady = sum(toks[skip:]) / (ends[-1] - ends[skip - 1]) if skip > 0 else sum(toks) / (ends[-1] - res["t_start"])
    allsteps = sum(toks) / (ends[-1] - res["t_start"])
    return steady, allsteps


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the steady-state time")
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step (default 8)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per micro-batch (default 4)")
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl", choices=["default", "tuned", "both"], default="both",
                    help="TRL data path(s) to measure (default padding_free; see the docstring)")
    ap.add_argument("--only", default=None,
                    help="comma list of contestants to run (posttrain,trl_default,trl_tuned,bare)")
    ap.add_argument("--max-load", type=float, default=1.0,
                    help="wait while more than max-load/2 cores are busy before each contestant")
    ap.add_argument("--wait-quiet", type=float, default=300, help="seconds to wait for load < --max-load")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: small model, 2 steps of rows up to 256 tokens, 1 repeat, no waiting")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    add_worker_args(ap)
    a = ap.parse_args()
    if serve_worker(a, run_worker):
        return

    if a.quick:
        a.steps, a.repeats, a.skip = min(a.steps, 2), 1, min(a.skip, 1)
        a.rows, a.max_seq_len, a.wait_quiet = min(a.rows, 64), min(a.max_seq_len, 256), 0
    if a.global_batch % a.micro_batch:
        ap.error("--global-batch must be a multiple of --micro-batch")
    if not 0 <= a.skip < a.steps:
        ap.error("--skip must be in [0, steps)")

    trl = {"default": ["trl_default"], "tuned": ["trl_tuned"], "both": ["trl_default", "trl_tuned"]}[a.trl]
    contestants = ["posttrain", *trl, "bare"]
    if a.only:
        contestants = [c for c in a.only.split(",") if c]

    import torch

    torch.set_num_threads(a.threads)

    tmp = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    try:
        model_dir, arch = tiny_model(tmp, a.quick)
        n_params = sum(p.numel() for p in
                       __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir).parameters())
        rows = make_rows(a.rows, 0, a.max_seq_len)
        spec = {"model": str(model_dir), **write_rows(tmp, rows), "steps": a.steps, "global_batch": a.global_batch,
                "micro_batch": a.micro_batch, "max_seq_len": a.max_seq_len, "lr": a.lr, "seed": 0,
                "threads": a.threads, "tmp": str(tmp)}
        spec["recipe"] = str(sft_recipe(tmp, spec))

        examples = tokenize_all(str(model_dir), rows)
        lens = sorted(len(i) for i, _ in examples)
        plan = step_order(len(examples), spec)
        per_step = [sum(len(examples[i][0]) for i in s) for s in plan]
        print(f"model: tiny Llama {arch} -> {n_params / 1e6:.2f}M params, fp32; attention: posttrain + bare use posttrain_sdpa (varlen), TRL uses sdpa")
        print(f"data: {len(rows)} rows, tokens/row median {lens[len(lens) // 2]}, p10 {lens[len(lens) // 10]}, "
              f"p90 {lens[9 * len(lens) // 10]}, max {lens[-1]}; "
              f"{sum(1 for r in rows if sum(m['role'] == 'assistant' for m in r['messages']) > 1)} multi-turn")
        print(f"batch: {a.steps} steps x {a.global_batch} seqs ({a.micro_batch} micro x "
              f"{a.global_batch // a.micro_batch} accum), ~{statistics.mean(per_step):.0f} tokens/step; "
              f"threads {a.threads}; warm-up steps skipped: {a.skip}")
        print(f"contestants: {', '.join(contestants)}")
        print(f"load average now: {os.getloadavg()}")

        results: dict[str, list] = {c: [] for c in contestants}
        for rnd in range(a.repeats):
            for c in rotated(contestants, rnd):
                busy0 = busy_before(a.max_load, a.wait_quiet)
                t0 = time.perf_counter()
                res = run_posttrain(spec, tmp, rnd) if c == "posttrain" else \
                    run_in_subprocess(c, spec, tmp, rnd, script=__file__)
                wall = time.perf_counter() - t0
                if res["tokens"] != per_step:
                    raise SystemExit(f"{c}: per-step tokens {res['tokens'][:5]}... differ from the plan's "
                                     f"{per_step[:5]}...: not the same batches")
                steady, allsteps = throughput(res, a.skip)
                results[c].append((steady, allsteps))
                print(f"  round {rnd + 1} {c:>10}: {steady:8.0f} tok/s steady, {allsteps:8.0f} all steps; "
                      f"loss {_f(res['loss_first'])} -> {_f(res['loss_last'])}; process {wall:5.1f}s; "
                      f"busy before {busy0:.2f} cores", flush=True)

        med = {c: (statistics.median(s for s, _ in v), statistics.median(x for _, x in v))
               for c, v in results.items()}
        print("\nmedian non-padding tokens/s (steady = after warm-up steps; all = every step)")
        for c in contestants:
            print(f"  {c:>10}: steady {med[c][0]:8.0f}   all {med[c][1]:8.0f}   "
                  f"runs: {', '.join(f'{s:.0f}' for s, _ in results[c])}")
        if "posttrain" in med:
            # targets: issue 21 (>= 1.3x TRL tuned, <= 5% overhead over the bare loop); the older
            # 1.5x against TRL's defaults
            for other, target in (("trl_default", 1.5), ("trl_tuned", 1.3), ("bare", 0.95)):
                if other in med:
                    steady = ratio_text([s for s, _ in results["posttrain"]], [s for s, _ in results[other]],
                                        target, unit=" steady")
                    r_all = med["posttrain"][1] / med[other][1]
                    print(f"  posttrain/{other}: {steady}; all steps {r_all:.2f}x")
    finally:
        if a.keep:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
