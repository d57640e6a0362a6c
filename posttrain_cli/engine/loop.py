"""The training-loop skeleton every training stage shares, and its batching.

A stage supplies the micro-batches of each optimizer step (this rank's
share), each carrying its weight (loss tokens for SFT, pairs for DPO, rows
for a reward model, the loss aggregation's unit for RL), and a loss function
returning a *sum* over a micro-batch; the loop divides by the weight summed
over the whole global batch, all ranks, so gradients do not depend on how
the batch is split into ranks and accumulation steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from typing import Callable

from posttrain_cli.engine import dist, regional_compile
from posttrain_cli.engine.checkpoint import Checkpoints, Preempted, StopSignals, latest
from posttrain_cli.errors import Diverged, UserError


class StepPlan:
    """Which examples each optimizer step sees: seeded epoch shuffles, global_batch_size per step.

    Step s takes the next global_batch_size examples; they split into micro-batches
    dealt round-robin to ranks, so every rank count sees the same examples per step.
    """

    def __init__(self, n: int, batch: dict, seed: int):
        self.n, self.batch, self.seed = n, batch, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    def step(self, s: int) -> list[int]:
        g = self.batch["global_batch_size"]
        return [self._order(i // self.n)[i % self.n] for i in range(s * g, (s + 1) * g)]

    def micro_indices(self, s: int, rank: int, world: int) -> list[list[int]]:
        idx, m = self.step(s), self.batch["micro_batch_size"]
        chunks = [idx[i:i + m] for i in range(0, len(idx), m)]
        return chunks[rank::world]


def total_steps(cfg: dict, n: int, where: str, unit: str = "examples", per_step: str = "global_batch_size") -> int:
    """max_steps, else epochs x n / cfg[per_step] (RL stages count prompts_per_step)."""
    if cfg["max_steps"] is not None:
        return cfg["max_steps"]
    steps = int(cfg["epochs"] * n // cfg[per_step])
    if steps < 1:
        raise UserError(f"{where}: {n} {unit} make no optimizer step of {per_step} {cfg[per_step]} in {cfg['epochs']} "
                        f"epoch(s); lower {per_step} or set max_steps")
    return steps


def forward_chunks(n: int, size: int) -> list[list[int] | None]:
    """This rank's share of n items in chunks of `size`, padded with None so every rank
    makes the same number of forward calls (ZeRO-3 gathers parameters collectively)."""
    mine = list(range(dist.rank(), n, dist.world()))
    calls = math.ceil(math.ceil(n / dist.world()) / size)
    chunks: list[list[int] | None] = [mine[i:i + size] for i in range(0, len(mine), size)]
    return chunks + [None] * (calls - len(chunks))


def train(ctx, engine, *, total_steps: int, micro_batches: Callable[[int], list[dict]],
          loss_fn: Callable[[object, dict], tuple], what: str = "train",
          step_metrics: Callable[[int], dict] | None = None, unit: int = 1, state=None) -> dict:
    """micro_batches(step) -> this rank's micro-batches, each with 'weight' and 'tokens'.
    loss_fn(module, micro) -> (loss_sum tensor, extra metric sums: floats weighted like the loss).
    Extras are logged divided by the global weight, like the loss. step_metrics(step), called
    after micro_batches(step), adds figures that are already global (RL: the rollout's reward).

    Checkpoints (engine/checkpoint.py) fall every `save_every` x `unit` steps (RL: `unit` optimizer
    updates per rollout step; a checkpoint only between rollouts) and on SIGUSR1 / SIGTERM, after
    which the loop raises Preempted. `state` (state_dict / load_state_dict) is the stage's own part
    of a checkpoint. A checkpoint a killed run of this stage left is resumed from.

    A step whose loss or gradient norm is non-finite counts; more than the stage's
    `nonfinite_patience` in a row (or any left at the end) raise Diverged: no checkpoint is written
    while such a streak lasts, so the last good one stays, and the stage publishes nothing. Where
    no gradient norm is reported (DeepSpeed's fp16 / bf16 at ZeRO-0), the weights themselves are
    checked after every step, and before every checkpoint in any case; non-finite weights stop the
    stage at once. The flags travel in the per-step all-reduce: every rank stops at the same step."""
    world = dist.world()
    log_every = ctx.run["logging"]["log_every"]
    ckpt = Checkpoints(ctx, engine, total=total_steps, unit=unit, state=state)
    resumed = ckpt.resume() or {}
    first = resumed.get("step", 0)
    _trim_metrics(ctx, first)
    bar = ctx.progress(total_steps, what)
    history: list[dict] = resumed.get("history", [])
    tokens_total = resumed.get("tokens", 0.0)
    start = time.perf_counter() - resumed.get("seconds", 0.0)
    patience = ctx.cfg.get("nonfinite_patience", 0)
    streak = 0  # non-finite steps in a row
    engine.train()
    try:
        with StopSignals() as signals:
            for step in range(first, total_steps):
                t0 = time.perf_counter()
                micros = micro_batches(step)
                weight, tokens = dist.all_sum([sum(m["weight"] for m in micros), sum(m["tokens"] for m in micros)])
                loss_sum_local = 0.0
                extras: dict[str, float] = {}
                for micro in micros:
                    loss_sum, extra = loss_fn(engine, micro)
                    # DeepSpeed averages gradients over ranks; * world undoes that.
                    engine.backward(loss_sum * (world / max(weight, 1e-12)), scale_wrt_gas=False)
                    engine.step()
                    loss_sum_local += float(loss_sum.detach())
                    for k, v in extra.items():
                        extras[k] = extras.get(k, 0.0) + float(v)
                grad_norm = _grad_norm(engine)
                # Every rank reports the same extras keys (stages build them unconditionally). The
                # last three numbers count ranks whose gradient norm is non-finite, whose weights are
                # (checked here only without a norm), and that got a stop signal: every rank decides
                # at the same step.
                sums = dist.all_sum([loss_sum_local, *extras.values(), float(_bad_grads(engine, grad_norm)),
                                     float(grad_norm is None and not weights_finite(engine)),
                                     float(signals.received is not None)])
                stop = sums.pop() > 0
                weights_bad = sums.pop() > 0
                grads_bad = sums.pop() > 0
                means = {"loss": sums[0] / max(weight, 1e-12),
                         **{k: v / max(weight, 1e-12) for k, v in zip(extras, sums[1:])},
                         **(step_metrics(step) if step_metrics else {})}
                history.append(means)
                tokens_total += tokens
                dt = time.perf_counter() - t0
                row = {"step": step + 1, "loss": means["loss"], "lr": engine.get_lr()[0],
                       "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / dt,
                       **{k: v for k, v in means.items() if k != "loss"}}
                what = nonfinite(means["loss"], grad_norm, grads_bad, weights_bad)
                if (step + 1) % log_every == 0 or step + 1 == total_steps or what:
                    ctx.log_metrics(row)
                shown = {"loss": means["loss"], **({"reward": means["reward"]} if "reward" in means else {})}
                bar.update(step + 1, {**shown, "tok/s": round(tokens / dt)})
                done = step + 1
                streak = streak + 1 if what else 0
                if what:
                    ctx.log.warning("step %d: %s (%d non-finite in a row, nonfinite_patience %d)",
                                    done, what, streak, patience)
                    if weights_bad:  # non-finite weights do not recover: patience has nothing to wait for
                        raise Diverged(diverged_message(ctx, what, done, total_steps, unit, 1, 0))
                    if streak > patience:
                        raise Diverged(diverged_message(ctx, what, done, total_steps, unit, streak, patience))
                if done < total_steps and done % unit == 0 and (stop or ckpt.due(done)):
                    if streak:
                        # The weights may be diverged: never over the last good checkpoint.
                        if stop:
                            raise Preempted(signals.received or "a signal on another rank", done // unit,
                                            total_steps // unit, latest(ctx.stage_dir), saved=False)
                        continue
                    if dist.all_sum([float(not weights_finite(engine))])[0] > 0:
                        what = nonfinite(means["loss"], grad_norm, grads_bad, True)
                        raise Diverged(diverged_message(ctx, what, done, total_steps, unit, 1, 0))
                    path = ckpt.save(done, {"step": done, "history": history, "tokens": tokens_total,
                                            "seconds": time.perf_counter() - start})
                    if stop:
                        raise Preempted(signals.received or "a signal on another rank", done // unit,
                                        total_steps // unit, path)
            if streak:
                raise Diverged(diverged_message(ctx, what, total_steps, total_steps, unit, streak, patience,
                                                at_end=True))
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    # Final figures: means over the last tenth of the steps (single steps are noisy).
    tail = history[-max(1, len(history) // 10):]
    final = {k: sum(h[k] for h in tail) / len(tail) for k in (tail[0] if tail else {})}
    return {"steps": total_steps, **final, "first_loss": history[0]["loss"] if history else None,
            "tokens": int(tokens_total), "tokens_per_s": tokens_total / elapsed, "train_seconds": elapsed,
            **regional_compile.stats()}


def _trim_metrics(ctx, step: int) -> None:
    """metrics.jsonl keeps the rows up to the step a run starts (or resumes) from."""
    if not dist.is_main():
        return
    path = ctx.stage_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def nonfinite(loss: float, grad_norm: float | None, grads_bad: bool, weights_bad: bool = False) -> str | None:
    """What went non-finite in a step, as the error names it, or None. `grads_bad`, `weights_bad`:
    some rank's gradient norm or weights are (all-reduced flags; this rank's own may be fine)."""
    if not math.isfinite(loss):
        return f"loss {loss}"
    if grads_bad:
        return f"gradient norm {grad_norm}" if grad_norm is not None and not math.isfinite(grad_norm) \
            else "gradient norm non-finite (on another rank)"
    if weights_bad:
        return "weights nan or inf after the update"
    return None


def diverged_message(ctx, what: str, done: int, total: int, unit: int, streak: int, patience: int, *,
                     at_end: bool = False) -> str:
    """One line: the stage, the step (RL: the update and its rollout step), what went non-finite,
    what is kept and what to change."""
    where = f"step {done} of {total}" if unit == 1 else \
        f"update {done} of {total} (rollout step {math.ceil(done / unit)} of {total // unit})"
    tolerated = f" ({streak} steps in a row, nonfinite_patience {patience})" if patience else ""
    kept = latest(ctx.stage_dir)
    kept = f"the last good checkpoint {kept.name} is kept" if kept else "no checkpoint had been saved"
    end = "; training ended before it recovered" if at_end else ""
    lr = ctx.cfg.get("lr")
    return (f"{ctx.where()}: {what} at {where}{tolerated}{end}: training diverged and stopped; nothing published, "
            f"{kept}; lower {ctx.where('lr')}" + (f" (now {lr:g})" if isinstance(lr, float) else ""))


def weights_finite(engine) -> bool:
    """This rank's weights hold no nan or inf (ZeRO-3: its partition of each parameter)."""
    import torch

    with torch.no_grad():
        for p in engine.module.parameters():
            t = getattr(p, "ds_tensor", p)
            if t.numel() and not bool(torch.isfinite(t).all()):
                return False
    return True


def _bad_grads(engine, grad_norm: float | None) -> bool:
    """This rank's gradient norm is non-finite, and not because fp16's loss scaler overflowed: the
    scaler skips such a step (the weights stay as they were) and retries at a lower scale."""
    if grad_norm is None or math.isfinite(grad_norm):
        return False
    return not (engine.fp16_enabled() and not engine.was_step_applied())


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)
