"""The sandbox's child program: run by path by a fresh `python -I -B` (rewards/sandbox.py), never
imported. argv[1] is the run's host dir, holding spec.json (settings and the solution) and
tests.json (the tests; opened and unlinked at once). Four processes, all forks of this one:

  monitor  the supervisor's child. Enters the new user (not root only), pid, network, IPC and
           UTS namespaces, forks init, reaps it, and on SIGTERM or its own timer kills it.
  init     pid 1 of the sandbox. Builds the mount view (a fresh root; see build_root), forks
           the worker, only then reads the tests, forks the harness, waits for the harness,
           then kills every other process of the sandbox and reaps it.
  worker   the untrusted side, as a uid of its own (root: one the supervisor leased for this run;
           user namespace: ns root without capabilities). It runs the solution and then answers
           requests on a pipe pair: "call f with these arguments" or "run the program on this
           stdin". It never holds the tests, the report pipe or anything it could forge them with.
  harness  the trusted side, as another uid (nobody), non-dumpable so that the worker cannot
           ptrace it or read its memory or fds. It runs the test code with the solution's
           callables replaced by proxies that ask the worker; every value crosses as plain data
           (None, bool, int, float, complex, str, bytes, bytearray and lists, tuples, sets,
           frozensets, dicts of them) that the harness decodes itself, so a comparison is
           between real builtins. It reports outcomes as JSON lines on the pipe it holds as fd 3;
           for stdio tests it reports the program's normalized stdout, and the supervisor,
           which alone knows the expected output, compares.

Standard library only: it must not import posttrain_cli (the isolated interpreter has neither
the package's path nor its environment).
"""

import builtins
import ctypes
import fcntl
import importlib
import json
import os
import resource
import signal
import sys
import time
import types

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME = 1, 4, 15
PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 38, 36
# Syscalls without a libc wrapper in older glibc; mount_setattr has one number on every arch.
SYSCALLS = {"x86_64": {"pivot_root": 155, "capset": 126}, "aarch64": {"pivot_root": 41, "capset": 91}}
SYS_MOUNT_SETATTR = 442
MAX_MESSAGE = 16 * 1024 * 1024  # one worker reply; a bigger one fails the test
# stdout bytes of one stdio case the worker sends back: fixed, since a limit drawn from the
# expected output's length would tell the program that length (YES / NO)
STDOUT_LIMIT = 2 * 1024 * 1024
FRAME = 8  # length prefix of a message between harness and worker

libc = ctypes.CDLL(None, use_errno=True)


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option, arg):
    check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


def name(title):
    libc.prctl(PR_SET_NAME, title.encode(), 0, 0, 0)


