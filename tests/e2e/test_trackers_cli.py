"""logging.report_to through the CLI as a user types it: a short SFT stage reported to all four
trackers offline, each store read back with its own library; a bad tracker name stops the plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import posttrain, stage_rows


@pytest.mark.slow
def test_the_tiny_recipe_reported_to_every_tracker_offline(tmp_path, monkeypatch):
    """`posttrain run recipe=tiny scale=tiny logging.report_to=[...]`: every stage of the tiny recipe (at
    tiny scale) has its tracker runs, one group for the pipeline, each store read back with its library."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from trackio.sqlite_storage import SQLiteStorage

    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio")}
    r = posttrain("run", "recipe=tiny", "scale=tiny", f"run_dir={run_dir}",
                  "logging.report_to=[tensorboard,wandb,mlflow,trackio]", cwd=tmp_path, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "warning" not in r.stdout
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store on request only
    # trackio reads TRACKIO_DIR once, when it is first imported (maybe by another test of this process)
    import trackio.sqlite_storage

    monkeypatch.setattr(trackio.sqlite_storage, "TRACKIO_DIR", Path(env["TRACKIO_DIR"]))
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    group = f"tiny ({run_dir.resolve()})"  # the recipe and its run_dir
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == [group]
    for stage in ("sft", "rm", "dpo", "grpo", "soup"):
        ids = json.loads((run_dir / stage / "trackers.json").read_text())
        assert set(ids) == {"tensorboard", "wandb", "mlflow", "trackio"}, stage
        assert list((run_dir / stage / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
        run = client.get_run(ids["mlflow"])
        assert run.info.run_name == f"tiny/{stage}" and run.data.tags["kind"] == stage_kind(stage)
        if stage == "soup":  # a merge logs no steps: its final metrics only
            assert "final/eval/after/accuracy" in run.data.metrics
            continue
        losses = [(row["step"], round(row["loss"], 5)) for row in stage_rows(run_dir, stage)]
        assert losses
        acc = EventAccumulator(str(run_dir / "tensorboard" / stage))
        acc.Reload()
        assert [(e.step, round(e.value, 5)) for e in acc.Scalars("loss")] == losses, stage
        assert [(m.step, round(m.value, 5)) for m in client.get_metric_history(ids["mlflow"], "loss")] == losses
        logged = SQLiteStorage.get_logs(group, f"tiny/{stage}")
        assert [(row["step"], round(row["loss"], 5)) for row in logged if "loss" in row] == losses, stage


def stage_kind(stage: str) -> str:
    return {"rm": "reward_model", "soup": "merge"}.get(stage, stage)


@pytest.mark.parametrize("value, msg", [
    ("[tensorbord]", "logging.report_to: 'tensorbord' is not a tracker; did you mean 'tensorboard'?"),
    ("[wandb,wandb]", "names a tracker twice"),
])
def test_a_bad_tracker_name_stops_the_plan(tmp_path, value, msg):
    r = posttrain("plan", "recipe=tiny", f"logging.report_to={value}", cwd=tmp_path)
    assert r.returncode == 2 and msg in r.stdout + r.stderr, r.stdout + r.stderr
