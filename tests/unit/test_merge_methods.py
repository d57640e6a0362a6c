"""Merge methods on small tensors, expected values worked out by hand in each docstring."""

import math

import pytest
import torch

from posttrain_cli.kinds import KINDS
from posttrain_cli.merge.methods import MERGE_METHODS, disjoint_merge, drop, trim

T = torch.tensor


def merge(name, tensors, **opts):
    n = len(tensors)
    full = {"weights": [1.0] * n, "base": None, "density": [1.0] * n, "t": 0.5, "normalize": True,
            "generator": None, **opts}
    return MERGE_METHODS[name]([torch.as_tensor(x, dtype=torch.float32) for x in tensors], **full)


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol, rtol=0)


def test_registry_matches_schema():
    assert tuple(MERGE_METHODS) == KINDS["merge"].schema["method"][0]
    # kinds/merge.py requires `base` for exactly these (merge/spec.py: task_vectors).
    assert {n for n, f in MERGE_METHODS.items() if f.uses_base} == {"task_arithmetic", "ties", "dare_linear",
                                                                     "dare_ties"}
    assert all(f.url.startswith("https://") for f in MERGE_METHODS.values())


def test_registry_matches_spec():
    """merge/spec.py declares exactly the registered methods, in the same order, and the
    registered functions take their url and base requirement from it."""
    from posttrain_cli.merge.spec import METHODS

    assert tuple(MERGE_METHODS) == tuple(METHODS)
    for name, fn in MERGE_METHODS.items():
        assert METHODS[name].name == name
        assert (fn.url, fn.uses_base) == (METHODS[name].url, METHODS[name].task_vectors)


def test_linear_weighted():
    """(1 x [1, 2, 3] + 3 x [3, 2, -1]) / 4 = [10, 8, 0] / 4 = [2.5, 2, 0]."""
    assert close(merge("linear", [[1, 2, 3], [3, 2, -1]], weights=[1, 3]), [2.5, 2, 0])


def test_linear_equals_manual_average():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(7, 5, generator=g) for _ in range(3)]
    assert close(merge("linear", xs), torch.stack(xs).mean(0))
    # Weights need not sum to 1: only their ratios count.
    assert close(merge("linear", xs, weights=[2, 2, 2]), torch.stack(xs).mean(0))


def test_slerp_endpoints_and_midpoint():
    """a = [1, 0], b = [0, 1]: theta = pi/2; t = 0.5 gives sin(pi/4) / sin(pi/2) (a + b) = [0.7071, 0.7071]."""
    a, b = [1.0, 0.0], [0.0, 1.0]
    assert torch.equal(merge("slerp", [a, b], t=0.0), T(a))
    assert torch.equal(merge("slerp", [a, b], t=1.0), T(b))
    h = math.sqrt(0.5)
    assert close(merge("slerp", [a, b], t=0.5), [h, h])


def test_slerp_keeps_norms_and_angles():
    """a = [1, 0], b = [0.5, sqrt(3)/2] (60 degrees): t = 0.5 is the unit vector at 30 degrees,
    [cos 30, sin 30]. Unequal norms: a = [2, 0], b = [0, 1], t = 0.5 -> sin(pi/4) (a + b) = [1.4142, 0.7071]."""
    assert close(merge("slerp", [[1, 0], [0.5, math.sqrt(3) / 2]], t=0.5), [math.sqrt(3) / 2, 0.5])
    assert close(merge("slerp", [[2, 0], [0, 1]], t=0.5), [math.sqrt(2), math.sqrt(0.5)])
    # Flattened: a matrix is one vector; the same numbers as the 2-vector case.
    out = merge("slerp", [[[1, 0], [0, 0]], [[0, 0], [0, 1]]], t=0.5)
    assert out.shape == (2, 2) and close(out, [[math.sqrt(0.5), 0], [0, math.sqrt(0.5)]])


