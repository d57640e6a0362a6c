"""DPO-family and Bradley-Terry losses against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain_cli.kinds import KINDS
from posttrain_cli.losses import PREFERENCE_LOSSES
from posttrain_cli.losses.preference import (PairLogps, PrefOptions, bradley_terry, preference_loss,
                                             sequence_logps, uses_reference)


def _ls(z: float) -> float:
    """log sigmoid(z)"""
    return -math.log1p(math.exp(-z))


def pair(c=-4.0, r=-6.0, rc=-5.0, rr=-5.0, tc=2.0, tr=4.0) -> PairLogps:
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return PairLogps(t(c), t(r), t(tc), t(tr), t(rc), t(rr))


def test_registry_matches_the_schema_names():
    """Recipes are checked against the dpo record's loss choices without torch; the two lists must agree."""
    assert set(PREFERENCE_LOSSES) == set(KINDS["dpo"].schema["loss"][0])


def test_dpo_sigmoid_by_hand():
    """policy chosen -4, rejected -6; reference both -5; beta 0.1.

    chosen reward   = 0.1 * (-4 - -5) = 0.1
    rejected reward = 0.1 * (-6 - -5) = -0.1
    loss = -log sigmoid(0.1 - -0.1) = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.598139
    """
    loss, rc, rr = PREFERENCE_LOSSES["dpo"](pair(), PrefOptions(beta=0.1))
    assert rc.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    assert loss.item() == pytest.approx(0.598139, abs=1e-6)
    assert loss.item() == pytest.approx(-_ls(0.2))


def test_label_smoothing_is_conservative_dpo():
    """eps = 0.1, logits z = 0.2 (as above):
    loss = -(0.9) log sigmoid(0.2) - 0.1 log sigmoid(-0.2)
         = 0.9 * 0.598139 + 0.1 * 0.798139 = 0.538325 + 0.079814 = 0.618139
    """
    loss, *_ = PREFERENCE_LOSSES["dpo"](pair(), PrefOptions(beta=0.1, label_smoothing=0.1))
    assert loss.item() == pytest.approx(0.618139, abs=1e-6)


def test_dpo_norm_divides_by_answer_length():
    """chosen has 2 tokens, rejected 4; beta 5:
    chosen reward   = 5 * (-4 - -5) / 2 = 2.5
    rejected reward = 5 * (-6 - -5) / 4 = -1.25
    loss = -log sigmoid(3.75) = log(1 + 0.0235177) = 0.023245
    """
    loss, rc, rr = PREFERENCE_LOSSES["dpo_norm"](pair(), PrefOptions(beta=5.0))
    assert (rc.item(), rr.item()) == pytest.approx((2.5, -1.25))
    assert loss.item() == pytest.approx(0.023245, abs=1e-6)


def test_ipo_by_hand():
    """h = (-4 - -5) - (-6 - -5) = 1 - (-1) = 2; beta 0.1 -> target 1/(2*0.1) = 5:
    loss = (2 - 5)^2 = 9; beta 1 -> target 0.5: loss = (2 - 0.5)^2 = 2.25
    """
    loss, *_ = PREFERENCE_LOSSES["ipo"](pair(), PrefOptions(beta=0.1))
    assert loss.item() == pytest.approx(9.0)
    loss, *_ = PREFERENCE_LOSSES["ipo"](pair(), PrefOptions(beta=1.0))
    assert loss.item() == pytest.approx(2.25)


def test_simpo_is_reference_free_by_hand():
    """beta 2, gamma 0.5; the reference values are ignored:
    chosen reward   = 2 * -4 / 2 = -4
    rejected reward = 2 * -6 / 4 = -3
    loss = -log sigmoid(-4 - -3 - 0.5) = -log sigmoid(-1.5) = log(1 + e^1.5) = 1.701413
    """
    assert not uses_reference("simpo") and uses_reference("dpo")
    p = pair()
    p.ref_chosen = p.ref_rejected = None
    loss, rc, rr = PREFERENCE_LOSSES["simpo"](p, PrefOptions(beta=2.0, simpo_gamma=0.5))
    assert (rc.item(), rr.item()) == pytest.approx((-4.0, -3.0))
    assert loss.item() == pytest.approx(1.701413, abs=1e-6)


