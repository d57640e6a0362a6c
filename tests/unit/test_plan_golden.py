"""`posttrain plan` of every shipped recipe (full and scale=tiny, and a few cluster set-ups) is
the text in tests/golden/plan/: the resolved hyperparameters, batch arithmetic, graph, inputs,
outputs and fingerprints. A refactor keeps them to the byte; a change a user should see updates
them on purpose:

    POSTTRAIN_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_plan_golden.py -n 0
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from posttrain_cli.cli import app
from posttrain_cli.config.compose import recipe_names

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "plan"

CASES = {f"{name}": [f"recipe={name}"] for name in recipe_names()}
CASES.update({f"{name}-tiny": [f"recipe={name}", "scale=tiny"] for name in recipe_names()})
CASES.update({
    "tiny-2ranks-zero3": ["recipe=tiny", "scale=tiny", "cluster.nproc_per_node=2", "deepspeed=zero3"],
    "tulu3-slurm": ["recipe=tulu3", "cluster=slurm", "cluster.gpus_per_node=8", "cluster.nodes=2"],
    "tiny_mopd-parallel": ["recipe=tiny_mopd", "cluster.parallel_stages=2"],
    "tiny_llama3-3rounds": ["recipe=tiny_llama3", "stages.round.count=3"],
    "llama3-8b-tiny": ["recipe=llama3", "scale=tiny", "model=llama3_1_8b"],
})


def plan_text(args: list[str], cwd: Path) -> str:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, ["plan", *args])
    finally:
        os.chdir(old)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_is_unchanged(case, tmp_path):
    text = plan_text(CASES[case], tmp_path)
    golden = GOLDEN / f"{case}.txt"
    if os.environ.get("POSTTRAIN_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: run with POSTTRAIN_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), f"plan of {' '.join(CASES[case])} changed (tests/golden/plan/{case}.txt)"
