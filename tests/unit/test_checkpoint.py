"""Mid-stage checkpoint rules without training: which changes refuse a resume, which start the
stage over; the stop-signal flag; metrics rows trimmed to the resumed step."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import pytest

from posttrain_cli.engine import checkpoint
from posttrain_cli.engine.loop import _trim_metrics
from posttrain_cli.errors import UserError
from posttrain_cli.pipeline.context import StageContext
from posttrain_cli.pipeline.graph import training_part


def _ctx(tmp_path: Path, **changes) -> StageContext:
    cfg = {"kind": "sft", "lr": 1e-3, "max_steps": 40, "global_batch_size": 8, "micro_batch_size": 4,
           "save_every": 5, "data": [{"path": "x.jsonl"}], "eval": None, "resources": None, "deepspeed": None}
    spec = {"name": "sft", "kind": "sft", "fingerprint": "fp-a", "resume_key": {"data": "d1", "inputs": "i1"},
            "stage": cfg, "run": {"seed": 0, "deepspeed": {"zero_stage": 2}, "logging": {}},
            "batch": {"global_batch_size": 8, "micro_batch_size": 4, "world_size": 1, "grad_accum": 2}}
    for key, value in changes.items():
        if key in cfg or key in spec["batch"]:
            if key in cfg:
                cfg[key] = value
            if key in spec["batch"]:
                spec["batch"][key] = value
        elif key == "seed":
            spec["run"]["seed"] = value
        elif key == "zero_stage":
            spec["run"]["deepspeed"]["zero_stage"] = value
        else:
            spec[key] = value
    # What the pipeline writes into the spec: the training settings a checkpoint records.
    spec["resume_key"].setdefault("config", {k: v for k, v in training_part(cfg).items() if k != "data"})
    return StageContext(spec, tmp_path, tmp_path / ".work", logging.getLogger("test"))


def _meta(tmp_path: Path) -> dict:
    return {**checkpoint.resume_key(_ctx(tmp_path)), "step": 10, "total": 40}


def test_same_run_resumes(tmp_path):
    assert checkpoint.check(_ctx(tmp_path), _meta(tmp_path), tmp_path / "step-000010") is True


def test_save_every_is_not_part_of_what_must_match(tmp_path):
    ctx = _ctx(tmp_path, save_every=50)
    assert checkpoint.check(ctx, _meta(tmp_path), tmp_path) is True


@pytest.mark.parametrize("change, words", [
    ({"global_batch_size": 16}, "global_batch_size 8 -> 16"),
    ({"micro_batch_size": 2}, "micro_batch_size 4 -> 2"),
    ({"world_size": 2}, "world_size 1 -> 2"),
    ({"zero_stage": 3}, "deepspeed.zero_stage 2 -> 3"),
])
def test_changed_batch_settings_are_refused(tmp_path, change, words):
    with pytest.raises(UserError) as e:
        checkpoint.check(_ctx(tmp_path, **change), _meta(tmp_path), tmp_path / "step-000010")
    msg = str(e.value)
    assert "stages.sft: the checkpoint at step 10 of 40" in msg and words in msg
    assert f"delete {tmp_path / 'checkpoints'}" in msg and "\n" not in msg


@pytest.mark.parametrize("change", [{"resume_key": {"data": "d2", "inputs": "i1"}}, {"seed": 1}])
def test_changed_data_is_refused(tmp_path, change):
    with pytest.raises(UserError) as e:
        checkpoint.check(_ctx(tmp_path, **change), _meta(tmp_path), tmp_path)
    assert "was written for other data" in str(e.value)


def test_other_changes_make_it_stale(tmp_path, capsys):
    said = []
    ctx = _ctx(tmp_path, lr=2e-3, fingerprint="fp-b")
    ctx.info = said.append
    assert checkpoint.check(ctx, _meta(tmp_path), tmp_path) is False
    assert said == ["checkpoint at step 10 is stale (lr 0.001 -> 0.002); starting the stage over"]
    ctx = _ctx(tmp_path, fingerprint="fp-c", resume_key={"data": "d1", "inputs": "i2"})
    ctx.info = said.append
    assert checkpoint.check(ctx, _meta(tmp_path), tmp_path) is False
    assert "an input model changed" in said[-1]


def test_latest_ignores_a_checkpoint_without_meta(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step-000005").mkdir(parents=True)
    (root / "latest").write_text("step-000005\n")
    assert checkpoint.latest(tmp_path) is None  # a save killed before meta.json
    (root / "step-000005" / "meta.json").write_text("{}")
    assert checkpoint.latest(tmp_path) == root / "step-000005"


def test_stop_signals_set_a_flag_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with checkpoint.StopSignals() as s:
        assert s.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert s.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
    ctx = _ctx(tmp_path)
    rows = [{"step": i, "loss": 1.0 / i} for i in range(1, 9)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _trim_metrics(ctx, 5)
    assert [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    _trim_metrics(ctx, 0)
    assert (tmp_path / "metrics.jsonl").read_text() == ""
