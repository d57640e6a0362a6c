"""RL math (losses/rl.py) against hand-worked numbers and plain-Python reference loops."""

from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain_cli.kinds import KINDS
from posttrain_cli.losses import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from posttrain_cli.losses.rl import MAX_LOG_RATIO, STD_EPS, clipped_policy_loss, clipped_value_loss, gae, whiten
from posttrain_cli.stages import grpo, ppo
from posttrain_cli.stages.grpo import overlong_penalty

t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def test_registries_match_the_schema_names():
    assert set(ADVANTAGES) == set(KINDS["grpo"].schema["adv_norm"][0])
    assert set(LOSS_AGGREGATIONS) == set(KINDS["grpo"].schema["loss_agg"][0])
    assert set(KL_ESTIMATORS) == set(KINDS["grpo"].schema["kl_estimator"][0])


def test_group_std_by_hand():
    # Group rewards 1, 0, 0, 1: mean 0.5, unbiased std sqrt((4 x 0.25) / 3) = 0.57735.
    a = ADVANTAGES["group_std"](t(1, 0, 0, 1).view(1, 4))
    x = 0.5 / (math.sqrt(1 / 3) + STD_EPS)  # 0.8659
    assert a.view(-1).tolist() == pytest.approx([x, -x, -x, x])


def test_group_advantages_against_a_python_loop():
    rng = random.Random(0)
    rewards = [[rng.choice([0.0, 1.0, 0.5]) for _ in range(6)] for _ in range(5)]
    got_std = ADVANTAGES["group_std"](torch.tensor(rewards, dtype=torch.float64))
    got_c = ADVANTAGES["centered"](torch.tensor(rewards, dtype=torch.float64))
    for p, group in enumerate(rewards):
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        for i, r in enumerate(group):
            assert got_std[p, i].item() == pytest.approx((r - mean) / (std + STD_EPS))
            assert got_c[p, i].item() == pytest.approx(r - mean)


def test_equal_rewards_give_zero_advantage_and_none_keeps_rewards():
    assert ADVANTAGES["group_std"](t(1, 1, 1).view(1, 3)).abs().max() == 0
    assert ADVANTAGES["none"](t(2, 0).view(1, 2)).view(-1).tolist() == [2, 0]


def test_kl_estimators_by_hand():
    logp, ref = t(-1.0), t(-2.0)  # log pi - log ref = 1
    assert KL_ESTIMATORS["k1"](logp, ref).item() == pytest.approx(1.0)
    assert KL_ESTIMATORS["k2"](logp, ref).item() == pytest.approx(0.5)
    # k3: exp(-1) - (-1) - 1 = e^-1
    assert KL_ESTIMATORS["k3"](logp, ref).item() == pytest.approx(math.exp(-1))
    same = KL_ESTIMATORS["k3"](t(-1.5), t(-1.5))
    assert same.item() == 0.0


def test_kl_estimators_are_unbiased_where_claimed():
    """Sampling x ~ p: E[k1] = E[k3] = KL(p || q); k2 is the second-order approximation."""
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())
    lp, lq = p.log(), q.log()
    for name in ("k1", "k3"):
        assert float((p * KL_ESTIMATORS[name](lp, lq)).sum()) == pytest.approx(exact)
    assert float((p * KL_ESTIMATORS["k2"](lp, lq)).sum()) == pytest.approx(exact, rel=0.1)


def test_loss_aggregations_by_hand():
    # Two sequences: tokens [1, 3] and [2]; max_len 4.
    loss, seq = t(1, 3, 2), torch.tensor([0, 0, 1])
    s, w = LOSS_AGGREGATIONS["seq_mean_token_mean"](loss, seq, 2, 4)
    assert (float(s), w) == (2 + 2, 2.0)          # means 2 and 2, over 2 sequences -> 2
    s, w = LOSS_AGGREGATIONS["token_mean"](loss, seq, 2, 4)
    assert (float(s), w) == (6, 3.0)              # 6 / 3 tokens
    s, w = LOSS_AGGREGATIONS["constant"](loss, seq, 2, 4)
    assert (float(s), w) == (1.5, 2.0)            # 6 / 4 per sequence, / 2 sequences


def test_aggregation_does_not_depend_on_how_the_batch_splits():
    """The loop divides summed sums by summed weights: two micro-batches equal one."""
    rng = random.Random(1)
    lens = [3, 1, 4, 2]
    loss = torch.tensor([rng.random() for _ in range(sum(lens))], dtype=torch.float64)
    seq = torch.repeat_interleave(torch.arange(4), torch.tensor(lens))
    for name, fn in LOSS_AGGREGATIONS.items():
        s_all, w_all = fn(loss, seq, 4, 8)
        cut = lens[0] + lens[1]
        s1, w1 = fn(loss[:cut], seq[:cut], 2, 8)
        s2, w2 = fn(loss[cut:], seq[cut:] - 2, 2, 8)
        assert float(s_all) / w_all == pytest.approx(float(s1 + s2) / (w1 + w2)), name


