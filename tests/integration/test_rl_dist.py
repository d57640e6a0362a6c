"""grpo (and its DAPO / Dr.GRPO / R1-Zero options) and ppo on the tiny model: 1 rank (ZeRO-2)
and 2 ranks (ZeRO-3). That 2 ranks under ZeRO-2 and ZeRO-3 sample and train alike is checked on the
same on-policy loop by tests/integration/test_distill_dist.py. The SFT policy and the reward model
train once, in the 1-rank run; the 2-rank run reads them as paths (SFT and the reward model on 2
ranks: tests/integration/test_sft_dist.py and test_preference_dist.py; each torchrun launch costs
~10 s).

The reward must be learnable by a 32-wide model after 10 SFT steps (still close to
uniform over its 107 tokens): half the prompts are IFEval "answer in lowercase"
constraints (dataset `ifeval`; about 17% of random 6-token answers pass), half are
sums scored by `number` (dataset `add`, through the stage's `verifier`), so dispatch
by dataset runs too. PPO climbs the tiny reward model's score.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import stage_manifest, stage_rows, mini_recipe, posttrain, sft_stage, tiny_rows, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

LOWERCASE = json.dumps({"func_name": "validate_lowercase"})

GRPO = """
{name}:
  kind: grpo
  from: {sft}
  data: [{{path: {rl}}}]
  verifier: number
  prompts_per_step: {prompts}
  num_generations: 4
  max_new_tokens: 6
  max_steps: {steps}
  lr: {lr}
  max_seq_len: 64
  micro_batch_size: 8
  rollout_batch_size: 32
  {extra}
"""

PPO = """
{name}:
  kind: ppo
  from: {sft}
  data: [{{path: {rl}}}]
  prompts_per_step: 16
  num_generations: 1
  max_new_tokens: 6
  max_steps: {steps}
  lr: 1.0e-3
  ppo_epochs: 2
  mini_batches: 2
  max_seq_len: 64
  micro_batch_size: 4
  rollout_batch_size: 32
  {extra}
