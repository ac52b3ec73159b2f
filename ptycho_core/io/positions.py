"""Scan positions from files: data.pos_path (or the data file) at data.pos_key, or the positions
a data file itself holds (CXI's sample translations)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .formats.base import DataError
from .formats.hdf5 import dataset, is_hdf5, open_hdf5
from .formats.matlab import read_v5, variable_name
from .readers import data_reader


def read_positions(data, n_patterns: int) -> np.ndarray:
    """Positions (N, 2) as (y, x) in data.pos_unit from data.pos_path (or the data file) at
    data.pos_key; with neither, the positions the data file holds (a CXI file's sample
    translations, in Å)."""
    path = Path(data.pos_path or data.path)
    key = data.pos_key
    stated_by_file = data_reader(data).positions
    if stated_by_file is not None and key is None and data.pos_path is None:
        positions, key = stated_by_file(path)
    else:
        positions = _read_array(path, key)
    if positions.ndim == 3 and positions.shape[-1] == 2:
        positions = positions.reshape(-1, 2)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise DataError(f"{path}:{key}: has shape {positions.shape}; expected (N, 2) as (y, x)")
    if len(positions) != n_patterns:
        raise DataError(f"{path}:{key}: holds {len(positions)} positions but the data hold {n_patterns} patterns")
    if not np.isfinite(positions).all():
        raise DataError(f"{path}:{key}: contains NaN or Inf values")
    return positions


def _read_array(path: Path, key: Optional[str]) -> np.ndarray:
    suffix = path.suffix.lower()
    if not path.exists():
        raise DataError(f"{path}: positions file not found (data.pos_path)")
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False).astype(np.float64)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: not a plain numeric .npy array ({exc})") from None
    if suffix in (".txt", ".csv", ".dat"):
        try:
            return np.loadtxt(path, delimiter="," if suffix == ".csv" else None, dtype=np.float64)
        except ValueError as exc:
            raise DataError(f"{path}: not a table of numbers ({exc})") from None
    if suffix == ".mat" and not is_hdf5(path):
        variables = read_v5(path)
        name = variable_name(key or "positions")
        if name not in variables:
            raise DataError(f"{path}: no variable '{name}' for the positions")
        return np.asarray(variables[name], dtype=np.float64)
    if key is None:
        raise DataError(f"{path}: set data.pos_key to the dataset holding the positions")
    with open_hdf5(path) as f:
        array = np.asarray(dataset(f, path, key)[()], dtype=np.float64)
    return array.T if suffix == ".mat" else array
