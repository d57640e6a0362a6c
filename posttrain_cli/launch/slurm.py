"""One SLURM job per stage, chained by `afterok` from the stage graph.

    posttrain run recipe=tulu3 model=llama3_1_8b cluster=slurm cluster.partition=gpu   # submit, return
    posttrain run recipe=tiny cluster=slurm --wait      # submit and follow the jobs to the end
    posttrain run recipe=tiny cluster=slurm --dry-run   # write RUN_DIR/<stage>/job.sbatch, print, submit nothing
    posttrain status runs/tiny                          # each stage's job id and state

- Each stage that is not done becomes a batch job (RUN_DIR/<stage>/job.sbatch) with its own
  nodes, GPUs, time and partition (cluster.* with the stage's `resources` over them). It depends
  (`afterok`) on the jobs of the stages it reads; independent branches run at once. A failed job
  cancels its dependents (`--kill-on-invalid-dep=yes`): they never start.
- Inside a job, `srun` starts one task per rank (nodes x ranks per node); each takes its rank,
  world size and local rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and the rendezvous
  is the job's first node (engine/dist.py).
- `--signal=USR1@<signal_seconds>` warns the ranks before the time limit; a stage then saves a
  checkpoint and exits 75 (EXIT_STOPPED), on which the job script requeues the job (cluster.requeue);
  the requeued job resumes from the checkpoint (engine/checkpoint.py). A preemption's SIGTERM does
  the same.
- After srun, the job records the outcome in the stage's manifest (`finish`), so a failed stage
  says so with its log even when no `posttrain` process is watching. What the job could not
  record (killed at its time limit, a node lost) `posttrain status` finds from SLURM's own state.

`finish` runs on the node without torch: python -m posttrain_cli.launch.slurm finish STAGE_DIR RC
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from posttrain_cli.errors import StageFailed, UserError
from posttrain_cli.pipeline import manifest, stagedir
from posttrain_cli.pipeline.stagedir import EXIT_STOPPED, Step

JOB_FILE = "job.sbatch"
# Job states after which a job does nothing more (squeue / scontrol spelling).
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
        "DEADLINE", "SPECIAL_EXIT"}
# Manifest states of a stage handed to SLURM and not finished (stopped: checkpointed, maybe requeued).
LIVE_STATUS = ("queued", "running", "stopped")


def _python(cluster: dict) -> str:
    return cluster["python"] or sys.executable


def directives(run: dict, step: Step) -> list[str]:
    """The #SBATCH lines of a stage's job."""
    from posttrain_cli.config.cluster import job_resources, ranks_per_node

    res = job_resources(run["cluster"], step.node.cfg)
    name = step.node.name
    logs = (step.stage_dir / "logs").resolve()
    out = [f"--job-name=posttrain.{run['name']}.{name}",
           f"--output={logs}/slurm-%j.out",
           "--open-mode=append",
           f"--nodes={res['nodes']}",
           f"--ntasks-per-node={ranks_per_node(res)}"]
    if res["gpus_per_node"]:
        out.append(f"--gpus-per-node={res['gpus_per_node']}")
    for key, flag in (("cpus_per_task", "cpus-per-task"), ("mem", "mem"), ("time", "time"),
                      ("partition", "partition"), ("account", "account"), ("qos", "qos"),
                      ("constraint", "constraint")):
        if res[key] is not None:
            out.append(f"--{flag}={res[key]}")
    if run["cluster"]["signal_seconds"]:
        # No `B:`: the signal goes to the srun tasks (every rank), not to this shell.
        out.append(f"--signal=USR1@{run['cluster']['signal_seconds']}")
    out.append("--requeue" if run["cluster"]["requeue"] else "--no-requeue")
    out.append("--kill-on-invalid-dep=yes")
    out += [str(a) for a in run["cluster"]["sbatch_args"]]
    return out


