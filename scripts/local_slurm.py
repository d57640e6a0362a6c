#!/usr/bin/env python3
"""A real one-node SLURM cluster (slurmctld + slurmd + munge) on this machine, for tests.

Usage:
    python scripts/local_slurm.py check                    # "ok", or why SLURM cannot run here
    python scripts/local_slurm.py up --dir DIR [--install] [--timeout 60]
    python scripts/local_slurm.py down --dir DIR

    eval "$(python scripts/local_slurm.py up --dir /tmp/slurm)"   # sets SLURM_CONF
    sbatch --wrap hostname
    python scripts/local_slurm.py down --dir /tmp/slurm

`up` writes DIR/slurm.conf (SLURM 22.05 syntax) and keeps everything of the cluster under DIR:
state (state/), slurmd spool (spool/), pid files and logs (slurmctld.pid, slurmctld.log, ...).
The daemons listen on free ports, so a system SLURM on the default ports is left alone. It waits
until the node is `idle` and prints `export SLURM_CONF=DIR/slurm.conf` as the last line of stdout
(progress goes to stderr). A cluster already running in DIR is reused; otherwise it starts on a
fresh state (no jobs from an earlier run). With --install, missing packages are installed with
apt-get (root only). munged is started (as the munge user) when `munge -n | unmunge` fails.

`down` stops slurmd and slurmctld by their pid files (SIGTERM, then SIGKILL), then the job
processes this cluster's slurmstepd left behind (slurmstepd outlives slurmd by design; these
are found by the SLURM_CONF=DIR/slurm.conf in their environment, so nothing of another cluster
is touched), and munged only if `up` started it and no other slurmctld/slurmd is running.

Needs root: the daemons run as root (SlurmUser=root) and jobs run as the submitting user.

Exit status: 0 done; 1 the cluster did not come up (the daemon logs' tails go to stderr);
2 bad usage; 3 SLURM cannot run here (not installed and cannot be, not root, munge broken).
Expected failures end with one line on stderr: `local_slurm: <why>`.
"""

from __future__ import annotations

import argparse
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
# Programs this script (and a test using the cluster) needs; the first four name the packages.
BINARIES = ["slurmctld", "slurmd", "sbatch", "munged", "srun", "sinfo", "scontrol", "scancel", "munge", "unmunge"]
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGE_RUN = Path("/run/munge")
DAEMONS = ["slurmctld", "slurmd"]
INSTALL_TIMEOUT = 1200  # s, for each apt-get call
UNIX_PATH_MAX = 107     # sun_path: slurmd puts its step sockets in the spool dir


class Unavailable(Exception):
    """SLURM cannot run on this machine (exit 3)."""


class Failed(Exception):
    """The cluster did not come up or go down (exit 1)."""


def log(msg: str) -> None:
    print(f"local_slurm: {msg}", file=sys.stderr, flush=True)


# --- small helpers --------------------------------------------------------------------------------

def which(name: str) -> str | None:
    """`name` on PATH, or in the sbin dirs a non-login root shell may lack."""
    return shutil.which(name) or shutil.which(name, path=SBIN_PATH)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if which(b) is None]


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def proc_environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def last_line(text: str) -> str:
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else ""


def clean_env(conf: Path | None = None) -> dict[str, str]:
    """This process's environment without the SLURM_* variables of an enclosing job (they would
    point srun/sbatch at another cluster's job), with SLURM_CONF set when `conf` is given and
    the sbin dirs on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = env.get("PATH", "") + ":" + SBIN_PATH
    if conf is not None:
        env["SLURM_CONF"] = str(conf)
    return env


def run(cmd: list[str], env: dict | None = None, timeout: float = 30, input: str | None = None
        ) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, env=env, input=input, capture_output=True, text=True, timeout=timeout,
                              stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]} timed out after {timeout:.0f} s")
    except OSError as e:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: {e}")


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports nothing listens on, below the usual ephemeral range (so outgoing
    connections do not take them between now and the daemons' bind)."""
    ports: list[int] = []
    rng = random.Random()
    for _ in range(2000):
        port = rng.randrange(20000, 32000)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise Failed("found no free TCP ports in 20000-32000")


