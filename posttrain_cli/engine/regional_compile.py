"""deepspeed.compile: torch.compile of each decoder layer of the model a stage trains (regional compile).

    layers = regional_compile.apply(model, checkpointing=True, where="deepspeed.compile")

- Regional, not the whole model: every decoder layer runs the same code, so one compiled graph
  serves them all and the compile time is that of one layer, whatever the depth (PyTorch's
  "regional compilation" recipe). Embeddings, the output head and the loss stay eager.
- Packed rows change length every step: the layers compile with dynamic shapes (`dynamic=True`),
  so the sequence length is a symbol and a new length reuses the graph. What still makes a new
  graph is bounded: grad on or off, train or eval mode, a row of one sequence against several
  (a size of 1 is always specialised), the adapter off (a LoRA reference): a handful per stage,
  not one per step.
- Activation checkpointing (deepspeed.activation_checkpointing) stays outside the compiled region:
  torch's non-reentrant checkpoint around the compiled layer, which replays it in the backward.
  Transformers' own wrapper would put the checkpoint inside the graph, where a context variable the
  attention sets (kernels' hub layers) breaks it.
- Generation never runs compiled (`eager()`): every decode step has another cache length, and
  sampling is not what the key is for.
- Inductor needs a C++ compiler on CPU (a C compiler for Triton on GPUs): `check_compiler` says so
  in one line before anything compiles.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from posttrain_cli.errors import UserError


def decoder_layers(model) -> list:
    """The model's decoder layers: the modules whose class a Hugging Face model names in
    `_no_split_modules` (the unit it never splits across devices), under a peft wrapper too."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def check_compiler(device, where: str) -> None:
    """Raise UserError (one line naming the key) when Inductor cannot build code on `device`."""
    if device.type == "cuda":
        from posttrain_cli.procs import compiler_for, compilers

        if compiler_for(cuda=True) is None:
            raise UserError(f"{where}=true: torch.compile on a GPU needs a C compiler for Triton (none found: "
                            f"{', '.join(compilers(True))}); install one (apt-get install gcc) or set {where}=false")
        return
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as e:
        raise UserError(f"{where}=true: torch.compile on CPU needs a C++ compiler ({e}); install one "
                        f"(apt-get install g++, or point $CXX at one) or set {where}=false") from None


def apply(model, *, checkpointing: bool, where: str) -> int:
    """Compile each decoder layer of `model` in place (checkpointed outside the compiled region when
    `checkpointing`) -> how many layers. Call after any adapter is added."""
    if not hasattr(torch.compiler, "set_stance"):
        raise UserError(f"{where}=true needs torch >= 2.6 (this is {torch.__version__}); upgrade torch or set "
                        f"{where}=false")
    layers = decoder_layers(model)
    if not layers:
        raise UserError(f"{where}=true: {type(model).__name__} names no decoder layer class (_no_split_modules) "
                        f"to compile; set {where}=false")
    global _since
    _since = _totals()
    for layer in layers:
        # Transformers' checkpoint wrapper steps aside (with the flag off it runs the layer as it is);
        # ours goes around the compiled layer instead.
        layer.gradient_checkpointing = False
        compiled = torch.compile(layer.forward, dynamic=True)
        layer.forward = functools.partial(_forward, layer, compiled, checkpointing)
    return len(layers)


def _forward(layer, compiled, checkpointing: bool, *args, **kwargs):
    if checkpointing and layer.training and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(compiled, *args, use_reentrant=False, **kwargs)
    return compiled(*args, **kwargs)


def _totals() -> tuple[int, float]:
    """(graphs compiled, seconds spent compiling) in this process so far."""
    from torch._dynamo import utils

    return utils.counters["stats"]["unique_graphs"], utils.calculate_time_spent().get("total_wall_time", 0.0)


# The totals when this stage compiled its layers: stages run in one process (the local launcher, one
# rank) share torch's counters, and a later stage reuses the graphs an earlier one built.
_since: tuple[int, float] | None = None


def stats() -> dict:
    """{"compile": {"graphs", "seconds"}}: what torch.compile built since the stage compiled its layers
    (apply) and the wall time it took, once (the end of its training, engine/loop.py); {} when the
    stage compiled nothing."""
    global _since
    if _since is None:
        return {}
    graphs, seconds = _totals()
    out = {"compile": {"graphs": graphs - _since[0], "seconds": round(seconds - _since[1], 2)}}
    _since = None
    return out


def eager():
    """A context in which compiled layers run eagerly (generation); a no-op without torch.compiler's
    stances (torch < 2.6, where apply refuses to compile)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()
