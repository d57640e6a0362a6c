"""LoRA stages chained through the CLI: sft -> rm -> dpo -> grpo, each with its own adapter, on 1 rank
(ZeRO-2) and 2 ranks (ZeRO-3).

- each stage publishes a plain Hugging Face model equal, tensor by tensor, to its input model with
  its adapter (RUN_DIR/<stage>/adapter/, loaded by peft's PeftModel.from_pretrained) merged in;
  what the adapter does not touch (embeddings, norms, the output head) is the input's exactly;
- only the adapter trains (the log says how many parameters), and the next stage starts a fresh
  adapter on the merged model;
- DPO's first step sits at log 2 (the adapter starts at zero: policy = reference) and its held-out
  preference accuracy rises; the reward model's score head trains in full next to its adapter;
- the reference of a LoRA stage is the policy with its adapter off (no second model): a live one
  (dpo precompute_ref: false, grpo's KL) gives the run the cached reference log-probs give;
- a PiSSA start (`pissa`, an SFT stage of its own from the base model: lora.init pissa, the adapter
  from the base's top singular vectors, taken out of the base), where under ZeRO-3 every weight is
  held in shards and peft gathers each one for the decomposition: the two set-ups train to the
  same model, and each publishes the merged model and an adapter that gives it on the input model.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.test_preference_dist import _easy
from tests.conftest import mini_recipe, posttrain, sft_stage, stage_manifest, stage_rows, tiny_rows, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

SETUPS = {"1rank": ["deepspeed=zero2"], "2rank_zero3": ["deepspeed=zero3", "cluster.nproc_per_node=2"]}
LORA = "lora: {r: 8, alpha: 16}"


# dpo with the cached reference, dpo_live with the live one (the adapter-off policy either way).
DPO = """{stage}:
  kind: dpo
  from: sft
  data: [{{path: {pref}}}]
  heldout: [{{path: {held}}}]
  beta: 0.5
  lr: 1.0e-2
  max_steps: 8
  global_batch_size: 16
  micro_batch_size: 4
  max_seq_len: 64
  warmup_ratio: 0.0
  {lora}
  {extra}
