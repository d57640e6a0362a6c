"""LoRA through the CLI as a user types it: the tiny recipe with an adapter on its SFT stage, and
bad lora settings stopped with one line naming the key (exit 2)."""

from __future__ import annotations

import pytest

from tests.conftest import posttrain, stage_manifest


@pytest.mark.slow
def test_the_tiny_recipe_with_a_lora_sft_stage(tmp_path):
    run_dir = tmp_path / "run"
    r = posttrain("run", "recipe=tiny", "scale=tiny", "stages.sft.lora={r: 8}", f"run_dir={run_dir}", cwd=tmp_path,
                  timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "LoRA: r 8, alpha 16, all-linear" in r.stdout
    assert stage_manifest(run_dir, "sft")["outputs"] == {"model": "model", "adapter": "adapter"}
    assert (run_dir / "sft" / "adapter" / "adapter_config.json").is_file()
    # The stages after it take the merged model as any other: dpo trains all of it (no lora block).
    assert stage_manifest(run_dir, "soup")["status"] == "completed"
    assert "LoRA" not in (run_dir / "dpo" / "logs" / "rank0.log").read_text()


@pytest.mark.parametrize("override, msg", [
    ("stages.sft.lora={r: 0}", "stages.sft.lora.r=0 must be >= 1"),
    ("stages.sft.lora={r: 8, target: q_proj}", "unknown key 'stages.sft.lora.target'; did you mean 'target_modules'?"),
])
def test_bad_lora_keys_stop_the_plan(tmp_path, override, msg):
    r = posttrain("plan", "recipe=tiny", override, cwd=tmp_path)
    assert r.returncode == 2 and msg in r.stdout + r.stderr, r.stdout + r.stderr


@pytest.mark.slow
def test_a_target_module_the_model_lacks_stops_the_stage_naming_the_key(tmp_path):
    run_dir = tmp_path / "run"
    r = posttrain("run", "recipe=tiny", "scale=tiny", "stages.sft.lora={r: 8, target_modules: [q_proj, qkv]}",
                  f"run_dir={run_dir}", cwd=tmp_path, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "stages.sft.lora.target_modules: 'qkv' names no module of this model" in out
    assert "Traceback" not in out
    assert not (run_dir / "sft" / "model").exists()
