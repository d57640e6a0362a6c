"""Rounds and branches as a user runs them: round r reads round r-1's outputs, more rounds is one
override (the done ones are skipped), independent branches run at once with
cluster.parallel_stages=2, and a failed branch stops its dependents but not its sibling."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import mini_recipe, posttrain, sft_stage, stage_manifest, tiny_rows, write_jsonl

pytestmark = pytest.mark.slow


def _data(tmp_path):
    sft = write_jsonl(tmp_path / "sft.jsonl", tiny_rows("sft_train.jsonl", 128))
    pref = write_jsonl(tmp_path / "pref.jsonl", tiny_rows("pref_train.jsonl", 64))
    return sft, pref


def test_rounds_read_the_previous_round_and_grow_by_one_override(tmp_path):
    sft, pref = _data(tmp_path)
    ft = sft_stage("ft", from_="prev.dpo", data=f"[{sft}]", lr=1.0e-3, max_steps=2, micro_batch_size=16)
    dpo = (f"dpo: {{kind: dpo, from: ft, data: [{pref}], max_steps: 2, global_batch_size: 16, micro_batch_size: 16,"
           " max_seq_len: 64, lr: 1.0e-3}\n")
    loop = textwrap.dedent("""
      loop:
        kind: rounds
        count: 2
        initial: {dpo: base}
        stages:
    """) + textwrap.indent(ft + dpo, "    ")
    recipe = mini_recipe(tmp_path, stages=[sft_stage("base", data=f"[{sft}]", max_steps=2, micro_batch_size=16), loop])
    run_dir = tmp_path / "runs" / "mini"
    first = posttrain("run", f"recipe={recipe}", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    model = lambda s: str((run_dir / s / "model").resolve())  # noqa: E731
    assert stage_manifest(run_dir, "r1.ft")["inputs"]["model"] == model("base")
    assert stage_manifest(run_dir, "r2.ft")["inputs"]["model"] == model("r1.dpo")
    assert stage_manifest(run_dir, "r2.dpo")["inputs"]["model"] == model("r2.ft")
    for name in ("r1.ft", "r1.dpo", "r2.ft", "r2.dpo"):
        assert name in first.stdout  # the final table

    plan = posttrain("plan", f"recipe={recipe}", "stages.loop.count=3", cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    assert "round 3 (r3.*)" in plan.stdout and "r3.ft" in plan.stdout

    more = posttrain("run", f"recipe={recipe}", "stages.loop.count=3", cwd=tmp_path)
    assert more.returncode == 0, more.stdout + more.stderr
    for name in ("base", "r1.ft", "r1.dpo", "r2.ft", "r2.dpo"):
        assert f"[{name}] skipped" in more.stdout
    assert stage_manifest(run_dir, "r3.ft")["inputs"]["model"] == model("r2.dpo")
    assert stage_manifest(run_dir, "r3.dpo")["status"] == "completed"


def _branches(tmp_path):
    sft, _ = _data(tmp_path)
    train = dict(data=f"[{sft}]", micro_batch_size=16)
    return mini_recipe(tmp_path, stages=[sft_stage("base", **train, max_steps=2),
                                         sft_stage("a", from_="base", **train, max_steps=40),
                                         sft_stage("b", from_="base", **train, max_steps=40),
                                         sft_stage("c", from_="b", **train, max_steps=2)])


def test_independent_branches_run_at_once(tmp_path):
    run_dir = tmp_path / "runs" / "mini"
    out = posttrain("run", f"recipe={_branches(tmp_path)}", "cluster.parallel_stages=2", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "alongside a" in out.stdout  # b started while a ran
    t = {s: stage_manifest(run_dir, s)["timings"] for s in ("base", "a", "b", "c")}
    assert t["a"]["started"] < t["b"]["finished"] and t["b"]["started"] < t["a"]["finished"]
    assert t["base"]["finished"] <= min(t["a"]["started"], t["b"]["started"])
    assert t["c"]["started"] >= t["b"]["finished"]
    again = posttrain("run", f"recipe={_branches(tmp_path)}", "cluster.parallel_stages=2", cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("skipped: completed") == 4


def test_a_failed_branch_stops_its_dependents_not_its_sibling(tmp_path):
    run_dir = tmp_path / "runs" / "mini"
    # b fails once it runs: every row is longer than 4 tokens and truncation drops rows.
    out = posttrain("run", f"recipe={_branches(tmp_path)}", "cluster.parallel_stages=2", "stages.b.truncation=drop",
                    "stages.b.max_seq_len=4", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "stages.b.data: every row was dropped" in out.stderr and "Traceback" not in out.stderr
    assert "[b] failed; waiting for a to finish" in out.stdout
    assert stage_manifest(run_dir, "b")["status"] == "failed"
    assert stage_manifest(run_dir, "a")["status"] == "completed"  # ran alongside, kept
    assert not (run_dir / "c" / "manifest.json").exists()  # never started
