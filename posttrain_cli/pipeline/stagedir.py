"""RUN_DIR/<stage>/ before and after a stage runs: its spec, its error files, its outcome.

Every launcher goes through here: `prepare` clears a stage's leftovers and writes its spec
(stage.yaml, all the worker reads) and a `running` (slurm: `queued`) manifest; the worker writes
error.json.rank<N> when it fails; `record_failure` turns those into the manifest's `failed` (or
`stopped`) and the message the user sees. No torch: SLURM's `finish` runs this on the node.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
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


# A hub id: `name` or `org/name`, of letters, digits, '-', '_' and '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def local_model_path(value: str) -> bool:
    """Whether a model path (model.path, a stage's `from`, a reference) names a local directory rather
    than a hub id. It does when it exists, starts with / ./ ../ or ~, cannot be a hub id (more than
    one '/', a space or another character no hub id holds), or its first part is a local directory
    (`models/llama` where ./models exists). Otherwise `org/name` (and a bare `name`) is a hub id."""
    path = Path(value).expanduser()
    if path.exists() or value.startswith(("/", "./", "../", "~")) or value in (".", ".."):
        return True
    if not _HUB_ID.fullmatch(value):
        return True
    return "/" in value and Path(value.split("/", 1)[0]).is_dir()


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
        "run": {"name": run["name"], "seed": run["seed"], "run_dir": str(Path(run["run_dir"]).resolve()),
                "model": run["model"],
                "deepspeed": graph.effective_deepspeed(run, node), "logging": run["logging"],
                "rollout": graph.effective_rollout(run, node),
                "lora": graph.stage_lora(run, node.cfg),
                "cluster": run["cluster"]},
        "inputs": {"model": _model_path(run, node.model_input) if node.model_input else None,
                   "models": {key: _model_path(run, ref) for key, ref in node.refs.items()},
                   "datasets": {s["from"]: str((graph.stage_dir(run, s["from"]) / "data.jsonl").resolve())
                                for _, s in graph.data_sources(node.cfg) if s["from"]}},
        "batch": step.batch,
    }
    step.stage_dir.mkdir(parents=True, exist_ok=True)
    path = step.stage_dir / "stage.yaml"
    write_text_atomic(path, yaml.safe_dump(spec, sort_keys=False))
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """A temporary file renamed over `path`: a reader (or a killed writer) never sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
            # A resumed stage keeps its rows up to the checkpoint (the loop trims the rest), and its
            # tracker runs (pipeline/trackers.py); a stage that starts over gets new ones.
            (step.stage_dir / "metrics.jsonl").unlink(missing_ok=True)
            (step.stage_dir / "trackers.json").unlink(missing_ok=True)
        manifest.write(step.stage_dir, {"status": status, "kind": step.node.kind,
                                        "fingerprint": step.fingerprint, "started": time.time(),
                                        "procs": [this_process("launcher")]})
    return spec


# ------------------------------------------------------------------ a stage whose processes died


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process (Linux /proc), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], fields[19]


def this_process(role: str) -> dict:
    """What a manifest records of a process working on a stage, to tell later whether it still runs."""
    stat = _stat(os.getpid())
    return {"role": role, "host": socket.gethostname(), "pid": os.getpid(), "start": stat[1] if stat else None}


def _alive(proc: dict) -> bool | None:
    """Whether a recorded process still runs; None when it ran on another machine (cannot tell)."""
    if proc.get("host") != socket.gethostname() or not proc.get("pid"):
        return None
    try:
        os.kill(int(proc["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _stat(int(proc["pid"]))
    if stat is None:
        return True  # no /proc (not Linux): the pid exists
    state, start = stat
    # A zombie has exited (its parent has not reaped it yet); another start time is another process.
    return state != "Z" and (proc.get("start") is None or start == proc["start"])


def running_procs(stage_dir: Path) -> list[dict]:
    """The processes of a stage whose manifest says `running` and that still run on this machine."""
    m = manifest.read(stage_dir) or {}
    if m.get("status") != "running":
        return []
    return [p for p in m.get("procs") or [] if _alive(p)]


def reap_dead(stage_dir: Path) -> str | None:
    """A stage left `running` by processes that all died without a word (SIGKILL, the out-of-memory
    killer, a lost node's local run) is marked failed; -> the message, or None when nothing changed.
    A process on another machine counts as alive: this machine cannot tell."""
    m = manifest.read(stage_dir) or {}
    procs = m.get("procs") or []
    if m.get("status") != "running" or not procs or any(_alive(p) is not False for p in procs):
        return None
    from posttrain_cli.engine import checkpoint

    pids = ", ".join(str(p["pid"]) for p in procs)
    ckpt = checkpoint.latest(stage_dir)
    message = (f"its process{'es' if len(procs) > 1 else ''} ({pids} on {procs[0]['host']}) died without a "
               f"word (killed: SIGKILL, out of memory?); " +
               (f"the checkpoint {ckpt.name} is kept: the same command resumes it" if ckpt else
                "the same command runs it again"))
    manifest.update(stage_dir, status="failed", error=message, finished=time.time())
    return message


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
    message, exit_code = err if err else (_exit_reason(code), 1)
    # One line for the user (a library's message may run over several); the log has the rest.
    message = next((line.strip() for line in message.splitlines() if line.strip()), message)
    if not eval_only:
        status = "stopped" if exit_code == EXIT_STOPPED else "failed"
        manifest.update(stage_dir, status=status, error=message, log=str(Path(log).resolve()), finished=time.time())
    return message, exit_code


def _exit_reason(code: int) -> str:
    import signal

    if code < 0 or code > 128:
        sig = -code if code < 0 else code - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        why = " (out of memory?)" if name == "SIGKILL" else ""
        return f"the worker was killed by {name}{why}"
    return f"worker exited with code {code}"


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
