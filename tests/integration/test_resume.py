"""Mid-stage checkpoints: a stage stopped by SIGTERM (SLURM's preemption) or killed with SIGKILL,
then run again with the same command, ends with the weights of a run that was never stopped.

One recipe holds a stage of every training kind (sft -> reward_model -> dpo -> grpo with a
reference refresh -> ppo -> distill). It runs once straight through; then again from scratch,
stopped once inside each stage and re-run until it finishes. The signal lands whenever the test
sees the stage's metrics pass a step, so the step it stops at varies: the final weights must not.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import mini_recipe, posttrain, sft_stage, stage_manifest, tiny_rows, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

KINDS = ["sft", "rm", "dpo", "grpo", "ppo", "distill"]
# The logged step (an optimizer update) after which the signal is sent. grpo (2 updates per step,
# reference refreshed every 3 steps) stops past its first refresh: the refreshed reference must
# come back from the checkpoint.
STOP_AFTER = {"grpo": 8}


def _sft(train: Path, *, save_every: int, lr: str = "3.0e-3", gbs: int = 8, steps: int = 40) -> str:
    """The SFT stage of both recipes here: 40 steps, so a signal lands mid-stage (2 ranks: 20, each
    step a few times slower)."""
    return sft_stage(data=train, lr=lr, max_steps=steps, global_batch_size=gbs, micro_batch_size=4,
                     save_every=save_every)


def _recipe(tmp: Path) -> Path:
    rl = write_jsonl(tmp / "rl.jsonl", tiny_rows("rl_train.jsonl", 64, parse=False))
    pref = write_jsonl(tmp / "pref.jsonl", tiny_rows("pref_train.jsonl", 128, parse=False))
    rl_common = """
        data: [{{path: {rl}}}]
        prompts_per_step: 8
        max_new_tokens: 6
        max_seq_len: 64
        micro_batch_size: 8
        rollout_batch_size: 32
        save_every: 3
    """.format(rl=rl)
    body = _sft(tmp / "train.jsonl", save_every=7) + textwrap.dedent(f"""
      rm:
        kind: reward_model
        data: [{{path: {pref}}}]
        lr: 3.0e-3
        max_steps: 30
        global_batch_size: 8
        micro_batch_size: 4
        max_seq_len: 64
        save_every: 7
      dpo:
        kind: dpo
        from: sft
        data: [{{path: {pref}}}]
        lr: 1.0e-3
        max_steps: 30
        global_batch_size: 8
        micro_batch_size: 4
        max_seq_len: 64
        save_every: null
      grpo:
        kind: grpo
        from: dpo
        verifier: number
        num_generations: 4
        max_steps: 10
        lr: 2.0e-3
        beta: 0.1
        ref_refresh_every: 3
        mini_batches: 2
    """) + textwrap.indent(textwrap.dedent(rl_common), "  ") + textwrap.dedent("""
      ppo:
        kind: ppo
        from: grpo
        reward_model: rm
        num_generations: 2
        max_steps: 8
        lr: 1.0e-3
        beta: 0.02
        ppo_epochs: 2
        mini_batches: 2
    """) + textwrap.indent(textwrap.dedent(rl_common), "  ") + textwrap.dedent(f"""
      distill:
        kind: distill
        from: sft
        verifier: number
        teachers: {{add: ppo}}
        num_generations: 2
        max_steps: 8
        lr: 1.0e-3
        alpha: 0.5
        heldout: [{{path: {rl}}}]
        eval_every: 4
    """) + textwrap.indent(textwrap.dedent(rl_common), "  ")
    return mini_recipe(tmp, stages=body, name="resume")


def _last_step(run_dir: Path, stage: str) -> int:
    try:
        lines = (run_dir / stage / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(l).get("step", 0) for l in lines if l.strip()]
    return max(steps, default=0)


def _run_until(cmd: list[str], cwd: Path, run_dir: Path, stage: str, after: int, sig: int) -> int:
    """Start `posttrain run`, send `sig` to it and every process under it once `stage` logged
    step `after`; -> its exit code."""
    exe = Path(sys.executable).parent / "posttrain"
    proc = subprocess.Popen([str(exe), *cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if _last_step(run_dir, stage) >= after and _status(run_dir, stage) == "running":
            for pid in _tree(proc.pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=600)
    (cwd / f"log-{stage}-{sig}.txt").write_text(out)
    return proc.returncode


def _status(run_dir: Path, stage: str) -> str | None:
    try:
        return stage_manifest(run_dir, stage).get("status")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _tree(pid: int) -> list[int]:
    """pid and every process under it (torchrun starts its ranks in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _weights(run_dir: Path, stage: str) -> dict:
    return load_file(run_dir / stage / "model" / "model.safetensors")


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    rec = _recipe(tmp)
    straight = tmp / "straight"
    r = posttrain("run", f"recipe={rec}", f"run_dir={straight}", cwd=tmp, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stopped = tmp / "stopped"
    codes = {}
    for stage in KINDS:
        cmd = ["run", f"recipe={rec}", f"run_dir={stopped}"]
        codes[stage] = _run_until(cmd, tmp, stopped, stage, after=STOP_AFTER.get(stage, 2), sig=signal.SIGTERM)
    r = posttrain("run", f"recipe={rec}", f"run_dir={stopped}", cwd=tmp, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"tmp": tmp, "recipe": rec, "straight": straight, "stopped": stopped, "codes": codes}


def test_every_kind_was_stopped_and_resumed(runs):
    for stage in KINDS:
        log = (runs["tmp"] / f"log-{stage}-{int(signal.SIGTERM)}.txt").read_text()
        assert runs["codes"][stage] == 1, log[-2000:]
        assert f"stage '{stage}' stopped by SIGTERM at step" in log and "the same command resumes it" in log, log[-2000:]
    # Each later run resumed the stage the previous one stopped in.
    logs = [(runs["tmp"] / f"log-{s}-{int(signal.SIGTERM)}.txt").read_text() for s in KINDS[1:]]
    for stage, log in zip(KINDS, logs):
        assert f"[{stage}] resumed from step-" in log, log[-2000:]
    grpo = (runs["tmp"] / f"log-grpo-{int(signal.SIGTERM)}.txt").read_text()
    assert "the reference becomes the current policy" in grpo.split("stopped by SIGTERM")[0]


@pytest.mark.parametrize("stage", KINDS)
def test_resumed_weights_equal_uninterrupted(runs, stage):
    diff = _max_diff(_weights(runs["straight"], stage), _weights(runs["stopped"], stage))
    assert diff <= 1e-5, f"{stage}: max |w_resumed - w_straight| = {diff}"


def test_resumed_metrics_have_each_step_once(runs):
    for stage in ("sft", "grpo"):
        steps = [json.loads(l)["step"] for l in (runs["stopped"] / stage / "metrics.jsonl").read_text().splitlines()]
        straight = [json.loads(l)["step"] for l in
                    (runs["straight"] / stage / "metrics.jsonl").read_text().splitlines()]
        assert steps == straight


def test_finished_stage_drops_its_checkpoints(runs):
    for stage in KINDS:
        assert not (runs["stopped"] / stage / "checkpoints").exists()
        assert stage_manifest(runs["stopped"], stage)["status"] == "completed"


def _sft_recipe(tmp: Path, lr: str = "3.0e-3", gbs: int = 8, train: str = "train.jsonl", steps: int = 40) -> Path:
    return mini_recipe(tmp, stages=_sft(tmp / train, save_every=5, lr=lr, gbs=gbs, steps=steps), name="sft")


def test_sigkill_two_ranks_zero3_resumes_to_the_same_weights(tmp_path):
    """SIGKILL (no chance to save): the rerun starts from the last periodic checkpoint."""
    rec = _sft_recipe(tmp_path, steps=40)  # killed after step 12: room for the kill to land first
    args = ["deepspeed=zero3", "cluster.nproc_per_node=2"]
    r = posttrain("run", f"recipe={rec}", f"run_dir={tmp_path / 'straight'}", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    killed = tmp_path / "killed"
    code = _run_until(["run", f"recipe={rec}", f"run_dir={killed}", *args], tmp_path, killed, "sft", after=12,
                      sig=signal.SIGKILL)
    assert code == -signal.SIGKILL
    ckpt = (killed / "sft" / "checkpoints" / "latest").read_text().strip()
    assert ckpt.startswith("step-0000"), ckpt
    time.sleep(1)
    assert not [p for p in _tree(os.getpid())[1:] if "pipeline.worker" in _cmdline(p)], "a rank outlived the kill"
    r = posttrain("run", f"recipe={rec}", f"run_dir={killed}", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"[sft] resumed from {ckpt}" in r.stdout
    assert _max_diff(_weights(tmp_path / "straight", "sft"), _weights(killed, "sft")) <= 1e-5


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_changed_batch_or_data_is_refused_other_changes_start_over(tmp_path):
    rec = _sft_recipe(tmp_path)
    run_dir = tmp_path / "runs" / "sft"
    code = _run_until(["run", f"recipe={rec}"], tmp_path, run_dir, "sft", after=3, sig=signal.SIGTERM)
    assert code == 1
    ckpt = run_dir / "sft" / "checkpoints"
    step = (ckpt / "latest").read_text().strip()

    r = posttrain("run", f"recipe={_sft_recipe(tmp_path, gbs=16)}", cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "stages.sft: the checkpoint at step" in r.stderr and "global_batch_size 8 -> 16" in r.stderr, r.stderr
    assert f"delete {ckpt}" in r.stderr and "Traceback" not in r.stderr
    assert (ckpt / "latest").read_text().strip() == step

    rows = (tmp_path / "train.jsonl").read_text().splitlines()
    (tmp_path / "train2.jsonl").write_text("\n".join(rows[1:] + rows[:1]) + "\n")
    r = posttrain("run", f"recipe={_sft_recipe(tmp_path, train='train2.jsonl')}", cwd=tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "was written for other data" in r.stderr, r.stderr
    assert (ckpt / "latest").read_text().strip() == step

    r = posttrain("run", f"recipe={_sft_recipe(tmp_path, lr='1.0e-3')}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "is stale (lr 0.003 -> 0.001); starting the stage over" in r.stdout, r.stdout
    assert "resumed" not in r.stdout
    assert stage_manifest(run_dir, "sft")["metrics"]["steps"] == 40


def test_killing_the_cli_stops_its_ranks_with_a_checkpoint(tmp_path):
    """kill -9 of `posttrain run` alone: torchrun and the ranks (sessions of their own) get SIGTERM
    from the kernel as their parent dies, save a checkpoint and stop; nothing trains on unseen."""
    # 400 steps of ~15 ms: killed after step 5, the ranks must not finish first (at 20 steps, on a
    # busy machine, they did before this test's kill landed).
    rec = _sft_recipe(tmp_path, steps=400)
    run_dir = tmp_path / "runs" / "sft"
    args = ["run", f"recipe={rec}", "cluster.nproc_per_node=2", "stages.sft.save_every=null"]
    exe = Path(sys.executable).parent / "posttrain"
    proc = subprocess.Popen([str(exe), *args], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _last_step(run_dir, "sft") < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    under = {p: _cmdline(p) for p in _tree(proc.pid)[1:]}
    ranks = [p for p, c in under.items() if "pipeline.worker" in c and "torch.distributed.run" not in c]
    assert len(ranks) == 2 and any("torch.distributed.run" in c for c in under.values()), under
    proc.kill()
    proc.wait()
    deadline = time.time() + 60
    while any(_cmdline(p) == c for p, c in under.items()):  # torchrun and both ranks gone
        assert time.time() < deadline, "the ranks outlived the killed CLI by a minute"
        time.sleep(0.2)
    ckpt = (run_dir / "sft" / "checkpoints" / "latest").read_text().strip()
    assert "stopped by SIGTERM" in (run_dir / "sft" / "logs" / "rank0.log").read_text()
    r = posttrain("run", f"recipe={rec}", "cluster.nproc_per_node=2", "stages.sft.save_every=null", cwd=tmp_path)
    assert r.returncode == 0 and f"[sft] resumed from {ckpt}" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
