"""How many parameters a model has and how many a LoRA adapter trains, from its config.json alone,
and the memory its model states take (`posttrain plan`'s lora line). Pure Python: no torch.

    config = find_config("meta-llama/Llama-3.1-8B")      # raises NoCount with the reason
    size = lora_size(config, lora, "bf16")               # size.trainable, size.total, size.full_bytes, ...

Model states are the ZeRO paper's (Rajbhandari et al. 2020, section 3.1): weights, gradients and
AdamW's moments, 16 bytes per trained parameter in mixed precision (bf16 weight and gradient, fp32
master weight and two moments) and as many in fp32 (weight, gradient, two moments). A frozen weight
costs only itself. Activations are not counted.
"""

from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass
from pathlib import Path

# Bytes of one trained parameter's model states (above), and of one frozen weight per precision.
TRAINED_BYTES = 16
WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# QLoRA's 4-bit base, with the QLoRA paper's settings the engine loads it with: bitsandbytes NF4 in
# blocks of 64 weights, each block's absmax scale itself quantized to 8 bits in blocks of 256 (double
# quantization).
NF4_BLOCK = 64
NESTED_BLOCK = 256
# Per quantized tensor: the NF4 code (16 fp32), the 8-bit code of the scales (256 fp32), their offset.
NF4_TABLES = 16 * 4 + 256 * 4 + 4

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
HEADS = ("lm_head", "score")


class NoCount(Exception):
    """Why a model's parameters cannot be counted here (a few words for plan's line)."""


@dataclass(frozen=True)
class Arch:
    """What a Llama-family decoder's config.json leaves to its model class."""

    # Norm vectors of hidden width per layer (Llama: before attention and before the MLP).
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # q_norm and k_norm: "head" (one head_dim vector each), "proj" (the projection's whole width), None.
    qk_norm: str | None = None
    # Config keys that put a bias on a group of projections, and projections biased whatever they say.
    bias_keys: tuple[str, ...] = ("attention_bias",)
    fixed_bias: tuple[str, ...] = ()
    # tie_word_embeddings and head_dim when config.json leaves them out (None: hidden_size / heads).
    tie: bool = False
    head_dim: int | None = None


GEMMA2_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")
OLMO2 = Arch(layer_norms=("post_attention_layernorm", "post_feedforward_layernorm"), qk_norm="proj")
# model_type -> its Arch (transformers' modeling_<type>.py).
ARCHS = {
    "llama": Arch(bias_keys=("attention_bias", "mlp_bias")),
    "mistral": Arch(bias_keys=()),
    "qwen2": Arch(bias_keys=(), fixed_bias=("q_proj", "k_proj", "v_proj")),
    "qwen3": Arch(qk_norm="head", head_dim=128),
    "olmo2": OLMO2,
    "olmo3": OLMO2,
    "gemma": Arch(tie=True, head_dim=256),
    "gemma2": Arch(layer_norms=GEMMA2_NORMS, tie=True, head_dim=256),
    "gemma3_text": Arch(layer_norms=GEMMA2_NORMS, qk_norm="head", tie=True, head_dim=256),
}
BIASED = {"attention_bias": ATTENTION, "mlp_bias": MLP}


@dataclass(frozen=True)
class Module:
    """One kind of module: `copies` of it in the model, `size` parameters each (weight and bias)."""

    name: str
    copies: int
    size: int
    # A linear layer's (in, out) features; None for embeddings and norms.
    linear: tuple[int, int] | None = None
    # False: its weight is another module's (a tied lm_head) and adds nothing to the count.
    owned: bool = True


@dataclass(frozen=True)
class LoraSize:
    # Parameters that train, and all of the adapted model's (the adapter included, as peft counts).
    trainable: int
    total: int
    # Model states of a full fine-tune of the input model, and with the adapter.
    full_bytes: int
    lora_bytes: int


