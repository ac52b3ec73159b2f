"""From measured data to what the model uses: patterns (N, ky, kx), positions, calibration.

``preprocess(config)`` reads the data the config names, checks it, and returns a
``Preprocessed``; given a path it writes them into preprocessed.h5, which ``read_preprocessed``
reads back (patterns on demand).

Order of the steps (each set in ``config.preprocess``): scan selection (crop, step), bad pixels
(raw detector coordinates), transpose, flips, background, clipping of negative counts, binning,
crop/pad to the target size; then, over the whole set, centring of the bright-field disk, the
calibration (dk from the config or measured from the disk) and the intensity normalization.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import h5py
import numpy as np

from ..checkpoint import atomic_write
from ..faults import pause_point
from ..config import PtyflowConfig, stable_across_updates
from ..physics import dk_from_dx, dx_from_dk, wavelength_ang
from .patterns import PATTERNS_KEY, ArrayPatterns, FilePatterns, PatternStore, mean_of_blocks
from .positions import read_positions
from .readers import DataError, PatternSource, data_reader, dataset_files, open_patterns

PREPROCESSED_FORMAT = "ptyflow-preprocessed"


@dataclass
class ScanGeometry:
    """Where each probe window sits on the object canvas.

    crop_pos (N, 2) int: top-left corner of each window; shifts_px (N, 2): the sub-pixel remainder
    in [-0.5, 0.5]; positions_px (N, 2): probe centres on the canvas; canvas_shape (Ny, Nx).
    """

    crop_pos: np.ndarray
    shifts_px: np.ndarray
    positions_px: np.ndarray
    canvas_shape: tuple[int, int]


def scan_geometry(positions_ang: np.ndarray, dx_ang: float, window: tuple[int, int], pad_px: int) -> ScanGeometry:
    """Place probe-centre positions (N, 2) in Å on a canvas with ``pad_px`` margin all round."""
    pos_px = positions_ang / dx_ang
    corner = pos_px - np.array(window) // 2
    top_left = corner - corner.min(axis=0) + pad_px
    crop = np.round(top_left).astype(np.int64)
    shifts = top_left - crop
    canvas = tuple(int(v) for v in crop.max(axis=0) + np.array(window) + pad_px)
    return ScanGeometry(crop, shifts, top_left + np.array(window) // 2, canvas)


def raster_positions_ang(shape: tuple[int, int], step_ang: float, rotation_deg: float = 0.0) -> np.ndarray:
    """(N, 2) (y, x) positions of a raster scan, row by row, rotated by rotation_deg."""
    iy, ix = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    yx = np.stack([iy.ravel(), ix.ravel()], axis=1) * step_ang
    t = math.radians(rotation_deg)
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    return yx @ rot.T


@dataclass
class Preprocessed:
    measurements: PatternStore  # (N, ky, kx) float32, DC at the centre; in memory or in preprocessed.h5
    mean_pattern: np.ndarray  # (ky, kx) float64, the mean of the measurements
    positions_ang: np.ndarray  # (N, 2) probe centres (y, x) in Å, as given
    geometry: ScanGeometry
    dx_ang: float
    dk_mrad: float  # of the preprocessed patterns (after binning)
    energy_kev: float
    wavelength_ang: float
    input_hash: str
    notes: dict = field(default_factory=dict)  # measured values worth reporting (JSON-able)
    # what the input files looked like when they were read (see input_fingerprint); {} for old files
    inputs: list = field(default_factory=list)
    settings_hash: str = ""
    # live mode (io/live.py): patterns in so far, the first ``acquired`` of the planned ones (None:
    # all), and whether acquisition goes on ("acquiring"), is "complete" or "ended short"
    acquired: Optional[int] = None
    acquisition: str = "complete"

    @property
    def window(self) -> tuple[int, int]:
        return tuple(self.measurements.shape[-2:])

    @property
    def n_patterns(self) -> int:
        return self.measurements.shape[0]


# --------------------------------------------------------------------------- input identity
SAMPLED_BLOCKS = 16
SAMPLE_BYTES = 64 << 10


def _input_files(path: Path) -> list[Path]:
    """The input's files (readers.dataset_files). The fingerprint's parts take this list once, so
    they describe the same files (a Dectris master is opened once, not once per part)."""
    if not path.exists():
        raise DataError(f"{path}: data file not found (data.path)")
    return dataset_files(path)


def input_file_name(path: Path, item: Path) -> str:
    """How an input's file is named in its record: its path in a folder, else its name."""
    return str(item.relative_to(path)) if path.is_dir() else item.name


