"""Which engine samples for a stage: the rollout section's `backend`, with `auto` resolved.

Torch-free and vllm-free (plan and validation use it): whether vLLM is installed is asked of
the import system without importing it. The stage worker makes the final choice
(rollout/backend.py: `auto` also falls back to hf for a model the installed vLLM cannot run).
"""

from __future__ import annotations

import importlib.util
from typing import Callable

from posttrain_cli.errors import UserError

INSTALL = "pip install 'posttrain[vllm]' (a CPU-only machine: the README's vLLM section)"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def planned(rollout: dict) -> tuple[str, str]:
    """(backend, why) as plan shows it: auto becomes vllm where it is installed, else hf."""
    backend = rollout["backend"]
    if backend != "auto":
        return backend, ""
    return ("vllm", "auto") if vllm_installed() else ("hf", "auto: vllm is not installed")


def check(rollout: dict, where: Callable[[str], str]) -> None:
    """UserError for a stage's rollout section (the run's with the stage's block over it) that cannot
    work; where(key) names the key the user set (rollout.backend or stages.grpo.rollout.backend)."""
    if rollout["backend"] == "vllm" and not vllm_installed():
        raise UserError(f"{where('backend')}=vllm: vLLM is not installed; {INSTALL}")
    if not 0 < rollout["gpu_memory_utilization"] <= 1:
        key = "gpu_memory_utilization"
        raise UserError(f"{where(key)}={rollout[key]} must be in (0, 1]")
    for key in ("tensor_parallel_size", "kv_cache_gb"):
        if rollout[key] <= 0:
            raise UserError(f"{where(key)}={rollout[key]} must be > 0")
