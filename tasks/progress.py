"""Where iteration and segment progress goes: the reporter of whoever called the flow (the CLI's
progress bar), if any.

The caller names it for the length of its flow call (``with reporting_to(bar): reconstruct(...)``):
a context variable, so the tasks of that call see it, and a flow run in another thread, under a
worker or after the call sees none. Tasks call these functions whatever runs them; without a
reporter they do nothing, so the tasks stay free of terminal code.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional, Protocol


class Reporter(Protocol):
    def iteration_done(self, state, row: dict) -> None: ...
    def segment_done(self, outcome) -> None: ...


_reporter: ContextVar[Optional[Reporter]] = ContextVar("ptyflow_progress_reporter", default=None)


@contextmanager
def reporting_to(reporter: Reporter) -> Iterator[None]:
    """Send the progress of the flows called inside this block (in this thread, or in threads that
    copy its context, like a sweep's trials) to ``reporter``."""
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def iteration_done(state, row: dict) -> None:
    reporter = _reporter.get()
    if reporter is not None:
        reporter.iteration_done(state, row)


def segment_done(outcome) -> None:
    reporter = _reporter.get()
    if reporter is not None:
        reporter.segment_done(outcome)
