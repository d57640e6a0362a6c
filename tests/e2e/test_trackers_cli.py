"""logging.report_to through the CLI as a user types it: a short SFT stage reported to all four
trackers offline, each store read back with its own library; a bad tracker name stops the plan."""

from __future__ import annotations

import json

import pytest

from tests.conftest import mini_recipe, posttrain, sft_stage, stage_rows


@pytest.mark.slow
def test_a_stage_reported_to_every_tracker_offline(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = mini_recipe(tmp_path, stages=sft_stage(
        data=tmp_path / "train.jsonl", max_steps=3, eval=f"{{data: [{{path: {tmp_path / 'eval.jsonl'}}}], before: true}}"))
    run_dir = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(tmp_path / "trackio")}
    r = posttrain("run", f"recipe={rec}", f"run_dir={run_dir}", "logging.report_to=[tensorboard,wandb,mlflow,trackio]",
                  cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "warning" not in r.stdout
    losses = [(row["step"], row["loss"]) for row in stage_rows(run_dir, "sft")]
    assert len(losses) == 3

    acc = EventAccumulator(str(run_dir / "tensorboard" / "sft"))
    acc.Reload()
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("loss")] == [(s, round(v, 5)) for s, v in losses]
    assert acc.Scalars("final/eval/after/accuracy")

    ids = json.loads((run_dir / "sft" / "trackers.json").read_text())
    assert set(ids) == {"tensorboard", "wandb", "mlflow", "trackio"}
    assert list((run_dir / "sft" / "wandb").glob(f"offline-run-*-{ids['wandb']}/run-{ids['wandb']}.wandb"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store on request only
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    history = client.get_metric_history(ids["mlflow"], "loss")
    assert [(m.step, round(m.value, 5)) for m in history] == [(s, round(v, 5)) for s, v in losses]
    assert client.get_run(ids["mlflow"]).info.run_name == "mini/sft"


@pytest.mark.parametrize("value, msg", [
    ("[tensorbord]", "logging.report_to: 'tensorbord' is not a tracker; did you mean 'tensorboard'?"),
    ("[wandb,wandb]", "names a tracker twice"),
])
def test_a_bad_tracker_name_stops_the_plan(tmp_path, value, msg):
    r = posttrain("plan", "recipe=tiny", f"logging.report_to={value}", cwd=tmp_path)
    assert r.returncode == 2 and msg in r.stdout + r.stderr, r.stdout + r.stderr