def die_with_parent(parent=None):
    """SIGKILL this process when its parent dies (and if it already has: now)."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def describe(e):
    return f"{type(e).__name__}: {e}"[:300]


# -- plain data across the pipe --

def encode(value, depth=0):
    """A JSON-ready form of a plain builtin value; TypeError for anything else (exact types:
    a subclass of int with its own __eq__ is not an int here)."""
    if depth > 200:
        raise TypeError("value nested too deeply")
    t = type(value)
    if value is None or t is bool or t is int or t is str:
        return value
    if t is float:
        return value if value - value == 0 else ["float", repr(value)]  # nan and inf tagged
    if t in (list, tuple, set, frozenset):
        return [t.__name__, [encode(v, depth + 1) for v in value]]
    if t is dict:
        return ["dict", [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]]
    if t in (bytes, bytearray):
        return [t.__name__, value.hex()]
    if t is complex:
        return ["complex", [encode(value.real), encode(value.imag)]]
    raise TypeError(f"a {t.__name__} is not a plain value (None, bool, int, float, complex, str, "
                    f"bytes and lists, tuples, sets and dicts of them)")


_CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def decode(data, depth=0):
    """The value `encode` gave `data` as; ValueError for anything malformed."""
    if depth > 200:
        raise ValueError("value nested too deeply")
    t = type(data)
    if data is None or t is bool or t is int or t is str or t is float:
        return data
    if t is list and len(data) == 2 and type(data[0]) is str:
        tag, body = data
        if tag in _CONTAINERS and type(body) is list:
            return _CONTAINERS[tag](decode(v, depth + 1) for v in body)
        if tag == "dict" and type(body) is list:
            out = {}
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise ValueError("malformed dict item")
                out[decode(pair[0], depth + 1)] = decode(pair[1], depth + 1)
            return out
        if tag in ("bytes", "bytearray") and type(body) is str:
            return (bytes if tag == "bytes" else bytearray).fromhex(body)
        if tag == "float" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "complex" and type(body) is list and len(body) == 2:
            real, imag = (decode(v, depth + 1) for v in body)
            if type(real) is float and type(imag) is float:
                return complex(real, imag)
    raise ValueError("malformed value")


def _no_constants(name):
    raise ValueError(f"bare {name}")


def loads(raw):
    return json.loads(raw, parse_constant=_no_constants)


def send(fd, message):
    data = json.dumps(message, allow_nan=False).encode()
    data = len(data).to_bytes(FRAME, "big") + data
    while data:
        data = data[os.write(fd, data):]


def read_exactly(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def receive(fd):
    size = int.from_bytes(read_exactly(fd, FRAME), "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes")
    return loads(read_exactly(fd, size))


# -- process set-up --

def isolate_fds(*keep):
    """fds 0-2 on /dev/null, `keep` moved to 3, 4, ..., everything else closed."""
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 900 + i) for i, fd in enumerate(keep)]
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=False)
    os.closerange(3 + len(keep), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    return list(range(3, 3 + len(keep)))


def set_limits(spec, processes):
    mb = 1024 * 1024
    limits = [(resource.RLIMIT_AS, spec["memory_mb"] * mb), (resource.RLIMIT_FSIZE, spec["file_size_mb"] * mb),
              (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0)]
    if processes:
        # In a user namespace the count is per namespace, and init and the harness are in it too.
        extra = 2 if spec["unshare"] & CLONE_NEWUSER else 0
        limits.append((resource.RLIMIT_NPROC, spec["max_processes"] + extra))
    for res, value in limits:
        resource.setrlimit(res, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_s"], spec["cpu_s"] + 1))


def drop_capabilities():
    """Empty effective, permitted and inheritable sets (the worker in a user namespace is ns root)."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()
    number = SYSCALLS.get(os.uname().machine, {}).get("capset")
    if number is None:
        raise OSError(f"capset: unknown syscall number on {os.uname().machine}")
    check(libc.syscall(ctypes.c_long(number), header, data), "capset")


def become(spec, uid, processes):
    """Limits, no new privileges, then `uid` (None: keep the uid, drop capabilities)."""
    set_limits(spec, processes)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif spec["unshare"] & CLONE_NEWUSER:
        drop_capabilities()
    os.umask(0o022)
    os.chdir(spec["workdir"])
    os.environ["HOME"] = os.environ["TMPDIR"] = spec["workdir"]
    sys.set_int_max_str_digits(0)


# -- mount view --

def mount(src, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def read_only(path, root):
    """`path` and every mount below it read-only, nosuid, nodev (mount_setattr, Linux 5.12+);
    else (older kernels) just the top mount, and only when root keeps the code off the rest."""
    attr = (ctypes.c_uint64 * 4)(MS_RDONLY | MS_NOSUID | MS_NODEV, 0, 0, 0)  # MOUNT_ATTR_* share these bits
    if libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(-100), path.encode(), ctypes.c_uint(0x8000),
                    ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))) == 0:
        return
    err = ctypes.get_errno()
    try:
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    except OSError:
        raise OSError(err, f"mount_setattr {path}: {os.strerror(err)}") from None
    if not root:
        raise OSError(err, f"mount_setattr {path}: {os.strerror(err)} (needs Linux 5.12+ without root)")


