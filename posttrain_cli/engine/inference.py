"""Frozen models next to the one being trained: references, teachers, reward scorers, samplers.

    tokenizer = load_tokenizer(path, ctx.run["model"])
    ref = frozen_causal_lm(path, ctx.run["model"], ctx.run["deepspeed"])   # eval mode, no grads kept
    with eval_mode(engine):                                                # dropout off, then back
        logits = packed_logits(engine, micro)                              # data/preference.pack_answers

A frozen model is sharded like the policy: under ZeRO-3 it stays partitioned, and every rank must
then take part in every forward (`synced`); below ZeRO-3 it is a plain module on this rank's
device. transformers and DeepSpeed are imported only when a model loads.
"""

from __future__ import annotations

import contextlib

from posttrain_cli.engine import dist


def load_tokenizer(path: str, model_cfg: dict):
    """The tokenizer of a model directory or hub id (remote code only where the run allows it), with
    the run's chat template (model.chat_template, else the model's own; none at all is refused)."""
    from transformers import AutoTokenizer

    from posttrain_cli.data.chat import use_template

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg["trust_remote_code"])
    return use_template(tokenizer, model_cfg.get("chat_template"), path)


def pad_id(tokenizer) -> int:
    """The pad token, else EOS (many base tokenizers define none; padded positions are masked anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def inference_ds_config(ds_section: dict) -> dict:
    """The DeepSpeed config of a model that only runs forwards (the run's `deepspeed` section)."""
    from posttrain_cli.engine import deepspeed_engine as eng

    return eng.ds_config(ds_section, micro_batch_size=1, grad_accum=1, grad_clip=None)


def synced(ds_section: dict) -> bool:
    """Whether every rank must join every forward of a frozen model: ZeRO-3 over several ranks
    gathers parameters collectively, so ranks make the same number of calls."""
    return ds_section["zero_stage"] == 3 and dist.world() > 1


def frozen_causal_lm(path: str, model_cfg: dict, ds_section: dict):
    """A causal LM for no-grad forwards, in eval mode, sharded like the policy, its log-probs on
    deepspeed.kernels."""
    from posttrain_cli.engine import deepspeed_engine as eng

    ds_cfg = inference_ds_config(ds_section)
    model = _frozen(eng.load_causal_lm(path, model_cfg, ds_cfg, train=False), ds_cfg)
    if ds_section.get("kernels", "torch") != "torch":
        from posttrain_cli.engine import lm_head

        lm_head.use_kernels(model, ds_section["kernels"])
    return model


def frozen_scorer(path: str, model_cfg: dict, ds_section: dict, pad_token_id: int):
    """A one-label scalar-head model (a reward model) for no-grad forwards, like frozen_causal_lm."""
    from posttrain_cli.engine import deepspeed_engine as eng

    ds_cfg = inference_ds_config(ds_section)
    return _frozen(eng.load_scorer(path, model_cfg, ds_cfg, train=False, pad_token_id=pad_token_id), ds_cfg)


def _frozen(model, ds_cfg: dict):
    from posttrain_cli.engine import deepspeed_engine as eng

    if ds_cfg["zero_optimization"]["stage"] == 3:
        # The inference engine's module keeps ZeRO-3's gather hooks; the engine itself is not needed.
        return eng.initialize(model, ds_cfg).module.eval()
    return model.to(dist.device()).eval()


def packed_logits(module, micro: dict):
    """[kept positions, vocab] logits of one packed row, computed only at micro["positions"] (the
    positions whose next token is scored); a module or a DeepSpeed engine."""
    return module(**micro["inputs"], logits_to_keep=micro["positions"], use_cache=False).logits[0]


@contextlib.contextmanager
def eval_mode(module):
    """Dropout off for a no-grad pass over a model that may be training; its mode is restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        if was_training:
            module.train()
