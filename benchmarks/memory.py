"""Peak memory of the calling process, shared by run.py and the PtyRAD driver."""

import resource
import sys


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's own address space.

    Not getrusage's ru_maxrss: on Linux it survives fork and exec, so a child started by a parent
    that holds 400 MB reports at least 400 MB whatever it does itself. VmHWM is reset by exec."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
