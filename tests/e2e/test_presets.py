"""The preset recipes: each runs end to end at tiny scale (`scale=tiny`: its stage graph on the
tiny model and data, a few steps per stage), `posttrain plan` shows the published values, and a
recipe whose data is not public stops with one message naming the keys to fill.

The expected numbers are RECIPES.md's (../shared/RECIPES.md in the development tree), copied here
with their source, so a recipe edit that drifts from the papers fails."""

from __future__ import annotations

import json

import pytest

from posttrain_cli.config.compose import REQUIRED_MARK, compose
from tests.conftest import posttrain

PRESETS = ["instructgpt", "llama2", "llama3", "tulu3", "olmo3_think", "r1_zero", "r1", "mopd"]

# (preset, stage, key) -> the published value. Stage "" is the top level; rounds are expanded
# (r6.dpo is round 6's dpo).
PUBLISHED = {
    # InstructGPT (Ouyang 2022, App. C).
    "instructgpt": {
        "sft": dict(adam_betas=[0.9, 0.95], epochs=16, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.0,
                    lr=9.65e-6, global_batch_size=32, max_seq_len=2048),
        "rm": dict(epochs=1, lr=9e-6, schedule="cosine", min_lr_ratio=0.1, global_batch_size=64,
                   ranked_weighting="row"),
        "ppo_init": dict(epochs=2, **{"from": "sft"}),
        "ppo": dict(beta=0.02, prompts_per_step=512, mini_batches=8, ppo_epochs=1, gamma=1.0, cliprange=0.2,
                    temperature=1.0, value_from="rm", value_lr=9e-6, reward_model="rm", max_new_tokens=1024),
    },
    # Llama 2-Chat (Touvron 2023, section 3).
    "llama2": {
        "sft": dict(lr=2e-5, schedule="cosine", weight_decay=0.1, global_batch_size=64, max_seq_len=4096, epochs=2),
        "rm_helpful": dict(lr=1e-5, margin=True, schedule="cosine", min_lr_ratio=0.1, warmup_ratio=0.03,
                           global_batch_size=512, epochs=1, **{"from": "sft"}),
        "rm_safety": dict(lr=1e-5, margin=True, epochs=1, **{"from": "sft"}),
        "r4.rs": dict(reward_model="rm_helpful", keep="best", temperature=1.2),
        "ppo": dict(adam_betas=[0.9, 0.95], adam_eps=1e-5, weight_decay=0.1, grad_clip=1.0, lr=1e-6,
                    schedule="constant", prompts_per_step=512, cliprange=0.2, mini_batches=8, ppo_epochs=1,
                    beta=0.01),
    },
    # Llama 3 (Dubey 2024, 4.1-4.2): 6 rounds.
    "llama3": {
        "sft": dict(lr=1e-5),
        "r1.rs": dict(keep="best", reward_model="r1.rm", num_samples=10, **{"from": "sft"}),
        "r6.rm": dict(margin=False),
        "r6.rs": dict(keep="best", reward_model="r6.rm", **{"from": "r5.dpo"}),
        "r6.ft": dict(lr=1e-5),
        "r6.dpo": dict(loss="dpo", beta=0.1, lr=1e-5, nll_weight=0.2, **{"from": "r6.ft"}),
    },
    # Tulu 3 8B ([OI] docs/tulu3.md).
    "tulu3": {
        "": dict(seed=123),
        "sft": dict(lr=5e-6, epochs=2, max_seq_len=4096, schedule="linear", warmup_ratio=0.03, weight_decay=0.0,
                    global_batch_size=128),
        "rm": dict(lr=3e-6, epochs=1, max_seq_len=2048),
        "dpo": dict(loss="dpo_norm", beta=5.0, lr=5e-7, max_seq_len=2048, global_batch_size=128, epochs=1,
                    schedule="linear", warmup_ratio=0.1, weight_decay=0.0),
        "rlvr": dict(kind="ppo", reward_model=None, value_from="rm", verifiable_reward=10.0, beta=0.05,
                     kl_estimator="k1", lr=3e-7, max_new_tokens=2048, temperature=1.0, no_eos_penalty=-10.0,
                     prompts_per_step=224, ppo_epochs=4, mini_batches=1, cliprange=0.2, cliprange_value=0.2,
                     vf_coef=0.1, gamma=1.0, lam=0.95),
    },
    # OLMo 3 Think 7B ([OI] scripts/train/olmo3).
    "olmo3_think": {
        "sft": dict(lr=5e-5, epochs=2, max_seq_len=32768),
        "dpo": dict(loss="dpo_norm", beta=5.0, epochs=1, warmup_ratio=0.1, schedule="linear", global_batch_size=128,
                    lr=8e-8, max_seq_len=16384),
        "rlvr": dict(beta=0.0, num_generations=8, prompts_per_step=64, lr=1e-6, schedule="constant",
                     max_new_tokens=32768, clip_low=0.2, clip_high=0.272, adv_norm="centered",
                     loss_agg="token_mean", dynamic_sampling=True),
    },
    # DeepSeek R1-Zero (arXiv 2501.12948).
    "r1_zero": {
        "grpo": dict(lr=3e-6, beta=0.001, kl_estimator="k3", num_generations=16, temperature=1.0,
                     prompts_per_step=32, max_new_tokens=32768, ref_refresh_every=400, adv_norm="group_std",
                     extra_verifiers=["format"]),
    },
    # DeepSeek R1 (arXiv 2501.12948, 2.3).
    "r1": {
        "reasoning_rl": dict(beta=0.001, kl_estimator="k3", num_generations=16, prompts_per_step=32,
                             **{"from": "cold_start"}),
        "rs": dict(keep="all_pass", **{"from": "reasoning_rl"}),
        "sft": dict(epochs=2, **{"from": "Qwen/Qwen2.5-7B"}),
        "rl": dict(temperature=0.7, **{"from": "sft"}),
    },
    # MOPD (MiMo-V2-Flash; MOPD paper: advantage clip 2.0, teachers RL-tuned from the student's start).
    "mopd": {
        "math_rl": dict(kind="grpo", **{"from": "math_sft"}),
        "code_rl": dict(kind="grpo", **{"from": "code_sft"}),
        "student": dict(kind="distill", combine="route", kl="token", adv_clip=2.0,
                        teachers={"math": "math_rl", "code": "code_rl"}, **{"from": "sft"}),
    },
}


