"""GRPO optimizer steps per second: posttrain vs TRL's GRPOTrainer, on CPU, one run.

    python scripts/bench_grpo.py                 # 3 interleaved rounds (estimated 10-14 min on 2 quiet cores)
    python scripts/bench_grpo.py --quick         # smoke run: small model, 2 steps of 2 x 2 x 16 tokens, 1 round
    scripts/vllm_env.sh python scripts/bench_grpo.py --vllm   # both sides sampling with vLLM (its CPU build)

Run it on a quiet machine (the script waits, like every benchmark here, until at
most --max-load/2 cores are busy before each contestant). With --threads 2 and one
core taken by something else, every contestant runs ~10x slower (OpenMP threads
wait for each other: a batch-64 decode step went from ~20 ms to ~200 ms), so
ratios from a busy machine say nothing.

Every contestant gets the same (fp32, 1 process, --threads threads, HF
``generate`` with a KV cache on both sides, no vLLM):

* Model: a tiny Llama (hidden 256, 4 layers, ~3.5M parameters, character
  tokenizer, vocab 107) built once with ``posttrain_cli.models.tiny.build_tiny``.
* Prompts: --steps x --prompts seeded synthetic sums, one user turn
  "Add the two numbers and reply with the sum only: 4821 + 1377 = ?" (four-digit
  operands, so every prompt is the same 64 characters = 68 tokens with the chat
  template: which prompts land in which step does not change the work), ground
  truth the sum. The TRL worker checks that TRL's prompt token ids equal
  posttrain's ``prompt_ids(tokenizer, messages)`` for every prompt.
* Rollout: --prompts prompts x --generations completions per step (a group per
  prompt), all in ONE generate call (posttrain ``rollout_batch_size`` = TRL's
  default ``generation_batch_size`` = prompts x generations), up to
  --max-new-tokens, temperature 1.0, top_p 1.0, top_k off (posttrain passes
  ``top_k=0``, TRL ``top_k=0``), stop at the tokenizer's EOS on both sides.
  The model is untrained, its next-token distribution near uniform over 107
  tokens, so completions stop at EOS at random: at the defaults ~80% stop before
  128 tokens and the mean length is ~60-75 tokens, EOS included (the table shows
  each side's measured mean and EOS rate). A batch runs until its longest
  completion is done, so generation takes the full --max-new-tokens decode steps
  on both sides; the update's work follows the actual lengths.
* Reward: posttrain's ``number`` verifier (``posttrain_cli.rewards.VERIFIERS``):
  posttrain through its dispatcher (per-call timeout), TRL as a plain reward
  function around the same verifier. Rewards are all 0 (untrained model), so
  advantages, loss and gradients are 0: fine for throughput, since forward,
  backward and the optimizer step all still run on both sides.
* Update: one optimizer update per rollout (posttrain ``mini_batches: 1``; TRL
  ``steps_per_generation`` = ``gradient_accumulation_steps`` = prompts x
  generations / --micro-batch, ``num_iterations`` 1), --micro-batch sequences per
  forward/backward; group-std advantages (TRL ``scale_rewards="group"``), PPO
  clip 0.2 both sides, beta 0 (no reference model, TRL's default), GRPO's loss:
  each sequence's token mean, then the mean over sequences (posttrain's default
  ``loss_agg: seq_mean_token_mean`` = TRL ``loss_type="grpo"``; TRL's default
  "dapo" is posttrain's token_mean; either pair is the same loss and the cost is
  the same), AdamW lr 1e-6 linear decay, no warm-up, grad clip 1.0, weight decay 0,
  dropout 0.

Contestants (each a fresh subprocess):

1. ``posttrain``: the CLI, one ``grpo`` stage: sampling log-probs recorded while
   generating (no extra forward), each micro-batch packed into one padding-free
   row, logits only at completion tokens, DeepSpeed ZeRO-2 (posttrain's default).
2. ``trl_default``: ``trl.GRPOTrainer`` as shipped for these settings: right-
   padded micro-batches, gradient checkpointing on (TRL's default). On-policy
   (one update per generation batch), so TRL skips its old-log-prob forward
   too. This is the target's baseline.
3. ``trl_tuned``: the same with gradient checkpointing off: TRL set up fairly
   for this hardware (nothing else in GRPOConfig helps here: no padding-free or
   packing option for GRPO, ``pad_to_multiple_of`` is already off on CPU,
   dropout is already 0, and vLLM / continuous batching are not HF generate).

With --vllm (in an environment with vLLM: on CPU scripts/vllm_env.sh) the contestants are
instead both sides sampling with vLLM, everything else as above:

4. ``posttrain_vllm``: the same ``grpo`` stage with ``rollout.backend: vllm`` (an in-process
   engine next to the DeepSpeed one, the policy's weights loaded into it after every update,
   1 GiB of KV cache, torch.compile on), so it also recomputes the trainer's log-probs of each
   rollout for its truncated importance weight (``is_cap``).
5. ``trl_vllm``: ``trl.GRPOTrainer`` with ``use_vllm=True, vllm_mode="colocate"``, gradient
   checkpointing off (as trl_tuned), the same 1 GiB of KV cache (VLLM_CPU_KVCACHE_SPACE); TRL's
   importance-sampling correction (``vllm_importance_sampling_correction``) stays at its default, on,
   so it recomputes log-probs too. TRL 1.16 supports vLLM up to 0.31; for 0.32 its weight sync
   goes through vLLM's reload_weights (``_trl_sync_for_vllm_032``), the same tensors.

Time = training from its start (posttrain: its loop; TRL: ``on_train_begin``) to
the end of each optimizer step (posttrain: per-step times from the stage's
metrics.jsonl, TRL: an ``on_step_end`` callback); a step includes its rollout
(generate + score + advantages). Model loading, tokenization, the final save
(posttrain) are left out. Steps/s = (steps - --skip) / (time from the end of
step --skip to the end of the last step): warm-up steps are dropped for both
sides alike; the "all steps" figure keeps them. Rollout s/step is each side's
own: posttrain's ``rollout_seconds``, TRL's ``_generate_and_score_completions``
timed by the worker. Medians over --repeats rounds; the contestant order rotates
each round.
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

from benchlib import (TRL_CPU, add_worker_args, busy_before, posttrain_run, rotated, run_in_subprocess, serve_worker,
                      stage_results, step_ends, steps_per_s, target_met, tiny_model, trl_clock, write_recipe,
                      write_rows)

LR, CLIP, VERIFIER = 1e-6, 0.2, "number"
# The same loss on both sides: GRPO's per-sequence token mean, then the mean over sequences
# (posttrain's default; TRL's loss_type "grpo"). TRL's default "dapo" is posttrain's token_mean.
POSTTRAIN_LOSS, TRL_LOSS = "seq_mean_token_mean", "grpo"


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
        rows.append({"messages": [{"role": "user",
                                   "content": f"Add the two numbers and reply with the sum only: {a} + {b} = ?"}],
                     "ground_truth": str(a + b), "dataset": "bench_sum"})
    return rows


def posttrain_prompt_ids(model_dir: str, rows: list[dict]) -> list[list[int]]:
    from transformers import AutoTokenizer

    from posttrain_cli.data.chat import prompt_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [prompt_ids(tok, r["messages"]) for r in rows]


# --------------------------------------------------------------------------- TRL worker

def worker_trl(spec: dict, tuned: bool, vllm: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from posttrain_cli.rewards import VERIFIERS

    torch.set_num_threads(spec["threads"])
    rows = json.loads(Path(spec["data"]).read_text())
    ds = Dataset.from_list([{"prompt": r["messages"], "ground_truth": r["ground_truth"]} for r in rows])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    seqs_per_step = spec["prompts"] * spec["generations"]
    verify = VERIFIERS[VERIFIER]
    lengths: list[tuple[int, int, int]] = []  # per rollout: completion tokens (EOS included), EOS count, completions

    def number_reward(completions, ground_truth, completion_ids, **_):
        lengths.append((sum(len(c) for c in completion_ids),
                        sum(bool(c) and c[-1] == tok.eos_token_id for c in completion_ids), len(completion_ids)))
        return [verify(c[0]["content"], gt, {"ground_truth": gt}) for c, gt in zip(completions, ground_truth)]

    if vllm:
        _trl_sync_for_vllm_032()
    out_dir = tempfile.mkdtemp(prefix="bench-trl-", dir=spec["tmp"])
    args = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=spec["micro_batch"],
        gradient_accumulation_steps=seqs_per_step // spec["micro_batch"], max_steps=spec["steps"],
        num_generations=spec["generations"], max_completion_length=spec["max_new_tokens"],
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type=TRL_LOSS, scale_rewards="group",
        epsilon=CLIP, learning_rate=LR, lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0,
        **TRL_CPU, seed=spec["seed"], gradient_checkpointing=not tuned,
        **(dict(use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=False,
                vllm_max_model_length=spec["max_seq_len"]) if vllm else dict(use_vllm=False)),
    )
    # One optimizer step = one generation batch of prompts x generations completions, used once.
    assert args.generation_batch_size == seqs_per_step and args.steps_per_generation == args.gradient_accumulation_steps
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=number_reward, args=args, train_dataset=ds,
                          processing_class=tok)
    assert next(trainer.model.parameters()).dtype == torch.float32
    assert trainer.eos_token_ids == [tok.eos_token_id], trainer.eos_token_ids
    if not vllm:
        assert trainer.generation_config.top_k in (0, None) and trainer.generation_config.top_p == 1.0
    # Same prompt tokens as posttrain, prompt for prompt.
    got = trainer._tokenize_prompts([r["messages"] for r in rows])[0]
    want = posttrain_prompt_ids(spec["model"], rows)
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert list(g) == w, f"prompt {k}: TRL prompt tokens differ from posttrain's"

    rollout: list[float] = []
    generate_and_score = trainer._generate_and_score_completions

    def timed(batch):
        t = time.perf_counter()
        try:
            return generate_and_score(batch)
        finally:
            rollout.append(time.perf_counter() - t)

    trainer._generate_and_score_completions = timed

    clock = trl_clock()
    trainer.add_callback(clock)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(out_dir, ignore_errors=True)
    assert len(rollout) == len(clock.ends) and all(n == seqs_per_step for *_, n in lengths), (rollout, lengths)
    return {"t_start": clock.t_start, "ends": clock.ends, "rollout_seconds": rollout,
            "completion_tokens": [t for t, _, _ in lengths], "eos_rate": [e / n for _, e, n in lengths],
            "loss_last": logs[-1]["loss"] if logs else None}


def _trl_sync_for_vllm_032() -> None:
    """TRL 1.16 supports vLLM 0.22-0.31; on 0.32 (the CPU build here) its colocate weight sync,
    model.load_weights one parameter at a time, fails after the engine has processed its weights
    ("'Parameter' object has no attribute 'weight_loader'"). 0.32 reloads weights into a running
    engine through the worker's reload_weights: the same tensors, from TRL's own iterator, go that
    way (one call per sync instead of one per parameter); the rest of TRL's sync is unchanged."""
    from trl.generation.vllm_generation import VLLMGeneration

    shipped = VLLMGeneration.sync_weights

    def sync_weights(self):
        if self.mode != "colocate" or self.enable_sleep_mode:
            return shipped(self)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._iter_named_params(),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()

    VLLMGeneration.sync_weights = sync_weights


