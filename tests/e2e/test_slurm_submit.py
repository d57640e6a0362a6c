"""cluster=slurm as a user types it, without a cluster: --dry-run writes and prints the job
scripts and submits nothing; a submission hands sbatch the dependencies of the stage graph (a
stand-in sbatch on PATH records its arguments); errors from sbatch are one line."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.conftest import posttrain

STAGES = ["sft", "rm", "dpo", "grpo", "soup"]


def _fake_slurm(tmp: Path, fail: str | None = None) -> dict:
    """sbatch that logs its arguments and answers job ids 101, 102, ...; scontrol that lists them."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    log = tmp / "sbatch.log"
    sbatch = bin_dir / "sbatch"
    body = (f'echo "sbatch: error: {fail}" >&2; exit 1' if fail else
            f'n=$(( $(wc -l < {log} 2>/dev/null || echo 0) + 101 )); echo "$*" >> {log}; echo "$n"')
    sbatch.write_text(f"#!/bin/bash\n{body}\n")
    scontrol = bin_dir / "scontrol"
    # `scontrol show job -o ID`: every submitted job pending, until the test writes `forget` (SLURM
    # purged them: "Invalid job id specified").
    scontrol.write_text(f"#!/bin/bash\nid=${{@: -1}}\n"
                        f"[ -e {tmp}/down ] && {{ echo 'slurm_load_jobs error: Unable to contact slurm controller' >&2; exit 1; }}\n"
                        f"[ -e {tmp}/forget ] && {{ echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1; }}\n"
                        f"echo \"JobId=$id JobName=x JobState=PENDING Reason=Dependency\"\n")
    for f in (sbatch, scontrol):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_the_readmes_dry_run_fits_the_default_eight_gpus(tmp_path):
    # `posttrain run recipe=tiny cluster=slurm --dry-run` as the README has it: gpus_per_node 8, so 8
    # ranks a stage; the tiny recipe's micro batches are each rank's share of the step.
    r = posttrain("run", "recipe=tiny", "cluster=slurm", "--dry-run", cwd=tmp_path, env=_fake_slurm(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    plan = posttrain("plan", "recipe=tiny", "cluster=slurm", cwd=tmp_path)
    assert "global 128 = micro 16 x 8 rank(s) x 1 accumulation" in plan.stdout, plan.stdout


def test_dry_run_writes_and_prints_the_job_scripts(tmp_path):
    env = _fake_slurm(tmp_path)
    r = posttrain("run", "recipe=tiny", "cluster=slurm", "cluster.gpus_per_node=0", "cluster.partition=debug",
                  "+stages.soup.resources.time=10", "--dry-run", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "runs" / "tiny"
    for s in STAGES:
        script = (run_dir / s / "job.sbatch").read_text()
        assert f"# {run_dir.resolve() / s / 'job.sbatch'}" in r.stdout or f"# runs/tiny/{s}/job.sbatch" in r.stdout
        assert script in r.stdout  # printed whole, not wrapped
        assert "#SBATCH --partition=debug" in script
        assert not (run_dir / s / "manifest.json").exists()
    assert "#SBATCH --time=10" in (run_dir / "soup" / "job.sbatch").read_text()
    assert "--dependency=afterok:<job of dpo> --dependency=afterok:<job of grpo>" in r.stdout
    assert not (tmp_path / "sbatch.log").exists()  # nothing submitted


def test_submission_follows_the_stage_graph(tmp_path):
    env = _fake_slurm(tmp_path)
    r = posttrain("run", "recipe=tiny", "cluster=slurm", "cluster.gpus_per_node=0", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "sbatch.log").read_text().splitlines()
    run_dir = (tmp_path / "runs" / "tiny").resolve()
    jobs = {s: str(101 + i) for i, s in enumerate(STAGES)}
    deps = {"sft": [], "rm": ["sft"], "dpo": ["sft", "rm"], "grpo": ["dpo"], "soup": ["dpo", "grpo"]}
    assert len(calls) == len(STAGES)
    for call, s in zip(calls, STAGES):
        want = ["--parsable"] + ([f"--dependency=afterok:{':'.join(jobs[d] for d in deps[s])}"] if deps[s] else [])
        assert call.split() == want + [str(run_dir / s / "job.sbatch")], call
        m = json.loads((run_dir / s / "manifest.json").read_text())
        assert m["status"] == "queued" and m["job_id"] == jobs[s]
        assert m["log"] == str(run_dir / s / "logs" / f"slurm-{jobs[s]}.out")
    assert "Submitted. Follow with: posttrain status runs/tiny" in r.stdout
    st = posttrain("status", "runs/tiny", cwd=tmp_path, env=env)
    assert "pending (Dependency)" in st.stdout and "queued" in st.stdout, st.stdout
    # The controller does not answer: that says nothing about the jobs; nothing is marked.
    (tmp_path / "down").touch()
    st = posttrain("status", "runs/tiny", cwd=tmp_path, env=env)
    assert st.returncode == 0 and "unknown" in st.stdout, st.stdout
    assert json.loads((run_dir / "sft" / "manifest.json").read_text())["status"] == "queued"
    r = posttrain("run", "recipe=tiny", "cluster=slurm", "cluster.gpus_per_node=0", cwd=tmp_path, env=env)
    assert r.returncode == 2 and "scontrol cannot reach the controller" in r.stderr, r.stderr
    (tmp_path / "down").unlink()
    # SLURM no longer knows the jobs, and none completed: status marks them failed, with why.
    (tmp_path / "forget").touch()
    st = posttrain("status", "runs/tiny", cwd=tmp_path, env=env)
    assert st.returncode == 0
    assert "sft: job 101 ended (SLURM no longer lists it) before the stage completed" in st.stdout, st.stdout
    assert json.loads((run_dir / "sft" / "manifest.json").read_text())["status"] == "failed"


def test_sbatch_error_is_one_line(tmp_path):
    env = _fake_slurm(tmp_path, fail="Invalid account or account/partition combination specified")
    r = posttrain("run", "recipe=tiny", "cluster=slurm", "cluster.gpus_per_node=0", "cluster.account=nope",
                  cwd=tmp_path, env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: stage 'sft': sbatch --parsable "), lines
    assert lines[0].endswith("failed: sbatch: error: Invalid account or account/partition combination specified")
    assert "Traceback" not in r.stderr
    m = json.loads((tmp_path / "runs" / "tiny" / "sft" / "manifest.json").read_text())
    assert m["status"] == "failed"
