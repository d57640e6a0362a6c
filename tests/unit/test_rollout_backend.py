"""The rollout section: which engine samples for each stage, what plan says about it, the checks
made before anything runs, and the truncated importance weight when another engine samples."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain_cli.config.compose import compose
from posttrain_cli.errors import UserError
from posttrain_cli.pipeline import graph, runner
from posttrain_cli.rollout import episodes as ep
from posttrain_cli.rollout import onpolicy, select

NO_VLLM = not select.vllm_installed()


def _error(args: list[str]) -> str:
    with pytest.raises(UserError) as e:
        compose(args)
    return str(e.value)


def test_the_rollout_section_defaults_to_auto_and_a_stage_block_overrides_it():
    cfg, _ = compose(["recipe=tiny", "stages.grpo.rollout.backend=hf", "rollout.kv_cache_gb=2"])
    assert cfg["rollout"]["backend"] == "auto" and cfg["rollout"]["kv_cache_gb"] == 2.0
    nodes = {s.node.name: s for s in runner.plan(cfg)}
    grpo = graph.effective_rollout(cfg, nodes["grpo"].node)
    assert grpo["backend"] == "hf" and grpo["kv_cache_gb"] == 2.0  # the stage's key over the run's, the rest kept
    assert graph.effective_rollout(cfg, nodes["sft"].node)["backend"] == "auto"


def test_the_rollout_section_is_not_in_the_fingerprint():
    """How samples are drawn does not re-run a completed stage (auto resolving differently after
    vLLM is installed must not either)."""
    base = {s.node.name: s.fingerprint for s in runner.plan(compose(["recipe=tiny"])[0])}
    other = {s.node.name: s.fingerprint
             for s in runner.plan(compose(["recipe=tiny", "rollout.backend=hf", "stages.grpo.rollout.enforce_eager=true"])[0])}
    assert base == other


@pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed here")
@pytest.mark.parametrize("args, where", [
    (["rollout.backend=vllm"], "rollout.backend=vllm"),
    (["stages.grpo.rollout.backend=vllm"], "stages.grpo.rollout.backend=vllm"),
])
def test_backend_vllm_without_vllm_is_one_line_at_plan_time(args, where):
    msg = _error(["recipe=tiny", *args])
    assert msg.startswith(f"{where}: vLLM is not installed") and "posttrain[vllm]" in msg


def test_a_stage_that_samples_nothing_is_not_checked():
    """rm samples nothing: its rollout block is never used, so it is not an error."""
    cfg, _ = compose(["recipe=tiny", "stages.rm.rollout.kv_cache_gb=0"])
    assert cfg["stages"]["rm"]["rollout"]["kv_cache_gb"] == 0


@pytest.mark.parametrize("args, msg", [
    (["stages.grpo.rollout.kv_cache_gb=0"], "stages.grpo.rollout.kv_cache_gb=0 must be > 0"),
    (["rollout.gpu_memory_utilization=1.5"], "rollout.gpu_memory_utilization=1.5 must be in (0, 1]"),
    (["rollout.tensor_parallel_size=0"], "rollout.tensor_parallel_size=0 must be > 0"),
    (["stages.grpo.is_cap=0"], "stages.grpo.is_cap=0.0 must be > 0"),
])
def test_bad_rollout_values_name_their_key(args, msg):
    assert msg in _error(["recipe=tiny", *args])


def test_an_unknown_rollout_key_is_suggested():
    assert "did you mean 'backend'" in _error(["recipe=tiny", "stages.grpo.rollout.backnd=hf"])
    assert "did you mean 'backend'" in _error(["recipe=tiny", "rollout.backnd=hf"])


def test_planned_backend():
    assert select.planned({"backend": "hf"}) == ("hf", "")
    assert select.planned({"backend": "vllm"}) == ("vllm", "")
    want = ("hf", "auto: vllm is not installed") if NO_VLLM else ("vllm", "auto")
    assert select.planned({"backend": "auto"}) == want


def _micro(sampler: list[float], trainer: list[float] | None) -> dict:
    e = ep.Episode(0, [1, 2], [3, 4], sampler, "", "eos", trainer_logprobs=trainer)
    return onpolicy.micro_batch([e], lambda x, seq, n, m: (x.sum(), torch.ones(1)), 2,
                                boundaries="mask", mask_dtype=torch.float32, device="cpu")


def test_behaviour_without_another_engine_is_the_samplers_log_probs_unweighted():
    old, w = onpolicy.behaviour(_micro([-1.0, -2.0], None), 2.0)
    assert old.tolist() == [-1.0, -2.0] and w is None


def test_behaviour_with_another_engine_divides_by_the_trainer_and_truncates_the_weight():
    # trainer - sampler = +0.1 and +1.0: weights e^0.1 = 1.1052 and e^1 = 2.718, the second capped at 2.
    micro = _micro([-1.1, -3.0], [-1.0, -2.0])
    old, w = onpolicy.behaviour(micro, 2.0)
    assert old.tolist() == [-1.0, -2.0]
    assert w.tolist() == pytest.approx([math.exp(0.1), 2.0], rel=1e-6)
    assert onpolicy.behaviour(micro, None)[1] is None  # is_cap null: the ratio only


def test_importance_metrics_are_the_ratios_mean_max_and_truncated_share(monkeypatch):
    loop = onpolicy.OnPolicy.__new__(onpolicy.OnPolicy)
    loop.cfg = {"is_cap": 2.0}
    eps = [ep.Episode(0, [1], [2, 3], [-1.0, -1.0], "", "eos", trainer_logprobs=[-1.0, 0.0]),
           ep.Episode(0, [1], [2], [-2.0], "", "eos", trainer_logprobs=[-2.0 + math.log(0.5)])]
    m = loop.importance_metrics(eps)
    # ratios 1, e, 0.5
    assert m["is_ratio_mean"] == pytest.approx((1 + math.e + 0.5) / 3)
    assert m["is_ratio_max"] == pytest.approx(math.e)
    assert m["is_truncated"] == pytest.approx(1 / 3)


def test_behaviour_fused_into_the_update_takes_its_own_forward_detached():
    # No recomputed log-probs in the micro-batch: this update's forward (lp) is the trainer's.
    micro = _micro([-1.1, -3.0], None)
    lp = torch.tensor([-1.0, -2.0], requires_grad=True)
    old, w = onpolicy.behaviour(micro, 2.0, lp)
    assert old.tolist() == [-1.0, -2.0] and not old.requires_grad
    assert w.tolist() == pytest.approx([math.exp(0.1), 2.0], rel=1e-6)
    # The ratio p_new / p_old is then exactly 1 and its gradient that of lp.
    ratio = torch.exp(lp - old)
    ratio.sum().backward()
    assert ratio.tolist() == [1.0, 1.0] and lp.grad.tolist() == [1.0, 1.0]


def test_fused_ratio_sums_equal_the_recomputed_metrics():
    loop = onpolicy.OnPolicy.__new__(onpolicy.OnPolicy)
    loop.cfg, loop._ratio = {"is_cap": 2.0}, onpolicy._RatioSums()
    loop.record_ratio(torch.tensor([-1.0, 0.0]), {"old_logps": torch.tensor([-1.0, -1.0])})
    loop.record_ratio(torch.tensor([-2.0 + math.log(0.5)]), {"old_logps": torch.tensor([-2.0])})
    m = loop._ratio.metrics()
    assert m["is_ratio_mean"] == pytest.approx((1 + math.e + 0.5) / 3)
    assert m["is_ratio_max"] == pytest.approx(math.e) and m["is_truncated"] == pytest.approx(1 / 3)


def test_dropout_left_on_keeps_the_separate_pass():
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain_cli.engine.deepspeed_engine import disable_dropout

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32)
    assert not onpolicy._dropout(LlamaForCausalLM(LlamaConfig(**small)))  # Llama: attention_dropout 0.0
    model = LlamaForCausalLM(LlamaConfig(attention_dropout=0.1, **small))
    assert onpolicy._dropout(model)
    disable_dropout(model)  # what train_policy does
    assert not onpolicy._dropout(model)
