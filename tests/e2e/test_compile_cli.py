"""deepspeed.compile through the CLI as a user types it: plan shows it and keeps every fingerprint,
and what cannot work (ZeRO-3, no C++ compiler, a value that is not a bool) stops the plan with one
line naming the key (exit 2)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import posttrain


def _fingerprints(out: str) -> list[str]:
    return re.findall(r"fingerprint ([0-9a-f]{16})", out)


def test_plan_shows_compile_and_keeps_the_fingerprints(tmp_path):
    off = posttrain("plan", "recipe=tiny", cwd=tmp_path)
    on = posttrain("plan", "recipe=tiny", "deepspeed.compile=true", cwd=tmp_path)
    stage = posttrain("plan", "recipe=tiny", "stages.dpo.deepspeed={compile: true}", cwd=tmp_path)
    for r in (off, on, stage):
        assert r.returncode == 0, r.stdout + r.stderr
    assert "deepspeed ZeRO-2 +torch.compile " in on.stdout.splitlines()[0]
    assert "torch.compile" not in off.stdout
    # A stage's own block shows under that stage only.
    assert "torch.compile" not in stage.stdout.splitlines()[0]
    dpo = stage.stdout.split("dpo (dpo)")[1].split("\n\n")[0]
    assert "deepspeed: ZeRO-2 +torch.compile, precision auto (the stage's own block)" in dpo
    # Float rounding is all it changes: no stage re-runs for it.
    assert _fingerprints(off.stdout) == _fingerprints(on.stdout) == _fingerprints(stage.stdout)
    assert len(_fingerprints(off.stdout)) == 5


@pytest.mark.parametrize("args, msg", [
    (["deepspeed=zero3", "deepspeed.compile=true"],
     "deepspeed.compile=true is not supported with ZeRO-3: its parameter-gathering hooks inside every compiled "
     "layer break the graph into dozens of pieces that hit torch's recompile limit; use deepspeed=zero2, or "
     "deepspeed.compile=false"),
    (["deepspeed.compile=true", "stages.dpo.deepspeed={zero_stage: 3}"],
     "use stages.dpo.deepspeed.zero_stage=2, or deepspeed.compile=false"),
    (["deepspeed=zero3", "stages.sft.deepspeed={compile: true}"],
     "stages.sft.deepspeed.compile=true is not supported with ZeRO-3"),
    (["deepspeed.compile=maybe"], "deepspeed.compile='maybe' is not a bool"),
    (["stages.sft.deepspeed={compile: 3}"], "stages.sft.deepspeed.compile=3 is not a bool"),
])
def test_compile_that_cannot_work_stops_the_plan(tmp_path, args, msg):
    r = posttrain("plan", "recipe=tiny", *args, cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2, r.stdout + r.stderr
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in r.stdout + err, err
    assert msg in err, err


def test_zero3_without_compile_on_a_training_stage_plans(tmp_path):
    # The merge stage trains nothing: compile on the run does not concern it; ZeRO-3 on a stage
    # without compile is fine.
    r = posttrain("plan", "recipe=tiny", "deepspeed.compile=true", "stages.soup.deepspeed={zero_stage: 3}",
                  "stages.dpo.deepspeed={zero_stage: 3, compile: false}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(Path("/proc/driver/nvidia/version").exists(), reason="a CUDA machine needs Triton's C compiler instead")
def test_no_cpp_compiler_stops_the_plan(tmp_path):
    r = posttrain("plan", "recipe=tiny", "deepspeed.compile=true", cwd=tmp_path, env={"CXX": "/nonexistent/g++"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip() == (
        "error: deepspeed.compile=true: torch.compile needs a C++ compiler on CPU and finds none (/nonexistent/g++ "
        "not found): install one (apt-get install g++) or set deepspeed.compile=false")
    # Off, the compiler is nobody's business.
    assert posttrain("plan", "recipe=tiny", cwd=tmp_path, env={"CXX": "/nonexistent/g++"}).returncode == 0
