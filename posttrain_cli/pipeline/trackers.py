"""Experiment trackers: what a stage writes to metrics.jsonl, also to TensorBoard, Weights & Biases,
MLflow or trackio (`logging.report_to`), each through its own library (an optional extra).

    logging: {report_to: [tensorboard, wandb]}

- One group (W&B group, MLflow experiment, trackio project) per pipeline run, named by the recipe
  and its run_dir; one tracker run per stage, named `<recipe>/<stage>`, with the stage's resolved
  config, tags for its kind and fingerprint, every metrics row at the stage's step, and the final
  metrics (eval before / after, held-out) as summary values.
- A stage resumed mid-way (a checkpoint, a SLURM requeue) continues its tracker run: the runs' ids
  are kept in the stage folder (trackers.json) until the stage starts over.
- Rank 0 only. A tracker that cannot start or log (no network for W&B online, a bad MLflow URI)
  warns once and is dropped: the stage goes on, and metrics.jsonl is always complete.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

IDS_FILE = "trackers.json"


def group_name(run: dict) -> str:
    """The pipeline run's group: its recipe and run_dir."""
    return f"{run['name']} ({Path(run['run_dir']).resolve()})"


def _numbers(row: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) metrics dict, keys joined with '/'."""
    out = {}
    for k, v in row.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numbers(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def _flat(cfg: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)
    return out


class Trackers:
    """The stage's trackers (rank 0); log(row) per metrics row, finish(summary) at the end."""

    def __init__(self, spec: dict, stage_dir: Path, warn):
        self.spec, self.stage_dir, self.warn = spec, Path(stage_dir), warn
        self.names = list(spec["run"]["logging"].get("report_to") or [])
        self.open: dict[str, object] = {}
        self.started = False

    def _start(self, step: int) -> None:
        self.started = True
        ids_path = self.stage_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        run = self.spec["run"]
        info = {"group": group_name(run), "name": f"{run['name']}/{self.spec['name']}",
                "config": {"stage": self.spec["stage"], "kind": self.spec["kind"], "batch": self.spec["batch"],
                           "model": run["model"], "deepspeed": run["deepspeed"], "seed": run["seed"]},
                "tags": [self.spec["kind"], f"fingerprint:{self.spec['fingerprint'][:12]}"],
                "dir": self.stage_dir, "run_dir": Path(run["run_dir"]).resolve(), "first_step": step}
        for name in self.names:
            try:
                tracker = _OPENERS[name](info, ids.get(name))
            except Exception as e:  # noqa: BLE001 - any tracker failure is the tracker's, not the stage's
                self.warn(f"tracker {name} could not start ({type(e).__name__}: {_first_line(e)}); "
                          f"training goes on, metrics.jsonl has every row")
                continue
            self.open[name] = tracker
            ids[name] = tracker.id
        ids_path.write_text(json.dumps(ids))

    def log(self, row: dict) -> None:
        if not self.names:
            return
        step = int(row.get("step", 0))
        if not self.started:
            self._start(step)
        self._each("log", _numbers({k: v for k, v in row.items() if k != "step"}), step)

    def finish(self, summary: dict) -> None:
        if not self.names:
            return
        if not self.started:
            self._start(0)
        self._each("summary", _numbers(summary))
        self._each("close")

    def _each(self, method: str, *args) -> None:
        for name, tracker in list(self.open.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001
                self.warn(f"tracker {name} failed ({type(e).__name__}: {_first_line(e)}); dropped for this "
                          f"stage, metrics.jsonl has every row")
                self.open.pop(name)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


class _TensorBoard:
    """Event files in RUN_DIR/tensorboard/<stage>/ (`tensorboard --logdir RUN_DIR/tensorboard`); a
    resumed stage purges the events past its checkpoint."""

    def __init__(self, info: dict, old_id: str | None):
        from torch.utils.tensorboard import SummaryWriter

        self.id = "tensorboard"
        logdir = info["run_dir"] / "tensorboard" / info["dir"].name
        self.writer = SummaryWriter(str(logdir), purge_step=info["first_step"] if old_id else None)
        self.step = info["first_step"]
        self.writer.add_text("config", "```\n" + json.dumps(info["config"], indent=2, default=str) + "\n```")
        self.writer.add_text("tags", ", ".join(info["tags"]))

    def log(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.step = step
        self.writer.flush()

    def summary(self, values: dict) -> None:
        for k, v in values.items():
            self.writer.add_scalar(f"final/{k}", v, self.step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run per stage (WANDB_PROJECT, else `posttrain`; WANDB_MODE=offline works without a
    network), resumed by id."""

    def __init__(self, info: dict, old_id: str | None):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "posttrain"), group=info["group"][:128],
                              name=info["name"], id=old_id, resume="allow", config=info["config"],
                              tags=info["tags"], dir=str(info["dir"]), reinit="create_new")
        self.id = self.run.id

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    """An MLflow run per stage in an experiment per pipeline run, at MLFLOW_TRACKING_URI (default:
    the run_dir's mlruns/ file store; sqlite:///... for MLflow's database store), resumed by run id."""

    def __init__(self, info: dict, old_id: str | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # The default: a file store in the run_dir, which MLflow 3 keeps only on request.
            uri = (info["run_dir"] / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        if old_id:
            self.id = self.client.get_run(old_id).info.run_id
        else:
            exp = self.client.get_experiment_by_name(info["group"])
            exp_id = exp.experiment_id if exp else self.client.create_experiment(info["group"])
            run = self.client.create_run(exp_id, run_name=info["name"],
                                         tags={"kind": info["tags"][0], "fingerprint": info["tags"][1].split(":")[1]})
            self.id = run.info.run_id
            params = [Param(k[:250], v[:6000]) for k, v in _flat(info["config"]).items()]
            for i in range(0, len(params), 100):
                self.client.log_batch(self.id, params=params[i:i + 100])
        self.step = info["first_step"]

    def log(self, values: dict, step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
        self.step = step

    def summary(self, values: dict) -> None:
        self.log({f"final/{k}": v for k, v in values.items()}, self.step)

    def close(self) -> None:
        self.client.set_terminated(self.id)


class _Trackio:
    """A trackio run per stage in a project per pipeline run (local, TRACKIO_DIR), resumed by name."""

    def __init__(self, info: dict, old_id: str | None):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=info["group"], name=info["name"], config=info["config"],
                                resume="allow")
        self.id = info["name"]
        self.step = info["first_step"]

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)
        self.step = step

    def summary(self, values: dict) -> None:
        self.run.log({f"final/{k}": v for k, v in values.items()}, step=self.step)

    def close(self) -> None:
        self.run.finish()


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow, "trackio": _Trackio}
