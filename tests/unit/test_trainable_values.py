"""Values that cannot train are refused at plan time (exit 2, one line naming the full key), and
the pieces that stop a diverged stage: what counts as non-finite in a step, the message it gives,
a state dict's first non-finite tensor, a merge that would publish nan or inf (issue 17, section 4).

The training loop, save_hf and the worker are exercised for real in tests/e2e/test_divergence.py."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from posttrain_cli.config.compose import compose
from posttrain_cli.engine.deepspeed_engine import nonfinite_tensor
from posttrain_cli.engine.loop import diverged_message, nonfinite
from posttrain_cli.errors import Diverged, UserError
from posttrain_cli.merge import stream
from posttrain_cli.pipeline import runner
from tests.unit.test_merge_stream import tensors, write_model


def _refusal(*args: str) -> str:
    with pytest.raises(UserError) as e:
        cfg, _ = compose(list(args))
        runner.plan(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# (recipe and overrides, what the one line starts with, a word it must hold)
REFUSED = [
    (["recipe=tiny", "stages.sft.lr=inf"], "stages.sft.lr=inf", "finite"),
    (["recipe=tiny", "stages.sft.lr=nan"], "stages.sft.lr=nan", "finite"),
    (["recipe=tiny", "stages.sft.lr=-0.001"], "stages.sft.lr=-0.001", "> 0"),
    (["recipe=tiny", "stages.sft.lr=0"], "stages.sft.lr=0.0", "> 0"),
    (["recipe=tiny", "stages.sft.lr=1e39"], "stages.sft.lr=1e+39", "float32"),
    (["recipe=tiny", "stages.dpo.adam_betas=[0.9,1.0]"], "stages.dpo.adam_betas=[0.9, 1.0]", "[0, 1)"),
    (["recipe=tiny", "stages.dpo.adam_betas=[-0.1,0.999]"], "stages.dpo.adam_betas=[-0.1, 0.999]", "[0, 1)"),
    (["recipe=tiny", "stages.dpo.adam_betas=[0.9]"], "stages.dpo.adam_betas=[0.9]", "two numbers"),
    (["recipe=tiny", "stages.dpo.adam_betas=[0.9,nan]"], "stages.dpo.adam_betas[1]=nan", "finite"),
    (["recipe=tiny", "stages.rm.adam_eps=0"], "stages.rm.adam_eps=0.0", "> 0"),
    (["recipe=tiny", "stages.rm.adam_eps=-1e-8"], "stages.rm.adam_eps=-1e-08", "> 0"),
    (["recipe=tiny", "stages.grpo.weight_decay=nan"], "stages.grpo.weight_decay=nan", "finite"),
    (["recipe=tiny", "stages.grpo.weight_decay=-0.1"], "stages.grpo.weight_decay=-0.1", ">= 0"),
    (["recipe=tiny", "stages.grpo.grad_clip=-1"], "stages.grpo.grad_clip=-1.0", ">= 0"),
    (["recipe=tiny", "stages.grpo.temperature=nan"], "stages.grpo.temperature=nan", "finite"),
    (["recipe=tiny", "stages.sft.eval.temperature=inf"], "stages.sft.eval.temperature=inf", "finite"),
    (["recipe=tiny", "seed=4294967296"], "seed=4294967296", "0..4294967295"),
    (["recipe=tiny", "seed=-1"], "seed=-1", "0..4294967295"),
    (["recipe=tiny", "stages.sft.global_batch_size=4294967296"], "stages.sft.global_batch_size=4294967296",
     "16,777,216"),
    (["recipe=tiny", "stages.sft.micro_batch_size=256"], "stages.sft.micro_batch_size=256",
     "more than global_batch_size=128"),
    (["recipe=tiny", "stages.sft.max_seq_len=4294967296"], "stages.sft.max_seq_len=4294967296", "int32"),
    (["recipe=tiny", "stages.sft.micro_batch_size=16", "stages.sft.max_seq_len=200000000"], "stages.sft:",
     "3,200,000,000 tokens in one forward"),
    (["recipe=tiny", "stages.grpo.prompts_per_step=65536", "stages.grpo.num_generations=1024"], "stages.grpo:",
     "prompts_per_step 65536 x num_generations 1024"),
    (["recipe=tiny", "stages.grpo.rollout_batch_size=100000000"], "stages.grpo.rollout_batch_size=100000000",
     "machine"),
    (["recipe=tiny", "stages.sft.max_steps=1000000000"], "stages.sft.max_steps=1000000000", "100,000,000"),
    (["recipe=tiny", "stages.sft.max_steps=-5"], "stages.sft.max_steps=-5", "> 0"),
    (["recipe=tiny", "stages.sft.epochs=-1"], "stages.sft.epochs=-1.0", "between 0 and"),
    (["recipe=tiny", "stages.sft.epochs=1e7"], "stages.sft.epochs=10000000.0", "between 0 and 1,000,000"),
    (["recipe=tiny", "stages.sft.epochs=inf"], "stages.sft.epochs=inf", "finite"),
    (["recipe=tiny", "stages.sft.nonfinite_patience=-1"], "stages.sft.nonfinite_patience=-1", ">= 0"),
    (["recipe=tiny", "stages.sft.min_lr_ratio=2"], "stages.sft.min_lr_ratio=2.0", "[0, 1]"),
    (["recipe=tulu3", "scale=tiny", "stages.rlvr.value_lr=-1e-6"], "stages.rlvr.value_lr=-1e-06", "> 0"),
    (["recipe=tiny_llama3", "stages.round.count=1000000"], "stages.round.count=1000000", "at most 100"),
    (["recipe=tiny_llama3", "stages.round.stages.dpo.lr=inf"], "stages.round.stages.dpo.lr=inf", "finite"),
    (["recipe=tiny", "stages.soup.weights=[1.0,inf]"], "stages.soup.weights[1]=inf", "finite"),
]


@pytest.mark.parametrize("args,starts,holds", REFUSED, ids=[" ".join(c[0][1:]) for c in REFUSED])
def test_values_that_cannot_train_are_refused_at_plan_time(args, starts, holds):
    msg = _refusal(*args)
    assert msg.startswith(starts), msg
    assert holds in msg, msg


@pytest.mark.parametrize("args", [
    ["seed=4294967295"], ["seed=0"], ["stages.dpo.adam_betas=[0.0,0.0]"], ["stages.sft.lr=1e8"],
    ["stages.sft.nonfinite_patience=3"], ["stages.sft.grad_clip=0"], ["stages.sft.grad_clip=null"],
    ["stages.sft.global_batch_size=16777216", "stages.sft.micro_batch_size=8"],
])
def test_edge_values_that_can_train_pass(args):
    """The bounds are inclusive where a value is usable; a finite lr that diverges is the loop's to catch."""
    cfg, _ = compose(["recipe=tiny", *args])
    runner.plan(cfg)


