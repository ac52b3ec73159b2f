"""preprocessed.h5 of a scan that is still being acquired (live mode, `ptyflow run --follow`).

The planned scan (its shape from data.scan_shape, experiment.scan or the dataset's maximum shape;
its positions as for a finished file) is known before the first frame, so preprocessed.h5 is
created once with room for every planned pattern, its canvas and positions final. Patterns are
then added in scan order as the writer's frames become complete (``extend``); the file records
how many are in (``acquired``) and whether acquisition goes on (``acquisition``).

Steps over the whole set while the set still grows: centring of the bright-field disk and the
mean_sum normalization are measured on the first ``live.first_rows`` rows and applied unchanged
to every later row; at completion (``finish``) they are measured on all the acquired patterns
and the stored patterns are re-centred and re-scaled in place when they moved (one log line says
by how much). dk measured from the disk (dk_from_bf_disk) sizes the canvas, so it stays the value
of the first rows; the value of all rows is logged beside it. The stored mean pattern (what the
model takes the set's intensity from) is likewise the first rows' until completion, the whole
set's after; a running sum of the patterns in is kept beside it for that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import h5py
import numpy as np

from ..checkpoint import atomic_write
from ..config import PtyflowConfig
from .patterns import PATTERNS_KEY
from .preprocess import (
    _WholeSet,
    _compression,
    _disk_notes,
    _plan,
    _process_block,
    _without_patterns,
    _write_metadata,
    input_fingerprint,
    input_hash,
    input_paths,
    stat_list,
)
from .readers import DataError, PatternSource, dataset_files, follow_patterns

ACQUIRING, COMPLETE, ENDED_SHORT = "acquiring", "complete", "ended short"
PATTERN_SUM = "live_pattern_sum"  # (ky, kx) float64: the sum of the patterns in so far
MARKER_SUFFIX = ".done"  # <data file>.done: the writer says the scan is over (as for a watched inbox)


@dataclass
class Look:
    """What one look at the growing data found.

    acquired: patterns in preprocessed.h5 now (of the planned selection); planned: their number
    when the scan completes; added: patterns added by this look; frames: whole frames in the data
    file; files: [name, size, mtime] of the data's files (a change means the writer is alive)."""

    acquired: int
    planned: int
    added: int
    frames: int
    files: list

    @property
    def complete(self) -> bool:
        return self.acquired >= self.planned


class _Planned:
    """The planned scan seen as a (n_planned, ky, kx) array, for preprocessing's plan (never read)."""

    def __init__(self, n_planned: int, detector: tuple[int, int]):
        self.shape = (n_planned, *detector)


def planned_grid(config: PtyflowConfig, source: PatternSource) -> tuple[Optional[tuple[int, int]], int]:
    """The planned scan grid (rows, columns) or None, and the planned number of frames: from
    data.scan_shape, experiment.scan.shape, or the maximum shape of a dataset that grows."""
    grid = config.data.scan_shape or (config.experiment.scan.shape if config.experiment.scan else None)
    if grid is not None:
        return tuple(grid), int(grid[0] * grid[1])
    maxshape = getattr(source.array, "maxshape", None)
    if maxshape is not None and maxshape[0] is not None:
        if len(maxshape) == 4 and maxshape[1] is not None:
            return (int(maxshape[0]), int(maxshape[1])), int(maxshape[0] * maxshape[1])
        if len(maxshape) == 3:
            return None, int(maxshape[0])
    raise DataError(f"{source.path}: live mode needs the planned scan before it is complete: set experiment.scan "
                    "(shape, step_ang, rotation_deg) or data.scan_shape")


def frames_written(source: Optional[PatternSource]) -> int:
    """Whole frames readable now; for a 4D dataset, whole scan rows only."""
    return 0 if source is None else source.n_patterns


def data_files(config: PtyflowConfig) -> list:
    """[name, size, mtime_ns] of the data's files, the master's linked files included."""
    path = Path(config.data.path)
    return stat_list(path, dataset_files(path), missing_ok=True)


def marker_path(config: PtyflowConfig) -> Path:
    path = Path(config.data.path)
    return path.with_name(path.name + MARKER_SUFFIX)


def _plan_for(config: PtyflowConfig, source: PatternSource, block_bytes: int):
    grid, n_planned = planned_grid(config, source)
    if source.n_patterns > n_planned:
        raise DataError(f"{source.path}: holds {source.n_patterns} frames, more than the {n_planned} planned "
                        "(data.scan_shape or experiment.scan.shape)")
    planned = PatternSource(source.path, source.key, _Planned(n_planned, source.detector_shape))
    if grid is not None and config.data.scan_shape is None and config.experiment.scan is None:
        config = config.model_copy(update={"data": config.data.model_copy(update={"scan_shape": grid})})
    return _plan(config, planned, block_bytes)