# --------------------------------------------------------------------------- posttrain

def run_posttrain(spec: dict, tmp: Path, rnd: int, vllm: bool = False) -> dict:
    run_dir = tmp / f"pt-run-{rnd}"
    seqs_per_step = spec["prompts"] * spec["generations"]
    # --quick: no torch.compile (a start in seconds)
    rollout = f"rollout: {{backend: vllm, kv_cache_gb: 1.0, enforce_eager: {str(spec['eager']).lower()}}}\n"
    recipe = write_recipe(tmp, spec["model"], "grpo", f"""
        kind: grpo
        data: [{{path: {spec['data_jsonl']}}}]
        verifier: {VERIFIER}
        prompts_per_step: {spec['prompts']}
        num_generations: {spec['generations']}
        max_new_tokens: {spec['max_new_tokens']}
        temperature: 1.0
        top_p: 1.0
        rollout_batch_size: {seqs_per_step}
        mini_batches: 1
        beta: 0.0
        adv_norm: group_std
        loss_agg: {POSTTRAIN_LOSS}
        clip_low: {CLIP}
        clip_high: {CLIP}
        lr: {LR}
        schedule: linear
        warmup_ratio: 0.0
        weight_decay: 0.0
        grad_clip: 1.0
        max_steps: {spec['steps']}
        micro_batch_size: {spec['micro_batch']}
        max_seq_len: {spec['max_seq_len']}
        """, top="logging: {progress: never}\n" + (rollout if vllm else ""))
    posttrain_run(recipe, run_dir, spec["threads"], tmp)
    m, rows = stage_results(run_dir, "grpo")
    # Per-step durations (rollout included) from the loop's own clock; the loop's total
    # (manifest train_seconds) also holds its per-step logging, spread over the steps.
    ends = step_ends(rows, m["train_seconds"])
    shutil.rmtree(run_dir, ignore_errors=True)
    n = spec["prompts"] * spec["generations"]
    return {"t_start": 0.0, "ends": ends, "rollout_seconds": [r["rollout_seconds"] for r in rows],
            "completion_tokens": [round(r["response_length"] * n) for r in rows],
            "eos_rate": [r["eos_rate"] for r in rows], "loss_last": rows[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the steady-state figure")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (the group)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=1.0)
    ap.add_argument("--wait-quiet", type=float, default=300)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: small model, 2 steps of 2 x 2 completions of 16 tokens, 1 round, no waiting; "
                         "with --vllm posttrain's engine eager (TRL's has no such setting)")
    ap.add_argument("--vllm", action="store_true",
                    help="contestants sampling with vLLM: posttrain rollout.backend=vllm vs TRL vllm_mode=colocate")
    add_worker_args(ap)
    a = ap.parse_args()
    if serve_worker(a, lambda kind, spec: worker_trl(spec, tuned=kind != "trl_default", vllm=kind == "trl_vllm")):
        return
    if a.quick:
        a.steps, a.repeats, a.skip, a.wait_quiet = 2, 1, 1, 0
        a.prompts, a.generations, a.max_new_tokens, a.micro_batch = 2, 2, 16, 4
    if (a.prompts * a.generations) % a.micro_batch:
        ap.error("--prompts x --generations must be a multiple of --micro-batch")
    if not 0 <= a.skip < a.steps:
        ap.error("--skip must be in [0, steps)")

    tmp = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    try:
        model_dir, arch = tiny_model(tmp, a.quick)
        rows = make_rows(a.steps * a.prompts, 0)
        spec = {"model": str(model_dir), **write_rows(tmp, rows), "steps": a.steps, "prompts": a.prompts,
                "generations": a.generations, "max_new_tokens": a.max_new_tokens, "micro_batch": a.micro_batch, "max_seq_len": a.max_seq_len,
                "seed": 0, "threads": a.threads, "skip": a.skip, "tmp": str(tmp), "eager": a.quick}
        lens = sorted({len(p) for p in posttrain_prompt_ids(str(model_dir), rows)})
        if lens[-1] + a.max_new_tokens > a.max_seq_len:
            ap.error(f"--max-seq-len {a.max_seq_len} < prompt {lens[-1]} + --max-new-tokens {a.max_new_tokens}")
        seqs = a.prompts * a.generations
        print(f"model: tiny Llama {arch}, fp32; {len(rows)} prompts of {'/'.join(map(str, lens))} tokens")
        print(f"step: {a.prompts} prompts x {a.generations} completions = {seqs} sequences, one generate call, "
              f"<= {a.max_new_tokens} new tokens; {a.micro_batch} per micro-batch x {seqs // a.micro_batch} "
              f"accumulation, 1 update; {a.steps} steps ({a.skip} warm-up); threads {a.threads}")
        if a.vllm:
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                ap.error("--vllm: vLLM is not installed here (on CPU: scripts/vllm_env.sh python scripts/bench_grpo.py --vllm)")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # trl_vllm's KV cache, GiB (posttrain: kv_cache_gb)
        contestants = ["posttrain_vllm", "trl_vllm"] if a.vllm else ["posttrain", "trl_default", "trl_tuned"]
        results: dict[str, list] = {c: [] for c in contestants}
        for rnd in range(a.repeats):
            for c in rotated(contestants, rnd):
                busy = busy_before(a.max_load, a.wait_quiet)
                res = run_posttrain(spec, tmp, rnd, vllm=c.endswith("vllm")) if c.startswith("posttrain") else \
                    run_in_subprocess(c, spec, tmp, rnd, script=__file__)
                assert len(res["ends"]) == a.steps, (c, len(res["ends"]))
                res["steady"], res["all"] = steps_per_s(res["ends"], res["t_start"], a.skip)
                res["rollout"] = statistics.mean(res["rollout_seconds"][a.skip:])
                res["length"] = sum(res["completion_tokens"]) / (seqs * a.steps)
                res["eos"] = statistics.mean(res["eos_rate"])
                results[c].append(res)
                loss = "n/a" if res["loss_last"] is None else f"{res['loss_last']:.4g}"
                print(f"round {rnd + 1} {c:12s} {res['steady']:.3f} steps/s steady, {res['all']:.3f} all steps; "
                      f"rollout {res['rollout']:.2f}s/step; completions mean {res['length']:.1f} tokens, "
                      f"EOS {res['eos']:.0%}; last logged loss {loss}; {busy:.2f} cores busy before", flush=True)
        keys = ("steady", "all", "rollout", "length", "eos")
        med = {c: {k: statistics.median(r[k] for r in results[c]) for k in keys} for c in contestants}
        print(f"\nmedian over {a.repeats} round(s):")
        print(f"  {'':12s} {'steps/s':>8s} {'all steps':>10s} {'step s':>7s} {'rollout s':>10s} "
              f"{'mean len':>9s} {'EOS':>5s}")
        for c in contestants:
            v = med[c]
            print(f"  {c:12s} {v['steady']:8.3f} {v['all']:10.3f} {1 / v['steady']:7.2f} {v['rollout']:10.2f} "
                  f"{v['length']:9.1f} {v['eos']:5.0%}")
        if a.vllm:
            r = med["posttrain_vllm"]["steady"] / med["trl_vllm"]["steady"]
            print(f"\nposttrain_vllm / trl_vllm = {r:.2f}x   ({target_met(r, 1.3)})")
        else:
            r = med["posttrain"]["steady"] / med["trl_default"]["steady"]
            print(f"\nposttrain / trl_default = {r:.2f}x   ({target_met(r, 1.3)})")
            print(f"posttrain / trl_tuned   = {med['posttrain']['steady'] / med['trl_tuned']['steady']:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
