"""Token-level cross-entropy for SFT, as a sum plus a count.

Returning the sum (not the mean) lets the trainer divide by the number of
loss tokens in the whole global batch, across accumulation steps and ranks,
so 1 rank x 8 micro-steps and 8 ranks x 1 give the same gradient, and long
and short sequences weigh by their tokens (open-instruct's "sum" reduction
normalised per batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain_cli.losses import register

# The label of a token that is not trained on (Hugging Face's convention); data/ packs with it.
IGNORE = -100


@register("sft")
def token_nll(logps: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logps [N]: log p(target) of each position (engine/lm_head.target_logps, computed without
    [N, V] logits); targets [N]: IGNORE where nothing is trained.

    -> (sum of -log p(target) over counted tokens, number of counted tokens)
    """
    keep = targets != IGNORE
    return -(logps * keep).sum(), keep.sum()


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from full logits [N, V] (already shifted targets [N]): the plain computation the
    chunked head (losses/linear.py) is tested against."""
    keep = targets != IGNORE
    loss = F.cross_entropy(logits.float(), targets.masked_fill(~keep, 0), reduction="none")
    return (loss * keep).sum(), keep.sum()


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position t predicts token t+1; the last position of a row predicts nothing."""
    return torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], IGNORE)], dim=-1)
