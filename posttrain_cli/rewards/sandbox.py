"""Run untrusted Python (a model's code completion) against tests in separate, sandboxed processes.

    result = run_tests(code, Tests("asserts", ["assert add(1, 2) == 3"]), Limits(timeout=5))
    result.score       # fraction of tests passed
    run_many([(code, tests), ...], limits, max_workers=4)   # concurrent sandboxes

Nothing is exec'd in the caller's process. Tests are either "asserts" (Python snippets run after
the solution, seeing its names; `__name__` is not "__main__" when the solution runs) or "stdio"
((stdin, expected stdout) pairs: the program runs as __main__ once per case, in a fresh process,
and passes when it exits 0 and its stdout equals the expected one up to trailing whitespace on
each line and blank lines at either end).

Who decides (rewards/sandbox_child.py has the details). The solution runs in a "worker" process
under a uid of its own and never holds the tests or the report pipe. The test code runs in a
"harness" process under another uid, non-dumpable, so the worker can neither signal, ptrace nor
read it. The harness calls the solution's functions through the worker: arguments and results
cross as plain builtin data (None, bool, int, float, complex, str, bytes, bytearray and lists,
tuples, sets, frozensets and dicts of them) that the harness decodes itself; any other result (an
object with its own __eq__, a generator, an instance of the solution's class) fails the test, as
does an argument that is not plain data (a lambda). Lists, dicts, sets and bytearrays a call
changed in place are copied back. An exception the solution raises reaches the tests as its
nearest builtin class (a ValueError subclass as ValueError; StopIteration, and one of no builtin
class, as RemoteError). Modules the solution imported are re-imported by the harness, plain values
are copied, and names that shadow a builtin (`abs`, `all`, `len`) are not seen by the tests. For
stdio tests the harness relays each case's normalized stdout and this module compares it with the
expected output, which never enters the sandbox. So patching builtins, json or the harness's
frames, printing a report, writing to inherited fds or exiting early all stay inside the worker
and earn nothing.

Isolation, strongest first (`isolation()` says which one this machine gets, found once by a
self-test):
  * "namespaces": new pid, network, IPC, UTS and mount namespaces (plus a user namespace when not
    root). No network (a fresh network namespace has only a down loopback). The mount view is a
    fresh root holding only the system dirs (/usr, /bin, /lib*, /etc) and the interpreter's
    prefix, read-only, a few /dev nodes, /proc of the sandbox, and fresh size-limited tmpfs /tmp,
    /var/tmp, /run and /dev/shm; the host's /tmp, /run, /home, /var and their Unix sockets are
    not in it. Pid 1 of the sandbox reaps its orphans and, once the tests are done, kills and
    reaps every process in it before the call returns. As root, the worker runs as a uid leased
    for this run alone from a pool (flock'ed files in /run/lock), so RLIMIT_NPROC counts this
    sandbox's processes only, and the harness runs as nobody; without root, both are root of
    the user namespace (RLIMIT_NPROC counts per namespace), the worker with no capabilities.
  * "unprivileged" (root without namespaces): the same processes and uids, in a throwaway dir.
    The code can reach the network and write wherever any user may; everything the leased uid
    runs is killed at the end.
  * "plain": as "unprivileged" but every process runs as the caller: as root there is no process
    limit, a fork that leaves the process group can outlive the run, and the solution can kill
    the harness (which fails its own tests; without root in "namespaces" mode the same holds).
Always: `python -I -B`, a minimal environment, RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE,
RLIMIT_NPROC, RLIMIT_NOFILE, no core files, PR_SET_NO_NEW_PRIVS, a wall-clock timeout after which
every process of the sandbox is SIGKILLed (each process also dies with its parent), and the host
temp dir is deleted afterwards. Worst-case memory is (max_processes + 1) x memory_mb (the harness).
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

NOBODY = 65534
_POOL_SIZE = 4096


def _uid_pool(uid_map: str = "/proc/self/uid_map") -> range:
    """uids leased to workers, one per concurrent sandbox on this machine (root only): far from any
    account's and from the usual subordinate-uid ranges; in a user namespace that maps fewer
    (a rootless container: 65536), the top of its largest range, below nobody."""
    default = range(1_590_000_000, 1_590_000_000 + _POOL_SIZE)
    try:
        with open(uid_map) as f:
            ranges = [range(int(a), int(a) + int(n)) for a, _, n in (line.split() for line in f if line.strip())]
    except (OSError, ValueError):
        return default
    if any(default.start in r and default.stop - 1 in r for r in ranges):
        return default
    top = max(ranges, key=len, default=range(0))
    stop = min(top.stop, NOBODY)
    return range(stop - _POOL_SIZE, stop) if stop - _POOL_SIZE >= max(top.start, 1000) else range(0)


UID_POOL = _uid_pool()
_WORKDIR = "/tmp/work"  # inside the mount namespace, on its own tmpfs
_CHILD = str(Path(__file__).with_name("sandbox_child.py"))
# clone flags; the child unshares the mount namespace itself, after the pid namespace's fork
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
NAMESPACES = CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWPID | CLONE_NEWNET


@dataclass(frozen=True)
class Limits:
    # Wall-clock seconds for the whole run: start-up, solution and every test.
    timeout: float = 10.0
    # RLIMIT_AS of each process.
    memory_mb: int = 1024
    # RLIMIT_NPROC: processes (and threads) the solution may run at once, its own included.
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
    unshare: int = 0  # the namespaces the sandbox enters (clone flags)
    drop: bool = False  # root: the worker runs as a leased uid, the harness as nobody


def run_tests(code: str, tests: Tests, limits: Limits = Limits()) -> Result:
    """Run `code` and then `tests` in one sandbox; never raises for anything the code does (it
    fails its tests). Raises RuntimeError when the sandbox itself cannot start."""
    return _run(code, tests, limits, isolation())


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


@cache
def _binds() -> list[str]:
    """What the sandbox's root holds of the host, read-only: the system dirs and the interpreter's
    prefix (top-level symlinks such as /bin -> usr/bin are copied as symlinks)."""
    wanted = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
              os.path.realpath(sys.base_prefix), os.path.dirname(_interpreter())]
    out: list[str] = []
    for path in sorted(set(wanted), key=len):
        covered = any(path.startswith(q + "/") for q in out if not os.path.islink(q))
        if os.path.lexists(path) and path not in out and not covered:
            out.append(path)
    return out


@cache
def _sys_path() -> list[str]:
    """The isolated interpreter's sys.path, site's .pth files applied: the child starts with -S
    and sets it (running .pth code each call cost more than the rest of the sandbox)."""
    out = subprocess.run([_interpreter(), "-I", "-c", "import json, sys; print(json.dumps(sys.path))"],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    return [p for p in json.loads(out) if os.path.exists(p)]


def _candidates() -> list[Isolation]:
    if os.geteuid() == 0:
        return [Isolation("namespaces", None, NAMESPACES, drop=True), Isolation("unprivileged", None, 0, drop=True),
                Isolation("plain")]
    return [Isolation("namespaces", None, NAMESPACES | CLONE_NEWUSER), Isolation("plain")]


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
    if iso.drop:
        risks = "network reachable, files writable wherever any user may write"
        user = "a uid of its own"
    else:
        risks = ("network reachable, files writable wherever this user may write, forks that leave the "
                 "process group can outlive the run, the solution can signal the tests' process")
        user = f"uid {os.geteuid()}"
        if os.geteuid() == 0:
            risks += ", no process limit (RLIMIT_NPROC does not bind root)"
    note = f"code sandbox: no namespaces ({'; '.join(why)}); running as {user} with rlimits only: {risks}"
    return Isolation(iso.mode, note, iso.unshare, iso.drop)


def _lock_dir() -> str:
    base = "/run/lock" if os.path.isdir("/run/lock") and os.access("/run/lock", os.W_OK) else "/tmp"
    path = os.path.join(base, "posttrain-sandbox-uids")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.geteuid() or not os.path.isdir(path) or os.path.islink(path) or st.st_mode & 0o022:
        raise RuntimeError(f"code sandbox: {path} is not a private dir of this user")
    return path


@contextmanager
def _leased_uid():
    """A uid from UID_POOL no other sandbox on this machine runs as until this one has ended
    (an flock per uid; the kernel drops it if this process dies)."""
    if not UID_POOL:
        raise RuntimeError("code sandbox: this user namespace maps too few uids for a pool of sandbox uids")
    directory = _lock_dir()
    start = random.randrange(len(UID_POOL))
    for k in range(len(UID_POOL)):
        slot = (start + k) % len(UID_POOL)
        fd = os.open(os.path.join(directory, str(slot)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield UID_POOL[slot]
        finally:
            os.close(fd)
        return
    raise RuntimeError(f"code sandbox: all {len(UID_POOL)} sandbox uids are in use")


def _normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _run(code: str, tests: Tests, limits: Limits, iso: Isolation) -> Result:
    with ExitStack() as stack:
        uid = stack.enter_context(_leased_uid()) if iso.drop else None
        host_dir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
        stack.callback(shutil.rmtree, host_dir, True)
        spec = {
            "parent": os.getpid(), "unshare": iso.unshare, "userns": [os.geteuid(), os.getegid()],
            "drop": {"worker": uid, "harness": NOBODY} if uid is not None else None,
            "timeout": limits.timeout, "memory_mb": limits.memory_mb, "cpu_s": int(limits.timeout) + 1,
            "file_size_mb": limits.file_size_mb, "max_processes": limits.max_processes,
            "code": code, "kind": tests.kind, "root": os.path.join(host_dir, "root"), "binds": _binds(),
            "sys_path": _sys_path(),
            "workdir": _WORKDIR if iso.unshare else os.path.join(host_dir, "work"),
        }
        if tests.kind == "stdio":  # the expected output stays here: the sandbox gets its length only
            expected = [_normalize(str(out)) for _, out in tests.cases]
            cases = [[str(given), len(out)] for (given, _), out in zip(tests.cases, expected)]
        else:
            expected, cases = [], list(tests.cases)
        if iso.unshare:
            os.mkdir(spec["root"])
        else:
            os.mkdir(spec["workdir"])
            os.chmod(spec["workdir"], 0o1777)  # the worker's and the harness's uids both work here
            os.chmod(host_dir, 0o711)
        for file, data in (("spec.json", spec), ("tests.json", {"cases": cases})):
            with open(os.open(os.path.join(host_dir, file), os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                json.dump(data, f)
        cap = 65536 + sum(400 + (6 * (c[1] + 1) if tests.kind == "stdio" else 0) for c in cases)
        return _supervise(host_dir, tests.kind, expected, len(cases), limits, cap)


def _supervise(host_dir: str, kind: str, expected: list[str], n_tests: int, limits: Limits, cap: int) -> Result:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": host_dir, "TMPDIR": host_dir,
           # one thread each: BLAS pools would otherwise hit RLIMIT_NPROC / RLIMIT_AS
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # -I: no PYTHON* variables, no user site, no script dir on sys.path; -B: writes no .pyc;
    # -S: no site (the child sets the path it would give)
    proc = subprocess.Popen([_interpreter(), "-I", "-B", "-S", _CHILD, host_dir], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=host_dir, env=env,
                            start_new_session=True, close_fds=True)
    buf, done = bytearray(), b'{"done": true}\n'
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            timed_out = not _read(sel, proc.stdout.fileno(), buf, time.monotonic() + limits.timeout,
                                  lambda: buf.endswith(done) or len(buf) > cap)
        # Finished: the sandbox's pid 1 kills and reaps the rest and exits. Otherwise the monitor
        # kills pid 1 on SIGTERM; SIGKILL to the group only if even that does not end it.
        if not buf.endswith(done) or not _exited(proc, 5.0):
            proc.send_signal(signal.SIGTERM)
            if not _exited(proc, 5.0):
                _killpg(proc.pid)
    finally:
        if proc.poll() is None:
            _killpg(proc.pid)
        proc.stdout.close()
        proc.wait()
    return _parse(buf[:cap].decode("utf-8", "replace"), kind, expected, n_tests, timed_out, proc.returncode)


def _exited(proc: subprocess.Popen, seconds: float) -> bool:
    """Whether `proc` ended within `seconds` (reaped if so). A pidfd wakes at the exit itself;
    Popen.wait(timeout) polls, which cost up to 50 ms a call."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            select.select([pidfd], [], [], seconds)
        finally:
            os.close(pidfd)
        return proc.poll() is not None
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


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


def _parse(text: str, kind: str, expected: list[str], n_tests: int, timed_out: bool, returncode: int) -> Result:
    """The harness's report (the only writer of this pipe) as a Result; stdio outputs compared here."""
    passed, error, ready, done = [False] * n_tests, "", False, False
    for line in text.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if not isinstance(msg, dict):
            continue
        if "fatal" in msg:
            raise RuntimeError(f"code sandbox setup failed: {msg['fatal']}")
        ready |= bool(msg.get("ready"))
        done |= bool(msg.get("done"))
        i = msg.get("test")
        if isinstance(i, int) and 0 <= i < n_tests:
            if kind == "stdio":
                # already normalized, and cut one past the expected length: a longer one never matches
                passed[i] = not msg.get("error") and msg.get("stdout") == expected[i]
            else:
                passed[i] = msg.get("ok") is True
        error = error or str(msg.get("error") or "")
    if not ready and not timed_out:
        raise RuntimeError(f"code sandbox did not start (exit status {returncode})")
    if timed_out:
        error = error or "timed out"
    elif not done:
        error = error or f"stopped early (exit status {returncode})"
    return Result(passed, timed_out, error)