def build_root(spec):
    """A fresh root (tmpfs, read-only once built) holding only: the system and interpreter dirs
    bound read-only, /dev with a few devices, /proc of this pid namespace, and fresh tmpfs /tmp,
    /var/tmp, /run and /dev/shm. Nothing of the host's writable or socket-bearing paths (its
    /tmp, /run, /home, /var) is in it, so a host Unix socket cannot be reached by path."""
    root = os.geteuid() == 0 and not spec["unshare"] & CLONE_NEWUSER
    new = spec["root"]
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates to the host
    mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for path in spec["binds"]:
        target = new + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.makedirs(target, exist_ok=True)
            mount(path, target, None, MS_BIND | MS_REC)
            read_only(target, root)
    dev = new + "/dev"
    os.mkdir(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=755,size=64k")
    for node in ("null", "zero", "full", "random", "urandom"):
        open(f"{dev}/{node}", "w").close()
        mount(f"/dev/{node}", f"{dev}/{node}", None, MS_BIND)
    for link, to in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
        os.symlink(to, f"{dev}/{link}")
    for d, mode, mb in (("/dev/shm", "1777", 8), ("/tmp", "1777", 4 * spec["file_size_mb"]),
                        ("/var/tmp", "1777", 8), ("/run", "755", 1)):
        os.makedirs(new + d, exist_ok=True)
        mount("tmpfs", new + d, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size={mb}m")
    os.mkdir(new + "/proc")
    try:  # only this pid namespace's processes; some containers refuse a new proc
        mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        pass
    os.mkdir(new + spec["workdir"])
    os.chmod(new + spec["workdir"], 0o1777)
    number = SYSCALLS.get(os.uname().machine, {}).get("pivot_root")
    if number is None:
        raise OSError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    os.chdir(new)
    check(libc.syscall(ctypes.c_long(number), b".", b"."), "pivot_root")  # the old root now lies under "."
    check(libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


# -- the four processes --

def main():
    host_dir = sys.argv[1]
    with open(os.path.join(host_dir, "spec.json"), "rb") as f:
        spec = json.loads(f.read())
    # Started with -S (site's .pth files cost 50+ ms a call): the paths they gave, and exit() & co.
    sys.path[:] = spec["sys_path"]
    import site

    site.setquit()
    site.setcopyright()
    site.sethelper()
    tests_path = os.path.join(host_dir, "tests.json")
    tests_fd = os.open(tests_path, os.O_RDONLY | os.O_CLOEXEC)
    os.unlink(tests_path)
    report = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    name("sandbox-monitor")
    die_with_parent(spec["parent"])

    def fatal(e):
        send_line(report, {"fatal": describe(e)})
        os._exit(1)

    flags = spec["unshare"]
    try:
        if flags:
            libc_unshare(flags & ~CLONE_NEWNS)
            if flags & CLONE_NEWUSER:
                map_user(spec["userns"])  # before the next line: uid_map of a non-dumpable process is root's
        prctl(PR_SET_DUMPABLE, 0)  # no ptrace, no /proc/<pid>/fd or mem, even for the same uid
        if not flags:
            os._exit(init(spec, tests_fd, report))
    except BaseException as e:
        fatal(e)
    pid = os.fork()
    if pid == 0:
        try:
            die_with_parent()
            os._exit(init(spec, tests_fd, report))
        except BaseException as e:
            fatal(e)
    os.close(tests_fd)
    os.close(report)
    def stop(*_):  # init's exit kills the rest of the namespace
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, spec["timeout"] + 1)
    _, status = os.waitpid(pid, 0)
    os._exit(os.waitstatus_to_exitcode(status) & 0xff)


def libc_unshare(flags):
    check(libc.unshare(ctypes.c_int(flags)), "unshare")


def map_user(ids):
    uid, gid = ids
    for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"0 {uid} 1"),
                       ("/proc/self/gid_map", f"0 {gid} 1")):
        with open(path, "w") as f:
            f.write(text)


