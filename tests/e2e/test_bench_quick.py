"""Every benchmark's --quick run (scripts/bench_*.py), as a user types it: it exits 0 and prints the
lines that carry its results, one for every contestant. Harness checks only: no figure or timing is
asserted (they run on a shared, busy machine; what the numbers say is the full runs' business).

    python -m pytest tests/e2e/test_bench_quick.py                                # the CPU ones
    scripts/vllm_env.sh python -m pytest -m vllm tests/e2e/test_bench_quick.py     # the vLLM ones
    TRITON_INTERPRET=1 scripts/vllm_env.sh python -m pytest -m liger tests/e2e/test_bench_quick.py  # Liger's

The contestants that sample with vLLM (bench_rollout, bench_grpo --vllm, bench_gpu's GRPO step) run
under the `vllm` marker, where vLLM is installed (CI: in scripts/vllm_env.sh's environment), and skip
elsewhere; in the main environment bench_gpu prints the line saying its GRPO step is skipped.
Each run is a unit of its own for the two test workers (tests/conftest.py APART), so the runs spread
over both. A quick run takes 10 s (bench_data) to 2-3 minutes (bench_lora's 7 processes) on 2 busy
cores, most of it the contestants' process starts.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

from posttrain_cli.procs import liger_problem
from tests.conftest import REPO

HAS_VLLM = importlib.util.find_spec("vllm") is not None
# Why Liger's kernels cannot run here (None: a CUDA GPU, or Triton's interpreter, TRITON_INTERPRET=1).
LIGER_CANNOT = liger_problem(cuda=os.path.exists("/proc/driver/nvidia/version"))


@dataclass(frozen=True)
class Quick:
    script: str
    args: tuple[str, ...]
    # Patterns (re.search, MULTILINE) that the output must contain: the result lines.
    lines: tuple[str, ...]
    vllm: bool = False
    liger: bool = False


QUICK = {
    "sft": Quick("bench_sft.py", (), (
        *(rf"round 1 +{c}: +\d+ tok/s steady" for c in ("posttrain", "trl_default", "trl_tuned", "bare")),
        r"posttrain/trl_default: [\d.]+x steady", r"posttrain/bare: [\d.]+x steady")),
    "dpo": Quick("bench_dpo.py", (), (
        *(rf"round 1 {c} +[\d.]+ steps/s" for c in ("posttrain", "trl_default", "trl_tuned")),
        r"posttrain / trl_default = [\d.]+x", r"posttrain / trl_tuned += [\d.]+x")),
    "grpo": Quick("bench_grpo.py", (), (
        *(rf"round 1 {c} +[\d.]+ steps/s steady" for c in ("posttrain", "trl_default", "trl_tuned")),
        r"posttrain / trl_default = [\d.]+x", r"posttrain / trl_tuned += [\d.]+x")),
    "grpo-vllm": Quick("bench_grpo.py", ("--vllm",), (
        *(rf"round 1 {c} +[\d.]+ steps/s steady" for c in ("posttrain_vllm", "trl_vllm")),
        r"posttrain_vllm / trl_vllm = [\d.]+x"), vllm=True),
    "lora": Quick("bench_lora.py", (), (
        *(rf"round 1 {c} +\d+ tok/s steady; peak +\d+ MB" for c in (
            "posttrain_full", "posttrain_lora", "posttrain_full_ckpt", "posttrain_lora_ckpt", "trl_lora",
            "trl_lora_tuned")),
        r"posttrain LoRA / full peak memory, without activation checkpointing = [\d.]+x resident; "
        r"held by training [\d.]+x",
        *(rf"^  {c} +peak +\d+ MB: +\d+ MB over its process as the model starts loading \(\d+ MB\)"
          for c in ("posttrain_full", "posttrain_lora")),
        r"posttrain_lora / trl_lora tokens/s = [\d.]+x")),
    "memory": Quick("bench_memory.py", (), (
        *(rf"round 1 {c} +peak +\d+ MB" for c in ("posttrain", "trl_tuned")),
        r"posttrain / trl_tuned peak memory = [\d.]+x")),
    "merge": Quick("bench_merge.py", (), (
        *(rf"round 1 {c} +[\d.]+s \(cpu" for c in ("posttrain", "baseline")),
        r"outputs identical: True", r"posttrain peak / N = [\d.]+")),
    "data": Quick("bench_data.py", (), (
        *(rf"^ *{phase}: +[\d.]+s" for phase in ("pre-flight", "tokenize", "read", "cached")),
        r"200 chats -> 200 examples", r"pre-flight \+ tokenize: \d+s wall")),
    "rollout": Quick("bench_rollout.py", (), (
        r"round 1 hf \(batch \d+\) +[\d.]+s", r"round 1 vllm +[\d.]+s", r"vllm / hf \(batch \d+\) = [\d.]+x"),
        vllm=True),
    "gpu": Quick("bench_gpu.py", (), (
        r"^device: (CPU, \d+ threads .*peak: [\d.]+ [kMGT]?FLOP/s|.* peak dense bf16)", r"^model: random Llama",
        r"^sft model FLOPs/token: 6 x ", r"^sft \(torch kernels\): [\d,]+ tokens/s/GPU .* MFU [\d.]+%",
        r"^grpo\+vllm: skipped: vLLM is not installed" if not HAS_VLLM else r"^grpo\+vllm: MFU [\d.]+%",
        r"^reference: torchtitan")),
    "gpu-liger": Quick("bench_gpu.py", ("--only", "sft", "--kernels", "torch,liger"), (
        *(rf"^sft \({k} kernels\): [\d,]+ tokens/s/GPU .* MFU [\d.]+%" for k in ("torch", "liger")),
        r"^sft: liger / torch kernels: [\d.]+x tokens/s"), liger=True),
    "gpu-vllm": Quick("bench_gpu.py", ("--only", "grpo"), (
        r"^grpo\+vllm: a step [\d.]+s \(rollout [\d.]+s", r"^grpo\+vllm: MFU [\d.]+% over the step"), vllm=True),
}


def test_every_benchmark_has_a_quick_run():
    scripts = {p.name for p in (REPO / "scripts").glob("bench_*.py")}
    assert scripts == {q.script for q in QUICK.values()}, "a scripts/bench_*.py without its --quick run here"


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.vllm, pytest.mark.skipif(
    not HAS_VLLM, reason="vLLM is not installed here (scripts/vllm_env.sh makes an environment with it)")])
    if q.vllm else pytest.param(n, marks=[pytest.mark.liger, pytest.mark.skipif(
        LIGER_CANNOT is not None, reason=str(LIGER_CANNOT))])
    if q.liger else n for n, q in QUICK.items()])
def test_quick_run(name):
    q = QUICK[name]
    cmd = [sys.executable, str(REPO / "scripts" / q.script), "--quick", *q.args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"{' '.join(cmd[1:])} exited {p.returncode}:\n{out[-6000:]}"
    missing = [pat for pat in q.lines if not re.search(pat, p.stdout, re.MULTILINE)]
    assert not missing, f"{q.script} --quick printed no line matching {missing}:\n{p.stdout[-6000:]}"
