"""The training-loop skeleton every training stage shares.

A stage supplies the micro-batches of each optimizer step (this rank's
share) and a loss function returning a *sum* and the micro-batch's weight
(loss tokens for SFT, pairs for DPO); the loop divides by the weight summed
over the whole global batch, all ranks, so gradients do not depend on how the
batch is split into ranks and accumulation steps.
"""

from __future__ import annotations

import time
from typing import Callable

from posttrain_cli.engine import dist


def train(ctx, engine, *, total_steps: int, micro_batches: Callable[[int], list[dict]],
          loss_fn: Callable[[object, dict], tuple], what: str = "train") -> dict:
    """micro_batches(step) -> this rank's micro-batches, each with 'weight' and 'tokens'.
    loss_fn(module, micro) -> (loss_sum tensor, extra metrics dict of floats)."""
    world = dist.world()
    log_every = ctx.run["logging"]["log_every"]
    bar = ctx.progress(total_steps, what)
    history: list[float] = []
    tokens_total = 0.0
    start = time.perf_counter()
    engine.train()
    try:
        for step in range(total_steps):
            t0 = time.perf_counter()
            micros = micro_batches(step)
            weight, tokens = dist.all_sum([sum(m["weight"] for m in micros), sum(m["tokens"] for m in micros)])
            loss_sum_local = 0.0
            extras: dict[str, float] = {}
            for micro in micros:
                loss_sum, extra = loss_fn(engine, micro)
                # DeepSpeed averages gradients over ranks; * world undoes that.
                engine.backward(loss_sum * (world / max(weight, 1.0)), scale_wrt_gas=False)
                engine.step()
                loss_sum_local += float(loss_sum.detach())
                for k, v in extra.items():
                    extras[k] = extras.get(k, 0.0) + float(v)
            sums = dist.all_sum([loss_sum_local, *extras.values()])
            loss = sums[0] / max(weight, 1.0)
            history.append(loss)
            tokens_total += tokens
            dt = time.perf_counter() - t0
            row = {"step": step + 1, "loss": loss, "lr": engine.get_lr()[0],
                   "grad_norm": _grad_norm(engine), "tokens": tokens, "tokens_per_s": tokens / dt,
                   **{k: v / max(weight, 1.0) for k, v in zip(extras, sums[1:])}}
            if (step + 1) % log_every == 0 or step + 1 == total_steps:
                ctx.log_metrics(row)
            bar.update(step + 1, {"loss": loss, "tok/s": round(tokens / dt)})
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    tail = history[-max(1, len(history) // 10):]
    return {"steps": total_steps, "loss": sum(tail) / len(tail), "first_loss": history[0] if history else None,
            "tokens": int(tokens_total), "tokens_per_s": tokens_total / elapsed, "train_seconds": elapsed}


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm)
