"""Supervised fine-tuning: cross-entropy on assistant tokens, sequences packed.

    posttrain run recipe=tiny stages.sft.lr=1e-3

- Loss on every assistant turn (and the end-of-turn token after it), never on
  system/user turns; turn boundaries come from the model's own chat template.
  `multi_turn` (data/chat.py) decides how a conversation whose template rewrites earlier turns
  becomes examples; the log says how many examples the conversations became.
- Data: every row is checked and tokenized once, on every core of rank 0, into a memory-mapped
  cache keyed by the data's content, the tokenizer, the template and these settings
  (RUN_DIR/_cache/tokenized/, data/tokenized.py), which every stage reading the same data shares.
- Packing (default): each micro-batch is one padding-free row, attention kept
  inside each sequence. `packing: false` pads rows instead.
- The loss is the token sum over the global batch divided by its loss-token
  count (open-instruct's "sum" mode normalised per batch; Tulu 3 used a plain
  sum with its lr), so rank count and accumulation do not change the gradient.
- Departures from the papers: none of the recipes' SFT settings are changed
  here; residual dropout (InstructGPT) is the model config's business.
"""

from __future__ import annotations

import torch

from posttrain_cli.data import packing, tokenized
from posttrain_cli.engine import deepspeed_engine as eng
from posttrain_cli.engine import dist
from posttrain_cli.engine.inference import load_tokenizer
from posttrain_cli.engine.lm_head import target_logps
from posttrain_cli.engine.loop import StepPlan, total_steps, train
from posttrain_cli.errors import UserError
from posttrain_cli.losses import LOSSES
from posttrain_cli.losses.sft import shifted_targets


def tokenize_data(ctx, tokenizer) -> tuple:
    """Every source checked and tokenized once, on every core of rank 0, into the run's shared cache
    (data/tokenized.py: RUN_DIR/_cache/tokenized/<key>/); every rank reads it memory-mapped."""
    cfg = ctx.cfg
    spec = tokenized.SftTokenization(tokenizer, cfg["max_seq_len"], cfg["truncation"],
                                     cfg.get("multi_turn", "each"))
    caches = tokenized.locate(cfg["data"], ctx.where("data"), spec, tokenized.cache_root(ctx.stage_dir.parent),
                              resolved_from=ctx.datasets)

    def build():
        for c in caches:
            if not c.ready():
                c.build(progress=ctx.progress)

    ctx.once(lambda: all(c.ready() for c in caches), build)
    return tokenized.mixture(caches, ctx.seed)


def run(ctx) -> dict:
    cfg = ctx.cfg
    model_cfg = ctx.run["model"]
    tokenizer = load_tokenizer(ctx.input_model, model_cfg)
    examples, stats = tokenize_data(ctx, tokenizer)
    if not examples:
        raise UserError(f"{ctx.where('data')}: every row was dropped by truncation={cfg['truncation']} "
                        f"at max_seq_len={cfg['max_seq_len']}")
    ctx.info(f"{stats['rows']} conversations -> {stats['examples']} examples, {stats['truncated']} truncated, "
             f"{stats['dropped']} dropped (max_seq_len {cfg['max_seq_len']}, {cfg['truncation']}); "
             f"{stats['loss_tokens']}/{stats['tokens']} tokens carry loss")

    steps = total_steps(cfg, len(examples), ctx.where())
    batch = ctx.arith
    ds_cfg = eng.train_ds_config(ctx)
    model = eng.trainable(ctx, eng.load_causal_lm(ctx.input_model, model_cfg, ds_cfg, train=True,
                                                quantize=eng.quantize_of(ctx)))
    engine = eng.initialize(model, ds_cfg, cfg, steps)
    boundaries = eng.packed_boundaries(eng.attn_implementation(model_cfg))
    mask_dtype = eng.mask_dtype(ctx.run["deepspeed"])
    dev = engine.device
    plan = StepPlan(len(examples), batch, ctx.seed)
    loss = LOSSES["sft"]

    def micro_batches(step: int) -> list[dict]:
        out = []
        for idx in plan.micro_indices(step, dist.rank(), dist.world()):
            seqs = [examples[i] for i in idx]
            if cfg["packing"]:
                b = packing.pack(seqs, boundaries, mask_dtype)
            else:
                b = packing.pad(seqs, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
            targets = shifted_targets(b.pop("labels"))
            keep = targets != packing.IGNORE
            inputs = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in b.items()}
            micro = {"inputs": inputs, "targets": targets.to(dev),
                     "weight": float(keep.sum()), "tokens": float(sum(len(s) for s, _ in seqs))}
            if keep.shape[0] == 1:
                # Packed: one row; logits are computed only where a target counts.
                micro["positions"] = keep[0].nonzero().squeeze(-1).to(dev)
            out.append(micro)
        return out

    def loss_fn(module, micro) -> tuple:
        # log p(target) through the head in chunks: no [tokens, vocab] logits (engine/lm_head.py).
        if "positions" in micro:
            targets = micro["targets"][0, micro["positions"]]
            logps, _ = target_logps(module, micro["inputs"], targets, micro["positions"])
        else:
            targets = micro["targets"]
            logps, _ = target_logps(module, micro["inputs"], targets)
        loss_sum, _ = loss(logps, targets)
        return loss_sum, {}

    ctx.info(f"{steps} steps x {batch['global_batch_size']} sequences "
             f"({batch['micro_batch_size']} micro x {batch['world_size']} rank(s) x {batch['grad_accum']} accumulation), "
             f"ZeRO-{ctx.run['deepspeed']['zero_stage']}")
    metrics = train(ctx, engine, total_steps=steps, micro_batches=micro_batches, loss_fn=loss_fn)
    eng.save_hf(engine, tokenizer, ctx.work_dir / "model", where=ctx.where(), final=True)
    del engine, model
    return {"metrics": {**metrics, "data": stats}, "outputs": {"model": "model"}}
