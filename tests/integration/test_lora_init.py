"""A PiSSA start (lora.init: pissa: the adapter from the base's top singular vectors, taken out of the
base) on 1 rank (ZeRO-2) and on 2 ranks under ZeRO-3, where every weight is held in shards and peft
gathers each one for the decomposition: the two runs train to the same model, and each publishes the
merged model and an adapter that gives it on the input model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import mini_recipe, posttrain, sft_stage

pytestmark = [pytest.mark.slow, pytest.mark.dist]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pissa")
    rec = mini_recipe(tmp, stages=sft_stage(data=tmp / "train.jsonl", lr=2.0e-3, max_steps=4, warmup_ratio=0.0,
                                            lora="{r: 4, init: pissa}"))
    out = {}
    for name, args in {"1rank": ["deepspeed=zero2"],
                       "2rank_zero3": ["deepspeed=zero3", "cluster.nproc_per_node=2"]}.items():
        run_dir = tmp / "runs" / name
        r = posttrain("run", f"recipe={rec}", f"run_dir={run_dir}", *args, cwd=tmp)
        assert r.returncode == 0, f"{name}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        out[name] = run_dir / "sft"
    return out


def test_zero3_trains_the_pissa_adapter_as_one_rank_does(runs):
    one = load_file(runs["1rank"] / "model" / "model.safetensors")
    two = load_file(runs["2rank_zero3"] / "model" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("setup", ["1rank", "2rank_zero3"])
def test_the_adapter_gives_the_published_model_on_the_input_model(runs, setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = runs[setup] / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # rank 2r: [B, -B0] [A; A0]
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    published = AutoModelForCausalLM.from_pretrained(runs[setup] / "model", dtype=torch.float32)
    ids = torch.randint(10, 90, (2, 12))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        on_input = PeftModel.from_pretrained(base, adapter)(input_ids=ids).logits
        after = published(input_ids=ids).logits
    torch.testing.assert_close(on_input, after, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after, before, atol=1e-3)  # it trained
