"""A diverged stage is never published (issue 17, section 4), driven through the CLI as a user types it.

    posttrain run recipe=mini.yaml stages.sft.lr=1e8      # meant 1.0e-8

lr 1e8 is finite, so `plan` lets it through: the first update moves every weight by about lr / 2 (the
warm-up's first step), and the second step's gradient norm is inf (ZeRO-2 reports it and skips the
update; so does float32 ZeRO-0 through posttrain's step hook). The stage stops there: exit 1 (a stage failed,
the project's code for anything that ran; exit 2 promises nothing trained), one line naming the stage
and the step, no model, the manifest `failed`, the checkpoint of step 1 kept and resumable. Values
that cannot train at all (lr inf) stop at plan time with exit 2 instead.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import mini_recipe, posttrain, sft_stage, stage_manifest, stage_rows
from tests.unit.test_merge_stream import tensors, write_model

LR_TYPO = "stages.sft.lr=1e8"
SANE_LR = "stages.sft.lr=1e-3"


def _recipe(tmp_path, **more):
    """One SFT stage of 6 steps on the mini model, a checkpoint after every step."""
    return mini_recipe(tmp_path, stages=sft_stage("sft", data=tmp_path / "train.jsonl", lr=1.0e-3, max_steps=6,
                                                  save_every=1, **more))


def _error_line(r) -> str:
    """The run's one line of error, with no traceback."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _kept_checkpoint(stage_dir) -> str:
    """The only checkpoint left, which `latest` names; its weights are finite."""
    root = stage_dir / "checkpoints"
    name = (root / "latest").read_text().strip()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [name]
    meta = json.loads((root / name / "meta.json").read_text())
    states = torch.load(root / name / "ds" / "state" / "mp_rank_00_model_states.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in states["module"].values() if t.is_floating_point())
    return f"{name} (step {meta['step']})"


def _not_published(stage_dir, *, written: bool = False) -> None:
    """No model in the stage directory, the manifest `failed`. A trained model is not even written
    into the stage's work folder; a merge streams its shards there (`written`), never renamed into place."""
    assert not (stage_dir / "model").exists()
    assert written or not list(stage_dir.glob(".work-*/model/*.safetensors"))
    m = json.loads((stage_dir / "manifest.json").read_text())
    assert m["status"] == "failed", m


@pytest.mark.slow
def test_diverged_stage_stops_keeps_its_last_good_checkpoint_and_a_sane_rerun_proceeds(tmp_path):
    rec = _recipe(tmp_path)
    stage_dir = tmp_path / "runs" / "mini" / "sft"

    r = posttrain("run", f"recipe={rec}", LR_TYPO, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    line = _error_line(r)
    assert line.startswith("error: ") and "stage 'sft' failed" in line
    assert "stages.sft: gradient norm inf at step 2 of 6: training diverged and stopped; nothing published, " \
           "the last good checkpoint step-000001 is kept; lower stages.sft.lr (now 1e+08)" in line
    _not_published(stage_dir)
    assert "step 2 of 6" in stage_manifest(tmp_path / "runs" / "mini", "sft")["error"]
    assert _kept_checkpoint(stage_dir) == "step-000001 (step 1)"
    # The diverged step is logged, as it was.
    rows = stage_rows(tmp_path / "runs" / "mini", "sft")
    assert [row["step"] for row in rows] == [1, 2] and math.isinf(rows[1]["grad_norm"])

    # The kept checkpoint is whole: the same command resumes from it (and diverges at the same step).
    again = posttrain("run", f"recipe={rec}", LR_TYPO, cwd=tmp_path)
    assert again.returncode == 1
    assert "[sft] resumed from step-000001: step 1 of 6" in again.stdout
    assert "gradient norm inf at step 2 of 6" in _error_line(again)
    _not_published(stage_dir)

    # A sane lr makes that checkpoint stale: the stage starts over, completes and publishes.
    fixed = posttrain("run", f"recipe={rec}", SANE_LR, cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "is stale (lr 100000000.0 -> 0.001); starting the stage over" in fixed.stdout
    assert stage_manifest(tmp_path / "runs" / "mini", "sft")["status"] == "completed"
    weights = load_file(stage_dir / "model" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (stage_dir / "checkpoints").exists() and not list(stage_dir.glob("error.json.rank*"))


@pytest.mark.slow
def test_patience_tolerates_non_finite_steps_but_never_checkpoints_them(tmp_path):
    """nonfinite_patience 2: steps 2 and 3 (inf gradient norm) pass, step 4 stops the stage. Their
    checkpoints (save_every 1) are not written: step 1's stays the last good one."""
    rec = _recipe(tmp_path)
    stage_dir = tmp_path / "runs" / "mini" / "sft"
    r = posttrain("run", f"recipe={rec}", LR_TYPO, "stages.sft.nonfinite_patience=2", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stages.sft: gradient norm inf at step 4 of 6 (3 steps in a row, nonfinite_patience 2): training " \
           "diverged and stopped" in _error_line(r)
    _not_published(stage_dir)
    assert _kept_checkpoint(stage_dir) == "step-000001 (step 1)"
    assert [row["step"] for row in stage_rows(tmp_path / "runs" / "mini", "sft")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_zero0_skips_the_inf_gradient_as_zero2_does(tmp_path):
    """float32 ZeRO-0 (posttrain's step hook) does what ZeRO-1/2 do: the gradient norm is reported,
    a non-finite one skips the update; step 2 is neither checkpointed nor published."""
    rec = _recipe(tmp_path)
    stage_dir = tmp_path / "runs" / "mini" / "sft"
    r = posttrain("run", f"recipe={rec}", LR_TYPO, "deepspeed=zero0", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stages.sft: gradient norm inf at step 2 of 6" in _error_line(r)
    _not_published(stage_dir)
    assert _kept_checkpoint(stage_dir) == "step-000001 (step 1)"


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_stop_at_the_same_step(tmp_path):
    """Under 2 ranks (ZeRO-3) the flag is all-reduced: both ranks stop at step 2 and say so; none
    waits in a collective for the other (the run ends well inside its timeout)."""
    rec = _recipe(tmp_path)
    stage_dir = tmp_path / "runs" / "mini" / "sft"
    r = posttrain("run", f"recipe={rec}", LR_TYPO, "cluster.nproc_per_node=2", "deepspeed=zero3", cwd=tmp_path,
                  timeout=400)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stages.sft: gradient norm inf at step 2 of 6" in _error_line(r)
    for rank in (0, 1):
        err = json.loads((stage_dir / f"error.json.rank{rank}").read_text())
        assert err["exit_code"] == 1 and "at step 2 of 6" in err["message"], err
    _not_published(stage_dir)
    root = stage_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-000001"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step-000001"]


@pytest.mark.slow
def test_merge_of_a_model_holding_nan_is_not_published(tmp_path):
    """A merge input with a nan (a broken download, a diverged model from elsewhere): the merge stops
    at that tensor, names it and the input, and publishes nothing."""
    good = write_model(tmp_path / "good", tensors(0))
    broken = tensors(1)
    broken["model.norm.weight"][1] = math.nan
    bad = write_model(tmp_path / "bad", broken)
    rec = mini_recipe(tmp_path, stages=f"soup: {{kind: merge, models: [{good}, {bad}]}}\n")
    r = posttrain("run", f"recipe={rec}", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stages.soup: the merged tensor model.norm.weight holds non-finite values (the input " \
           "stages.soup.models[1] holds nan or inf there); the merge is not published" in _error_line(r)
    _not_published(tmp_path / "runs" / "mini" / "soup", written=True)

    # The same merge of finite models publishes.
    shutil.rmtree(bad)
    write_model(bad, tensors(1))
    ok = posttrain("run", f"recipe={rec}", cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (tmp_path / "runs" / "mini" / "soup" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("override,key", [
    ("stages.sft.lr=inf", "stages.sft.lr=inf"),
    ("stages.sft.adam_betas=[0.9,1.0]", "stages.sft.adam_betas=[0.9, 1.0]"),
    ("seed=18446744073709551616", "seed=18446744073709551616"),
])
def test_values_that_cannot_train_stop_before_anything_runs(tmp_path, override, key):
    """`plan` and `run` alike: exit 2, one line starting with the full key; run leaves no stage behind.
    (Every refused value, with its message: tests/unit/test_trainable_values.py.)"""
    rec = _recipe(tmp_path)
    for command in ("plan", "run"):
        r = posttrain(command, f"recipe={rec}", override, cwd=tmp_path)
        assert r.returncode == 2, r.stdout + r.stderr
        assert _error_line(r).startswith(f"error: {key}")
    assert not (tmp_path / "runs" / "mini" / "sft").exists()
