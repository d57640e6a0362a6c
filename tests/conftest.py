"""Shared fixtures: small recipes written into tmp dirs, and the CLI as a user types it.

Recipes: `mini_recipe` writes a recipe on the tiny model; `sft_stage` is the SFT stage most tests
train before the stage they test; `tiny_rows` reads the shipped tiny data and `with_bad_rows`
writes a copy of good rows with bad ones at a row number an error message names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY_DATA = REPO / "posttrain_cli" / "data" / "tiny"

# A model small enough that a few steps take a second or two.
MINI_MODEL = """
model:
  path: tiny
  tiny: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2,
         max_position_embeddings: 128, seed: 0}
"""


# Two test workers share 2 cores, each training with its own OpenMP threads: threads that spin
# while they wait for work starve the other worker's (two tiny SFT runs side by side: 73 s spinning,
# 30 s passive, 46 s one after the other). The results do not change, only the waiting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# How the two xdist workers share the suite: one test file at a time on one worker, so a file's module
# fixtures (the 2-rank runs of tests/integration) train once. Some files go together (the tiny recipe's
# run is shared by two e2e files; the sandbox's files keep their process checks apart from each other),
# and some tests are independent runs spread one by one (each preset's whole graph).
# Done by a scheduler of our own (below): xdist's `xdist_group` marks work by renaming node ids, which
# pytest 9.2 no longer allows; there every test became its own unit and each worker trained every
# module fixture again (measured 2026-12-04: ~10 minutes of the suite).
TOGETHER = {
    "tests/e2e/test_tiny_recipe.py": "tiny", "tests/e2e/test_tiny_llama3.py": "tiny",
    "tests/e2e/test_report_browser.py": "tiny",
    **{f"tests/unit/{name}.py": "sandbox"
       for name in ("test_sandbox", "test_sandbox_adversarial", "test_reward_dispatch", "test_verifiers")},
}
APART = {"tests/e2e/test_presets.py::test_every_preset_runs_at_tiny_scale",
         # each benchmark's --quick run (up to ~2 minutes, one process per contestant)
         "tests/e2e/test_bench_quick.py::test_quick_run"}


def work_unit(nodeid: str) -> str:
    """The unit of work (run on one worker, in order) a test belongs to."""
    nodeid = nodeid.split("@")[0]
    if nodeid.split("[")[0] in APART:
        return nodeid
    path = nodeid.split("::")[0]
    return TOGETHER.get(path, path)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class Units(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return Units(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Heavy files (runs of several minutes) go first, then the other slow ones, so the fast ones
    fill the gaps at the end instead of one worker finishing a long run alone (the scheduler
    above keeps this order: --no-loadscope-reorder)."""
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (item.get_closest_marker("heavy") is None, item.get_closest_marker("slow") is None,
                                 order[id(item)]))


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: two workers at most. Much of a slow test is one process importing torch or
    launching ranks, so two overlap well on 2 cores; more would only contend."""
    return max(1, min(2, os.cpu_count() or 1))


def posttrain(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `posttrain ARGS` in a subprocess, exactly as typed in a shell."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    exe = Path(sys.executable).parent / "posttrain"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "posttrain_cli.cli"]
    return subprocess.run(cmd + list(args), cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def write_recipe(tmp: Path, body: str, name: str = "mini") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def stage_rows(run_dir: Path, stage: str) -> list[dict]:
    """A stage's metrics.jsonl, one dict per logged step."""
    return [json.loads(l) for l in (run_dir / stage / "metrics.jsonl").read_text().splitlines()]


def stage_manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def tiny_rows(name: str, n: int, *, parse: bool = True) -> list:
    """The first n rows of posttrain_cli/data/tiny/NAME: dicts, or with parse=False the lines as
    shipped (write_jsonl copies those byte for byte; dicts it writes with json.dumps' spacing)."""
    lines = (TINY_DATA / name).read_text().splitlines()[:n]
    return [json.loads(l) for l in lines] if parse else lines


def with_bad_rows(path: Path, good: list, row_number: int, bad: list) -> Path:
    """`good` written to path with `bad` inserted so that the first bad row is row `row_number`
    (1-based, as error messages count); no bad rows: the good file."""
    return write_jsonl(path, good[:row_number - 1] + bad + good[row_number - 1:])


