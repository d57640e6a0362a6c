"""LoRA adapters on a training stage (peft), and what a LoRA stage publishes.

    model = lora.wrap(model, ctx.run["lora"], where=ctx.where("lora"))   # None: returned as it is
    ...
    eng.save_hf(engine, tokenizer, out_dir, final=True)   # merged model in out_dir, the adapter in out_dir/../adapter

- Only the adapter's parameters (and `modules_to_save`, a reward model's score head) train: the
  optimizer never sees the base, under ZeRO-2 or ZeRO-3 alike.
- Hand-off: the stage publishes a plain Hugging Face model, the adapter merged into its input model
  (W + B A alpha / r, alpha / sqrt(r) with use_rslora), so the next stage, merge, vLLM and
  AutoModelForCausalLM need nothing special; and the adapter itself in RUN_DIR/<stage>/adapter/,
  loadable with PeftModel.from_pretrained on the input model. A following LoRA stage starts a fresh
  adapter on that merged model. The merge is done here, tensor by tensor, from the (under ZeRO-3
  gathered) state dict: it needs no second copy of the model.
"""

from __future__ import annotations

import collections
import math

import torch

from posttrain_cli.errors import UserError

INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# Where peft keeps the wrapped model and each adapted layer's parts, in state-dict names.
PREFIX = "base_model.model."
ADAPTER = "default"


def wrap(model, lora: dict | None, *, where: str, score_head: bool = False):
    """`model` with a fresh LoRA adapter (peft), or `model` itself when `lora` is None. score_head: a
    reward model's (or value model's) `score` layer trains in full too."""
    if lora is None:
        return model
    from peft import LoraConfig, get_peft_model

    _check_targets(model, lora["target_modules"], f"{where}.target_modules")
    save = list(lora["modules_to_save"] or [])
    if score_head and "score" not in save:
        save.append("score")
    config = LoraConfig(r=lora["r"], lora_alpha=alpha(lora), lora_dropout=lora["dropout"],
                        target_modules=lora["target_modules"], modules_to_save=save or None,
                        use_rslora=lora["use_rslora"], init_lora_weights=INITS[lora["init"]], bias="none")
    model = get_peft_model(model, config)
    if not base_is_input(model):
        # PiSSA / OLoRA start the adapter from the base's decomposition and take it out of the base
        # (W - scale B0 A0): under ZeRO-3 peft gathers each weight for that, and rank 0's result is
        # kept; every rank takes rank 0's adapter too. The start is kept to save the adapter as one
        # that loads on the input model (save_adapter).
        _same_on_every_rank(model)
        model.posttrain_initial_adapter = {n: p.detach().cpu().clone() for n, p in model.named_parameters()
                                           if ".lora_A." in n or ".lora_B." in n}
    return model


def base_is_input(module) -> bool:
    """Whether a peft model's base is still its input model (the default and gaussian starts), not
    the residual PiSSA / OLoRA leave (W - scale B0 A0)."""
    init = module.peft_config[ADAPTER].init_lora_weights
    return not (isinstance(init, str) and (init.startswith("pissa") or init == "olora"))


def _same_on_every_rank(model) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for n, p in model.named_parameters():
            if ".lora_A." in n or ".lora_B." in n:
                dist.broadcast(p.data, src=0)


def alpha(lora: dict) -> float:
    return float(lora["alpha"]) if lora["alpha"] is not None else 2.0 * lora["r"]


def scale(config) -> float:
    """What B A is multiplied by in the merged weight (config: the adapter's peft LoraConfig)."""
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def _check_targets(model, targets, where: str) -> None:
    """Every named target is a linear layer of the model (peft itself takes a name it does not find
    in some layers silently, and one it finds nowhere with a long message)."""
    if targets == "all-linear":
        return
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    other = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} - linear
    for t in targets:
        if t not in linear:
            what = "is not a linear layer" if t in other else "names no module"
            raise UserError(f"{where}: '{t}' {what} of this model (its linear layers: {', '.join(sorted(linear))})")


def is_peft(module) -> bool:
    return hasattr(module, "peft_config") and hasattr(module, "base_model")


def merged_state(state: dict, config, *, in_place: bool = False) -> dict:
    """A peft model's full state dict (names base_model.model.…) -> the plain model's, every adapted
    weight W + scale · B A, modules_to_save's trained copies in place of the originals. in_place: W's
    own tensor takes the merged values (no second copy of the model in memory; the same numbers),
    for a final save whose engine trains no further; a W whose storage another entry shares (a
    tied weight) still gets a new tensor."""
    s = scale(config)
    out = {}
    shared = set()
    if in_place:
        seen = collections.Counter(t.untyped_storage().data_ptr() for t in state.values())
        shared = {p for p, n in seen.items() if n > 1}
    for name, t in state.items():
        if not name.startswith(PREFIX):
            raise ValueError(f"not a peft state dict: {name}")
        name = name[len(PREFIX):]
        if ".lora_A." in name or ".lora_B." in name or ".original_module." in name:
            continue
        if ".base_layer." in name:
            layer, param = name.split(".base_layer.")
            if param == "weight":
                a = state[f"{PREFIX}{layer}.lora_A.{ADAPTER}.weight"]
                b = state[f"{PREFIX}{layer}.lora_B.{ADAPTER}.weight"]
                merged = t.float() + s * (b.float() @ a.float())
                if in_place and t.untyped_storage().data_ptr() not in shared:
                    with torch.no_grad():
                        t.copy_(merged)
                else:
                    t = merged.to(t.dtype)
            name = f"{layer}.{param}"
        elif f".modules_to_save.{ADAPTER}." in name:
            name = name.replace(f".modules_to_save.{ADAPTER}.", ".")
        out[name] = t
    return out


