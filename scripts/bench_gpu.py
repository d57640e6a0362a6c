"""GPU training throughput and MFU of posttrain itself: SFT, and GRPO steps with vLLM, on a random ~1B Llama.

    python scripts/bench_gpu.py                  # 1 GPU: 20 SFT steps of 8 x 4096-token rows, then GRPO + vLLM
    python scripts/bench_gpu.py --gpus 8         # cluster.nproc_per_node=8; figures are per GPU
    python scripts/bench_gpu.py --only sft       # (or grpo) one part
    python scripts/bench_gpu.py --quick          # smoke run on CPU or GPU: tiny sizes, 3 steps (~30 s on 2 cores)
    python scripts/bench_gpu.py --only sft --kernels torch,liger   # SFT on both deepspeed.kernels, and the ratio

Both parts are the real CLI, ``posttrain run recipe=<generated yaml> run_dir=...`` in a fresh process,
as scripts/bench_sft.py runs it; the figures come from the stage's own metrics.jsonl (per-step token
counts and times). Nothing is downloaded.

* Model: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads of 64, intermediate
  8192, tied embeddings, llama3 RoPE), random weights (seeded), written once to a temp directory in
  bf16 (fp32 on CPU) with Llama 3's real tokenizer (128,256 tokens: tests/fixtures/tokenizers, no
  download) and posttrain's llama3 chat template; 1.24B parameters, 0.97B outside the embedding. The
  real vocabulary matters here: the head is 128,256 x 2048, about a sixth of the model's FLOPs per
  loss token. (The tiny world's character tokenizer has 107 tokens and would make the head free.)
* Engine: posttrain's defaults on GPUs: bf16, DeepSpeed ZeRO-2, flash-attention 2 when installed
  (``model.attn_implementation: null`` picks it; else posttrain's varlen SDPA), packing on; no
  activation checkpointing (--activation-checkpointing: for 24 GB cards).
* SFT data: synthetic chats written as JSONL to the temp directory: one user turn (a quarter of the
  tokens) and one assistant turn, benchlib.text's word-like text, each conversation just under
  --seq-len / --docs-per-row tokens; a micro-batch is --docs-per-row conversations packed into one
  padding-free row of ~--seq-len tokens (default: one 4096-token conversation a row, attention over
  all of it). --rows-per-gpu rows per GPU per optimizer step (micro 1 row x accumulation), --steps
  steps, every conversation used once. AdamW lr 1e-5 constant, grad clip 1.0.
* GRPO (only where vLLM is installed; else one line says it is skipped): the same model, one
  ``grpo`` stage with ``rollout.backend: vllm`` (an in-process engine next to DeepSpeed's, sleeping
  while the trainer updates, weights synced after every update), --grpo-prompts prompts per GPU x
  --grpo-generations completions, up to --grpo-new-tokens new tokens (an untrained 128k-way
  distribution almost never samples EOS, so nearly every completion runs the full length), one update
  a step, beta 0, the ``number`` verifier (rewards are all 0: forward, backward and the optimizer step
  still all run). --grpo-steps steps; the first is warm-up.

Timed: the steps after --skip warm-up steps (SFT) or after the first (GRPO), each from its start to
its end on the stage loop's clock (metrics.jsonl tokens / tokens_per_s); model loading, tokenization,
vLLM's start and the final save are left out. tokens/s/GPU = the steps' tokens (all ranks, padding
never counted: there is none) / their seconds / GPUs.

MFU = model FLOPs per second per GPU / the GPU's peak dense bf16 FLOP/s. Model FLOPs per trained token
follow PaLM (Chowdhery et al. 2022, appendix B) as torchtitan and Megatron count them:

    6 x N + 6 x h x V x (loss tokens / tokens) + 12 x L x h x T

with N the parameters outside the embedding and the head (attention, MLP, norms), h the hidden
size, V the vocabulary (the head: posttrain computes logits only where a token carries loss, so the
head counts at those tokens only), L the layers and T the length of the sequence a token attends
over (each packed conversation's own length: T = sum(len^2) / sum(len)). The attention term counts the
full T x T scores like PaLM (no halving for the causal mask); activation recomputation is not counted
(MFU, not hardware FLOPs utilisation). A rollout's tokens are forward passes: a third of each term
(2N, 2hV at each sampled token, 4LhT). The GRPO step's MFU counts rollout + update over the whole
step; the update's alone is printed too.

Peak FLOP/s: PEAK_BF16 below, keyed by torch.cuda.get_device_name() (datasheet dense figures, i.e. half
the "with sparsity" ones; --peak-tflops overrides); an unknown device prints MFU n/a and says why. On
CPU (--quick) the peak is this CPU's own fp32 (or bf16) matmul rate, measured here: a reachable rate,
not a datasheet one. Reference: torchtitan's 1D FSDP Llama 3.1 8B, bf16, 8 H100 (docs/performance.md,
arXiv:2410.06511) reaches 33-39% MFU with this accounting.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO, posttrain_run, stage_results, text, write_recipe

sys.path.insert(0, str(REPO))

# Llama-3.2-1B's shape (its config.json) and the --quick one (head size 32: vLLM's CPU attention runs
# no smaller); both with Llama 3's 128,256-token vocabulary and llama3 RoPE scaling.
ARCH = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8)
QUICK_ARCH = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# Peak dense bf16 tensor FLOP/s per device (TFLOP/s), first match wins (so "H100 NVL" before "H100").
# Datasheets quote "with sparsity" figures for Hopper/Ada/Blackwell; dense is half of those.
PEAK_BF16 = [
    (r"GB200", 2500.0, "NVIDIA GB200 NVL72 datasheet: 360 PFLOP/s sparse for 72 GPUs"),
    (r"\bB200", 2250.0, "NVIDIA HGX B200 datasheet: 4.5 PFLOP/s sparse per GPU"),
    (r"GH200", 989.0, "NVIDIA GH200 datasheet: 1,979 sparse (an H100 SXM GPU)"),
    (r"H200 NVL", 835.0, "NVIDIA H200 datasheet, NVL: 1,671 sparse"),
    (r"H200", 989.0, "NVIDIA H200 datasheet, SXM: 1,979 sparse"),
    (r"H100 NVL", 835.0, "NVIDIA H100 datasheet, NVL: 1,671 sparse"),
    (r"H100 PCIe", 756.0, "NVIDIA H100 datasheet, PCIe: 1,513 sparse"),
    (r"H100", 989.0, "NVIDIA H100 datasheet, SXM: 1,979 sparse"),
    (r"H800 PCIe", 756.0, "NVIDIA H800 PCIe: the H100 PCIe's tensor cores"),
    (r"H800", 989.0, "NVIDIA H800 SXM: the H100 SXM's tensor cores"),
    (r"\bH20\b", 148.0, "NVIDIA H20 datasheet: 148 dense"),
    (r"A100|A800", 312.0, "NVIDIA A100 datasheet (40 and 80 GB, SXM and PCIe): 312 dense"),
    (r"L40S", 362.0, "NVIDIA L40S datasheet: 362.05 dense, 733 sparse"),
    (r"\bL40\b", 181.0, "NVIDIA L40 datasheet: 181.05 dense, 362.1 sparse"),
    (r"\bL4\b", 121.0, "NVIDIA L4 datasheet: 121 dense, 242 sparse"),
    (r"\bA10\b", 125.0, "NVIDIA A10 datasheet: 125 dense, 250 sparse"),
    (r"\bA40\b", 149.7, "NVIDIA A40 datasheet: 149.7 dense, 299.4 sparse"),
    (r"\bA30\b", 165.0, "NVIDIA A30 datasheet: 165 dense, 330 sparse"),
    (r"MI300X|MI325X", 1307.4, "AMD Instinct MI300X / MI325X datasheets: 1,307.4 dense, 2,614.9 sparse"),
    (r"MI250X", 191.5, "AMD Instinct MI250X datasheet: 383 per module, 191.5 per GCD (one device each)"),
]
REFERENCE = ("reference: torchtitan, Llama 3.1 8B, bf16, 1D FSDP on 8 H100 (docs/performance.md, "
             "arXiv:2410.06511): 33-39% MFU, same accounting")


# --------------------------------------------------------------------------- peak FLOP/s

def device_peak(name: str) -> tuple[float, str] | None:
    """(peak dense bf16 FLOP/s, its source) of a CUDA/ROCm device name; None when not in PEAK_BF16."""
    for pattern, tflops, source in PEAK_BF16:
        if re.search(pattern, name, re.IGNORECASE):
            return tflops * 1e12, source
    return None


def cpu_matmul_peak(dtype, n: int = 1024, repeats: int = 5) -> float:
    """The best FLOP/s of an n x n x n matmul over `repeats` (after one warm-up) with torch's threads."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def gpu_info() -> dict:
    """The GPUs' name and count and the attention posttrain picks there, asked in a child process:
    CUDA initialised in this one would hold memory on GPU 0 while the stages run."""
    code = ("import json, torch; from posttrain_cli.engine.deepspeed_engine import attn_implementation; "
            "print(json.dumps({'name': torch.cuda.get_device_name(0), 'count': torch.cuda.device_count(), "
            "'attn': attn_implementation({})}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"could not query the GPUs:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- model FLOPs

def body_params(c: dict) -> int:
    """N: the parameters outside the embedding and the head (q, k, v, o, the MLP, the norms)."""
    h, layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) + h


