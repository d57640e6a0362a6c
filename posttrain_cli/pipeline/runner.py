"""Walk the stages in order: skip what is done, launch the rest, report.

A stage is skipped when its manifest says completed under the same
fingerprint (its training config + its inputs' fingerprints) and its outputs
exist; when only its eval block changed, only the eval re-runs. A change
upstream changes every fingerprint downstream, so exactly the affected stages
run again.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from posttrain_cli.config import schema
from posttrain_cli.config.validate import batch_arithmetic, world_size
from posttrain_cli.data import schemas
from posttrain_cli.data.sources import load_source
from posttrain_cli.errors import StageFailed, UserError
from posttrain_cli.pipeline import graph, manifest
from posttrain_cli.pipeline.graph import Node
from posttrain_cli.pipeline.worker import EXIT_STOPPED


@dataclass
class Step:
    node: Node
    fingerprint: str
    eval_fingerprint: str | None
    action: str  # run | eval | skip
    batch: dict
    stage_dir: Path
    resume_key: dict | None = None


def plan(run: dict) -> list[Step]:
    """Validate the graph and the batch arithmetic; decide each stage's action (no torch)."""
    if run["cluster"]["launcher"] == "local" and run["cluster"]["nnodes"] != 1:
        raise UserError(f"cluster.nnodes={run['cluster']['nnodes']}: cluster=local runs on one node")
    nodes = graph.build(run)
    fps = graph.fingerprints(run, nodes)
    steps = []
    for node in nodes:
        fp = fps[node.name]
        sdir = graph.stage_dir(run, node.name)
        ws = world_size(run, node.cfg)
        batch = (batch_arithmetic(f"stages.{node.name}", node.cfg, ws)
                 if node.kind in schema.TRAINING_KINDS else {"world_size": ws})
        if manifest.is_done(sdir, fp["fingerprint"]):
            same_eval = manifest.read(sdir).get("eval_fingerprint") == fp["eval_fingerprint"]
            action = "skip" if same_eval or fp["eval_fingerprint"] is None else "eval"
        else:
            action = "run"
        steps.append(Step(node, fp["fingerprint"], fp["eval_fingerprint"], action, batch, sdir, fp["resume_key"]))
    return steps


def preflight(run: dict, steps: list[Step]) -> None:
    """Every local data file of every stage that will run exists and every row parses.

    Done before anything trains, so a bad row in the last stage costs seconds, not hours.
    """
    for step in steps:
        if step.action == "skip":
            continue
        node = step.node
        for where, src, rows in graph.local_source_files(node):
            parsed = load_source(src, where, schemas.ROW_SCHEMAS[rows])
            if node.cfg.get("margin") and ".data[" in where:
                schemas.require_margins(parsed, f"stages.{node.name}.margin")
            if not where.startswith(f"stages.{node.name}.eval."):
                _check_prompt_rows(node, parsed)
        inputs = ([("from", node.model_input)] if node.model_input else []) + list(node.refs.items())
        for key, (kind, value) in inputs:
            if kind == "path" and (value.startswith((".", "/", "~")) and not Path(value).expanduser().exists()):
                raise UserError(f"stages.{node.name}.{key}: model directory not found: {value}")


def _check_prompt_rows(node: Node, rows: list) -> None:
    """Rows a stage scores or routes: each resolves to a verifier (RL, rejection sampling) and,
    for distill, to a teacher."""
    from posttrain_cli.rewards.dispatch import Rewards, uses_verifiers

    if node.kind in schema.RL_KINDS | {"rejection_sampling"} and uses_verifiers(node.cfg):
        Rewards(node.cfg, where=f"stages.{node.name}").check_rows(rows)
    if node.kind == "distill" and node.cfg["combine"] == "route":
        from posttrain_cli.data.routing import check_routes

        check_routes(rows, node.cfg["teachers"], f"stages.{node.name}")


def base_model_path(run: dict, arch: dict) -> Path:
    from posttrain_cli.models import tiny
    from posttrain_cli.pipeline.worker import quiet_libraries

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


