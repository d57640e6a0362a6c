"""Every stage kind that samples, with `rollout.backend: vllm`, through the CLI: grpo, ppo, distill,
generate, rejection_sampling and eval blocks on 1 rank (ZeRO-2) and 2 ranks (ZeRO-3), each rank
with its own in-process vLLM engine loaded with the policy's weights after every update.

- GRPO with vLLM learns as GRPO with hf does, from the same SFT model in the same recipe (reward
  rise, held-out accuracy kept), and its importance ratio p_trainer / p_sampler stays at 1 (fp32 on
  both engines: a sync that did not happen would move it);
- a GRPO stage stopped mid-stage (SIGTERM) and run again ends with the weights of a run never
  stopped.

Runs where vLLM is installed (the CPU build, in an environment of its own: scripts/vllm_env.sh).
The tiny model is 64 wide with 2 heads: vLLM's CPU attention runs no head size below 32.
"""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here (scripts/vllm_env.sh makes an environment with it)")

from tests.conftest import posttrain, sft_stage, stage_manifest, stage_rows, tiny_rows, write_jsonl, write_recipe  # noqa: E402
from tests.integration.test_resume import _max_diff, _run_until, _weights  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.vllm]

MODEL = """
model:
  path: tiny
  tiny: {hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 2,
         max_position_embeddings: 128, seed: 0}
rollout: {backend: vllm, enforce_eager: true, kv_cache_gb: 0.125}
"""
LOWERCASE = json.dumps({"func_name": "validate_lowercase"})

RL = """
  data: [{{path: {rl}}}]
  verifier: number
  max_new_tokens: 6
  max_seq_len: 64
  micro_batch_size: 8
  rollout_batch_size: 32
"""
# grpo as test_rl_dist.py's (16 steps of 16 prompts, 2 updates a step: the second divides by the
# trainer's recomputed log-probs), once with each backend.
GRPO = """
{name}:
  kind: grpo
  from: sft
  prompts_per_step: 16
  num_generations: 4
  max_steps: 16
  lr: 5.0e-3
  beta: 0.05
  mini_batches: 2
  eval: {{data: [{{path: {evald}}}], max_new_tokens: 6, before: true}}
  {extra}""" + RL
OTHERS = """
ppo:
  kind: ppo
  from: sft
  value_from: sft
  prompts_per_step: 16
  num_generations: 2
  max_steps: 3
  lr: 1.0e-3
  ppo_epochs: 2
  mini_batches: 2""" + RL + """
distill:
  kind: distill
  from: sft
  teachers: {{add: grpo, ifeval: sft}}
  num_generations: 2
  prompts_per_step: 8
  max_steps: 3
  lr: 1.0e-3
  heldout: [{{path: {evald}}}]""" + RL + """
gen:
  kind: generate
  from: sft
  data: [{{path: {rl}}}]
  num_generations: 2
  max_new_tokens: 6
  max_seq_len: 64
  limit: 16
  drop_truncated: false
rs:
  kind: rejection_sampling
  from: sft
  data: [{{path: {rl}}}]
  verifier: number
  num_samples: 2
  max_new_tokens: 6
  max_seq_len: 64
  limit: 16
"""
SETUPS = {"1rank": ["deepspeed=zero2"], "2rank_zero3": ["deepspeed=zero3", "cluster.nproc_per_node=2"]}
SAMPLING = ["grpo", "ppo", "distill", "gen", "rs"]


def _recipe(tmp: Path, *, hf_twin: bool = False, others: bool = True, name: str = "vl") -> Path:
    rows = tiny_rows("rl_train.jsonl", 128)
    for i, r in enumerate(rows):  # half lowercase constraints: a reward a barely trained model can find
        if i % 2 == 0:
            r.update(dataset="ifeval", ground_truth=LOWERCASE)
    rl = write_jsonl(tmp / "rl.jsonl", rows)
    evald = write_jsonl(tmp / "eval.jsonl", tiny_rows("rl_train.jsonl", 144)[128:])
    train = write_jsonl(tmp / "train.jsonl", tiny_rows("sft_train.jsonl", 256))
    stages = sft_stage(data=train, lr=3.0e-3, max_steps=10, global_batch_size=32, micro_batch_size=16)
    stages += GRPO.format(name="grpo", rl=rl, evald=evald, extra="")
    if hf_twin:
        stages += GRPO.format(name="grpo_hf", rl=rl, evald=evald, extra="rollout: {backend: hf}")
        stages += GRPO.format(name="grpo_lora", rl=rl, evald=evald, extra="lora: {r: 8}")
    if others:
        stages += OTHERS.format(rl=rl, evald=evald)
    body = (f"defaults: [base, _self_]\nname: {name}\nrun_dir: {tmp / 'runs' / name}\n" + textwrap.dedent(MODEL)
            + "stages:\n" + textwrap.indent(stages, "  "))
    return write_recipe(tmp, body, name)


def run_setup(tmp_path_factory, setup: str) -> Path:
    """The recipe's run under one of SETUPS (1 rank also runs the hf and LoRA twins of grpo)."""
    tmp = tmp_path_factory.mktemp(setup)
    rec = _recipe(tmp, hf_twin=setup == "1rank")
    r = posttrain("run", f"recipe={rec}", *SETUPS[setup], cwd=tmp, timeout=1800)
    (tmp / "out.txt").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, f"{setup}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return tmp / "runs" / "vl"