def send_line(fd, message):
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


def init(spec, tests_fd, report):
    name("sandbox-init")
    namespaces = bool(spec["unshare"])
    if namespaces:
        libc_unshare(CLONE_NEWNS)
        build_root(spec)
    else:
        prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphaned forks come back here to be reaped
    drop = spec["drop"] or {}
    requests, replies = os.pipe(), os.pipe()
    worker = os.fork()
    if worker == 0:
        os._exit(run_worker(spec, drop.get("worker"), requests[0], replies[1]))
    os.close(requests[0])
    os.close(replies[1])
    # Read only now, so that the worker's memory never held them.
    with os.fdopen(tests_fd, "rb") as f:
        cases = json.loads(f.read())["cases"]
    harness = os.fork()
    if harness == 0:
        os._exit(run_harness(spec, drop.get("harness"), cases, report, requests[1], replies[0]))
    os.close(requests[1])
    os.close(replies[0])
    os.close(report)
    del cases

    def stop(*_):
        kill_all(spec, worker, harness)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, spec["timeout"] + 2)
    while True:
        try:
            pid, _ = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == harness:
            break
    kill_all(spec, worker, harness)
    signal.setitimer(signal.ITIMER_REAL, 0)
    return 0


def kill_all(spec, worker, harness):
    """Kill every process of the sandbox but this one, and reap them all."""
    if spec["unshare"]:
        # As pid 1: every other process of the pid namespace. A fork racing this is aborted by
        # the kernel, so blocking waits end.
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass  # none left
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return
    else:
        for pid in (-worker, harness):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        uid = (spec["drop"] or {}).get("worker")
        if uid is not None:  # the leased uid is this run's alone: kill all it runs
            helper = os.fork()
            if helper == 0:
                try:
                    os.setresuid(uid, uid, uid)
                    os.kill(-1, signal.SIGKILL)
                finally:
                    os._exit(0)
            os.waitpid(helper, 0)
    # Everything killed is reaped here (as a subreaper this gets the orphans too); in plain mode
    # a fork that left the process group may survive, so that wait is short.
    deadline = time.monotonic() + (30 if (spec["drop"] or {}).get("worker") else 1)
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.001)


def run_worker(spec, uid, requests, replies):
    try:
        name("sandbox-worker")
        requests, replies = isolate_fds(requests, replies)
        os.setpgid(0, 0)
        become(spec, uid, processes=True)
        prctl(PR_SET_DUMPABLE, 1)
        if not spec["unshare"]:
            die_with_parent()
        code = compile_solution(spec["code"])
        send(replies, {"up": True})
    except BaseException as e:
        send(replies, {"fatal": describe(e)})
        return 1
    try:  # the harness has said "ready" by now: without root the code could kill it
        receive(requests)
    except EOFError:
        return 1
    # From here on this process runs untrusted code, and whatever it sends is data, not a verdict.
    if isinstance(code, str):
        send(replies, {"error": code})
        return 1
    if spec["kind"] == "stdio":
        serve_stdio(code, requests, replies)
        return 0
    namespace = {"__name__": "__solution__"}
    try:
        exec(code, namespace)
    except SystemExit as e:
        if e.code not in (None, 0):
            send(replies, {"error": describe(e)})
            return 1
    except BaseException as e:
        send(replies, {"error": describe(e)})
        return 1
    send(replies, {"exports": exports(namespace)})
    serve_calls(namespace, requests, replies)
    return 0


def compile_solution(source):
    try:
        return compile(source, "<solution>", "exec")
    except BaseException as e:
        return describe(e)


def exports(namespace):
    """What the tests may see of the solution: modules by name, callables as proxies, plain
    values as copies."""
    out = {}
    for key, value in list(namespace.items()):
        if key.startswith("__"):
            continue
        if isinstance(value, types.ModuleType):
            out[key] = ["module", value.__name__]
        elif callable(value):
            out[key] = ["call"]
        else:
            try:
                out[key] = ["value", encode(value)]
            except TypeError:
                pass
    return out


