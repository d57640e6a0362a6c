"""Fewer saved activations, the same numbers: cheap elementwise results are recomputed in the backward
instead of being kept from the forward.

Autograd keeps, per decoder layer and token, every tensor some backward formula needs. Two of
Llama's blocks keep results that are one elementwise op away from tensors they keep anyway:

- the gated MLP, down(act(gate(x)) * up(x)): act(gate) (for the product's gradient) and the
  product (for down's weight gradient) are both recomputed from gate(x) and up(x), which stay
  saved (act's and the product's own backward read them): 2 x intermediate values per token;
- RMSNorm, weight * (h * rsqrt(mean(h^2) + eps)): the normalised h (for the weight's gradient) is
  recomputed from h and the rsqrt, both saved anyway: hidden values per token and norm.

On a Llama that is a third of a layer's saved activations (hidden 640, MLP 1728: 4,736 of 14,127
values per token). Each recomputation is the same op on the same inputs, so values and gradients
are bit-for-bit those of the model's own forward; the price is one extra elementwise pass in the
backward. Linear layers (LoRA's, ZeRO-3's gathered ones) and the attention are untouched: the
mechanism is torch's saved-tensor hooks, which swap a saved tensor for its recipe when autograd
stores it and run the recipe when the backward reads it.

Which modules: those whose forward is Llama's own code (the same bytecode, names and constants as
LlamaMLP.forward / LlamaRMSNorm.forward: Qwen 2/3, Mistral, Gemma's MLP and the many models whose
code transformers copies from Llama); any other forward runs as written. Activation checkpointing
(which keeps none of these) and deepspeed.compile (Inductor picks its own recomputation) leave the
model alone.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch


class _Recipe:
    """How to rebuild a saved tensor: fn() under the autocast state of the forward, seen through the
    saved tensor's view of it (a linear layer saves its input flattened to 2-D)."""

    __slots__ = ("fn", "autocast", "view")

    def __init__(self, fn, view: tuple):
        self.fn, self.view = fn, view
        self.autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]

    def __call__(self) -> torch.Tensor:
        with torch.no_grad(), _autocast(self.autocast):
            return self.fn().as_strided(*self.view)


def _autocast(states):
    stack = contextlib.ExitStack()
    for device, dtype in states:
        stack.enter_context(torch.autocast(device, dtype=dtype))
    return stack


def _layout(ref: torch.Tensor) -> tuple:
    """Where a contiguous tensor lives, as plain numbers. The hooks keep no reference to the tensor
    itself: torch keeps each saved tensor's hooks (pack included) as long as the tensor stays saved,
    so a reference there would keep alive exactly what the recipe is meant to free."""
    return ref.untyped_storage().data_ptr(), ref.storage_offset(), ref.numel(), ref.dtype, ref.device


def _view_of(t: torch.Tensor, layout: tuple) -> tuple | None:
    """t as (size, stride, offset) into the contiguous tensor `layout` describes, when t is a view of
    its memory (the tensor itself, or a reshape of it), else None."""
    ptr, start, numel, dtype, device = layout
    if t.dtype != dtype or t.device != device or t.untyped_storage().data_ptr() != ptr:
        return None
    offset = t.storage_offset() - start
    if offset < 0 or offset + t.numel() > numel:
        return None
    return tuple(t.shape), t.stride(), offset


def _recompute(recipes: list[tuple[torch.Tensor, object]]):
    """saved_tensors_hooks for the ops run inside it: a tensor in `recipes` (or a view of one) is
    stored as its recipe; any other as itself. The tensors must stay alive while it is active (so
    their memory cannot be another tensor's)."""
    layouts = [(_layout(ref), fn) for ref, fn in recipes if ref.is_contiguous()]

    def pack(t):
        for layout, fn in layouts:
            view = _view_of(t, layout)
            if view is not None:
                return _Recipe(fn, view)
        return t

    def unpack(x):
        return x() if isinstance(x, _Recipe) else x

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def gated_mlp_forward(self, x):
    """LlamaMLP.forward: down(act(gate(x)) * up(x)), keeping gate(x) and up(x) only."""
    gate = self.gate_proj(x)
    act = self.act_fn(gate)  # saves gate
    up = self.up_proj(x)
    g, u = gate.detach(), up.detach()
    with _recompute([(act, lambda: self.act_fn(g))]):
        prod = act * up  # saves up, and act as a recipe
    with _recompute([(prod, lambda: self.act_fn(g) * u)]):
        return self.down_proj(prod)  # saves the product as a recipe


def rms_norm_forward(self, hidden_states):
    """LlamaRMSNorm.forward, keeping its float32 input and the rsqrt only."""
    input_dtype = hidden_states.dtype
    hidden_states = hidden_states.to(torch.float32)
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(variance + self.variance_epsilon)
    normed = (hidden_states * rstd).to(input_dtype)  # the product saves hidden_states and rstd
    h, r = hidden_states.detach(), rstd.detach()
    with _recompute([(normed, lambda: (h * r).to(input_dtype))]):
        return self.weight * normed


def _code_key(fn) -> tuple:
    c = fn.__code__
    return c.co_code, c.co_names, c.co_consts, c.co_varnames


@functools.cache
def _llama_forwards() -> dict[tuple, object]:
    from transformers.models.llama import modeling_llama as llama

    return {_code_key(llama.LlamaMLP.forward): gated_mlp_forward,
            _code_key(llama.LlamaRMSNorm.forward): rms_norm_forward}



def apply(model) -> int:
    """Give every module of `model` whose forward is Llama's gated MLP or RMSNorm the recomputing
    forward (on the instance) -> how many modules."""
    known = _llama_forwards()
    n = 0
    for m in model.modules():
        fwd = getattr(type(m), "forward", None)
        if fwd is None or not hasattr(fwd, "__code__"):
            continue
        lean = known.get(_code_key(fwd))
        if lean is not None and "forward" not in vars(m):
            m.forward = types.MethodType(lean, m)
            n += 1
    return n