def content_digest(path: Path, chunk: int = 1 << 20, stop: Optional[threading.Event] = None,
                   files: Optional[list[Path]] = None) -> str:
    """sha256 of a file's bytes; of a folder's files (names and bytes, e.g. a zarr store); of a
    Dectris master file's bytes and its data files' (names and bytes). ``files``: the input's files
    when already listed (_input_files)."""
    digest = hashlib.sha256()
    for item in _input_files(path) if files is None else files:
        # a single file's digest is its bytes' alone, as sha256sum gives it
        digest.update(b"" if item == path else input_file_name(path, item).encode())
        with open(item, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
                if stop is not None and stop.is_set():
                    return ""
    return digest.hexdigest()


def stat_list(path: Path, files: list[Path], missing_ok: bool = False) -> list[list]:
    """[name, size, mtime_ns] of each of an input's ``files``; missing_ok: leave out a file that is
    not there (one a live acquisition has not written yet, one that went away between listing and
    stat) instead of raising. A file that is there but cannot be stat'ed raises either way: left
    out, it would make a dataset look complete and smaller than it is."""
    rows = []
    for item in files:
        try:
            st = item.stat()
        except FileNotFoundError:
            if missing_ok:
                continue
            raise
        rows.append([input_file_name(path, item), st.st_size, st.st_mtime_ns])
    return rows


def sampled_digest(path: Path, files: list[Path]) -> str:
    """sha256 of SAMPLED_BLOCKS blocks spread evenly over the bytes of ``path`` (first and last
    included): a change anywhere large, or at the file's ends where headers live, shows here
    without reading the whole file. ``files``: the input's files (_input_files)."""
    if len(files) > SAMPLED_BLOCKS:  # a store of many chunk files, a master of many data files: sample files
        files = [files[round(i * (len(files) - 1) / (SAMPLED_BLOCKS - 1))] for i in range(SAMPLED_BLOCKS)]
    digest = hashlib.sha256()
    for item in files:
        size = item.stat().st_size
        per_file = SAMPLED_BLOCKS if len(files) == 1 else 2
        offsets = sorted({max(0, round(i * (size - SAMPLE_BYTES) / max(1, per_file - 1))) for i in range(per_file)})
        with open(item, "rb") as fh:
            for offset in offsets:
                fh.seek(offset)
                digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()


def input_fingerprint(path: Path, stop: Optional[threading.Event] = None) -> dict:
    """What identifies an input file (or folder) now: sizes and modification times of its files,
    the digest of sampled blocks, and the sha256 of all its bytes."""
    files = _input_files(path)
    return {"path": str(path), "files": stat_list(path, files), "sampled": sampled_digest(path, files),
            "sha256": content_digest(path, stop=stop, files=files)}


def recorded_inputs(preprocessed_path: Path) -> list[dict]:
    """The input fingerprints (input_fingerprint) a preprocessed file records, read without opening
    its patterns; [] when it records none or cannot be read."""
    try:
        with h5py.File(preprocessed_path, "r") as f:
            return json.loads(f.attrs.get("inputs", "[]"))
    except (OSError, ValueError):
        return []


def _settings(config: PtyflowConfig) -> str:
    return json.dumps(stable_across_updates({
        "data": config.data.model_dump(mode="json", exclude={"path", "pos_path"}),
        "experiment": config.experiment.model_dump(mode="json"),
        "preprocess": config.preprocess.model_dump(mode="json", exclude={"compression"}),  # values unchanged
        "pad_px": config.init.object.pad_px,
    }), sort_keys=True)


def settings_hash(config: PtyflowConfig) -> str:
    """sha256 of every setting that changes the preprocessed arrays."""
    return hashlib.sha256(_settings(config).encode()).hexdigest()


def input_paths(config: PtyflowConfig) -> list[Path]:
    return [Path(config.data.path)] + ([Path(config.data.pos_path)] if config.data.pos_path else [])


def input_hash(config: PtyflowConfig, digests: Optional[list[str]] = None) -> str:
    """Content hash of the data (and positions) file plus every setting that changes the
    preprocessed arrays; ``digests``: the files' sha256 when already known."""
    digests = digests if digests is not None else [content_digest(p) for p in input_paths(config)]
    return hashlib.sha256(("".join(digests) + _settings(config)).encode()).hexdigest()


def check_inputs(config: PtyflowConfig, prep: Preprocessed) -> str:
    """Whether ``prep`` was made from the data and settings ``config`` names now, without reading
    whole files where that can be avoided. Returns how it was checked (for the log); raises
    DataError naming what differs.

    Size, modification time and a digest of sampled blocks of each input must match what
    preprocessing recorded; when only the modification time moved (a copy, a touch) the file is
    hashed whole and compared with the recorded sha256. A preprocessed file without that record
    (written by an older ptyflow) is checked by hashing the inputs whole, as before."""
    if not prep.inputs or not prep.settings_hash:
        if input_hash(config) != prep.input_hash:
            raise DataError("made from different input data or preprocessing settings")
        return "input check: inputs hashed whole (the preprocessed file records no fingerprint)"
    if settings_hash(config) != prep.settings_hash:
        raise DataError("made with different preprocessing settings")
    paths = input_paths(config)
    if len(paths) != len(prep.inputs):
        raise DataError("made from a different set of input files")
    rehashed, narrow = [], []
    for path, recorded in zip(paths, prep.inputs):
        files = _input_files(path)
        # a Dectris master recorded alone (by a ptyflow from before its data files were part of the
        # input) is checked as it was recorded, so a run in progress resumes after an upgrade
        if len(files) > 1 and path.is_file() and [row[0] for row in recorded["files"]] == [path.name]:
            files = [path]
            narrow.append(path.name)
        now = stat_list(path, files)
        sizes_now = [(name, size) for name, size, _ in now]
        sizes_then = [(name, size) for name, size, _ in recorded["files"]]
        if sizes_now != sizes_then:
            raise DataError(f"{path} changed since it was preprocessed (its size or files differ)")
        if sampled_digest(path, files) != recorded["sampled"]:
            raise DataError(f"{path} changed since it was preprocessed (sampled blocks differ)")
        if now != recorded["files"]:  # same size, other mtime: decide by the content
            if content_digest(path, files=files) != recorded["sha256"]:
                raise DataError(f"{path} changed since it was preprocessed (its content differs)")
            rehashed.append(path.name)
    older = (f"; {', '.join(narrow)}: the record, made by an older ptyflow, covers the master file and not "
             "its data files" if narrow else "")
    if rehashed:
        return (f"input check: {', '.join(rehashed)} hashed whole (modification time changed, content "
                f"unchanged){older}")
    return (f"input check: size, modification time and {SAMPLED_BLOCKS} sampled blocks of each input match "
            f"the record (not re-hashed){older}")


# --------------------------------------------------------------------------- pattern operations
@dataclass(frozen=True)
class BadPixelFill:
    """How bad pixels are replaced, as index arrays so that a detector mask of thousands of
    pixels (module gaps) costs one gather per block: pixel (ys[i], xs[i]) becomes the mean of its
    valid 3x3 neighbours (neighbour_ys[i, valid[i]], neighbour_xs[i, valid[i]]), or 0 if none."""

    ys: np.ndarray  # (B,)
    xs: np.ndarray  # (B,)
    neighbour_ys: np.ndarray  # (B, 8), clipped into the detector where invalid
    neighbour_xs: np.ndarray  # (B, 8)
    valid: np.ndarray  # (B, 8) bool: inside the detector and not bad itself

    def apply(self, block: np.ndarray) -> None:
        """Replace the bad pixels of ``block`` (b, ky, kx) in place."""
        if not len(self.ys):
            return
        values = np.where(self.valid, block[:, self.neighbour_ys, self.neighbour_xs], np.float32(0))  # (b, B, 8)
        count = self.valid.sum(axis=1)
        block[:, self.ys, self.xs] = np.where(count > 0, values.sum(axis=2) / np.maximum(count, 1).astype(np.float32),
                                              np.float32(0))


def _bad_pixel_fill(shape: tuple[int, int], bad: list[tuple[int, int]], where: str) -> BadPixelFill:
    """The BadPixelFill of the (ky, kx) pixels ``bad`` on a detector of ``shape``."""
    pixels = np.unique(np.asarray(bad, dtype=np.int64).reshape(-1, 2), axis=0)
    outside = (pixels < 0).any(axis=1) | (pixels >= np.array(shape)).any(axis=1)
    if outside.any():
        ky, kx = pixels[np.flatnonzero(outside)[0]]
        raise DataError(f"preprocess.bad_pixels: ({ky}, {kx}) is outside the {shape[0]}x{shape[1]} detector of {where}")
    is_bad = np.zeros(shape, dtype=bool)
    is_bad[pixels[:, 0], pixels[:, 1]] = True
    offsets = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])  # (8, 2)
    around = pixels[:, None, :] + offsets[None]  # (B, 8, 2)
    inside = ((around >= 0) & (around < np.array(shape))).all(axis=2)
    ny = np.clip(around[..., 0], 0, shape[0] - 1)
    nx = np.clip(around[..., 1], 0, shape[1] - 1)
    return BadPixelFill(pixels[:, 0], pixels[:, 1], ny, nx, inside & ~is_bad[ny, nx])


