"""Data readers: measured patterns and scan positions from the files microscopists have.

Every problem is a ``DataError`` whose message names the file, the key and what was expected.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np


class DataError(ValueError):
    """Input data that cannot be used; the message names the file/key and what was expected."""


def check_data_path(data) -> None:
    """Fail early, before a run directory is touched, when the data file is missing."""
    if not Path(data.path).is_file():
        raise DataError(f"{data.path}: data file not found (data.path)")


def _open_hdf5(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.path)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _dataset(f: h5py.File, path: Path, key: str) -> h5py.Dataset:
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise DataError(f"{path}: no dataset '{key}'; datasets in the file: {', '.join(_datasets(f)) or 'none'}")
    return f[key]


def read_patterns(data) -> np.ndarray:
    """Patterns as (N, ky, kx) float32 from data.path at data.meas_key (3D, or 4D scan_y, scan_x, ky, kx)."""
    path = Path(data.path)
    with _open_hdf5(path) as f:
        ds = _dataset(f, path, data.meas_key)
        if ds.ndim not in (3, 4):
            raise DataError(
                f"{path}:{data.meas_key}: has shape {ds.shape}; expected (N, ky, kx) or (scan_y, scan_x, ky, kx)"
            )
        meas = np.asarray(ds[()], dtype=np.float32)
    meas = meas.reshape(-1, *meas.shape[-2:])
    if not np.isfinite(meas).all():
        bad = int(np.flatnonzero(~np.isfinite(meas).reshape(len(meas), -1).all(axis=1))[0])
        raise DataError(f"{path}:{data.meas_key}: pattern {bad} contains NaN or Inf values")
    return meas


def read_positions(data, n_patterns: int) -> np.ndarray:
    """Positions (N, 2) as (y, x) from data.path at data.pos_key, in data.pos_unit."""
    path = Path(data.path)
    with _open_hdf5(path) as f:
        ds = _dataset(f, path, data.pos_key)
        positions = np.asarray(ds[()], dtype=np.float64)
    positions = positions.reshape(-1, positions.shape[-1]) if positions.ndim > 2 else positions
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise DataError(f"{path}:{data.pos_key}: has shape {positions.shape}; expected (N, 2) as (y, x)")
    if len(positions) != n_patterns:
        raise DataError(
            f"{path}:{data.pos_key}: holds {len(positions)} positions but {data.meas_key} holds {n_patterns} patterns"
        )
    if not np.isfinite(positions).all():
        raise DataError(f"{path}:{data.pos_key}: contains NaN or Inf values")
    return positions
