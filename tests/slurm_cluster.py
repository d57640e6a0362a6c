"""A real one-node SLURM cluster for tests (scripts/local_slurm.py), and helpers to follow its jobs.

In a test file, either of:

    pytest_plugins = ["tests.slurm_cluster"]            # the fixture, registered once
    from tests.slurm_cluster import slurm_cluster       # noqa: F401 (the fixture, by import)

then

    from tests.slurm_cluster import sbatch, wait_job

    def test_job(slurm_cluster, tmp_path):
        job = sbatch("--wrap", "hostname", env=slurm_cluster["env"], cwd=tmp_path)
        assert wait_job(job, slurm_cluster["env"]) == "COMPLETED"

`slurm_cluster` (session scope) brings the cluster up once per test run (installing the SLURM
packages with apt-get when missing and root) and yields {"env": os.environ copy with SLURM_CONF
set and an enclosing job's other SLURM_* variables removed, "dir": the cluster's directory (conf,
logs), "conf": its slurm.conf}. Where SLURM cannot be brought up the test is skipped with the
reason (POSTTRAIN_REQUIRE_SLURM=1 makes that a failure). Under pytest-xdist the workers share
one cluster: the last one to finish stops it.

Job state comes from `scontrol show job` (no accounting store, so no sacct); a finished job stays
visible for 10 minutes (MinJobAge=600).
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "local_slurm.py"
# Installing the packages may take minutes; bringing up an installed cluster takes about a second.
UP_TIMEOUT = 1800
# JobState values after which a job does not run again by itself.
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                             "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"})
_fixture_uses = itertools.count()


def slurm_env(conf: Path | str) -> dict[str, str]:
    """os.environ with SLURM_CONF=conf, without the SLURM_* variables of a job this runs in (they
    would send srun/sbatch to that job on another cluster)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["SLURM_CONF"] = str(conf)
    return env


@contextmanager
def _locked(path: Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, 124, "", f"local_slurm: `{' '.join(args)}` timed out after {timeout:.0f} s")


def _reason(result: subprocess.CompletedProcess) -> str:
    lines = [l.strip() for l in (result.stderr or "").splitlines() if l.strip()]
    return lines[-1] if lines else f"local_slurm.py exited with {result.returncode}"


def _users(path: Path) -> list[str]:
    """Fixture users still alive ("pid:n" lines; a crashed worker's entry is dropped)."""
    alive = []
    for line in path.read_text().split() if path.exists() else []:
        pid = int(line.split(":")[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        alive.append(line)
    return alive


def _unavailable(reason: str):
    if os.environ.get("POSTTRAIN_REQUIRE_SLURM") == "1":
        pytest.fail(f"no SLURM cluster (POSTTRAIN_REQUIRE_SLURM=1): {reason}", pytrace=False)
    pytest.skip(f"no SLURM cluster: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster: {"env": ..., "dir": Path, "conf": Path} (module docstring)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's basetemp, which the workers' popen-gwN dirs are in
    cluster_dir = root / "slurm"
    if len(str(cluster_dir)) > 60:  # slurmd's unix sockets in DIR/spool must fit in 108 bytes
        digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
        cluster_dir = Path(tempfile.gettempdir()) / f"posttrain-slurm-{digest}"
    lock, users, failed = root / "slurm.lock", root / "slurm.users", root / "slurm.failed"
    me = f"{os.getpid()}:{next(_fixture_uses)}"

    with _locked(lock):
        if failed.exists():  # another worker of this run tried already
            _unavailable(failed.read_text().strip())
        result = _script("up", "--install", "--dir", str(cluster_dir), timeout=UP_TIMEOUT)
        exports = [l for l in result.stdout.splitlines() if l.startswith("export SLURM_CONF=")]
        if result.returncode != 0 or not exports:
            reason = _reason(result)
            if result.returncode != 3:  # it tried and failed: the daemons' logs say why
                reason += f" (logs: {cluster_dir}/*.log)"
            failed.write_text(reason + "\n")
            _unavailable(reason)
        users.write_text("".join(u + "\n" for u in _users(users) + [me]))
    conf = Path(exports[-1].split("=", 1)[1])

    try:
        yield {"env": slurm_env(conf), "dir": cluster_dir, "conf": conf}
    finally:
        with _locked(lock):
            left = [u for u in _users(users) if u != me]
            users.write_text("".join(u + "\n" for u in left))
            if not left:
                down = _script("down", "--dir", str(cluster_dir), timeout=120)
                if down.returncode != 0:
                    warnings.warn(f"stopping the SLURM cluster in {cluster_dir} failed: {_reason(down)}")
                elif not cluster_dir.is_relative_to(root):
                    shutil.rmtree(cluster_dir, ignore_errors=True)


def sbatch(*args: str, env: dict, cwd: Path | str | None = None, timeout: float = 60) -> int:
    """Submit with `sbatch --parsable ARGS`; the job id."""
    result = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return int(result.stdout.strip().split(";")[0])


_KEY = re.compile(r"^[A-Za-z][\w:/.]*=")


def job_info(job_id: int | str, env: dict) -> dict[str, str] | None:
    """`scontrol show job -o ID` as {field: value} (the first line for an array job); None when
    the controller does not know the job (never submitted, or purged after MinJobAge).
    A value with spaces (Command with arguments) is kept whole unless a word in it looks like KEY=."""
    result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], env=env, capture_output=True,
                            text=True, timeout=30)
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise RuntimeError(f"scontrol show job {job_id} failed ({result.returncode}): {result.stderr.strip()}")
    lines = result.stdout.strip().splitlines()
    info: dict[str, str] = {}
    key = None
    for word in (lines[0].split() if lines else []):
        if _KEY.match(word):
            key, value = word.split("=", 1)
            info[key] = value
        elif key is not None:
            info[key] += " " + word
    return info or None


def job_state(job_id: int | str, env: dict) -> str | None:
    """The job's JobState (PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...),
    or None when the controller does not know it."""
    info = job_info(job_id, env)
    return info.get("JobState") if info else None


def wait_job(job_id: int | str, env: dict, timeout: float = 120, states=TERMINAL_STATES,
             poll: float = 0.25) -> str:
    """Poll `scontrol show job` until the job's JobState is one of `states` (by default a final
    one: COMPLETED, FAILED, CANCELLED, TIMEOUT, ...); that state. TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    state = None
    while True:
        state = job_state(job_id, env)
        if state is None:
            raise RuntimeError(f"SLURM job {job_id} is unknown to the controller")
        if state in states:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"SLURM job {job_id} still {state} after {timeout:.0f} s (waited for {sorted(states)})")
        time.sleep(poll)
