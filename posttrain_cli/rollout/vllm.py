"""The `vllm` sampling backend (rollout/backend.py): an in-process vLLM engine, sampling with the
semantics of rollout/hf.py and taking the policy's weights in place after each update.

    sampler = VLLMSampler(model_dir, tokenizer)          # an engine over a Hugging Face directory
    torch.manual_seed(seed)                              # seeds every request (as for the hf backend)
    outs = sampler.generate(prompt_ids, max_new_tokens=64, temperature=1.0, top_p=1.0,
                            batch_size=32, logprobs=True)   # -> [Completion], as hf.generate
    sampler.sleep()                                      # GPU: free the engine's memory for the update
    ...                                                  # an optimizer update
    sampler.sync(engine.module)                          # every rank: the new weights, a layer at a time
    sampler.wake_up()

What is the same as hf.py: the stop set (every EOS id and the template's end of turn, data/chat.py
stop_ids; the stop token is the completion's `stop_id`, not in its text), no top-k, top_p
nucleus, greedy at temperature 0, rows past the tokenizer never sampled, and log-probs of
softmax(logits / temperature) of every sampled token (vLLM's logprobs_mode "processed_logprobs";
temperature 1 when greedy). Where it departs:

- With top_p < 1 vLLM's log-probs are those of the renormalised nucleus (its sampler computes them
  after the top-p mask), hf.py's those of the whole distribution; at top_p = 1 the two are equal.
- `batch_size` and `calls` are not used: the engine schedules its own batches, and each rank's
  engine runs alone (no ZeRO-3 gather to keep in step), so no dummy calls are needed.
- Seeds: each request gets its own seed, drawn from torch's global generator, so the caller's
  torch.manual_seed fixes the samples, whatever else shares the engine's batch.

Under torchrun (the default process group already up, as DeepSpeed left it) every rank holds its own
engine next to its DeepSpeed engine, with vLLM's "external_launcher" executor: vLLM takes the job's
process group as its world instead of starting one, and splits it into groups of
`tensor_parallel_size` ranks. Each group is one engine (one rank on CPU): the groups sample apart,
each its own prompts (data parallel, as hf.py's ranks do); within a group the ranks pool their
prompts, run them together and keep their own completions. The engine's start is collective (every
rank builds its sampler at the same point), generate is collective within a group only.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): weights reach it without a
copy through a pipe, through vLLM's own in-place reload (`reload_weights` on the worker, which
re-runs the post-load processing: on CPU the linear layers keep only a repacked copy of their
weights, so writing into the parameters alone would change nothing). The prefix cache is dropped
after every load, since its KV blocks were computed by the old weights.

vllm is imported only when a sampler is built (no heavy import at CLI start-up).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from posttrain_cli.data import chat
from posttrain_cli.rollout.backend import Completion

# KV cache when none is asked for: enough for thousands of tiny-model sequences, small next to a
# trainer's memory (on CPU vLLM would otherwise claim most of the machine's RAM).
DEFAULT_KV_CACHE_BYTES = 1 << 30


def unsupported(model_dir: str, model_cfg: dict | None = None) -> str | None:
    """Why the installed vLLM cannot sample this model here (None: it can): for rollout.backend=auto,
    which then samples with hf instead, and for a clear error with backend=vllm."""
    from transformers import AutoConfig

    model_cfg = model_cfg or {}
    config = AutoConfig.from_pretrained(model_dir, revision=model_cfg.get("revision"),
                                        trust_remote_code=model_cfg.get("trust_remote_code", False))
    try:
        _check_head_size(config, model_dir)
    except ValueError as e:
        return str(e)
    return None


class VLLMSampler:
    """rollout/backend.Sampler on a vLLM engine built from a Hugging Face model directory.

    `dtype`: "auto" takes the checkpoint's; "float32" when log-probs must match an fp32 trainer to
    1e-4. `kv_cache_bytes`: the engine's KV cache (on GPUs `gpu_memory_utilization` instead).
    `enforce_eager`: skip torch.compile (a faster start, slower decoding). `tensor_parallel_size`:
    ranks of a torchrun job that share one engine (it must divide the job's world size).
    `enable_sleep_mode`: sleep() frees the engine's GPU memory while the trainer updates (GPUs only;
    on CPU vLLM has no sleep mode and sleep / wake_up do nothing). `engine_args`: passed to vllm.LLM
    as they are."""

    def __init__(self, model_dir: str | Path, tokenizer, *, dtype: str = "auto", seed: int = 0,
                 max_model_len: int | None = None, kv_cache_bytes: int | None = DEFAULT_KV_CACHE_BYTES,
                 gpu_memory_utilization: float | None = None, enforce_eager: bool = False,
                 tensor_parallel_size: int = 1, enable_sleep_mode: bool = False, **engine_args):
        # In-process engine core: load_weights hands tensors to the worker directly.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM
        from vllm.platforms import current_platform

        model_dir = str(model_dir)
        self.tokenizer = tokenizer
        try:
            generation_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:  # no generation_config.json
            generation_eos = None
        self.stops = chat.stop_ids(tokenizer, generation_eos)
        config = AutoConfig.from_pretrained(model_dir)
        _check_head_size(config, model_dir)
        # Checkpoints pad their embeddings past the tokenizer (Qwen): those rows are no token, and an
        # engine-wide logits processor masks them. (Not SamplingParams.allowed_token_ids: vLLM copies
        # that list of every token id into each request, ~50 ms a request at Qwen's 151k.)
        if config.vocab_size > len(tokenizer):
            engine_args["logits_processors"] = [*(engine_args.get("logits_processors") or []),
                                                _no_rows_from(len(tokenizer))]
        if gpu_memory_utilization is not None:
            engine_args["gpu_memory_utilization"] = gpu_memory_utilization
        elif kv_cache_bytes is not None:
            engine_args["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        if _joins_process_group(tensor_parallel_size):
            engine_args["distributed_executor_backend"] = "external_launcher"
        if current_platform.is_cpu():
            # A prompt prefilled in chunks rewinds its seeded generator between chunks, which a CPU
            # generator cannot do ("CPU Generator does not use offset"): whole prompts only, and
            # room in a step for the longest one.
            longest = max_model_len or getattr(config, "max_position_embeddings", None) or 0
            engine_args.setdefault("enable_chunked_prefill", False)
            engine_args.setdefault("max_num_batched_tokens", max(longest, 8192))
            # KV blocks of 32 tokens, not the CPU default of 128: the prefix cache shares whole blocks
            # only, so a GRPO group's copies of one prompt share all of it but its last block. Measured
            # (2026-12-05, 64 prompts of ~190 tokens x 16 copies): prefill 16.1 s -> 5.6 s, decoding
            # as fast. (GPUs use 16 already.)
            engine_args.setdefault("block_size", 32)
        self.sleep_mode = enable_sleep_mode and current_platform.is_sleep_mode_available()
        if self.sleep_mode:
            engine_args["enable_sleep_mode"] = True
        # skip_tokenizer_init: prompts arrive as ids and completions are decoded here with the
        # run's tokenizer (its chat template and special tokens), as hf.py decodes them.
        _quiet_expected_warnings()
        with _rng_kept():  # an in-process engine seeds the global generators; the caller's stay as they were
            self.llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype=dtype, seed=seed,
                           max_model_len=max_model_len, enforce_eager=enforce_eager,
                           tensor_parallel_size=tensor_parallel_size, logprobs_mode="processed_logprobs",
                           enable_prefix_caching=True, **engine_args)
        self.group = None  # the ranks sharing this engine, when more than one
        if tensor_parallel_size > 1:
            from vllm.distributed.parallel_state import get_tp_group

            self.group = get_tp_group().cpu_group
        self.syncs = 0  # weight loads so far (a metric for the trainer)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len  # prompt + completion
        self.largest_bucket_bytes = 0  # the most parameter bytes a sync has held gathered at once
        self.asleep: set[str] = set()  # what sleep() freed that no wake_up has brought back
        self.weights_lost = False  # sleep() discarded the weights and no sync has loaded them since

    # The engine holds its own copy of the weights (rollout/backend.py).
    own_weights = True

    def generate(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
                 batch_size: int | None = None, calls: int | None = None,
                 logprobs: bool = False) -> list[Completion]:
        """backend.Sampler.generate. With tensor_parallel_size > 1 every rank of the group calls it
        together (the group runs every member's prompts as one batch)."""
        from vllm import SamplingParams

        if self.weights_lost:
            raise RuntimeError("VLLMSampler.generate after sleep() without a sync: sleep discards the engine's "
                               "weights; call sync(module) before sampling again")
        self.wake_up()
        sample = temperature > 0
        # One seed per request from torch's generator: the caller's manual_seed decides the samples.
        seeds = (torch.randint(0, 2**31 - 1, (len(prompts),)).tolist() if sample and prompts
                 else [None] * len(prompts))
        requests, mine = list(zip(prompts, seeds)), slice(0, len(prompts))
        if self.group is not None:
            requests, mine = _pool(requests, self.group)
        if not requests:
            return []
        params = [SamplingParams(n=1, temperature=temperature if sample else 0.0, top_p=top_p if sample else 1.0,
                                 top_k=0, max_tokens=max_new_tokens, stop_token_ids=self.stops, seed=s,
                                 logprobs=0 if logprobs else None, detokenize=False)
                  for _, s in requests]
        results = self.llm.generate([{"prompt_token_ids": list(p)} for p, _ in requests], params, use_tqdm=False)
        return [self._completion(r.outputs[0], logprobs) for r in results[mine]]

    def _completion(self, out, logprobs: bool) -> Completion:
        new = list(out.token_ids)
        end = next((i for i, t in enumerate(new) if t in self.stops), None)
        if end is not None:
            reason, stop, n = "eos", new[end], end + 1
            new = new[:end]
        else:
            reason, stop, n = "length", None, len(new)
        lps = None
        if logprobs:
            sampled = new + ([stop] if stop is not None else [])
            lps = [float(step[t].logprob) for step, t in zip(out.logprobs[:n], sampled)]
        return Completion(new, self.tokenizer.decode(new, skip_special_tokens=True), reason, stop, lps)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (name, tensor) pairs in Hugging Face checkpoint names (model.layers.0.self_attn.q_proj
        .weight, ...) into the engine in place; vLLM's loader fuses q/k/v and gate/up itself and
        skips lm_head when the embeddings are tied.

        A part of the weights may come at a time, in whole modules: vLLM keeps q, k and v in one
        fused weight (gate and up likewise), and a load with only some of them leaves the rest of
        that weight unset, so such a part is refused. Modules left out keep their weights (vLLM
        warns that it "failed to load" each)."""
        pairs = list(named_tensors)
        _check_fused_whole([name for name, _ in pairs])
        self._reload(iter(pairs))

    def load_dir(self, model_dir: str | Path) -> None:
        """The weights of another checkpoint of the same model (its *.safetensors), a file at a time."""
        from safetensors import safe_open

        files = sorted(Path(model_dir).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{model_dir}: no *.safetensors weights to load into the vLLM engine")
        pairs = []
        for f in files:
            with safe_open(str(f), "pt") as st:
                pairs += [(k, st.get_tensor(k)) for k in st.keys()]
        self.load_weights(pairs)

    def sync(self, module) -> None:
        """backend.Sampler.sync: the weights of `module` (a Hugging Face causal LM as the trainer holds
        it: whole on this rank, or ZeRO-3 partitioned) into the engine. Every rank calls it.

        The parameters go in buckets, one decoder layer (or one other parameter: the embeddings, the
        final norm, an untied lm_head) at a time: under ZeRO-3 each is gathered (every rank takes
        part, in the same order), handed to vLLM and released before the next is gathered. vLLM
        keeps a tensor only until its own layer is whole, except an embedding padded past the
        vocabulary (to a multiple of 64: tiny models, not Llama's or Qwen's), which it keeps to the end
        of the load. Buffers (the rotary inv_freq) are computed, not loaded.

        A LoRA model (peft, engine/lora.py) goes merged, a layer at a time: the engine always holds
        base + adapter, never the base alone."""
        from posttrain_cli.engine import lora

        merge = module.peft_config[lora.ADAPTER] if lora.is_peft(module) else None
        buckets: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
        for name, param in module.named_parameters():
            buckets.setdefault(_bucket(name), []).append((name, param))
        for bucket in buckets.values():
            _check_fused_whole([name for name, _ in bucket])
        with torch.no_grad():
            self._reload(self._gathered(list(buckets.values()), merge))
        self.weights_lost = False

    def _gathered(self, buckets: list[list[tuple[str, torch.nn.Parameter]]],
                  merge=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Every bucket's (name, whole tensor), the next gathered only when vLLM asks for it (its
        loader reads the weights one at a time and finishes a layer as soon as it has all of it).
        merge: a LoRA adapter's config: each bucket goes merged, in the plain model's names."""
        from posttrain_cli.engine import lora

        sharded = any(hasattr(param, "ds_id") for bucket in buckets for _, param in bucket)
        for bucket in buckets:
            params = [param for _, param in bucket]
            with _zero3_gathered(params) if sharded else contextlib.nullcontext():
                self.largest_bucket_bytes = max(self.largest_bucket_bytes,
                                                sum(p.numel() * p.element_size() for p in params))
                # A QLoRA base goes dequantized: vLLM loads base + adapter in the plain model's dtype.
                pairs = [(name, lora.plain_weight(param)) for name, param in bucket]
                if merge is not None:
                    pairs = list(lora.merged_state(dict(pairs), merge).items())
                yield from pairs

    def _reload(self, named_tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        if "weights" in self.asleep:  # the weights' memory must be mapped again before it is written
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named_tensors,
                                                          "is_checkpoint_format": True})
        self.llm.collective_rpc(_repack_tied)
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM kept its prefix cache after a weight load (requests still running)")
        self.syncs += 1

    def sleep(self) -> None:
        """Free the engine's GPU memory, weights and KV cache (vLLM's sleep level 2), while the
        trainer updates; the sync after the update loads the weights back. A no-op without
        enable_sleep_mode, and on CPU."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = {"weights", "kv_cache"}
            self.weights_lost = True

    def wake_up(self) -> None:
        """Take back what sleep() freed (generate does it too). The weights are those of the last sync
        only if one came after the sleep."""
        if self.asleep:
            self.llm.wake_up(tags=sorted(self.asleep))
            self.asleep = set()


# Hugging Face projections vLLM fuses into one weight: a load must bring all of a group or none.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _check_fused_whole(names: list[str]) -> None:
    have = set(names)
    for name in names:
        module, _, leaf = name.rpartition(".")
        parent, _, proj = module.rpartition(".")
        for group in FUSED:
            if proj in group:
                missing = [f"{parent}.{p}.{leaf}" for p in group if f"{parent}.{p}.{leaf}" not in have]
                if missing:
                    raise ValueError(f"load_weights: {name} without {', '.join(missing)} (vLLM fuses them into "
                                     f"one weight; load them together)")


def _repack_tied(worker) -> None:
    """Tied embeddings: vLLM's lm_head shares the embedding's weight but, on CPU, multiplies with its
    own packed copy of it, made when the engine loaded. A reload brings no lm_head weight (the
    checkpoint has none), so that copy stays the old one; pack it again from the new weight."""
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    holders: dict[int, list] = {}
    for module in worker.get_model().modules():
        weight = module._parameters.get("weight")
        if weight is not None and isinstance(getattr(module, "quant_method", None), UnquantizedEmbeddingMethod):
            holders.setdefault(id(weight), []).append(module)
    for modules in holders.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)


def _no_rows_from(first: int):
    """A vLLM logits processor (class) that gives every row from `first` on -inf logits, for every
    request of the engine: the embedding's rows past the tokenizer are never sampled and carry no
    probability, as hf.py's _no_padding_rows does. It runs before the temperature and the sampler,
    so the recorded log-probs are over the tokenizer's rows only, on both backends."""
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class NoPaddingRows(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            pass

        def is_argmax_invariant(self) -> bool:
            return False  # greedy decoding must not pick such a row either

        def update_state(self, batch_update) -> None:
            pass

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            logits[:, first:] = float("-inf")
            return logits

    NoPaddingRows.__qualname__ = NoPaddingRows.__name__ = f"NoPaddingRowsFrom{first}"
    return NoPaddingRows


def _bucket(name: str) -> str:
    """A parameter's sync bucket: its decoder layer (the name up to the first index, model.layers.3),
    or itself outside the layers."""
    layer = re.match(r"(.*?\.\d+)\.", name)
    return layer.group(1) if layer else name


@contextlib.contextmanager
def _zero3_gathered(params: list):
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _joins_process_group(tensor_parallel_size: int) -> bool:
    """Whether the engine runs as a rank of the job's process group ("external_launcher"); checks
    tensor_parallel_size against the world and gives vLLM the variables it reads."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size {tensor_parallel_size}: an engine over several ranks runs only "
                             f"in a torchrun job (its ranks share the engine); use 1 in one process")
        return False
    world = dist.get_world_size()
    if world % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} does not divide the job's {world} ranks")
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device() if torch.cuda.is_available() else 0))
    return True


def _pool(requests: list, group) -> tuple[list, slice]:
    """Every rank's requests of a tensor-parallel group, in rank order (the same list on each, as its
    engines must run the same batch), and where this rank's lie in it."""
    import torch.distributed as dist

    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, requests, group=group)
    start = sum(len(part) for part in parts[:dist.get_rank(group)])
    return [r for part in parts for r in part], slice(start, start + len(requests))


