"""Which examples each optimizer step sees does not depend on ranks or accumulation."""

from __future__ import annotations

from posttrain_cli.engine.loop import StepPlan, total_steps


def _batch(g, m, w):
    return {"global_batch_size": g, "micro_batch_size": m, "world_size": w, "grad_accum": g // (m * w)}


def test_same_examples_per_step_for_any_split():
    one = StepPlan(100, _batch(8, 8, 1), seed=3)
    for m, w in [(1, 1), (2, 2), (4, 2), (1, 8)]:
        plan = StepPlan(100, _batch(8, m, w), seed=3)
        for step in range(30):
            seen = sorted(i for r in range(w) for chunk in plan.micro_indices(step, r, w) for i in chunk)
            assert seen == sorted(one.step(step))
            assert all(len(plan.micro_indices(step, r, w)) == 8 // (m * w) for r in range(w))


def test_epochs_cover_every_example_once_then_reshuffle():
    plan = StepPlan(12, _batch(4, 4, 1), seed=0)
    first = [i for s in range(3) for i in plan.step(s)]
    second = [i for s in range(3, 6) for i in plan.step(s)]
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != second


def test_total_steps():
    cfg = {"max_steps": None, "epochs": 2.0, "global_batch_size": 8}
    assert total_steps(cfg, 100, "stages.s") == 25
    assert total_steps({**cfg, "max_steps": 3}, 100, "stages.s") == 3
