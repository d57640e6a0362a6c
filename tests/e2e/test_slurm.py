"""cluster=slurm against a real one-node SLURM cluster (slurmctld + slurmd + munge, brought up by
scripts/local_slurm.py through tests/slurm_cluster.py; skipped with the reason where it cannot be).

- the tiny recipe as one job per stage, chained by afterok, run as a user types it;
- a stage as a 2-task job (srun, gloo) that trains like 1 rank;
- a preemption: USR1 mid-stage, the stage checkpoints and requeues its job, which resumes to the
  weights of a run that was never stopped;
- a failing stage: marked failed with its log, its dependents never start.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import mini_recipe, posttrain, sft_stage, stage_manifest, tiny_rows, write_jsonl
from tests.slurm_cluster import job_info, slurm_cluster  # noqa: F401 - the fixture

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

CPU = ["cluster=slurm", "cluster.gpus_per_node=0", "cluster.poll_seconds=1"]


def _env(cluster: dict, **extra) -> dict:
    # One thread per rank, as the jobs run (the weights are compared with a local run's).
    return {**cluster["env"], "OMP_NUM_THREADS": "1", **extra}


def _job(run_dir: Path, stage: str) -> str:
    return str(stage_manifest(run_dir, stage)["job_id"])


# recipes/tiny.yaml's graph: dpo's eval reads the reward model; the soup merges dpo and grpo.
DEPS = {"sft": [], "rm": ["sft"], "dpo": ["sft", "rm"], "grpo": ["dpo"], "soup": ["dpo", "grpo"]}


def test_tiny_recipe_runs_as_one_job_per_stage(slurm_cluster, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    t0 = time.time()
    r = posttrain("run", "recipe=tiny", "scale=tiny", *CPU, cwd=tmp_path, env=_env(slurm_cluster))
    submit_seconds = time.time() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    stages = ["sft", "rm", "dpo", "grpo", "soup"]
    jobs = {s: _job(run_dir, s) for s in stages}
    assert len(set(jobs.values())) == len(stages)
    # Returned after submitting: nothing has finished yet, and it says how to follow.
    assert "Submitted. Follow with: posttrain status" in r.stdout
    for s, deps in DEPS.items():
        after = ", ".join(jobs[d] for d in deps)
        assert f"[{s}] submitted job {jobs[s]}" + (f" (after {after})" if deps else "") + "\n" in r.stdout, r.stdout
    assert submit_seconds < 60
    script = (run_dir / "soup" / "job.sbatch").read_text()
    assert "#SBATCH --kill-on-invalid-dep=yes" in script and "srun" in script

    r = posttrain("run", "recipe=tiny", "scale=tiny", *CPU, cwd=tmp_path, env=_env(slurm_cluster))
    assert r.returncode == 0
    for s in stages:  # a second run while they are queued submits nothing again
        assert f"[{s}] already in the queue as job {jobs[s]}" in r.stdout or f"[{s}] skipped" in r.stdout, r.stdout

    deadline = time.time() + 900
    while time.time() < deadline:
        st = posttrain("status", str(run_dir), cwd=tmp_path, env=_env(slurm_cluster))
        assert st.returncode == 0, st.stderr
        if all(stage_manifest(run_dir, s)["status"] not in ("queued", "running") for s in stages):
            break
        time.sleep(3)
    for s in stages:
        m = stage_manifest(run_dir, s)
        assert m["status"] == "completed", (s, m)
        assert (run_dir / s / "job.sbatch").exists() and (run_dir / s / "logs" / f"slurm-{jobs[s]}.out").exists()
    # afterok: a stage started only after every stage it reads had finished.
    t = {s: stage_manifest(run_dir, s)["timings"] for s in stages}
    for s, deps in DEPS.items():
        for d in deps:
            assert t[s]["started"] >= t[d]["finished"], (s, d)
    st = posttrain("status", str(run_dir), cwd=tmp_path, env=_env(slurm_cluster))
    for s in stages:
        assert any(line.split()[:1] == [s] and jobs[s] in line.split() and "completed" in line
                   for line in st.stdout.splitlines()), st.stdout
    # The same command again: everything is done, nothing is submitted.
    r = posttrain("run", "recipe=tiny", "scale=tiny", *CPU, cwd=tmp_path, env=_env(slurm_cluster))
    assert r.returncode == 0 and "submitted job" not in r.stdout


def _sft(name: str, train: Path, steps: int, **more) -> str:
    return sft_stage(name, data=train, lr=3.0e-3, max_steps=steps, global_batch_size=8, micro_batch_size=4,
                     save_every=None, **more)


def test_two_task_job_trains_like_one_rank_and_branches_run_at_once(slurm_cluster, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", tiny_rows("sft_train.jsonl", 256, parse=False))
    # `one` and `three` are independent 1-CPU jobs on a 2-CPU node: they run at the same time. 20
    # steps (~10 s, longer on a busy machine): SLURM may start the second some seconds after the first.
    body = (_sft("one", train, 20) + _sft("three", train, 20, from_="${model.path}") +
            _sft("two", train, 20, from_="${model.path}", resources="{nproc_per_node: 2}"))
    rec = mini_recipe(tmp_path, stages=body, name="tasks")
    run_dir = tmp_path / "runs" / "tasks"
    r = posttrain("run", f"recipe={rec}", *CPU, "--wait", cwd=tmp_path, env=_env(slurm_cluster))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two = stage_manifest(run_dir, "two")
    assert two["batch"]["world_size"] == 2
    log = (run_dir / "two" / "logs" / f"slurm-{two['job_id']}.out").read_text()
    assert "2 ranks" in log and (run_dir / "two" / "logs" / "rank1.log").exists()
    assert "#SBATCH --ntasks-per-node=2" in (run_dir / "two" / "job.sbatch").read_text()
    one = [json.loads(l)["loss"] for l in (run_dir / "one" / "metrics.jsonl").read_text().splitlines()]
    two_l = [json.loads(l)["loss"] for l in (run_dir / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two_l) == 20
    assert max(abs(a - b) for a, b in zip(one, two_l)) < 1e-4, (one, two_l)
    t1, t3 = (stage_manifest(run_dir, s)["timings"] for s in ("one", "three"))
    assert t1["started"] < t3["finished"] and t3["started"] < t1["finished"], (t1, t3)


def test_preempted_stage_requeues_and_resumes_to_the_same_weights(slurm_cluster, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", tiny_rows("sft_train.jsonl", 512, parse=False))
    rec = mini_recipe(tmp_path, stages=_sft("sft", train, 400), name="pre")
    straight = tmp_path / "straight"
    r = posttrain("run", f"recipe={rec}", f"run_dir={straight}", cwd=tmp_path, env=_env(slurm_cluster))
    assert r.returncode == 0, r.stderr[-2000:]

    run_dir = tmp_path / "runs" / "pre"
    r = posttrain("run", f"recipe={rec}", *CPU, cwd=tmp_path, env=_env(slurm_cluster))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job = _job(run_dir, "sft")
    deadline = time.time() + 300
    while time.time() < deadline:  # mid-stage: past step 30 of 400
        rows = (run_dir / "sft" / "metrics.jsonl")
        if rows.exists() and len(rows.read_text().splitlines()) >= 30:
            break
        time.sleep(0.1)
    # What SLURM does at --signal=USR1@<seconds> before the time limit, now.
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm_cluster["env"], check=True)
    r = posttrain("run", f"recipe={rec}", *CPU, "--wait", cwd=tmp_path, env=_env(slurm_cluster), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"[sft] already in the queue as job {job}" in r.stdout
    log = (run_dir / "sft" / "logs" / f"slurm-{job}.out").read_text()
    assert "stopped by SIGUSR1 at step" in (run_dir / "sft" / "logs" / "rank0.log").read_text()
    assert f"job {job}, attempt 2" in log and "[sft] resumed from step-" in log, log[-3000:]
    assert int(job_info(job, slurm_cluster["env"])["Restarts"]) >= 1
    m = stage_manifest(run_dir, "sft")
    assert m["status"] == "completed" and m["metrics"]["steps"] == 400
    a = load_file(straight / "sft" / "model" / "model.safetensors")
    b = load_file(run_dir / "sft" / "model" / "model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_failed_stage_is_marked_and_its_dependents_never_start(slurm_cluster, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", tiny_rows("sft_train.jsonl", 64, parse=False))
    # Every row is longer than 4 tokens and truncation=drop: the stage fails inside its job.
    body = (_sft("bad", train, 3, max_seq_len=4, truncation="drop") + _sft("after", train, 3, from_="bad") +
            _sft("last", train, 3, from_="after"))
    rec = mini_recipe(tmp_path, stages=body, name="fail")
    run_dir = tmp_path / "runs" / "fail"
    r = posttrain("run", f"recipe={rec}", *CPU, "--wait", cwd=tmp_path, env=_env(slurm_cluster))
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    job = _job(run_dir, "bad")
    assert "stage 'bad' failed" in r.stderr and "every row was dropped" in r.stderr, r.stderr
    assert f"slurm-{job}.out" in r.stderr and "Traceback" not in r.stderr
    assert stage_manifest(run_dir, "bad")["status"] == "failed"
    for s in ("after", "last"):
        m = stage_manifest(run_dir, s)
        assert m["status"] == "cancelled", m
        assert not (run_dir / s / "logs" / f"slurm-{m['job_id']}.out").exists()  # never started
        assert not (run_dir / s / "model").exists()
    st = posttrain("status", str(run_dir), cwd=tmp_path, env=_env(slurm_cluster))
    assert "failed" in st.stdout and "cancelled" in st.stdout and "every row was dropped" in st.stdout, st.stdout
