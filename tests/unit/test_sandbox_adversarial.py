"""The code sandbox against a completion that attacks the grader itself (issue 17, 1-3).

A policy under RL learns whatever the reward pays for, so each forgery below is appended to a
wrong solution (`inc` off by one) and must score 0, while the honest solution still scores 1:
the tests run in another process, under another uid, and see the solution's results only as
plain data. Then the mount view (no host Unix socket reachable) and the per-sandbox process
limit (honest threaded and subprocess solutions pass however many sandboxes run, even beside a
fork storm, and nothing is left behind)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from posttrain_cli.rewards import sandbox
from posttrain_cli.rewards.sandbox import Limits, Tests


FAST = Limits(timeout=5)
HONEST = "def inc(x):\n    return x + 1\n"
WRONG = "def inc(x):\n    return x + 2\n"
ASSERTS = Tests("asserts", ["assert inc(1) == 2", "assert inc(2) == 3",
                            "def check(candidate):\n    for x, y in zip([5, 6], map(candidate, [5, 6])):\n"
                            "        assert y == x + 1\n\ncheck(inc)\n"])
STDIO = Tests("stdio", [("41\n", "42\n"), ("1\n", "2\n")])
WRONG_STDIO = "print(int(input()) + 2)\n"


def score(program: str, tests: Tests = ASSERTS, limits: Limits = FAST) -> float:
    return sandbox.run_tests(program, tests, limits).score


def test_honest_solutions_still_score_1():
    assert score(HONEST) == 1.0
    assert score("print(int(input()) + 1)\n", STDIO) == 1.0


# Each attack is appended to WRONG (or WRONG_STDIO); the comment says what it forged before.
ATTACKS = {
    # `assert f(x) == 3` passed: the result compared equal to anything
    "always_true_eq": "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
                      "def inc(x):\n    return Yes()\n",
    "int_subclass_eq": "class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                       "    __hash__ = int.__hash__\n"
                       "def inc(x):\n    return Yes(0)\n",
    # the harness ran each test through exec
    "replace_exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None\n",
    # the harness wrote its report with json.dumps
    "patch_json_dumps": "import json\n_dumps = json.dumps\n"
                        "def fake(obj, *a, **k):\n"
                        "    if isinstance(obj, dict):\n"
                        "        obj = dict(obj, ok=True, value=True) if 'test' in obj or 'value' in obj else obj\n"
                        "        obj.pop('raise', None)\n"
                        "    return _dumps(obj, *a, **k)\n"
                        "json.dumps = fake\n",
    # walk up to the harness: its nonce, its report stream; forge passes and `done`, then exit 0
    "frame_walk": "import os, sys\n"
                  "frames, f = [], sys._getframe()\n"
                  "while f is not None:\n"
                  "    frames.append(f)\n"
                  "    f = f.f_back\n"
                  "found = [v for f in frames for v in list(f.f_locals.values()) + list(f.f_globals.values())]\n"
                  "nonces = {''} | {str(v['nonce']) for v in found if isinstance(v, dict) and 'nonce' in v}\n"
                  "lines = [f'{{\"test\": {i}, \"ok\": true}}' for i in range(10)] + ['{\"done\": true}']\n"
                  "data = ''.join(n + line + '\\n' for n in nonces for line in lines)\n"
                  "for v in found:\n"
                  "    try:\n"
                  "        if hasattr(v, 'write') and hasattr(v, 'flush'):\n"
                  "            v.write(data)\n"
                  "            v.flush()\n"
                  "        elif isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1024:\n"
                  "            os.write(v, data.encode())\n"
                  "    except Exception:\n"
                  "        pass\n"
                  "os._exit(0)\n",
    # every fd it might have inherited, in every report format, then a clean exit
    "inherited_fds": "import os, json\n"
                     "forged = b''.join(json.dumps(m).encode() + b'\\n' for m in\n"
                     "                  [{'ready': True}] + [{'test': i, 'ok': True} for i in range(10)]\n"
                     "                  + [{'done': True}])\n"
                     "frame = lambda m: len(m).to_bytes(8, 'big') + m\n"
                     "for fd in range(1024):\n"
                     "    for data in (forged, frame(b'{\"value\": 2}'), frame(b'{\"exports\": {}}')):\n"
                     "        try:\n"
                     "            os.write(fd, data)\n"
                     "        except OSError:\n"
                     "            pass\n"
                     "os._exit(0)\n",
    "print_report": "print('{\"test\": 0, \"ok\": true}')\nprint('{\"done\": true}')\n",
    "exit_early_0": "import os\nos._exit(0)\n",
    "exit_in_call": "import os\ndef inc(x):\n    os._exit(0)\n",
    "system_exit_0": "raise SystemExit(0)\n",
    # the tests' `abs`, `all`, `isinstance` are the real builtins, not the solution's
    "shadow_builtins": "abs = lambda x: 0\nall = lambda *a: True\nlen = lambda x: 0\n"
                       "isinstance = lambda *a: True\nsorted = lambda *a, **k: [1]\n",
    # the harness's math is its own
    "patch_math": "import math\nmath.isclose = lambda *a, **k: True\nmath.fabs = lambda x: 0.0\n",
    # stop or kill every process it can see (the harness among them)
    "kill_everything": "import os, signal\n"
                       "for sig in (signal.SIGSTOP, signal.SIGKILL):\n"
                       "    for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()] + [-1]:\n"
                       "        if pid not in (os.getpid(),):\n"
                       "            try:\n"
                       "                os.kill(pid, sig)\n"
                       "            except OSError:\n"
                       "                pass\n",
    # raised inside map(), StopIteration would end a test's loop before its asserts
    "stop_iteration": "def inc(x):\n    raise StopIteration\n",
    # a reply frame too big, then garbage, straight onto the reply pipe
    "garbage_replies": "import os\nfor fd in range(3, 64):\n    try:\n"
                       "        os.write(fd, (1 << 40).to_bytes(8, 'big') + b'x' * 100)\n"
                       "    except OSError:\n        pass\n",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_on_the_grader_scores_0(attack):
    got = sandbox.run_tests(WRONG + ATTACKS[attack], ASSERTS, FAST)
    assert got.passed == [False, False, False], got
    assert got.score == 0.0


def test_shadowed_builtins_and_patched_modules_do_not_reach_the_tests():
    tests = Tests("asserts", ["assert abs(inc(1) - 2) < 1e-9", "assert all(inc(i) == i + 1 for i in range(3))",
                              "assert math.isclose(area(1), 3.14159, rel_tol=1e-3)"])
    wrong = WRONG + "import math\ndef area(r):\n    return 0.0\n"
    assert score(wrong + ATTACKS["shadow_builtins"] + ATTACKS["patch_math"], tests) == 0.0
    # MBPP tests use `math` from the solution's own import: the harness imports it too
    assert score(HONEST + "import math\ndef area(r):\n    return math.pi * r * r\n", tests) == 1.0


# stdio: make the comparison answer True wherever it lives (the old runner's __main__)
PATCH_MAIN = ("import sys, gc, types\n"
              "main = sys.modules['__main__']\n"
              "for name in dir(main):\n"
              "    if any(w in name.lower() for w in ('same', 'compare', 'equal', 'match')):\n"
              "        setattr(main, name, lambda *a, **k: True)\n"
              "for o in gc.get_objects():\n"
              "    if isinstance(o, types.FunctionType) and o.__name__ in ('same_output', '_normalize'):\n"
              "        o.__code__ = (lambda *a, **k: True).__code__\n")


def test_stdio_program_learns_nothing_of_the_expected_output():
    """The same stdin, expected "yes-7c1" then "no": a program that could read anything drawn from
    the expected output (here: the worker's request and the rest of its stack) would answer both.
    Its source spells neither the expected string nor the output limit it would be asked for."""
    program = ("import sys\n"
               "seen, f = [], sys._getframe().f_back\n"
               "while f is not None:\n"
               "    seen += [repr(v) for v in f.f_locals.values() if isinstance(v, dict)]\n"
               "    f = f.f_back\n"
               "hint, key = ''.join(seen), ''.join(['ye', 's-7c1'])\n"
               "print(key if key in hint or str(2 * len(key) + 65536) in hint else 'no')\n")
    got = sandbox.run_tests(program, Tests("stdio", [("same\n", "yes-7c1"), ("same\n", "no")]), FAST)
    assert got.passed == [False, True], got


def test_stdio_attacks_score_0():
    for attack in (PATCH_MAIN, ATTACKS["print_report"], ATTACKS["inherited_fds"], ATTACKS["frame_walk"],
                   ATTACKS["replace_exec"], ATTACKS["patch_json_dumps"]):
        got = sandbox.run_tests(WRONG_STDIO + attack, STDIO, FAST)
        assert got.passed == [False, False], (attack, got)


def test_the_solution_never_holds_the_tests():
    """It scans its own memory for a string only a test holds; a string of its own is found."""
    program = ("import re\n"
               "def found(tag):\n"
               "    pattern = re.compile(tag.encode() + rb'-([0-9a-f]{6})')\n"
               "    with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:\n"
               "        for line in maps:\n"
               "            span, perms = line.split()[:2]\n"
               "            if perms[0] != 'r':\n"
               "                continue\n"
               "            lo, hi = (int(x, 16) for x in span.split('-'))\n"
               "            try:\n"
               "                mem.seek(lo)\n"
               "                m = pattern.search(mem.read(hi - lo))\n"
               "            except (OSError, ValueError, OverflowError):\n"
               "                continue\n"
               "            if m:\n"
               "                return tag + '-' + m.group(1).decode()\n"
               "own = 'k3y-' + ''.join(['abc', 'def'])\n")
    tests = Tests("asserts", ["assert found('k3y') == 'k3y-abcdef'",
                              "assert found('s3cr3t') == 's3cr3t-9f2a71'"])
    got = sandbox.run_tests(program, tests, Limits(timeout=20))
    assert got.passed == [True, False], got


def test_no_other_process_of_the_sandbox_is_reachable(namespaces):
    program = ("import os\n"
               "def reachable():\n"
               "    me, out = os.getpid(), []\n"
               "    for pid in [int(p) for p in os.listdir('/proc') if p.isdigit()]:\n"
               "        if os.stat(f'/proc/{pid}').st_uid == os.getuid():\n"
               "            continue  # its own\n"
               "        for path in (f'/proc/{pid}/fd', f'/proc/{pid}/mem', f'/proc/{pid}/environ'):\n"
               "            try:\n"
               "                os.listdir(path) if path.endswith('fd') else open(path, 'rb').read(1)\n"
               "                out.append(path)\n"
               "            except OSError:\n"
               "                pass\n"
               "    return out\n"
               "def seen():\n"
               "    return sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n")
    got = sandbox.run_tests(program, Tests("asserts", ["assert reachable() == []", "assert 1 in seen()",
                                                       "assert len(seen()) >= 3"]), FAST)
    assert got.passed == [True, True, True], got


def test_plain_values_cross_and_the_rest_fail():
    program = ("import math\n"
               "LIMIT = 10\n"
               "def echo(*args, **kwargs):\n    return args, kwargs\n"
               "def sort_in_place(a):\n    a.sort()\n"
               "def fail(x):\n    raise ValueError(f'bad {x}')\n"
               "def gen():\n    yield 1\n"
               "class Box:\n    pass\n"
               "def encode_shift(s):\n    return ''.join(chr(ord(c) + 1) for c in s)\n"
               "def decode_shift(s):\n    return ''.join(chr(ord(c) - 1) for c in s)\n")
    value = ("(None, True, -0.0, float('inf'), 2 ** 100, 1.5 + 2j, 'é', b'\\x00', bytearray(b'x'), "
             "[1, (2, 3)], {4, 5}, frozenset({6}), {'k': [7], (8, 9): None})")
    tests = Tests("asserts", [
        f"v = {value}\nassert echo(*v, key=v) == (v, {{'key': v}})",
        "import math\nassert math.isnan(echo(float('nan'))[0][0])",
        "x = [3, 1, 2]\nassert sort_in_place(x) is None and x == [1, 2, 3]",
        "try:\n    fail(1)\nexcept ValueError as e:\n    assert 'bad 1' in str(e)\nelse:\n    raise AssertionError",
        "assert LIMIT == 10 and math.pi > 3",
        "import random\nfor _ in range(50):\n    s = ''.join(random.choice('abc') for _ in range(5))\n"
        "    assert decode_shift(encode_shift(s)) == s",
        "gen()",  # a generator is not plain data
        "Box()",  # nor an instance
        "echo(lambda: 1)",  # nor an argument that is not plain data
    ])
    got = sandbox.run_tests(program, tests, FAST)
    assert got.passed == [True] * 6 + [False] * 3, got


def test_output_flood_scores_0():
    start = time.monotonic()
    got = sandbox.run_tests("while True:\n    print('x' * 100000)\n", Tests("stdio", [("", "x")]), FAST)
    assert got.passed == [False]
    got = sandbox.run_tests(WRONG + "while True:\n    print('x' * 100000)\n", ASSERTS, Limits(timeout=2))
    assert got.passed == [False] * 3 and got.timed_out
    assert time.monotonic() - start < 15


# -- the mount view --

def _listen(path: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o777)  # anyone may connect: only the mount view keeps the sandbox away
    server.listen(4)
    server.setblocking(False)
    return server


def test_host_unix_sockets_are_out_of_reach(namespaces):
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        os.chmod(tmp, 0o777)
        paths = [os.path.join(tmp, "host.sock"), f"/run/posttrain-test-{os.getpid()}.sock"]
        servers = [_listen(p) for p in paths]
        try:
            paths.append("/run/munge/munge.socket.2")  # the machine's own, where it has one
            program = ("import socket\n"
                       "def reach(path):\n"
                       "    try:\n"
                       "        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
                       "        s.settimeout(1)\n"
                       "        s.connect(path)\n"
                       "        s.sendall(b'escape')\n"
                       "        return True\n"
                       "    except OSError:\n"
                       "        return False\n"
                       f"reached = [reach(p) for p in {paths!r}]\n")
            got = sandbox.run_tests(program, Tests("asserts", ["assert reached == [False, False, False]"]), FAST)
            assert got.passed == [True], got
            for server in servers:
                with pytest.raises(BlockingIOError):
                    server.accept()
        finally:
            for server, path in zip(servers, paths):
                server.close()
                os.unlink(path)


def test_the_mount_view_holds_only_what_the_interpreter_needs(namespaces):
    program = ("import os, sys\n"
               "top = sorted(os.listdir('/'))\n"
               "tmp = sorted(os.listdir('/tmp'))\n"
               "run = os.listdir('/run')\n"
               "def writable(path):\n"
               "    try:\n"
               "        open(os.path.join(path, 'x'), 'w').close()\n"
               "        return True\n"
               "    except OSError:\n"
               "        return False\n"
               "checks = {p: writable(p)\n"
               "          for p in ('/', '/usr', '/etc', sys.prefix, '/tmp', '/dev/shm', '/run', '.')}\n")
    allowed = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "root", "run", "sbin", "tmp", "usr",
               "var", "opt", "home", "mnt", "srv", "work"}
    tests = Tests("asserts", [
        "assert 'home' not in top and 'work' not in top and 'mnt' not in top, top",
        f"assert set(top) <= {allowed!r}, top",
        "assert tmp == ['work'] and run == [], (tmp, run)",
        "assert checks == {'/': False, '/usr': False, '/etc': False, sys.prefix: False, "
        "'/tmp': True, '/dev/shm': True, '/run': False, '.': True}, checks",
    ])
    got = sandbox.run_tests(program, tests, FAST)
    assert got.passed == [True] * 4, got


# -- processes per sandbox --

THREADED = ("import threading\n"
            "def f():\n"
            "    out = []\n"
            "    t = threading.Thread(target=lambda: out.append(1))\n"
            "    t.start()\n"
            "    t.join()\n"
            "    return out\n")
SPAWNING = ("import subprocess\n"
            "def f():\n"
            "    return [int(subprocess.run(['echo', '1'], capture_output=True, text=True, check=True).stdout)]\n")
F_TESTS = Tests("asserts", ["assert f() == [1]"])
SLOW = Limits(timeout=60)


def orphans() -> list[str]:
    """Sandbox processes (of any state, zombies too) left to the machine's init; none ever should be."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                comm, rest = f.read().rsplit(")", 1)
        except OSError:
            continue
        state, ppid = rest.split()[:2]
        if comm.split("(", 1)[1].startswith("sandbox-") and ppid in ("0", "1"):
            found.append(f"{pid} {comm}) {state}")
    return found


def pool_processes() -> list[str]:
    """Processes running as a sandbox uid that are this test's (under this process) or nobody's
    (left to init). Another test worker's sandboxes, alive under their own supervisor while this
    test runs, are theirs."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        if uid in sandbox.UID_POOL and _mine_or_orphaned(pid):
            found.append(pid)
    return found


def _parent(pid: str) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[1]
    except OSError:
        return None  # gone meanwhile


def _mine_or_orphaned(pid: str) -> bool:
    parent = _parent(pid)
    if parent in ("0", "1"):
        return True  # left to init
    me = str(os.getpid())
    while parent not in (None, "0", "1"):
        if parent == me:
            return True
        parent = _parent(parent)
    return False


def test_back_to_back_runs_leave_nothing(mode):
    for _ in range(10):
        assert sandbox.run_tests(THREADED, F_TESTS, SLOW).score == 1.0
        assert orphans() == []
    if mode != "plain":
        assert pool_processes() == [] or os.geteuid() != 0


@pytest.mark.parametrize("program", [THREADED, SPAWNING], ids=["threaded", "spawning"])
def test_16_concurrent_honest_solutions_pass(program):
    got = sandbox.run_many([(program, F_TESTS)] * 16, SLOW, max_workers=16)
    assert [r.score for r in got] == [1.0] * 16, [r.error for r in got if r.score != 1.0]
    assert orphans() == []


def test_honest_solutions_pass_beside_a_fork_storm(mode):
    if mode == "plain" and os.geteuid() == 0:
        pytest.skip("plain mode as root has no process limit")
    storm = ("import os\n"
             "while True:\n"
             "    try:\n"
             "        os.fork()\n"
             "    except OSError:\n"
             "        pass\n")
    stormed = {}
    thread = threading.Thread(target=lambda: stormed.update(r=sandbox.run_tests(storm, F_TESTS, Limits(timeout=8))))
    thread.start()
    time.sleep(1.0)  # the storm is at its limit by now
    try:
        got = sandbox.run_many([(THREADED, F_TESTS)] * 8 + [(SPAWNING, F_TESTS)] * 8, SLOW, max_workers=16)
    finally:
        thread.join()
    assert [r.score for r in got] == [1.0] * 16, [r.error for r in got if r.score != 1.0]
    assert stormed["r"].timed_out and stormed["r"].score == 0.0
    assert orphans() == []


# -- without root: a user namespace --

NOBODY_PYTHON = "/usr/bin/python3"
NOBODY_ATTACKS = ("always_true_eq", "frame_walk", "inherited_fds", "kill_everything")


def test_without_root_a_user_namespace_holds_too():
    if os.geteuid() != 0 or not os.path.exists(NOBODY_PYTHON) or not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("runs the sandbox as nobody with the system python: needs root, setpriv and /usr/bin/python3")
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:  # pytest's tmp_path is root's alone
        os.chmod(tmp, 0o755)
        _as_nobody(Path(tmp))


def _as_nobody(tmp_path: Path):
    here = os.path.dirname(sandbox.__file__)
    for name in ("sandbox.py", "sandbox_child.py"):
        with open(os.path.join(here, name)) as src, open(tmp_path / name, "w") as dst:
            dst.write(src.read())
    script = tmp_path / "run.py"
    script.write_text(
        "import sys\nsys.path.insert(0, sys.argv[1])\nimport sandbox\n"
        "from sandbox import Tests, Limits\n"
        "iso = sandbox.isolation()\n"
        f"attacks = {[WRONG + ATTACKS[a] for a in NOBODY_ATTACKS]!r}\n"
        f"tests = Tests('asserts', {ASSERTS.cases!r})\n"
        f"honest = sandbox.run_tests({HONEST!r}, tests, Limits(timeout=10)).score\n"
        "forged = [sandbox.run_tests(a, tests, Limits(timeout=10)).score for a in attacks]\n"
        f"many = [r.score for r in sandbox.run_many([({THREADED!r}, Tests('asserts', {F_TESTS.cases!r}))] * 4, "
        "Limits(timeout=30), max_workers=4)]\n"
        "print(iso.mode, honest, forged, many)\n")
    os.chmod(script, 0o644)
    os.mkdir(tmp_path / "t")
    os.chown(tmp_path / "t", 65534, 65534)
    probe = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "unshare", "-U", "-r", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unprivileged user namespaces are off here")
    got = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", NOBODY_PYTHON,
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=120, cwd="/",
                         env={"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path / "t")})
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.split("\n")[0] == "namespaces 1.0 [0.0, 0.0, 0.0, 0.0] [1.0, 1.0, 1.0, 1.0]", got.stdout


def test_uid_pool_fits_the_uid_map(tmp_path):
    host = tmp_path / "host"
    host.write_text("         0          0 4294967295\n")
    assert sandbox._uid_pool(str(host)).start == 1_590_000_000
    rootless = tmp_path / "rootless"  # root of a container mapped onto 65536 subordinate uids
    rootless.write_text("0 1000 1\n1 100000 65536\n")
    pool = sandbox._uid_pool(str(rootless))
    assert len(pool) == 4096 and pool.stop <= sandbox.NOBODY and pool.start >= 1000
    tiny = tmp_path / "tiny"
    tiny.write_text("0 1000 1\n")
    assert not sandbox._uid_pool(str(tiny))


def test_unprivileged_mode_keeps_the_boundary():
    """Root without namespaces: no mount view and network, but the same processes and uids."""
    if os.geteuid() != 0:
        pytest.skip("the unprivileged mode is root's fallback")
    iso = sandbox.Isolation("unprivileged", None, 0, drop=True)
    assert sandbox._run(HONEST, ASSERTS, FAST, iso).score == 1.0
    for attack in ("always_true_eq", "replace_exec", "patch_json_dumps", "frame_walk", "inherited_fds",
                   "kill_everything"):
        assert sandbox._run(WRONG + ATTACKS[attack], ASSERTS, FAST, iso).score == 0.0, attack
    assert sandbox._run("print(int(input()) + 1)\n", STDIO, FAST, iso).score == 1.0
    marker = f"ptsbx-{os.getpid()}-daemon"
    daemon = ("import os\n"
              "if os.fork() == 0:\n"
              "    os.setsid()\n"  # leaves the process group: only killing the leased uid catches it
              "    if os.fork() == 0:\n"
              f"        os.execv('/bin/sleep', ['{marker}', '300'])\n"
              "    os._exit(0)\n")
    assert sandbox._run(HONEST + daemon, ASSERTS, FAST, iso).score == 1.0
    assert not [p for p in filter(str.isdigit, os.listdir("/proc")) if _cmdline_has(p, marker)]
    assert orphans() == []


def _cmdline_has(pid: str, marker: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except OSError:
        return False
