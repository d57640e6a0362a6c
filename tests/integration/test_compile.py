"""deepspeed.compile (engine/regional_compile.py): the decoder layers under torch.compile train the
same curve as eager through the real SFT stage, under ZeRO-2 and under ZeRO-0 with activation
checkpointing, and packed rows whose length changes every micro-batch reuse one graph; a LoRA model
with activation checkpointing gets eager's gradients; no C++ compiler is one line naming the key."""

from __future__ import annotations

import functools
import json
import types
from pathlib import Path

import pytest
import torch

from posttrain_cli.errors import UserError
from tests.conftest import mini_recipe, posttrain, sft_stage, stage_manifest

STEPS = 6
MICRO = 4
# Inductor fuses the layer's pointwise work and sums in its own order: float rounding, not a different
# model. Measured 2026-12-04: the 6 steps' losses agree to 1e-6; the bound leaves room for other CPUs.
LOSS_RTOL = 1e-4


def _curve(run_dir: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same SFT (6 steps x 4 packed rows of 4 sequences: 24 forwards, each row another length)
    eager, compiled, and compiled under ZeRO-0 with activation checkpointing."""
    tmp = tmp_path_factory.mktemp("compile")
    rec = mini_recipe(tmp, stages=sft_stage(data=tmp / "train.jsonl", lr=2.0e-3, max_steps=STEPS,
                                            micro_batch_size=MICRO, warmup_ratio=0.0))
    setups = {
        "eager": ["deepspeed=zero2"],
        "compiled": ["deepspeed=zero2", "deepspeed.compile=true"],
        "compiled_zero0_ckpt": ["deepspeed=zero0", "deepspeed.compile=true", "deepspeed.activation_checkpointing=true"],
    }
    out = {}
    for name, args in setups.items():
        run_dir = tmp / "runs" / name
        r = posttrain("run", f"recipe={rec}", f"run_dir={run_dir}", *args, cwd=tmp)
        assert r.returncode == 0, f"{name}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        out[name] = (run_dir, r.stdout)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["compiled", "compiled_zero0_ckpt"])
def test_compiled_layers_train_the_eager_curve(runs, setup):
    base, curve = _curve(runs["eager"][0]), _curve(runs[setup][0])
    assert len(base) == len(curve) == STEPS
    assert base[-1] < base[0]  # it learns
    for a, b in zip(base, curve):
        assert abs(a - b) <= LOSS_RTOL * max(1.0, abs(a)), (base, curve)
    assert "torch.compile: 2 decoder layers" in runs[setup][1]
    assert "torch.compile" not in runs["eager"][1]


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["compiled", "compiled_zero0_ckpt"])
def test_rows_of_changing_length_do_not_recompile(runs, setup):
    """24 forwards of 24 row lengths: the graphs have a symbolic length, nowhere near one per step. On
    CPU the attention runs between graphs (engine/attention.py: one SDPA per sequence), so a layer
    compiles as a few pieces (measured 5 with transformers 5.25: the layer around the attention, the
    attention module's own frame and one re-guard of it); one graph per length would be 24+."""
    run_dir = runs[setup][0]
    lengths = {json.loads(l)["tokens"] for l in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()}
    assert len(lengths) > 3  # the steps' token counts differ: rows of many lengths
    compiled = stage_manifest(run_dir, "sft")["metrics"]["compile"]
    assert 1 <= compiled["graphs"] <= 8, compiled
    assert "compile" not in stage_manifest(runs["eager"][0], "sft")["metrics"]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                        tie_word_embeddings=False))


LORA = {"r": 4, "alpha": None, "dropout": 0.0, "target_modules": "all-linear", "modules_to_save": None,
        "use_rslora": False, "init": "default", "quantize": None}


@pytest.mark.slow
def test_a_compiled_lora_model_with_activation_checkpointing_gets_eager_gradients():
    """The adapter's layers inside the peft model are the ones compiled, checkpointed outside the
    compiled region: the same gradients as the eager model without checkpointing."""
    from posttrain_cli.engine import deepspeed_engine as eng

    grads = []
    for on in (False, True):
        ctx = types.SimpleNamespace(run={"deepspeed": {"activation_checkpointing": on, "compile": on, "zero_stage": 2},
                                         "lora": LORA}, info=lambda msg: None, where=lambda key: key)
        model = eng.trainable(ctx, _tiny_llama())
        model.train()
        got = {}
        for width in (9, 13):  # a second length: the compiled graph's length is symbolic
            ids = torch.randint(0, 50, (2, width), generator=torch.Generator().manual_seed(width))
            model.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            got[width] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        grads.append(got)
        layer = model.base_model.model.model.layers[0]
        assert isinstance(layer.forward, functools.partial) == on
    for width, eager in grads[0].items():
        assert eager.keys() == grads[1][width].keys() and all("lora_" in n for n in eager)
        for name, g in eager.items():
            torch.testing.assert_close(grads[1][width][name], g, rtol=1e-5, atol=1e-6)


def test_no_cpp_compiler_is_one_line_naming_the_key(monkeypatch):
    """On a node without a C++ compiler (SLURM: plan ran on the login node) the stage stops before
    anything compiles, with the key and the fix; plan does the same on a local machine
    (tests/e2e/test_compile_cli.py)."""
    from torch._inductor import config

    from posttrain_cli.engine import regional_compile

    monkeypatch.setattr(config.cpp, "cxx", ("/nonexistent/g++",))
    with pytest.raises(UserError) as e:
        regional_compile.check_compiler(torch.device("cpu"), "deepspeed.compile")
    msg = str(e.value)
    assert msg.startswith("deepspeed.compile=true: torch.compile on CPU needs a C++ compiler")
    assert "set deepspeed.compile=false" in msg and "\n" not in msg


def test_generation_runs_the_compiled_layers_eagerly():
    """HF generate (rollout/hf.py) goes through regional_compile.eager(): a compiled function called
    inside it compiles nothing."""
    from torch._dynamo.utils import counters

    from posttrain_cli.engine import regional_compile

    f = torch.compile(lambda x: x * 2 + 1, dynamic=True)
    before = counters["stats"]["unique_graphs"]
    with regional_compile.eager():
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
    assert counters["stats"]["unique_graphs"] == before
