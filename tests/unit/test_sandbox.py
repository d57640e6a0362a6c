"""The code sandbox: right and half-right solutions, then code that loops, forks, allocates 10 GB,
opens sockets or writes outside its dir. Each must score 0 without hurting this process or the
machine: timeouts are 2-3 s and nothing may survive a run (checked by a marker in /proc)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time

import pytest

from posttrain_cli.rewards import sandbox
from posttrain_cli.rewards.sandbox import Limits, Tests

# The files that run sandboxes share an xdist group, so they run one after another (the process
# limit is per sandbox now, but timings are tight on a 2-core machine).

FAST = Limits(timeout=3)
INC = "def inc(x):\n    return x + 1\n"


def marked(marker: str) -> list[str]:
    """Live pids whose command line or name holds `marker`. Zombies (dead, waiting to be reaped
    by the dying pid namespace) do not count; a process still exiting gets up to 5 s (a killed
    namespace's processes exit asynchronously; on a loaded 2-core machine 0.5 s was once not enough)."""
    deadline = time.monotonic() + 5
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f, open(f"/proc/{pid}/comm", "rb") as g:
                    named = marker.encode() in f.read() + g.read()
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue  # exited while we looked
            if named and state not in ("Z", "X"):
                found.append(pid)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def test_right_and_half_right():
    assert sandbox.run_tests(INC, Tests("asserts", ["assert inc(1) == 2", "assert inc(2) == 3"]), FAST).score == 1.0
    half = sandbox.run_tests(INC, Tests("asserts", ["assert inc(1) == 2", "assert inc(2) == 4"]), FAST)
    assert half.passed == [True, False] and half.score == 0.5 and not half.timed_out


@pytest.mark.parametrize("program", [
    "print(int(input()) + 1)",
    "import sys\nprint(int(sys.stdin.read()) + 1)",
    "print(int(open(0).read()) + 1)",
    "import sys\nsys.stdout.buffer.write(str(int(sys.stdin.buffer.read()) + 1).encode())",
    "import os\nos.write(1, b'%d\\n' % (int(os.read(0, 100)) + 1))",
    "def main():\n    print(int(input()) + 1)\n\nif __name__ == '__main__':\n    main()\n    raise SystemExit(0)",
    "print(int(input()) + 1)\nexit()",  # site's exit(): the sandbox starts without site, and sets it
])
def test_stdio_programs(program):
    # Expected output matches up to trailing whitespace; the second case is wrong on purpose.
    got = sandbox.run_tests(program, Tests("stdio", [("41\n", "42\n"), ("1\n", "3")]), FAST)
    assert got.passed == [True, False]


def test_stdio_failures():
    cases = Tests("stdio", [("1\n", "2")])
    assert sandbox.run_tests("print(2)\nraise SystemExit(1)", cases, FAST).score == 0.0  # non-zero exit
    assert sandbox.run_tests("print(2)\n1 / 0", cases, FAST).score == 0.0
    assert sandbox.run_tests("print(2, 3)", cases, FAST).score == 0.0


def test_solution_that_does_not_run():
    got = sandbox.run_tests("def inc(x) return x", Tests("asserts", ["assert inc(1) == 2"]), FAST)
    assert got.passed == [False] and "SyntaxError" in got.error
    got = sandbox.run_tests(INC + "inc(None)", Tests("asserts", ["assert inc(1) == 2"]), FAST)
    assert got.passed == [False] and "TypeError" in got.error


def test_demo_code_under_main_guard_does_not_run_in_assert_mode():
    program = INC + "if __name__ == '__main__':\n    assert inc(1) == 5\n"
    assert sandbox.run_tests(program, Tests("asserts", ["assert inc(1) == 2"]), FAST).score == 1.0


def test_infinite_loop_times_out():
    start = time.monotonic()
    got = sandbox.run_tests("while True:\n    pass", Tests("asserts", ["assert True"]), Limits(timeout=2))
    assert got.passed == [False] and got.timed_out
    assert time.monotonic() - start < 4


def test_tests_passed_before_a_hang_still_count():
    program = INC + "def hang():\n    while True:\n        pass\n"
    tests = Tests("asserts", ["assert inc(1) == 2", "hang()", "assert inc(2) == 3"])
    got = sandbox.run_tests(program, tests, Limits(timeout=2))
    assert got.passed == [True, False, False] and got.timed_out


def test_10_gb_allocation_fails_inside_the_child():
    start = time.monotonic()
    got = sandbox.run_tests("x = bytearray(10 * 2**30)\n" + INC, Tests("asserts", ["assert inc(1) == 2"]), FAST)
    assert got.passed == [False] and "MemoryError" in got.error
    assert time.monotonic() - start < 3  # refused at once, not swapped in


def test_forked_sleepers_die_with_the_run():
    marker = f"ptsbx-{os.getpid()}-sleep"
    program = ("import os, time\n"
               "for _ in range(3):\n"
               "    if os.fork() == 0:\n"
               "        os.setsid()\n"  # leave the process group: only the pid namespace catches it
               f"        os.execv('/bin/sleep', ['{marker}', '300'])\n"
               "time.sleep(300)\n")
    got = sandbox.run_tests(program, Tests("asserts", ["assert True"]), Limits(timeout=2))
    assert got.passed == [False] and got.timed_out
    assert marked(marker) == []


def test_fork_bomb(mode):
    if mode == "plain" and os.geteuid() == 0:
        pytest.skip("plain mode as root has no process limit: a fork bomb would hurt this machine")
    marker = f"ptsbx{os.getpid() % 10**6}b"[:15]
    program = ("import ctypes, os\n"
               "libc = ctypes.CDLL(None)\n"
               "while True:\n"
               "    try:\n"
               "        if os.fork() == 0:\n"
               f"            libc.prctl(15, b'{marker}', 0, 0, 0)\n"  # PR_SET_NAME: find us in /proc
               "    except OSError:\n"
               "        pass\n")
    start = time.monotonic()
    got = sandbox.run_tests(program, Tests("asserts", ["assert True"]), Limits(timeout=2))
    assert got.passed == [False] and got.timed_out
    assert time.monotonic() - start < 5
    assert marked(marker) == []
    assert subprocess.run(["true"]).returncode == 0  # this machine can still start processes


def test_process_limit(mode):
    if mode == "plain" and os.geteuid() == 0:
        pytest.skip("RLIMIT_NPROC does not bind root")
    program = ("import os, time\n"
               "forked = 0\n"
               "for _ in range(20):\n"
               "    try:\n"
               "        if os.fork() == 0:\n"
               "            time.sleep(30)\n"
               "            os._exit(0)\n"
               "        forked += 1\n"
               "    except OSError:\n"
               "        break\n")
    got = sandbox.run_tests(program, Tests("asserts", [f"assert forked < {FAST.max_processes}, forked"]), FAST)
    assert got.passed == [True]


def test_no_network(namespaces):
    with socket.socket() as server:  # a listener on this machine's loopback
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        program = ("import socket\n"
                   f"socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
                   "def ok():\n    return True\n")
        got = sandbox.run_tests(program, Tests("asserts", ["assert ok()"]), FAST)
        assert got.passed == [False] and "OSError" in got.error
        with pytest.raises(socket.timeout):
            server.accept()
    only_loopback = "assert [l.split(':')[0].strip() for l in open('/proc/self/net/dev').readlines()[2:]] == ['lo']"
    assert sandbox.run_tests("", Tests("asserts", [only_loopback]), FAST).score == 1.0


def test_writes_do_not_reach_the_host(namespaces):
    with tempfile.TemporaryDirectory() as shared:
        os.chmod(shared, 0o777)  # writable by anyone: only the mount namespace keeps it out of reach
        target = os.path.join(shared, "owned.txt")
        tmp_file = f"/tmp/ptsbx-{os.getpid()}.txt"
        program = "def write(path):\n    open(path, 'w').write('x')\n    return True\n"
        tests = Tests("asserts", [f"assert write({target!r})",
                                  f"assert write({tmp_file!r})",  # a private /tmp: allowed
                                  "assert write('local.txt')"])   # its own working dir: allowed
        got = sandbox.run_tests(program, tests, FAST)
        assert got.passed == [False, True, True]
        assert not os.path.exists(target) and not os.path.exists(tmp_file)


def test_cannot_write_root_owned_dirs(mode):
    if mode == "plain" and os.geteuid() == 0:
        pytest.skip("plain mode as root runs the code as root")
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o755)
        target = os.path.join(d, "x.txt")
        got = sandbox.run_tests("", Tests("asserts", [f"open({target!r}, 'w').write('x')"]), FAST)
        assert got.passed == [False] and not os.path.exists(target)