def model_flops(c: dict, tokens: float, head_tokens: float, sum_len_sq: float, passes: int = 3) -> float:
    """PaLM's model FLOPs (module docstring) for `tokens` tokens of which `head_tokens` go through the
    head, in sequences whose squared lengths sum to sum_len_sq; passes 3 = forward + backward, 1 = forward."""
    h, v, layers = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    return passes * (2 * body_params(c) * tokens + 2 * h * v * head_tokens + 4 * layers * h * sum_len_sq)


# --------------------------------------------------------------------------- model and data

def build_model(out: Path, arch: dict, dtype_name: str) -> dict:
    """The random Llama and Llama 3's tokenizer with posttrain's llama3 template, as a HF directory;
    -> its config as a dict. Built on the CPU: memory this process took on a GPU would stay taken."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain_cli.data.chat import template_text
    from tests.fixtures.real import tokenizer

    tok = tokenizer("llama3", template_text("llama3"))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    config = LlamaConfig(**arch, vocab_size=len(tok), max_position_embeddings=131072, tie_word_embeddings=True,
                         rope_parameters=ROPE, bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, eot],
                         initializer_range=0.02)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.to(getattr(torch, dtype_name)).save_pretrained(out)
    tok.save_pretrained(out)
    del model
    return {**arch, "vocab_size": len(tok)}


def chat_rows(tok, n: int, length: int, rng: random.Random) -> tuple[list[dict], list[tuple[int, int]]]:
    """n two-turn chats of just under `length` tokens each (a quarter user, the rest assistant);
    -> the rows and each one's (tokens, loss tokens) as posttrain tokenizes it."""
    from posttrain_cli.data.chat import tokenize_chat

    sample = text(rng, 20000)
    chars_per_token = len(sample) / len(tok(sample, add_special_tokens=False)["input_ids"])
    frame = len(tokenize_chat(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]).input_ids)
    budget = (length - frame) * chars_per_token
    rows, sizes = [], []
    for _ in range(n):
        user, answer = text(rng, int(budget * 0.25)), text(rng, int(budget * 0.74))
        while True:
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            t = tokenize_chat(tok, msgs)
            if len(t.input_ids) <= length:
                break
            answer = answer[:-int((len(t.input_ids) - length) * chars_per_token) - 8]
        rows.append({"messages": msgs})
        sizes.append((len(t.input_ids), sum(t.loss_mask)))
    return rows, sizes


