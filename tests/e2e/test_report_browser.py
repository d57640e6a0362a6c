"""`posttrain report` of the tiny recipe's run (the README's main job, shared with test_tiny_recipe.py),
opened in a real headless browser, Debian's chromium: the page the browser built holds every stage and
a drawn line in every chart, and its screenshot shows the stage graph and the curves.

Chromium is installed with apt-get when it is missing and this runs as root; elsewhere the test is
skipped with the reason (POSTTRAIN_REQUIRE_CHROMIUM=1 makes that a failure)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from posttrain_cli.report import LINE, STATUS_COLOURS
from tests.conftest import posttrain

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

STAGES = ["sft", "rm", "dpo", "grpo", "soup"]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            subprocess.run(cmd, env=env, capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if not found:
        reason = "chromium is not installed (apt-get install chromium)"
        if os.environ.get("POSTTRAIN_REQUIRE_CHROMIUM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _browser(chromium: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--allow-file-access-from-files", *args], capture_output=True, text=True, timeout=180)


def test_the_tiny_runs_report_renders_in_a_browser(tiny_run, tmp_path):
    from PIL import Image

    assert tiny_run.result.returncode == 0, tiny_run.result.stdout[-3000:]
    chromium = _chromium()
    r = posttrain("report", str(tiny_run.run_dir), cwd=tiny_run.cwd)
    assert r.returncode == 0, r.stderr
    page = tiny_run.run_dir / "report.html"

    # The document the browser built: every stage in the graph, completed, and a line in every chart.
    dom = _browser(chromium, "--dump-dom", page.as_uri()).stdout
    for name in STAGES:
        assert re.search(rf'<g class="stage" data-stage="{name}" data-status="completed">', dom), name
    charts = re.findall(r'<svg class="chart" data-stage="(\w+)" data-metric="([^"]+)" data-points="(\d+)".*?'
                        r'<polyline points="([^"]*)"', dom, flags=re.S)
    assert {s for s, *_ in charts} == {"sft", "rm", "dpo", "grpo"}  # soup (merge) logs no steps
    for stage, metric, n, points in charts:
        assert int(n) >= 1 and len(points.split()) == int(n), (stage, metric)
    assert {"loss", "lr", "grad_norm"} <= {m for s, m, *_ in charts if s == "sft"}
    assert {"reward", "kl", "accuracy/number"} <= {m for s, m, *_ in charts if s == "grpo"}

    # The screenshot: the stage boxes in their status colour and the curves' line colour are drawn.
    shot = tmp_path / "report.png"
    _browser(chromium, f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri())
    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    count = {rgb: n for n, rgb in colours}
    rgb = lambda h: tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))  # noqa: E731
    assert count.get(rgb(STATUS_COLOURS["completed"]), 0) > 5 * 150 * 30  # five stage boxes
    assert count.get(rgb(LINE), 0) > 20 * len(charts)  # every chart's line
    shutil.copyfile(shot, tiny_run.run_dir / "report.png")
