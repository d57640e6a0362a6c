"""DeepSpeed ZeRO 0-3 around a Hugging Face model: config, loading, attention, optimizer, schedule, save.

    engine, pack = train_policy(ctx, total_steps)      # causal LM, dropout off, AdamW + schedule
    ...                                                # engine/loop.train steps it
    save_hf(engine, tokenizer, ctx.work_dir / "model", final=True)

A stage hands in its config and batch arithmetic (train_ds_config) and gets an engine back;
DeepSpeed's own keys are built here only (the run's `deepspeed.config` merges over them).
The attention implementation and how a packed row marks its sequences (pack_options) are
chosen here too. Frozen models (references, teachers, reward scorers, samplers) load through
engine/inference.py; the step loop is engine/loop.py, mid-stage checkpoints engine/checkpoint.py.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

from posttrain_cli.engine import dist

# HfDeepSpeedConfig must stay alive while a ZeRO-3 model loads so that
# from_pretrained partitions weights as it reads them.
_hf_ds_config = None


def resolve_precision(ds: dict) -> str:
    if ds["precision"] != "auto":
        return ds["precision"]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def cpu_autocast(ds_cfg: dict):
    """bf16 without CUDA: the weights, gradients and optimizer stay float32 and every forward runs
    under torch.autocast("cpu", bfloat16) (matmuls and attention in bf16, where CPUs with AVX512-BF16
    or AMX run them 2-4x faster; norms, softmax and the loss in float32): as close to the fp32
    curve as bf16 gets, unlike bf16 weights. -> torch.bfloat16, else None (DeepSpeed's own bf16:
    bf16 weights, fp32 masters, on GPUs)."""
    return torch.bfloat16 if ds_cfg["bf16"]["enabled"] and not torch.cuda.is_available() else None


def autocast_forwards(model, dtype) -> None:
    """Every forward of `model`'s direct children (the decoder, the head: what its own forward
    calls; peft calls the top module's forward method directly, past any hook there) under
    torch.autocast("cpu", dtype). HF generate and references go through them too."""
    def enter(module, args):
        ac = torch.autocast("cpu", dtype=dtype)
        ac.__enter__()
        module._posttrain_autocast.append(ac)

    def leave(module, args, output):
        module._posttrain_autocast.pop().__exit__(None, None, None)

    for child in model.children():
        child._posttrain_autocast = []
        child.register_forward_pre_hook(enter)
        child.register_forward_hook(leave, always_call=True)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(ds: dict, *, micro_batch_size: int, grad_accum: int, grad_clip: float | None) -> dict:
    precision = resolve_precision(ds)
    zero = {"stage": ds["zero_stage"]}
    if ds["zero_stage"] >= 2:
        zero.update(overlap_comm=torch.cuda.is_available(), contiguous_gradients=True)
    if ds["zero_stage"] == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if ds["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds["offload_param"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dist.world(),
        "gradient_clipping": float(grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # We pass torch's AdamW: DeepSpeed's fused CPU Adam needs compiled ops.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    return _merge(cfg, ds.get("config") or {})


def attn_implementation(model_cfg: dict) -> str:
    """flash_attention_2 where installed on GPUs, else posttrain's varlen SDPA."""
    if model_cfg.get("attn_implementation"):
        return model_cfg["attn_implementation"]
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    from posttrain_cli.engine import attention

    return attention.register()


def packed_boundaries(attn: str) -> str:
    """How a packed row tells this attention where sequences end (data/packing.py)."""
    from posttrain_cli.engine import attention

    return "varlen" if attn.startswith("flash_attention") or attn == attention.NAME else "mask"