def test_clipped_policy_loss_by_hand():
    old = t(0.0, 0.0, 0.0, 0.0)
    logp = torch.log(t(1.5, 1.5, 0.5, 1.1))  # ratios
    adv = t(1.0, -1.0, -1.0, 1.0)
    loss, clipped = clipped_policy_loss(logp, old, adv, 0.2, 0.28)
    # ratio 1.5, A=+1: min(1.5, 1.28) = 1.28 (clipped); A=-1: min(-1.5, -1.28) = -1.5 (not clipped)
    # ratio 0.5, A=-1: min(-0.5, -0.8) = -0.8 (clipped); ratio 1.1, A=+1: 1.1
    assert loss.tolist() == pytest.approx([-1.28, 1.5, 0.8, -1.1])
    assert clipped.tolist() == [True, False, True, False]


def test_policy_gradient_at_ratio_one_is_the_advantage():
    logp = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    adv = t(2.0, -1.0, 0.5)
    loss, _ = clipped_policy_loss(logp, logp.detach(), adv, 0.2, 0.2)
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-2.0, 1.0, -0.5])


# The policy losses' configs: grpo's clip_low / clip_high (DAPO clip-higher), ppo's cliprange.
GRPO_CFG, PPO_CFG = {"clip_low": 0.2, "clip_high": 0.28}, {"cliprange": 0.2}


def test_policy_losses_share_one_signature_and_the_stages_name_theirs():
    assert set(POLICY_LOSSES) == {"clip_higher", "clip"}
    assert (grpo.POLICY_LOSS, ppo.POLICY_LOSS) == ("clip_higher", "clip")
    logp, old, adv = t(0.1, -0.2), t(0.0, 0.0), t(1.0, -1.0)
    for name, cfg in (("clip_higher", GRPO_CFG), ("clip", PPO_CFG)):
        loss, metrics = POLICY_LOSSES[name](logp, old, adv, cfg)
        assert loss.shape == logp.shape and set(metrics) == {"clip_fraction"}, name
        assert metrics["clip_fraction"].dtype == logp.dtype and metrics["clip_fraction"].shape == logp.shape


def test_clip_higher_by_hand():
    """grpo's loss, ratio clipped to [0.8, 1.28]; per token -min(r A, clip(r) A):
    r 1.5, A +1: min(1.5, 1.28) = 1.28 -> -1.28, clipped;   r 1.5, A -1: min(-1.5, -1.28) = -1.5 -> 1.5;
    r 0.5, A -1: min(-0.5, -0.8) = -0.8 -> 0.8, clipped;    r 1.1, A +1: min(1.1, 1.1) -> -1.1."""
    logp, old, adv = torch.log(t(1.5, 1.5, 0.5, 1.1)), t(0, 0, 0, 0), t(1.0, -1.0, -1.0, 1.0)
    loss, metrics = POLICY_LOSSES["clip_higher"](logp, old, adv, GRPO_CFG)
    assert loss.tolist() == pytest.approx([-1.28, 1.5, 0.8, -1.1])
    assert metrics["clip_fraction"].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_ppo_clip_by_hand():
    """ppo's loss, ratio clipped to [0.8, 1.2] (cliprange 0.2):
    r 1.5, A +1: min(1.5, 1.2) = 1.2 -> -1.2, clipped;      r 1.5, A -1: min(-1.5, -1.2) = -1.5 -> 1.5;
    r 1.1, A +1: min(1.1, 1.1) -> -1.1;                      r 0.5, A -1: min(-0.5, -0.8) = -0.8 -> 0.8, clipped;
    r 0.9, A -2: min(-1.8, -1.8) -> 1.8 (inside the range: not clipped)."""
    logp, old = torch.log(t(1.5, 1.5, 1.1, 0.5, 0.9)), t(0, 0, 0, 0, 0)
    loss, metrics = POLICY_LOSSES["clip"](logp, old, t(1.0, -1.0, 1.0, -1.0, -2.0), PPO_CFG)
    assert loss.tolist() == pytest.approx([-1.2, 1.5, -1.1, 0.8, 1.8])
    assert metrics["clip_fraction"].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("name,cfg", [("clip_higher", GRPO_CFG), ("clip", PPO_CFG)])
