"""What the benchmarks share (scripts/bench_sft.py, bench_dpo.py, bench_grpo.py, bench_merge.py, bench_gpu.py):
the tiny models and synthetic text they train on, one fresh process per contestant, waiting for a
quiet machine, posttrain's CLI and the per-step times it logs, and TRL's CPU settings and step clock.

A benchmark imports it plainly (`from benchlib import ...`): Python puts a script's own directory
first on sys.path, for the benchmark and for the worker processes it starts alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import string
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The benchmarks' model (~3.5M parameters) and the --quick one; character tokenizer, vocab 107.
ARCH = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=1024, seed=0)
QUICK_ARCH = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=1024, seed=0)

# A fixed vocabulary of made-up words (seeded), built on first use.
WORDS: list[str] = []


# --------------------------------------------------------------------------- model and data

def tiny_model(tmp: Path, quick: bool) -> tuple[Path, dict]:
    """The benchmark's tiny Llama, built once into tmp/model: (its directory, its architecture)."""
    from posttrain_cli.models.tiny import build_tiny

    arch = QUICK_ARCH if quick else ARCH
    return build_tiny(tmp / "model", arch), arch


def text(rng: random.Random, n: int) -> str:
    """n characters of word-like text (capitals, punctuation and numbers sprinkled in)."""
    if not WORDS:
        wr = random.Random(1234)
        WORDS.extend("".join(wr.choice(string.ascii_lowercase) for _ in range(wr.randint(1, 9)))
                     for _ in range(2000))
    out, size = [], 0
    while size < n:
        w = rng.choice(WORDS)
        if rng.random() < 0.08:
            w = w.capitalize()
        if rng.random() < 0.06:
            w += rng.choice(".,;:?!")
        if rng.random() < 0.03:
            w = str(rng.randint(0, 9999))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


def length(rng: random.Random, median: float, sigma: float) -> int:
    """A log-normal length around `median`, clipped to 20..400 (characters = tokens)."""
    return int(min(400, max(20, round(math.exp(rng.gauss(math.log(median), sigma))))))


def write_rows(tmp: Path, rows: list[dict]) -> dict:
    """The rows as tmp/data.json (the workers read it) and tmp/data.jsonl (posttrain's recipe
    reads it): the spec keys `data` and `data_jsonl`."""
    (tmp / "data.json").write_text(json.dumps(rows))
    (tmp / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"data": str(tmp / "data.json"), "data_jsonl": str(tmp / "data.jsonl")}


def step_order(n: int, spec: dict) -> list[list[int]]:
    """posttrain's own plan (StepPlan, the spec's seed): the example indices of each optimizer
    step, which every contestant trains on in the same order."""
    from posttrain_cli.engine.loop import StepPlan

    plan = StepPlan(n, {"global_batch_size": spec["global_batch"], "micro_batch_size": spec["micro_batch"]},
                    spec["seed"])
    return [plan.step(s) for s in range(spec["steps"])]


# --------------------------------------------------------------------------- a quiet machine

def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def busy_cores(seconds: float = 3.0) -> float:
    """Cores busy right now (from /proc/stat over a few seconds): unlike the 1-minute load
    average, not inflated by the contestant that just finished."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except OSError:
        return loadavg()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, t1 - t0))


def wait_quiet(max_load: float, limit: float) -> float:
    """Wait (up to `limit` seconds) until at most max_load/2 cores are busy; -> the busy cores."""
    t0 = time.time()
    busy = busy_cores()
    while busy > max_load * 0.5 and time.time() - t0 < limit:
        print(f"  {busy:.2f} cores busy (load average {loadavg():.2f}): waiting for a quiet machine ...", flush=True)
        time.sleep(10)
        busy = busy_cores()
    if busy > max_load * 0.5:
        print(f"  WARNING: still {busy:.2f} cores busy; results are not trustworthy", flush=True)
    return busy


def busy_before(max_load: float, wait: float) -> float:
    """Before a contestant: wait_quiet, or with no wait (--quick) only a 1-second look."""
    return wait_quiet(max_load, wait) if wait else busy_cores(1.0)


def rotated(contestants: list[str], rnd: int) -> list[str]:
    """Round `rnd`'s order: the contestants rotate, so none always runs first."""
    k = rnd % len(contestants)
    return contestants[k:] + contestants[:k]


# --------------------------------------------------------------------------- processes

def child_env(threads: int, cpu: bool = True) -> dict:
    """A contestant's environment: `threads` OpenMP threads, offline, quiet; cpu: DeepSpeed's CPU
    accelerator (on a GPU node, cpu=False leaves DeepSpeed to find the GPUs)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if cpu:
        env["DS_ACCELERATOR"] = "cpu"
    return env


def add_worker_args(ap: argparse.ArgumentParser) -> None:
    """The hidden flags run_in_subprocess starts a benchmark's worker with."""
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)