def packed_weights(module) -> set[str]:
    """State-dict names of a module's 4-bit quantized weights (QLoRA's base, bitsandbytes Params4bit:
    packed bytes, their scales in further entries named after them)."""
    return {name for name, p in module.named_parameters() if hasattr(p, "quant_state")}


def is_quantized(module) -> bool:
    return any(hasattr(p, "quant_state") for p in module.parameters())


def plain_weight(param) -> torch.Tensor:
    """A parameter's values: a 4-bit one dequantized (in its compute dtype), any other as it is."""
    if not hasattr(param, "quant_state"):
        return param.detach()
    import bitsandbytes.functional as bnbf

    data, state = param.data, param.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a 4-bit weight for its CPU kernel at the first no-grad forward; its own
        # state_dict undoes that the same way before it reads the weight.
        data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, state)
    return bnbf.dequantize_4bit(data, state)


def merged_onto_input(state: dict, config, packed: set[str], original) -> dict:
    """A QLoRA model's state dict -> the plain model's, the adapter merged onto the input model's own
    weights rather than onto their 4-bit copies: W + scale · B A in W's dtype, so a chain of QLoRA
    stages does not pile up quantization error. original(name) -> the input checkpoint's tensor (None:
    not there, e.g. a reward model's new head, which then comes from `state`); `packed`: the names of
    the 4-bit weights (packed_weights), which must come from the checkpoint."""
    s = scale(config)
    out = {}
    for name, t in state.items():
        if not name.startswith(PREFIX):
            raise ValueError(f"not a peft state dict: {name}")
        if any(name.startswith(q + ".") for q in packed):
            continue  # a 4-bit weight's scales
        plain = name[len(PREFIX):]
        if ".lora_A." in plain or ".lora_B." in plain or ".original_module." in plain:
            continue
        if f".modules_to_save.{ADAPTER}." in plain:
            out[plain.replace(f".modules_to_save.{ADAPTER}.", ".")] = t
            continue
        layer, _, param = plain.rpartition(".base_layer.") if ".base_layer." in plain else ("", "", "")
        if layer:
            plain = f"{layer}.{param}"
        w = original(plain)
        if w is None:
            if name in packed:
                raise ValueError(f"{plain}: the input checkpoint has no such tensor to merge the adapter onto")
            w = t
        if layer and param == "weight":
            a = state[f"{PREFIX}{layer}.lora_A.{ADAPTER}.weight"]
            b = state[f"{PREFIX}{layer}.lora_B.{ADAPTER}.weight"]
            w = (w.float() + s * (b.float() @ a.float())).to(w.dtype)
        out[plain] = w
    return out


def save_adapter(module, state: dict, out_dir) -> None:
    """RUN_DIR/<stage>/adapter/: adapter_config.json and adapter_model.safetensors (rank 0). A PiSSA /
    OLoRA adapter is saved as the plain LoRA adapter of rank 2r that gives the same weights on the
    input model: scale (B A - B0 A0) = scale' [B, -B0] [A; A0] (peft's own conversion)."""
    import copy
    from pathlib import Path

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = module.peft_config[ADAPTER]
    initial = getattr(module, "posttrain_initial_adapter", None)
    if initial is not None:
        state = dict(state)
        for name, start in initial.items():
            now = state[name]
            state[name] = (torch.cat([now, start.to(now.dtype)], 0) if ".lora_A." in name
                           else torch.cat([now, -start.to(now.dtype)], 1))
        config = copy.deepcopy(config)
        config.lora_alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
        config.r, config.init_lora_weights = 2 * config.r, True
    config.save_pretrained(str(out_dir))
    tensors = get_peft_model_state_dict(module, state_dict=state, adapter_name=ADAPTER)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "adapter_model.safetensors"),
              metadata={"format": "pt"})


class AdapterOff:
    """A LoRA model's input network for free: the same module (its weights, under ZeRO-3 its shards
    and gather hooks) called with the adapter disabled, so a reference needs no second model in
    memory. Anything else is the module's."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        with self.module.disable_adapter():
            return self.module(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.module, name)


def input_network(engine):
    """The trainer's network without its adapter, when it has one and its base is the input model
    (else None: PiSSA / OLoRA changed the base)."""
    return AdapterOff(engine.module) if is_peft(engine.module) and base_is_input(engine.module) else None


def counts(module) -> tuple[int, int]:
    """(trainable, all) parameters, ZeRO-3 partitioned ones by their full size."""
    trainable = total = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
