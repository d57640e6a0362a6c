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


def test_sigkill_mid_stage_then_rerun_trains_again(tmp_path):
    rec = mini_recipe(tmp_path)
    run_dir = tmp_path / "runs" / "mini"
    exe = Path(sys.executable).parent / "posttrain"
    proc = subprocess.Popen([str(exe), "run", f"recipe={rec}", "stages.sft.max_steps=400"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = run_dir / "sft" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert metrics.exists(), "training never started"
    m = json.loads((run_dir / "sft" / "manifest.json").read_text())
    assert m["status"] == "running"
    assert not (run_dir / "sft" / "model").exists()

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
