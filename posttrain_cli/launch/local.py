"""Run a stage worker on this machine: in-process for one rank, torchrun for several.

    posttrain run recipe=tiny cluster.nproc_per_node=2      # 2 ranks (GPUs, or CPU + gloo)
    posttrain run recipe=mopd cluster.parallel_stages=2     # independent branches at once

`launch` runs one stage and returns its exit code; `start` runs one in a child process
and returns at once (the runner's way to run branches in parallel). On GPUs, a stage
started in slot k sees devices [k x nproc, (k + 1) x nproc) only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from posttrain_cli.errors import UserError


def command(spec_path: Path, cluster: dict, port_offset: int = 0) -> list[str]:
    nproc = cluster["nproc_per_node"]
    if nproc == 1:
        return [sys.executable, "-m", "posttrain_cli.pipeline.worker", str(spec_path)]
    from posttrain_cli.engine.dist import free_port

    port = cluster["master_port"] + port_offset if cluster.get("master_port") else free_port()
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "posttrain_cli.pipeline.worker",
            str(spec_path)]


def _env(spec_path: Path, cluster: dict, parallel: int) -> dict:
    env = dict(os.environ)
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
    if cluster["nproc_per_node"] == 1:
        from posttrain_cli.pipeline.worker import run_stage

        return run_stage(spec_path)
    with _launcher_log(spec_path) as err:
        return subprocess.run(command(spec_path, cluster), env=_env(spec_path, cluster, 1), stderr=err,
                              preexec_fn=die_with_parent).returncode


def die_with_parent() -> None:
    """Linux: this process gets SIGTERM when its parent dies. torchrun and its ranks run in sessions
    of their own; without this a killed `posttrain run` would leave them training. SIGTERM, not
    SIGKILL: the ranks save a checkpoint at the next step and stop (engine/checkpoint.py)."""
    if _LIBC is not None:
        _LIBC.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _libc():
    """Loaded before any fork: a preexec_fn must not import."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    except OSError:
        return None


_LIBC = _libc()


def _launcher_log(spec_path: Path):
    """torchrun's stderr (its own tracebacks when a rank exits non-zero) goes to logs/launcher.log:
    the stage's message and rank logs say what went wrong without 40 lines of launcher noise."""
    logs = Path(spec_path).parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return (logs / "launcher.log").open("a")


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_slots(cluster: dict) -> None:
    """On GPUs, parallel stages need their own devices each."""
    parallel, nproc = cluster["parallel_stages"], cluster["nproc_per_node"]
    gpus = gpu_count() if parallel > 1 else 0
    if gpus and parallel * nproc > gpus:
        raise UserError(f"cluster.parallel_stages={parallel} x cluster.nproc_per_node={nproc} needs "
                        f"{parallel * nproc} GPUs; this machine has {gpus}")


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
        return subprocess.Popen(command(spec_path, cluster, port_offset=slot), env=env,
                                stderr=err if nproc > 1 else None, preexec_fn=die_with_parent)