def test_rounds_at_the_limit_pass():
    cfg, _ = compose(["recipe=tiny_llama3", "stages.round.count=3"])
    assert "r3.dpo" in cfg["stages"]


def test_patience_is_not_in_the_fingerprint():
    """A completed stage's weights do not depend on it: changing it re-runs nothing."""
    steps = {p: {s.node.name: s.fingerprint for s in runner.plan(compose(["recipe=tiny", *p])[0])}
             for p in ((), ("stages.sft.nonfinite_patience=5",))}
    assert steps[()] == steps[("stages.sft.nonfinite_patience=5",)]


# ------------------------------------------------------------------ a step that goes non-finite


def test_nonfinite_names_what_went_wrong():
    assert nonfinite(2.3, 1.5, False) is None
    assert nonfinite(math.nan, 1.5, False) == "loss nan"
    assert nonfinite(math.inf, math.nan, True) == "loss inf"  # the loss first
    assert nonfinite(2.3, math.inf, True) == "gradient norm inf"
    # This rank's norm is fine, another rank's is not (the all-reduced flag).
    assert nonfinite(2.3, 0.7, True) == "gradient norm non-finite (on another rank)"
    # No norm (ZeRO-0 reports none) and a finite loss: the weights checked after the update speak.
    assert nonfinite(2.3, None, False) is None
    assert nonfinite(2.3, None, False, True) == "weights nan or inf after the update"


def _ctx(tmp_path: Path, lr: float = 1e8, checkpoint: str | None = None):
    stage_dir = tmp_path / "sft"
    if checkpoint:
        (stage_dir / "checkpoints" / checkpoint).mkdir(parents=True)
        (stage_dir / "checkpoints" / checkpoint / "meta.json").write_text("{}")
        (stage_dir / "checkpoints" / "latest").write_text(checkpoint + "\n")
    return SimpleNamespace(stage_dir=stage_dir, cfg={"lr": lr},
                           where=lambda key="": "stages.sft" + (f".{key}" if key else ""))


def test_diverged_message_names_stage_step_checkpoint_and_fix(tmp_path):
    msg = diverged_message(_ctx(tmp_path, checkpoint="step-000004"), "gradient norm inf", 5, 10, 1, 1, 0)
    assert msg == ("stages.sft: gradient norm inf at step 5 of 10: training diverged and stopped; nothing published, "
                   "the last good checkpoint step-000004 is kept; lower stages.sft.lr (now 1e+08)")