# --- availability and installation ----------------------------------------------------------------

def unavailable_reason() -> str | None:
    """Why SLURM can never come up here (None: it can, maybe after installing packages)."""
    if not sys.platform.startswith("linux"):
        return f"SLURM needs Linux (this is {sys.platform})"
    missing = missing_binaries()
    if os.geteuid() != 0:
        if missing:
            return f"SLURM is not installed (missing {', '.join(missing)}) and this is not root"
        return "not root: the one-node cluster runs slurmctld/slurmd as root (SlurmUser=root)"
    if missing and which("apt-get") is None:
        return f"SLURM is not installed (missing {', '.join(missing)}) and there is no apt-get"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        if not missing:  # installing the munge package creates the user
            return "there is no munge user (reinstall the munge package)"
    return None


def install_packages() -> None:
    """apt-get install the SLURM packages; an `apt-get update` first only when that fails."""
    env = {**clean_env(), "DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
    install = [which("apt-get") or "apt-get", "install", "-y", "-q", "--no-install-recommends",
               "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
               "-o", "DPkg::Lock::Timeout=300", *PACKAGES]
    log(f"installing {' '.join(PACKAGES)} with apt-get (may take minutes)")
    result = run(install, env=env, timeout=INSTALL_TIMEOUT)
    if result.returncode != 0:
        log("apt-get install failed; running apt-get update and trying again")
        update = run([install[0], "update", "-q", "-o", "DPkg::Lock::Timeout=300"], env=env, timeout=INSTALL_TIMEOUT)
        if update.returncode != 0:
            raise Unavailable(f"apt-get update failed (exit {update.returncode}): "
                              f"{last_line(update.stderr) or last_line(update.stdout)}")
        result = run(install, env=env, timeout=INSTALL_TIMEOUT)
    if result.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed (exit {result.returncode}): "
                          f"{last_line(result.stderr) or last_line(result.stdout)}")
    still = missing_binaries()
    if still:
        raise Unavailable(f"apt-get installed {' '.join(PACKAGES)} but {', '.join(still)} is still missing")


def ensure_installed(install: bool) -> None:
    reason = unavailable_reason()
    if reason:
        raise Unavailable(reason)
    missing = missing_binaries()
    if missing:
        if not install:
            raise Unavailable(f"SLURM is not installed (missing {', '.join(missing)}); "
                              f"rerun with --install or apt-get install {' '.join(PACKAGES)}")
        install_packages()


# --- munge ----------------------------------------------------------------------------------------

def munge_works() -> bool:
    cred = run([which("munge") or "munge", "-n"], timeout=10)
    if cred.returncode != 0 or not cred.stdout.strip():
        return False
    return run([which("unmunge") or "unmunge"], input=cred.stdout, timeout=10).returncode == 0


def _chown_munge(path: Path, mode: int) -> None:
    user = pwd.getpwnam("munge")
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)