"""


def _recipe(tmp: Path, name: str) -> Path:
    easy = lambda f, n: [_easy(r) for r in tiny_rows(f, n)]  # noqa: E731
    pref = write_jsonl(tmp / "pref.jsonl", easy("pref_train.jsonl", 256))
    held = write_jsonl(tmp / "held.jsonl", easy("pref_eval.jsonl", 48))
    rl_rows = tiny_rows("rl_train.jsonl", 64)
    for r in rl_rows[::2]:  # half lowercase constraints: a reward a barely trained model finds (a signal)
        r.update(dataset="ifeval", ground_truth=json.dumps({"func_name": "validate_lowercase"}))
    rl = write_jsonl(tmp / "rl.jsonl", rl_rows)
    stages = sft_stage("sft", data=tmp / "train.jsonl", lr=2.0e-2, max_steps=10, global_batch_size=32,
                       micro_batch_size=16, lora="{r: 8, alpha: 16}")
    # The reward model: only what it publishes is checked here (its adapter and score head moved,
    # nothing else did), so a few steps; that it learns: test_preference_dist.py.
    stages += textwrap.dedent(f"""
      rm:
        kind: reward_model
        from: sft
        data: [{{path: {pref}}}]
        heldout: [{{path: {held}}}]
        lr: 1.0e-2
        max_steps: 4
        global_batch_size: 16
        micro_batch_size: 4
        max_seq_len: 64
        warmup_ratio: 0.0
        {LORA}
    """)
    for stage, extra in (("dpo", ""), ("dpo_live", "precompute_ref: false")):
        stages += DPO.format(stage=stage, pref=pref, held=held, lora=LORA, extra=extra)
    stages += textwrap.dedent(f"""
      grpo:
        kind: grpo
        from: dpo
        data: [{{path: {rl}}}]
        verifier: number
        prompts_per_step: 8
        num_generations: 4
        rollout_batch_size: 32
        micro_batch_size: 8
        max_new_tokens: 6
        max_seq_len: 64
        max_steps: 3
        lr: 1.0e-2
        beta: 0.05
        {LORA}
    """)
    # Last (a failed stage stops the ones after it), from the base model, not the stage before it.
    stages += sft_stage("pissa", from_="${model.path}", data=tmp / "train.jsonl", lr=2.0e-3, max_steps=4,
                        warmup_ratio=0.0, lora="{r: 4, init: pissa}")
    return mini_recipe(tmp, stages=stages, name=name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = {}
    for setup, args in SETUPS.items():
        tmp = tmp_path_factory.mktemp(setup)
        rec = _recipe(tmp, "lora")
        r = posttrain("run", f"recipe={rec}", *args, cwd=tmp, timeout=1200)
        assert r.returncode == 0, f"{setup}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        out[setup] = tmp / "runs" / "lora"
    return out


INPUTS = {"sft": None, "rm": "sft", "dpo": "sft", "grpo": "dpo"}


def _input_dir(run_dir: Path, stage: str) -> Path:
    src = INPUTS[stage]
    return Path(stage_manifest(run_dir, stage)["inputs"]["model"]) if src is None else run_dir / src / "model"


@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize("stage", list(INPUTS))
def test_the_published_model_is_the_input_plus_its_adapter(runs, setup, stage):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    run_dir = runs[setup]
    auto = AutoModelForSequenceClassification if stage == "rm" else AutoModelForCausalLM
    kw = {"num_labels": 1} if stage == "rm" else {}
    published = auto.from_pretrained(run_dir / stage / "model", **kw).state_dict()
    base = auto.from_pretrained(_input_dir(run_dir, stage), **kw)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    want = PeftModel.from_pretrained(base, run_dir / stage / "adapter").merge_and_unload().state_dict()
    assert published.keys() == want.keys()
    changed = set()
    for k in published:
        assert torch.allclose(published[k], want[k], atol=1e-5), k
        if k in before and not torch.equal(published[k], before[k]):
            changed.add(k)
    # What the adapter touches moved; what it does not is the input's exactly (rm: its score head trains).
    assert changed and all(re.search(r"_proj\.weight$", k) or k == "score.weight" for k in changed), changed
    assert (stage == "rm") == ("score.weight" in changed)
    assert stage_manifest(run_dir, stage)["outputs"] == {"model": "model", "adapter": "adapter"}


@pytest.mark.parametrize("setup", SETUPS)
def test_only_the_adapter_trains(runs, setup):
    log = (runs[setup] / "sft" / "logs" / "rank0.log").read_text()
    m = re.search(r"LoRA: r 8, alpha 16, all-linear: ([\d,]+) of ([\d,]+) parameters train", log)
    assert m, log[-2000:]
    trainable, total = (int(x.replace(",", "")) for x in m.groups())
    # r (in + out) over the 7 projections of 2 layers (hidden 32, 2 heads of 16, MLP 64).
    assert trainable == 2 * 8 * ((32 + 32) * 4 + (32 + 64) * 3)
    assert total == 36192  # the whole model (the adapter included): the tiny one is small next to r 8


@pytest.mark.parametrize("setup", SETUPS)
def test_dpo_starts_at_log_2_and_learns(runs, setup):
    rows = stage_rows(runs[setup], "dpo")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    held = stage_manifest(runs[setup], "dpo")["metrics"]["heldout"]
    assert held["before"]["accuracy"] == 0.5 and held["after"]["accuracy"] > 0.6, held


def test_zero3_follows_one_rank(runs):
    one, two = (stage_rows(runs[s], "sft") for s in SETUPS)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=2e-3)
    a, b = (load_file(runs[s] / "dpo" / "model" / "model.safetensors") for s in SETUPS)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


@pytest.mark.parametrize("setup", SETUPS)
def test_the_adapter_off_reference_live_gives_the_cached_run(runs, setup):
    cached, live = (stage_rows(runs[setup], s) for s in ("dpo", "dpo_live"))
    assert [r["loss"] for r in live] == pytest.approx([r["loss"] for r in cached], abs=1e-5)
    for stage in ("dpo_live", "grpo"):
        log = (runs[setup] / stage / "logs" / "rank0.log").read_text()
        assert "the policy with its LoRA adapter off" in log, stage


def test_a_lora_stage_stopped_mid_stage_resumes_to_the_uninterrupted_weights(runs, tmp_path):
    """SIGTERM after step 4 of 8 (a checkpoint every 2): the resumed dpo stage (adapter, its
    optimizer state, the schedule) ends with the weights and the adapter of a run never stopped:
    the 1-rank run of `runs`, the same sft and dpo stages (checkpoints change no weight: measured
    equal to the bit)."""
    import signal

    from tests.integration.test_resume import _max_diff, _run_until, _weights

    rec = _recipe(tmp_path, "res")
    args = ["deepspeed=zero2", "~stages.rm", "~stages.dpo_live", "~stages.grpo", "~stages.pissa",
            "stages.dpo.save_every=2"]
    straight, stopped = runs["1rank"], tmp_path / "stopped"
    _run_until(["run", f"recipe={rec}", f"run_dir={stopped}", *args], tmp_path, stopped, "dpo", after=4,
               sig=signal.SIGTERM)
    assert stage_manifest(stopped, "dpo")["status"] != "completed"
    r = posttrain("run", f"recipe={rec}", f"run_dir={stopped}", *args, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[dpo] resumed from step-" in r.stdout
    assert _max_diff(_weights(straight, "dpo"), _weights(stopped, "dpo")) < 1e-6
    a, b = (load_file(d / "dpo" / "adapter" / "adapter_model.safetensors") for d in (straight, stopped))
    assert _max_diff(a, b) < 1e-6


def test_zero3_trains_the_pissa_adapter_as_one_rank_does(runs):
    one = load_file(runs["1rank"] / "pissa" / "model" / "model.safetensors")
    two = load_file(runs["2rank_zero3"] / "pissa" / "model" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("setup", SETUPS)
def test_the_pissa_adapter_gives_the_published_model_on_the_input_model(runs, setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = runs[setup] / "pissa" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True  # rank 2r: [B, -B0] [A; A0]
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
    published = AutoModelForCausalLM.from_pretrained(runs[setup] / "pissa" / "model", dtype=torch.float32)
    ids = torch.randint(10, 90, (2, 12))
    with torch.no_grad():
        before = base(input_ids=ids).logits
        on_input = PeftModel.from_pretrained(base, adapter)(input_ids=ids).logits
        after = published(input_ids=ids).logits
    torch.testing.assert_close(on_input, after, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(after, before, atol=1e-3)  # it trained
