"""Merge methods: pure functions on the tensors of one parameter, registered by name.

    MERGE_METHODS["ties"](tensors, weights=[1, 1], base=b, density=[0.5, 0.5], t=0.5,
                          normalize=True, generator=g)

Every method gets float32 tensors of one shape (one per model, in `models` order) and
keyword options, and returns a float32 tensor; the caller casts to the output dtype.
What a method reads (its parameters, whether it needs `base`, how many models) is declared
in merge/spec.py, which validation and `plan` read without torch; `register` accepts only a
name declared there. Attributes set by `register`: `url` and `uses_base` (a task-vector method:
needs `base`) from that declaration, `elementwise` (entry i of the output depends only on
entry i of the inputs, so a large tensor may be merged a slice at a time) and `random` (draws
from `generator`).

task_arithmetic, ties, dare_linear and dare_ties are configurations of one general task-vector
merge (`task_vector_merge`, mergekit's generalized task arithmetic): how each task vector is
sparsified (not at all, TIES' magnitude trim, DARE's random drop) and whether the vectors are
summed or combined by TIES' sign election.

Semantics follow the papers as mergekit implements them, with these choices:
- linear always normalises its weights (sum w_i x_i / sum w_i).
- slerp falls back to lerp when the two flattened vectors are nearly colinear
  (|cos| > 0.9995) or one is zero; t=0 is the first model, t=1 the second.
- ties trims each task vector to its top `density` fraction by magnitude (at least one entry;
  entries tied with the k-th magnitude are all kept), elects each entry's sign from the
  weighted sum of the trimmed vectors (TIES "mass"; a zero sum elects +), and averages the
  agreeing entries (divided by the agreeing models' summed weights with `normalize`).
- dare drops each task-vector entry with probability 1 - density and rescales survivors by
  1 / density; dare_linear then adds the weighted task vectors to base, dare_ties runs the
  ties sign election and disjoint merge on them.
"""

from __future__ import annotations

from typing import Callable

import torch

from posttrain_cli.merge.spec import METHODS

MERGE_METHODS: dict[str, Callable] = {}

# |cos(angle)| above this: the vectors are treated as colinear and slerp becomes lerp (mergekit's).
COLINEAR = 0.9995


def register(name: str, *, elementwise: bool = False, random: bool = False):
    """Register a tensor function under a method declared in merge/spec.py METHODS."""
    if name not in METHODS:
        raise ValueError(f"merge method {name!r} is not declared in posttrain_cli/merge/spec.py METHODS")
    spec = METHODS[name]

    def wrap(fn: Callable) -> Callable:
        if name in MERGE_METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        fn.url, fn.uses_base, fn.elementwise, fn.random = spec.url, spec.task_vectors, elementwise, random
        MERGE_METHODS[name] = fn
        return fn

    return wrap


@register("linear", elementwise=True)
def linear(tensors: list[torch.Tensor], *, weights: list[float], **_) -> torch.Tensor:
    """Model soups (Wortsman et al. 2022), Llama 3's checkpoint averaging: sum w_i x_i / sum w_i."""
    total = sum(weights)
    out = tensors[0] * (weights[0] / total)
    for w, x in zip(weights[1:], tensors[1:]):
        out.add_(x, alpha=w / total)
    return out


@register("slerp")
def slerp(tensors: list[torch.Tensor], *, t: float, **_) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) between the two flattened parameter vectors:
    sin((1-t) theta) / sin(theta) a + sin(t theta) / sin(theta) b, theta the angle between them."""
    a, b = tensors
    norm_a, norm_b = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    if norm_a < 1e-8 or norm_b < 1e-8:
        return torch.lerp(a, b, t)
    cos = float(torch.dot(a.flatten(), b.flatten())) / (norm_a * norm_b)
    if abs(cos) > COLINEAR:
        return torch.lerp(a, b, t)
    theta = torch.tensor(min(1.0, max(-1.0, cos)), dtype=torch.float64).acos()
    s0, s1 = torch.sin((1 - t) * theta) / torch.sin(theta), torch.sin(t * theta) / torch.sin(theta)
    return a * float(s0) + b * float(s1)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the top `density` fraction of entries by magnitude, zero the rest."""
    if density >= 1:
        return delta
    k = max(1, int(density * delta.numel()))
    magnitude = delta.abs()
    threshold = magnitude.flatten().kthvalue(delta.numel() - k + 1).values
    return delta * (magnitude >= threshold)


def drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE (Yu et al. 2024, eq. 2): keep each entry with probability `density` (Bernoulli),
    rescale the survivors by 1 / density so the task vector's expectation is unchanged."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep / density


def disjoint_merge(deltas: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """TIES steps 2 and 3: elect each entry's sign from the weighted sum of the task vectors,
    then combine only the entries whose weighted sign agrees with it."""
    weighted = [d * w for d, w in zip(deltas, weights)]
    mass = weighted[0].clone()
    for wd in weighted[1:]:
        mass += wd
    sign = torch.where(mass >= 0, 1.0, -1.0)
    merged, agreeing_weight = torch.zeros_like(mass), torch.zeros_like(mass)
    for w, wd in zip(weights, weighted):
        agree = torch.sign(wd) == sign
        merged.add_(wd * agree)
        agreeing_weight.add_(agree, alpha=w)
    if normalize:
        merged /= torch.where(agreeing_weight.abs() < 1e-8, 1.0, agreeing_weight)
    return merged


def task_vector_merge(tensors: list[torch.Tensor], *, weights: list[float], base: torch.Tensor,
                      sparsify: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                      sign_consensus: bool = False, normalize: bool = False) -> torch.Tensor:
    """The general task-vector merge: base + combine(sparsify(x_i - base)). `sparsify(delta, i)`
    thins model i's task vector (None keeps it whole); with `sign_consensus` the vectors go
    through TIES' sign election and disjoint merge, else they are summed with their weights."""
    deltas = ((x - base) if sparsify is None else sparsify(x - base, i) for i, x in enumerate(tensors))
    if sign_consensus:
        return base + disjoint_merge(list(deltas), weights, normalize)
    out = base.clone()
    for w, delta in zip(weights, deltas):  # one task vector alive at a time
        out.add_(delta, alpha=w)
    return out


@register("task_arithmetic", elementwise=True)
def task_arithmetic(tensors: list[torch.Tensor], *, weights: list[float], base: torch.Tensor, **_) -> torch.Tensor:
    """Editing models with task arithmetic (Ilharco et al. 2023): base + sum w_i (x_i - base)."""
    return task_vector_merge(tensors, weights=weights, base=base)


@register("ties")
def ties(tensors: list[torch.Tensor], *, weights: list[float], base: torch.Tensor, density: list[float],
         normalize: bool, **_) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023): trim, elect sign, disjoint merge, added to base."""
    return task_vector_merge(tensors, weights=weights, base=base, sparsify=lambda d, i: trim(d, density[i]),
                             sign_consensus=True, normalize=normalize)


@register("dare_linear", random=True)
def dare_linear(tensors: list[torch.Tensor], *, weights: list[float], base: torch.Tensor, density: list[float],
                generator: torch.Generator, **_) -> torch.Tensor:
    """DARE (Yu et al. 2024) then task arithmetic: base + sum w_i dare(x_i - base)."""
    return task_vector_merge(tensors, weights=weights, base=base,
                             sparsify=lambda d, i: drop(d, density[i], generator))


@register("dare_ties", random=True)
def dare_ties(tensors: list[torch.Tensor], *, weights: list[float], base: torch.Tensor, density: list[float],
              normalize: bool, generator: torch.Generator, **_) -> torch.Tensor:
    """DARE's random drop in place of TIES' trim, then TIES' sign election and disjoint merge."""
    return task_vector_merge(tensors, weights=weights, base=base,
                             sparsify=lambda d, i: drop(d, density[i], generator),
                             sign_consensus=True, normalize=normalize)
