"""The one place sequences are sampled: a Sampler, whatever engine runs it.

    sampler = policy_sampler(ctx, engine.module, tokenizer)           # the policy a stage trains
    sampler = frozen_sampler(ctx, model_path, tokenizer)              # a model it only samples from
    outs = sampler.generate(prompt_ids, max_new_tokens=64, temperature=1.0, top_p=1.0,
                            batch_size=32, calls=calls, logprobs=True)  # -> [Completion]
    ...                                                                 # an optimizer update
    sampler.sync(engine.module)                                         # the engine takes the new weights

grpo, ppo, distill, generate, rejection_sampling and eval all sample through this interface;
the stage's rollout section (config/schema.py) picks the engine. `hf` (rollout/hf.py) samples
the live module itself, so its `sync` has nothing to copy; `vllm` (rollout/vllm.py) holds its own
copy of the weights in an engine on each rank, loaded from the model's directory when the stage
starts and from the policy after each update (`sync`). A sampler with its own weights says so
(`own_weights`): its log-probs come from another engine than the trainer's, and the RL stages
correct for the difference (rollout/onpolicy.py). Seeding stays with the caller
(torch.manual_seed before generate), so a re-run on the same ranks samples the same tokens.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Protocol

from posttrain_cli.engine import dist
from posttrain_cli.errors import UserError

# name -> "module:class" of a Sampler; imported only when asked for.
BACKENDS = {"hf": "posttrain_cli.rollout.hf:HFSampler", "vllm": "posttrain_cli.rollout.vllm:VLLMSampler"}


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


def _cls(backend: str):
    path, name = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(path), name)


def make_sampler(module, tokenizer, *, synced: bool) -> Sampler:
    """An hf Sampler over `module` (a causal LM; under ZeRO-3 its sharded module, with `synced`)."""
    return _cls("hf")(module, tokenizer, synced=synced)


def choose(ctx, model_path: str) -> str:
    """The backend that samples `model_path` in this stage: rollout.backend, `auto` resolved to vllm
    where it is installed and runs the model (else hf, saying why once)."""
    from posttrain_cli.rollout import select

    rollout = ctx.run.get("rollout") or {"backend": "hf"}  # a stage spec written before the section existed
    backend = rollout["backend"]
    if backend == "hf":
        return "hf"
    why = None if select.vllm_installed() else "vLLM is not installed"
    if why is None:
        try:
            why = importlib.import_module("posttrain_cli.rollout.vllm").unsupported(model_path, ctx.run["model"])
        except ImportError as e:  # installed but broken (a CUDA torchvision next to the CPU torch, ...)
            why = f"import vllm failed: {e}"
    if why is None:
        return "vllm"
    if backend == "vllm":
        raise UserError(f"{ctx.where('rollout.backend')}=vllm: {why}"
                        + ("" if "installed" not in why else f"; {select.INSTALL}"))
    if ctx.name not in _SAID_HF:
        ctx.info(f"rollout.backend=auto: sampling with hf ({why})")
        _SAID_HF.add(ctx.name)
    return "hf"


_SAID_HF: set = set()  # stages that said why auto chose hf


# This process's vLLM engine: one per stage process, started by the stage's first sampler and kept
# until the process ends (an in-process engine's shutdown tears down the process group, and a
# stage's samplers all sample one architecture: its input model, the policy, its output model).
_ENGINE = None


def _vllm(ctx, model_path: str, tokenizer) -> Sampler:
    """The stage's vLLM engine holding model_path's weights (loaded from its directory when the engine
    held others), set up from the rollout section and the run's precision (fp32 on CPU, so its
    log-probs match the trainer's)."""
    global _ENGINE
    if _ENGINE is None:
        import time

        import torch

        from posttrain_cli.engine.deepspeed_engine import resolve_precision

        rollout, model = ctx.run["rollout"], ctx.run["model"]
        dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[resolve_precision(ctx.run["deepspeed"])]
        gpu = torch.cuda.is_available()
        t0 = time.perf_counter()
        _ENGINE = _cls("vllm")(
            model_path, tokenizer, dtype=dtype, seed=ctx.seed, max_model_len=max_model_len(ctx, model_path),
            kv_cache_bytes=None if gpu else int(rollout["kv_cache_gb"] * 2**30),
            gpu_memory_utilization=rollout["gpu_memory_utilization"] if gpu else None,
            tensor_parallel_size=rollout["tensor_parallel_size"], enable_sleep_mode=gpu and rollout["sleep"],
            enforce_eager=rollout["enforce_eager"], revision=model["revision"],
            trust_remote_code=model["trust_remote_code"])
        _ENGINE.holds = model_path
        ctx.info(f"sampling with vllm: an engine on each rank, started in {time.perf_counter() - t0:.0f} s "
                 f"(max_model_len {_ENGINE.max_model_len}, {dtype})")
    elif _ENGINE.holds != model_path:
        _ENGINE.load_dir(model_path)
        _ENGINE.holds = model_path
    _ENGINE.tokenizer = tokenizer
    return _ENGINE


def max_model_len(ctx, model_path: str) -> int:
    """The longest sequence the stage's engine takes: its max_seq_len (RL, generate,
    rejection_sampling), and for an eval block or the eval kind EVAL_PROMPT_TOKENS of prompt
    plus its max_new_tokens (a longer eval prompt is refused by name, stages/eval.py); at most
    the model's max_position_embeddings."""
    from transformers import AutoConfig

    cfg = ctx.cfg
    lengths = [cfg["max_seq_len"]] if "max_seq_len" in cfg else []
    ev = cfg if ctx.kind == "eval" else cfg.get("eval")
    if ev:
        lengths.append(EVAL_PROMPT_TOKENS + ev["max_new_tokens"])
    model = ctx.run["model"]
    config = AutoConfig.from_pretrained(model_path, revision=model["revision"],
                                        trust_remote_code=model["trust_remote_code"])
    most = getattr(config, "max_position_embeddings", None)
    return min(max(lengths), most) if most else max(lengths)


# The prompt an eval may hold when its engine is vLLM's (whose KV cache is sized for a longest sequence).
EVAL_PROMPT_TOKENS = 2048


def policy_sampler(ctx, module, tokenizer) -> Sampler:
    """A Sampler for the policy a stage trains (`module`, sharded under ZeRO-3), started from the
    stage's input model; `sync(module)` after each update."""
    from posttrain_cli.engine.inference import synced

    if choose(ctx, ctx.input_model) == "vllm":
        sampler = _vllm(ctx, ctx.input_model, tokenizer)
        sampler.holds = "the policy"  # from the first sync on (a resumed run syncs before sampling)
        return sampler
    return make_sampler(module, tokenizer, synced=synced(ctx.run["deepspeed"]))


def frozen_sampler(ctx, model_path: str, tokenizer) -> Sampler:
    """A Sampler for a model the stage only samples from (generate, rejection_sampling, eval): an
    engine over its directory, or (hf) the model loaded frozen and sharded like a policy."""
    from posttrain_cli.engine.inference import frozen_causal_lm, synced

    if choose(ctx, model_path) == "vllm":
        return _vllm(ctx, model_path, tokenizer)
    ds = ctx.run["deepspeed"]
    return make_sampler(frozen_causal_lm(model_path, ctx.run["model"], ds), tokenizer, synced=synced(ds))


def shard(items: list, batch_size: int) -> tuple[list, int]:
    """This rank's share of items (round-robin) and the number of generate calls every rank makes."""
    mine = items[dist.rank()::dist.world()]
    most = math.ceil(len(items) / dist.world())
    return mine, math.ceil(most / batch_size)
