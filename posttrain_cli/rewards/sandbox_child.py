"""The sandbox's child program: run by path by a fresh `python -I -B` (rewards/sandbox.py), never
imported. It reads the spec file named by argv[1], sets itself up (mounts, rlimits, drops root),
runs the solution and the tests, and reports `<nonce>{json}` lines on the pipe it got as fd 1.

Standard library only: it must not import posttrain_cli (the isolated interpreter has neither
the package's path nor its environment, and runs as the sandbox user).
"""

import ctypes
import json
import os
import resource
import sys


def mount(libc, src, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def readonly_everything(libc):
    # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, {MOUNT_ATTR_RDONLY}): this namespace's mounts only
    attr = (ctypes.c_uint64 * 4)(1, 0, 0, 0)
    if libc.syscall(ctypes.c_long(442), ctypes.c_int(-100), b"/", ctypes.c_uint(0x8000), ctypes.byref(attr),
                    ctypes.c_size_t(ctypes.sizeof(attr))) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount_setattr /: {os.strerror(err)}")


def setup(spec):
    libc = ctypes.CDLL(None, use_errno=True)
    MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 2, 4, 8, 4096, 16384
    if spec["mounts"]:
        try:
            readonly_everything(libc)
        except OSError:
            if spec["drop_to"] is None:
                raise  # not root: nothing else keeps the code off the user's own files
        for blocker, prefix, stage in spec["unhide"]:
            mount(libc, prefix, stage, None, MS_BIND | MS_REC)
            mount(libc, "tmpfs", blocker, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
            os.makedirs(prefix, exist_ok=True)
            mount(libc, stage, prefix, None, MS_BIND | MS_REC)
            libc.umount2(stage.encode(), 2)
        for d, mb in (("/tmp", 4 * spec["file_size_mb"]), ("/var/tmp", 8), ("/dev/shm", 8)):
            if os.path.isdir(d):
                mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={mb}m")
        try:  # only this pid namespace's processes in /proc
            mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        except OSError:
            pass
        os.mkdir(spec["workdir"], 0o700)
        if spec["drop_to"] is not None:
            os.chown(spec["workdir"], spec["drop_to"], spec["drop_to"])
        os.chdir(spec["workdir"])
        os.environ["HOME"] = os.environ["TMPDIR"] = spec["workdir"]
    mb = 1024 * 1024
    for res, soft, hard in ((resource.RLIMIT_AS, spec["memory_mb"] * mb, spec["memory_mb"] * mb),
                            (resource.RLIMIT_CPU, spec["cpu_s"], spec["cpu_s"] + 1),
                            (resource.RLIMIT_FSIZE, spec["file_size_mb"] * mb, spec["file_size_mb"] * mb),
                            (resource.RLIMIT_NPROC, spec["max_processes"], spec["max_processes"]),
                            (resource.RLIMIT_NOFILE, 256, 256),
                            (resource.RLIMIT_CORE, 0, 0)):
        resource.setrlimit(res, (soft, hard))
    libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binaries
    if spec["drop_to"] is not None:
        os.setgroups([])
        os.setgid(spec["drop_to"])
        os.setuid(spec["drop_to"])
    os.umask(0o077)


def same_output(got, expected):
    norm = lambda s: [line.rstrip() for line in s.strip().splitlines()]
    return norm(got) == norm(expected)


def describe(e):
    return f"{type(e).__name__}: {e}"[:300]


def main():
    with open(sys.argv[1], "rb") as f:
        spec = json.loads(f.read())
    os.unlink(sys.argv[1])
    out = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)

    def report(**kw):
        out.write(spec["nonce"] + json.dumps(kw) + "\n")

    try:
        setup(spec)
    except BaseException as e:
        report(fatal=describe(e))
        return
    report(ready=True)
    base = os.getcwd()
    try:
        code = compile(spec["code"], "<solution>", "exec")
    except BaseException as e:
        report(error=describe(e))
        return
    if spec["kind"] == "asserts":
        ns = {"__name__": "__solution__"}
        try:
            exec(code, ns)
        except SystemExit as e:
            if e.code not in (None, 0):
                report(error=describe(e))
                return
        except BaseException as e:
            report(error=describe(e))
            return
        for i, test in enumerate(spec["tests"]):
            try:
                exec(compile(test, f"<test {i}>", "exec"), ns)
                report(test=i, ok=True)
            except BaseException as e:
                report(test=i, ok=False, error=describe(e))
    else:
        stdin_path, stdout_path = os.path.join(base, "stdin.txt"), os.path.join(base, "stdout.txt")
        for i, (given, expected) in enumerate(spec["tests"]):
            error = ""
            try:
                with open(stdin_path, "w", encoding="utf-8") as f:
                    f.write(given)
                fd = os.open(stdin_path, os.O_RDONLY)
                os.dup2(fd, 0)
                os.close(fd)
                fd = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(fd, 1)
                os.close(fd)
                sys.stdin = open(0, "r", encoding="utf-8", errors="replace", closefd=False)
                sys.stdout = stdout = open(1, "w", encoding="utf-8", closefd=False)
                try:
                    exec(code, {"__name__": "__main__"})
                except SystemExit as e:
                    if e.code not in (None, 0):
                        error = describe(e)
                except BaseException as e:
                    error = describe(e)
                for f in {id(stdout): stdout, id(sys.stdout): sys.stdout}.values():
                    f.flush()
                with open(stdout_path, encoding="utf-8", errors="replace") as f:
                    got = f.read()
            except BaseException as e:
                error = error or describe(e)
            ok = not error and same_output(got, expected)
            report(test=i, ok=ok, **({"error": error} if error else {}))
    report(done=True)


if __name__ == "__main__":
    main()
