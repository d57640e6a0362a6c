"""On-policy distillation losses (MOPD): the student's per-token reverse KL to a teacher.

    token_loss, stats = DISTILL_LOSSES["token"](student, teacher, targets, sampler_logp, outcome_adv,
                                                adv_clip=2.0, is_cap=2.0, alpha=0.0)

Pure functions on the flat completion tokens of a packed micro-batch (as losses/rl.py):
`student` and `teacher` are [N, V] log-probabilities over the vocabulary at each completion
position (the student's with grad), `targets` [N] the sampled tokens, `sampler_logp` [N] their
log-probs when they were sampled, `outcome_adv` [N] each token's sequence outcome advantage
(0 without one). Each returns a per-token loss (aggregated by LOSS_AGGREGATIONS) and per-token
statistics for the metrics.

Two estimators of the gradient of the reverse KL  KL(p_S || p_T) = E_{y~p_S}[log p_S(y) - log p_T(y)]:

- `token` (MiMo-V2-Flash MOPD, and Thinking Machines' "on-policy distillation"): the sampled
  token's log-ratio is a per-token advantage, A_t = clip(sg[log p_T(y_t) - log p_S(y_t)], +-adv_clip)
  + alpha x outcome advantage, used in a REINFORCE-style policy gradient -A_t grad log p_S(y_t).
  Since grad sum_y p_S(y) (log p_S(y) - log p_T(y)) = E_{y~p_S}[(log p_S(y) - log p_T(y)) grad log p_S(y)],
  this is the reverse KL's gradient at each position (before the clip).
- `full` (DeepSeek V4 style): the exact reverse KL over the whole vocabulary at every completion
  position, sum_v p_S(v) (log p_S(v) - log p_T(v)), differentiated through p_S; the outcome term,
  when alpha > 0, joins as a policy-gradient term. Like GKD (Agarwal et al. 2024) it treats the
  sampled prefix as given (no gradient through which prefixes the student samples).

Off-policy correction: with mini_batches > 1 later updates train on samples of an older policy,
so policy-gradient terms carry the importance weight rho_t = p_S(y_t) / p_sampler(y_t), truncated
at is_cap and not differentiated (truncated IS, as IMPALA / "TIS"); is_cap None: no truncation.
On policy, rho = 1.

The surrogate per token is  sg[value] - sg[min(rho, is_cap) x A_t] x (log p_S(y_t) - sg[log p_S(y_t)]):
its gradient is -min(rho, is_cap) A_t grad log p_S(y_t) and its value is the sampled reverse KL
log p_S(y_t) - log p_T(y_t) (`token`) or the full-vocabulary KL (`full`), so the logged loss is
the quantity being minimised rather than a policy-gradient number with no meaning.
"""

from __future__ import annotations

import torch

from posttrain_cli.losses import _registrar

DISTILL_LOSSES: dict = {}
register_distill = _registrar(DISTILL_LOSSES, "distillation loss")


def mixture_logprobs(teachers: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """log p_mix = logsumexp_k(log w_k + log p_k), weights normalised to sum 1. [K x [N, V]] -> [N, V],
    or at the sampled tokens only, [K x [N]] -> [N] (the mixture's probability of a token needs only
    each teacher's probability of it)."""
    w = torch.tensor(weights, dtype=teachers[0].dtype, device=teachers[0].device)
    if len(teachers) != len(w) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mixture weights {weights} for {len(teachers)} teachers")
    log_w = torch.log(w / w.sum())
    return torch.logsumexp(torch.stack(teachers) + log_w.view(-1, *[1] * teachers[0].ndim), dim=0)


def at_targets(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(y_t): `logp` is [N, V] log-probs (gathered at the targets) or already [N] at them."""
    return logp if logp.ndim == 1 else logp.gather(1, targets[:, None]).squeeze(1)


def truncated_is_weight(logp: torch.Tensor, sampler_logp: torch.Tensor, is_cap: float | None):
    """(min(rho, is_cap), truncated) with rho = exp(logp - sampler_logp), no gradient."""
    rho = torch.exp(logp.detach() - sampler_logp)
    if is_cap is None:
        return rho, torch.zeros_like(rho, dtype=torch.bool)
    return rho.clamp(max=is_cap), rho > is_cap


def _policy_gradient(logp: torch.Tensor, weighted_adv: torch.Tensor) -> torch.Tensor:
    """Value 0, gradient -weighted_adv x grad logp."""
    return -weighted_adv.detach() * (logp - logp.detach())


@register_distill("token")
def token_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                     sampler_logp: torch.Tensor, outcome_adv: torch.Tensor, *, adv_clip: float,
                     is_cap: float | None, alpha: float) -> tuple[torch.Tensor, dict]:
    """MiMo-V2-Flash MOPD: A_t = clip(sg[log p_T(y_t) - log p_S(y_t)], -adv_clip, adv_clip) + alpha x outcome,
    loss gradient -sg[min(rho_t, is_cap)] A_t grad log p_S(y_t). It reads the log-probs at the sampled
    tokens only, so the stage hands it [N] (the chunked head, no [N, V] anywhere); [N, V] works too."""
    logp, t_logp = at_targets(student, targets), at_targets(teacher, targets)
    log_ratio = (t_logp - logp).detach()
    adv = log_ratio.clamp(-adv_clip, adv_clip) + alpha * outcome_adv
    w, truncated = truncated_is_weight(logp, sampler_logp, is_cap)
    loss = -log_ratio + _policy_gradient(logp, w * adv)
    stats = {"reverse_kl": -log_ratio, "adv_mean": adv.detach(),
             "adv_clip_fraction": (log_ratio.abs() > adv_clip).to(logp.dtype),
             "is_truncation_fraction": truncated.to(logp.dtype)}
    return loss, stats


token_reverse_kl.needs_distribution = False  # a loss without this attribute gets [N, V]


@register_distill("full")
def full_reverse_kl(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                    sampler_logp: torch.Tensor, outcome_adv: torch.Tensor, *, adv_clip: float,
                    is_cap: float | None, alpha: float) -> tuple[torch.Tensor, dict]:
    """DeepSeek V4 style: sum_v p_S(v) (log p_S(v) - log p_T(v)) at every position (gradient through
    p_S), plus the policy-gradient term -sg[min(rho_t, is_cap)] alpha x outcome x grad log p_S(y_t).
    adv_clip is unused: no sampled log-ratio enters the loss."""
    full = (student.exp() * (student - teacher)).sum(-1)
    logp = student.gather(1, targets[:, None]).squeeze(1)
    t_logp = teacher.gather(1, targets[:, None]).squeeze(1)
    adv = alpha * outcome_adv
    w, truncated = truncated_is_weight(logp, sampler_logp, is_cap)
    loss = full + _policy_gradient(logp, w * adv)
    stats = {"reverse_kl": (logp - t_logp).detach(), "full_reverse_kl": full.detach(), "adv_mean": adv.detach(),
             "is_truncation_fraction": truncated.to(logp.dtype)}
    return loss, stats