def test_solution_and_tests_run_as_uids_of_their_own_when_root(mode):
    if os.geteuid() != 0 or mode == "plain":
        pytest.skip("drops privileges only when started as root")
    program = "import os\ndef ids():\n    return os.getuid(), os.getgid(), os.getgroups()\n"
    tests = Tests("asserts", [f"assert ids()[0] in range({sandbox.UID_POOL.start}, {sandbox.UID_POOL.stop})",
                              "assert ids()[0] == ids()[1] and ids()[2] == []",
                              "import os\nassert os.getuid() == 65534"])  # the tests: nobody
    assert sandbox.run_tests(program, tests, FAST).score == 1.0


def test_throwaway_dirs_are_removed(tmp_path, monkeypatch):
    # A temp dir of its own: other test workers run sandboxes in the shared one at the same time.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def ours():
        return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("posttrain-sandbox-")}

    before = ours()
    sandbox.run_tests("open('junk.txt', 'w').write('x' * 1000)", Tests("asserts", ["assert True"]), FAST)
    sandbox.run_tests("while True:\n    pass", Tests("asserts", ["assert True"]), Limits(timeout=1))
    assert ours() <= before


def test_printing_a_fake_result_does_not_pass():
    program = 'print(\'{"test": 0, "ok": true}\')\nprint(\'{"done": true}\')\nraise SystemExit(1)'
    assert sandbox.run_tests(program, Tests("stdio", [("", '{"test": 0, "ok": true}')]), FAST).score == 0.0
    assert sandbox.run_tests(program, Tests("asserts", ["assert True"]), FAST).score == 0.0


