"""The main job exactly as the README gives it: `posttrain run recipe=tiny`."""

from __future__ import annotations

import json

import pytest

from tests.conftest import posttrain

pytestmark = pytest.mark.slow


def test_tiny_recipe_lifts_accuracy_and_reruns_as_a_skip(tmp_path):
    r = posttrain("run", "recipe=tiny", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    run_dir = tmp_path / "runs" / "tiny"
    m = json.loads((run_dir / "sft" / "manifest.json").read_text())
    ev = m["metrics"]["eval"]
    lift = ev["after"]["accuracy"] - ev["before"]["accuracy"]
    print(f"tiny: before {ev['before']['accuracy']:.1%} after {ev['after']['accuracy']:.1%} "
          f"in {m['timings']['seconds']:.0f}s")
    assert lift >= 0.5, ev
    assert "acc after" in r.stdout and "sft" in r.stdout
    assert (run_dir / "resolved.yaml").exists()

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model")

    again = posttrain("run", "recipe=tiny", cwd=tmp_path)
    assert again.returncode == 0
    assert "[sft] skipped" in again.stdout
    assert json.loads((run_dir / "sft" / "manifest.json").read_text())["timings"] == m["timings"]
