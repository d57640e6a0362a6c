"""The one place sequences are sampled: a Sampler, whatever engine runs it.

    sampler = make_sampler(engine.module, tokenizer, synced=synced)     # backend "hf" (rollout/hf.py)
    outs = sampler.generate(prompt_ids, max_new_tokens=64, temperature=1.0, top_p=1.0,
                            batch_size=32, calls=calls, logprobs=True)  # -> [Completion]
    ...                                                                 # an optimizer update
    sampler.sync(engine.module)                                         # the engine takes the new weights

grpo, ppo, distill, generate, rejection_sampling and eval all sample through this interface.
Another engine (vLLM) is one new module with a Sampler class, named in BACKENDS; its `sync`
is where it loads the policy's weights after each update (the HF sampler samples the live
module itself, so its `sync` has nothing to copy). Seeding stays with the caller (torch.manual_seed before
generate), so a re-run on the same ranks samples the same tokens.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Protocol

from posttrain_cli.engine import dist

# name -> "module:class" of a Sampler; imported only when asked for.
BACKENDS = {"hf": "posttrain_cli.rollout.hf:HFSampler"}


@dataclass
class Completion:
    token_ids: list[int]  # the answer, without the EOS token
    text: str
    finish_reason: str  # "eos" | "length"
    stop_id: int | None = None  # the EOS token that ended it ("eos")
    logprobs: list[float] | None = None  # one per token of `sampled`

    @property
    def sampled(self) -> list[int]:
        """Every token the policy sampled: the answer and its EOS (what RL trains on)."""
        return self.token_ids + ([self.stop_id] if self.stop_id is not None else [])


class Sampler(Protocol):
    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 batch_size: int, calls: int | None = None, logprobs: bool = False) -> list[Completion]:
        """Complete every prompt (token ids), `batch_size` at a time. `calls` forces the number of
        batches (equal on every rank when forwards are synced); surplus batches sample a dummy
        prompt. With `logprobs`, each completion carries the log-prob of every sampled token under
        softmax(logits / temperature) (temperature 1 when greedy)."""
        ...

    def sync(self, module) -> None:
        """The policy's weights changed (an optimizer update): an engine holding its own copy
        of the weights loads them from `module` here."""
        ...


def make_sampler(module, tokenizer, *, synced: bool, backend: str = "hf") -> Sampler:
    """A Sampler over `module` (a causal LM; under ZeRO-3 its sharded module, with `synced`)."""
    path, name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(path), name)(module, tokenizer, synced=synced)


def shard(items: list, batch_size: int) -> tuple[list, int]:
    """This rank's share of items (round-robin) and the number of generate calls every rank makes."""
    mine = items[dist.rank()::dist.world()]
    most = math.ceil(len(items) / dist.world())
    return mine, math.ceil(most / batch_size)