@pytest.mark.parametrize("preset", PRESETS)
def test_published_values(preset):
    cfg, _ = compose([f"recipe={preset}"], allow_missing=True)
    for stage, values in PUBLISHED[preset].items():
        where = cfg if stage == "" else cfg["stages"][stage]
        for key, value in values.items():
            got = where[key]
            assert got == (pytest.approx(value) if isinstance(value, float) else value), (preset, stage, key, got)


def test_plan_shows_the_values_a_reader_checks(tmp_path):
    r = posttrain("plan", "recipe=tulu3", "model=llama3_1_8b", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())
    for text in ["model meta-llama/Llama-3.1-8B", "ZeRO-3",
                 "lr 5e-06 (linear, warmup_ratio 0.03), epochs 2",
                 "data: allenai/tulu-3-sft-mixture",
                 "loss dpo_norm, beta 5",
                 "lr 5e-07 (linear, warmup_ratio 0.1), epochs 1",
                 "rollout: 224 prompts x 1 completions",
                 "reward: 10 x verifiers gsm8k->number, math->math, ifeval->ifeval; no-EOS penalty -10; "
                 "KL: beta 0.05 (k1)",
                 "value model: rm, vf_coef 0.1, cliprange 0.2 / value 0.2, GAE gamma 1 lam 0.95, "
                 "4 epoch(s) x 1 mini-batch(es)"]:
        assert text in out, text