"""

# The plain stage learns (16 steps of 16 prompts, measured 0.05 -> 0.53 reward); the
# variants only need to run, a few steps each.
VARIANTS = {
    "grpo": dict(steps=16, prompts=16, lr="5.0e-3", extra="beta: 0.05\n  mini_batches: 2"),
    "grpo_dapo": dict(steps=4, prompts=8, lr="2.0e-3",
                      extra="clip_high: 0.28\n  loss_agg: token_mean\n  dynamic_sampling: true\n  overlong_buffer: 2"),
    "grpo_dr": dict(steps=4, prompts=8, lr="2.0e-3", extra="adv_norm: centered\n  loss_agg: constant"),
    "grpo_refresh": dict(steps=4, prompts=8, lr="2.0e-3", extra="beta: 0.1\n  kl_estimator: k2\n  ref_refresh_every: 2"),
}
# 2 ranks: DAPO's dynamic sampling (ranks must agree on every extra sampling round) and the reference
# refresh (a sharded policy copied into a sharded reference) in one stage, one launch.
VARIANTS["grpo_dapo_refresh"] = dict(steps=4, prompts=8, lr="2.0e-3", extra=VARIANTS["grpo_dapo"]["extra"] + "\n  "
                                     + VARIANTS["grpo_refresh"]["extra"])


def _rl_rows(tmp: Path) -> Path:
    rows = tiny_rows("rl_train.jsonl", 128)
    for i, r in enumerate(rows):
        if i % 2 == 0:
            r.update(dataset="ifeval", ground_truth=LOWERCASE)
    return write_jsonl(tmp / "rl.jsonl", rows)


def _recipe(tmp: Path, stages: list[str], models: Path | None = None) -> Path:
    """The RL `stages` after an SFT stage and a reward model (for ppo), or, given `models` (an
    earlier run's dir), from that run's `sft` and `rm` models."""
    rl = _rl_rows(tmp)
    pref = write_jsonl(tmp / "pref.jsonl", tiny_rows("pref_train.jsonl", 128, parse=False))
    refs = {"sft": "sft", "rm": "rm"} if models is None else \
        {name: models / name / "model" for name in ("sft", "rm")}
    body = ""
    if models is None:
        body += sft_stage(data=tmp / "train.jsonl", lr=3.0e-3, max_steps=10, global_batch_size=32,
                          micro_batch_size=16)
    if models is None and any(name.startswith("ppo") for name in stages):
        body += textwrap.dedent(f"""
          rm:
            kind: reward_model
            data: [{{path: {pref}}}]
            lr: 3.0e-3
            max_steps: 8
            global_batch_size: 16
            micro_batch_size: 8
            max_seq_len: 64
        """)
    for name in stages:
        if name in VARIANTS:
            body += GRPO.format(name=name, rl=rl, sft=refs["sft"], **VARIANTS[name])
    if "ppo" in stages:
        body += PPO.format(name="ppo", rl=rl, sft=refs["sft"], steps=8,
                           extra=f"reward_model: {refs['rm']}\n  beta: 0.02")
    if "ppo_verifiers" in stages:
        # Verifier reward x 10 (Tulu 3), a value model from the policy with a new head.
        body += PPO.format(name="ppo_verifiers", rl=rl, sft=refs["sft"], steps=3,
                           extra="verifier: number\n  verifiable_reward: 10\n  no_eos_penalty: -1\n"
                                 f"  value_from: {refs['sft']}\n  whiten_rewards: true")
    return mini_recipe(tmp, stages=body, name="rl")


ALL = ["grpo", "grpo_dapo", "grpo_dr", "grpo_refresh", "ppo", "ppo_verifiers"]
# Dr.GRPO's options are pure loss settings (tests/unit): 2 ranks run the others, whose sampling,
# reference refresh or value model could differ across ranks; each torchrun launch costs ~10 s.
TWO_RANK = ["grpo", "grpo_dapo_refresh", "ppo", "ppo_verifiers"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rl")
    out = {}
    for name, stages, args in [("1rank", ALL, ["deepspeed=zero2"]),
                               ("2rank_zero3", TWO_RANK, ["deepspeed=zero3", "cluster.nproc_per_node=2"])]:
        sub = tmp / name
        sub.mkdir()
        rec = _recipe(sub, stages, models=out.get("1rank"))
        r = posttrain("run", f"recipe={rec}", *args, cwd=sub, timeout=1200)
        assert r.returncode == 0, f"{name}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        out[name] = sub / "runs" / "rl"
    return out


@pytest.mark.parametrize("setup,stage", [*(("1rank", s) for s in ALL), *(("2rank_zero3", s) for s in TWO_RANK)])
def test_each_stage_trains_and_saves_a_policy(runs, setup, stage):
    rows = stage_rows(runs[setup], stage)
    assert rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    for key in ("reward", "reward_std", "response_length", "eos_rate", "entropy", "clip_fraction"):
        assert key in rows[-1], key
    m = stage_manifest(runs[setup], stage)
    assert m["status"] == "completed"
    before = load_file(runs["1rank"] / "sft" / "model" / "model.safetensors")  # every setup's input
    after = load_file(runs[setup] / stage / "model" / "model.safetensors")
    assert set(before) == set(after), "the saved policy must have the SFT model's keys (no value head)"
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert changed == len(before), f"{changed}/{len(before)} tensors changed"


@pytest.mark.parametrize("setup", ["1rank", "2rank_zero3"])
def test_grpo_reports_per_verifier_accuracy_and_kl(runs, setup):
    row = stage_rows(runs[setup], "grpo")[-1]
    assert {"accuracy/ifeval", "accuracy/number"} <= set(row)
    assert row["kl"] > 0, "beta 0.05: the policy moved away from its reference"


@pytest.mark.parametrize("setup", ["1rank", "2rank_zero3"])
def test_grpo_raises_the_reward(runs, setup):
    m = stage_manifest(runs[setup], "grpo")["metrics"]
    assert m["reward_end"] > m["reward_start"] + 0.1, m


def test_dynamic_sampling_keeps_groups_with_signal(runs):
    row = stage_rows(runs["1rank"], "grpo_dapo")[0]
    assert row["prompts_sampled"] >= 8
    assert 0 <= row["groups_with_signal"] <= 1


def test_two_ranks_sample_dynamically_and_refresh_the_reference(runs):
    """The 2-rank stage that carries both: its rounds of sampling and its reference refresh ran."""
    row = stage_rows(runs["2rank_zero3"], "grpo_dapo_refresh")[0]
    assert row["prompts_sampled"] >= 8 and 0 <= row["groups_with_signal"] <= 1
    log = (runs["2rank_zero3"] / "grpo_dapo_refresh" / "logs" / "rank0.log").read_text()
    assert "step 2: the reference becomes the current policy" in log, log[-2000:]


def test_ppo_raises_the_reward_model_score(runs):
    for setup in ("1rank", "2rank_zero3"):
        m = stage_manifest(runs[setup], "ppo")["metrics"]
        assert m["reward_end"] > m["reward_start"], (setup, m)
        row = stage_rows(runs[setup], "ppo")[-1]
        assert {"value_loss", "policy_loss", "non_score_reward", "rollout_kl"} <= set(row)


def test_ppo_verifier_reward_is_scaled(runs):
    rows = stage_rows(runs["1rank"], "ppo_verifiers")
    # Rewards are 10 x a verifier score in {0, 1}, or -1 for a completion without EOS.
    for r in rows:
        assert -1.0 <= r["reward"] <= 10.0
