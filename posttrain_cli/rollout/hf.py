"""The `hf` sampling backend (rollout/backend.py): batched Hugging Face generation with left
padding, KV cache, stop at EOS, and the log-prob of every sampled token under the sampling
distribution.

Under ZeRO-3 with several ranks every rank must take part in every forward
(parameters are gathered collectively), so generate runs with synced_gpus and
each rank makes the same number of calls.

Log-probs are those of softmax(logits / temperature) (temperature 1 when greedy),
the distribution a policy-gradient ratio compares against; top_p truncation is
not reflected (as in TRL and verl). A logits processor records them one step at
a time, so memory stays at one [batch, vocab] slice, not the whole generation.
"""

from __future__ import annotations

import math

import torch

from posttrain_cli.data import chat
from posttrain_cli.engine import regional_compile
from posttrain_cli.engine.inference import eval_mode, pad_id
from posttrain_cli.rollout.backend import Completion


class HFSampler:
    """rollout/backend.Sampler on Hugging Face generate over the live module: `sync` has nothing
    to do, the next generate already sees the updated weights."""

    def __init__(self, module, tokenizer, *, synced: bool):
        self.module, self.tokenizer, self.synced = module, tokenizer, synced

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 batch_size: int, calls: int | None = None, logprobs: bool = False) -> list[Completion]:
        return generate(self.module, self.tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        temperature=temperature, top_p=top_p, synced=self.synced, calls=calls, logprobs=logprobs)

    def sync(self, module) -> None:
        self.module = module


class _LogpRecorder:
    """A logits processor: at step t it sees the raw logits of step t and the token sampled at
    t - 1, so it keeps one step's log-softmax and gathers the sampled token's entry a step later."""

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, tokens[:, None].to(self.prev.device)).squeeze(1).cpu())
            self.prev = None

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """[batch, generated steps] log-probs."""
        self._take(last_tokens)
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(last_tokens.shape[0], 0)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
             temperature: float = 0.0, top_p: float = 1.0, synced: bool = False,
             calls: int | None = None, logprobs: bool = False) -> list[Completion]:
    """Complete every prompt (token ids). `calls` forces the number of generate calls
    (ZeRO-3: equal on every rank); surplus calls run on a dummy prompt. With `logprobs`,
    each completion carries the sampling log-prob of every sampled token."""
    from transformers import LogitsProcessorList

    pad = pad_id(tokenizer)
    stops = stop_ids(model, tokenizer)
    eos_id = stops[0]
    dev = next(model.parameters()).device
    n_calls = calls if calls is not None else math.ceil(len(prompts) / batch_size)
    out: list[Completion] = []
    # Eager even when the stage compiled the layers (deepspeed.compile): each decode step has its own
    # cache length.
    with eval_mode(model), regional_compile.eager():
        for c in range(n_calls):
            chunk = prompts[c * batch_size:(c + 1) * batch_size]
            real = len(chunk)
            if not chunk:
                chunk = [prompts[0] if prompts else [eos_id]]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):
                ids[r, width - len(p):] = torch.tensor(p)
                attn[r, width - len(p):] = 1
            sample = temperature > 0
            recorder = _LogpRecorder(temperature) if logprobs else None
            processors = [p for p in (_no_padding_rows(model, tokenizer), recorder) if p is not None]
            gen = model.generate(
                input_ids=ids.to(dev), attention_mask=attn.to(dev), max_new_tokens=max_new_tokens,
                do_sample=sample, temperature=temperature if sample else None,
                top_p=top_p if sample else None, top_k=None if not sample else 0,
                pad_token_id=pad, eos_token_id=stops, synced_gpus=synced,
                logits_processor=LogitsProcessorList(processors) if processors else None,
            )
            lp = recorder.finish(gen[:, -1]) if recorder else None
            for r in range(real):
                new = gen[r, width:].tolist()
                end = next((i for i, t in enumerate(new) if t in stops), None)
                if end is not None:
                    reason, stop, n = "eos", new[end], end + 1
                    new = new[:end]
                else:
                    # Without EOS no padding follows, so every token was sampled.
                    reason, stop, n = "length", None, len(new)
                out.append(Completion(new, tokenizer.decode(new, skip_special_tokens=True), reason, stop,
                                      lp[r, :n].tolist() if lp is not None else None))
    return out


def _no_padding_rows(model, tokenizer):
    """Checkpoints pad their embeddings past the tokenizer (Qwen: 151936 rows for 151669 tokens):
    those rows are no token, so they are never sampled (None when there are none)."""
    rows = getattr(getattr(model, "config", None), "vocab_size", None)
    n = len(tokenizer)
    if rows is None or rows <= n:
        return None

    def processor(input_ids, scores):
        scores[:, n:] = float("-inf")
        return scores

    return processor


def stop_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion: the template's end of turn (Llama 3: <|eot_id|>, ChatML:
    <|im_end|>), the tokenizer's EOS and the model's generation_config eos_token_id."""
    return chat.stop_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