def _check_head_size(config, model_dir: str) -> None:
    """vLLM's CPU attention runs only some head sizes (32, 64, 80, 96, 128, ...) and says so only at
    the first forward, after the engine's start: refuse the others here, in one line."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    size = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if size not in sizes:
        raise ValueError(f"{model_dir}: attention head size {size} (hidden_size / num_attention_heads) is not one "
                         f"vLLM's CPU attention runs ({', '.join(map(str, sizes))}); use the hf backend for this model")


@contextlib.contextmanager
def _rng_kept():
    """Python's, numpy's and torch's global random states as they were before the block."""
    import numpy as np

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


# Warnings vLLM gives every time it is run this way, about nothing wrong, by logger: the chat-template
# warm-up fails and no EOS id is known without a tokenizer (skip_tokenizer_init: prompts come as ids,
# stops are ours); a weight load finds no checkpoint weights for the rotary embedding (its cache is
# computed, not loaded) nor for a tied lm_head (it is the embedding; _repack_tied), and each weight
# it casts to the engine's dtype, the run's precision (an fp32 checkpoint or trainer under CPU
# autocast into a bf16 engine: one line per weight at every start and every sync); on CPU, chunked
# prefill is off on purpose (see __init__), the global seed it sets is put back (_rng_kept), the
# trainer has set the thread count, and Triton (not in the CPU build) is missed. What a user can act
# on (tcmalloc and libiomp in LD_PRELOAD: README) is still said.
EXPECTED = {
    "vllm.renderers.base": ("Chat template warmup failed", "Using None for EOS token id because tokenizer is not"),
    "vllm.model_executor.model_loader.reload.layerwise": ("RotaryEmbedding: Failed to load weights",
                                                          "ParallelLMHead: Failed to load weights"),
    "vllm.model_executor.models.utils": ("Attempted to load weight",),
    "vllm.engine.arg_utils": ("This model does not officially support disabling chunked prefill",
                              "The global random seed is set to"),
    "vllm.v1.worker.cpu_worker": ("CPU backend doesn't allow to use `torch.set_num_threads`",),
    "vllm.utils.torch_utils": ("OMP_NUM_THREADS=",),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type"),
    "vllm.config.vllm": ("Model Runner V2 requires Triton",),
}


class _Expected(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def _quiet_expected_warnings() -> None:
    for name, starts in EXPECTED.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _Expected) for f in log.filters):
            log.addFilter(_Expected(starts))
