"""Run untrusted Python (a model's code completion) against tests in a separate, sandboxed process.

    result = run_tests(code, Tests("asserts", ["assert add(1, 2) == 3"]), Limits(timeout=5))
    result.score       # fraction of tests passed
    run_many([(code, tests), ...], limits, max_workers=4)   # concurrent sandboxes

One child process per call (the program rewards/sandbox_child.py, copied into the run's private
temp dir so the sandbox user can read it) runs the solution, then each test in try/except, and
reports one line per test on its stdout pipe; nothing is exec'd in the caller's process. Tests are either
"asserts" (Python snippets run in the solution's namespace, where `__name__` is not "__main__")
or "stdio" ((stdin, expected stdout) pairs: the program runs as __main__ once per case with fd 0
and fd 1 on files, and passes when its stdout equals the expected one up to trailing whitespace
on each line and blank lines at either end).

Isolation, strongest first (`isolation()` says which one this machine gets, found once by a
self-test):
  * "namespaces": `unshare --mount --net --pid --fork --kill-child` (plus --map-root-user when
    not root). No network (a fresh network namespace has only a down loopback); killing the
    process group kills pid 1 of the pid namespace and with it every fork; /tmp, /var/tmp and
    /dev/shm are fresh size-limited tmpfs and the working dir is /tmp/work on that tmpfs; every
    other mount is read-only (mount_setattr, Linux 5.12+; required unless root), so nothing the
    code writes reaches the host. As root the runner then drops to uid/gid 65534 (nobody) so that
    RLIMIT_NPROC binds (it never binds root); when the interpreter lives under a directory nobody
    cannot enter (pyenv in /root), that directory is overlaid, in the sandbox's mount namespace
    only, by a tmpfs holding just the path to the interpreter.
  * "unprivileged": no namespaces; as root, the child runs as nobody in a fresh throwaway dir.
    It can reach the network and write where nobody may; a fork that leaves the process group
    can outlive the run.
  * "plain": as "unprivileged" but as the caller's user: as root there is no process limit.
Always: `python -I`, a minimal environment, RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE,
RLIMIT_NPROC, RLIMIT_NOFILE, no core files, PR_SET_NO_NEW_PRIVS, a wall-clock timeout after which
the whole process group is SIGKILLed (`timeout -s KILL` also fires if the caller dies first), and
the host temp dir is deleted afterwards. Worst-case memory is max_processes x memory_mb.
Not a defence against code written to attack this runner (it shares the runner's interpreter).
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

NOBODY = 65534
_WORKDIR = "/tmp/work"  # inside the mount namespace, on its own tmpfs


@dataclass(frozen=True)
class Limits:
    # Wall-clock seconds for the whole run: start-up, solution and every test.
    timeout: float = 10.0
    # RLIMIT_AS of each process.
    memory_mb: int = 1024
    # RLIMIT_NPROC: processes (and threads) of the sandbox user; the runner is one of them.
    max_processes: int = 8
    # RLIMIT_FSIZE; the tmpfs working dir holds 4x this.
    file_size_mb: int = 16


@dataclass(frozen=True)
class Tests:
    kind: str  # "asserts" or "stdio"
    cases: list  # asserts: [python snippet]; stdio: [(stdin, expected stdout)]
    __test__ = False  # not a pytest class

    def __post_init__(self):
        if self.kind not in ("asserts", "stdio"):
            raise ValueError(f"tests kind {self.kind!r}: expected 'asserts' or 'stdio'")
        if not self.cases:
            raise ValueError("no tests to run")


@dataclass
class Result:
    passed: list[bool]
    timed_out: bool = False
    # The first error the solution or a test raised, or why the runner stopped early.
    error: str = ""

    @property
    def score(self) -> float:
        return sum(self.passed) / len(self.passed) if self.passed else 0.0


@dataclass(frozen=True)
class Isolation:
    mode: str  # "namespaces", "unprivileged" or "plain"
    # None in "namespaces" mode, else one line on what is missing and why.
    note: str | None = None
    prefix: tuple = field(default=(), repr=False)
    user: int | None = field(default=None, repr=False)  # subprocess user= (unprivileged mode)
    drop_to: int | None = field(default=None, repr=False)  # uid the runner drops to (namespaces as root)


def run_tests(code: str, tests: Tests, limits: Limits = Limits()) -> Result:
    """Run `code` and then `tests` in one sandboxed child process; never raises for anything the
    code does (it fails its tests). Raises RuntimeError when the sandbox itself cannot start."""
    iso = isolation()
    return _run(code, tests, limits, iso)


def run_many(jobs: list[tuple[str, Tests]], limits: Limits = Limits(),
             max_workers: int | None = None) -> list[Result | Exception]:
    """`run_tests` for each (code, tests), at most `max_workers` sandboxes at a time (default: the
    CPU count, at most 8). An item whose sandbox failed to start holds the exception instead."""
    if not jobs:
        return []
    iso = isolation()
    workers = max(1, min(max_workers or min(8, os.cpu_count() or 1), len(jobs)))

    def one(job):
        try:
            return _run(job[0], job[1], limits, iso)
        except Exception as e:  # noqa: BLE001  (reported per item)
            return e

    if workers == 1:
        return [one(job) for job in jobs]
    with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(one, jobs))


_isolation: Isolation | None = None
_isolation_lock = threading.Lock()


def isolation() -> Isolation:
    """The strongest isolation that works here, found once per process by running a small
    solution in each mode in turn."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _isolation = _probe()
        return _isolation


