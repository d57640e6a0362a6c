"""What a stage's `run(ctx)` gets: its config, inputs, output folder, logging, progress."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain_cli.engine import dist


@dataclass
class StageContext:
    spec: dict
    stage_dir: Path
    work_dir: Path
    log: logging.Logger = field(repr=False, default=None)
    _trackers: object = field(repr=False, default=None)

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def kind(self) -> str:
        return self.spec["kind"]

    @property
    def cfg(self) -> dict:
        return self.spec["stage"]

    @property
    def run(self) -> dict:
        return self.spec["run"]

    @property
    def seed(self) -> int:
        return self.run["seed"]

    @property
    def input_model(self) -> str | None:
        return self.spec["inputs"].get("model")

    @property
    def models(self) -> dict:
        """Other models the stage reads, by key ("ref_from", "eval.reward_model") -> a local path or hub id."""
        return self.spec["inputs"].get("models", {})

    @property
    def datasets(self) -> dict:
        """Dataset artifacts of earlier stages this stage reads, by stage name."""
        return self.spec["inputs"].get("datasets", {})

    @property
    def arith(self) -> dict:
        return self.spec["batch"]

    def where(self, key: str = "") -> str:
        return f"stages.{self.name}" + (f".{key}" if key else "")

    def info(self, msg: str) -> None:
        """A line for the user (rank 0) and the stage log (every rank)."""
        self.log.info(msg)
        if dist.is_main():
            print(f"[{self.name}] {msg}", flush=True)

    def log_metrics(self, row: dict) -> None:
        """A metrics.jsonl row (rank 0), and the same to the run's trackers (logging.report_to)."""
        if dist.is_main():
            with (self.stage_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.trackers.log(row)

    @property
    def trackers(self):
        if self._trackers is None:
            from posttrain_cli.pipeline.trackers import Trackers

            self._trackers = Trackers(self.spec, self.stage_dir, lambda msg: self.info(f"warning: {msg}"))
        return self._trackers

    def cached(self, name: str, build, *, collective: bool = False):
        """build() once, saved under the stage folder keyed by the fingerprint, so a re-run of the
        same stage (after a crash) skips the work. build() runs on rank 0 and every rank loads the
        result, or with `collective` on every rank (a distributed computation) and rank 0 saves it."""
        import torch

        cache = self.stage_dir / "cache" / f"{name}-{self.spec['fingerprint']}.pt"
        # Decided together (a collective): a rank that saw rank 0's fresh file would skip the barrier.
        if dist.all_sum([float(cache.exists())])[0] == dist.world():
            return torch.load(cache, weights_only=False)
        value = build() if collective or dist.is_main() else None
        if dist.is_main():
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save(value, tmp)
            tmp.replace(cache)
        dist.barrier()
        return value if collective else torch.load(cache, weights_only=False)

    def once(self, ready, build) -> None:
        """build() on rank 0 unless every rank finds ready() true; every rank returns after it. For
        work whose result lands outside the stage folder (the run's shared data cache, data/tokenized.py)."""
        # Decided together (a collective): a rank that saw rank 0's fresh result would skip the barrier.
        if dist.all_sum([float(ready())])[0] < dist.world():
            if dist.is_main():
                build()
            dist.barrier()

    def progress(self, total: int, what: str) -> "Progress":
        return Progress(self, total, what)


class Progress:
    """Rich progress bar on rank 0 (loss, tokens/s, ETA); plain lines off a terminal."""

    def __init__(self, ctx: StageContext, total: int, what: str):
        self.ctx, self.total, self.what = ctx, total, what
        mode = ctx.run["logging"]["progress"]
        self.live = dist.is_main() and (mode == "always" or (mode == "auto" and sys.stdout.isatty()))
        self.plain = dist.is_main() and not self.live and mode != "never"
        self.start = time.perf_counter()
        self.next_plain = 0
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self.bar = RichProgress(
                TextColumn(f"[bold]{ctx.name}[/] {what}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task(what, total=total, stats="")
            self.bar.start()

    def update(self, step: int, stats: dict) -> None:
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        if self.live:
            self.bar.update(self.task, completed=step, stats=text)
        elif self.plain and (step >= self.next_plain or step == self.total):
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(step, 1) * (self.total - step)
            print(f"[{self.ctx.name}] {self.what} {step}/{self.total}  {text}  eta {eta:.0f}s", flush=True)
            self.next_plain = step + max(1, self.total // 10)

    def close(self) -> None:
        if self.live:
            self.bar.stop()
