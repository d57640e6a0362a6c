"""deepspeed.kernels through the CLI as a user types it: plan shows liger and keeps every
fingerprint; what cannot work (liger-kernel missing, no CUDA, a value that is neither) stops the plan
with one line naming the key (exit 2); and with Liger's kernels (Triton's interpreter on CPU, in the
vLLM environment: TRITON_INTERPRET=1 scripts/vllm_env.sh python -m pytest -m liger) an SFT stage and a
DPO stage with a live reference train the torch kernels' curves, on 1 rank and on 2 under ZeRO-3."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest

from posttrain_cli.procs import liger_problem
from tests.conftest import mini_recipe, posttrain, sft_stage, tiny_rows, write_jsonl

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
CUDA = os.path.exists("/proc/driver/nvidia/version")
# Why Liger's kernels cannot run here (the plan's own check), None where they can.
CANNOT = liger_problem(cuda=CUDA)


def _fingerprints(out: str) -> list[str]:
    return re.findall(r"fingerprint ([0-9a-f]{16})", out)


@pytest.mark.parametrize("args, msg", [
    (["deepspeed.kernels=fast"], "deepspeed.kernels"),
    (["stages.sft.deepspeed={kernels: fast}"], "stages.sft.deepspeed.kernels='fast' is not one of: torch, liger"),
])
def test_a_kernels_value_that_is_neither_stops_the_plan(tmp_path, args, msg):
    r = posttrain("plan", "recipe=tiny", *args, cwd=tmp_path)
    err = r.stderr.strip()
    assert r.returncode == 2, r.stdout + r.stderr
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in r.stdout + err, err
    assert msg in err and "fast" in err, err


@pytest.mark.skipif(CUDA, reason="a CUDA machine with liger-kernel plans it")
def test_liger_where_it_cannot_run_stops_the_plan_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = posttrain("plan", "recipe=tiny", "stages.dpo.deepspeed={kernels: liger}", cwd=tmp_path, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    why = ("liger-kernel is not installed (pip install 'posttrain[liger]')" if not HAS_LIGER else
           "Liger's kernels are Triton's and need a CUDA GPU; there is none here (TRITON_INTERPRET=1 runs them "
           "in Triton's interpreter, slowly, to check them)")
    assert r.stderr.strip() == f"error: stages.dpo.deepspeed.kernels=liger: {why}; or set stages.dpo.deepspeed.kernels=torch"
    # Off, nobody asks for it.
    assert posttrain("plan", "recipe=tiny", cwd=tmp_path, env=env).returncode == 0


@pytest.mark.liger
@pytest.mark.skipif(CANNOT is not None, reason=str(CANNOT))
def test_plan_shows_liger_and_keeps_the_fingerprints(tmp_path):
    off = posttrain("plan", "recipe=tiny", cwd=tmp_path)
    on = posttrain("plan", "recipe=tiny", "deepspeed.kernels=liger", cwd=tmp_path)
    stage = posttrain("plan", "recipe=tiny", "stages.dpo.deepspeed={kernels: liger}", cwd=tmp_path)
    for r in (off, on, stage):
        assert r.returncode == 0, r.stdout + r.stderr
    assert " +liger kernels" in on.stdout.splitlines()[0] and "liger" not in off.stdout
    dpo = stage.stdout.split("dpo (dpo)")[1].split("\n\n")[0]
    assert "deepspeed: ZeRO-2 +liger kernels, precision auto (the stage's own block)" in dpo
    assert _fingerprints(off.stdout) == _fingerprints(on.stdout) == _fingerprints(stage.stdout)


@pytest.mark.liger
@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(CANNOT is not None, reason=str(CANNOT))
def test_sft_and_dpo_train_the_torch_curves_with_liger(tmp_path):
    pref = write_jsonl(tmp_path / "pref.jsonl", tiny_rows("pref_train.jsonl", 64))
    dpo = (f"dpo: {{kind: dpo, from: sft, data: [{{path: {pref}}}], max_steps: 3, global_batch_size: 8, "
           "micro_batch_size: 4, max_seq_len: 64, lr: 1.0e-3, precompute_ref: false}\n")
    rec = mini_recipe(tmp_path, stages=[sft_stage(data=tmp_path / "train.jsonl", lr=2.0e-3, max_steps=4,
                                                  micro_batch_size=4, warmup_ratio=0.0), dpo])
    setups = {"torch": [], "liger": ["deepspeed.kernels=liger"],
              # ZeRO-3 over 2 ranks: the head's weight is gathered for its forward and again for its
              # backward, which recomputes the chunks from the saved parameter.
              "liger_zero3_2rank": ["deepspeed.kernels=liger", "deepspeed=zero3", "cluster.nproc_per_node=2"]}
    curves = {}
    for name, args in setups.items():
        run_dir = tmp_path / "runs" / name
        r = posttrain("run", f"recipe={rec}", f"run_dir={run_dir}", *args, cwd=tmp_path)
        assert r.returncode == 0, f"{name}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        said = "[sft] kernels: the LM head's log-probs through liger-kernel's Triton cross-entropy" in r.stdout
        assert said == name.startswith("liger"), r.stdout[-3000:]
        curves[name] = {s: [json.loads(l)["loss"] for l in (run_dir / s / "metrics.jsonl").read_text().splitlines()]
                        for s in ("sft", "dpo")}
    for s in ("sft", "dpo"):
        base = curves["torch"][s]
        assert len(base) > 0
        # One rank: float rounding only, the same chunks' arithmetic in another order. Two ranks
        # under ZeRO-3: also the gradient reduction's order (tests/integration/test_sft_dist.py's bound).
        for name, rel in (("liger", 1e-4), ("liger_zero3_2rank", 2e-4)):
            assert curves[name][s] == pytest.approx(base, rel=rel, abs=1e-5), (s, name, base, curves[name][s])
    assert curves["liger"]["dpo"][0] == pytest.approx(0.693147, abs=1e-4)  # reference = policy: log 2
    assert curves["liger"]["sft"][-1] < curves["liger"]["sft"][0]