def _yaml(value) -> str:
    """A value as the recipes here write it: small floats as 3.0e-3 (YAML 1.1 reads 3e-3 as a
    string), so a test may edit the text (`lr: 1.0e-3` -> `lrr: 1.0e-3`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and 0 < abs(value) < 0.1:
        mantissa, exponent = f"{value:.15e}".split("e")
        return f"{float(mantissa)}e{int(exponent)}"
    return str(value)


def sft_stage(name: str = "sft", *, data, max_steps: int, lr: float | None = None, global_batch_size: int = 16,
              micro_batch_size: int = 8, max_seq_len: int = 64, from_: str | None = None, **more) -> str:
    """One SFT stage as a YAML block at indent 0: the warm-up (or teacher, or later fine-tune)
    that tests train around the stage they test. `data` is a file (-> `[{path: FILE}]`) or the
    YAML of the list as a string; `more` adds keys after these, in order, values as YAML text
    (a string is written as it is: `eval="{data: [...]}"`). lr None leaves the base default."""
    if isinstance(data, Path):
        data = f"[{{path: {data}}}]"
    keys = {"kind": "sft", "from": from_, "data": data, "lr": lr, "max_steps": max_steps,
            "global_batch_size": global_batch_size, "micro_batch_size": micro_batch_size,
            "max_seq_len": max_seq_len}
    keys = {k: v for k, v in keys.items() if v is not None}
    lines = [f"{name}:"] + [f"  {k}: {_yaml(v)}" for k, v in {**keys, **more}.items()]
    return "\n".join(lines) + "\n"


def mini_recipe(tmp: Path, *, stages: str | list[str] | None = None, name: str = "mini") -> Path:
    """A recipe on the tiny model (MINI_MODEL) with `stages`: YAML text, or a list of blocks
    (each dedented on its own, so `sft_stage(...)` joins blocks written at any indent; blank ones
    are left out). It writes tmp/train.jsonl (256 SFT rows) and tmp/eval.jsonl (16) for stages to
    read; without stages, two chained SFT stages on those, a few steps each."""
    train = write_jsonl(tmp / "train.jsonl", tiny_rows("sft_train.jsonl", 256))
    evald = write_jsonl(tmp / "eval.jsonl", tiny_rows("sft_eval.jsonl", 16))
    if stages is None:
        stages = [sft_stage("sft", data=train, lr=1.0e-3, max_steps=3,
                            eval=f"{{data: [{{path: {evald}}}], max_new_tokens: 4}}"),
                  sft_stage("sft2", data=train, lr=1.0e-3, max_steps=2)]
    if isinstance(stages, str):
        stages = [stages]
    stages = "".join(textwrap.dedent(block).strip("\n") + "\n" for block in stages if block.strip())
    body = "defaults: [base, _self_]\n" + f"name: {name}\nrun_dir: {tmp / 'runs' / name}\n" + \
        textwrap.dedent(MINI_MODEL) + "stages:\n" + textwrap.indent(stages, "  ")
    return write_recipe(tmp, body, name)


@pytest.fixture
def mini(tmp_path) -> Path:
    return mini_recipe(tmp_path)


# A script run under torchrun (`python -m torch.distributed.run ... script OUT ZERO`): a tiny Llama
# built into OUT/base by rank 0 and a DeepSpeed engine on it at ZeRO stage ZERO; the test's code
# follows, with `dist`, `eng`, `out`, `zero`, `engine`, `build_tokenizer` in scope.
_TINY_ENGINE = """
import math, sys, torch
from pathlib import Path
from posttrain_cli.engine import dist, deepspeed_engine as eng
from posttrain_cli.models.tiny import build_tiny, build_tokenizer
dist.init()
out = Path(sys.argv[1]); zero = int(sys.argv[2])
if dist.is_main():
    build_tiny(out / "base", {{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "max_position_embeddings": 64}})
dist.barrier()
ds = {{"zero_stage": zero, "offload_optimizer": False, "offload_param": False, "precision": "auto", "config": {{}}}}
cfg = eng.ds_config(ds, micro_batch_size=2, grad_accum=1, grad_clip=1.0)
model = eng.load_causal_lm(str(out / "base"), {{}}, cfg, train=True)
train = {{"lr": {lr}, "weight_decay": {weight_decay}, "adam_betas": [0.9, 0.95], "adam_eps": 1e-8,
         "warmup_ratio": 0.0, "schedule": "constant", "min_lr_ratio": 0.0}}
engine = eng.initialize(model, cfg, train, 3)
"""


# After the body: leave without the interpreter's teardown, as the stage worker does
# (pipeline/worker.py _exit): with a live gloo group and ZeRO-3 engines, destructors at exit now and
# then abort on a joinable C++ thread (SIGABRT) after the script has done its work.
_TINY_ENGINE_EXIT = """
import os, torch.distributed as tdist
sys.stdout.flush(); sys.stderr.flush()
if tdist.is_initialized():
    tdist.destroy_process_group()
os._exit(0)
"""


def tiny_engine_script(body: str, *, lr: float, weight_decay: float) -> str:
    """_TINY_ENGINE's set-up, then `body` (dedented), then a clean exit."""
    return _TINY_ENGINE.format(lr=lr, weight_decay=weight_decay) + textwrap.dedent(body) + _TINY_ENGINE_EXIT
