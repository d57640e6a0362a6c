"""The CLI as a user types it: run, re-run (skips), override (re-runs downstream only), plan, status."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import stage_manifest, posttrain



@pytest.mark.slow
def test_run_rerun_and_downstream_override(mini, tmp_path):
    run_dir = tmp_path / "runs" / "mini"
    first = posttrain("run", f"recipe={mini}", cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Traceback" not in first.stderr
    for stage in ("sft", "sft2"):
        m = stage_manifest(run_dir, stage)
        assert m["status"] == "completed"
        assert (run_dir / stage / "model" / "model.safetensors").exists()
        assert len((run_dir / stage / "metrics.jsonl").read_text().splitlines()) == m["metrics"]["steps"]
    assert stage_manifest(run_dir, "sft2")["inputs"]["model"] == str((run_dir / "sft" / "model").resolve())
    assert (run_dir / "resolved.yaml").exists()
    ev = stage_manifest(run_dir, "sft")["metrics"]["eval"]["after"]
    assert ev["n"] == 16 and 0.0 <= ev["accuracy"] <= 1.0
    # The final table names every stage.
    assert "sft2" in first.stdout and "acc after" in first.stdout

    stamps = {s: stage_manifest(run_dir, s)["timings"]["finished"] for s in ("sft", "sft2")}
    again = posttrain("run", f"recipe={mini}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped: completed with the same fingerprint") == 2
    assert {s: stage_manifest(run_dir, s)["timings"]["finished"] for s in stamps} == stamps

    # A downstream hyperparameter: only sft2 trains again.
    down = posttrain("run", f"recipe={mini}", "stages.sft2.lr=5e-4", cwd=tmp_path)
    assert down.returncode == 0, down.stderr
    assert "[sft] skipped" in down.stdout and "[sft2] skipped" not in down.stdout
    assert stage_manifest(run_dir, "sft")["timings"]["finished"] == stamps["sft"]
    assert stage_manifest(run_dir, "sft2")["timings"]["finished"] > stamps["sft2"]

    # Only the eval block changed: the model is kept, the eval re-runs.
    ev_only = posttrain("run", f"recipe={mini}", "stages.sft2.lr=5e-4", "stages.sft.eval.max_new_tokens=6",
                        cwd=tmp_path)
    assert ev_only.returncode == 0, ev_only.stderr
    assert "only its eval changed" in ev_only.stdout and "[sft2] skipped" in ev_only.stdout
    sft = stage_manifest(run_dir, "sft")
    assert sft["timings"]["finished"] == stamps["sft"] and "eval_seconds" in sft["timings"]
    assert sft["metrics"]["eval"]["after"]["n"] == 16 and sft["metrics"]["steps"] == 3

    # An upstream hyperparameter: both train again.
    up = posttrain("run", f"recipe={mini}", "stages.sft.lr=5e-4", "stages.sft2.lr=5e-4", cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert "skipped" not in up.stdout

    # plan knows what is done; status prints the table from the manifests.
    plan = posttrain("plan", f"recipe={mini}", "stages.sft.lr=5e-4", "stages.sft2.lr=5e-4", cwd=tmp_path)
    assert plan.returncode == 0 and plan.stdout.count("skip (done") == 2
    status = posttrain("status", str(run_dir), cwd=tmp_path)
    assert status.returncode == 0 and "sft2" in status.stdout and "completed" in status.stdout


def test_plan_shows_batch_arithmetic_and_inputs(mini, tmp_path):
    r = posttrain("plan", f"recipe={mini}", "cluster.nproc_per_node=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    assert "global 16 = micro 8 x 2 rank(s) x 1 accumulation" in out
    assert "<= 1,024 tokens/step" in out
    assert "from: stage sft" in out and "will run" in out
    assert "lr 0.001" in out


def test_recipes_lists_descriptions(tmp_path):
    r = posttrain("recipes", cwd=tmp_path)
    assert r.returncode == 0
    assert "tiny" in r.stdout and "SFT -> reward model -> DPO -> GRPO -> merge on a tiny Llama" in r.stdout
    assert "tiny_mopd" in r.stdout and "tiny_llama3" in r.stdout


@pytest.mark.parametrize("args", [["--help"], ["recipes"], ["plan", "recipe=tiny"]])
def test_light_commands_import_no_heavy_library(args, tmp_path):
    code = (
        "import sys\n"
        "from posttrain_cli.cli import app\n"
        f"sys.argv = ['posttrain', *{args!r}]\n"
        "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_status_table_from_manifests(tmp_path):
    """status reads manifests only: a hand-made run directory is enough."""
    run = tmp_path / "r"
    (run / "sft").mkdir(parents=True)
    (run / "resolved.yaml").write_text("name: x\nstages:\n  sft: {kind: sft}\n  later: {kind: sft}\n")
    (run / "sft" / "manifest.json").write_text(json.dumps({
        "status": "completed", "kind": "sft", "timings": {"seconds": 12.0},
        "metrics": {"steps": 10, "loss": 0.5, "tokens_per_s": 1000.0,
                    "eval": {"before": {"accuracy": 0.0}, "after": {"accuracy": 0.75}}}}))
    r = posttrain("status", str(run), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = next(l for l in r.stdout.splitlines() if " sft " in l)
    assert "completed" in row and "75.0%" in row and "0.0%" in row and "12s" in row
    assert "not run" in r.stdout


@pytest.mark.slow
def test_eval_stage_kind(tmp_path):
    from tests.conftest import mini_recipe, sft_stage

    rec = mini_recipe(tmp_path, stages=[sft_stage(data=tmp_path / "train.jsonl", lr=1.0e-3, max_steps=2), f"""
      heldout:
        kind: eval
        data: [{{path: {tmp_path}/eval.jsonl}}]
        verifier: exact
        max_new_tokens: 4
    """])
    r = posttrain("run", f"recipe={rec}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    m = stage_manifest(tmp_path / "runs" / "mini", "heldout")
    assert m["status"] == "completed" and m["outputs"] == {}
    assert m["inputs"]["model"].endswith("sft/model")
    assert m["metrics"]["eval"]["after"]["n"] == 16 and m["metrics"]["eval"]["after"]["verifier"] == "exact"
