"""deepspeed.compile as a key: off by default, on for the run or for one stage (its deepspeed block
over the run's), never in a fingerprint, and refused at plan time where it cannot work (exit 2 through
the CLI: tests/e2e/test_compile_cli.py)."""

from __future__ import annotations

import pytest

from posttrain_cli import procs
from posttrain_cli.config import validate
from posttrain_cli.config.compose import compose
from posttrain_cli.config.schema import stage_deepspeed
from posttrain_cli.errors import UserError
from posttrain_cli.pipeline import graph


def _error(args: list[str]) -> str:
    with pytest.raises(UserError) as e:
        compose(args)
    return str(e.value)


def _fingerprints(run: dict) -> dict[str, str]:
    return {k: v["fingerprint"] for k, v in graph.fingerprints(run, graph.build(run)).items()}


def test_off_by_default_on_for_the_run_or_one_stage():
    run, _ = compose(["recipe=tiny"])
    assert run["deepspeed"]["compile"] is False
    assert not any(stage_deepspeed(run, s)["compile"] for s in run["stages"].values())
    run, _ = compose(["recipe=tiny", "deepspeed.compile=true", "stages.dpo.deepspeed={compile: false}"])
    assert {n: stage_deepspeed(run, s)["compile"] for n, s in run["stages"].items()} == \
        {"sft": True, "rm": True, "dpo": False, "grpo": True, "soup": True}
    run, _ = compose(["recipe=tiny", "stages.sft.deepspeed={compile: true}"])
    assert [n for n, s in run["stages"].items() if stage_deepspeed(run, s)["compile"]] == ["sft"]


def test_compile_is_not_in_any_fingerprint():
    off = _fingerprints(compose(["recipe=tiny"])[0])
    assert _fingerprints(compose(["recipe=tiny", "deepspeed.compile=true"])[0]) == off
    assert _fingerprints(compose(["recipe=tiny", "stages.sft.deepspeed={compile: true}"])[0]) == off


def test_bad_values_and_zero3_name_the_key():
    assert _error(["recipe=tiny", "deepspeed.compile=maybe"]) == "deepspeed.compile='maybe' is not a bool"
    assert _error(["recipe=tiny", "stages.rm.deepspeed={compile: 1}"]) == "stages.rm.deepspeed.compile=1 is not a bool"
    assert _error(["recipe=tiny", "deepspeed=zero3", "deepspeed.compile=true"]).startswith(
        "deepspeed.compile=true is not supported with ZeRO-3")
    msg = _error(["recipe=tiny", "stages.grpo.deepspeed={zero_stage: 3, compile: true}"])
    assert msg.startswith("stages.grpo.deepspeed.compile=true is not supported with ZeRO-3") and \
        msg.endswith("use stages.grpo.deepspeed.zero_stage=2, or stages.grpo.deepspeed.compile=false")
    # SLURM: the plan runs on a login node; ZeRO-3 is refused there too (the compiler is the job's node's).
    assert _error(["recipe=tiny", "cluster=slurm", "deepspeed=zero3", "deepspeed.compile=true"]).startswith(
        "deepspeed.compile=true is not supported with ZeRO-3")


def test_a_missing_compiler_is_named_at_plan_time_on_a_local_run(monkeypatch):
    monkeypatch.setattr(validate, "has_cuda", lambda: False)
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert procs.compiler_for(cuda=False) is None
    assert _error(["recipe=tiny", "stages.sft.deepspeed={compile: true}"]) == (
        "stages.sft.deepspeed.compile=true: torch.compile needs a C++ compiler on CPU and finds none "
        "(/nonexistent/g++ not found): install one (apt-get install g++) or set stages.sft.deepspeed.compile=false")
    compose(["recipe=tiny"])  # off: the compiler is nobody's business
    compose(["recipe=tiny", "deepspeed.compile=true", "cluster=slurm"])  # the job's node checks its own
    monkeypatch.setattr(validate, "has_cuda", lambda: True)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert _error(["recipe=tiny", "deepspeed.compile=true"]).startswith(
        "deepspeed.compile=true: torch.compile needs a C compiler for Triton on GPUs and finds none "
        "(/nonexistent/cc not found)")
