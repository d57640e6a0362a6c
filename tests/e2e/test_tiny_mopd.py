"""The tiny MOPD recipe as a user types it: `posttrain run recipe=tiny_mopd`.

On demand (`python -m pytest -m demo`, about 7 minutes on 2 cores): the default run leaves it out
to keep the suite under 30 minutes. Its wiring (SFT start, two SFT teachers, a distill student routed
to them by dataset) is in the default run three times over: the mopd preset at tiny scale
(test_presets.py), distill with routed teachers on 2 ranks whose reverse KL falls
(test_distill_dist.py), and distill on real architectures (test_real_models.py); what only this test
checks is the recipe's documented result (the table in recipes/tiny_mopd.yaml).

Two teachers fine-tuned from one SFT start, on addition and on subtraction, are distilled on policy
into a student from the same start; the student ends within a few points of each teacher on that
teacher's held-out prompts, and its reverse KL to the teachers on held-out prompts falls.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import posttrain

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.demo]

# Points of held-out accuracy the student may trail a teacher by (recipes/tiny_mopd.yaml has the
# measured table). Float rounding differs across CPUs and moves these runs: over four runs on two
# machines the student ended 2.0-5.5 points below the addition / subtraction teachers (98-100%),
# 7-13 points above the start.
WITHIN = 0.06


def _metrics(run_dir, stage) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]


def _acc(run_dir, stage, when="after") -> float:
    return _metrics(run_dir, stage)["eval"][when]["accuracy"]


def test_tiny_mopd_student_matches_each_teacher(tmp_path):
    run_dir = tmp_path / "mopd"
    t0 = time.time()
    r = posttrain("run", "recipe=tiny_mopd", f"run_dir={run_dir}", cwd=tmp_path, timeout=1800)
    wall = time.time() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    table = {
        "add": {"start": _acc(run_dir, "student", "before"), "teacher": _acc(run_dir, "teacher_add"),
                "student": _acc(run_dir, "student")},
        "sub": {"start": _acc(run_dir, "start_sub"), "teacher": _acc(run_dir, "teacher_sub"),
                "student": _acc(run_dir, "student_sub")},
    }
    student = _metrics(run_dir, "student")
    print(f"tiny_mopd ({wall:.0f}s): " + "; ".join(
        f"{d}: start {v['start']:.1%}, teacher {v['teacher']:.1%}, student {v['student']:.1%}"
        for d, v in table.items())
        + f"; held-out reverse KL {student['heldout_reverse_kl_start']:.3f} -> {student['heldout_reverse_kl_end']:.3f}")
    for domain, v in table.items():
        # Each teacher learnt its domain beyond the shared start, and the student caught up with it.
        assert v["teacher"] > v["start"] + 0.1, (domain, v)
        assert v["student"] >= v["teacher"] - WITHIN, (domain, v)
        # ... and the student closed most of the gap between the start and that teacher.
        assert v["student"] - v["start"] > 0.5 * (v["teacher"] - v["start"]), (domain, v)
    assert student["heldout_reverse_kl_end"] < 0.5 * student["heldout_reverse_kl_start"], student
    for key in ("add", "sub"):
        assert student[f"heldout_reverse_kl_end/{key}"] < student[f"heldout_reverse_kl_start/{key}"], student
    for stage in ("start", "teacher_add", "teacher_sub", "student", "student_sub"):
        assert stage in r.stdout, stage
