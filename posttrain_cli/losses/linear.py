"""The LM head and the log-prob of each target token, in chunks: no [tokens, vocab] logits kept.

    lp, entropy = linear_logps(hidden, weight, targets, temperature=1.0, softcap=None)

Every training loss here needs only log p(target) per token (SFT's cross-entropy, DPO's sequence
sums, the policy gradient's ratios, the reference and old log-probs) and, for RL metrics, the
entropy. Computing them as `log_softmax(hidden @ W.T)` materialises [N, V] logits, their float32
copy, the log-softmax and, in the backward pass, the softmax and its gradient: at 4k tokens and a
128k vocabulary that is gigabytes per micro-batch, more than a small model's weights. Here the
forward pass runs over chunks of tokens and keeps only the per-token log-sum-exp; the backward pass
recomputes each chunk's logits and turns them into the gradients of the hidden states and of the
weight at once (the idea of Liger's fused linear cross-entropy and of Apple's "cut cross-entropy",
in plain torch so it runs on CPU and GPU alike). Extra cost: one more head matmul in the backward.

The logits are what the model's own forward would produce: hidden @ W.T (+ bias) in the hidden
states' dtype, then in float32 `softcap * tanh(z / softcap)` when the architecture caps them (Gemma
2) and `/ temperature`. `losses/sft.token_cross_entropy` on full logits is the reference the tests
hold this to (values and gradients, fp32, 1e-5).
"""

from __future__ import annotations

import torch

# Logits of at most this many elements exist at once (float32: 32 MB): 256 tokens of a 32k
# vocabulary, 64 of a 128k one; a small vocabulary takes the whole batch in one chunk.
CHUNK_ELEMENTS = 1 << 23