def ensure_munge(cluster_dir: Path) -> None:
    """A working munged: the key, its directories, and the daemon (started as the munge user when
    `munge -n | unmunge` fails; its pid is kept in DIR/munged.started so `down` stops only it)."""
    if munge_works():
        return
    try:
        user = pwd.getpwnam("munge")
    except KeyError:
        raise Unavailable("there is no munge user (reinstall the munge package)") from None
    MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
    if not MUNGE_KEY.exists():
        log(f"creating {MUNGE_KEY}")
        fd = os.open(MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
    _chown_munge(MUNGE_KEY.parent, 0o700)
    _chown_munge(MUNGE_KEY, 0o400)
    for path, mode in ((MUNGE_RUN, 0o755), (Path("/var/lib/munge"), 0o711), (Path("/var/log/munge"), 0o700)):
        path.mkdir(parents=True, exist_ok=True)
        _chown_munge(path, mode)

    pidfile = MUNGE_RUN / "munged.pid"
    old = read_pid(pidfile)
    if old and pid_alive(old) and proc_comm(old) == "munged":
        raise Unavailable(f"munged (pid {old}) runs but `munge -n | unmunge` fails; see /var/log/munge/munged.log")
    log("starting munged as the munge user")
    # --force: a socket left by a munged that died is taken over (a live one holds a lock).
    # Its output goes to a file: a daemon holding our pipes would keep a caller reading them waiting.
    out = cluster_dir / "munged.stdout"
    with open(out, "ab") as f:
        started = subprocess.run([which("munged") or "munged", "--force"], user=user.pw_uid, group=user.pw_gid,
                                 extra_groups=[], env=clean_env(), stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=subprocess.STDOUT, timeout=30, cwd="/", start_new_session=True)
    deadline = time.monotonic() + 15
    while not munge_works():
        if time.monotonic() > deadline:
            why = last_line(tail(out, 3)) or last_line(tail(Path("/var/log/munge/munged.log"), 3))
            raise Unavailable(f"munged did not start (exit {started.returncode}): {why or 'no message'}")
        time.sleep(0.2)
    pid = read_pid(pidfile)
    (cluster_dir / "munged.started").write_text(f"{pid or ''}\n")


# --- the cluster ----------------------------------------------------------------------------------

class Cluster:
    """The files of one cluster under `root`."""

    def __init__(self, root: Path):
        self.root = root.expanduser().resolve()
        self.conf = self.root / "slurm.conf"
        self.state = self.root / "state"
        self.spool = self.root / "spool"

    def pidfile(self, daemon: str) -> Path:
        return self.root / f"{daemon}.pid"

    def logfile(self, daemon: str) -> Path:
        return self.root / f"{daemon}.log"

    def env(self) -> dict[str, str]:
        return clean_env(self.conf)

    def daemon_pid(self, daemon: str) -> int | None:
        """The pid of this cluster's `daemon` if it runs (pid file, process name and environment
        agree, so a reused pid is not taken for it)."""
        pid = read_pid(self.pidfile(daemon))
        if pid is None or not pid_alive(pid) or proc_comm(pid) != daemon:
            return None
        conf = proc_environ(pid).get("SLURM_CONF")
        return pid if conf in (None, str(self.conf)) else None

    def node_states(self) -> list[str] | None:
        """`sinfo -h -o %T` lines (None: the controller does not answer)."""
        result = run([which("sinfo") or "sinfo", "-h", "-o", "%T"], env=self.env(), timeout=15)
        if result.returncode != 0:
            return None
        return result.stdout.split()

    def is_up(self) -> bool:
        return (self.conf.exists() and all(self.daemon_pid(d) for d in DAEMONS)
                and bool(self.node_states()))

    def write_conf(self) -> None:
        host = short_hostname()
        cpus = os.cpu_count() or 1
        mem_mb = real_memory_mb()
        ctld_port, slurmd_port = free_ports(2)
        try:
            socket.gethostbyname(host)
            ctld_host, node_addr = host, ""
        except OSError:  # the host name does not resolve: give the daemons the loopback address
            ctld_host, node_addr = f"{host}(127.0.0.1)", " NodeAddr=127.0.0.1"
        self.conf.write_text(f"""\
# Written by scripts/local_slurm.py: a one-node test cluster; all its files live in {self.root}.
ClusterName=posttrain
SlurmctldHost={ctld_host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again after cred_expire seconds (default 120).
AuthInfo=cred_expire=10
StateSaveLocation={self.state}
SlurmdSpoolDir={self.spool}
SlurmctldPidFile={self.pidfile("slurmctld")}
SlurmdPidFile={self.pidfile("slurmd")}
SlurmctldLogFile={self.logfile("slurmctld")}
SlurmdLogFile={self.logfile("slurmd")}
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
# Start jobs within a second or two: batch jobs are scheduled when submitted (no 3 s batching),
# and the full passes that start requeued jobs and resolve dependencies run every 2 s (not 60 s).
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
SchedulerTimeSlice=30
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Finished jobs stay visible to `scontrol show job` for 10 minutes.
MinJobAge=600
ReturnToService=2
JobRequeue=1
KillWait=10
InactiveLimit=0
MessageTimeout=10
SlurmctldTimeout=120
SlurmdTimeout=300
NodeName={host} CPUs={cpus} RealMemory={mem_mb}{node_addr} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP DefMemPerCPU={max(1, mem_mb // cpus)}
""")


def real_memory_mb() -> int:
    """75% of MemAvailable, in MB: below free memory, so slurmd does not drain the node."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return max(100, int(line.split()[1]) * 3 // 4 // 1024)
    except OSError:
        pass
    return 1000


def stop_pid(pid: int, name: str, grace: float = 15) -> None:
    """SIGTERM, up to `grace` seconds, then SIGKILL."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not pid_alive(pid) or proc_comm(pid) != name:
            return
        time.sleep(0.1)
    log(f"{name} (pid {pid}) ignored SIGTERM for {grace:.0f} s; sending SIGKILL")
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    for _ in range(50):
        if not pid_alive(pid):
            return
        time.sleep(0.1)


def leftover_steps(cluster: Cluster) -> list[int]:
    """Pids of the slurmstepd processes of this cluster and of everything they started."""
    conf = str(cluster.conf)
    steps = {p for p in all_pids() if proc_comm(p) == "slurmstepd" and proc_environ(p).get("SLURM_CONF") == conf}
    if not steps:
        return []
    parents: dict[int, int] = {}
    for p in all_pids():
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            parents[p] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree = set(steps)
    grew = True
    while grew:
        grew = False
        for p, pp in parents.items():
            if pp in tree and p not in tree:
                tree.add(p)
                grew = True
    return sorted(tree)


def stop_cluster(cluster: Cluster) -> None:
    for daemon in DAEMONS:  # controller first: it would otherwise react to the node going away
        pid = cluster.daemon_pid(daemon)
        if pid:
            log(f"stopping {daemon} (pid {pid})")
            stop_pid(pid, daemon)
        cluster.pidfile(daemon).unlink(missing_ok=True)
    pids = leftover_steps(cluster)
    if pids:
        log(f"stopping {len(pids)} job process(es) this cluster's slurmstepd left: {pids}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
                time.sleep(0.1)
            pids = [p for p in pids if pid_alive(p)]
            if not pids:
                break


def stop_own_munged(cluster: Cluster) -> None:
    marker = cluster.root / "munged.started"
    if not marker.exists():
        return
    pid = read_pid(marker)
    others = [p for p in all_pids() if proc_comm(p) in DAEMONS]
    if others:
        log(f"leaving munged running: other SLURM daemons use it (pids {others})")
    elif pid and pid_alive(pid) and proc_comm(pid) == "munged":
        log(f"stopping munged (pid {pid}), which `up` started")
        stop_pid(pid, "munged", grace=5)
    marker.unlink(missing_ok=True)


def start_daemon(cluster: Cluster, daemon: str) -> None:
    """Start `daemon -f CONF`; it daemonizes and writes its pid file. Its output goes to a file,
    never to our pipes, so a caller capturing our output is not held open by the daemon."""
    out = cluster.root / f"{daemon}.stdout"
    with open(out, "ab") as f:
        result = subprocess.run([which(daemon) or daemon, "-f", str(cluster.conf)], env=cluster.env(),
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                cwd=cluster.root, start_new_session=True, timeout=60)
    if result.returncode != 0:
        raise Failed(f"{daemon} exited with {result.returncode} at start")
    deadline = time.monotonic() + 15
    while cluster.daemon_pid(daemon) is None:
        if time.monotonic() > deadline:
            raise Failed(f"{daemon} started but wrote no live pid to {cluster.pidfile(daemon)}")
        time.sleep(0.1)


def wait_idle(cluster: Cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states: list[str] | None = None
    while time.monotonic() < deadline:
        for daemon in DAEMONS:
            if cluster.daemon_pid(daemon) is None:
                raise Failed(f"{daemon} died while the cluster came up")
        states = cluster.node_states()
        if states == ["idle"]:
            return
        time.sleep(0.25)
    reason = run([which("sinfo") or "sinfo", "-h", "-R", "-o", "%T %E"], env=cluster.env(), timeout=15).stdout.strip()
    raise Failed(f"the node was not idle within {timeout:.0f} s (sinfo: {states}{'; ' + reason if reason else ''})")


def up(cluster: Cluster, install: bool, timeout: float) -> None:
    ensure_installed(install)
    if cluster.is_up():
        log(f"a cluster already runs in {cluster.root}")
        return
    started = time.monotonic()
    longest = len(str(cluster.spool)) + len(short_hostname()) + len("/_4294967295.4294967295")
    if longest > UNIX_PATH_MAX:
        raise Failed(f"--dir {cluster.root} is too long for slurmd's unix sockets in it; use a shorter path")
    cluster.root.mkdir(parents=True, exist_ok=True)
    stop_cluster(cluster)  # what is left of an earlier, partly running cluster in DIR
    ensure_munge(cluster.root)
    for d in (cluster.state, cluster.spool):
        shutil.rmtree(d, ignore_errors=True)  # a fresh state: no jobs of an earlier run come back
        d.mkdir(parents=True)
    for daemon in DAEMONS:
        cluster.logfile(daemon).unlink(missing_ok=True)
    cluster.write_conf()
    try:
        for daemon in DAEMONS:
            start_daemon(cluster, daemon)
        wait_idle(cluster, timeout)
    except Failed:
        for daemon in DAEMONS:
            print(f"--- {cluster.logfile(daemon)} (tail) ---\n{tail(cluster.logfile(daemon))}", file=sys.stderr)
            stdout = cluster.root / f"{daemon}.stdout"
            if stdout.exists() and stdout.stat().st_size:
                print(f"--- {stdout} (tail) ---\n{tail(stdout)}", file=sys.stderr)
        stop_cluster(cluster)
        raise
    log(f"cluster up in {time.monotonic() - started:.1f} s ({cluster.conf})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local_slurm.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start a one-node cluster in DIR (or reuse the one running there)")
    p_up.add_argument("--dir", required=True, type=Path, help="where its conf, state, spool, pids and logs live")
    p_up.add_argument("--install", action="store_true", help="apt-get install the SLURM packages if missing (root)")
    p_up.add_argument("--timeout", type=float, default=60, help="seconds to wait for the node to be idle (60)")
    p_down = sub.add_parser("down", help="stop the cluster running in DIR")
    p_down.add_argument("--dir", required=True, type=Path)
    sub.add_parser("check", help="print `ok` or why SLURM cannot be brought up here")
    args = parser.parse_args(argv)

    try:
        if args.command == "check":
            reason = unavailable_reason()
            if reason:
                print(reason)
                return 3
            missing = missing_binaries()
            if missing:
                log(f"`up --install` will install {' '.join(PACKAGES)} (missing {', '.join(missing)})")
            print("ok")
            return 0
        cluster = Cluster(args.dir)
        if args.command == "up":
            up(cluster, args.install, args.timeout)
            print(f"export SLURM_CONF={cluster.conf}", flush=True)
            return 0
        if os.geteuid() != 0:
            raise Unavailable("not root: cannot stop daemons that run as root")
        stop_cluster(cluster)
        stop_own_munged(cluster)
        return 0
    except Unavailable as e:
        log(str(e))
        return 3
    except Failed as e:
        log(str(e))
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
