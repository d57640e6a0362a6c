"""`posttrain run recipe=tiny_llama3` as a user types it: two Llama 3 rounds of reward model ->
rejection sampling -> SFT -> DPO, each round reading the previous round's outputs.

A demo recipe run in full (about 5 minutes of a worker), so on demand: `python -m pytest -m demo`.
Rounds reading the previous round's outputs are tested on every run by tests/e2e/test_graph_run.py."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import posttrain, stage_manifest

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.demo]


def test_two_llama3_rounds_chain_their_outputs(tmp_path, tiny_run):
    # Its SFT stage has the tiny recipe's settings: a copy of that finished stage is skipped, as a
    # user's would be (the fingerprint does not depend on the run directory); only its eval re-runs.
    assert tiny_run.result.returncode == 0, tiny_run.result.stderr[-2000:]
    run_dir = tmp_path / "runs" / "tiny_llama3"
    run_dir.mkdir(parents=True)
    shutil.copytree(tiny_run.run_dir / "sft", run_dir / "sft")
    weights = (run_dir / "sft" / "model" / "model.safetensors").read_bytes()
    r = posttrain("run", "recipe=tiny_llama3", cwd=tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "[sft] skipped" in r.stdout or "[sft] model up to date" in r.stdout, r.stdout[:2000]
    assert (run_dir / "sft" / "model" / "model.safetensors").read_bytes() == weights
    model = lambda s: str((run_dir / s / "model").resolve())  # noqa: E731
    data = lambda s: str((run_dir / s / "data.jsonl").resolve())  # noqa: E731
    stages = ["sft"] + [f"r{i}.{s}" for i in (1, 2) for s in ("rm", "rs", "ft", "dpo")]
    m = {s: stage_manifest(run_dir, s) for s in stages}
    assert all(v["status"] == "completed" for v in m.values())
    # Round 2 samples from round 1's DPO model, scores with its own reward model and trains on both
    # rounds' kept samples.
    assert m["r1.rs"]["inputs"]["model"] == model("sft")
    assert m["r2.rs"]["inputs"]["model"] == model("r1.dpo")
    assert m["r2.rm"]["inputs"]["model"] == model("sft")
    assert m["r2.rs"]["inputs"]["models"]["reward_model"] == model("r2.rm")
    assert m["r2.ft"]["inputs"]["datasets"] == {"r2.rs": data("r2.rs"), "r1.rs": data("r1.rs")}
    assert m["r2.dpo"]["inputs"]["model"] == model("r2.ft")
    # Best of K: every kept row is its prompt's top score among the K recorded.
    for name in ("r1.rs", "r2.rs"):
        rows = [json.loads(l) for l in (run_dir / name / "data.jsonl").read_text().splitlines()]
        assert len(rows) == m[name]["metrics"]["rows"] > 0
        assert all(len(row["sample_scores"]) == 4 and row["score"] == max(row["sample_scores"]) for row in rows)
        assert rows[0]["messages"][-1]["role"] == "assistant"
    # The reward models rank held-out pairs above chance (a new head on the SFT model: 44%; measured 60.5%).
    for i in (1, 2):
        assert m[f"r{i}.rm"]["metrics"]["heldout"]["after"]["accuracy"] >= 0.56
    for name in ("r1.dpo", "r2.dpo", "data out"):
        assert name in r.stdout