# The 1-rank run is this file's; the 2-rank run is test_vllm_stages_2rank.py's, which the other test
# worker takes at the same time. Both check the same (the check_* functions).
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return {"1rank": run_setup(tmp_path_factory, "1rank")}


def check_every_sampling_kind_completes(run_dir: Path) -> None:
    for stage in SAMPLING:
        m = stage_manifest(run_dir, stage)
        assert m["status"] == "completed", (stage, m)
        log = (run_dir / stage / "logs" / "rank0.log").read_text()
        assert "sampling with vllm" in log, f"{stage}: no vLLM engine in its log"


def check_the_engine_takes_every_update(run_dir: Path) -> None:
    """A sync before every step but the first: weight_syncs counts them. fp32 on both engines: the
    trainer's recomputed log-probs equal the engine's to float noise, so the importance ratio is 1
    (a step sampled from stale weights, after 2 updates at lr 5e-3, is off by far more)."""
    rows = stage_rows(run_dir, "grpo")
    per_step = {}
    for r in rows:
        per_step.setdefault(r["weight_syncs"], r)
    assert sorted(per_step) == list(range(16)), sorted(per_step)
    for r in rows:
        assert abs(r["is_ratio_mean"] - 1) < 1e-3 and r["is_ratio_max"] < 1.05, r
        assert r["is_truncated"] == 0.0, r


def check_sampled_datasets_are_sft_rows(run_dir: Path) -> None:
    gen = [json.loads(line) for line in (run_dir / "gen" / "data.jsonl").read_text().splitlines()]
    assert len(gen) == 32 and all(r["messages"][-1]["role"] == "assistant" for r in gen)
    rs = [json.loads(line) for line in (run_dir / "rs" / "data.jsonl").read_text().splitlines()]
    assert len(rs) <= 16 and all(r["messages"][-1]["role"] == "assistant" for r in rs)


def test_every_sampling_kind_completes_on_vllm(runs):
    check_every_sampling_kind_completes(runs["1rank"])


def test_the_engine_takes_every_update_and_samples_what_the_trainer_would(runs):
    check_the_engine_takes_every_update(runs["1rank"])


def test_sampled_datasets_are_sft_rows(runs):
    check_sampled_datasets_are_sft_rows(runs["1rank"])


def test_grpo_learns_with_vllm_as_with_hf(runs):
    vl, hf = (stage_manifest(runs["1rank"], s)["metrics"] for s in ("grpo", "grpo_hf"))
    for m in (vl, hf):
        assert m["reward_end"] > m["reward_start"] + 0.1, m
        ev = m["eval"]
        assert ev["after"]["accuracy"] >= ev["before"]["accuracy"] - 0.15, ev
    assert vl["reward_end"] > hf["reward_end"] - 0.2, (vl["reward_end"], hf["reward_end"])
    assert "is_ratio_mean" not in stage_rows(runs["1rank"], "grpo_hf")[-1]  # hf samples the trainer's module


def test_resumed_grpo_on_vllm_ends_with_the_uninterrupted_weights(tmp_path):
    """One update a step (mini_batches 1): the trainer's log-probs come from the update's own forward
    (rollout/onpolicy.py, fused), and the ratio is still reported, at 1."""
    rec = _recipe(tmp_path, others=False, name="res")
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = ["deepspeed=zero2", "stages.grpo.max_steps=6", "stages.grpo.save_every=2", "stages.grpo.eval=null",
            "stages.grpo.mini_batches=1"]
    r = posttrain("run", f"recipe={rec}", f"run_dir={straight}", *args, cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no separate pass" in (straight / "grpo" / "logs" / "rank0.log").read_text()
    rows = stage_rows(straight, "grpo")
    assert [r["weight_syncs"] for r in rows] == [float(i) for i in range(6)]
    for row in rows:
        assert abs(row["is_ratio_mean"] - 1) < 1e-3 and row["is_ratio_max"] < 1.05 and row["clip_fraction"] == 0, row
    # Stopped mid-stage (after step 3 of 6; saved at 2): stopped at its last step, the final save can
    # win the race and the stage completes, which would test nothing.
    _run_until(["run", f"recipe={rec}", f"run_dir={stopped}", *args], tmp_path, stopped, "grpo", after=3,
               sig=signal.SIGTERM)
    assert stage_manifest(stopped, "grpo")["status"] != "completed"
    r = posttrain("run", f"recipe={rec}", f"run_dir={stopped}", *args, cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _max_diff(_weights(straight, "grpo"), _weights(stopped, "grpo")) < 1e-6


def test_a_lora_policy_syncs_merged_weights(runs):
    """The engine gets base + adapter after every update (never the base alone): the trainer's
    log-probs, with the adapter on, stay those the engine sampled with."""
    rows = stage_rows(runs["1rank"], "grpo_lora")
    assert sorted({r["weight_syncs"] for r in rows}) == [float(i) for i in range(16)]
    for r in rows:
        assert abs(r["is_ratio_mean"] - 1) < 1e-3 and r["is_ratio_max"] < 1.05, r
    log = (runs["1rank"] / "grpo_lora" / "logs" / "rank0.log").read_text()
    assert "sampling with vllm" in log and "LoRA: r 8" in log
    # The adapter moved the policy away from its input (else the ratio would say nothing).
    assert stage_rows(runs["1rank"], "grpo_lora")[-1]["kl"] > 0
