"""Mid-stage checkpoints, resume after a crash, and stopping cleanly on a preemption signal.

    stages.sft.save_every: 200      # optimizer steps between checkpoints (RL kinds: rollout steps)

A training stage saves every `save_every` steps, and at once when the process gets SIGUSR1,
SIGTERM (SLURM's warning before a time limit or a preemption) or SIGINT (Ctrl-C). Run the same command again and the
stage continues from its newest checkpoint; the final weights are the uninterrupted run's.

    RUN_DIR/<stage>/checkpoints/
        step-000040/
            ds/            DeepSpeed's checkpoint: weights, the (ZeRO-partitioned) optimizer, the
                           lr schedule; every rank writes its own part
            rank<r>.pt     rank r's RNG states (python, numpy, torch, CUDA) and the stage's state
                           (RL: the prompt stream's position, the reward history)
            meta.json      the step and what a resume must agree on; written last
        latest             the newest complete checkpoint's folder name

A checkpoint folder is written under a temporary name and renamed when every rank's part is in,
so a kill while saving leaves the previous one in place. The data position is the step: a step's
examples come from a seeded plan (engine/loop.py StepPlan, rollout/onpolicy.py PromptStream).

A resume must see the same data and the same batch settings (the same examples in each step, the
same optimizer partition per rank): otherwise it is refused (exit 2), the checkpoint kept. A
checkpoint written for a different model input or other hyperparameters is stale: the stage starts
over and says so.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from posttrain_cli.errors import UserError

# torch and engine.dist are imported where a checkpoint is written or read: the runner asks
# `latest()` when it prepares a stage, and `posttrain run cluster=slurm` should not load torch.

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"

# Stage keys that decide which examples a step sees and how a step splits over ranks.
BATCH_KEYS = ("global_batch_size", "micro_batch_size", "prompts_per_step", "num_generations", "mini_batches",
              "ppo_epochs", "rollout_batch_size")


class Preempted(Exception):
    """The stage stopped on a signal after saving a checkpoint (the launcher requeues or reports)."""

    def __init__(self, signame: str, step: int, total: int, path: Path | None, saved: bool = True):
        # saved=False: the last steps were non-finite (engine/loop.py), so nothing was written over
        # the last good checkpoint (`path`, or None: the stage starts over).
        what = f"checkpoint saved at {path}" if saved else \
            f"not saved (its last steps were non-finite); {f'kept {path}' if path else 'no checkpoint yet'}"
        super().__init__(f"stopped by {signame} at step {step} of {total}; {what}")
        self.signame, self.step, self.total, self.path = signame, step, total, path


def root(stage_dir: Path) -> Path:
    return Path(stage_dir) / CHECKPOINTS


def latest(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    r = root(stage_dir)
    try:
        name = (r / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    path = r / name
    return path if (path / META).is_file() else None


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())


def resume_key(ctx) -> dict:
    """What a checkpoint records about the run that wrote it."""
    cfg = ctx.cfg
    key = ctx.spec.get("resume_key") or {}
    return {
        "fingerprint": ctx.spec["fingerprint"],
        "data": key.get("data"),
        "inputs": key.get("inputs"),
        "seed": ctx.seed,
        "batch": {**{k: cfg[k] for k in BATCH_KEYS if k in cfg}, **{k: v for k, v in ctx.arith.items()}},
        # The stage's training settings (pipeline/graph.py: what decides its output, data aside).
        "config": key.get("config"),
        "zero_stage": ctx.run["deepspeed"]["zero_stage"],
    }


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new), key=str)
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check(ctx, meta: dict, path: Path) -> bool:
    """True: resume from this checkpoint. False: it is stale (other inputs or hyperparameters), start
    over. Raises UserError when the data or the batch settings changed."""
    now = resume_key(ctx)
    where = f"{ctx.where()}: the checkpoint at step {meta['step']} of {meta['total']} ({path})"
    fix = f"Set them back to resume, or delete {root(ctx.stage_dir)} to start this stage over."
    if meta["data"] != now["data"] or meta["seed"] != now["seed"]:
        what = "the data" + (f" (seed {meta['seed']} -> {now['seed']})" if meta["seed"] != now["seed"] else "")
        raise UserError(f"{where} was written for other data: {what} changed since. Resuming would train on "
                        f"a mix. {fix}")
    batch = _differences(meta["batch"], now["batch"])
    if meta["zero_stage"] != now["zero_stage"]:
        batch.append(f"deepspeed.zero_stage {meta['zero_stage']} -> {now['zero_stage']}")
    if batch:
        raise UserError(f"{where} was written with other batch settings: {'; '.join(batch)}. Resuming would "
                        f"change which examples each step sees or how the optimizer is split. {fix}")
    if meta["fingerprint"] != now["fingerprint"]:
        changed = _differences(meta["config"], now["config"])
        if meta["inputs"] != now["inputs"]:
            changed.append("an input model changed")
        ctx.info(f"checkpoint at step {meta['step']} is stale ({'; '.join(changed) or 'settings changed'}); "
                 f"starting the stage over")
        return False
    return True


class Checkpoints:
    """Saves and restores one training loop: its engine, RNG states, loop counters and the stage's
    own state (a StageState, or None)."""

    def __init__(self, ctx, engine, *, total: int, unit: int = 1, state=None):
        self.ctx, self.engine, self.total, self.unit, self.state = ctx, engine, total, unit, state
        every = ctx.cfg.get("save_every")
        self.every = every * unit if every else None
        self.dir = root(ctx.stage_dir)

    def due(self, done: int) -> bool:
        return self.every is not None and done % self.every == 0 and done < self.total

    def resume(self) -> dict | None:
        """Restore the newest usable checkpoint -> the loop's counters, or None to start at step 0.
        Every rank reads the same files, so every rank decides the same."""
        path = latest(self.ctx.stage_dir)
        if path is None:
            return None
        meta = read_meta(path)
        if meta["total"] != self.total and meta["fingerprint"] == self.ctx.spec["fingerprint"]:
            raise UserError(f"{self.ctx.where()}: the checkpoint at {path} counts {meta['total']} steps, this run "
                            f"{self.total}; delete {self.dir} to start this stage over")
        import torch

        from posttrain_cli.engine import dist

        if not check(self.ctx, meta, path):
            dist.barrier()
            if dist.is_main():
                shutil.rmtree(self.dir, ignore_errors=True)
            dist.barrier()
            return None
        load_path, _ = self.engine.load_checkpoint(str(path / "ds"), tag="state", load_optimizer_states=True,
                                                     load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path / 'ds'}")
        mine = torch.load(path / f"rank{dist.rank()}.pt", weights_only=False)
        if self.state is not None:
            self.state.put(mine["stage"])
            if self.state.load_files is not None:
                self.state.load_files(path / "files")
        set_rng(mine["rng"])
        self.ctx.info(f"resumed from {path.name}: step {meta['step'] // self.unit} of {self.total // self.unit}")
        return mine["loop"]

    def save(self, done: int, loop: dict) -> Path:
        """Every rank: its part into a temporary folder; rank 0 renames it into place when all are in."""
        import torch

        from posttrain_cli.engine import dist

        name = f"step-{done // self.unit:06d}"
        final, tmp = self.dir / name, self.dir / f".{name}.partial"
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)
        if self.state is not None and self.state.files is not None and dist.is_main():
            self.state.files(tmp / "files")
        torch.save({"rng": get_rng(), "loop": loop, "stage": self.state.get() if self.state is not None else None},
                   tmp / f"rank{dist.rank()}.pt")
        dist.barrier()
        if dist.is_main():
            meta = {**resume_key(self.ctx), "step": done, "total": self.total, "unit": self.unit,
                    "world_size": dist.world()}
            (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer = self.dir / f".{LATEST}.tmp"
            pointer.write_text(name + "\n")
            os.replace(pointer, self.dir / LATEST)
            for old in self.dir.iterdir():
                if old.is_dir() and old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        self.ctx.log.info("checkpoint %s saved", final)
        return final


@dataclass
class StageState:
    """A stage's own part of a checkpoint: get() -> a picklable dict, put(dict) restores it; with
    files(dir) / load_files(dir) it also keeps files (rank 0 writes them, every rank reads)."""

    get: Callable[[], dict]
    put: Callable[[dict], None]
    files: Callable[[Path], None] | None = None
    load_files: Callable[[Path], None] | None = None


def clear(stage_dir: Path) -> None:
    """A finished stage's checkpoints are not needed any more (its model is published)."""
    shutil.rmtree(root(stage_dir), ignore_errors=True)


def get_rng() -> dict:
    import numpy as np
    import torch

    out = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class StopSignals:
    """SIGUSR1 / SIGTERM / SIGINT (Ctrl-C) ask the loop to checkpoint and stop at the next step
    boundary. The handlers only set a flag; the loop reads it in its per-step all-reduce, so every rank
    stops at the same step. A second Ctrl-C does not wait for the step: KeyboardInterrupt at once."""

    SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        if signum == signal.SIGINT and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

