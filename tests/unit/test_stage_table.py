"""The stage table's cells from hand-written manifests: an RL stage's reward trend, a distill
stage's reverse KL (held-out when measured), a dataset stage's rows and acceptance."""

from __future__ import annotations

import json

from rich.console import Console

from posttrain_cli import ui


def _manifest(run_dir, name, kind, metrics):
    (run_dir / name).mkdir(parents=True)
    (run_dir / name / "manifest.json").write_text(json.dumps(
        {"stage": name, "kind": kind, "status": "completed", "metrics": metrics, "timings": {"seconds": 3.0}}))


def _render(table) -> str:
    console = Console(width=250, record=True)
    console.print(table)
    return console.export_text()


def test_trend_cells_by_hand():
    assert ui._trend_cell({"reward_start": 0.5, "reward_end": 0.75}) == "0.5 -> 0.75"
    assert ui._trend_cell({"reverse_kl_start": 0.4, "reverse_kl_end": 0.02}) == "KL 0.4 -> 0.02"
    # Held-out KL wins over the training samples' KL, and over an outcome reward (alpha > 0).
    assert ui._trend_cell({"reverse_kl_start": 0.4, "reverse_kl_end": 0.02, "reward_start": 0.1,
                           "reward_end": 0.2, "heldout_reverse_kl_start": 0.5,
                           "heldout_reverse_kl_end": 0.125}) == "KL 0.5 -> 0.125"
    assert ui._trend_cell({"loss": 1.0}) == "-"


def test_table_shows_distill_kl_and_dataset_rows(tmp_path):
    _manifest(tmp_path, "student", "distill", {"steps": 300, "loss": 0.01, "reverse_kl_start": 0.3,
                                               "reverse_kl_end": 0.01, "heldout_reverse_kl_start": 0.25,
                                               "heldout_reverse_kl_end": 0.02})
    _manifest(tmp_path, "rs", "rejection_sampling", {"rows": 230, "acceptance_rate": 0.9})
    _manifest(tmp_path, "soup", "merge", {})
    out = _render(ui.stage_table(tmp_path, ["student", "rs", "soup", "missing"]))
    assert "train reward" in out and "KL 0.25 -> 0.02" in out
    assert "230 rows, 90% acc." in out
    assert "not run" in out
    assert "distill: KL" in " ".join(out.split())