def test_a_stale_log_ratio_of_100_gives_a_finite_loss_and_gradient(name, cfg):
    """log pi - log pi_old = 100 (a sample far off the current policy), float32 as in training.
    Unclamped, exp(100) = 2.7e43 overflows float32 (max 3.4e38) to inf: the A < 0 token's loss
    is inf and the gradients are NaN (A > 0: 0 x inf through the clip) and inf. Clamped to 20 first:
    r = e^20 = 4.85e8. A = +1: -min(4.85e8, 1 + high) = -(1 + high), clipped. A = -1:
    -min(-4.85e8, -(1 + high)) = e^20, not clipped (PPO keeps the pessimistic term). Beyond the
    clamp the log-ratio carries no gradient, so both gradients are 0."""
    logp = torch.tensor([100.0, 100.0], requires_grad=True)
    old, adv = torch.zeros(2), torch.tensor([1.0, -1.0])
    loss, metrics = POLICY_LOSSES[name](logp, old, adv, cfg)
    high = cfg.get("clip_high", cfg.get("cliprange"))
    assert loss.tolist() == pytest.approx([-(1 + high), math.exp(MAX_LOG_RATIO)], rel=1e-6)
    assert metrics["clip_fraction"].tolist() == [1.0, 0.0]
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert logp.grad.tolist() == [0.0, 0.0]
    with torch.no_grad():
        assert torch.isinf(torch.exp(logp - old)).all(), "without the clamp the ratio overflows"


def test_the_clamp_leaves_ordinary_ratios_bit_identical():
    """Inside +-MAX_LOG_RATIO the clamp is the identity: value and gradient equal the unclamped
    surrogate exactly (a run's numbers do not move)."""
    gen = torch.Generator().manual_seed(0)
    logp = (torch.randn(64, generator=gen) * 3).requires_grad_()
    old, adv = torch.randn(64, generator=gen), torch.randn(64, generator=gen)
    loss, _ = POLICY_LOSSES["clip_higher"](logp, old, adv, GRPO_CFG)
    loss.sum().backward()
    plain_logp = logp.detach().clone().requires_grad_()
    ratio = torch.exp(plain_logp - old)
    plain = -torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.28) * adv)
    plain.sum().backward()
    assert torch.equal(loss, plain) and torch.equal(logp.grad, plain_logp.grad)


def test_gae_against_a_python_loop_and_by_hand():
    # gamma 1, lam 1: advantage = (sum of future rewards) - V_t.
    adv, ret = gae(t(0, 0, 1), t(0.5, 0.2, 0.4), 1.0, 1.0)
    assert adv.tolist() == pytest.approx([0.5, 0.8, 0.6])
    assert ret.tolist() == pytest.approx([1.0, 1.0, 1.0])
    rng = random.Random(2)
    r = [rng.random() for _ in range(7)]
    v = [rng.random() for _ in range(7)]
    gamma, lam = 0.9, 0.8
    want, last = [0.0] * 7, 0.0
    for i in reversed(range(7)):
        nv = v[i + 1] if i + 1 < 7 else 0.0
        last = r[i] + gamma * nv - v[i] + gamma * lam * last
        want[i] = last
    adv, ret = gae(torch.tensor(r, dtype=torch.float64), torch.tensor(v, dtype=torch.float64), gamma, lam)
    assert adv.tolist() == pytest.approx(want)
    assert ret.tolist() == pytest.approx([a + b for a, b in zip(want, v)])


def test_whiten():
    x = t(1, 2, 3, 4)
    w = whiten(x)
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-9)
    assert float(w.var(unbiased=False)) == pytest.approx(1.0, rel=1e-6)
    assert float(whiten(x, shift_mean=False).mean()) == pytest.approx(2.5)


def test_clipped_value_loss_by_hand():
    v, old, ret = t(1.0, 0.0), t(0.0, 0.0), t(0.0, 1.0)
    loss, clipped = clipped_value_loss(v, old, ret, 0.2)
    # v=1, old=0, R=0: plain 1, clipped (0.2 - 0)^2 = 0.04 -> max 1 -> 0.5
    # v=0, old=0, R=1: plain 1, clipped 1 -> 0.5
    assert loss.tolist() == pytest.approx([0.5, 0.5])
    loss, _ = clipped_value_loss(t(0.5), t(0.0), t(1.0), 0.2)
    # plain 0.25, clipped (0.2 - 1)^2 = 0.64 -> 0.32
    assert loss.item() == pytest.approx(0.32)
    assert clipped_value_loss(t(0.5), t(0.0), t(1.0), None)[0].item() == pytest.approx(0.125)


def test_overlong_penalty_by_hand():
    # max 20, buffer 4: no penalty up to 16 tokens, -0.5 at 18, -1 at 20.
    assert overlong_penalty(16, 20, 4, 1.0) == 0.0
    assert overlong_penalty(18, 20, 4, 1.0) == pytest.approx(-0.5)
    assert overlong_penalty(20, 20, 4, 1.0) == pytest.approx(-1.0)