def test_hinge_by_hand():
    """beta 0.1: rewards 0.1 and -0.1, margin 0.2 -> max(0, 1 - 0.2) = 0.8;
    beta 1: margin 2 -> max(0, 1 - 2) = 0 (no gradient once the margin is met)."""
    loss, *_ = PREFERENCE_LOSSES["hinge"](pair(), PrefOptions(beta=0.1))
    assert loss.item() == pytest.approx(0.8)
    loss, *_ = PREFERENCE_LOSSES["hinge"](pair(), PrefOptions(beta=1.0))
    assert loss.item() == 0.0


def test_beta_scales_the_implicit_reward_and_sharpens_the_loss():
    """beta 1: z = 1*(1) - 1*(-1) = 2 -> loss log(1 + e^-2) = 0.126928 (below beta 0.1's 0.598139)."""
    loss1, rc1, _ = PREFERENCE_LOSSES["dpo"](pair(), PrefOptions(beta=1.0))
    loss01, rc01, _ = PREFERENCE_LOSSES["dpo"](pair(), PrefOptions(beta=0.1))
    assert rc1.item() == pytest.approx(10 * rc01.item())
    assert loss1.item() == pytest.approx(0.126928, abs=1e-6) and loss1.item() < loss01.item()


def test_nll_weight_adds_chosen_nll_per_token():
    """Chosen log-prob -4 over 2 tokens: NLL per token = 2. With nll_weight 0.2:
    0.598139 + 0.2 * 2 = 0.998139; and its gradient pushes the chosen log-prob up harder."""
    p = pair()
    p.chosen.requires_grad_(True)
    loss0, _, _, nll = preference_loss("dpo", p, PrefOptions(beta=0.1), nll_weight=0.0)
    (g0,) = torch.autograd.grad(loss0.sum(), p.chosen)
    loss2, *_ = preference_loss("dpo", p, PrefOptions(beta=0.1), nll_weight=0.2)
    (g2,) = torch.autograd.grad(loss2.sum(), p.chosen)
    assert nll.item() == pytest.approx(2.0)
    assert loss2.item() == pytest.approx(0.998139, abs=1e-6)
    # d/dc of 0.2 * (-c / 2) = -0.1: one tenth more downward slope on the loss
    assert (g2 - g0).item() == pytest.approx(-0.1)


def test_dpo_gradient_by_hand():
    """d loss / d chosen = -beta * sigmoid(-z) = -0.1 * sigmoid(-0.2) = -0.1 * 0.450166 = -0.0450166."""
    p = pair()
    p.chosen.requires_grad_(True)
    loss, *_ = PREFERENCE_LOSSES["dpo"](p, PrefOptions(beta=0.1))
    (g,) = torch.autograd.grad(loss.sum(), p.chosen)
    assert g.item() == pytest.approx(-0.0450166, abs=1e-7)


def test_bradley_terry_with_and_without_margin():
    """r(better) 1.0, r(worse) 0.5: -log sigmoid(0.5) = 0.474077;
    with Llama 2's margin 1: -log sigmoid(0.5 - 1) = -log sigmoid(-0.5) = 0.974077."""
    b, w = torch.tensor([1.0]), torch.tensor([0.5])
    assert bradley_terry(b, w).item() == pytest.approx(0.474077, abs=1e-6)
    assert bradley_terry(b, w, torch.tensor([1.0])).item() == pytest.approx(0.974077, abs=1e-6)


def test_sequence_logps_sums_per_sequence():
    """Vocabulary 2, three positions: seq 0 holds positions 0 and 1, seq 1 holds position 2.
    p0 = [1/4, 3/4] target 1 -> ln 3/4; p1 = [1/2, 1/2] target 0 -> ln 1/2; p2 uniform -> ln 1/2.
    seq 0: ln(3/4) + ln(1/2) = -0.980829; seq 1: -0.693147."""
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [1.0, 1.0]])
    token_lp = torch.log_softmax(logits, -1).gather(1, torch.tensor([[1], [0], [1]])).squeeze(1)
    out = sequence_logps(token_lp, torch.tensor([0, 0, 1]), 2)
    assert out.tolist() == pytest.approx([-0.980829, -0.693147], abs=1e-6)
