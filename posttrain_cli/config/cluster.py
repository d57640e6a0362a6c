"""How many ranks a stage runs on, and what its SLURM job asks for (torch-free; the runner,
the SLURM launcher and `plan` use it)."""

from __future__ import annotations


def job_resources(cluster: dict, stage: dict | None = None) -> dict:
    """cluster.* with a stage's `resources` laid over it (the keys it sets)."""
    res = (stage or {}).get("resources") or {}
    return {**cluster, **{k: v for k, v in res.items() if v is not None}}


def ranks_per_node(res: dict) -> int:
    """nproc_per_node, or (slurm, null) one rank per GPU, 1 without GPUs."""
    return res["nproc_per_node"] if res["nproc_per_node"] is not None else max(1, res["gpus_per_node"])


def world_size(cfg: dict, stage: dict | None = None) -> int:
    """Ranks of a stage: local runs nproc_per_node x nnodes (1); slurm nodes x ranks per node of the
    stage's job (its `resources` win over cluster.*)."""
    c = cfg["cluster"]
    if c["launcher"] == "slurm":
        res = job_resources(c, stage)
        return res["nodes"] * ranks_per_node(res)
    return c["nproc_per_node"] * c["nnodes"]
