"""posttrain report: what the page shows, extracted from a hand-written run directory (resolved.yaml,
manifests, metrics.jsonl), and the page itself (one file, nothing fetched, every stage and chart)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from posttrain_cli import report
from posttrain_cli.errors import UserError
from tests.conftest import posttrain


def _stage(kind: str, **extra) -> dict:
    return {"kind": kind, "from": None, "data": [{"path": "x.jsonl", "from": None}], "eval": None, **extra}


def _run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "runs" / "mine"
    run_dir.mkdir(parents=True)
    run = {"name": "mine", "run_dir": str(run_dir), "model": {"path": "tiny", "tiny": None},
           "stages": {"sft": _stage("sft"), "rm": _stage("reward_model"), "dpo": _stage("dpo", **{"from": "sft"}),
                      "soup": {"kind": "merge", "from": None, "models": ["sft", "dpo"], "data": []}}}
    (run_dir / "resolved.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    for name, man, rows in [
        ("sft", {"status": "completed", "timings": {"seconds": 12.5},
                 "metrics": {"tokens_per_s": 900.0, "data": {"rows": 10, "truncated": 1, "dropped": 2, "examples": 8},
                             "eval": {"before": {"accuracy": 0.0, "verifier": "number"},
                                      "after": {"accuracy": 0.5, "verifier": "number"}}}},
         [{"step": 1, "loss": 3.0, "lr": 1e-4, "tokens_per_s": 800.0},
          {"step": 2, "loss": 2.0, "lr": 2e-4, "tokens_per_s": 1000.0, "grad_norm": float("nan")}]),
        ("rm", {"status": "completed", "metrics": {"heldout": {"before": {"accuracy": 0.5}, "after": {"accuracy": 0.75}},
                                                   "data": {"train": {"rows": 4, "dropped_identical": 1},
                                                            "heldout": {"rows": 2, "dropped_too_long": 1}}}},
         [{"step": 1, "loss": 0.7}]),
        ("dpo", {"status": "failed", "error": "stages.dpo: diverged"}, [{"step": 1, "loss": 0.69, "accuracy/number": 0.25}]),
    ]:
        (run_dir / name).mkdir()
        (run_dir / name / "manifest.json").write_text(json.dumps(man))
        (run_dir / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    (run_dir / "sft" / "model").mkdir()
    return run_dir


def test_what_the_page_shows(tmp_path):
    data = report.collect(_run_dir(tmp_path))
    s = {st["name"]: st for st in data["stages"]}
    assert [st["name"] for st in data["stages"]] == ["sft", "rm", "dpo", "soup"]
    # Waves: rm and dpo read sft (rm by default, the last policy); soup merges sft and dpo.
    assert {n: (st["wave"], st["deps"]) for n, st in s.items()} == {
        "sft": (1, []), "rm": (2, ["sft"]), "dpo": (2, ["sft"]), "soup": (3, ["sft", "dpo"])}
    assert [st["status"] for st in data["stages"]] == ["completed", "completed", "failed", "pending"]
    # The curves: the finite points only (a nan is left out, a line being written skipped).
    assert s["sft"]["series"]["loss"] == [(1, 3.0), (2, 2.0)] and "grad_norm" not in s["sft"]["series"]
    assert s["dpo"]["series"]["accuracy/number"] == [(1, 0.25)]
    assert s["sft"]["tokens_per_s"] == 900.0 and s["sft"]["seconds"] == 12.5
    assert s["sft"]["data"] == {"rows": 10, "examples": 8, "truncated": 1, "dropped": 2}
    assert s["rm"]["data"] == {"rows": 6, "dropped": 2}
    assert s["sft"]["before_after"] == [("eval accuracy (number)", 0.0, 0.5)]
    assert s["rm"]["before_after"] == [("held-out preference accuracy", 0.5, 0.75)]
    assert s["sft"]["model"] is not None and s["rm"]["model"] is None and s["soup"]["steps"] == 0


def test_the_page_is_one_file_with_every_stage_and_chart(tmp_path):
    run_dir = _run_dir(tmp_path)
    r = posttrain("report", str(run_dir), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    page = (run_dir / "report.html").read_text()
    assert not re.search(r"(src|href)=['\"]https?:", page) and "<script" not in page
    for name in ("sft", "rm", "dpo", "soup"):
        assert f'data-stage="{name}"' in page and f"id='stage-{name}'" in page
    charts = re.findall(r'<svg class="chart" data-stage="(\w+)" data-metric="([^"]+)" data-points="(\d+)"', page)
    assert ("sft", "loss", "2") in charts and ("dpo", "accuracy/number", "1") in charts
    assert all(int(n) > 0 for _, _, n in charts)
    assert "stages.dpo: diverged" in page


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UserError, match="no resolved.yaml"):
        report.collect(tmp_path)
    r = posttrain("report", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "not a posttrain run directory" in r.stderr


def test_report_imports_no_heavy_library(tmp_path):
    import subprocess
    import sys

    run_dir = _run_dir(tmp_path)
    code = ("import sys\nfrom posttrain_cli.cli import app\n"
            f"sys.argv = ['posttrain', 'report', {str(run_dir)!r}]\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'datasets') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
