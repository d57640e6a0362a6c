"""Bad input through the CLI: exit 2, one line naming the key/file/row/stage, nothing trained."""

from __future__ import annotations

import json


import pytest

from tests.conftest import mini_recipe, posttrain, write_jsonl, write_recipe


def _check(result, *needles, run_dir=None):
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.stdout + result.stderr
    for n in needles:
        assert n in err, err
    if run_dir is not None:
        assert not list(run_dir.glob("*/model")), "a stage published a model"
        assert not list(run_dir.glob("*/manifest.json")), "a stage started"


def test_malformed_yaml(tmp_path):
    rec = write_recipe(tmp_path, "name: x\nstages:\n  sft:\n    kind: sft\n   lr: 1\n")
    _check(posttrain("run", f"recipe={rec}", cwd=tmp_path), "malformed YAML", "mini.yaml", "line")


def test_unknown_key(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("run", f"recipe={rec}", "stages.sft.learning_rate=1e-4", cwd=tmp_path),
           "stages.sft.learning_rate", run_dir=tmp_path / "runs")


def test_unknown_kind(tmp_path):
    rec = mini_recipe(tmp_path)
    rec.write_text(rec.read_text().replace("kind: sft", "kind: spf", 1))
    _check(posttrain("run", f"recipe={rec}", cwd=tmp_path), "stages.sft.kind", "unknown stage kind 'spf'")


def test_bad_from(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("run", f"recipe={rec}", "stages.sft2.from=nothere", cwd=tmp_path),
           "stages.sft2.from='nothere'", run_dir=tmp_path / "runs")


def test_from_later_stage(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("run", f"recipe={rec}", "stages.sft.from=sft2", cwd=tmp_path), "stages.sft.from", "sft2")


def test_missing_data_file(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("run", f"recipe={rec}", f"stages.sft2.data=[{{path: {tmp_path}/nope.jsonl}}]", cwd=tmp_path),
           "stages.sft2.data[0]", "not found", "nope.jsonl", run_dir=tmp_path / "runs")


def test_row_missing_messages(tmp_path):
    rec = mini_recipe(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]},
        {"text": "no messages here"},
    ])
    # The bad file feeds the second stage: it is caught before the first one trains.
    _check(posttrain("run", f"recipe={rec}", f"stages.sft2.data=[{{path: {bad}}}]", cwd=tmp_path),
           "bad.jsonl: row 2", "field 'messages' missing", run_dir=tmp_path / "runs")


def test_bad_role(tmp_path):
    rec = mini_recipe(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "human", "content": "hi"}]}])
    _check(posttrain("run", f"recipe={rec}", f"stages.sft.data=[{{path: {bad}}}]", cwd=tmp_path),
           "bad.jsonl: row 1", "messages[0].role")


def test_invalid_json_row(tmp_path):
    rec = mini_recipe(tmp_path)
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"messages": [', ])
    _check(posttrain("run", f"recipe={rec}", f"stages.sft.data=[{{path: {bad}}}]", cwd=tmp_path),
           "bad.jsonl: row 1", "not valid JSON")


def test_empty_dataset(tmp_path):
    rec = mini_recipe(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _check(posttrain("run", f"recipe={rec}", f"stages.sft.data=[{{path: {empty}}}]", cwd=tmp_path),
           "stages.sft.data[0]", "empty.jsonl", "no rows", run_dir=tmp_path / "runs")


def test_eval_row_missing_ground_truth(tmp_path):
    rec = mini_recipe(tmp_path)
    bad = write_jsonl(tmp_path / "ev.jsonl", [{"messages": [{"role": "user", "content": "1+1"}]}])
    _check(posttrain("run", f"recipe={rec}", f"stages.sft.eval.data=[{{path: {bad}}}]", cwd=tmp_path),
           "ev.jsonl: row 1", "ground_truth")


def test_non_dividing_batch(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("run", f"recipe={rec}", "stages.sft.global_batch_size=12", cwd=tmp_path),
           "stages.sft.global_batch_size=12", "micro_batch_size 8 x 1 rank(s) = 8", run_dir=tmp_path / "runs")


def test_dataset_smaller_than_one_batch(tmp_path):
    rec = mini_recipe(tmp_path)
    small = write_jsonl(tmp_path / "small.jsonl", [
        {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}]}] * 3)
    r = posttrain("run", f"recipe={rec}", f"stages.sft.data=[{{path: {small}}}]", "stages.sft.max_steps=null",
                  cwd=tmp_path)
    # Found only once the worker tokenized the data: the stage is marked failed, nothing published.
    _check(r, "stages.sft", "3 examples make no optimizer step")
    assert not list((tmp_path / "runs").glob("*/*/model"))
    m = json.loads((tmp_path / "runs" / "mini" / "sft" / "manifest.json").read_text())
    assert m["status"] == "failed" and "no optimizer step" in m["error"]


@pytest.mark.parametrize("args,needle", [
    (["recipe=nosuch"], "no such recipe"),
    (["stages.sft.lr=1"], "name a recipe"),
    (["recipe=tiny", "deepspeed=zero7"], "zero7"),
])
def test_usage_errors(tmp_path, args, needle):
    _check(posttrain("run", *args, cwd=tmp_path), needle)


def test_plan_reports_errors_the_same_way(tmp_path):
    rec = mini_recipe(tmp_path)
    _check(posttrain("plan", f"recipe={rec}", "stages.sft.global_batch_size=12", cwd=tmp_path),
           "does not divide")


def test_status_of_a_non_run(tmp_path):
    _check(posttrain("status", str(tmp_path), cwd=tmp_path), "not a posttrain run directory")


