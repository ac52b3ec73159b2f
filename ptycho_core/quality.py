"""How good a reconstruction is, and where to look: the scanned field, phase Pearson.

Plain NumPy on arrays the caller has (positions in px on the object canvas, phase maps), so the
figures, the export's summary and the benchmarks measure the same region the same way.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


def scanned_field_box(positions_px: np.ndarray, canvas_shape: tuple[int, int], margin_px: int = 0
                      ) -> tuple[slice, slice]:
    """(rows, cols) slices covering every probe centre (N, 2) plus margin_px, within the canvas."""
    lo = np.maximum(np.floor(positions_px.min(axis=0)).astype(int) - margin_px, 0)
    hi = np.minimum(np.ceil(positions_px.max(axis=0)).astype(int) + 1 + margin_px, canvas_shape)
    return slice(lo[0], hi[0]), slice(lo[1], hi[1])


def scanned_field_mask(positions_px: np.ndarray, canvas_shape: tuple[int, int]) -> np.ndarray:
    """(Ny, Nx) bool: the bounding box of the probe-centre positions on the canvas."""
    mask = np.zeros(canvas_shape, dtype=bool)
    lo = np.ceil(positions_px.min(axis=0)).astype(int)
    hi = np.floor(positions_px.max(axis=0)).astype(int)
    mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1] = True
    return mask


# pairs of centres whose distances are held at once in scan_step_px: 64 MB of differences, where
# all pairs at once took 0.4 GB for 4096 centres and 1 GB for 20000 (tens of GB for a facility's
# 10^6, in the scan fit's set-up and in every positions figure)
STEP_PAIRS_AT_ONCE = 1 << 22


def scan_step_px(centres_px: np.ndarray) -> float:
    """The scan's step: the median distance (px) from a probe centre (N, 2) to its nearest other.
    Exact up to 4096 centres; above, from a sample of about 2048 of them against all."""
    centres = np.asarray(centres_px, dtype=np.float64)
    n = len(centres)
    exact = n <= 4096
    probes = centres if exact else centres[:: max(1, n // 2048)]
    nearest = np.full(len(probes), np.inf)  # squared distances
    block = max(1, STEP_PAIRS_AT_ONCE // len(probes))
    for start in range(0, n, block):
        part = centres[start:start + block]
        squared = ((probes[:, None, :] - part[None, :, :]) ** 2).sum(-1)  # (probes, block)
        if exact:  # each centre's distance to itself
            own = np.arange(len(part))
            squared[start + own, own] = np.inf
        else:  # a sampled centre is also among all (and so is any other at the same place)
            squared[squared == 0] = np.inf
        nearest = np.minimum(nearest, squared.min(axis=1))
    return float(np.median(np.sqrt(nearest)))


def phase_pearson(phase: np.ndarray, truth: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Pearson correlation of two phase maps over ``mask`` (offsets do not matter to it)."""
    a = np.asarray(phase, dtype=np.float64)
    b = np.asarray(truth, dtype=np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))
