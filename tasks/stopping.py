"""How a run stops on SIGTERM or SIGINT, at whatever stage it is.

Batch schedulers (Slurm, PBS, Kubernetes) preempt a job by signalling every process of it at
once; a terminal's Ctrl-C signals the whole foreground process group. Whatever the moment, the
run ends with exit 143 (SIGTERM) or 130 (SIGINT), one line saying where it stopped, and nothing
damaged: a rerun resumes.

One handler owns both signals in the main thread: for the life of the ``ptyflow`` process (the
CLI installs it first thing) and, under a worker, for the life of each flow body (Prefect's own
SIGTERM handler is active only while its engine sets a run up or closes it).
- Inside ``deferred()`` (a segment: the iteration loop and its checkpoint write) a signal only
  records the request; the loop finishes its batch, writes a checkpoint and raises
  rundir.Preempted ("preempted at iteration N").
- Anywhere else the handler raises ``Stopped`` at once. Files are written atomically, so what that
  stage had begun is simply not there, and a rerun does it again.
A second signal while stopping is ignored: the first one's stop is under way.

Signals are process-wide, so this state is too: one ``_Owner`` per process, kept here.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130}  # 128 + the signal's number, what a shell reports


class Stopped(BaseException):
    """SIGTERM/SIGINT outside the iteration loop. A BaseException, like KeyboardInterrupt, so that
    no ``except Exception`` on its way (a log handler, an HTTP client's retry) swallows it; Prefect
    records the run as Crashed, as it does for its own termination signal."""

    def __init__(self, signal_name: str, stage: str):
        super().__init__(f"stopped by {signal_name} during {stage}")
        self.signal_name = signal_name
        self.stage = stage

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signal_name, 143)


@dataclass
class _Owner:
    """The process's signal state: who holds the handler, the stage, whether a stop was asked."""

    holders: int = 0  # install() and the owned() scopes now open
    deferring: int = 0  # deferred() scopes now open
    stage: str = "start-up"
    requested: Optional[str] = None  # the signal's name, once one came
    requested_during: str = ""  # the stage it came in
    saved: str = ""  # what a rerun starts from, noted by whoever knows (the CLI: the checkpoints)


_owner = _Owner()


def _on_signal(signum, frame) -> None:
    if _owner.requested is not None:
        return  # already stopping
    _owner.requested = signal.Signals(signum).name
    _owner.requested_during = _owner.stage
    if not _owner.deferring:
        raise Stopped(_owner.requested, _owner.stage)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _quiet_unraisable() -> None:
    """A signal that lands inside a finalizer or a weakref callback (an import's module lock, a
    closed file) raises Stopped where Python cannot propagate it: it prints "Exception ignored"
    and a traceback, and carries on. Such a Stopped is dropped silently instead; the request stays
    recorded and takes effect at the next stage boundary or batch."""
    if getattr(sys.unraisablehook, "ptyflow_quiet", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, Stopped):
            previous(unraisable)

    hook.ptyflow_quiet = True
    sys.unraisablehook = hook


def install() -> None:
    """Own SIGTERM and SIGINT for the rest of this process (the CLI's first call)."""
    _owner.holders += 1
    _quiet_unraisable()
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)


@contextmanager
def owned(name: str) -> Iterator[None]:
    """Own the signals for a flow body: Prefect's engine installed its own SIGTERM handler around
    it, which would end the run without a checkpoint or a word. The handlers found are put back at
    the end. Outside the main thread (signals cannot be handled there) this only names the stage.

    A process where nothing owned the signals before (a worker's flow run, a test) starts without
    a pending stop; inside the CLI a stop that came earlier still applies."""
    if not _in_main_thread():
        yield
        return
    if _owner.holders == 0:
        _owner.requested = None
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _quiet_unraisable()
    _owner.holders += 1
    try:
        for sig in SIGNALS:
            signal.signal(sig, _on_signal)
        with stage(name):
            yield
    finally:
        _owner.holders -= 1
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Name what the process is doing, for the line a stop prints; a stop asked for earlier (and
    lost on its way, e.g. in a finalizer) takes effect here."""
    check()
    before, _owner.stage = _owner.stage, name
    try:
        yield
    finally:
        _owner.stage = before


@contextmanager
def deferred() -> Iterator[Callable[[], Optional[str]]]:
    """A stretch that must not be cut (the iteration loop, a checkpoint write): a signal only
    records the request. Yields ``requested()``: the signal's name once one came, else None. If the
    stretch ends normally with a stop requested, Stopped is raised then."""
    _owner.deferring += 1
    try:
        yield lambda: _owner.requested
    finally:
        _owner.deferring -= 1
    check()


def check() -> None:
    """Raise Stopped if a stop was asked for (a point where stopping is safe)."""
    if _owner.requested is not None and not _owner.deferring:
        raise Stopped(_owner.requested, _owner.stage)


def requested() -> Optional[str]:
    """The signal that asked this process to stop, or None."""
    return _owner.requested


def note_saved(text: str) -> None:
    """Say what a rerun of this stopped process starts from (printed with the stop's line)."""
    _owner.saved = text


def saved() -> str:
    return _owner.saved


def pending_stop() -> Optional[Stopped]:
    """The stop asked for, as the Stopped it raised (or would raise) where the signal came; None
    without one. For whoever ends the process: a Stopped raised inside a C extension's callback can
    reach it wrapped in that library's own exception (pydantic's serializer does that)."""
    if _owner.requested is None:
        return None
    return Stopped(_owner.requested, _owner.requested_during)