def test_slerp_colinear_is_lerp():
    """[1, 1] and [2, 2] are parallel: lerp at t = 0.25 gives [1.25, 1.25]; antiparallel at 0.5 gives 0."""
    assert close(merge("slerp", [[1, 1], [2, 2]], t=0.25), [1.25, 1.25])
    assert close(merge("slerp", [[1, 0], [-1, 0]], t=0.5), [0, 0])
    assert close(merge("slerp", [[0, 0], [2, 2]], t=0.5), [1, 1])  # a zero vector: lerp too


def test_task_arithmetic():
    """base [1, 1, 1]; deltas [1, 0, -1] (w 1) and [0, 2, 0] (w 0.5): base + [1, 1, -1] = [2, 2, 0]."""
    out = merge("task_arithmetic", [[2, 1, 0], [1, 3, 1]], weights=[1, 0.5], base=T([1.0, 1, 1]))
    assert close(out, [2, 2, 0])


def test_trim_keeps_top_fraction():
    """density 0.5 of 4 entries keeps the 2 largest magnitudes; density 0.1 keeps at least one;
    entries tied with the k-th magnitude are all kept."""
    assert close(trim(T([3.0, -1, 2, 0.5]), 0.5), [3, 0, 2, 0])
    assert close(trim(T([1.0, -4, 2, 0.5]), 0.1), [0, -4, 0, 0])
    assert close(trim(T([1.0, 1, -1, 0.5]), 0.5), [1, 1, -1, 0])
    assert close(trim(T([1.0, -2]), 1.0), [1, -2])


TIES_DELTAS = [[3, -1, 2, 0.5], [-1, 2, 4, -3], [-2, -1.5, 1, 0.25]]


def test_ties_trim_elect_disjoint_merge():
    """density 0.5 (2 of 4 kept): trimmed [3, 0, 2, 0], [0, 0, 4, -3], [-2, -1.5, 0, 0].
    Mass (weights 1) = [1, -1.5, 6, -3] -> signs [+, -, +, -]. Agreeing entries: [3], [-1.5], [2, 4], [-3]
    -> normalised (mean over agreeing models) [3, -1.5, 3, -3]; not normalised [3, -1.5, 6, -3].
    Everything is relative to base = 1."""
    base = torch.ones(4)
    xs = [T(d) + 1 for d in TIES_DELTAS]
    out = merge("ties", xs, base=base, density=[0.5] * 3)
    assert close(out, T([3, -1.5, 3, -3]) + 1)
    out = merge("ties", xs, base=base, density=[0.5] * 3, normalize=False)
    assert close(out, T([3, -1.5, 6, -3]) + 1)


def test_ties_weights():
    """Weights [1, 2, 1]: weighted trimmed [3, 0, 2, 0], [0, 0, 8, -6], [-2, -1.5, 0, 0]; mass
    [1, -1.5, 10, -6], same signs; entry 2 = (2 + 8) / (1 + 2), entry 3 = -6 / 2."""
    out = merge("ties", TIES_DELTAS, base=torch.zeros(4), density=[0.5] * 3, weights=[1, 2, 1])
    assert close(out, [3, -1.5, 10 / 3, -3])


def test_ties_sign_by_mass_not_count():
    """+1, +1, -3: two models say +, but the summed mass -1 elects -, so only -3 survives.
    +2, -2: mass 0 elects +. One entry per model, density 1 (no trim)."""
    assert close(merge("ties", [[1], [1], [-3]], base=torch.zeros(1)), [-3])
    assert close(merge("ties", [[2], [-2]], base=torch.zeros(1)), [2])
    assert close(disjoint_merge([T([1.0]), T([1.0]), T([-3.0])], [1, 1, 1], normalize=False), [-3])


