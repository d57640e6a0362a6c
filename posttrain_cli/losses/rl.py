"""On-policy RL math: group advantages, KL estimators, loss aggregations and policy losses,
pure tensor functions in registries (one signature per table), then GAE and the clipped value
loss (ppo's own).

Token tensors are flat over a micro-batch's completion tokens (the packed layout of
data/preference.pack_answers): `seq[i]` says which sequence token i belongs to.
"""

from __future__ import annotations

import torch

from posttrain_cli.losses import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, _registrar

register_advantage = _registrar(ADVANTAGES, "advantage normalisation")
register_kl = _registrar(KL_ESTIMATORS, "KL estimator")
register_aggregation = _registrar(LOSS_AGGREGATIONS, "loss aggregation")
register_policy_loss = _registrar(POLICY_LOSSES, "policy loss")

# TRL's epsilon: a group of near-equal rewards must not blow up.
STD_EPS = 1e-4


@register_advantage("group_std")
def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO (Shao et al. 2024): (r - group mean) / (group std + eps), std unbiased as in TRL.
    rewards [P, G] -> [P, G]."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(mean)
    return (rewards - mean) / (std + STD_EPS)


@register_advantage("centered")
def centered(rewards: torch.Tensor) -> torch.Tensor:
    """Dr.GRPO / OLMo 3: r - group mean, no std scaling."""
    return rewards - rewards.mean(dim=1, keepdim=True)


@register_advantage("none")
def raw(rewards: torch.Tensor) -> torch.Tensor:
    """The reward itself (REINFORCE without a baseline)."""
    return rewards.clone()


# Per-token estimates of KL(pi || ref) from log-probs of the sampled token (Schulman 2020).
@register_kl("k1")
def k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log pi - log ref: unbiased, high variance, can be negative."""
    return logp - ref_logp


@register_kl("k2")
def k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """(log pi - log ref)^2 / 2: biased, low variance, >= 0."""
    return 0.5 * (logp - ref_logp) ** 2


@register_kl("k3")
def k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(log ref - log pi) - (log ref - log pi) - 1: unbiased, >= 0 (GRPO / R1)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def _per_seq(x: torch.Tensor, seq: torch.Tensor, n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, seq, x)


# An aggregation returns (sum, weight) for its micro-batch; the training loop divides the
# sums of all micro-batches and ranks by their summed weight, so the result does not
# depend on how a batch is split. The weights: sequences or tokens of the whole batch.
@register_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(token_loss: torch.Tensor, seq: torch.Tensor, n_seqs: int, max_len: int):
    """GRPO as published: each sequence's mean over its tokens, then the mean over sequences."""
    tokens = _per_seq(torch.ones_like(token_loss), seq, n_seqs).clamp(min=1)
    return (_per_seq(token_loss, seq, n_seqs) / tokens).sum(), float(n_seqs)


@register_aggregation("token_mean")
def token_mean(token_loss: torch.Tensor, seq: torch.Tensor, n_seqs: int, max_len: int):
    """DAPO: the mean over every token of the batch (long answers weigh more)."""
    return token_loss.sum(), float(token_loss.numel())


@register_aggregation("constant")
def constant(token_loss: torch.Tensor, seq: torch.Tensor, n_seqs: int, max_len: int):
    """Dr.GRPO: the token sum divided by a constant (sequences x max_new_tokens), no length bias."""
    return token_loss.sum() / max_len, float(n_seqs)


# A policy loss: (logp, old_logp, advantages, cfg) -> (token_loss, metrics), the stage's config
# giving its parameters. Token tensors are the flat completion tokens of a micro-batch (no mask:
# prompt tokens never enter them); token_loss is aggregated by LOSS_AGGREGATIONS and each metric
# is a per-token tensor aggregated the same way. The log-ratio is clamped to +-MAX_LOG_RATIO
# before exp (as verl): a stale sample, log pi - log pi_old of 100, would overflow float32 to inf
# and the step to NaN, where the clamped one is clipped like any far-off ratio.
MAX_LOG_RATIO = 20.0


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                        clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7): -min(ratio A,
    clip(ratio, 1 - low, 1 + high) A), ratio = pi / pi_old. Returns (loss, clipped) where clipped
    marks tokens whose gradient the clip removed. clip_high > clip_low is DAPO's clip-higher."""
    ratio = torch.exp(torch.clamp(logp - old_logp, -MAX_LOG_RATIO, MAX_LOG_RATIO))
    unclipped = ratio * adv
    clipped_obj = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped_obj)
    was_clipped = (clipped_obj < unclipped).detach()
    return loss, was_clipped


@register_policy_loss("clip_higher")
def clip_higher(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, cfg: dict):
    """grpo: the ratio clipped to [1 - clip_low, 1 + clip_high] (DAPO's decoupled clip)."""
    loss, clipped = clipped_policy_loss(logp, old_logp, adv, cfg["clip_low"], cfg["clip_high"])
    return loss, {"clip_fraction": clipped.to(logp.dtype)}


@register_policy_loss("clip")
def clip(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, cfg: dict):
    """ppo: the ratio clipped to [1 - cliprange, 1 + cliprange]."""
    loss, clipped = clipped_policy_loss(logp, old_logp, adv, cfg["cliprange"], cfg["cliprange"])
    return loss, {"clip_fraction": clipped.to(logp.dtype)}


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over one sequence (Schulman et al. 2016); the episode
    ends after the last token (value 0 beyond it). rewards, values [T] -> (advantages, returns)."""
    adv = torch.zeros_like(rewards)
    last = torch.zeros((), dtype=rewards.dtype)
    for t in range(rewards.shape[0] - 1, -1, -1):
        nxt = values[t + 1] if t + 1 < rewards.shape[0] else 0.0
        delta = rewards[t] + gamma * nxt - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, adv + values


def whiten(x: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over all elements (std biased, as TRL's masked_whiten); with
    shift_mean False the mean is added back (rewards keep their sign)."""
    mean, var = x.mean(), x.var(unbiased=False)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: 0.5 max((v - R)^2, (clip(v, v_old +- clip) - R)^2); clip None is the plain
    squared error. Returns (loss, clipped)."""
    plain = (values - returns) ** 2
    if clip is None:
        return 0.5 * plain, torch.zeros_like(plain, dtype=torch.bool)
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), (clipped > plain).detach()

