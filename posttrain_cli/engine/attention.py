"""Variable-length attention for packed rows on any device, registered with transformers.

A packed row holds several sequences back to back. Flash-attention handles
that natively (it reads the sequence boundaries from `cu_seq_lens_*`). SDPA
and eager would need a dense T x T block mask, so attention costs grow with
the square of the whole row instead of each sequence. `posttrain_sdpa`
gathers each sequence into its own right-padded slot and runs one causal SDPA
over [sequences, heads, longest, dim]: causal masking alone keeps real queries
off the padding, and the outputs are scattered back into row order.

Without `cu_seq_lens_q` (generation, padded batches) it is plain SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "posttrain_sdpa"


def varlen_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                is_causal=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    # query [1, H, T, D]; key/value [1, Hkv, T, D]
    cu = cu_seq_lens_q.to(query.device, torch.long)
    lens = cu[1:] - cu[:-1]
    longest = int(max_length_q) if max_length_q is not None else int(lens.max())
    offs = torch.arange(longest, device=query.device)
    valid = offs[None, :] < lens[:, None]                              # [S, L]
    idx = torch.where(valid, cu[:-1, None] + offs[None, :], 0)         # [S, L]

    def slots(x):  # [1, H, T, D] -> [S, H, L, D]
        return x[0][:, idx].permute(1, 0, 2, 3)

    q, k, v = slots(query), slots(key), slots(value)
    out = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scaling, dropout_p=dropout if module.training else 0.0,
        enable_gqa=bool(q.shape[1] != k.shape[1]),
    )                                                                   # [S, H, L, D]
    # Back to row order by each token's (sequence, offset), not by out[valid]: a boolean mask's
    # result has a data-dependent shape, which torch.compile (deepspeed.compile) cannot trace.
    token = torch.arange(query.shape[2], device=query.device)
    seq = torch.searchsorted(cu[1:], token, right=True)                # [T]
    out = out.permute(0, 2, 1, 3)[seq, token - cu[seq]]                # [T, H, D]
    return out[None], None


def register() -> str:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, varlen_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
