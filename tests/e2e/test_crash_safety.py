"""A stage killed mid-way leaves nothing a later run would trust."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import mini_recipe, posttrain

pytestmark = pytest.mark.slow


def _start(rec, tmp_path, *overrides):
    """`posttrain run` in the background, in a process group of its own (as a terminal's job)."""
    exe = Path(sys.executable).parent / "posttrain"
    return subprocess.Popen([str(exe), "run", f"recipe={rec}", *overrides], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for_rows(metrics: Path, rows: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= rows):
        time.sleep(0.2)
    assert metrics.exists(), "training never started"


def test_ctrl_c_stops_with_a_checkpoint_and_a_killed_stage_is_marked_failed(tmp_path):
    """Issue 17. While a stage trains, a second `run` of the same run_dir is refused. Ctrl-C (SIGINT to
    the terminal's process group) stops it like SIGTERM: a checkpoint at the next step, exit 1 with
    one line, the manifest `stopped`. The same command resumes; SIGKILL then (the out-of-memory
    killer's signal) leaves the manifest `running`, and `status` sees the dead process and marks the
    stage failed, keeping the checkpoint. Nothing is published; a later run trains the stage again."""
    rec = mini_recipe(tmp_path)
    run_dir = tmp_path / "runs" / "mini"
    sft = run_dir / "sft"
    metrics = sft / "metrics.jsonl"
    proc = _start(rec, tmp_path, "stages.sft.max_steps=400", "logging.log_every=1")
    _wait_for_rows(metrics, 2)

    second = posttrain("run", f"recipe={rec}", "stages.sft.max_steps=400", cwd=tmp_path)
    assert second.returncode == 2, second.stdout + second.stderr
    assert f"stage 'sft' is running now (pid {proc.pid})" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1

    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, out + err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in out + err, err
    assert "error: stage 'sft' stopped by SIGINT at step" in err and "the same command resumes it" in err
    m = json.loads((sft / "manifest.json").read_text())
    assert m["status"] == "stopped" and "SIGINT" in m["error"]
    saved = (sft / "checkpoints" / "latest").read_text().strip()
    assert not (sft / "model").exists()

    proc = _start(rec, tmp_path, "stages.sft.max_steps=400", "logging.log_every=1")
    step = int(saved.split("-")[1])
    _wait_for_rows(metrics, step + 2)
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    assert f"resumed from {saved}" in out
    assert json.loads((sft / "manifest.json").read_text())["status"] == "running"
    assert not (sft / "model").exists()

    status = posttrain("status", str(run_dir), cwd=tmp_path)
    assert status.returncode == 0 and "Traceback" not in status.stdout + status.stderr, status.stderr
    assert "sft: its process" in status.stdout and "died without a word" in status.stdout
    m = json.loads((sft / "manifest.json").read_text())
    assert m["status"] == "failed" and "(killed: SIGKILL, out of memory?)" in m["error"]
    assert "is kept: the same command resumes it" in m["error"] and (sft / "checkpoints").is_dir()

    plan = posttrain("plan", f"recipe={rec}", "stages.sft.max_steps=400", cwd=tmp_path)
    assert "skip" not in plan.stdout.split("2. sft2")[0]

    r = posttrain("run", f"recipe={rec}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[sft] skipped" not in r.stdout
    assert not list((run_dir / "sft").glob(".work-*"))


def test_missing_output_means_not_done(tmp_path):
    rec = mini_recipe(tmp_path)
    assert posttrain("run", f"recipe={rec}", cwd=tmp_path).returncode == 0
    import shutil

    shutil.rmtree(tmp_path / "runs" / "mini" / "sft2" / "model")
    r = posttrain("run", f"recipe={rec}", cwd=tmp_path)
    assert r.returncode == 0
    assert "[sft] skipped" in r.stdout and "[sft2] skipped" not in r.stdout
