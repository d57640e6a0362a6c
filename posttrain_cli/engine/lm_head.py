"""Log-probs of target tokens straight from a causal LM's head, without its [tokens, vocab] logits.

    lp, entropy = target_logps(module, inputs, targets, positions, temperature=1.0, entropy=False)

The model runs its own forward (so DeepSpeed's hooks, ZeRO-3's parameter gathering, peft's adapters
and activation checkpointing all work as in any forward); only its LM head answers differently:
while a request is set on it, the head computes losses/linear.linear_logps on the hidden states it
is given, chunk by chunk, and returns log p(target) where the logits would be. Doing it inside the
head's own call matters under ZeRO-3: the head's weight is gathered for that call and again for
its backward, exactly as for the plain head.

The head becomes a `LogpHead` (an nn.Linear subclass: same parameters, same state dict, plain
logits when no request is set) the first time it is asked. An architecture whose logits are more
than head(hidden) (Gemma 2's final soft-capping is handled; a logit scale is not) or whose head is
not a plain Linear (peft's modules_to_save wrapper) gets the plain path: full logits at the kept
positions, then log_softmax; the same numbers, the memory of the logits.
"""

from __future__ import annotations

import contextlib

import torch

from posttrain_cli.losses.linear import linear_logps

# Config attributes of architectures that scale their logits after the head (Cohere, Granite, ...).
_SCALED = ("logit_scale", "logits_scaling", "output_multiplier_scale")


class _Request:
    def __init__(self, targets, temperature: float, softcap: float | None, entropy: bool):
        self.targets, self.temperature, self.softcap, self.entropy = targets, temperature, softcap, entropy
        self.entropy_out = None


class LogpHead(torch.nn.Linear):
    """An LM head that returns log p(target) [..., 1] instead of logits while a request is set."""

    _request: _Request | None = None
    kernels: str = "torch"  # deepspeed.kernels: torch | liger (use_kernels)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        r = self._request
        if r is None:
            return super().forward(hidden)
        lp, ent = linear_logps(hidden, self.weight, r.targets.reshape(hidden.shape[:-1]), bias=self.bias,
                               temperature=r.temperature, softcap=r.softcap, entropy=r.entropy,
                               kernels=self.kernels)
        r.entropy_out = ent
        return lp.unsqueeze(-1)


def causal_lm(module):
    """The causal LM inside a DeepSpeed engine, a peft model or a wrapper exposing `causal_lm`."""
    inner = getattr(module, "causal_lm", None)
    if inner is not None:
        return inner
    return getattr(module, "module", module)


def logp_head(model) -> LogpHead | None:
    """The model's head as a LogpHead (converted in place once), or None where the plain path is needed."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    config = getattr(model, "config", None)
    if head is None or config is None or any(getattr(config, a, None) not in (None, 1, 1.0) for a in _SCALED):
        return None
    if type(head) is torch.nn.Linear:
        head.__class__ = LogpHead
    return head if isinstance(head, LogpHead) else None


def use_kernels(model, kernels: str, where: str = "deepspeed.kernels") -> bool:
    """The model's log-prob head computes with `kernels` (deepspeed.kernels): torch, or liger
    (liger-kernel's Triton cross-entropy; losses/linear.py). -> whether it does: a head that takes
    the plain path (logp_head None: a scalar head, a scaled one) has no chunks to hand to either."""
    if kernels == "liger":
        _check_liger(where)
    head = logp_head(causal_lm(model))
    if head is not None:
        head.kernels = kernels
    return head is not None


def _check_liger(where: str) -> None:
    """On the node the stage runs on (a SLURM job's too): liger-kernel importable, with the per-token
    backward this code calls (liger-kernel 0.8.5 and later), and CUDA or Triton's interpreter."""
    import inspect

    from posttrain_cli.errors import UserError
    from posttrain_cli.procs import liger_problem

    problem = liger_problem(cuda=torch.cuda.is_available())
    if problem is None:
        from liger_kernel.ops import fused_linear_cross_entropy as flce

        if "token_grad_output" not in inspect.signature(flce.fused_linear_cross_entropy_forward).parameters:
            import importlib.metadata

            problem = (f"liger-kernel {importlib.metadata.version('liger-kernel')} has no per-token backward "
                       f"(0.8.5 and later have): pip install -U 'posttrain[liger]'")
    if problem:
        raise UserError(f"{where}=liger: {problem}; or set {where}=torch")


@contextlib.contextmanager
def _asking(head: LogpHead, config, request: _Request):
    """The request set on the head for one forward; Gemma 2's soft-capping moved into it."""
    cap = getattr(config, "final_logit_softcapping", None)
    request.softcap = cap
    head._request = request
    if cap is not None:
        config.final_logit_softcapping = None
    try:
        yield request
    finally:
        head._request = None
        if cap is not None:
            config.final_logit_softcapping = cap


def target_logps(module, inputs: dict, targets: torch.Tensor, positions: torch.Tensor | None = None, *,
                 temperature: float = 1.0, entropy: bool = False):
    """log p(target) under softmax(logits / temperature) (float32), and with `entropy` the
    distribution's entropy (no grad), at micro-batch `inputs`:

    - packed (one row): `positions` [K] the positions scored, `targets` [K] -> [K];
    - padded: `positions` None, `targets` [B, T] (-100 where nothing is scored: log-prob 0) -> [B, T].
    """
    temperature = temperature if temperature > 0 else 1.0
    keep = positions if positions is not None else 0
    model = causal_lm(module)
    head = logp_head(model)
    if head is None:
        logits = module(**inputs, logits_to_keep=keep, use_cache=False).logits
        logits = (logits[0] if positions is not None else logits).float() / temperature
        lsm = torch.log_softmax(logits, dim=-1)
        valid = targets >= 0
        lp = lsm.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
        ent = None
        if entropy:
            with torch.no_grad():
                ent = -(lsm.exp() * lsm).sum(-1)
        return lp, ent
    with _asking(head, model.config, _Request(targets, temperature, None, entropy)) as r:
        out = module(**inputs, logits_to_keep=keep, use_cache=False).logits[..., 0]
    if positions is not None:
        out = out[0]
        ent = r.entropy_out[0] if r.entropy_out is not None else None
    else:
        ent = r.entropy_out
    return out, ent
