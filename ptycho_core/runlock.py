"""One process at a time in a run directory: the lock.

An flock on <run_dir>/.lock is released by the kernel however its holder dies (SIGKILL included);
the file's content says who holds it (host, PID, start time, the flow run), so a second run is
refused naming them and a stale lock, whose process is gone, is taken over with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .rundir import RunDirError, RunPaths

log = logging.getLogger("ptyflow")


@contextmanager
def run_lock(run_dir: str | Path, owner: Optional[dict] = None) -> Iterator[dict]:
    """Hold the run directory for this process; a second holder is refused with host and PID.

    An flock on .lock is released by the kernel however the holder dies (SIGKILL included); the
    file's content tells who holds it (host, PID, start time, plus ``owner``, e.g. the flow run).
    A leftover content whose process is gone is a stale lock: it is taken over with a warning.
    Yields that stale holder's record ({} when the last holder let go normally), so the caller
    can close whatever the dead holder left open.
    """
    paths = RunPaths(Path(run_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _flock_at_once(fd, fcntl.LOCK_EX):
            holder = _read_holder(paths.lock)
            raise RunDirError(
                f"{paths.root} is in use by host {holder.get('host', '?')} PID {holder.get('pid', '?')} "
                f"(since {holder.get('since', '?')}); wait for it to finish or use another run directory"
            )
        previous = _read_holder(paths.lock)
        if previous and previous.get("host") == socket.gethostname() and previous.get("pid") == os.getpid():
            previous = {}  # this process's own record, not a dead holder's
        if previous:
            log.warning(
                "taking over the stale lock of %s left by host %s PID %s (that process is gone)",
                paths.root, previous.get("host"), previous.get("pid"),
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **(owner or {})}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        try:
            yield previous
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def _flock_at_once(fd: int, kind: int) -> bool:
    """flock ``fd`` (LOCK_EX or LOCK_SH) without waiting; False when another process holds it."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True


def lock_holder(run_dir: str | Path) -> tuple[Optional[dict], Optional[dict]]:
    """(holder, stale): the record of the living process holding the run directory, or None; and
    the record a dead holder left in .lock (a SIGKILLed run), or None. Decided by the flock
    itself, not by the file's text, which outlives a killed process."""
    path = RunPaths(Path(run_dir)).lock
    if not path.is_file():
        return None, None
    record = _read_holder(path) or None
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _flock_at_once(fd, fcntl.LOCK_SH):
            return record or {}, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None, record
    finally:
        os.close(fd)


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
