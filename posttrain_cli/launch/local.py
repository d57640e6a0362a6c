"""Run a stage worker on this machine: in-process for one rank, torchrun for several.

    posttrain run recipe=tiny cluster.nproc_per_node=2      # 2 ranks (GPUs, or CPU + gloo)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def launch(spec_path: Path, cluster: dict) -> int:
    """-> the worker's exit code (0 ok, 2 bad input, 1 crashed)."""
    nproc, nnodes = cluster["nproc_per_node"], cluster["nnodes"]
    if nnodes != 1:
        raise NotImplementedError("cluster=local runs on one node; use a cluster launcher for nnodes > 1")
    if nproc == 1:
        from posttrain_cli.pipeline.worker import run_stage

        return run_stage(spec_path)
    from posttrain_cli.engine.dist import free_port

    port = cluster.get("master_port") or free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           f"--master_addr=127.0.0.1", f"--master_port={port}", "-m", "posttrain_cli.pipeline.worker",
           str(spec_path)]
    env = dict(os.environ)
    # One thread per rank unless the user says otherwise: ranks share the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    # torchrun's own log lines would bury the stage's; keep them for real failures.
    env.setdefault("TORCHELASTIC_ERROR_FILE", str(Path(spec_path).parent / "logs" / "torchrun_error.json"))
    proc = subprocess.run(cmd, env=env)
    return proc.returncode