MUTABLE = (list, dict, set, bytearray)


def serve_calls(namespace, requests, replies):
    while True:
        try:
            request = receive(requests)
        except EOFError:
            return
        try:
            fn = namespace[request["call"]]
            args = [decode(a) for a in request["args"]]
            kwargs = {k: decode(v) for k, v in request["kwargs"].items()}
            result = fn(*args, **kwargs)
            # Arguments the call changed in place go back too (a test may check them).
            changed = [encode(a) if type(a) in MUTABLE else None for a in args]
            reply = {"value": encode(result), "args": changed}
        except BaseException as e:
            kinds = [c.__name__ for c in type(e).__mro__ if getattr(builtins, c.__name__, None) is c]
            reply = {"raise": kinds, "message": str(e)[:300]}
        send(replies, reply)


def serve_stdio(code, requests, replies):
    """One forked process per case: a fresh interpreter state, and exiting ends only that case."""
    while True:
        try:
            request = receive(requests)
        except EOFError:
            return
        with open("stdin.txt", "w", encoding="utf-8") as f:
            f.write(request["stdin"])
        pid = os.fork()
        if pid == 0:
            run_program(code, requests, replies)
        _, status = os.waitpid(pid, 0)
        with open("stdout.txt", "rb") as f:
            out = f.read(request["limit"]).decode("utf-8", "replace")
        try:
            with open("error.txt", encoding="utf-8") as f:
                error = f.read(300)
        except OSError:
            error = ""
        send(replies, {"stdout": out, "status": os.waitstatus_to_exitcode(status), "error": error})