def mask_dtype(ds: dict):
    """The dtype of dense attention masks (packing without varlen attention)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(ds), torch.float32)


def load_causal_lm(path: str, model_cfg: dict, ds_cfg: dict, *, train: bool, quantize: str | None = None):
    """Load a causal LM; under ZeRO-3 it is partitioned while it loads. quantize="4bit": its linear
    layers in 4-bit NF4 (QLoRA's frozen base, bitsandbytes), on this rank's device."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, path, model_cfg, ds_cfg, train=train, quantize=quantize)


def load_scorer(path: str, model_cfg: dict, ds_cfg: dict, *, train: bool, pad_token_id: int,
                quantize: str | None = None):
    """A scalar-head model (AutoModelForSequenceClassification, one label) on a causal LM or reward
    model checkpoint; a new head starts from the model's own initializer."""
    from transformers import AutoModelForSequenceClassification

    return _load(AutoModelForSequenceClassification, path, model_cfg, ds_cfg, train=train, quantize=quantize,
                 num_labels=1, pad_token_id=pad_token_id)


def compute_dtype(ds_cfg: dict):
    return torch.bfloat16 if ds_cfg["bf16"]["enabled"] else torch.float16 if ds_cfg["fp16"]["enabled"] else torch.float32


def quantization(ds_cfg: dict):
    """QLoRA's 4-bit base (the QLoRA paper's settings): NF4 with double quantization, the matmuls in
    the run's precision."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype(ds_cfg))


def _load(auto_cls, path: str, model_cfg: dict, ds_cfg: dict, *, train: bool, quantize: str | None = None, **extra):
    global _hf_ds_config
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    _hf_ds_config = HfDeepSpeedConfig(ds_cfg) if ds_cfg["zero_optimization"]["stage"] == 3 else None
    if train or not torch.cuda.is_available():
        dtype = torch.float32  # DeepSpeed keeps fp32 masters and casts for bf16
    else:
        dtype = compute_dtype(ds_cfg)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation(model_cfg),
                  trust_remote_code=model_cfg.get("trust_remote_code", False), **extra)
    if quantize == "4bit":
        kwargs.update(quantization_config=quantization(ds_cfg), device_map={"": dist.device()})
    if model_cfg.get("revision") and not Path(path).exists():
        kwargs["revision"] = model_cfg["revision"]
    model = auto_cls.from_pretrained(path, **kwargs)
    if (dt := cpu_autocast(ds_cfg)) is not None:
        autocast_forwards(model, dt)
    return model


def disable_dropout(model) -> None:
    """DPO and reward models train without dropout (TRL and open-instruct do the same): the
    log-ratio to the reference must not be noise."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if schedule == "linear":
            return 1.0 - progress * (1.0 - min_ratio)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def param_groups(model, weight_decay: float, lr: float, lr_for=None) -> list[dict]:
    """No weight decay on biases and norm gains (1-D tensors); lr_for(name) -> a parameter's
    learning rate where it differs from `lr` (PPO's value model)."""
    groups: dict[tuple, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((p.ndim >= 2, lr_for(name) if lr_for else lr), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": g_lr}
            for (decay, g_lr), ps in sorted(groups.items(), key=lambda kv: not kv[0][0])]


def initialize(model, ds_cfg: dict, train_cfg: dict | None = None, total_steps: int = 0, lr_for=None):
    """-> DeepSpeed engine; with train_cfg an AdamW + schedule, without it inference only.
    lr_for(parameter name) -> its learning rate, where groups differ (the schedule scales each)."""
    import deepspeed

    if cpu_autocast(ds_cfg) is not None:  # bf16 by autocast (above): DeepSpeed keeps float32
        ds_cfg = {**ds_cfg, "bf16": {**ds_cfg["bf16"], "enabled": False}}
    clip = None
    if train_cfg is not None and nothing_to_shard(ds_cfg):
        ds_cfg = {**ds_cfg, "zero_optimization": {"stage": 0}}
    if train_cfg is not None and ds_cfg["zero_optimization"]["stage"] == 0 and not (
            ds_cfg["bf16"]["enabled"] or ds_cfg["fp16"]["enabled"]):
        # float32 ZeRO-0: posttrain clips (DeepSpeed would too) and keeps the norm, which it does not
        clip, ds_cfg = ds_cfg["gradient_clipping"], {**ds_cfg, "gradient_clipping": 0.0}
    if train_cfg is None:
        engine, *_ = deepspeed.initialize(model=model, config=ds_cfg)
        engine.eval()
        return engine
    optimizer = torch.optim.AdamW(
        param_groups(model, train_cfg["weight_decay"], train_cfg["lr"], lr_for),
        lr=train_cfg["lr"],
        betas=tuple(train_cfg["adam_betas"]),
        eps=train_cfg["adam_eps"],
    )
    warmup = math.ceil(train_cfg["warmup_ratio"] * total_steps)
    factor = lr_lambda(train_cfg["schedule"], total_steps, warmup, train_cfg["min_lr_ratio"])

    # A factory, not an instance: ZeRO wraps the optimizer and regroups its
    # parameters, so the schedule must bind to the optimizer DeepSpeed hands back.
    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)

    if clip is not None:
        optimizer.register_step_pre_hook(functools.partial(_clip_and_record_norm, max_norm=clip))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    return engine


def nothing_to_shard(ds_cfg: dict) -> bool:
    """ZeRO-1/2 on one rank shards nothing, yet DeepSpeed still keeps a float32 copy of float32
    weights and a flat gradient partition beside the model's own (+2x the weights' bytes: 0.8 GB at
    100M parameters). Such a run trains as ZeRO-0: the same update (torch's AdamW on the same
    gradients, clipped the same way), without the copies. Offloading and DeepSpeed's bf16 / fp16
    (whose masters are the point) keep their stage."""
    zero = ds_cfg["zero_optimization"]
    return (dist.world() == 1 and zero["stage"] in (1, 2) and not zero.get("offload_optimizer")
            and not zero.get("offload_param") and not ds_cfg["bf16"]["enabled"] and not ds_cfg["fp16"]["enabled"])


def _clip_and_record_norm(optimizer, args, kwargs, *, max_norm: float) -> None:
    """A step pre-hook for float32 ZeRO-0, doing what DeepSpeed's ZeRO-1/2 step does around the
    update, in the same arithmetic (so a one-rank ZeRO-2 stage rerouted here takes bit for bit the
    same steps): the norm of the (already all-reduced) gradients, per tensor in float64, per
    parameter group, then over the groups; the gradients multiplied by 1 / max(1, (norm + 1e-6) /
    max_norm); the norm where the engine reads it after step() (`_global_grad_norm`; at ZeRO-0
    DeepSpeed reports none); a non-finite norm an overflow: no update at all (every gradient dropped,
    so AdamW touches no parameter and no moment), `overflow` set so the engine skips the schedule's
    step, norm inf."""
    groups = [[p for p in g["params"] if p.grad is not None] for g in optimizer.param_groups]
    group_norms = [torch.stack([torch.linalg.vector_norm(p.grad.detach().double()) for p in ps]).pow(2).sum().float()
                   .pow(0.5) for ps in groups if ps]
    norm = torch.linalg.vector_norm(torch.stack(group_norms)) if group_norms else torch.tensor(0.0)
    optimizer.overflow = not bool(torch.isfinite(norm))
    if optimizer.overflow:
        for ps in groups:
            for p in ps:
                p.grad = None
        norm = torch.tensor(float("inf"))
    elif max_norm > 0:
        scale = 1.0 / torch.clamp((norm + 1e-6) / max_norm, min=1.0)
        for ps in groups:
            for p in ps:
                p.grad.mul_(scale)
    optimizer._global_grad_norm = norm


def train_ds_config(ctx) -> dict:
    """A training stage's DeepSpeed config: its batch arithmetic (ctx.arith) and grad_clip."""
    return ds_config(ctx.run["deepspeed"], micro_batch_size=ctx.arith["micro_batch_size"],
                     grad_accum=ctx.arith["grad_accum"], grad_clip=ctx.cfg["grad_clip"])


def pack_options(run: dict, device) -> dict:
    """How this run packs rows for a forward (data/packing.py): boundaries, mask dtype, device."""
    return dict(boundaries=packed_boundaries(attn_implementation(run["model"])),
                mask_dtype=mask_dtype(run["deepspeed"]), device=device)


def trainable(ctx, model, *, score_head: bool = False, what: str = ""):
    """`model` as this stage trains it: activation checkpointing when deepspeed.activation_checkpointing
    is on, the stage's LoRA adapter (engine/lora.py) when its lora settings are on (one line says
    what trains), its decoder layers compiled when deepspeed.compile is on (engine/regional_compile.py),
    else its MLPs and norms recomputing their elementwise results (engine/lean_activations.py), its
    LM head's log-probs on deepspeed.kernels.
    score_head: a scalar head (`score`) trains in full."""
    from posttrain_cli.engine import lora

    ds = ctx.run["deepspeed"]
    if ds.get("activation_checkpointing"):
        # Non-reentrant: the recomputation needs no input that requires grad (a LoRA model's
        # embeddings are frozen) and runs under ZeRO-3's gather hooks.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    settings = ctx.run.get("lora")
    if settings is not None:
        model = lora.wrap(model, settings, where=ctx.where("lora"), score_head=score_head)
        trainable, total = lora.counts(model)
        ctx.info(f"LoRA{what}: r {settings['r']}, alpha {lora.alpha(settings):g}, {settings['target_modules']}"
                 + (", rsLoRA" if settings["use_rslora"] else "") + (", 4-bit NF4 base (QLoRA)" if settings["quantize"] else "")
                 + f": {trainable:,} of {total:,} parameters train ({trainable / total:.2%})")
    if not ds.get("activation_checkpointing") and not ds.get("compile"):
        from posttrain_cli.engine import lean_activations

        lean_activations.apply(model)  # the same numbers from fewer saved activations
    if ds.get("compile"):
        from posttrain_cli.engine import regional_compile

        regional_compile.check_compiler(dist.device(), "deepspeed.compile")
        n = regional_compile.apply(model, checkpointing=bool(ds.get("activation_checkpointing")),
                                   where="deepspeed.compile")
        ctx.info(f"torch.compile{what}: {n} decoder layers, dynamic shapes (the first steps compile)")
    if ds.get("kernels", "torch") != "torch":
        from posttrain_cli.engine import lm_head

        if lm_head.use_kernels(model, ds["kernels"], where=ctx.where("deepspeed.kernels")):
            ctx.info(f"kernels{what}: the LM head's log-probs through liger-kernel's Triton cross-entropy")
    return model


def quantize_of(ctx) -> str | None:
    """The stage's lora.quantize (QLoRA's 4-bit base), None without it."""
    return (ctx.run.get("lora") or {}).get("quantize")


def train_policy(ctx, total_steps: int):
    """The stage's input model as a causal LM under DeepSpeed, dropout off, AdamW + the stage's
    schedule over total_steps optimizer steps -> (engine, pack_options)."""
    ds_cfg = train_ds_config(ctx)
    model = load_causal_lm(ctx.input_model, ctx.run["model"], ds_cfg, train=True, quantize=quantize_of(ctx))
    disable_dropout(model)
    model = trainable(ctx, model)
    engine = initialize(model, ds_cfg, ctx.cfg, total_steps)
    return engine, pack_options(ctx.run, engine.device)


def nonfinite_tensor(state: dict) -> tuple[str, int, int] | None:
    """The first floating-point tensor of a state dict that holds nan or inf -> (name, how many
    values, of how many), or None when every value is finite."""
    for name, t in state.items():
        if torch.is_floating_point(t):
            bad = int(t.numel() - torch.isfinite(t).sum())
            if bad:
                return name, bad, t.numel()
    return None


def save_hf(engine, tokenizer, out_dir: Path, part: str | None = None, where: str = "the stage",
            final: bool = False) -> None:
    """Write a Hugging Face directory; ZeRO-3 shards are gathered first (all ranks call).
    `part` saves one submodule of a wrapper (PPO's `policy`). A model with a non-finite tensor is
    never written: every rank raises Diverged naming `where` (the stage key) and the tensor.
    A LoRA model (engine/lora.py) is written merged, its adapter beside out_dir in ../adapter;
    final=True (the stage's last use of the engine) merges the adapter into the base weights in
    place, so the save holds no second copy of the model; a save mid-stage leaves them."""
    from posttrain_cli.engine import lora
    from posttrain_cli.errors import Diverged

    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict() if dist.is_main() else None
    module = engine.module if part is None else getattr(engine.module, part)
    peft = lora.is_peft(module)
    bad = None
    if dist.is_main():
        if part is not None:
            state = {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        if peft:
            adapter, state = state, _merged(module, state, in_place=final)
        bad = nonfinite_tensor(state)
    # Rank 0 holds the whole model; the flag reaches every rank, so none waits at the barrier below.
    if dist.all_sum([float(bad is not None)])[0] > 0:
        found = f"{bad[1]} of the {bad[2]} values of {bad[0]}" if bad else "a tensor (rank 0 names it)"
        raise Diverged(f"{where}: the trained model holds non-finite values ({found} are nan or inf): training "
                       f"diverged; the model is not published; lower {where}.lr")
    if dist.is_main():
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        gen = getattr(module, "generation_config", None)
        if gen is not None:
            # The template's end of turn ends generation for whoever loads the model next
            # (transformers, vLLM), not only the base EOS: a Qwen base ends with <|endoftext|>,
            # its chat turns with <|im_end|>.
            from posttrain_cli.data.chat import stop_ids

            ids = stop_ids(tokenizer, gen.eos_token_id)
            gen.eos_token_id = ids[0] if len(ids) == 1 else ids
            if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
                gen.pad_token_id = tokenizer.pad_token_id
        if peft:
            lora.save_adapter(module, adapter, out_dir.parent / "adapter")
            module = module.base_model.model
            if lora.is_quantized(module):
                module = _plain_twin(module, state)
        module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
    dist.barrier()


def _merged(module, state: dict, in_place: bool) -> dict:
    """A LoRA model's state dict, merged into the plain model's (engine/lora.py): a 4-bit base's
    adapter onto the input model's own weights, read from its checkpoint a tensor at a time."""
    from posttrain_cli.engine import lora

    config = module.peft_config[lora.ADAPTER]
    packed = lora.packed_weights(module)
    if not packed:
        return lora.merged_state(state, config, in_place=in_place)
    from posttrain_cli.merge.shards import Checkpoint, fetch

    base = module.base_model.model
    ckpt = Checkpoint(fetch(base.name_or_path, "the stage's input model"), "the stage's input model")
    try:
        names = ckpt.names()
        return lora.merged_onto_input(state, config, packed, lambda name: ckpt.read(name) if name in names else None)
    finally:
        ckpt.close()


def _plain_twin(module, state: dict):
    """An unquantized model of a 4-bit one's class and config, its parameters on the meta device (no
    memory): it writes `state` as a plain Hugging Face model (no quantization_config)."""
    import copy

    config = copy.deepcopy(module.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    with torch.device("meta"):
        twin = type(module)._from_config(config, dtype=dtype)
    if getattr(module, "generation_config", None) is not None:  # a causal LM's (a scorer has none)
        twin.generation_config = module.generation_config
    return twin


def gathered_params(engine):
    """Context manager: full parameters on every rank (a no-op below ZeRO-3)."""
    import contextlib

    if engine.zero_optimization_stage() != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
