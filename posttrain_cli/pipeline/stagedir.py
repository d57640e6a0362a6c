"""RUN_DIR/<stage>/ before and after a stage runs: its spec, its error files, its outcome.

Every launcher goes through here: `prepare` clears a stage's leftovers and writes its spec
(stage.yaml, all the worker reads) and a `running` (slurm: `queued`) manifest; the worker writes
error.json.rank<N> when it fails; `record_failure` turns those into the manifest's `failed` (or
`stopped`) and the message the user sees. No torch: SLURM's `finish` runs this on the node.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain_cli.errors import StageFailed, UserError
from posttrain_cli.pipeline import graph, manifest
from posttrain_cli.pipeline.graph import Node

ERROR_FILE = "error.json"
# The stage stopped on a signal (a preemption, a time limit) after saving a checkpoint; under SLURM
# the job script requeues its job on this code.
EXIT_STOPPED = 75


@dataclass
class Step:
    """What the plan decided for one stage."""

    node: Node
    fingerprint: str
    eval_fingerprint: str | None
    action: str  # run | eval | skip
    batch: dict
    stage_dir: Path
    resume_key: dict | None = None


def base_model_path(run: dict, arch: dict) -> Path:
    from posttrain_cli.models import tiny
    from posttrain_cli.procs import quiet_libraries

    quiet_libraries()
    out = Path(run["run_dir"]) / "_base" / f"tiny-{tiny.arch_key(arch)}"
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + f".tmp-{uuid.uuid4().hex[:6]}")
        tiny.build_tiny(tmp, arch)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    return out.resolve()


def _model_path(run: dict, ref: tuple) -> str:
    kind, value = ref
    if kind == "stage":
        return str((graph.stage_dir(run, value) / "model").resolve())
    if kind == "tiny":
        return str(base_model_path(run, value))
    local = Path(value).expanduser()
    return str(local.resolve()) if local.exists() else value


def write_spec(run: dict, step: Step, eval_only: bool) -> Path:
    node = step.node
    spec = {
        "name": node.name,
        "kind": node.kind,
        "attempt": f"{int(time.time())}-{uuid.uuid4().hex[:6]}",
        "fingerprint": step.fingerprint,
        "eval_fingerprint": step.eval_fingerprint,
        "eval_only": eval_only,
        "resume_key": step.resume_key,
        "stage": node.cfg,
        "run": {"seed": run["seed"], "run_dir": str(Path(run["run_dir"]).resolve()), "model": run["model"],
                "deepspeed": graph.effective_deepspeed(run, node), "logging": run["logging"],
                "cluster": run["cluster"]},
        "inputs": {"model": _model_path(run, node.model_input) if node.model_input else None,
                   "models": {key: _model_path(run, ref) for key, ref in node.refs.items()},
                   "datasets": {s["from"]: str((graph.stage_dir(run, s["from"]) / "data.jsonl").resolve())
                                for _, s in graph.data_sources(node.cfg) if s["from"]}},
        "batch": step.batch,
    }
    step.stage_dir.mkdir(parents=True, exist_ok=True)
    path = step.stage_dir / "stage.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def prepare(run: dict, step: Step, say, status: str = "running") -> Path:
    """Clear a stage's leftovers, write its spec and a `running` (slurm: `queued`) manifest; -> the spec."""
    name, eval_only = step.node.name, step.action == "eval"
    if eval_only:
        say(f"[{name}] model up to date; only its eval changed, re-running the eval")
    for f in step.stage_dir.glob(f"{ERROR_FILE}.rank*"):
        f.unlink()
    for f in step.stage_dir.glob(".work-*"):
        shutil.rmtree(f, ignore_errors=True)
    spec = write_spec(run, step, eval_only)
    if not eval_only:
        from posttrain_cli.engine import checkpoint

        if checkpoint.latest(step.stage_dir) is None:
            # A resumed stage keeps its rows up to the checkpoint (the loop trims the rest).
            (step.stage_dir / "metrics.jsonl").unlink(missing_ok=True)
        manifest.write(step.stage_dir, {"status": status, "kind": step.node.kind,
                                        "fingerprint": step.fingerprint, "started": time.time()})
    return spec


def write_error(stage_dir: Path, rank: int, message: str, code: int) -> None:
    """The worker's last word on a failed stage, one file per rank."""
    try:
        (stage_dir / f"{ERROR_FILE}.rank{rank}").write_text(json.dumps({"message": message, "exit_code": code}))
    except OSError:
        pass


def worker_error(stage_dir: Path) -> tuple[str, int] | None:
    """-> (message, exit code) the worker left; a rank's bad input (exit 2) before any crash."""
    found = sorted(stage_dir.glob(f"{ERROR_FILE}.rank*"))
    for f in found:
        data = json.loads(f.read_text())
        if data["exit_code"] == 2:
            return data["message"], 2
    if found:
        data = json.loads(found[0].read_text())
        return data["message"], data["exit_code"]
    return None


def record_failure(stage_dir: Path, code: int, log: Path, eval_only: bool) -> tuple[str, int]:
    """A stage's worker exited without completing: its manifest says failed (or stopped, with a
    checkpoint to resume from), the worker's message and the log -> (message, exit code)."""
    err = worker_error(stage_dir)
    message, exit_code = err if err else (f"worker exited with code {code}", 1)
    if not eval_only:
        status = "stopped" if exit_code == EXIT_STOPPED else "failed"
        manifest.update(stage_dir, status=status, error=message, log=str(Path(log).resolve()), finished=time.time())
    return message, exit_code


def outcome(step: Step, code: int) -> Exception | None:
    """None when the stage completed; else the error to report (its manifest marked failed)."""
    name, eval_only = step.node.name, step.action == "eval"
    if code == 0 and (manifest.read(step.stage_dir) or {}).get("status") == "completed":
        return None
    log = step.stage_dir / "logs" / "rank0.log"
    message, exit_code = record_failure(step.stage_dir, code, log, eval_only)
    if exit_code == EXIT_STOPPED:
        return StageFailed(f"stage '{name}' {message}")
    if exit_code == 2:
        return UserError(message if f"stages.{name}" in message else f"stage '{name}': {message}")
    return StageFailed(f"stage '{name}' failed: {message} (log: {log})")