def chunk_tokens(n: int, vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, min(n, elements // max(vocab, 1)))


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits of one chunk, and tanh(z / softcap) when capped (the backward needs it)."""
    z = torch.nn.functional.linear(h, weight, bias)
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    t = None
    if softcap is not None:
        t = torch.tanh(z / softcap)
        z = t * softcap
    if temperature != 1.0:
        z = z / temperature
    return z, t


def _autocast_dtype(device: torch.device):
    """The dtype autocast would run this matmul in here, else None. The backward recomputes the
    logits outside autocast, so both passes cast explicitly and agree."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class _LinearLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, softcap, entropy, chunk):
        n, dt = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)
        cast = _autocast_dtype(hidden.device)
        w, b = _cast(weight, cast), _cast(bias, cast)
        lp = torch.empty(n, dtype=dt, device=hidden.device)
        lse = torch.empty(n, dtype=dt, device=hidden.device)
        ent = torch.empty(n, dtype=dt, device=hidden.device) if entropy else None
        for s in range(0, n, chunk):
            with torch.autocast(hidden.device.type, enabled=False):
                z, _ = _logits(_cast(hidden[s:s + chunk], cast), w, b, softcap, temperature)
            m = torch.logsumexp(z, dim=-1)
            lse[s:s + chunk] = m
            lp[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1) - m
            if ent is not None:
                ent[s:s + chunk] = m - (torch.softmax(z, dim=-1) * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature, ctx.softcap, ctx.chunk, ctx.cast = temperature, softcap, chunk, cast
        if ent is None:
            return lp, lp.new_empty(0)
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp, _grad_ent):
        with torch.autocast(grad_lp.device.type, enabled=False):
            return _LinearLogps._backward(ctx, grad_lp)

    @staticmethod
    def _backward(ctx, grad_lp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None
        n, chunk, cast = hidden.shape[0], ctx.chunk, ctx.cast
        w, b = _cast(weight, cast), _cast(bias, cast)
        for s in range(0, n, chunk):
            h = _cast(hidden[s:s + chunk], cast)
            z, t = _logits(h, w, b, ctx.softcap, ctx.temperature)
            # d lp / d z = onehot(target) - softmax(z), times the incoming gradient of each token.
            g = grad_lp[s:s + chunk].to(z.dtype)
            dz = torch.exp(z - lse[s:s + chunk, None]).mul_(-g[:, None])
            dz.scatter_add_(1, targets[s:s + chunk, None], g[:, None])
            if ctx.temperature != 1.0:
                dz.div_(ctx.temperature)
            if t is not None:
                dz.mul_(1.0 - t * t)
            dz = dz.to(h.dtype)
            if need_h:
                grad_h[s:s + chunk] = dz @ w
            if need_w:
                # Summed over chunks in float32; each chunk's product in the weight's own dtype.
                grad_w.addmm_(dz.t(), h) if h.dtype == acc else grad_w.add_(dz.t() @ h)
            if need_b:
                grad_b += dz.to(acc).sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None, None, None)


class _LigerLogps(torch.autograd.Function):
    """_LinearLogps with liger-kernel's Triton cross-entropy over the chunks (its
    fused_linear_cross_entropy_forward, reduction none: the per-token loss in the forward, the
    gradients recomputed in the backward with each token's incoming gradient folded in). Saved are
    the inputs themselves, as in _LinearLogps (ZeRO-3 gathers the head's weight again for the
    backward); `scale` is 1 / temperature, applied to the hidden states and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, softcap):
        cast = _autocast_dtype(hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            loss = _liger(hidden, weight, bias, targets, scale, softcap, cast)[0]
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.scale, ctx.softcap, ctx.cast = scale, softcap, cast
        return loss.neg_()

    @staticmethod
    def backward(ctx, grad_lp):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with torch.autocast(grad_lp.device.type, enabled=False):
            _, _, _, _, gh, gw, gb = _liger(hidden, weight, bias, targets, ctx.scale, ctx.softcap, ctx.cast,
                                            grad=-grad_lp.float(), need_w=need_w)
        s = ctx.scale
        return ((gh * s).to(hidden.dtype) if need_h else None,
                gw.to(weight.dtype) if need_w else None,
                (gb * s).to(bias.dtype) if need_b else None, None, None, None)


def _liger(hidden, weight, bias, targets, scale, softcap, cast, grad=None, need_w=False):
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    h, w, b = (_cast(t.detach(), cast) if t is not None else None for t in (hidden, weight, bias))
    if scale != 1.0:
        h = h * scale
        b = b * scale if b is not None else None
    extra = {} if grad is None else dict(token_grad_output=grad, weight_requires_grad=need_w,
                                         accum_dtype=torch.float32)
    return fused_linear_cross_entropy_forward(
        _input=h.contiguous(), weight=w, target=targets, bias=b,
        reduction="none", softcap=softcap, compute_gradients=grad is not None, **extra)


def liger_takes(hidden: torch.Tensor, temperature: float, softcap: float | None, entropy: bool) -> bool:
    """Whether _LigerLogps computes this request: no entropy (Liger's kernel has none), float32 or
    lower, and a temperature it can take as a scale (not after a soft-cap), some tokens."""
    return (not entropy and hidden.dtype != torch.float64 and hidden.numel() > 0
            and (softcap is None or temperature == 1.0))


def _cast(t: torch.Tensor | None, dtype) -> torch.Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def linear_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                 bias: torch.Tensor | None = None, temperature: float = 1.0, softcap: float | None = None,
                 entropy: bool = False, chunk: int | None = None, kernels: str = "torch"):
    """hidden [..., H], weight [V, H], targets [...] -> (log p(target) [...], entropy [...] or None),
    in float32 (float64 for float64 inputs).

    p = softmax(softcap(hidden @ W.T + bias) / temperature). Targets outside [0, V) (the -100 of
    ignored positions) give log-prob 0 and no gradient. The entropy is computed without gradient.
    kernels="liger": liger-kernel's Triton cross-entropy where it takes the request (liger_takes),
    else these plain-torch chunks (`chunk` tokens at a time; Liger picks its own chunks)."""
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    tgt = targets.reshape(-1)
    valid = (tgt >= 0) & (tgt < weight.shape[0])
    tgt = tgt.masked_fill(~valid, 0)
    if kernels == "liger" and liger_takes(h, temperature, softcap, entropy):
        lp = _LigerLogps.apply(h, weight, bias, tgt, 1.0 / float(temperature), softcap)
        return lp.masked_fill(~valid, 0.0).reshape(shape), None
    n = chunk or chunk_tokens(h.shape[0], weight.shape[0])
    lp, ent = _LinearLogps.apply(h, weight, bias, tgt, float(temperature), softcap, entropy, n)
    lp = lp.masked_fill(~valid, 0.0).reshape(shape)
    return lp, (ent.reshape(shape) if entropy else None)