def modules(config: dict, *, scorer: bool = False) -> list[Module]:
    """The modules of a decoder-only model of the Llama family; scorer: a sequence classifier (one
    label, as AutoModelForSequenceClassification loads a reward model): a `score` head, no lm_head."""
    arch = ARCHS.get(config.get("model_type"))
    if arch is None:
        raise NoCount(f"unknown architecture '{config.get('model_type')}'")
    hidden, layers, heads, inner, vocab = (_need(config, k) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"))
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or arch.head_dim or hidden // heads
    biased = set(arch.fixed_bias).union(*(BIASED[k] for k in arch.bias_keys if config.get(k)))
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
              "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    out = [Module("embed_tokens", 1, vocab * hidden)]
    out += [Module(n, layers, i * o + (o if n in biased else 0), (i, o)) for n, (i, o) in shapes.items()]
    if arch.qk_norm:
        out += [Module("q_norm", layers, head_dim if arch.qk_norm == "head" else q),
                Module("k_norm", layers, head_dim if arch.qk_norm == "head" else kv)]
    out += [Module(n, layers, hidden) for n in arch.layer_norms]
    out.append(Module("norm", 1, hidden))
    if scorer:
        out.append(Module("score", 1, hidden, (hidden, 1)))
    else:
        tied = config.get("tie_word_embeddings", arch.tie)
        out.append(Module("lm_head", 1, vocab * hidden, (hidden, vocab), owned=not tied))
    return out


def _need(config: dict, key: str) -> int:
    if not isinstance(config.get(key), int):
        raise NoCount(f"config.json has no {key}")
    return config[key]


def count(mods: list[Module]) -> int:
    return sum(m.copies * m.size for m in mods if m.owned)


def lora_size(config: dict, lora: dict, precision: str, *, scorer: bool = False) -> LoraSize:
    """What a LoRA stage (schema.stage_lora's settings) trains and holds, in `precision` (bf16, fp16,
    fp32), as peft builds it (engine/lora.py: wrap): an adapter of r (in + out) parameters on each
    targeted linear layer (all-linear: every one but the output head), a trained copy of each module
    in modules_to_save (and of a scorer's head), which then gets no adapter."""
    mods = modules(config, scorer=scorer)
    save = set(lora["modules_to_save"] or []) | ({"score"} if scorer else set())
    targets = _targets(mods, lora["target_modules"], config["model_type"]) - save
    adapter = sum(m.copies * lora["r"] * sum(m.linear) for m in mods if m.name in targets)
    trainable = adapter + sum(m.copies * m.size for m in mods if m.name in save)
    base = count(mods)
    return LoraSize(trainable, base + trainable, TRAINED_BYTES * base,
                    frozen_bytes(mods, precision, lora["quantize"] == "4bit") + TRAINED_BYTES * trainable)


def _targets(mods: list[Module], targets: str | list[str], model_type: str) -> set[str]:
    """The module names LoRA adapts; a name that is no linear layer stops the count (the stage
    itself stops on it too: engine/lora.py _check_targets)."""
    linear = {m.name for m in mods if m.linear}
    if targets == "all-linear":
        return linear - set(HEADS)
    for t in targets:
        if t not in linear:
            what = "is not a linear layer" if t in {m.name for m in mods} else "names no module"
            raise NoCount(f"target '{t}' {what} of {model_type}")
    return set(targets)


def frozen_bytes(mods: list[Module], precision: str, quantized: bool) -> int:
    """The input model's weights, untrained: WEIGHT_BYTES each, or with a 4-bit base the decoder's
    linear weights in NF4 (biases, embeddings, norms and the head stay in `precision`, as
    bitsandbytes' QLoRA loads them)."""
    total = WEIGHT_BYTES[precision] * count(mods)
    if quantized:
        for m in mods:
            if m.linear and m.name not in HEADS:
                n = m.linear[0] * m.linear[1]
                total += m.copies * (nf4_bytes(n) - WEIGHT_BYTES[precision] * n)
    return total


def nf4_bytes(n: int) -> int:
    """One weight of n values in bitsandbytes' NF4 with double quantization: two values a byte, an
    8-bit scale per block of 64, an fp32 scale per 256 of those, and the tensor's code tables."""
    blocks = math.ceil(n / NF4_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + NF4_TABLES


def has_cuda() -> bool:
    """Whether this machine has an NVIDIA driver (asked without importing torch)."""
    return Path("/proc/driver/nvidia/version").exists()


def plan_precision(precision: str) -> tuple[str, str]:
    """(precision, why) as plan can tell without torch: auto is bf16 where an NVIDIA driver is (the
    engine also wants bf16 support: engine/deepspeed_engine.py resolve_precision), else fp32."""
    if precision != "auto":
        return precision, ""
    if has_cuda():
        return "bf16", "precision auto: CUDA driver here"
    return "fp32", "precision auto: no CUDA driver here"


def tiny_config(arch: dict) -> dict:
    """config.json of model=tiny (models/tiny.py: build_tiny) without building it: a Llama whose
    vocabulary is the special tokens and printable ASCII, one token a character."""
    from posttrain_cli.models.tiny import DEFAULT_ARCH, SPECIAL_TOKENS

    arch = {**DEFAULT_ARCH, **arch}
    return {"model_type": "llama", "vocab_size": len(SPECIAL_TOKENS) + len(set(string.printable)),
            "hidden_size": arch["hidden_size"], "intermediate_size": arch["intermediate_size"],
            "num_hidden_layers": arch["num_hidden_layers"], "num_attention_heads": arch["num_attention_heads"],
            "num_key_value_heads": arch["num_attention_heads"], "tie_word_embeddings": False}


def find_config(path: str, revision: str | None = None) -> dict:
    """A model's config.json: from a local directory, or for a hub id from the local Hugging Face
    cache only (plan never downloads)."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise NoCount(f"no config.json in {path}")
        return json.loads((local / "config.json").read_text())
    if path.count("/") != 1 or path.startswith((".", "/", "~")):
        raise NoCount(f"{path} is not a directory")
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(path, "config.json", revision=revision)
    if not isinstance(found, str):
        raise NoCount("config.json not downloaded yet")
    return json.loads(Path(found).read_text())
