"""Bad preference input through the CLI: malformed rows stop the run before anything trains
(exit 2, one line naming file, row and field); identical answers are dropped and counted."""

from __future__ import annotations

import json

import pytest

from tests.conftest import mini_recipe, posttrain, sft_stage, tiny_rows, with_bad_rows
from tests.e2e.test_bad_input import _check

U = {"role": "user", "content": "1+2"}


def _pref_recipe(tmp, rows, extra: str = "", kind: str = "dpo"):
    # Rows without the shipped `margin`, so that `margin: true` has something to refuse.
    good = [{k: v for k, v in r.items() if k != "margin"} for r in tiny_rows("pref_train.jsonl", 40)]
    data = with_bad_rows(tmp / "prefs.jsonl", good, 6, rows)
    return mini_recipe(tmp, stages=[sft_stage(data=tmp / "train.jsonl", max_steps=2, global_batch_size=8), f"""
      pref:
        kind: {kind}
        data: [{{path: {data}}}]
        max_steps: 2
        global_batch_size: 8
        micro_batch_size: 8
        max_seq_len: 64
        {extra}
    """])


@pytest.mark.parametrize("row, field", [
    ({"chosen": [U, {"role": "assistant", "content": "3"}]}, "field 'rejected' missing"),
    ({"chosen": [U, {"role": "assistant", "content": "3"}],
      "rejected": [{"role": "user", "content": "1+3"}, {"role": "assistant", "content": "4"}]}, "different prompts"),
    ({"prompt": "1+2", "chosen": "3", "rejected": ["4"]}, "field 'rejected[0]'"),
])
def test_malformed_preference_row_stops_before_training(tmp_path, row, field):
    rec = _pref_recipe(tmp_path, [row])
    _check(posttrain("run", f"recipe={rec}", cwd=tmp_path), "prefs.jsonl", "row 6", field, run_dir=tmp_path / "runs")


def test_unknown_loss_is_a_config_error(tmp_path):
    rec = _pref_recipe(tmp_path, [])
    _check(posttrain("run", f"recipe={rec}", "stages.pref.loss=dpo_nrom", cwd=tmp_path),
           "stages.pref.loss='dpo_nrom'", "dpo_norm", run_dir=tmp_path / "runs")


def test_ref_from_a_reward_model_is_refused(tmp_path):
    rec = _pref_recipe(tmp_path, [], kind="reward_model")
    rec.write_text(rec.read_text() + "  dpo:\n    kind: dpo\n    ref_from: pref\n"
                   f"    data: [{{path: {tmp_path}/prefs.jsonl}}]\n")
    _check(posttrain("run", f"recipe={rec}", cwd=tmp_path), "stages.dpo.ref_from", "reward_model stage",
           run_dir=tmp_path / "runs")


def test_margin_without_margins_names_the_row(tmp_path):
    rec = _pref_recipe(tmp_path, [], extra="margin: true", kind="reward_model")
    _check(posttrain("run", f"recipe={rec}", cwd=tmp_path), "prefs.jsonl: row 1", "field 'margin' missing",
           "stages.pref.margin", run_dir=tmp_path / "runs")


@pytest.mark.slow
def test_identical_answers_are_dropped_and_counted(tmp_path):
    same = {"prompt": "1+2", "chosen": "3", "rejected": "3"}
    rec = _pref_recipe(tmp_path, [same, same])
    r = posttrain("run", f"recipe={rec}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "42 preference rows -> 40 examples; dropped: 2 with identical answers" in r.stdout
    m = json.loads((tmp_path / "runs" / "mini" / "pref" / "manifest.json").read_text())
    assert m["metrics"]["data"]["train"]["dropped_identical"] == 2