def serve_worker(args: argparse.Namespace, worker) -> bool:
    """In a worker process (--worker KIND): write worker(KIND, spec) to --out; -> whether it was one."""
    if not args.worker:
        return False
    spec = json.loads(Path(args.spec).read_text())
    Path(args.out).write_text(json.dumps(worker(args.worker, spec)))
    return True


def run_in_subprocess(kind: str, spec: dict, tmp: Path, rnd: int, script: str) -> dict:
    """Run `script --worker kind` (the calling benchmark) in a fresh process; -> what it wrote."""
    spec_path = tmp / f"spec-{kind}-{rnd}.json"
    out_path = tmp / f"out-{kind}-{rnd}.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, script, "--worker", kind, "--spec", str(spec_path), "--out", str(out_path)]
    p = subprocess.run(cmd, env=child_env(spec["threads"]), capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"{kind} worker failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return json.loads(out_path.read_text())


# --------------------------------------------------------------------------- posttrain

def write_recipe(tmp: Path, model: str, stage: str, settings: str, top: str = "") -> Path:
    """tmp/bench.yaml: one stage named `stage` (`settings`: its keys as YAML, kind included) on
    the model directory `model`; `top`: more top-level YAML lines."""
    recipe = tmp / "bench.yaml"
    recipe.write_text(f"defaults: [base, _self_]\nname: bench\nmodel: {{path: {model}}}\n{textwrap.dedent(top)}"
                      f"stages:\n  {stage}:\n" + textwrap.indent(textwrap.dedent(settings).strip("\n"), "    ") + "\n")
    return recipe


def posttrain_run(recipe: Path, run_dir: Path, threads: int, cwd: Path,
                  overrides: tuple[str, ...] = ("deepspeed.precision=fp32",), cpu: bool = True) -> None:
    """`posttrain run recipe=... run_dir=... OVERRIDES` as a user types it (by default fp32), in a
    fresh process; cpu: see child_env."""
    exe = Path(sys.executable).parent / "posttrain"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "posttrain_cli.cli"]
    cmd += ["run", f"recipe={recipe}", f"run_dir={run_dir}", *overrides]
    p = subprocess.run(cmd, env=child_env(threads, cpu), capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        raise SystemExit(f"posttrain failed (rc {p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")


def stage_results(run_dir: Path, stage: str) -> tuple[dict, list[dict]]:
    """A finished stage's manifest metrics and its metrics.jsonl rows (one per logged step)."""
    metrics = json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]
    rows = [json.loads(l) for l in (run_dir / stage / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return metrics, rows


def step_ends(rows: list[dict], train_seconds: float | None = None) -> list[float]:
    """When each step ended on the loop's clock (0 = its start), from the per-step times in
    metrics.jsonl (tokens / tokens_per_s). With train_seconds (the loop's total, which also holds
    logging and progress outside the timed step bodies) that gap is spread over the steps, so
    "time since the end of step k" keeps it."""
    ends, t = [], 0.0
    for r in rows:
        t += r["tokens"] / r["tokens_per_s"]
        ends.append(t)
    if train_seconds is not None:
        gap = train_seconds - ends[-1]
        ends = [e + gap * (k + 1) / len(ends) for k, e in enumerate(ends)]
    return ends


def steps_per_s(ends: list[float], t_start: float, skip: int) -> tuple[float, float]:
    """(steady: after the first `skip` steps, all steps from the start of training)."""
    steady = (len(ends) - skip) / (ends[-1] - ends[skip - 1]) if skip else len(ends) / (ends[-1] - t_start)
    return steady, len(ends) / (ends[-1] - t_start)


def target_met(ratio: float, target: float) -> str:
    return f"target >= {target}x: {'met' if ratio >= target else 'NOT met'}"


def ratio_text(mine: list[float], other: list[float], target: float | None = None, unit: str = "") -> str:
    """`1.52x<unit> (rounds 1.41-1.60x); target ...`: the median of the per-round ratios (both
    contestants ran in the same round) with their min-max, so a noisy round shows."""
    import statistics

    rs = [m / o for m, o in zip(mine, other)]
    text = f"{statistics.median(rs):.2f}x{unit} (rounds {min(rs):.2f}-{max(rs):.2f}x)"
    return text + (f"; {target_met(statistics.median(rs), target)}" if target else "")


# --------------------------------------------------------------------------- TRL

# What every TRL contestant runs with besides its batch, steps and loss: fp32 on the CPU (TRL
# defaults to bf16), no reporting, no checkpoints.
TRL_CPU = dict(bf16=False, fp16=False, use_cpu=True, report_to="none", save_strategy="no")


def trl_clock(on_step=None):
    """A TrainerCallback that records when training began (`t_start`) and when each optimizer step
    ended (`ends`, time.perf_counter()); on_step() runs at each step's end."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.t_start, self.ends = None, []

        def on_train_begin(self, *a, **k):
            self.t_start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())
            if on_step is not None:
                on_step()

    return Clock()
