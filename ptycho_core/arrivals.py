"""Which patterns an iteration draws its batches from while the scan is still acquired (live mode).

Patterns arrive in scan order, so the acquired ones are the first ``acquired`` of the planned
scan. Iterating over all of them every time would give the first rows many more optimizer steps
than the last ones by the end of the scan, and the object and probe would be fitted mostly to the
region scanned first. So while acquisition goes on, an iteration draws from the acquired patterns
that are behind, those visited fewer times than the most visited ones (rows that just arrived),
and from all of them once they are level. Visits stay within one of each other whenever the
reconstruction keeps up, and the rows that arrived last catch up before older rows get more.
Once acquisition is over every iteration draws from all acquired patterns again.

Every iteration's (acquired, acquiring) is kept in the run's history (columns ``patterns_in`` and
``acquiring``), so the visits, and with them the patterns of any later iteration, follow from the
history alone: a resumed run draws what an uninterrupted one would have drawn given the same
arrivals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

PATTERNS_IN, ACQUIRING = "patterns_in", "acquiring"  # history columns


def _pool(visits: np.ndarray, candidates: np.ndarray, acquired: int, acquiring: bool) -> np.ndarray:
    """The candidates an iteration draws from, given the visits before it."""
    pool = candidates[candidates < acquired]
    if not acquiring or not len(pool):
        return pool
    seen = visits[pool]
    behind = pool[seen < seen.max()]
    return behind if len(behind) else pool


@dataclass(frozen=True)
class Arrivals:
    """What a segment knows of the acquisition: patterns in (the first ``acquired``), and whether
    more are coming (``acquiring``)."""

    acquired: int
    acquiring: bool

    def visits(self, history: dict[str, list[float]], candidates: np.ndarray, n_positions: int) -> np.ndarray:
        """(n_positions,) times each pattern was drawn over the iterations in ``history``."""
        visits = np.zeros(n_positions, dtype=np.int64)
        for acquired, acquiring in zip(history.get(PATTERNS_IN, []), history.get(ACQUIRING, [])):
            visits[_pool(visits, candidates, int(acquired), bool(acquiring))] += 1
        return visits

    def draw(self, history: dict[str, list[float]], candidates: np.ndarray, n_positions: int,
             in_progress: Optional[tuple[int, bool]] = None) -> tuple[np.ndarray, dict[str, float]]:
        """The patterns (sorted indices) the next iteration draws from, and the history fields it
        records. ``candidates``: the patterns the optimizer may see at all (sorted); ``in_progress``:
        the (acquired, acquiring) an iteration stopped part-way was begun with, which it keeps."""
        acquired, acquiring = in_progress if in_progress is not None else (self.acquired, self.acquiring)
        pool = _pool(self.visits(history, candidates, n_positions), candidates, acquired, acquiring)
        return pool, {PATTERNS_IN: float(acquired), ACQUIRING: float(acquiring)}
