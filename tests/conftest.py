"""Shared fixtures: small recipes written into tmp dirs, and the CLI as a user types it."""

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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`--dist loadgroup`, pyproject.toml), a test file runs on one worker: its
    module fixtures (the 2-rank runs of tests/integration) train once. A file may name a wider group
    (tests/e2e: the tiny recipe's run is shared by two files). Heavy files (runs of several minutes)
    go first, then the other slow ones, so the fast ones fill the gaps at the end instead of one
    worker finishing a long run alone."""
    for item in items:
        if not any(True for _ in item.iter_markers("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
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


def mini_recipe(tmp: Path, *, stages: str | None = None, name: str = "mini") -> Path:
    """Two chained SFT stages on a slice of the tiny data, a few steps each."""
    train = write_jsonl(tmp / "train.jsonl", [json.loads(l) for l in
                                              (TINY_DATA / "sft_train.jsonl").read_text().splitlines()[:256]])
    evald = write_jsonl(tmp / "eval.jsonl", [json.loads(l) for l in
                                             (TINY_DATA / "sft_eval.jsonl").read_text().splitlines()[:16]])
    stages = stages or f"""
      sft:
        kind: sft
        data: [{{path: {train}}}]
        lr: 1.0e-3
        max_steps: 3
        global_batch_size: 16
        micro_batch_size: 8
        max_seq_len: 64
        eval: {{data: [{{path: {evald}}}], max_new_tokens: 4}}
      sft2:
        kind: sft
        data: [{{path: {train}}}]
        lr: 1.0e-3
        max_steps: 2
        global_batch_size: 16
        micro_batch_size: 8
        max_seq_len: 64
    """
    body = "defaults: [base, _self_]\n" + f"name: {name}\nrun_dir: {tmp / 'runs' / name}\n" + \
        textwrap.dedent(MINI_MODEL) + "stages:\n" + textwrap.indent(textwrap.dedent(stages).strip("\n"), "  ") + "\n"
    return write_recipe(tmp, body, name)


@pytest.fixture
def mini(tmp_path) -> Path:
    return mini_recipe(tmp_path)
