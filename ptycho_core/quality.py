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


# pairs of centres whose distances are held at once where scan_step_px compares a centre with all
# others (a crowded scan; see below): 64 MB of differences
STEP_PAIRS_AT_ONCE = 1 << 22
# scan_step_px looks for a centre's nearest other in the 3 x 3 cells of a grid around it; a scan
# with more centres than this in one cell (one spot scanned many times) is compared with all instead
STEP_CELL_CROWD = 64


def scan_step_px(centres_px: np.ndarray) -> float:
    """The scan's step: the median distance (px) from a probe centre (N, 2) to its nearest other.
    Exact up to 4096 centres; above, from a sample of about 2048 of them against all (a centre at
    the very place of a sampled one does not count). The centres are binned into cells of about
    1.5 steps, so each is compared with the few in the 3 x 3 cells around it: 0.01 s for 65536
    centres of a jittered raster, 0.03 s for 262144 and 0.1 s for 10^6, where comparing each with
    all took 3.7 s, 15 s and about a minute (the scan fit's set-up and every positions figure pay
    it)."""
    centres = np.asarray(centres_px, dtype=np.float64)
    n = len(centres)
    exact = n <= 4096
    probes = np.arange(n) if exact else np.arange(0, n, max(1, n // 2048))
    return float(np.median(np.sqrt(_nearest_squared(centres, probes, exact))))


def _nearest_squared(centres: np.ndarray, probes: np.ndarray, exact: bool) -> np.ndarray:
    """(P,) squared distance from each centre ``probes`` (P,) indexes to its nearest other (exact:
    any other index, a duplicate giving 0; else any other place, distance 0 left out)."""
    n = len(centres)
    lo = centres.min(axis=0) if n else np.zeros(2)
    extent = centres.max(axis=0) - lo if n else np.zeros(2)
    area = float(extent[0] * extent[1])
    # 1.5 steps a side on a raster (about two centres a cell), so a centre's nearest other is well
    # inside its 3 x 3 cells; along a line of centres (no area, or nearly none) at least 1.5 times
    # its length over their number, so no side has more cells than there are centres
    cell = 1.5 * max(math.sqrt(area / n) if area > 0 else 0.0, float(extent.max()) / max(n, 1))
    if not cell > 0:
        return _nearest_squared_by_all(centres, probes, exact)
    grid = np.floor((centres - lo) / cell).astype(np.int64) + 1  # a margin of one cell each side
    width = int(grid[:, 1].max()) + 2
    keys = grid[:, 0] * width + grid[:, 1]
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    runs = np.diff(np.flatnonzero(np.diff(sorted_keys, prepend=-1, append=sorted_keys[-1] + 1)))  # per cell
    if runs.max() > STEP_CELL_CROWD:
        return _nearest_squared_by_all(centres, probes, exact)
    nearest = np.full(len(probes), np.inf)
    probe_keys = keys[probes]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            wanted = probe_keys + dy * width + dx
            first = np.searchsorted(sorted_keys, wanted, side="left")
            counts = np.searchsorted(sorted_keys, wanted, side="right") - first
            if not counts.any():
                continue
            owner = np.repeat(np.arange(len(probes)), counts)  # which probe each candidate is for
            within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
            candidate = order[np.repeat(first, counts) + within]
            squared = ((centres[probes[owner]] - centres[candidate]) ** 2).sum(axis=1)
            squared[(candidate == probes[owner]) if exact else (squared == 0)] = np.inf
            np.minimum.at(nearest, owner, squared)
    # a centre outside the 3 x 3 cells is at least a cell away: what is nearer than that is exact
    far = nearest > cell * cell
    if far.any():
        nearest[far] = _nearest_squared_by_all(centres, probes[far], exact)
    return nearest


def _nearest_squared_by_all(centres: np.ndarray, probes: np.ndarray, exact: bool) -> np.ndarray:
    """_nearest_squared by comparing each probe with every centre, a block at a time."""
    nearest = np.full(len(probes), np.inf)
    if not len(probes):
        return nearest
    block = max(1, STEP_PAIRS_AT_ONCE // len(probes))
    probed = centres[probes][:, None, :]  # (probes, 1, 2)
    for start in range(0, len(centres), block):
        part = centres[start:start + block]
        squared = ((probed - part[None, :, :]) ** 2).sum(-1)  # (probes, block)
        if exact:  # each centre's distance to itself
            squared[probes[:, None] == np.arange(start, start + len(part))[None, :]] = np.inf
        else:  # a sampled centre is also among all (and so is any other at the same place)
            squared[squared == 0] = np.inf
        nearest = np.minimum(nearest, squared.min(axis=1))
    return nearest


def phase_pearson(phase: np.ndarray, truth: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Pearson correlation of two phase maps over ``mask`` (offsets do not matter to it)."""
    a = np.asarray(phase, dtype=np.float64)
    b = np.asarray(truth, dtype=np.float64)
    if mask is not None:
        a, b = a[mask], b[mask]
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))