def test_diverged_message_rl_counts_updates_and_rollout_steps(tmp_path):
    """An RL stage takes `unit` updates per rollout step: the message gives both."""
    msg = diverged_message(_ctx(tmp_path), "loss nan", 7, 16, 2, 3, 2)
    assert msg.startswith("stages.sft: loss nan at update 7 of 16 (rollout step 4 of 8) (3 steps in a row, "
                          "nonfinite_patience 2): training diverged")
    assert "no checkpoint had been saved" in msg


def test_diverged_message_at_the_end(tmp_path):
    msg = diverged_message(_ctx(tmp_path), "loss inf", 10, 10, 1, 2, 4, at_end=True)
    assert "at step 10 of 10 (2 steps in a row, nonfinite_patience 4); training ended before it recovered" in msg


def test_diverged_is_a_stage_failure():
    assert Diverged.exit_code == 1 and not issubclass(Diverged, UserError)


# ------------------------------------------------------------------ nothing non-finite is published


def test_nonfinite_tensor_finds_the_first_bad_tensor():
    state = {"a": torch.ones(3), "steps": torch.tensor([7]), "b": torch.tensor([1.0, math.nan, math.inf, 2.0]),
             "c": torch.tensor([math.nan])}
    assert nonfinite_tensor(state) == ("b", 2, 4)
    assert nonfinite_tensor({"a": torch.ones(3), "i": torch.tensor([1, 2])}) is None
    assert nonfinite_tensor({"h": torch.tensor([65504.0, -math.inf], dtype=torch.float16)}) == ("h", 1, 2)


def test_merge_refuses_an_input_with_nan_and_names_it(tmp_path):
    bad = tensors(1)
    bad["model.layers.0.mlp.up_proj.weight"][2, 1] = math.nan
    a, b = write_model(tmp_path / "a", tensors(0)), write_model(tmp_path / "b", bad)
    with pytest.raises(Diverged) as e:
        stream.merge([("stages.soup.models[0]", a), ("stages.soup.models[1]", b)], tmp_path / "out",
                     method="linear", where="stages.soup")
    assert str(e.value) == ("stages.soup: the merged tensor model.layers.0.mlp.up_proj.weight holds non-finite "
                            "values (the input stages.soup.models[1] holds nan or inf there); the merge is not "
                            "published")


def test_merge_refuses_a_result_that_overflows_its_dtype(tmp_path):
    """Task arithmetic with large weights leaves float16's range (65504): inf, refused."""
    big = {k: (v * 1e4 if v.is_floating_point() else v) for k, v in tensors(0).items()}
    a, b = write_model(tmp_path / "a", big), write_model(tmp_path / "b", tensors(1))
    base = write_model(tmp_path / "base", tensors(2))
    with pytest.raises(Diverged) as e:
        stream.merge([("stages.ta.models[0]", a), ("stages.ta.models[1]", b)], tmp_path / "out",
                     method="task_arithmetic", base=("stages.ta.base", base), weights=[100.0, 1.0],
                     dtype="float16", where="stages.ta")
    assert str(e.value).startswith("stages.ta: the merged tensor ")
    assert "(the result overflows float16)" in str(e.value)


def test_merge_of_finite_models_is_written(tmp_path):
    a, b = write_model(tmp_path / "a", tensors(0)), write_model(tmp_path / "b", tensors(1))
    stats = stream.merge([("m[0]", a), ("m[1]", b)], tmp_path / "out", method="linear", where="stages.m")
    assert stats["tensors"] == 6 and (tmp_path / "out" / "model.safetensors").is_file()


def test_a_signal_during_non_finite_steps_saves_nothing_over_the_last_good_checkpoint(tmp_path):
    """The loop raises Preempted(saved=False) then: the message says what is kept (or that nothing is)."""
    from posttrain_cli.engine.checkpoint import Preempted

    kept = tmp_path / "checkpoints" / "step-000002"
    assert str(Preempted("SIGTERM", 3, 10, kept, saved=False)) == (
        f"stopped by SIGTERM at step 3 of 10; not saved (its last steps were non-finite); kept {kept}")
    assert str(Preempted("SIGUSR1", 1, 10, None, saved=False)).endswith("; no checkpoint yet")
    assert str(Preempted("SIGTERM", 3, 10, kept)) == f"stopped by SIGTERM at step 3 of 10; checkpoint saved at {kept}"
