"""Distributed set-up and small collectives, the same on GPUs (nccl) and CPUs (gloo)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> None:
    """Join the process group torchrun set up, or make a world of one in-process."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    from_slurm()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    with _hidden("mlflow"):
        import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    import io

    # DeepSpeed prints a line when it builds its CPU shared-memory collective op.
    with contextlib.redirect_stdout(io.StringIO()):
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)


@contextlib.contextmanager
def _hidden(module: str):
    """`import module` fails inside (unless it is imported already). DeepSpeed's autotuner, which
    posttrain never runs, imports mlflow whenever it is installed (the mlflow tracker's extra):
    1.3 s of every rank's start-up, measured on CPU. The mlflow tracker (pipeline/trackers.py)
    imports it later as usual."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None
    try:
        yield
    finally:
        if sys.modules.get(module, False) is None:
            del sys.modules[module]


def from_slurm(env=os.environ) -> None:
    """A rank started by srun in a posttrain job (launch/slurm.py): rank, world size and local rank
    from SLURM's variables; the job script exported MASTER_ADDR / MASTER_PORT."""
    if "POSTTRAIN_SLURM_JOB" not in env or "RANK" in env or "SLURM_PROCID" not in env:
        return
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env["LOCAL_WORLD_SIZE"] = env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def all_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (fp64, so token counts stay exact)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_max(value: float) -> float:
    """The largest of one number over ranks."""
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (each rank fills its own rows, zeros elsewhere)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(device())
        dist.all_reduce(t)
    return t.cpu()