def start(config: PtyflowConfig, out_path: str | Path, block_bytes: int = 16 << 20) -> Optional[Look]:
    """Create preprocessed.h5 for the planned scan once ``live.first_rows`` rows of it exist, and
    add them; None (nothing written) while they do not. Centring and normalization are fixed from
    those rows (see the module's docstring)."""
    out_path = Path(out_path)
    source = follow_patterns(config.data)
    try:
        if source is None:
            return None
        plan = _plan_for(config, source, block_bytes)
        grid, _ = planned_grid(config, source)
        row = grid[1] if grid is not None else 1
        need = min(config.live.first_rows * row, plan.source.n_patterns)
        if source.n_patterns < need:
            return None
        first = plan.selected[plan.selected < need]  # the first rows, whatever else is there already
        if not len(first):  # a scan selection that leaves them out: what is there
            first = plan.selected[plan.selected < source.n_patterns]
        if not len(first):
            return None
        pp = config.preprocess
        notes: dict = {"raw_detector": list(plan.raw_shape), "n_patterns_in_file": int(plan.source.n_patterns),
                       "n_patterns": int(len(plan.selected)), "live_first_patterns": int(len(first))}
        whole_set = _WholeSet()
        if pp.center_bf_disk or pp.dk_from_bf_disk or pp.normalize == "mean_sum":
            mean_first = _block_sum(source, first, pp, plan.fill_plan) / len(first)
            notes.update(_disk_notes(mean_first, config.data.path))
            whole_set.radius_px = notes["bf_disk_radius_px"]
            whole_set = _fixed_steps(pp, notes, plan.size, mean_first, whole_set)
        prep = _without_patterns(config, plan, whole_set.radius_px, notes)
        prep.mean_pattern = np.zeros((plan.size, plan.size))
        prep.input_hash = ""

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as f:
                f.create_dataset(PATTERNS_KEY, shape=plan.shape, dtype=np.float32, chunks=(1, plan.size, plan.size),
                                 **_compression(pp.compression))
                _write_metadata(f, prep)
                f.create_dataset(PATTERN_SUM, data=np.zeros((plan.size, plan.size)))
                f.attrs.update(acquired=0, acquisition=ACQUIRING, selected=json.dumps(plan.selected.tolist()))

        atomic_write(out_path, write)
    finally:
        if source is not None:
            source.close()
    return extend(config, out_path)


