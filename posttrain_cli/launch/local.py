"""Run a stage worker on this machine: in-process for one rank, torchrun for several.

    posttrain run recipe=tiny cluster.nproc_per_node=2      # 2 ranks (GPUs, or CPU + gloo)
    posttrain run recipe=mopd cluster.parallel_stages=2     # independent branches at once

`execute` runs the pending stages one at a time in recipe order (`launch`: in this process for
one rank), or with cluster.parallel_stages > 1 each as soon as its inputs are done, up to that
many at once (`start`: a child process each). On GPUs, a stage started in slot k sees devices
[k x nproc, (k + 1) x nproc) only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from posttrain_cli.errors import StageFailed, UserError
from posttrain_cli.pipeline import stagedir
from posttrain_cli.pipeline.stagedir import Step
from posttrain_cli.procs import die_with_parent


def execute(run: dict, pending: list[Step], say, *, dry_run: bool = False, wait: bool = False) -> None:
    """Run the pending stages on this machine; raises the first failure's error. A local run
    always runs to the end (`wait` changes nothing)."""
    cluster = run["cluster"]
    if dry_run:
        for step in pending:
            spec = stagedir.write_spec(run, step, step.action == "eval")
            say(f"[{step.node.name}] " + " ".join(command(spec, cluster)))
        return
    if cluster["parallel_stages"] == 1:
        # One at a time, in recipe order (an order the graph allows), in this process where it can.
        for step in pending:
            error = stagedir.outcome(step, launch(stagedir.prepare(run, step, say), cluster))
            if error is not None:
                raise error
        return
    _execute_parallel(run, pending, say)


def _execute_parallel(run: dict, pending: list[Step], say) -> None:
    """Each stage as soon as its inputs are done. After a failure (or Ctrl-C) no new stage starts;
    stages already running finish (a re-run skips them) or stop at their next step (Ctrl-C)."""
    cluster = run["cluster"]
    pending = list(pending)
    planned = {s.node.name for s in pending}  # inputs outside it were done before this run
    done: set[str] = set()
    free = list(range(cluster["parallel_stages"]))
    running: dict[str, tuple] = {}  # name -> (step, process, slot)
    errors: list[Exception] = []
    try:
        with forward_sigint(lambda: [proc for _, proc, _ in running.values()]) as interrupted:
            while pending or running:
                if not errors and not interrupted["count"]:
                    for step in list(pending):
                        if not free:
                            break
                        if all(d in done or d not in planned for d in step.node.deps):
                            pending.remove(step)
                            slot = free.pop(0)
                            others = ", ".join(running)
                            say(f"[{step.node.name}] started" + (f" (alongside {others})" if others else ""))
                            running[step.node.name] = (step, start(stagedir.prepare(run, step, say), cluster, slot),
                                                       slot)
                if not running:
                    break
                time.sleep(0.2)
                for name, (step, proc, slot) in list(running.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    del running[name]
                    free.append(slot)
                    error = stagedir.outcome(step, code)
                    if error is None:
                        done.add(name)
                    else:
                        errors.append(error)
                        if running:
                            what = "stopped" if interrupted["count"] else "failed"
                            say(f"[{name}] {what}; waiting for {', '.join(running)} to finish, starting nothing new")
    finally:
        for _, proc, _ in running.values():
            proc.terminate()
        for _, proc, _ in running.values():
            try:
                proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - the user interrupted; do not hang on a stuck child
                proc.kill()
    if errors:
        # A bad input (exit 2) is the user's to fix first.
        raise next((e for e in errors if isinstance(e, UserError)), errors[0])
    if interrupted["count"] and pending:
        raise StageFailed(f"interrupted by SIGINT before {', '.join(s.node.name for s in pending)} started; the "
                          f"same command runs {'it' if len(pending) == 1 else 'them'}")


@contextmanager
def forward_sigint(processes):
    """Ctrl-C reaches the stage processes through this one: each runs in a session of its own (so the
    terminal's SIGINT is not delivered twice) and gets one SIGINT per press from here, which stops a
    stage at its next step with a checkpoint (engine/checkpoint.py StopSignals; torchrun passes it to
    its ranks) while this process waits and reports. Yields {"count": presses so far}."""
    state = {"count": 0}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handle(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
        state["count"] += 1
        for proc in processes():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)

    old = signal.signal(signal.SIGINT, handle)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, old)


def check(cluster: dict) -> None:
    """On GPUs, parallel stages need their own devices each."""
    parallel, nproc = cluster["parallel_stages"], cluster["nproc_per_node"]
    gpus = gpu_count() if parallel > 1 else 0
    if gpus and parallel * nproc > gpus:
        raise UserError(f"cluster.parallel_stages={parallel} x cluster.nproc_per_node={nproc} needs "
                        f"{parallel * nproc} GPUs; this machine has {gpus}")


def command(spec_path: Path, cluster: dict, port_offset: int = 0) -> list[str]:
    nproc = cluster["nproc_per_node"]
    if nproc == 1:
        return [sys.executable, "-m", "posttrain_cli.pipeline.worker", str(spec_path)]
    from posttrain_cli.engine.dist import free_port

    port = cluster["master_port"] + port_offset if cluster.get("master_port") else free_port()
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "posttrain_cli.pipeline.worker",
            str(spec_path)]


# Set in this process by a stage that ran in it (engine/dist.py: a world of one, its store still
# listening on MASTER_PORT): a child finds its own.
_RANK_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def _env(spec_path: Path, cluster: dict, parallel: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    # One thread per rank unless the user says otherwise: ranks (and parallel stages) share the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (cluster["nproc_per_node"] * parallel))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    # torchrun's own log lines would bury the stage's; keep them for real failures.
    env.setdefault("TORCHELASTIC_ERROR_FILE", str(Path(spec_path).parent / "logs" / "torchrun_error.json"))
    return env


def launch(spec_path: Path, cluster: dict) -> int:
    """-> the worker's exit code (0 ok, 2 bad input, 1 crashed)."""
    if cluster["nnodes"] != 1:
        raise NotImplementedError("cluster=local runs on one node; use a cluster launcher for nnodes > 1")
    if cluster["nproc_per_node"] == 1 and not own_process(spec_path):
        from posttrain_cli.pipeline.worker import run_stage

        return run_stage(spec_path)
    with _launcher_log(spec_path) as err:
        proc = subprocess.Popen(command(spec_path, cluster), env=_env(spec_path, cluster, 1), stderr=err,
                                preexec_fn=die_with_parent, start_new_session=True)
        with forward_sigint(lambda: [proc]):
            return proc.wait()


def own_process(spec_path: Path) -> bool:
    """Whether a 1-rank stage runs in a process of its own rather than this one: one that samples
    with vLLM does, since an engine changes process-wide state that outlives it (it binds the
    process's threads to cores; shutting down, it tears down the process group)."""
    import yaml

    from posttrain_cli.kinds import KINDS
    from posttrain_cli.kinds.base import samples
    from posttrain_cli.rollout.select import planned

    spec = yaml.safe_load(Path(spec_path).read_text())
    rollout = spec["run"].get("rollout")
    return bool(rollout) and samples(KINDS[spec["kind"]], spec["stage"]) and planned(rollout)[0] == "vllm"


def _launcher_log(spec_path: Path):
    """torchrun's stderr (its own tracebacks when a rank exits non-zero) goes to logs/launcher.log:
    the stage's message and rank logs say what went wrong without 40 lines of launcher noise."""
    logs = Path(spec_path).parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return (logs / "launcher.log").open("a")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start(spec_path: Path, cluster: dict, slot: int) -> subprocess.Popen:
    """Start one stage in a child process (its own devices on GPUs); -> the process."""
    parallel, nproc = cluster["parallel_stages"], cluster["nproc_per_node"]
    env = _env(spec_path, cluster, parallel)
    gpus = gpu_count()
    if gpus:
        visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()] or \
            [str(i) for i in range(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[slot * nproc + i] for i in range(nproc))
    with _launcher_log(spec_path) as err:
        # A session of its own: Ctrl-C reaches it once, through forward_sigint.
        return subprocess.Popen(command(spec_path, cluster, port_offset=slot), env=env,
                                stderr=err if nproc > 1 else None, preexec_fn=die_with_parent,
                                start_new_session=True)