def write_resolved(run: dict, recipe_path: Path) -> Path:
    run_dir = Path(run["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "resolved.yaml"
    header = f"# posttrain: resolved from {recipe_path}\n"
    out.write_text(header + yaml.safe_dump(run, sort_keys=False))
    return out


def _worker_error(stage_dir: Path) -> tuple[str, int] | None:
    found = sorted(stage_dir.glob("error.json.rank*"))
    for f in found:
        data = json.loads(f.read_text())
        if data["exit_code"] == 2:
            return data["message"], 2
    if found:
        data = json.loads(found[0].read_text())
        return data["message"], data["exit_code"]
    return None


def _prepare(run: dict, step: Step, say, status: str = "running") -> Path:
    """Clear a stage's leftovers, write its spec and a `running` (slurm: `queued`) manifest; -> the spec."""
    name, eval_only = step.node.name, step.action == "eval"
    if eval_only:
        say(f"[{name}] model up to date; only its eval changed, re-running the eval")
    for f in step.stage_dir.glob("error.json.rank*"):
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


def record_failure(stage_dir: Path, code: int, log: Path, eval_only: bool) -> tuple[str, int]:
    """A stage's worker exited without completing: its manifest says failed (or stopped, with a
    checkpoint to resume from), the worker's message and the log -> (message, exit code)."""
    err = _worker_error(stage_dir)
    message, exit_code = err if err else (f"worker exited with code {code}", 1)
    if not eval_only:
        status = "stopped" if exit_code == EXIT_STOPPED else "failed"
        manifest.update(stage_dir, status=status, error=message, log=str(Path(log).resolve()), finished=time.time())
    return message, exit_code


def _outcome(step: Step, code: int) -> Exception | None:
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


def execute(run: dict, recipe_path: Path, say=print, *, dry_run: bool = False, wait: bool = False) -> list[Step]:
    """Run every stage that is not done, each as soon as its inputs are (up to
    cluster.parallel_stages at once). Raises UserError (exit 2) or StageFailed (exit 1).

    After a failure no new stage starts; stages already running finish (a re-run skips them).
    cluster=slurm submits one job per stage and returns (`wait`: follows them to the end);
    `dry_run` writes what would run (slurm: the job scripts) and prints it, running nothing."""
    from posttrain_cli.launch import local

    steps = plan(run)
    preflight(run, steps)
    cluster = run["cluster"]
    if cluster["launcher"] == "local" and cluster["parallel_stages"] > 1 and not dry_run:
        local.check_slots(cluster)
    write_resolved(run, recipe_path)
    for step in steps:
        if step.action == "skip":
            say(f"[{step.node.name}] skipped: completed with the same fingerprint {step.fingerprint}")
    pending = [s for s in steps if s.action != "skip"]
    if cluster["launcher"] == "slurm":
        from posttrain_cli.launch import slurm

        jobs = slurm.submit(run, pending, say, dry_run=dry_run)
        if wait and jobs and not dry_run:
            slurm.wait(Path(run["run_dir"]), jobs, cluster["poll_seconds"], say)
        return steps
    if dry_run:
        for step in pending:
            spec = write_spec(run, step, step.action == "eval")
            say(f"[{step.node.name}] " + " ".join(local.command(spec, cluster)))
        return steps
    if cluster["parallel_stages"] == 1:
        # One at a time, in recipe order (an order the graph allows), in this process where it can.
        for step in pending:
            error = _outcome(step, local.launch(_prepare(run, step, say), cluster))
            if error is not None:
                raise error
        return steps
    done = {s.node.name for s in steps if s.action == "skip"}
    return _execute_parallel(run, steps, pending, done, say)


def _execute_parallel(run: dict, steps: list[Step], pending: list[Step], done: set, say) -> list[Step]:
    from posttrain_cli.launch import local

    cluster = run["cluster"]
    free = list(range(cluster["parallel_stages"]))
    running: dict[str, tuple] = {}  # name -> (step, process, slot)
    errors: list[Exception] = []
    try:
        while pending or running:
            if not errors:
                for step in list(pending):
                    if not free:
                        break
                    if all(d in done for d in step.node.deps):
                        pending.remove(step)
                        slot = free.pop(0)
                        others = ", ".join(running)
                        say(f"[{step.node.name}] started" + (f" (alongside {others})" if others else ""))
                        running[step.node.name] = (step, local.start(_prepare(run, step, say), cluster, slot), slot)
            if not running:
                break
            time.sleep(0.2)
            for name, (step, proc, slot) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                free.append(slot)
                error = _outcome(step, code)
                if error is None:
                    done.add(name)
                else:
                    errors.append(error)
                    if running:
                        say(f"[{name}] failed; waiting for {', '.join(running)} to finish, starting nothing new")
    finally:
        for _, proc, _ in running.values():
            proc.terminate()
        for _, proc, _ in running.values():
            try:
                proc.wait(timeout=30)
            except Exception:  # noqa: BLE001 - the user interrupted; do not hang on a stuck child
                proc.kill()
    if errors:
        # A bad input (exit 2) is the user's to fix first.
        raise next((e for e in errors if isinstance(e, UserError)), errors[0])
    return steps
