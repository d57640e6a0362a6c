"""The tiny recipe's run, once per session: tests/e2e/test_tiny_recipe.py checks it and
tests/e2e/test_tiny_llama3.py starts from its `sft` stage (the same settings, so a copy skips it)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from tests.conftest import posttrain


@dataclass
class TinyRun:
    cwd: Path
    run_dir: Path
    result: CompletedProcess
    wall: float


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    cwd = tmp_path_factory.mktemp("tiny")
    t0 = time.time()
    r = posttrain("run", "recipe=tiny", cwd=cwd, timeout=900)
    return TinyRun(cwd, cwd / "runs" / "tiny", r, time.time() - t0)