def job_script(run: dict, step: Step, spec_path: Path) -> str:
    cluster = run["cluster"]
    py = shlex.quote(_python(cluster))
    stage_dir = shlex.quote(str(step.stage_dir.resolve()))
    srun = " ".join(["srun", "--kill-on-bad-exit=1", *[shlex.quote(str(a)) for a in cluster["srun_args"]],
                     py, "-m", "posttrain_cli.pipeline.worker", shlex.quote(str(spec_path.resolve()))])
    lines = ["#!/bin/bash",
             f"# posttrain: stage '{step.node.name}' ({step.node.kind}) of run {run['name']}; written by "
             f"`posttrain run`, resubmitted by it when needed.",
             *[f"#SBATCH {d}" for d in directives(run, step)],
             "",
             *[str(line) for line in cluster["setup"]],
             "export POSTTRAIN_SLURM_JOB=$SLURM_JOB_ID PYTHONUNBUFFERED=1",
             'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
             # The rendezvous: the job's first node, a port from the job id (two jobs on one node differ).
             'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
             "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
             f'echo "posttrain: stage {step.node.name}, job $SLURM_JOB_ID, attempt $((${{SLURM_RESTART_COUNT:-0}} + 1)), '
             f'nodes $SLURM_JOB_NODELIST, $SLURM_NTASKS ranks, rendezvous $MASTER_ADDR:$MASTER_PORT"',
             srun,
             "rc=$?",
             f"{py} -m posttrain_cli.launch.slurm finish {stage_dir} $rc",
             *(_requeue_lines() if cluster["requeue"] else []),
             "exit $rc",
             ""]
    return "\n".join(lines)


def _requeue_lines() -> list[str]:
    """A stage that stopped on a signal with its checkpoint saved puts its job back in the queue,
    after `finish` recorded it stopped (SLURM ends this script when it requeues the job)."""
    return [f"if [ $rc -eq {EXIT_STOPPED} ]; then",
            '  echo "posttrain: stopped with a checkpoint; requeueing job $SLURM_JOB_ID, which resumes from it"',
            '  scontrol requeue "$SLURM_JOB_ID" || echo "posttrain: scontrol requeue $SLURM_JOB_ID failed '
            '(run the same command to resume)"',
            "fi"]


# ---------------------------------------------------------------------------------------- SLURM calls


def _slurm(args: list[str], what: str) -> str:
    exe = shutil.which(args[0])
    if exe is None:
        raise UserError(f"cluster=slurm: `{args[0]}` is not on PATH; run posttrain on a SLURM login node "
                        f"(or use --dry-run to write the job scripts only)")
    r = subprocess.run([exe, *args[1:]], capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise StageFailed(f"{what}: {' '.join(args)} failed: {msg[-1] if msg else f'exit code {r.returncode}'}")
    return r.stdout


def sbatch(script: Path, after: list[str], what: str) -> str:
    args = ["sbatch", "--parsable"]
    if after:
        args.append("--dependency=afterok:" + ":".join(after))
    out = _slurm(args + [str(Path(script).resolve())], what).strip()
    return out.split(";")[0]


def job_states(ids: list[str]) -> dict[str, dict]:
    """{job id: {"state", "reason", "restarts", "exit_code"}} for the jobs SLURM still knows
    (`scontrol show job ID`: pending, running and recently finished; no accounting store needed).
    A job SLURM no longer lists is left out; SlurmUnreachable when the controller does not answer."""
    if not ids or shutil.which("scontrol") is None:
        return {}
    out = {}
    for jid in dict.fromkeys(ids):
        r = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True)
        if r.returncode != 0:
            err = (r.stderr or r.stdout).strip()
            if "Invalid job id" in err:
                continue  # finished long enough ago that SLURM forgot it
            raise SlurmUnreachable(err.splitlines()[-1:] or [f"exit code {r.returncode}"])
        for line in r.stdout.splitlines():
            fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            if fields.get("JobId") == jid:
                out[jid] = {"state": fields.get("JobState", "UNKNOWN"), "reason": fields.get("Reason", ""),
                            "restarts": int(fields.get("Restarts", "0") or 0), "exit_code": fields.get("ExitCode", "")}
    return out


