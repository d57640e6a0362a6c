"""A reward model as a scorer: a `reward_model` stage's output (or any one-label
AutoModelForSequenceClassification directory) scoring prompt + answer pairs.

    scorer = RewardScorer(path, model_cfg, ds_section)             # the run's `deepspeed` section
    scorer.score(prompts=[messages, ...], answers=["...", ...])    # -> [float]

A sequence's reward is the scalar head read at its last token (the end-of-turn
token of the answer), the same way the reward_model stage trains it. Sequences
are packed into one row per forward, so no padding token is involved; the
saved config carries `pad_token_id`, so the model's own padded forward
(`AutoModelForSequenceClassification(...)(input_ids, attention_mask)`) pools
the same token when the pad token differs from the end-of-turn token.
"""

from __future__ import annotations

import torch

from posttrain_cli.data.chat import tokenize_response


def _unwrap(model):
    return getattr(model, "module", model)


def scalar_scores(model, micro: dict) -> torch.Tensor:
    """One forward of a packed row (data/preference.py: pack_answers) -> [S] rewards, one per sequence.

    The forward goes through the model's (or DeepSpeed engine's) own __call__, so ZeRO-3's hooks
    run as usual; the head's per-position output is read with a hook and taken at each sequence's end."""
    head = getattr(_unwrap(model), "score", None)
    if head is None:
        raise TypeError(f"{type(_unwrap(model)).__name__} has no `score` head; posttrain's reward models use "
                        f"AutoModelForSequenceClassification classes that name it `score`")
    captured = {}

    def grab(_module, _inputs, output):
        captured["out"] = output

    handle = head.register_forward_hook(grab)
    try:
        model(**micro["inputs"], use_cache=False)
    finally:
        handle.remove()
    return captured["out"][0, micro["ends"], 0].float()


class RewardScorer:
    """Load a reward model for inference (sharded under ZeRO-3) and score answers."""

    def __init__(self, path: str, model_cfg: dict, ds_section: dict, batch_size: int = 32):
        from posttrain_cli.engine import deepspeed_engine as eng
        from posttrain_cli.engine.inference import frozen_scorer, load_tokenizer, pad_id

        self.tokenizer = load_tokenizer(path, model_cfg)
        self.module = frozen_scorer(path, model_cfg, ds_section, pad_id(self.tokenizer))
        self.boundaries = eng.packed_boundaries(eng.attn_implementation(model_cfg))
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], answers: list[str], calls: int | None = None) -> list[float]:
        """Rewards of prompt + answer; `calls` forces the number of forwards (ZeRO-3: equal on every rank)."""
        import math

        from posttrain_cli.data.preference import pack_answers

        seqs = [tokenize_response(self.tokenizer, p, {"role": "assistant", "content": a})
                for p, a in zip(prompts, answers)]
        seqs = [(t.input_ids, t.loss_mask) for t in seqs]
        n_calls = calls if calls is not None else math.ceil(len(seqs) / self.batch_size)
        out: list[float] = []
        param = next(self.module.parameters())
        dev, dtype = param.device, param.dtype
        for c in range(n_calls):
            chunk = seqs[c * self.batch_size:(c + 1) * self.batch_size]
            real = len(chunk)
            if not chunk:  # this rank has run out; it still joins the collective forward
                chunk = [tokenize_response(self.tokenizer, [{"role": "user", "content": "x"}],
                                           {"role": "assistant", "content": "x"})]
                chunk = [(chunk[0].input_ids, chunk[0].loss_mask)]
            micro = pack_answers(chunk, self.boundaries, dtype, dev)
            out.extend(scalar_scores(self.module, micro)[:real].tolist())
        return out
