"""From measured data to what the model uses: patterns (N, ky, kx), positions, calibration.

``preprocess(config)`` reads the data the config names, checks it, and returns a
``Preprocessed``; ``write_preprocessed`` / ``read_preprocessed`` keep it in preprocessed.h5.

Order of the steps (each set in ``config.preprocess``): scan selection (crop, step), bad pixels
(raw detector coordinates), transpose, flips, background, clipping of negative counts, binning,
crop/pad to the target size; then, over the whole set, centring of the bright-field disk, the
calibration (dk from the config or measured from the disk) and the intensity normalization.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from ..checkpoint import atomic_write
from ..faults import pause_point
from ..config import PtyflowConfig
from ..physics import dk_from_dx, dx_from_dk, wavelength_ang
from .readers import DataError, PatternSource, data_format, open_patterns, read_positions

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
    measurements: np.ndarray  # (N, ky, kx) float32, DC at the centre
    positions_ang: np.ndarray  # (N, 2) probe centres (y, x) in Å, as given
    geometry: ScanGeometry
    dx_ang: float
    dk_mrad: float  # of the preprocessed patterns (after binning)
    energy_kev: float
    wavelength_ang: float
    input_hash: str
    notes: dict = field(default_factory=dict)  # measured values worth reporting (JSON-able)

    @property
    def window(self) -> tuple[int, int]:
        return tuple(self.measurements.shape[-2:])


def content_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, or of a folder's files (names and bytes, e.g. a zarr store)."""
    if not path.exists():
        raise DataError(f"{path}: data file not found (data.path)")
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]  # zarr stores
    for item in files:
        digest.update(str(item.relative_to(path)).encode() if path.is_dir() else b"")
        with open(item, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()


def input_hash(config: PtyflowConfig) -> str:
    """Content hash of the data (and positions) file plus every setting that changes the
    preprocessed arrays."""
    settings = {
        "data": config.data.model_dump(mode="json", exclude={"path", "pos_path"}),
        "experiment": config.experiment.model_dump(mode="json"),
        "preprocess": config.preprocess.model_dump(mode="json"),
        "pad_px": config.init.object.pad_px,
    }
    text = content_digest(Path(config.data.path))
    if config.data.pos_path:
        text += content_digest(Path(config.data.pos_path))
    text += json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- pattern operations
def _bad_pixel_fill(shape: tuple[int, int], bad: list[tuple[int, int]], where: str):
    """For each bad pixel, the valid 3x3 neighbours whose mean replaces it."""
    bad_set = {tuple(b) for b in bad}
    plan = []
    for ky, kx in bad_set:
        if not (0 <= ky < shape[0] and 0 <= kx < shape[1]):
            raise DataError(f"preprocess.bad_pixels: ({ky}, {kx}) is outside the {shape[0]}x{shape[1]} detector of {where}")
        neighbours = [(ky + dy, kx + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                      if (dy or dx) and 0 <= ky + dy < shape[0] and 0 <= kx + dx < shape[1]
                      and (ky + dy, kx + dx) not in bad_set]
        plan.append(((ky, kx), tuple(np.array(neighbours).T) if neighbours else None))
    return plan


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
    for (ky, kx), neighbours in fill_plan:
        block[:, ky, kx] = block[(slice(None), *neighbours)].mean(axis=1) if neighbours is not None else 0.0
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
    if config.data.pos_key is not None or (data_format(config.data) == "cxi" and exp.scan is None):
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


def preprocess(config: PtyflowConfig, chunk_bytes: int = 64 << 20, known_hash: Optional[str] = None) -> Preprocessed:
    """Read, check and prepare the configured data; patterns are processed in blocks so that peak
    memory stays near the size of the preprocessed array. ``known_hash``: the input_hash if the
    caller already computed it (hashing a large file twice is slow)."""
    exp, pp = config.experiment, config.preprocess
    source = open_patterns(config.data)
    try:
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
        size = pp.target_size_px or binned[0]
        if (pp.target_size_px is None) and binned[0] != binned[1]:
            raise DataError(
                f"{source.path}: patterns are {binned[0]}x{binned[1]} after binning; set preprocess.target_size_px "
                "to crop/pad them square"
            )
        selected, grid = _scan_selection(config, source)
        fill_plan = _bad_pixel_fill(raw_shape, pp.bad_pixels, str(source.path))
        out = np.empty((len(selected), size, size), dtype=np.float32)
        # blocks of at most a tenth of the output keep the peak near 1.1x the preprocessed array
        block_bytes = min(chunk_bytes, max(out.nbytes // 10, 1 << 20))
        per_block = max(1, block_bytes // (4 * raw_shape[0] * raw_shape[1]))
        if grid is not None:  # whole scan rows per read
            per_block = max(grid[1], per_block // grid[1] * grid[1])
        done = 0
        while done < len(selected):
            first_flat = selected[done]
            take = selected[done:][selected[done:] < first_flat + per_block]
            block = source.read(take)
            finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
            if not finite.all():
                bad = int(take[np.flatnonzero(~finite)[0]])
                raise DataError(f"{source.path}:{source.key}: pattern {bad} contains NaN or Inf values")
            out[done:done + len(take)] = _process_block(block, pp, fill_plan)
            done += len(take)
            pause_point("preprocess")
        n_total = source.n_patterns
    finally:
        source.close()

    notes: dict = {"raw_detector": list(raw_shape), "n_patterns_in_file": int(n_total), "n_patterns": int(len(out))}
    mean_pattern = out.mean(axis=0, dtype=np.float64)
    if mean_pattern.max() <= 0:
        raise DataError(f"{config.data.path}: the patterns hold no counts after preprocessing")
    radius_px, centre = bf_disk(mean_pattern)
    notes.update(bf_disk_radius_px=radius_px, bf_disk_centre_px=centre.tolist())
    if pp.center_bf_disk:
        shift = np.round(np.array([size // 2, size // 2]) - centre).astype(int)
        step = max(1, len(out) // 10)
        for i in range(0, len(out), step):
            out[i:i + step] = np.roll(out[i:i + step], tuple(shift), axis=(1, 2))
        notes["bf_disk_shift_px"] = shift.tolist()
    wavelength = wavelength_ang(exp.energy_kev)
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
    if pp.normalize == "mean_sum":
        scale = float(out.sum(axis=(1, 2)).mean())
        out /= np.float32(scale)
        notes["normalized_by"] = scale

    positions_all = _positions(config, n_total, grid)
    if config.data.pos_key is not None and config.data.pos_unit == "px":
        positions_all = positions_all * dx
    positions = positions_all[selected]
    geometry = scan_geometry(positions, dx, (size, size), config.init.object.pad_px)
    return Preprocessed(
        measurements=out,
        positions_ang=positions.astype(np.float64),
        geometry=geometry,
        dx_ang=dx,
        dk_mrad=dk,
        energy_kev=exp.energy_kev,
        wavelength_ang=wavelength,
        input_hash=known_hash or input_hash(config),
        notes=notes,
    )


def write_preprocessed(path: str | Path, prep: Preprocessed) -> Path:
    path = Path(path)

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(
                format=PREPROCESSED_FORMAT,
                dx_ang=prep.dx_ang,
                dk_mrad=prep.dk_mrad,
                energy_kev=prep.energy_kev,
                wavelength_ang=prep.wavelength_ang,
                input_hash=prep.input_hash,
                canvas_shape=np.asarray(prep.geometry.canvas_shape),
                notes=json.dumps(prep.notes),
            )
            f.create_dataset("measurements", data=prep.measurements, chunks=(1, *prep.window))
            f.create_dataset("positions_ang", data=prep.positions_ang)
            f.create_dataset("positions_px", data=prep.geometry.positions_px)
            f.create_dataset("crop_pos", data=prep.geometry.crop_pos)
            f.create_dataset("shifts_px", data=prep.geometry.shifts_px)
            f.attrs["complete"] = True

    atomic_write(path, write)
    return path


def read_preprocessed(path: str | Path) -> Optional[Preprocessed]:
    """The preprocessed data in ``path``, or None when it is missing or incomplete."""
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
            return Preprocessed(
                measurements=f["measurements"][()],
                positions_ang=f["positions_ang"][()],
                geometry=geometry,
                dx_ang=float(f.attrs["dx_ang"]),
                dk_mrad=float(f.attrs["dk_mrad"]),
                energy_kev=float(f.attrs["energy_kev"]),
                wavelength_ang=float(f.attrs["wavelength_ang"]),
                input_hash=str(f.attrs["input_hash"]),
                notes=json.loads(f.attrs.get("notes", "{}")),
            )
    except OSError:
        return None
