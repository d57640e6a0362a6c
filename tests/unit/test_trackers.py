"""Experiment trackers (pipeline/trackers.py) against each library's own offline store, read back with
that library: TensorBoard's event files, a W&B offline run (.wandb records), an MLflow file store
(its client), trackio's local database. No network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain_cli.pipeline.trackers import Trackers, group_name

ROWS = [{"step": 1, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.5}, {"step": 2, "loss": 2.0, "lr": 2e-4, "grad_norm": float("nan")}]
SUMMARY = {"train_seconds": 3.0, "eval": {"before": {"accuracy": 0.1}, "after": {"accuracy": 0.75}}}


def _spec(tmp_path: Path, report_to: list[str]) -> dict:
    return {"name": "sft", "kind": "sft", "fingerprint": "abcdef0123456789", "batch": {"global_batch_size": 8},
            "stage": {"kind": "sft", "lr": 1e-4, "data": [{"path": "x.jsonl"}]},
            "run": {"name": "tiny", "run_dir": str(tmp_path / "runs" / "tiny"), "seed": 0, "model": {"path": "tiny"},
                    "deepspeed": {"zero_stage": 2}, "logging": {"report_to": report_to}}}


def _stage_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs" / "tiny" / "sft"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _track(tmp_path, report_to, rows=ROWS, summary=SUMMARY) -> list[str]:
    warnings = []
    t = Trackers(_spec(tmp_path, report_to), _stage_dir(tmp_path), warnings.append)
    for row in rows:
        t.log(row)
    t.finish(summary)
    return warnings


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    # trackio reads TRACKIO_DIR once, when it is first imported (maybe by an earlier test)
    import trackio.sqlite_storage

    monkeypatch.setattr(trackio.sqlite_storage, "TRACKIO_DIR", tmp_path / "trackio")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets for its default store


def test_tensorboard_event_files_read_back(tmp_path, offline):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert _track(tmp_path, ["tensorboard"]) == []
    acc = EventAccumulator(str(tmp_path / "runs" / "tiny" / "tensorboard" / "sft"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
    assert [e.step for e in acc.Scalars("grad_norm")] == [1]  # a nan is not a number to plot
    assert acc.Scalars("final/eval/after/accuracy")[0].value == 0.75


def _wandb_blobs(path: Path):
    """The records of a .wandb file: W&B's LevelDB-style log (a 7-byte file header; 32 KiB blocks of
    chunks, each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and data).
    wandb's Go core writes it; its Python reader is gone since 0.2x."""
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4:pos + 6], "little"), raw[pos + 6]
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            yield pending


def _wandb_records(stage_dir: Path) -> dict:
    from wandb.proto import wandb_internal_pb2

    out = {"history": [], "summary": {}, "run": None}
    for path in sorted(stage_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for data in _wandb_blobs(path):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif kind == "summary":
                out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
            elif kind == "run":
                out["run"] = rec.run
    return out


def test_wandb_offline_run_read_back_and_resumed_by_id(tmp_path, offline):
    assert _track(tmp_path, ["wandb"]) == []
    stage_dir = _stage_dir(tmp_path)
    rec = _wandb_records(stage_dir)
    assert [(h["_step"], h["loss"]) for h in rec["history"]] == [(1, 2.5), (2, 2.0)]
    assert rec["summary"]["eval/after/accuracy"] == 0.75
    assert rec["run"].display_name == "tiny/sft" and rec["run"].run_group == group_name(_spec(tmp_path, [])["run"])
    assert "sft" in rec["run"].tags and "fingerprint:abcdef012345" in rec["run"].tags
    first_id = json.loads((stage_dir / "trackers.json").read_text())["wandb"]
    # A resumed stage (its trackers.json kept) continues the same run.
    _track(tmp_path, ["wandb"], rows=[{"step": 3, "loss": 1.5}], summary={})
    assert json.loads((stage_dir / "trackers.json").read_text())["wandb"] == first_id


def test_mlflow_file_store_read_back_and_resumed_by_run_id(tmp_path, offline):
    from mlflow.tracking import MlflowClient

    assert _track(tmp_path, ["mlflow"]) == []
    stage_dir = _stage_dir(tmp_path)
    run_id = json.loads((stage_dir / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "tiny" / "mlruns").as_uri())
    run = client.get_run(run_id)
    assert run.info.run_name == "tiny/sft" and run.data.tags["kind"] == "sft"
    assert run.data.params["stage.lr"] == "0.0001"
    assert client.get_experiment(run.info.experiment_id).name == group_name(_spec(tmp_path, [])["run"])
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.5), (2, 2.0)]
    assert run.data.metrics["final/eval/after/accuracy"] == 0.75
    _track(tmp_path, ["mlflow"], rows=[{"step": 3, "loss": 1.5}], summary={})
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3]


def test_trackio_local_store_read_back(tmp_path, offline):
    from trackio.sqlite_storage import SQLiteStorage

    assert _track(tmp_path, ["trackio"]) == []
    project = group_name(_spec(tmp_path, [])["run"])
    logs = SQLiteStorage.get_logs(project, "tiny/sft")
    losses = [(r["step"], r["loss"]) for r in logs if "loss" in r]
    assert losses == [(1, 2.5), (2, 2.0)]
    assert any(r.get("final/eval/after/accuracy") == 0.75 for r in logs)


def test_a_tracker_that_cannot_start_warns_once_and_the_others_go_on(tmp_path, offline, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    warnings = _track(tmp_path, ["mlflow", "tensorboard"])
    assert len(warnings) == 1 and warnings[0].startswith("tracker mlflow could not start")
    assert "metrics.jsonl has every row" in warnings[0]
    assert any((tmp_path / "runs" / "tiny" / "tensorboard" / "sft").iterdir())


def test_no_trackers_touch_nothing(tmp_path):
    assert _track(tmp_path, []) == []
    assert not (_stage_dir(tmp_path) / "trackers.json").exists()