def _crop_or_pad(block: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or zero-pad the last two axes to size x size (keeping the centre pixel N//2)."""
    for axis in (-2, -1):
        n = block.shape[axis]
        if n > size:
            start = n // 2 - size // 2
            block = np.take(block, np.arange(start, start + size), axis=axis)
        elif n < size:
            before = size // 2 - n // 2
            pad = [(0, 0)] * block.ndim
            pad[axis] = (before, size - n - before)
            block = np.pad(block, pad)
    return block


def _process_block(block: np.ndarray, pp, fill_plan) -> np.ndarray:
    """Per-pattern steps, in the documented order, on a block (B, ky, kx) float32."""
    fill_plan.apply(block)
    if pp.transpose:
        block = block.transpose(0, 2, 1)
    if pp.flip_y:
        block = block[:, ::-1, :]
    if pp.flip_x:
        block = block[:, :, ::-1]
    if pp.background:
        block = block - np.float32(pp.background)
    if pp.clip_negative:
        block = np.maximum(block, 0, dtype=np.float32)
    if pp.bin > 1:
        b, ny, nx = block.shape
        block = block.reshape(b, ny // pp.bin, pp.bin, nx // pp.bin, pp.bin).sum(axis=(2, 4))
    if pp.target_size_px:
        block = _crop_or_pad(block, pp.target_size_px)
    return block


def bf_disk(mean_pattern: np.ndarray) -> tuple[float, np.ndarray]:
    """Radius (px) and centre (y, x) of the bright-field disk: pixels above half the maximum."""
    mask = mean_pattern > 0.5 * mean_pattern.max()
    yy, xx = np.nonzero(mask)
    weights = mean_pattern[mask]
    centre = np.array([np.average(yy, weights=weights), np.average(xx, weights=weights)])
    return math.sqrt(mask.sum() / math.pi), centre


def _scan_selection(config: PtyflowConfig, source: PatternSource) -> tuple[np.ndarray, Optional[tuple[int, int]]]:
    """Flat indices of the patterns to keep (ascending) and the scan grid they come from."""
    grid = source.scan_shape or config.data.scan_shape or (config.experiment.scan.shape if config.experiment.scan else None)
    n = source.n_patterns
    if grid is not None and grid[0] * grid[1] != n:
        raise DataError(f"{source.path}: holds {n} patterns, the scan shape {list(grid)} needs {grid[0] * grid[1]}")
    pp = config.preprocess
    if grid is None:
        if pp.scan_crop or pp.scan_step > 1:
            raise DataError("preprocess.scan_crop/scan_step need a scan grid: 4D data, data.scan_shape or experiment.scan")
        return np.arange(n), None
    y0, y1, x0, x1 = pp.scan_crop or (0, grid[0], 0, grid[1])
    if not (0 <= y0 < y1 <= grid[0] and 0 <= x0 < x1 <= grid[1]):
        raise DataError(f"preprocess.scan_crop {[y0, y1, x0, x1]} is outside the scan grid {list(grid)}")
    iy, ix = np.meshgrid(np.arange(y0, y1, pp.scan_step), np.arange(x0, x1, pp.scan_step), indexing="ij")
    return (iy * grid[1] + ix).ravel(), grid


def _positions(config: PtyflowConfig, n_total: int, grid) -> np.ndarray:
    """(N_total, 2) positions in Å for every pattern in the file, before selection."""
    exp = config.experiment
    if config.data.pos_key is not None or (exp.scan is None and data_reader(config.data).positions is not None):
        positions = read_positions(config.data, n_total)
        return positions  # converted from px below, once dx is known
    if exp.scan is None:
        raise DataError("no positions: set data.pos_key (and data.pos_path) or experiment.scan")
    positions = raster_positions_ang(exp.scan.shape, exp.scan.step_ang, exp.scan.rotation_deg)
    if len(positions) != n_total:
        raise DataError(
            f"experiment.scan.shape {list(exp.scan.shape)} gives {len(positions)} positions but "
            f"{config.data.path} holds {n_total} patterns"
        )
    if exp.scan.affine is not None:
        positions = positions @ np.asarray(exp.scan.affine, dtype=np.float64).T
    return positions


@dataclass
class _Plan:
    """What preprocessing will do, decided before any pattern is read (errors come early)."""

    source: PatternSource
    raw_shape: tuple[int, int]
    size: int  # of the square preprocessed patterns
    selected: np.ndarray  # flat indices kept, ascending
    reads: list[np.ndarray]  # selected indices per read (whole scan rows where there is a grid)
    positions_all: np.ndarray  # (N_total, 2), in Å or (data.pos_unit px) px
    fill_plan: BadPixelFill

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.selected), self.size, self.size)


def _plan(config: PtyflowConfig, source: PatternSource, block_bytes: int) -> _Plan:
    pp = config.preprocess
    raw_shape = source.detector_shape
    if config.data.detector_shape is not None and tuple(config.data.detector_shape) != raw_shape:
        raise DataError(
            f"{source.path}:{source.key}: patterns are {raw_shape[0]}x{raw_shape[1]} but data.detector_shape "
            f"is {list(config.data.detector_shape)}"
        )
    ny, nx = (raw_shape[1], raw_shape[0]) if pp.transpose else raw_shape
    if ny % pp.bin or nx % pp.bin:
        raise DataError(f"preprocess.bin {pp.bin} does not divide the {ny}x{nx} detector of {source.path}")
    binned = (ny // pp.bin, nx // pp.bin)
    if (pp.target_size_px is None) and binned[0] != binned[1]:
        raise DataError(
            f"{source.path}: patterns are {binned[0]}x{binned[1]} after binning; set preprocess.target_size_px "
            "to crop/pad them square"
        )
    selected, grid = _scan_selection(config, source)
    per_read = max(1, block_bytes // (4 * raw_shape[0] * raw_shape[1]))
    if grid is not None:
        per_read = max(grid[1], per_read // grid[1] * grid[1])
    reads, done = [], 0
    while done < len(selected):  # selected is ascending: each read ends where its index range does
        stop = int(np.searchsorted(selected, selected[done] + per_read))
        reads.append(selected[done:stop])
        done = stop
    return _Plan(source, raw_shape, pp.target_size_px or binned[0], selected, reads,
                 _positions(config, source.n_patterns, grid), _bad_pixel_fill(raw_shape, pp.bad_pixels, str(source.path)))


def _processed(plan: _Plan, pp) -> Iterator[np.ndarray]:
    """One pass over the raw file: the per-pattern steps, a read at a time."""
    for take in plan.reads:
        block = plan.source.read(take)
        finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
        if not finite.all():
            bad = int(take[np.flatnonzero(~finite)[0]])
            raise DataError(f"{plan.source.path}:{plan.source.key}: pattern {bad} contains NaN or Inf values")
        yield _process_block(block, pp, plan.fill_plan)
        pause_point("preprocess")


def _calibration(config: PtyflowConfig, size: int, radius_px: Optional[float]) -> tuple[float, float, dict]:
    """(dx_ang, dk_mrad, notes) of the preprocessed patterns; radius_px: the measured bright-field
    disk radius, needed only with preprocess.dk_from_bf_disk."""
    exp, pp = config.experiment, config.preprocess
    notes = {}
    if pp.dk_from_bf_disk:
        dk = exp.conv_angle_mrad / radius_px
        notes["dk_mrad_measured"] = dk
        dx = dx_from_dk(exp.energy_kev, dk, size)
    elif exp.dk_mrad is not None:
        dk = exp.dk_mrad * pp.bin
        dx = dx_from_dk(exp.energy_kev, dk, size)
    else:
        dx = exp.dx_ang
        dk = dk_from_dx(exp.energy_kev, dx, size)
    disk_px = exp.conv_angle_mrad / dk
    if disk_px >= size / 2:
        raise DataError(
            f"experiment.conv_angle_mrad {exp.conv_angle_mrad} mrad at {dk:.4g} mrad/px puts the bright-field disk "
            f"radius at {disk_px:.1f} px, outside the {size}x{size} patterns (check dx_ang/dk_mrad and preprocess.bin)"
        )
    notes.update(dx_ang=dx, dk_mrad=dk, bf_disk_radius_expected_px=disk_px)
    return dx, dk, notes


def _disk_notes(mean_pattern: np.ndarray, where) -> dict:
    if mean_pattern.max() <= 0:
        raise DataError(f"{where}: the patterns hold no counts after preprocessing")
    radius_px, centre = bf_disk(mean_pattern)
    return {"bf_disk_radius_px": radius_px, "bf_disk_centre_px": centre.tolist()}


class _Fingerprints:
    """The inputs' fingerprints (input_fingerprint), computed in a thread while preprocessing
    reads the data: hashing a large file and preprocessing it then share one pass of the disk's
    time instead of two."""

    def __init__(self, paths: list[Path]):
        self.stop = threading.Event()
        self.result: Optional[list[dict]] = None
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, args=(paths,), daemon=True, name="ptyflow-input-hash")
        self.thread.start()

    def _run(self, paths):
        try:
            self.result = [input_fingerprint(p, self.stop) for p in paths]
        except BaseException as exc:  # noqa: BLE001 - handed to the caller in get()
            self.error = exc

    def get(self) -> list[dict]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result

    def cancel(self) -> None:
        self.stop.set()


def preprocess(config: PtyflowConfig, out_path: Optional[str | Path] = None,
               block_bytes: int = 16 << 20) -> Preprocessed:
    """Read, check and prepare the configured data, streaming: raw patterns are read and processed
    a block of at most ``block_bytes`` at a time, so memory stays a few blocks whatever the number
    of patterns. With ``out_path`` the patterns are written into that preprocessed.h5 (atomically:
    the file appears only when complete) and read back from it on demand; without, they are kept
    in memory (small data: tests, benchmarks).

    Steps over the whole set (centring of the bright-field disk, dk from its radius, mean_sum
    normalization) take one streaming pass first to measure the mean pattern; the inputs' sha256
    is computed alongside in a thread."""
    pp = config.preprocess
    fingerprints = _Fingerprints(input_paths(config))
    source = open_patterns(config.data)
    try:
        plan = _plan(config, source, block_bytes)
        notes: dict = {"raw_detector": list(plan.raw_shape), "n_patterns_in_file": int(source.n_patterns),
                       "n_patterns": int(len(plan.selected))}
        whole_set = _measure_whole_set(plan, pp, notes, config.data.path)
        prep = _without_patterns(config, plan, whole_set.radius_px, notes)

        def fill(store: Callable[[int, np.ndarray], None]) -> None:
            _fill_patterns(prep, config, _final_blocks(plan, pp, whole_set), len(plan.selected), store, fingerprints)

        if out_path is None:
            _keep_in_memory(prep, plan.shape, fill)
        else:
            _write_file(Path(out_path), prep, plan.shape, pp.compression, fill)
        return prep
    except BaseException:
        fingerprints.cancel()
        raise
    finally:
        source.close()


@dataclass
class _WholeSet:
    """What the steps over the whole set apply, measured on the first pass's mean pattern."""

    shift: Optional[tuple[int, int]] = None  # px that centre the bright-field disk (center_bf_disk)
    scale: Optional[float] = None  # the mean pattern's sum, every pattern divided by it (normalize: mean_sum)
    radius_px: Optional[float] = None  # the bright-field disk's radius, for dk_from_bf_disk


def _measure_whole_set(plan: _Plan, pp, notes: dict, where) -> _WholeSet:
    """The first streaming pass, taken only when a step needs the whole set; its findings go into ``notes``."""
    if not (pp.center_bf_disk or pp.dk_from_bf_disk or pp.normalize == "mean_sum"):
        return _WholeSet()
    mean_before = mean_of_blocks(_processed(plan, pp), len(plan.selected))
    notes.update(_disk_notes(mean_before, where))
    whole_set = _WholeSet(radius_px=notes["bf_disk_radius_px"])
    if pp.center_bf_disk:
        centre = np.array(notes["bf_disk_centre_px"])
        whole_set.shift = tuple(int(v) for v in np.round(np.array([plan.size // 2] * 2) - centre))
        notes["bf_disk_shift_px"] = list(whole_set.shift)
    if pp.normalize == "mean_sum":
        whole_set.scale = float(mean_before.sum())  # rolling keeps every pattern's sum
        notes["normalized_by"] = whole_set.scale
    return whole_set


def _final_blocks(plan: _Plan, pp, whole_set: _WholeSet) -> Iterator[np.ndarray]:
    """The second (or only) pass: the preprocessed patterns, a read at a time."""
    for block in _processed(plan, pp):
        if whole_set.shift is not None:
            block = np.roll(block, whole_set.shift, axis=(1, 2))
        if whole_set.scale is not None:
            block = block / np.float32(whole_set.scale)
        yield np.ascontiguousarray(block, dtype=np.float32)


def _without_patterns(config: PtyflowConfig, plan: _Plan, radius_px: Optional[float], notes: dict) -> Preprocessed:
    """Everything but the patterns: the calibration, the kept patterns' positions in Å and the
    scan geometry they give; the mean pattern and the inputs' hash come with the patterns."""
    dx, dk, calibration_notes = _calibration(config, plan.size, radius_px)
    notes.update(calibration_notes)
    positions_all = plan.positions_all
    if config.data.pos_key is not None and config.data.pos_unit == "px":
        positions_all = positions_all * dx
    positions = positions_all[plan.selected].astype(np.float64)
    return Preprocessed(
        measurements=None, mean_pattern=None, positions_ang=positions, dx_ang=dx, dk_mrad=dk,
        geometry=scan_geometry(positions, dx, (plan.size, plan.size), config.init.object.pad_px),
        energy_kev=config.experiment.energy_kev, wavelength_ang=wavelength_ang(config.experiment.energy_kev),
        input_hash="", notes=notes, settings_hash=settings_hash(config),
    )


def _fill_patterns(prep: Preprocessed, config: PtyflowConfig, blocks: Iterator[np.ndarray], n_patterns: int,
                   store: Callable[[int, np.ndarray], None], fingerprints: _Fingerprints) -> None:
    """Hand the preprocessed ``blocks`` to ``store(start, block)``, then complete ``prep``: its mean
    pattern, the bright-field disk when no first pass measured it, the inputs' fingerprints and hash."""
    prep.mean_pattern = mean_of_blocks(blocks, n_patterns, each=store)
    if "bf_disk_radius_px" not in prep.notes:
        prep.notes.update(_disk_notes(prep.mean_pattern, config.data.path))
    prep.inputs = fingerprints.get()
    prep.input_hash = input_hash(config, [fp["sha256"] for fp in prep.inputs])


def _keep_in_memory(prep: Preprocessed, shape: tuple[int, int, int], fill) -> None:
    patterns = np.empty(shape, dtype=np.float32)

    def keep(start: int, block: np.ndarray) -> None:
        patterns[start:start + len(block)] = block

    fill(keep)
    prep.measurements = ArrayPatterns(patterns)


def _write_file(out_path: Path, prep: Preprocessed, shape: tuple[int, int, int], compression: str, fill) -> None:
    """preprocessed.h5 at ``out_path``, appearing only when complete; ``prep`` then reads from it."""
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            dataset = f.create_dataset(PATTERNS_KEY, shape=shape, dtype=np.float32, chunks=(1, *shape[1:]),
                                       **_compression(compression))

            def store(start: int, block: np.ndarray) -> None:
                dataset[start:start + len(block)] = block

            fill(store)
            _write_metadata(f, prep)

    atomic_write(out_path, write)
    prep.measurements = FilePatterns(out_path)


def _compression(name: str) -> dict:
    if name == "none":
        return {}
    if name == "gzip":
        return {"compression": "gzip", "compression_opts": 1, "shuffle": True}
    return {"compression": name, "shuffle": True}


def _write_metadata(f: h5py.File, prep: Preprocessed) -> None:
    f.attrs.update(
        format=PREPROCESSED_FORMAT,
        dx_ang=prep.dx_ang,
        dk_mrad=prep.dk_mrad,
        energy_kev=prep.energy_kev,
        wavelength_ang=prep.wavelength_ang,
        input_hash=prep.input_hash,
        settings_hash=prep.settings_hash,
        inputs=json.dumps(prep.inputs),
        canvas_shape=np.asarray(prep.geometry.canvas_shape),
        notes=json.dumps(prep.notes),
    )
    f.create_dataset("mean_pattern", data=prep.mean_pattern)
    f.create_dataset("positions_ang", data=prep.positions_ang)
    f.create_dataset("positions_px", data=prep.geometry.positions_px)
    f.create_dataset("crop_pos", data=prep.geometry.crop_pos)
    f.create_dataset("shifts_px", data=prep.geometry.shifts_px)
    f.attrs["complete"] = True


def read_preprocessed(path: str | Path) -> Optional[Preprocessed]:
    """The preprocessed data in ``path`` (patterns read on demand), or None when it is missing or
    incomplete."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != PREPROCESSED_FORMAT or not f.attrs.get("complete", False):
                return None
            geometry = ScanGeometry(
                crop_pos=f["crop_pos"][()],
                shifts_px=f["shifts_px"][()],
                positions_px=f["positions_px"][()],
                canvas_shape=tuple(int(v) for v in f.attrs["canvas_shape"]),
            )
            prep = Preprocessed(
                measurements=FilePatterns(path),
                mean_pattern=f["mean_pattern"][()] if "mean_pattern" in f else None,
                positions_ang=f["positions_ang"][()],
                geometry=geometry,
                dx_ang=float(f.attrs["dx_ang"]),
                dk_mrad=float(f.attrs["dk_mrad"]),
                energy_kev=float(f.attrs["energy_kev"]),
                wavelength_ang=float(f.attrs["wavelength_ang"]),
                input_hash=str(f.attrs["input_hash"]),
                notes=json.loads(f.attrs.get("notes", "{}")),
                inputs=json.loads(f.attrs.get("inputs", "[]")),
                settings_hash=str(f.attrs.get("settings_hash", "")),
                acquired=int(f.attrs["acquired"]) if "acquired" in f.attrs else None,
                acquisition=str(f.attrs.get("acquisition", "complete")),
            )
    except (OSError, KeyError):
        return None
    if prep.mean_pattern is None:  # written by an older ptyflow
        prep.mean_pattern = prep.measurements.mean_pattern()
    return prep
