"""Merge models: weighted averages, slerp, task arithmetic, TIES and DARE, tensor by tensor.

    posttrain run recipe=my_merge.yaml
    stages:
      soup: {kind: merge, models: [sft_a, sft_b], weights: [0.7, 0.3]}
      ties: {kind: merge, method: ties, models: [math, code], base: sft, density: 0.5}

- The methods are the pure tensor functions of posttrain_cli/merge/methods.py (their
  docstrings cite the papers); posttrain_cli/merge/stream.py reads the models' safetensors
  tensor by tensor with plain file reads and writes the output shards as it goes, so memory
  stays near one tensor per input model, whatever the models' size.
- Models must share architecture, tensor names, shapes and tokenizer (the base may lack the
  chat template of the merged models); anything else is refused with one line naming the key.
- The output is a Hugging Face directory with models[0]'s config (dtype updated), generation
  config and tokenizer files.
- Merging is a CPU job for one process: in a multi-rank launch rank 0 merges and the other
  ranks wait for it (polling a file, so a merge longer than a collective's timeout is fine);
  every rank then takes part in the stage's `eval:` block.
- Randomness (dare_*) is seeded per tensor from the run seed and the tensor's name.
- Departures from mergekit: linear always normalises its weights; ties' trim keeps at least
  one entry per tensor and every entry tied with the k-th magnitude.
"""

from __future__ import annotations

import time

from posttrain_cli.engine import dist
from posttrain_cli.kinds.merge import parse_size
from posttrain_cli.merge import memory, shards, stream
from posttrain_cli.merge.methods import MERGE_METHODS


def run(ctx) -> dict:
    marker = ctx.work_dir / ".merge-status"
    metrics = {}
    if dist.is_main():
        try:
            metrics = _merge(ctx, ctx.work_dir / "model")
        except BaseException:
            marker.write_text("failed")
            raise
        marker.write_text("done")
    else:
        while not marker.exists():
            time.sleep(0.5)
        if marker.read_text() != "done":
            raise RuntimeError("rank 0 failed to merge (its error is in rank0.log)")
    dist.barrier()
    return {"metrics": metrics, "outputs": {"model": "model"}}


def _merge(ctx, out_dir) -> dict:
    cfg = ctx.cfg
    fn = MERGE_METHODS[cfg["method"]]
    revision = ctx.run["model"].get("revision")
    keys = [f"models[{i}]" for i in range(len(cfg["models"]))]
    models = [(ctx.where(k), shards.fetch(ctx.models[k], ctx.where(k), revision)) for k in keys]
    base = (ctx.where("base"), shards.fetch(ctx.models["base"], ctx.where("base"), revision)) \
        if fn.uses_base else None
    ctx.info(f"{cfg['method']} merge of {len(models)} models" + (f" onto base {cfg['base']}" if base else ""))
    memory.reset_peak_rss()
    rss_before, start = memory.rss(), time.perf_counter()
    stats = stream.merge(models, out_dir, method=cfg["method"], base=base, weights=cfg["weights"],
                         density=cfg["density"], t=cfg["t"], normalize=cfg["normalize"], dtype=cfg["dtype"],
                         max_shard_size=parse_size(ctx.where("max_shard_size"), cfg["max_shard_size"]),
                         seed=ctx.seed, progress=lambda total: ctx.progress(total, "tensors"), where=ctx.where())
    seconds = time.perf_counter() - start
    peak = memory.peak_rss()
    metrics = {"method": cfg["method"], "models": len(models), **stats, "seconds": round(seconds, 3)}
    if peak is not None and rss_before is not None:
        metrics["peak_rss_delta_mb"] = round(max(0, peak - rss_before) / 1e6, 1)
    ctx.log_metrics(metrics)
    ctx.info(f"merged {stats['tensors']} tensors into {stats['shards']} shard(s), "
             f"{stats['bytes_written'] / 1e6:.1f} MB in {seconds:.1f}s"
             + (f", peak memory +{metrics['peak_rss_delta_mb']:.0f} MB" if "peak_rss_delta_mb" in metrics else ""))
    return metrics
