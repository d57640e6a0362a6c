"""The kind registry (posttrain_cli/kinds/): every kind has a complete record, its run module
exists, its schema validates a minimal stage, its tiny settings compose, and importing the
records pulls in no torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from posttrain_cli.config.scale import tiny_stage
from posttrain_cli.config.validate import check_stage
from posttrain_cli.kinds import KINDS
from posttrain_cli.kinds.base import PRODUCES, Kind

PROMPTS = [{"path": "prompts.jsonl"}]
# The smallest stage of each kind that validates: what its schema leaves required, and the rules ask for.
MINIMAL = {
    "sft": {"data": PROMPTS},
    "reward_model": {"data": PROMPTS},
    "dpo": {"data": PROMPTS},
    "grpo": {"data": PROMPTS},
    "ppo": {"data": PROMPTS, "verifier": "number"},
    "generate": {"data": PROMPTS},
    "rejection_sampling": {"data": PROMPTS},
    "merge": {"models": ["org/a", "org/b"]},
    "distill": {"data": PROMPTS, "teachers": {"add": "org/teacher"}},
    "eval": {"data": PROMPTS},
}


def test_every_kind_has_a_record_and_a_minimal_stage():
    assert list(MINIMAL) == list(KINDS)
    for name, record in KINDS.items():
        assert isinstance(record, Kind) and record.name == name
        assert record.produces in PRODUCES
        assert record.schema["kind"][0] == "str"
        assert not record.rl or record.trains
        assert all(accepts <= {"policy", "scorer"} for accepts in record.model_refs.values())
        assert set(record.model_refs) <= set(record.schema)


@pytest.mark.parametrize("name", list(KINDS))
def test_the_run_module_exists(name):
    module = KINDS[name].module
    assert module.startswith("posttrain_cli.stages.")
    # find_spec of a submodule imports its package (stages/__init__), not the module itself.
    assert importlib.util.find_spec(module) is not None, module


@pytest.mark.parametrize("name", list(KINDS))
def test_a_minimal_stage_validates(name):
    stage = check_stage("s", {"kind": name, **MINIMAL[name]})
    assert set(stage) == set(KINDS[name].schema)
    assert KINDS[name].batch("stages.s", stage, 1)["world_size"] == 1


@pytest.mark.parametrize("name", list(KINDS))
def test_the_tiny_stage_validates(name):
    record = KINDS[name]
    stage = check_stage("s", tiny_stage({"kind": name, **MINIMAL[name]}))
    for key, value in record.tiny_sizes.items():
        assert stage[key] == value
    for key, (low, high) in record.tiny_caps.items():
        assert low <= stage[key] <= high
    if record.trains:
        record.batch("stages.s", stage, 2)  # divides over 2 ranks, as scale=tiny promises


def test_importing_the_records_pulls_in_no_torch():
    """Nor does finding their run modules (without running them)."""
    code = ("import importlib.util, sys, posttrain_cli.config.validate, posttrain_cli.config.scale; "
            "from posttrain_cli.kinds import KINDS; "
            "assert all(importlib.util.find_spec(k.module) for k in KINDS.values()); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'deepspeed')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
