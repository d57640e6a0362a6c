"""Pairwise preference losses: DPO and its family, and Bradley-Terry for reward models.

A DPO-family loss is a pure function of a `PairLogps` (per pair: the summed
log-probs of the chosen and the rejected answer under the policy and, when the
loss uses one, the reference, plus each answer's token count) and the stage's
`PrefOptions`. It returns per pair (loss, chosen reward, rejected reward); the
rewards are the loss's own implicit rewards, which the accuracy and margin
metrics read. Notation below: b = beta, and for an answer y

    logratio(y) = log pi(y|x) - log pi_ref(y|x).

Adding a loss is one function under `@register_preference("name")` plus its
name in `kinds/dpo.py`'s LOSSES (a unit test keeps the two equal), so
recipes are checked without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from posttrain_cli.losses import PREFERENCE_LOSSES, register_preference


@dataclass
class PairLogps:
    chosen: torch.Tensor           # [B] sum of log pi over the chosen answer's tokens
    rejected: torch.Tensor         # [B]
    chosen_tokens: torch.Tensor    # [B] answer lengths in tokens
    rejected_tokens: torch.Tensor  # [B]
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


@dataclass
class PrefOptions:
    beta: float = 0.1
    # Conservative DPO (Mitchell 2023): the preference label is flipped with this probability.
    label_smoothing: float = 0.0
    # SimPO's target reward margin gamma (Meng et al. 2024).
    simpo_gamma: float = 0.5


def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1-eps) log sigmoid(z) - eps log sigmoid(-z): the DPO loss under a label flipped with prob. eps."""
    return -(1.0 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


@register_preference("dpo")
def dpo(p: PairLogps, o: PrefOptions):
    """Rafailov et al. 2023: -log sigmoid(b * (logratio(y_w) - logratio(y_l)))."""
    rc = o.beta * (p.chosen - p.ref_chosen)
    rr = o.beta * (p.rejected - p.ref_rejected)
    return _smoothed_sigmoid(rc - rr, o.label_smoothing), rc, rr


@register_preference("dpo_norm", length_normalized=True)
def dpo_norm(p: PairLogps, o: PrefOptions):
    """Tulu 3 / OLMo 3 length-normalised DPO: each logratio divided by its answer's length."""
    rc = o.beta * (p.chosen - p.ref_chosen) / p.chosen_tokens
    rr = o.beta * (p.rejected - p.ref_rejected) / p.rejected_tokens
    return _smoothed_sigmoid(rc - rr, o.label_smoothing), rc, rr


@register_preference("ipo")
def ipo(p: PairLogps, o: PrefOptions):
    """Azar et al. 2023: (h - 1/(2b))^2 with h = logratio(y_w) - logratio(y_l) over whole answers
    (TRL averages per token instead). Rewards reported as b * logratio."""
    h = (p.chosen - p.ref_chosen) - (p.rejected - p.ref_rejected)
    loss = (h - 1.0 / (2.0 * o.beta)) ** 2
    return loss, o.beta * (p.chosen - p.ref_chosen), o.beta * (p.rejected - p.ref_rejected)


@register_preference("simpo", reference=False, length_normalized=True)
def simpo(p: PairLogps, o: PrefOptions):
    """Meng et al. 2024, reference-free: -log sigmoid(b/|y_w| log pi(y_w) - b/|y_l| log pi(y_l) - gamma)."""
    rc = o.beta * p.chosen / p.chosen_tokens
    rr = o.beta * p.rejected / p.rejected_tokens
    return _smoothed_sigmoid(rc - rr - o.simpo_gamma, o.label_smoothing), rc, rr


@register_preference("hinge")
def hinge(p: PairLogps, o: PrefOptions):
    """SLiC-style hinge (Zhao et al. 2023): max(0, 1 - b * (logratio(y_w) - logratio(y_l)))."""
    rc = o.beta * (p.chosen - p.ref_chosen)
    rr = o.beta * (p.rejected - p.ref_rejected)
    return torch.relu(1.0 - (rc - rr)), rc, rr


def uses_reference(name: str) -> bool:
    return getattr(PREFERENCE_LOSSES[name], "reference", True)


def length_normalized(name: str) -> bool:
    """Whether the loss compares answers by mean (not summed) log-prob per token."""
    return getattr(PREFERENCE_LOSSES[name], "length_normalized", False)


def chosen_nll(p: PairLogps) -> torch.Tensor:
    """Per pair: mean negative log-likelihood per token of the chosen answer."""
    return -p.chosen / p.chosen_tokens


def preference_loss(name: str, p: PairLogps, o: PrefOptions, nll_weight: float = 0.0):
    """The named loss plus nll_weight x NLL on chosen (Llama 3 uses 0.2). -> (loss, rc, rr, nll), all [B]."""
    loss, rc, rr = PREFERENCE_LOSSES[name](p, o)
    nll = chosen_nll(p)
    if nll_weight:
        loss = loss + nll_weight * nll
    return loss, rc, rr, nll


def bradley_terry(better: torch.Tensor, worse: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Reward-model pairwise loss per pair: -log sigmoid(r(better) - r(worse) - m);
    m is Llama 2's margin (0 without it)."""
    diff = better - worse
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def sequence_logps(token_logps: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Sum log p(target) per sequence. token_logps [P] (engine/lm_head.target_logps), seq [P] (which
    sequence each position belongs to) -> [n_seq]."""
    return torch.zeros(n_seq, dtype=token_logps.dtype, device=token_logps.device).index_add(0, seq, token_logps)
