"""SFT cross-entropy against numbers worked out by hand."""

from __future__ import annotations

import math

import torch

from posttrain_cli.losses import LOSSES
from posttrain_cli.losses.sft import IGNORE, shifted_targets, token_cross_entropy


def test_two_token_cross_entropy_by_hand():
    """Vocabulary of 2, two target tokens.

    token 1: logits [0, ln 3] -> p = [1/4, 3/4]; target 1 -> -ln(3/4) = 0.28768
    token 2: logits [0, 0]    -> p = [1/2, 1/2]; target 0 -> -ln(1/2) = 0.69315
    sum = 0.98083, count = 2, mean = 0.49041
    """
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    targets = torch.tensor([1, 0])
    total, count = token_cross_entropy(logits, targets)
    assert count.item() == 2
    assert math.isclose(total.item(), -math.log(0.75) - math.log(0.5), rel_tol=1e-6)
    assert math.isclose(total.item(), 0.98083, abs_tol=1e-5)


def test_ignored_targets_count_nothing():
    """Same two tokens plus an ignored one with a huge loss: the sum and count do not move."""
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0], [100.0, -100.0]])
    targets = torch.tensor([1, 0, IGNORE])
    total, count = token_cross_entropy(logits, targets)
    assert count.item() == 2
    assert math.isclose(total.item(), 0.98083, abs_tol=1e-5)


def test_shift_targets():
    labels = torch.tensor([[IGNORE, 5, 6, IGNORE, 7]])
    # position t is trained to predict the token at t+1
    assert shifted_targets(labels).tolist() == [[5, 6, IGNORE, 7, IGNORE]]
