"""A probe in the processes of a multi-process run, for the tests only: a test puts this folder on
PYTHONPATH, so that every Python process of the run (rank 0 and the helper ranks it starts)
imports it at start-up. It does nothing unless one of these is set:

PTYFLOW_PROBE_DIR=<dir>: at exit the process writes <dir>/<pid>.json with its command line and the
GPUs on which it holds a CUDA context (null where there is no CUDA driver). The CUDA driver is asked
directly (cuDevicePrimaryCtxGetState), so a context that any library of the process made counts.

PTYFLOW_PROBE_HOLD=<dir>: in a helper rank, once <dir>/hold exists, the process forks a child that
keeps a copy of every file descriptor of the rank but the standard streams, its sockets
included, and sleeps (120 s at most); the child's pid goes to <dir>/holder.<rank pid>. Killing
the rank then leaves its connections open, as a dead NCCL peer's are in effect: nothing tells the
other ranks through the transport, so only rank 0's watch on its helpers' processes sees the death.
"""

import atexit
import ctypes
import json
import os
import threading
import time
from pathlib import Path


def _command_line() -> list[str]:
    return Path("/proc/self/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]


def cuda_contexts():
    """The ordinals of the GPUs on which this process holds a (primary) CUDA context; None
    without a CUDA driver."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    count = ctypes.c_int()
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return None
    held = []
    for ordinal in range(count.value):
        device, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        if driver.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
            return None
        if driver.cuDevicePrimaryCtxGetState(device, ctypes.byref(flags), ctypes.byref(active)) != 0:
            return None
        if active.value:
            held.append(ordinal)
    return held


def _report(folder: Path) -> None:
    report = {"pid": os.getpid(), "command": _command_line(), "contexts": cuda_contexts()}
    (folder / f"{os.getpid()}.json").write_text(json.dumps(report))


def _hold_connections(folder: Path) -> None:
    while not (folder / "hold").exists():
        time.sleep(0.02)
    child = os.fork()
    if child == 0:  # the copy: holds the descriptors but the standard streams, touches nothing else
        os.closerange(0, 3)  # (the test reads the run's output to its end)
        time.sleep(120)
        os._exit(0)
    (folder / f"holder.{os.getpid()}").write_text(str(child))


if os.environ.get("PTYFLOW_PROBE_DIR"):
    atexit.register(_report, Path(os.environ["PTYFLOW_PROBE_DIR"]))
if os.environ.get("PTYFLOW_PROBE_HOLD") and "ptycho_core.ranks" in _command_line():
    threading.Thread(target=_hold_connections, args=(Path(os.environ["PTYFLOW_PROBE_HOLD"]),), daemon=True).start()