def sum_rows(n: int, rng: random.Random, context_chars: int) -> list[dict]:
    """GRPO prompts: a paragraph of context_chars, then a sum to answer (the `number` verifier checks it)."""
    rows = []
    for _ in range(n):
        a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
        question = f"{text(rng, context_chars)}\n\nAdd the two numbers and reply with the sum only: {a} + {b} = ?"
        rows.append({"messages": [{"role": "user", "content": question}], "ground_truth": str(a + b),
                     "dataset": "bench_sum"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- the runs

def run_stage(a, env: dict, tmp: Path, stage: str, settings: str, top: str = "", kernels: str = "torch") -> list[dict]:
    """One stage through `posttrain run` (deepspeed.kernels=`kernels`); -> its metrics.jsonl rows."""
    recipe = write_recipe(tmp, env["model"], stage, settings, top="logging: {progress: never}\n" + top)
    overrides = [f"cluster.nproc_per_node={a.gpus}", f"deepspeed.precision={env['precision']}",
                 f"deepspeed.kernels={kernels}"]
    if a.activation_checkpointing:
        overrides.append("deepspeed.activation_checkpointing=true")
    run_dir = tmp / f"run-{stage}-{kernels}"
    t0 = time.perf_counter()
    posttrain_run(recipe, run_dir, a.threads, tmp, overrides=tuple(overrides), cpu=not env["cuda"])
    _, rows = stage_results(run_dir, stage)
    print(f"  ({stage}: the whole `posttrain run` took {time.perf_counter() - t0:.0f}s)", flush=True)
    return rows


def si(x: float, unit: str = "") -> str:
    """x with a k/M/G/T prefix: 1.24e9 -> '1.24G' (so the tiny --quick model reads as well as the 1B)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{' ' if unit else ''}{prefix}{unit}"
    return f"{x:.3g}{' ' if unit else ''}{unit}"


def mfu_text(flops_per_s_gpu: float, peak: float | None) -> str:
    return "n/a" if peak is None else f"{100 * flops_per_s_gpu / peak:.1f}%"


def bench_sft(a, env: dict, tmp: Path, tok, c: dict) -> None:
    doc_len = a.seq_len // a.docs_per_row
    seqs_per_step = a.rows_per_gpu * a.docs_per_row * a.gpus
    rows, sizes = chat_rows(tok, a.steps * seqs_per_step, doc_len, random.Random(0))
    data = write_jsonl(tmp / "sft.jsonl", rows)
    tokens = sum(n for n, _ in sizes)
    loss_share = sum(k for _, k in sizes) / tokens
    attn_len = sum(n * n for n, _ in sizes) / tokens
    per_token = model_flops(c, 1, loss_share, attn_len)
    print(f"sft data: {len(rows)} chats of {min(n for n, _ in sizes)}-{max(n for n, _ in sizes)} tokens, "
          f"{a.docs_per_row} a row (~{a.seq_len} tokens); {loss_share:.0%} of tokens carry loss; "
          f"{a.steps} steps x {a.rows_per_gpu} row(s) x {a.gpus} GPU(s), {a.skip} warm-up")
    print(f"sft model FLOPs/token: 6 x {si(body_params(c))} + 6 x {c['hidden_size']} x {c['vocab_size']:,} x "
          f"{loss_share:.2f} + 12 x {c['num_hidden_layers']} x {c['hidden_size']} x {attn_len:.0f} "
          f"= {si(per_token, 'FLOP')}", flush=True)
    results = {}
    for kernels in a.kernels:
        metrics = run_stage(a, env, tmp, "sft", f"""
            kind: sft
            data: [{{path: {data}}}]
            lr: 1.0e-5
            schedule: constant
            warmup_ratio: 0.0
            grad_clip: 1.0
            max_steps: {a.steps}
            global_batch_size: {seqs_per_step}
            micro_batch_size: {a.docs_per_row}
            max_seq_len: {doc_len}
            """, kernels=kernels)
        assert len(metrics) == a.steps, f"posttrain logged {len(metrics)} steps, expected {a.steps}"
        timed = metrics[a.skip:]
        secs = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
        tps_gpu = results[kernels] = sum(r["tokens"] for r in timed) / secs / a.gpus
        print(f"sft ({kernels} kernels): {tps_gpu:,.0f} tokens/s/GPU over steps {a.skip + 1}-{a.steps} "
              f"({secs / len(timed):.2f} s/step, {sum(r['tokens'] for r in timed) / len(timed):,.0f} tokens/step); "
              f"{si(tps_gpu * per_token, 'FLOP/s')}/GPU; MFU {mfu_text(tps_gpu * per_token, env['peak'])}; "
              f"loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}", flush=True)
    if len(results) > 1:
        first, *rest = a.kernels
        print("sft: " + "; ".join(f"{k} / {first} kernels: {results[k] / results[first]:.2f}x tokens/s" for k in rest),
              flush=True)


def bench_grpo(a, env: dict, tmp: Path, tok, c: dict) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        print("grpo+vllm: skipped: vLLM is not installed in this Python (GPUs: pip install 'posttrain[vllm]'; "
              "CPU: scripts/vllm_env.sh python scripts/bench_gpu.py --quick)", flush=True)
        return
    from posttrain_cli.data.chat import prompt_ids

    prompts = a.grpo_prompts * a.gpus
    rows = sum_rows(a.grpo_steps * prompts, random.Random(1), 40 if a.quick else 600)
    lens = [len(prompt_ids(tok, r["messages"])) for r in rows]
    data = write_jsonl(tmp / "prompts.jsonl", rows)
    seqs = prompts * a.grpo_generations
    rollout = ("rollout: {backend: vllm, enforce_eager: true, kv_cache_gb: 0.25}\n" if not env["cuda"]
               else "rollout: {backend: vllm}\n")
    print(f"grpo data: {len(rows)} prompts of {min(lens)}-{max(lens)} tokens; a step: {prompts} prompts x "
          f"{a.grpo_generations} completions of <= {a.grpo_new_tokens} new tokens = {seqs} sequences, "
          f"{a.grpo_micro_batch} a micro-batch, one update; {a.grpo_steps} steps, the first warm-up", flush=True)
    metrics = run_stage(a, env, tmp, "grpo", f"""
        kind: grpo
        data: [{{path: {data}}}]
        verifier: number
        prompts_per_step: {prompts}
        num_generations: {a.grpo_generations}
        max_new_tokens: {a.grpo_new_tokens}
        rollout_batch_size: {seqs // a.gpus}
        mini_batches: 1
        beta: 0.0
        lr: 1.0e-6
        max_steps: {a.grpo_steps}
        micro_batch_size: {a.grpo_micro_batch}
        max_seq_len: {max(lens) + a.grpo_new_tokens}
        """, top=rollout)
    assert len(metrics) == a.grpo_steps, f"posttrain logged {len(metrics)} GRPO steps, expected {a.grpo_steps}"
    prompt_len = statistics.mean(lens)
    out = []
    for r in metrics[1:]:
        step = r["tokens"] / r["tokens_per_s"]
        completion = r["response_length"] * seqs
        seq_len = r["tokens"] / seqs
        sum_sq = seqs * seq_len ** 2  # the sequences' lengths are all about equal
        sample = model_flops(c, r["tokens"], completion, sum_sq, passes=1)
        update = model_flops(c, r["tokens"], completion, sum_sq)
        out.append((step, r["rollout_seconds"], completion, r["tokens"], sample, update))
    step, roll, completion, tokens, sample, update = (statistics.median(x) for x in zip(*out))
    g = a.gpus
    print(f"grpo+vllm: a step {step:.2f}s (rollout {roll:.2f}s, update and weight sync {step - roll:.2f}s); "
          f"{tokens / step / g:,.0f} tokens/s/GPU over the step ({tokens:,.0f} tokens, prompts of {prompt_len:.0f}); "
          f"rollout {completion / roll / g:,.0f} generated tokens/s/GPU ({completion / seqs:.0f} a completion)")
    print(f"grpo+vllm: MFU {mfu_text((sample + update) / step / g, env['peak'])} over the step "
          f"(rollout forward + update: {si((sample + update) / step / g, 'FLOP/s')}/GPU); "
          f"update alone {mfu_text(update / max(step - roll, 1e-9) / g, env['peak'])}; "
          f"rollout alone {mfu_text(sample / roll / g, env['peak'])}", flush=True)


# --------------------------------------------------------------------------- driver

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=1, help="ranks (cluster.nproc_per_node); figures are per GPU")
    ap.add_argument("--only", choices=["sft", "grpo"], default=None, help="one part only")
    ap.add_argument("--steps", type=int, default=20, help="SFT optimizer steps (default 20)")
    ap.add_argument("--skip", type=int, default=5, help="SFT warm-up steps left out of the figures (default 5)")
    ap.add_argument("--seq-len", type=int, default=4096, help="tokens in a packed row (default 4096)")
    ap.add_argument("--docs-per-row", type=int, default=1, help="conversations packed into a row (default 1)")
    ap.add_argument("--rows-per-gpu", type=int, default=8, help="rows per GPU per optimizer step (default 8)")
    ap.add_argument("--grpo-steps", type=int, default=3, help="GRPO steps; the first is warm-up (default 3)")
    ap.add_argument("--grpo-prompts", type=int, default=32, help="GRPO prompts per GPU per step (default 32)")
    ap.add_argument("--grpo-generations", type=int, default=8)
    ap.add_argument("--grpo-new-tokens", type=int, default=1024)
    ap.add_argument("--grpo-micro-batch", type=int, default=4, help="GRPO sequences per forward/backward")
    ap.add_argument("--activation-checkpointing", action="store_true", help="for GPUs of 24 GB")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for one not in PEAK_BF16")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per rank (default: 2 on CPU, 8 on GPUs)")
    ap.add_argument("--bf16", action="store_true", help="bf16 on CPU too (GPUs: always bf16)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny model, 128-token rows, 3 + 2 steps")
    ap.add_argument("--kernels", default="torch",
                    help="deepspeed.kernels for the SFT part, comma-separated to compare in one run: torch,liger")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    a = ap.parse_args()
    a.kernels = a.kernels.split(",")
    if not a.kernels or any(k not in ("torch", "liger") for k in a.kernels) or len(set(a.kernels)) < len(a.kernels):
        ap.error(f"--kernels {','.join(a.kernels)}: torch and/or liger, each once")
    if a.quick:
        a.steps, a.skip, a.seq_len, a.docs_per_row, a.rows_per_gpu = 3, 1, 128, 2, 1
        a.grpo_steps, a.grpo_prompts, a.grpo_generations, a.grpo_new_tokens, a.grpo_micro_batch = 2, 2, 2, 8, 4
    if not 0 <= a.skip < a.steps or a.grpo_steps < 2 or a.seq_len % a.docs_per_row:
        ap.error("--skip must be in [0, steps), --grpo-steps >= 2, --seq-len a multiple of --docs-per-row")

    import torch

    cuda = torch.cuda.is_available()
    a.threads = a.threads or (8 if cuda else 2)
    torch.set_num_threads(a.threads)
    if cuda:
        info = gpu_info()
        name, attn = info["name"], info["attn"]
        if a.gpus > info["count"]:
            ap.error(f"--gpus {a.gpus}: this machine has {info['count']}")
        found = (a.peak_tflops * 1e12, "--peak-tflops") if a.peak_tflops else device_peak(name)
        peak = found[0] if found else None
        print(f"device: {name} x {a.gpus}; " + (f"peak dense bf16 {peak / 1e12:,.0f} TFLOP/s per GPU ({found[1]})"
              if found else f"MFU n/a: no peak for {name!r} in PEAK_BF16 (scripts/bench_gpu.py); "
                            f"--peak-tflops sets one"))
        precision = "bf16"
    else:
        if a.gpus > 1:
            ap.error("--gpus > 1 needs CUDA GPUs (on CPU: --gpus 1)")
        precision = "bf16" if a.bf16 else "fp32"
        peak = a.peak_tflops * 1e12 if a.peak_tflops else cpu_matmul_peak(getattr(torch, {"fp32": "float32"}.get(
            precision, "bfloat16")))
        print(f"device: CPU, {a.threads} threads (no CUDA); peak: {si(peak, 'FLOP/s')}, this CPU's {precision} "
              f"1024^3 matmul measured here (best of 5), not a datasheet figure")
        from posttrain_cli.engine.deepspeed_engine import attn_implementation

        attn = attn_implementation({})
    if not a.quick and not cuda:
        print("WARNING: a ~1B model on CPU takes hours a step; --quick is the CPU run", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        t0 = time.perf_counter()
        arch = QUICK_ARCH if a.quick else ARCH
        c = build_model(tmp / "model", arch, "bfloat16" if precision == "bf16" else "float32")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tmp / "model")
        emb = c["vocab_size"] * c["hidden_size"]
        print(f"model: random Llama, hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, "
              f"{c['num_attention_heads']} heads / {c['num_key_value_heads']} KV heads, intermediate "
              f"{c['intermediate_size']}, vocab {c['vocab_size']:,} (Llama 3's tokenizer), tied: "
              f"{si(body_params(c) + emb)} parameters ({si(body_params(c))} outside the embedding); "
              f"{precision}, ZeRO-2, attention {attn}; built in {time.perf_counter() - t0:.0f}s",
              flush=True)
        env = {"model": str(tmp / "model"), "precision": precision, "cuda": cuda, "peak": peak}
        if a.only in (None, "sft"):
            bench_sft(a, env, tmp, tok, c)
        if a.only in (None, "grpo"):
            bench_grpo(a, env, tmp, tok, c)
        print(REFERENCE)
    finally:
        if a.keep:
            print(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