def _interpreter() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _blocker(path: str) -> str | None:
    """The topmost directory above `path` that other users cannot enter, if any."""
    parts = os.path.realpath(path).strip("/").split("/")
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d
    return None


def _candidates() -> list[Isolation]:
    root = os.geteuid() == 0
    out = []
    if shutil.which("unshare"):
        prefix = ("unshare", "--mount", "--net", "--pid", "--fork", "--kill-child")
        out.append(Isolation("namespaces", None, prefix if root else prefix + ("--map-root-user",),
                             drop_to=NOBODY if root else None))
    if root:
        out.append(Isolation("unprivileged", None, user=NOBODY))
    out.append(Isolation("plain", None))
    return out


def _probe() -> Isolation:
    tests = Tests("asserts", ["import fractions\nassert f() == fractions.Fraction(1)", "assert f() == 2"])
    why = []
    for iso in _candidates():
        try:
            got = _run("def f():\n    return 1\n", tests, Limits(timeout=30), iso)
            if got.passed == [True, False]:
                break
            why.append(f"{iso.mode}: self-test gave {got.passed} {got.error}".strip())
        except Exception as e:  # noqa: BLE001  (try the next mode)
            why.append(f"{iso.mode}: {e}")
    else:
        raise RuntimeError(f"code sandbox: no isolation mode works here ({'; '.join(why)})")
    if iso.mode == "namespaces":
        return iso
    user = "nobody" if iso.user == NOBODY else f"uid {os.geteuid()}"
    risks = (f"network reachable, files writable wherever {user} may write, "
             "forks that leave the process group can outlive the run")
    if os.geteuid() == 0 and iso.user is None:
        risks += ", no process limit (RLIMIT_NPROC does not bind root)"
    note = f"code sandbox: no namespaces ({'; '.join(why)}); running as {user} with rlimits only: {risks}"
    return Isolation(iso.mode, note, iso.prefix, iso.user, iso.drop_to)


