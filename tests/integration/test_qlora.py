"""QLoRA (lora.quantize: 4bit) through the engine on CPU: bitsandbytes' 4-bit NF4 base, a LoRA adapter
under DeepSpeed ZeRO-2 (1 rank), a few optimizer steps, then save_hf. The stage itself is refused at plan
time without a CUDA GPU (tests/unit/test_lora.py); tests/gpu/test_qlora_gpu.py runs it through the CLI
where a GPU is. Checked here: only the adapter trains; the published model is a plain Hugging Face model
(no quantization_config) equal, tensor by tensor, to the input model's own weights plus scale · B A (not
to their 4-bit copies); the adapter loads in peft on the input model; the vLLM sync's weights (the base
dequantized, merged) are the 4-bit model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'posttrain[qlora]')")
pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from posttrain_cli.engine import dist, lora, deepspeed_engine as eng
    from posttrain_cli.models.tiny import build_tiny, build_tokenizer
    dist.init()
    out = Path(sys.argv[1])
    build_tiny(out / "base", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "max_position_embeddings": 64})
    ds = {"zero_stage": 2, "offload_optimizer": False, "offload_param": False, "precision": "auto", "config": {}}
    cfg = eng.ds_config(ds, micro_batch_size=2, grad_accum=1, grad_clip=1.0)
    model = eng.load_causal_lm(str(out / "base"), {}, cfg, train=True, quantize="4bit")
    settings = {"r": 4, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"],
                "modules_to_save": None, "use_rslora": False, "init": "default", "quantize": "4bit"}
    model = lora.wrap(model, settings, where="stages.sft.lora")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    train = {"lr": 5e-2, "weight_decay": 0.0, "adam_betas": [0.9, 0.95], "adam_eps": 1e-8,
             "warmup_ratio": 0.0, "schedule": "constant", "min_lr_ratio": 0.0}
    engine = eng.initialize(model, cfg, train, 4)
    engine.train()  # as the stages train (bitsandbytes' CPU kernel repacks a weight at an eval forward)
    torch.manual_seed(0)
    ids = torch.randint(5, 90, (2, 24)).to(engine.device)
    losses = []
    for _ in range(4):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with torch.no_grad():
        logits = engine.module(input_ids=ids).logits.float()
    # What a vLLM sync hands the engine: the 4-bit base dequantized, merged with the adapter.
    synced = lora.merged_state({n: lora.plain_weight(p) for n, p in engine.module.named_parameters()},
                               engine.module.peft_config[lora.ADAPTER])
    torch.save({"logits": logits.cpu(), "ids": ids.cpu(), "synced": {k: v.cpu() for k, v in synced.items()},
                "bf16": engine.bfloat16_enabled()}, out / "policy.pt")
    eng.save_hf(engine, build_tokenizer(64), out / "sft" / "model")
    (out / "result.json").write_text(json.dumps({"losses": losses, "trainable": trainable}))
""")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qlora")
    script = out / "qlora.py"
    script.write_text(SCRIPT)
    # bitsandbytes looks for a faster CPU kernel on the hub; tests never reach the network.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_only_the_adapter_trains_and_the_loss_falls(run):
    result = json.loads((run / "result.json").read_text())
    assert result["trainable"] and all(".lora_A." in n or ".lora_B." in n for n in result["trainable"])
    assert len(result["trainable"]) == 2 * 3 * 2  # A and B of q, v, down in 2 layers
    assert result["losses"][-1] < result["losses"][0]


def test_the_published_model_is_the_input_model_plus_its_adapter(run):
    config = json.loads((run / "sft" / "model" / "config.json").read_text())
    assert "quantization_config" not in config
    base = load_file(run / "base" / "model.safetensors")
    merged = load_file(run / "sft" / "model" / "model.safetensors")
    adapter = load_file(run / "sft" / "adapter" / "adapter_model.safetensors")
    adapter_cfg = json.loads((run / "sft" / "adapter" / "adapter_config.json").read_text())
    scale = adapter_cfg["lora_alpha"] / adapter_cfg["r"]
    assert scale == 4.0
    assert set(merged) == set(base)
    adapted = 0
    for name, w in base.items():
        layer = name.removesuffix(".weight")
        a = adapter.get(f"base_model.model.{layer}.lora_A.weight")
        if a is None:
            assert torch.equal(merged[name], w), name  # the input's own weight, not its 4-bit copy
            continue
        b = adapter[f"base_model.model.{layer}.lora_B.weight"]
        assert b.abs().max() > 0  # the adapter trained
        assert merged[name].dtype == w.dtype
        torch.testing.assert_close(merged[name], w + scale * (b.float() @ a.float()), rtol=0, atol=1e-6)
        adapted += 1
    assert adapted == 3 * 2


def test_the_adapter_loads_in_peft_on_the_input_model(run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.load(run / "policy.pt", map_location="cpu")["ids"]
    published = AutoModelForCausalLM.from_pretrained(run / "sft" / "model", dtype=torch.float32)
    on_input = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32),
                                         run / "sft" / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(on_input(input_ids=ids).logits, published(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_the_trained_4bit_policy_is_what_a_sync_loads_and_close_to_the_published_model(run):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    saved = torch.load(run / "policy.pt", map_location="cpu")
    published = AutoModelForCausalLM.from_pretrained(run / "sft" / "model", dtype=torch.float32)
    # The synced weights, in a plain model, give the trained 4-bit policy's logits.
    twin = LlamaForCausalLM(published.config)
    missing, unexpected = twin.load_state_dict({k: v.float() for k, v in saved["synced"].items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        synced_logits = twin(input_ids=saved["ids"]).logits
        published_logits = published(input_ids=saved["ids"]).logits
    # (On a GPU the policy ran its matmuls in bf16, the plain twin here in fp32.)
    tol = 5e-2 if saved["bf16"] else 1e-3
    torch.testing.assert_close(synced_logits, saved["logits"], rtol=tol, atol=tol)
    # The published model differs from the 4-bit policy by the base's quantization error only.
    gap = (published_logits - saved["logits"]).abs().max().item()
    assert 0 < gap < 0.5 * saved["logits"].abs().max().item()