class SlurmUnreachable(Exception):
    """scontrol failed: job states are unknown (not: the jobs are gone)."""


# ---------------------------------------------------------------------------------------- submit


def check(cluster: dict) -> None:
    """Nothing to check before the specs are written: `sbatch` says what SLURM refuses."""


def execute(run: dict, pending: list[Step], say, *, dry_run: bool = False, wait: bool = False) -> None:
    """Submit the pending stages and return; `wait`: follow their jobs to the end."""
    jobs = submit(run, pending, say, dry_run=dry_run)
    if wait and jobs and not dry_run:
        follow(Path(run["run_dir"]), jobs, run["cluster"]["poll_seconds"], say)


def submit(run: dict, pending: list[Step], say, *, dry_run: bool = False) -> dict[str, str]:
    """Write each pending stage's spec and job script; submit them in graph order with `afterok`
    on the jobs of their inputs -> {stage: job id}. A stage whose job is still queued or running
    with the same fingerprint is not submitted again. `dry_run`: print the scripts, submit nothing."""
    jobs: dict[str, str] = {}
    names = {s.node.name for s in pending}
    live = {} if dry_run else _live_jobs(pending)
    for step in pending:
        name = step.node.name
        if name in live:
            jid, fp = live[name]
            if fp == step.fingerprint:
                jobs[name] = jid
                say(f"[{name}] already in the queue as job {jid}")
                continue
            raise UserError(f"stages.{name}: job {jid} is still queued or running an earlier config of this "
                            f"stage; cancel it first (scancel {jid}) or wait for it")
        if dry_run:
            spec = stagedir.write_spec(run, step, step.action == "eval")
        else:
            spec = stagedir.prepare(run, step, say, status="queued")
            (step.stage_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch --output needs it
        script = step.stage_dir / JOB_FILE
        script.write_text(job_script(run, step, spec))
        if dry_run:
            deps = " ".join(f"--dependency=afterok:<job of {d}>" for d in step.node.deps if d in names)
            say(f"# {script}" + (f"   (sbatch {deps})" if deps else ""))
            say(script.read_text())
            continue
        after = [jobs[d] for d in step.node.deps if d in jobs]
        try:
            jid = sbatch(script, after, f"stage '{name}'")
        except Exception:
            manifest.update(step.stage_dir, status="failed", error="sbatch failed", finished=time.time())
            raise
        jobs[name] = jid
        manifest.update(step.stage_dir, job_id=jid, script=str(script.resolve()),
                        log=str((step.stage_dir / "logs" / f"slurm-{jid}.out").resolve()), submitted=time.time())
        say(f"[{name}] submitted job {jid}" + (f" (after {', '.join(after)})" if after else ""))
    return jobs


def _live_jobs(steps: list[Step]) -> dict[str, tuple[str, str]]:
    """Stages whose recorded job SLURM still runs or holds -> (job id, fingerprint)."""
    recorded = {}
    for step in steps:
        m = manifest.read(step.stage_dir) or {}
        if m.get("status") in LIVE_STATUS and m.get("job_id"):
            recorded[step.node.name] = (str(m["job_id"]), m.get("fingerprint"))
    try:
        states = job_states([jid for jid, _ in recorded.values()])
    except SlurmUnreachable as e:
        raise UserError(f"cluster=slurm: scontrol cannot reach the controller ({e.args[0][0]}); stages "
                        f"{', '.join(recorded)} may still be queued: try again when SLURM answers") from None
    return {name: rec for name, rec in recorded.items() if alive(states.get(rec[0]))}


# ---------------------------------------------------------------------------------------- follow


def alive(state: dict | None) -> bool:
    """SLURM still holds the job: pending (a requeued job too), running, completing."""
    return state is not None and state["state"] not in DONE


def reconcile(run_dir: Path, names: list[str]) -> dict[str, dict]:
    """Bring the manifests up to date with SLURM -> {stage: {"job", "state", "reason"}} for the
    stages that have a job. A job that ended while its stage was queued or running marks the stage
    failed, or cancelled when it never started because an input stage failed."""
    recs = {}
    for name in names:
        m = manifest.read(Path(run_dir) / name) or {}
        if m.get("job_id"):
            recs[name] = str(m["job_id"])
    try:
        states = job_states(list(recs.values()))
        have_slurm = shutil.which("scontrol") is not None
    except SlurmUnreachable:
        states, have_slurm = {}, False
    out = {}
    for name, jid in recs.items():
        st = states.get(jid)
        out[name] = {"job": jid, "state": st["state"] if st else ("gone" if have_slurm else "unknown"),
                     "reason": st["reason"] if st else "", "alive": alive(st)}
        sdir = Path(run_dir) / name
        m = manifest.read(sdir) or {}
        # "stopped": the stage saved a checkpoint and its job was not requeued; a re-run resumes it.
        if not have_slurm or alive(st) or m.get("status") not in ("queued", "running"):
            continue
        if st and (st["reason"] == "DependencyNeverSatisfied" or (st["state"] == "CANCELLED" and m["status"] == "queued")):
            manifest.update(sdir, status="cancelled", finished=time.time(),
                            error=f"job {jid} never started: an input stage did not complete ({st['reason']})")
            continue
        why = f"job {jid} ended {st['state']}" if st else f"job {jid} ended (SLURM no longer lists it)"
        if st and st["exit_code"] not in ("", "0:0"):
            why += f" (exit code {st['exit_code']})"
        manifest.update(sdir, status="failed", error=f"{why} before the stage completed", finished=time.time())
    return out


def follow(run_dir: Path, jobs: dict[str, str], poll: float, say) -> None:
    """Follow the jobs until SLURM holds none of them; say each change of state. Raises StageFailed
    (exit 1) naming the first stage that did not complete and its log."""
    run_dir, last = Path(run_dir), {}
    while True:
        seen = reconcile(run_dir, list(jobs))
        for name in jobs:
            status = (manifest.read(run_dir / name) or {}).get("status")
            slurm = seen.get(name, {}).get("state", "?")
            now = f"{status}, SLURM {slurm.lower()}" + (f" ({seen[name]['reason']})"
                                                       if seen.get(name, {}).get("reason") not in ("", "None") else "")
            if last.get(name) != now:
                say(f"[{name}] job {jobs[name]}: {now}")
                last[name] = now
        if not any(seen[n]["alive"] for n in jobs if n in seen):
            break
        time.sleep(poll)
    final = {n: manifest.read(run_dir / n) or {} for n in jobs}
    failed = [n for n in jobs if final[n].get("status") != "completed"]
    if failed:
        first = next((n for n in failed if final[n].get("status") in ("failed", "stopped")), failed[0])
        m = final[first]
        others = [n for n in failed if n != first]
        raise StageFailed(f"stage '{first}' {m.get('status')}: {m.get('error')} (log: {m.get('log')})"
                          + (f"; not completed either: {', '.join(others)}" if others else ""))


# ---------------------------------------------------------------------------------------- finish


def finish(stage_dir: Path, code: int) -> None:
    """The end of a stage's job: a non-zero srun leaves the manifest failed (or stopped) with the
    worker's message and the job's log."""
    m = manifest.read(stage_dir) or {}
    if code == 0 and m.get("status") == "completed":
        return
    job = os.environ.get("SLURM_JOB_ID")
    log = stage_dir / "logs" / f"slurm-{job}.out" if job else stage_dir / "logs" / "rank0.log"
    stagedir.record_failure(stage_dir, code, log, eval_only=False)


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "finish":
        finish(Path(argv[1]), int(argv[2]))
        return 0
    print("usage: python -m posttrain_cli.launch.slurm finish STAGE_DIR EXIT_CODE", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