def _run(code: str, tests: Tests, limits: Limits, iso: Isolation) -> Result:
    nonce = os.urandom(8).hex()
    host_dir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    try:
        spec = {
            "nonce": nonce, "code": code, "kind": tests.kind, "tests": [list(c) if isinstance(c, tuple) else c
                                                                       for c in tests.cases],
            "memory_mb": limits.memory_mb, "cpu_s": int(limits.timeout) + 1,
            "file_size_mb": limits.file_size_mb, "max_processes": limits.max_processes,
            "mounts": iso.mode == "namespaces", "drop_to": iso.drop_to, "unhide": [], "workdir": _WORKDIR,
        }
        if iso.drop_to is not None:
            blocker = _blocker(sys.base_prefix)
            if blocker:
                stage = os.path.join(host_dir, "stage")
                os.mkdir(stage)
                spec["unhide"].append([blocker, os.path.realpath(sys.base_prefix), stage])
        spec_path, child_path = os.path.join(host_dir, "spec.json"), os.path.join(host_dir, "child.py")
        with open(os.open(spec_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            json.dump(spec, f)
        with open(os.open(child_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(_child_source())
        if iso.user is not None:
            for path in (host_dir, spec_path, child_path):
                os.chown(path, iso.user, iso.user)
        return _supervise(_command(iso, child_path, spec_path, limits), iso, host_dir, nonce, len(tests.cases),
                          limits)
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


@cache
def _child_source() -> str:
    return Path(__file__).with_name("sandbox_child.py").read_text(encoding="utf-8")


def _command(iso: Isolation, child_path: str, spec_path: str, limits: Limits) -> list[str]:
    # -I: no PYTHON* variables, no user site, no script dir on sys.path; -B: writes no .pyc
    cmd = [_interpreter(), "-I", "-B", child_path, spec_path]
    cmd = list(iso.prefix) + cmd
    if shutil.which("timeout"):  # kills the group even if this process dies first
        cmd = ["timeout", "-s", "KILL", f"{limits.timeout + 2:.1f}"] + cmd
    return cmd


def _supervise(cmd: list[str], iso: Isolation, cwd: str, nonce: str, n_tests: int, limits: Limits) -> Result:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": cwd, "TMPDIR": cwd,
           # one thread each: BLAS pools would otherwise hit RLIMIT_NPROC / RLIMIT_AS
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    user = {"user": iso.user, "group": iso.user, "extra_groups": []} if iso.user is not None else {}
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=cwd, env=env, start_new_session=True, close_fds=True, **user)
    cap = 65536 + 400 * n_tests
    buf, done = bytearray(), (nonce + '{"done": true}').encode()
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            timed_out = not _read(sel, proc.stdout.fileno(), buf, time.monotonic() + limits.timeout,
                                  lambda: done in buf or len(buf) > cap)
            _killpg(proc.pid)  # in namespaces mode that includes pid 1, so every fork dies too
            # Every process in the sandbox holds the pipe: EOF means they are all gone.
            _read(sel, proc.stdout.fileno(), bytearray(), time.monotonic() + 2.0, lambda: False)
    finally:
        if proc.poll() is None:
            _killpg(proc.pid)
        proc.stdout.close()
        proc.wait()
    return _parse(buf[:cap].decode("utf-8", "replace"), nonce, n_tests, timed_out, proc.returncode)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read(sel, fd: int, buf: bytearray, deadline: float, enough) -> bool:
    """Read into buf until EOF or enough(); False when the deadline came first."""
    while not enough():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if sel.select(left):
            chunk = os.read(fd, 65536)
            if not chunk:
                return True
            buf += chunk
    return True


def _parse(text: str, nonce: str, n_tests: int, timed_out: bool, returncode: int) -> Result:
    passed, error, ready, done = [False] * n_tests, "", False, False
    for line in text.splitlines():
        if not line.startswith(nonce):
            continue
        try:
            msg = json.loads(line[len(nonce):])
        except ValueError:
            continue
        if "fatal" in msg:
            raise RuntimeError(f"code sandbox setup failed: {msg['fatal']}")
        ready |= bool(msg.get("ready"))
        done |= bool(msg.get("done"))
        if isinstance(msg.get("test"), int) and 0 <= msg["test"] < n_tests:
            passed[msg["test"]] = msg.get("ok") is True
        error = error or str(msg.get("error") or "")
    if not ready and not timed_out:
        raise RuntimeError(f"code sandbox did not start (exit status {returncode})")
    if timed_out:
        error = error or "timed out"
    elif not done:
        error = error or f"stopped early (exit status {returncode})"
    return Result(passed, timed_out, error)