def test_ties_per_model_density():
    """densities [0.25, 1]: model 0 keeps only its largest entry (3), model 1 keeps all of
    [-1, 2, 4, -3]; signs from mass [2, 2, 4, -3]; entry 0 has 3 (+) vs -1 (-): 3."""
    out = merge("ties", TIES_DELTAS[:2], base=torch.zeros(4), density=[0.25, 1.0])
    assert close(out, [3, 2, 4, -3])


def test_dare_drop_and_rescale_fixed_seed():
    """Each entry survives when the generator's uniform draw is < density, and survivors are
    divided by density: with all-ones input every output is 0 or 1 / 0.3."""
    delta = torch.ones(20_000)
    out = drop(delta, 0.3, torch.Generator().manual_seed(1234))
    keep = torch.rand(20_000, generator=torch.Generator().manual_seed(1234)) < 0.3
    assert torch.equal(out, keep / 0.3)
    assert out.unique().tolist() == pytest.approx([0.0, 1 / 0.3])
    assert abs(keep.float().mean().item() - 0.3) < 0.02
    # Expectation is kept: the mean of the dropped-and-rescaled vector stays near 1.
    assert abs(out.mean().item() - 1.0) < 0.05
    assert torch.equal(drop(delta, 1.0, torch.Generator()), delta)


def test_dare_linear_fixed_seed():
    """base 0, models 1 and 2 everywhere, densities [0.5, 1]: model 0's entries become 0 or 2, model 1's
    stay 2, so every output entry is 2 (dropped) or 4 (kept); the kept ones are the seeded draws < 0.5."""
    g = torch.Generator().manual_seed(7)
    out = merge("dare_linear", [torch.ones(1000), torch.full((1000,), 2.0)], base=torch.zeros(1000),
                density=[0.5, 1.0], generator=g)
    keep = torch.rand(1000, generator=torch.Generator().manual_seed(7)) < 0.5
    assert torch.equal(out, torch.where(keep, 4.0, 2.0))


def test_dare_at_density_one_is_its_deterministic_twin():
    g = torch.Generator().manual_seed(0)
    xs, base = [torch.randn(50, generator=g) for _ in range(3)], torch.randn(50, generator=g)
    ta = merge("task_arithmetic", xs, base=base, weights=[0.5, 1, 2])
    assert close(merge("dare_linear", xs, base=base, weights=[0.5, 1, 2], generator=torch.Generator()), ta)
    ties = merge("ties", xs, base=base)
    assert close(merge("dare_ties", xs, base=base, generator=torch.Generator()), ties)


def test_dare_ties_fixed_seed():
    """Model deltas +1 and -3 (base 0), density 0.5 each, one generator drawn in model order:
    where both survive, +2 vs -6 -> mass -4 -> -6; only the first -> +2; only the second -> -6;
    neither -> 0."""
    n = 2000
    g = torch.Generator().manual_seed(3)
    out = merge("dare_ties", [torch.ones(n), torch.full((n,), -3.0)], base=torch.zeros(n), density=[0.5, 0.5],
                generator=g)
    ref = torch.Generator().manual_seed(3)
    k0, k1 = torch.rand(n, generator=ref) < 0.5, torch.rand(n, generator=ref) < 0.5
    expected = torch.where(k1, -6.0, torch.where(k0, 2.0, 0.0))
    assert torch.equal(out, expected)


def test_elementwise_flag_holds():
    """Methods flagged elementwise give the same result on slices as on the whole tensor
    (the streamer merges them a slice at a time)."""
    g = torch.Generator().manual_seed(1)
    xs, base = [torch.randn(12, generator=g) for _ in range(2)], torch.randn(12, generator=g)
    for name, fn in MERGE_METHODS.items():
        if not fn.elementwise:
            continue
        whole = merge(name, xs, base=base, weights=[0.3, 0.9])
        parts = torch.cat([merge(name, [x[i:i + 5] for x in xs], base=base[i:i + 5], weights=[0.3, 0.9])
                           for i in range(0, 12, 5)])
        assert close(whole, parts)