def run_program(code, requests, replies):
    os.close(requests)
    os.close(replies)
    for path in ("error.txt",):
        try:
            os.unlink(path)
        except OSError:
            pass
    fd = os.open("stdin.txt", os.O_RDONLY)
    os.dup2(fd, 0)
    os.close(fd)
    fd = os.open("stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.close(fd)
    sys.stdin = open(0, "r", encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = stdout = open(1, "w", encoding="utf-8", closefd=False)
    error = ""
    try:
        exec(code, {"__name__": "__main__"})
    except SystemExit as e:
        if e.code not in (None, 0):
            error = describe(e)
    except BaseException as e:
        error = describe(e)
    try:
        for f in {id(stdout): stdout, id(sys.stdout): sys.stdout}.values():
            f.flush()
    except BaseException as e:
        error = error or describe(e)
    if error:
        with open("error.txt", "w", encoding="utf-8") as f:
            f.write(error)
    os._exit(1 if error else 0)


class RemoteError(Exception):
    """The solution raised an exception that is not a builtin one."""


class Worker:
    """The harness's end of the pipes. Anything the worker sends is untrusted: a reply that does
    not decode fails the call, and after one such reply every later call fails too."""

    def __init__(self, requests, replies):
        self.requests, self.replies, self.broken = requests, replies, ""

    def receive(self):
        if self.broken:
            raise RemoteError(self.broken)
        try:
            message = receive(self.replies)
            if type(message) is not dict:
                raise ValueError("not an object")
            return message
        except EOFError:
            self.broken = "the solution's process exited"
        except BaseException as e:
            self.broken = f"unreadable reply from the solution ({describe(e)})"
        raise RemoteError(self.broken)

    def request(self, message):
        if self.broken:
            raise RemoteError(self.broken)
        try:
            send(self.requests, message)
        except OSError:
            self.broken = "the solution's process exited"
            raise RemoteError(self.broken) from None
        return self.receive()

    def call(self, fn, args, kwargs):
        reply = self.request({"call": fn, "args": [encode(a) for a in args],
                              "kwargs": {str(k): encode(v) for k, v in kwargs.items()}})
        if "raise" in reply:
            raise remote_exception(reply.get("raise"), reply.get("message"))
        try:
            value = decode(reply["value"])
            changed = reply.get("args") or []
            for arg, new in zip(args, changed if type(changed) is list else []):
                if new is not None and type(arg) in MUTABLE:
                    update(arg, decode(new))
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            raise RemoteError(f"unreadable reply from the solution ({describe(e)})") from None
        return value


def update(arg, new):
    if type(new) is not type(arg) or new == arg:
        return
    if type(arg) is dict or type(arg) is set:
        arg.clear()
        arg.update(new)
    else:
        arg[:] = new


def remote_exception(kinds, message):
    message = str(message)[:300]
    for kind in kinds if type(kinds) is list else []:
        cls = getattr(builtins, kind, None) if type(kind) is str else None
        # StopIteration from a call inside map() would end the test's loop early, unnoticed
        if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(
                cls, (StopIteration, StopAsyncIteration)):
            try:
                return cls(message)
            except Exception:  # noqa: BLE001  (UnicodeDecodeError & co take other arguments)
                continue
    return RemoteError(message)


def proxy(worker, fn):
    def call(*args, **kwargs):
        return worker.call(fn, args, kwargs)

    call.__name__ = call.__qualname__ = fn
    return call


def test_namespace(worker, exported):
    """The tests' globals: the solution's names as the harness's own objects. A name that
    shadows a builtin is left out, so the tests' `abs`, `all` or `len` are always the real ones."""
    namespace = {"__name__": "__tests__"}
    for key, entry in (exported.items() if type(exported) is dict else ()):
        if type(key) is not str or not key.isidentifier() or hasattr(builtins, key) or type(entry) is not list:
            continue
        try:
            if entry[0] == "module" and type(entry[1]) is str:
                namespace[key] = importlib.import_module(entry[1])
            elif entry[0] == "call":
                namespace[key] = proxy(worker, key)
            elif entry[0] == "value":
                namespace[key] = decode(entry[1])
        except Exception:  # noqa: BLE001  (a module the harness cannot import, a bad value: left out)
            pass
    return namespace


def normalize(text):
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def run_harness(spec, uid, cases, report, requests, replies):
    report, requests, replies = isolate_fds(report, requests, replies)
    tell = lambda **kw: send_line(report, kw)
    try:
        name("sandbox-harness")
        become(spec, uid, processes=False)
        prctl(PR_SET_DUMPABLE, 0)  # after the uid change, which resets it
        if not spec["unshare"]:
            die_with_parent()
        worker = Worker(requests, replies)
        first = worker.receive()
        if "up" not in first:
            raise RuntimeError(f"the solution's process did not start: {str(first.get('fatal'))[:300]}")
    except BaseException as e:
        tell(fatal=describe(e))
        return 1
    tell(ready=True)
    try:
        send(requests, {"go": True})
    except OSError:
        pass  # the worker is gone: every test fails below
    if spec["kind"] == "stdio":
        for i, (given, cap) in enumerate(cases):
            try:
                got = worker.request({"stdin": given, "limit": STDOUT_LIMIT})
                stdout = got["stdout"] if type(got.get("stdout")) is str else ""
                error = str(got.get("error") or "")[:300]
                if not error and got.get("status") != 0:
                    error = f"exit status {str(got.get('status'))[:20]}"
                tell(test=i, stdout=normalize(stdout)[:cap + 1], error=error)
            except BaseException as e:
                tell(test=i, stdout="", error=describe(e))
        tell(done=True)
        return 0
    try:
        loaded = worker.receive()
    except RemoteError as e:
        loaded = {"error": str(e)}
    if "exports" not in loaded:
        tell(error=str(loaded.get("error") or "the solution did not load")[:300])
        tell(done=True)
        return 0
    namespace = test_namespace(worker, loaded["exports"])
    for i, test in enumerate(cases):
        try:
            exec(compile(test, f"<test {i}>", "exec"), namespace)
            tell(test=i, ok=True)
        except BaseException as e:
            tell(test=i, ok=False, error=describe(e))
    tell(done=True)
    return 0


if __name__ == "__main__":
    main()