def _fixed_steps(pp, notes: dict, size: int, mean_first: np.ndarray, whole_set: _WholeSet) -> _WholeSet:
    if pp.center_bf_disk:
        centre = np.array(notes["bf_disk_centre_px"])
        whole_set.shift = tuple(int(v) for v in np.round(np.array([size // 2] * 2) - centre))
        notes["bf_disk_shift_px"] = list(whole_set.shift)
    if pp.normalize == "mean_sum":
        whole_set.scale = float(mean_first.sum())
        notes["normalized_by"] = whole_set.scale
    return whole_set


def _block_sum(source: PatternSource, take: np.ndarray, pp, fill_plan) -> np.ndarray:
    total = 0.0
    for part in np.array_split(take, max(1, len(take) // 64)):
        total = total + _process_block(source.read(part), pp, fill_plan).sum(axis=0, dtype=np.float64)
    return total


def _stored_steps(notes: dict) -> _WholeSet:
    shift = notes.get("bf_disk_shift_px")
    return _WholeSet(shift=tuple(shift) if shift is not None else None, scale=notes.get("normalized_by"))


def extend(config: PtyflowConfig, out_path: str | Path, block_bytes: int = 16 << 20) -> Look:
    """Add to preprocessed.h5 the planned patterns whose frames are complete now, in scan order
    (a frame the writer has not finished is left for the next look). The count in the file moves
    only after the patterns are written."""
    out_path = Path(out_path)
    pp = config.preprocess
    files = data_files(config)
    source = follow_patterns(config.data)
    try:
        with h5py.File(out_path, "r+") as f:
            selected = np.asarray(json.loads(f.attrs["selected"]), dtype=np.int64)
            acquired = int(f.attrs["acquired"])
            frames = frames_written(source)
            ready = int(np.searchsorted(selected, frames))  # selected patterns whose frames exist
            added = 0
            if ready > acquired and f.attrs["acquisition"] == ACQUIRING:
                plan = _plan_for(config, source, block_bytes)
                steps = _stored_steps(json.loads(f.attrs["notes"]))
                dataset = f[PATTERNS_KEY]
                total = f[PATTERN_SUM][()]
                per_read = max(1, block_bytes // (4 * plan.raw_shape[0] * plan.raw_shape[1]))
                for start_at in range(acquired, ready, per_read):
                    take = selected[start_at:min(ready, start_at + per_read)]
                    block = _process_block(source.read(take), pp, plan.fill_plan)
                    if not np.isfinite(block).all():
                        raise DataError(f"{source.path}:{source.key}: a pattern among {int(take[0])}..{int(take[-1])} "
                                        "contains NaN or Inf values")
                    if steps.shift is not None:
                        block = np.roll(block, steps.shift, axis=(1, 2))
                    if steps.scale is not None:
                        block = block / np.float32(steps.scale)
                    dataset[start_at:start_at + len(block)] = block.astype(np.float32)
                    total = total + block.sum(axis=0, dtype=np.float64)
                f[PATTERN_SUM][...] = total
                if acquired == 0:  # the first rows' mean stands for the set until acquisition is over
                    f["mean_pattern"][...] = total / ready
                f.flush()
                f.attrs["acquired"] = ready  # after the patterns: a reader never counts one not written
                f.flush()
                added = ready - acquired
                acquired = ready
            return Look(acquired, len(selected), added, frames, files)
    finally:
        if source is not None:
            source.close()


def acquisition_state(out_path: str | Path) -> tuple[str, int, int]:
    """(acquisition, acquired, planned) of a live preprocessed.h5; (complete, N, N) for any other."""
    with h5py.File(out_path, "r") as f:
        planned = int(f[PATTERNS_KEY].shape[0])
        return (str(f.attrs.get("acquisition", COMPLETE)), int(f.attrs.get("acquired", planned)), planned)


def finish(config: PtyflowConfig, out_path: str | Path, ended_short: bool, info: Callable[[str], None]) -> dict:
    """Acquisition is over: refine centring and normalization on every acquired pattern (the
    stored ones re-centred and re-scaled in place when they moved), record the inputs'
    fingerprints (a rerun then checks the data file as for any run) and mark the file complete or
    ended short. Returns what was refined."""
    out_path = Path(out_path)
    pp = config.preprocess
    fingerprints = [input_fingerprint(p) for p in input_paths(config)]
    with h5py.File(out_path, "r+") as f:
        acquired = int(f.attrs["acquired"])
        notes = json.loads(f.attrs["notes"])
        mean = f[PATTERN_SUM][()] / max(1, acquired)
        refined: dict = {}
        if acquired and (pp.center_bf_disk or pp.normalize == "mean_sum" or pp.dk_from_bf_disk):
            disk = _disk_notes(mean, config.data.path)
            size = mean.shape[0]
            delta = (0, 0)
            if pp.center_bf_disk:
                delta = tuple(int(v) for v in np.round(np.array([size // 2] * 2) - np.array(disk["bf_disk_centre_px"])))
            ratio = float(mean.sum()) if pp.normalize == "mean_sum" else 1.0
            if delta != (0, 0) or abs(ratio - 1.0) > 1e-6:
                dataset = f[PATTERNS_KEY]
                for lo in range(0, acquired, 256):
                    hi = min(acquired, lo + 256)
                    dataset[lo:hi] = np.roll(dataset[lo:hi], delta, axis=(1, 2)) / np.float32(ratio)
                mean = np.roll(mean, delta, axis=(0, 1)) / ratio
            f[PATTERN_SUM][...] = mean * acquired
            if pp.center_bf_disk:
                shift = [a + b for a, b in zip(notes.get("bf_disk_shift_px", [0, 0]), delta)]
                refined["bf_disk_shift_px"] = (notes.get("bf_disk_shift_px"), shift)
                notes["bf_disk_shift_px"] = shift
            if pp.normalize == "mean_sum":
                scale = notes.get("normalized_by", 1.0) * ratio
                refined["normalized_by"] = (notes.get("normalized_by"), scale)
                notes["normalized_by"] = scale
            if pp.dk_from_bf_disk:
                dk_all = config.experiment.conv_angle_mrad / disk["bf_disk_radius_px"]
                refined["dk_mrad (kept from the first rows)"] = (notes.get("dk_mrad"), dk_all)
        f["mean_pattern"][...] = mean  # from here on the whole set's
        notes.update(live_acquired=acquired, live_ended_short=bool(ended_short))
        f.attrs.update(notes=json.dumps(notes), inputs=json.dumps(fingerprints),
                       input_hash=input_hash(config, [fp["sha256"] for fp in fingerprints]))
        f.flush()
        f.attrs["acquisition"] = ENDED_SHORT if ended_short else COMPLETE
        f.flush()
    if refined:
        info("live: centring and normalization refined on all %d acquired patterns: %s" % (acquired, "; ".join(
            f"{k} {_short(old)} -> {_short(new)}" for k, (old, new) in refined.items())))
    return refined


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