def test_run_many_runs_concurrently_and_keeps_order():
    jobs = [(f"import time\ntime.sleep(1)\ndef f():\n    return {i}\n", Tests("asserts", ["assert f() == 1"]))
            for i in range(3)]
    start = time.monotonic()
    got = sandbox.run_many(jobs, FAST, max_workers=3)
    assert [r.score for r in got] == [0.0, 1.0, 0.0]
    assert time.monotonic() - start < 2.5  # three 1 s sleeps side by side, not one after another


def test_plain_mode_still_grades():
    # The fallback when namespaces are unavailable: rlimits and a process group only.
    got = sandbox._run(INC, Tests("asserts", ["assert inc(1) == 2", "assert inc(1) == 3"]), FAST,
                       sandbox.Isolation("plain"))
    assert got.passed == [True, False]


def test_probe_falls_back_with_a_note(monkeypatch):
    broken = sandbox.Isolation("namespaces", None, unshare=0x1)  # not a namespace flag: unshare fails
    monkeypatch.setattr(sandbox, "_candidates", lambda: [broken, sandbox.Isolation("plain")])
    iso = sandbox._probe()
    assert iso.mode == "plain" and "no namespaces" in iso.note and "network reachable" in iso.note
    monkeypatch.setattr(sandbox, "_candidates", lambda: [broken])
    with pytest.raises(RuntimeError, match="no isolation mode works"):
        sandbox._probe()


def test_site_packages_and_subprocesses_of_the_interpreter():
    program = ("import subprocess, sys\n"
               "def child():\n"
               "    return subprocess.run([sys.executable, '-c', 'print(6 * 7)'],\n"
               "                          capture_output=True, text=True).stdout\n")
    tests = ["assert child().strip() == '42'"]
    try:
        import numpy  # noqa: F401
        program += "import numpy as np\ndef total(n):\n    return int(np.arange(n).sum())\n"
        tests.append("assert total(5) == 10")
    except ImportError:
        pass
    got = sandbox.run_tests(program, Tests("asserts", tests), Limits(timeout=20))
    assert got.score == 1.0, got


def test_the_sandbox_ends_cleanly(monkeypatch):
    """Its pid 1 kills and reaps the rest, then exits 0: no sign of the teardown going wrong."""
    statuses = []
    parse = sandbox._parse
    monkeypatch.setattr(sandbox, "_parse", lambda *a: statuses.append(a[-1]) or parse(*a))
    for program in (INC, INC + "import threading\nthreading.Thread(target=lambda: None).start()\n"):
        assert sandbox.run_tests(program, Tests("asserts", ["assert inc(1) == 2"]), FAST).score == 1.0
    assert statuses == [0, 0]
