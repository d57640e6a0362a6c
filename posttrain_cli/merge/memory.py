"""This process's resident memory, read from /proc (Linux): the merge stage and bench_merge.py
report what a streamed merge cost."""

from __future__ import annotations


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> int | None:
    """Resident memory of this process now, in bytes (Linux; None elsewhere)."""
    return _status("VmRSS")


def peak_rss() -> int | None:
    """The most resident memory since start, or since reset_peak_rss()."""
    return _status("VmHWM")


def reset_peak_rss() -> bool:
    """Make peak_rss() start over from now (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
