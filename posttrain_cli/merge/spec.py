"""What each merge method uses, declared once: validation (kinds/merge.py) and `posttrain plan`
read it, and merge/methods.py registers a tensor function only under a name declared here.

Torch-free on purpose: `posttrain plan` imports it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    # Where the method comes from (paper or reference).
    url: str
    # The stage keys it reads besides models / base / weights, in the order plan prints them.
    params: tuple[str, ...]
    # A task-vector method: needs `base` (subtracted from each model, added back after); the others refuse it.
    task_vectors: bool
    min_models: int
    max_models: int | None
    # Accepts one weight per model (slerp interpolates with t instead).
    weights: bool


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("linear", "https://arxiv.org/abs/2203.05482", (), task_vectors=False,
               min_models=2, max_models=None, weights=True),
    MethodSpec("slerp", "https://dl.acm.org/doi/10.1145/325165.325242", ("t",), task_vectors=False,
               min_models=2, max_models=2, weights=False),
    MethodSpec("task_arithmetic", "https://arxiv.org/abs/2212.04089", (), task_vectors=True,
               min_models=1, max_models=None, weights=True),
    MethodSpec("ties", "https://arxiv.org/abs/2306.01708", ("density", "normalize"), task_vectors=True,
               min_models=1, max_models=None, weights=True),
    MethodSpec("dare_linear", "https://arxiv.org/abs/2311.03099", ("density",), task_vectors=True,
               min_models=1, max_models=None, weights=True),
    MethodSpec("dare_ties", "https://arxiv.org/abs/2311.03099", ("density", "normalize"), task_vectors=True,
               min_models=1, max_models=None, weights=True),
)}
