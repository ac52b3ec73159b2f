"""Where iteration and segment progress goes: a reporter the CLI sets (progress bar), if any.

Tasks call these functions whatever runs them; under a worker no reporter is set and they do
nothing, so the tasks stay free of terminal code.
"""

from __future__ import annotations

from typing import Optional, Protocol


class Reporter(Protocol):
    def iteration_done(self, state, row: dict) -> None: ...
    def segment_done(self, outcome) -> None: ...


_reporter: Optional[Reporter] = None


def set_reporter(reporter: Optional[Reporter]) -> None:
    global _reporter
    _reporter = reporter


def iteration_done(state, row: dict) -> None:
    if _reporter is not None:
        _reporter.iteration_done(state, row)


def segment_done(outcome) -> None:
    if _reporter is not None:
        _reporter.segment_done(outcome)