def test_plan_marks_the_data_a_user_must_fill(tmp_path):
    r = posttrain("plan", "recipe=llama3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"data: {REQUIRED_MARK}" in r.stdout
    assert "round 6" in r.stdout and "r6.dpo" in r.stdout


def test_a_run_without_the_required_data_stops_naming_every_key(tmp_path):
    r = posttrain("run", "recipe=llama3", cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    for key in ("stages.sft.data", "stages.round.stages.rm.data", "stages.round.stages.rs.data",
                "stages.round.stages.dpo.data"):
        assert key in r.stderr, key
    assert "Traceback" not in r.stdout + r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    # A slot inside a list names the list, with the stage's own source kept in the example.
    r = posttrain("run", "recipe=r1", "stages.cold_start.data=[{path: a.jsonl}]", "stages.reasoning_rl.data=[{path: "
                  "a.jsonl}]", "stages.rs.data=[{path: a.jsonl}]", "stages.rl.data=[{path: a.jsonl}]", cwd=tmp_path)
    assert r.returncode == 2 and "stages.sft.data[1].path is required" in r.stderr, r.stderr
    assert "stages.sft.data='[{from: rs}, {path: your/data.jsonl}]'" in r.stderr, r.stderr


def test_filling_the_slots_on_the_command_line(tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1"}], "ground_truth": "2",
                                "dataset": "gsm8k"}) + "\n")
    cfg, _ = compose(["recipe=r1_zero", f"stages.grpo.data=[{{path: {data}}}]"])
    assert cfg["stages"]["grpo"]["data"][0]["path"] == str(data)


@pytest.mark.parametrize("model,path,zero", [
    ("llama3_1_8b", "meta-llama/Llama-3.1-8B", 3), ("llama3_1_70b", "meta-llama/Llama-3.1-70B", 3),
    ("llama2_7b", "meta-llama/Llama-2-7b-hf", 3), ("qwen2_5_7b", "Qwen/Qwen2.5-7B", 3),
    ("qwen2_5_0_5b", "Qwen/Qwen2.5-0.5B", 2), ("qwen3_8b", "Qwen/Qwen3-8B-Base", 3),
    ("olmo2_7b", "allenai/OLMo-2-1124-7B", 3), ("olmo3_7b", "allenai/Olmo-3-1025-7B", 3),
])
def test_model_groups_bring_their_deepspeed_set_up(model, path, zero):
    cfg, _ = compose(["recipe=tiny", f"model={model}"])
    assert cfg["model"]["path"] == path and cfg["deepspeed"]["zero_stage"] == zero
    # A deepspeed= choice on the command line still wins.
    cfg, _ = compose(["recipe=tiny", f"model={model}", "deepspeed=zero1"])
    assert cfg["deepspeed"]["zero_stage"] == 1


def test_a_preset_takes_another_model(tmp_path):
    cfg, _ = compose(["recipe=tulu3", "model=qwen2_5_7b"])
    assert cfg["model"]["path"] == "Qwen/Qwen2.5-7B"
    cfg, _ = compose(["recipe=tulu3"])
    assert cfg["model"]["path"] == "meta-llama/Llama-3.1-8B" and cfg["deepspeed"]["zero_stage"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_at_tiny_scale(tmp_path, preset):
    """`posttrain run recipe=<preset> scale=tiny` as a user types it: the preset's whole stage graph
    (the same stage names as at full scale) trains, samples and merges on the tiny world."""
    full, _ = compose([f"recipe={preset}"], allow_missing=True)
    r = posttrain("run", f"recipe={preset}", "scale=tiny", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    run_dir = tmp_path / "runs" / preset
    for name, stage in full["stages"].items():
        m = json.loads((run_dir / name / "manifest.json").read_text())
        assert m["status"] == "completed", (name, m.get("error"))
        out = "data.jsonl" if stage["kind"] in ("rejection_sampling", "generate") else "model"
        assert (run_dir / name / out).exists(), (name, out)
    resolved = (run_dir / "resolved.yaml").read_text()
    assert "scale: tiny" in resolved and "path: tiny" in resolved


def test_recipes_lists_every_preset_with_its_source(tmp_path):
    r = posttrain("recipes", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = {line.split()[0]: line for line in r.stdout.splitlines() if line.strip() and not line.startswith(" ")}
    for preset in PRESETS:
        assert preset in lines, preset
    # Square brackets in a description are text, not markup.
    assert "[arXiv 2501.12948]" in lines["r1_zero"] and "[open-instruct]" in lines["tulu3"]
