"""Peak memory of the calling process, shared by run.py and the PtyRAD driver."""

import resource
import sys


def _status_kb(field: str):
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """Resident set size now (0 where /proc is missing): the baseline of imports and runtime that
    the per-pattern figure leaves out."""
    return _status_kb("VmRSS") or 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own address space.

    Not getrusage's ru_maxrss: on Linux it survives fork and exec, so a child started by a parent
    that holds 400 MB reports at least 400 MB whatever it does itself. VmHWM is reset by exec."""
    peak = _status_kb("VmHWM")
    if peak is not None:
        return peak
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
