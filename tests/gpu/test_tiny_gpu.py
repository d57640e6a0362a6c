"""The tiny recipe on a CUDA GPU, through the CLI as a user types it: bf16 under DeepSpeed with NCCL,
and QLoRA (a 4-bit NF4 base, bitsandbytes) on every training stage. Skipped without a GPU; run where
one is:

    python -m pytest -n 0 -m gpu tests/gpu
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import posttrain, stage_manifest, stage_rows

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TRAINING = ["sft", "rm", "dpo", "grpo"]


def _run(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    r = posttrain("run", "recipe=tiny", *overrides, f"run_dir={run_dir}", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for stage in [*TRAINING, "soup"]:
        assert stage_manifest(run_dir, stage)["status"] == "completed", stage
    return run_dir, r


def test_the_tiny_recipe_trains_in_bf16(tmp_path):
    run_dir, _ = _run(tmp_path)
    # precision auto: bf16 on a GPU that has it; the published weights are bf16.
    assert json.loads((run_dir / "sft" / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    losses = [r["loss"] for r in stage_rows(run_dir, "sft")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_the_tiny_recipe_with_qlora_on_every_training_stage(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, r = _run(tmp_path, "lora={r: 8, quantize: 4bit}")
    assert r.stdout.count("4-bit NF4 base (QLoRA)") >= len(TRAINING), r.stdout[-4000:]
    for stage in TRAINING:
        assert "quantization_config" not in json.loads((run_dir / stage / "model" / "config.json").read_text())
        assert (run_dir / stage / "adapter" / "adapter_config.json").is_file()
    # DPO's reference is the policy before its first step (the 4-bit base with a zero adapter): the
    # implicit rewards start at 0 (the preference term at log 2; the tiny dpo adds an NLL term).
    first = stage_rows(run_dir, "dpo")[0]
    assert abs(first["chosen_reward"]) < 1e-3 and abs(first["rejected_reward"]) < 1e-3, first
    # The published SFT model is its input model plus the adapter (peft loads it on the input model).
    adapter = run_dir / "sft" / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    ids = torch.randint(10, 90, (2, 16))
    published = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "model", dtype=torch.float32)
    on_input = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    with torch.no_grad():
        torch.testing.assert_close(on_input(input_ids=ids).logits, published(input_ids=ids).logits,
                                   rtol=1e-3, atol=1e-3)
