"""From measured data to what the model uses: patterns (N, ky, kx), positions, calibration.

``preprocess(config)`` reads the data the config names, checks it, and returns a
``Preprocessed``; ``write_preprocessed`` / ``read_preprocessed`` keep it in preprocessed.h5.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from ..checkpoint import atomic_write
from ..config import PtyflowConfig
from ..physics import dk_from_dx, dx_from_dk, wavelength_ang
from .readers import DataError, read_patterns, read_positions

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
    dk_mrad: float
    energy_kev: float
    wavelength_ang: float
    input_hash: str

    @property
    def window(self) -> tuple[int, int]:
        return tuple(self.measurements.shape[-2:])


def _file_digest(path: Path, chunk: int = 1 << 24) -> str:
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.path)")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def input_hash(config: PtyflowConfig) -> str:
    """Content hash of the data file plus every setting that changes the preprocessed arrays."""
    settings = {
        "data": config.data.model_dump(mode="json", exclude={"path"}),
        "experiment": config.experiment.model_dump(mode="json"),
        "pad_px": config.init.object.pad_px,
    }
    text = _file_digest(Path(config.data.path)) + json.dumps(settings, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def preprocess(config: PtyflowConfig) -> Preprocessed:
    """Read and check the configured data; returns what the model uses."""
    exp = config.experiment
    meas = read_patterns(config.data)
    n, ny, nx = meas.shape
    if ny != nx:
        raise DataError(f"{config.data.path}: patterns are {ny}x{nx}; square patterns are expected")
    if config.data.pos_key is not None:
        positions = read_positions(config.data, n)
        if config.data.pos_unit == "px":
            positions = positions * _dx(config, ny)
    elif exp.scan is not None:
        positions = raster_positions_ang(exp.scan.shape, exp.scan.step_ang, exp.scan.rotation_deg)
        if len(positions) != n:
            raise DataError(
                f"experiment.scan.shape {tuple(exp.scan.shape)} gives {len(positions)} positions "
                f"but {config.data.path} holds {n} patterns"
            )
    else:
        raise DataError("no positions: set data.pos_key or experiment.scan")
    dx = _dx(config, ny)
    dk = exp.dk_mrad if exp.dk_mrad is not None else dk_from_dx(exp.energy_kev, dx, ny)
    geometry = scan_geometry(positions, dx, (ny, nx), config.init.object.pad_px)
    return Preprocessed(
        measurements=np.ascontiguousarray(meas, dtype=np.float32),
        positions_ang=positions.astype(np.float64),
        geometry=geometry,
        dx_ang=dx,
        dk_mrad=dk,
        energy_kev=exp.energy_kev,
        wavelength_ang=wavelength_ang(exp.energy_kev),
        input_hash=input_hash(config),
    )


def _dx(config: PtyflowConfig, n_px: int) -> float:
    exp = config.experiment
    return exp.dx_ang if exp.dx_ang is not None else dx_from_dk(exp.energy_kev, exp.dk_mrad, n_px)


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
            )
    except OSError:
        return None
