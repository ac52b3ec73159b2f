"""MATLAB .mat files: v7.3 (HDF5, read in blocks through h5py) and v5 (scipy, which reads a
variable whole: one larger than half the memory available is refused before it is read)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .base import DataError, DataFormat, PatternSource, check_layout, host_available_bytes, register_format
from .hdf5 import dataset_source, is_hdf5

# numpy types of the MATLAB classes a v5 file's patterns can have (scipy's whosmat names them)
MATLAB_NUMERIC = {"double": np.float64, "single": np.float32, "int8": np.int8, "uint8": np.uint8, "int16": np.int16,
                  "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64}
MATLAB_V5_MEMORY_FRACTION = 0.5  # of the memory available that one v5 variable, read whole, may take


def variable_name(key: str) -> str:
    """A MATLAB variable's name from a key given as a name or an HDF5-style path."""
    return key.lstrip("/")


class _AxesReversed:
    """A MATLAB v7.3 dataset seen with MATLAB's axis order, read lazily: blocks along the first
    (MATLAB) axis are slices along the last HDF5 axis, transposed after reading."""

    def __init__(self, dataset):
        self.dataset = dataset

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dataset.shape))

    def __getitem__(self, item):
        if not isinstance(item, slice):
            raise TypeError("MATLAB v7.3 patterns are read in blocks of the first axis")
        return np.asarray(self.dataset[..., item]).transpose()


class _MatV5Variable:
    """A numeric variable of a MATLAB v5 file. v5 variables can be compressed and are not laid out
    for reading in blocks, so scipy reads the variable whole, at the first block asked for (shape
    and type come from its header, read without its data). One that would take more than
    MATLAB_V5_MEMORY_FRACTION of the memory available is refused before it is read."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], matlab_class: str):
        if matlab_class not in MATLAB_NUMERIC:
            raise DataError(f"{path}: variable '{name}' is a MATLAB {matlab_class}, not a numeric array")
        self.path, self.name, self.shape = path, name, tuple(int(n) for n in shape)
        self.dtype = np.dtype(MATLAB_NUMERIC[matlab_class])
        self._array: Optional[np.ndarray] = None

    def __getitem__(self, item):
        if self._array is None:
            nbytes = int(np.prod(self.shape, dtype=np.float64)) * self.dtype.itemsize
            available = host_available_bytes()
            if nbytes > MATLAB_V5_MEMORY_FRACTION * available:
                raise DataError(
                    f"{self.path}: variable '{self.name}' {self.shape} {self.dtype} is {nbytes / 1e9:.3g} GB; a MATLAB "
                    f"v5 file is read whole, and this machine has {available / 1e9:.3g} GB of memory available. Save "
                    f"it as MATLAB v7.3 (save -v7.3: an HDF5 file, read in blocks) or as .npy or HDF5"
                )
            self._array = np.asarray(read_v5(self.path, variable_names=[self.name])[self.name])
        return self._array[item]


def read_v5(path: Path, **options) -> dict:
    """The variables of a MATLAB v5 file (scipy.io.loadmat with ``options``)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{path}: reading MATLAB v5 files needs scipy (pip install scipy)") from None
    try:
        return loadmat(path, **options)
    except Exception as exc:
        raise DataError(f"{path}: not a readable MATLAB file ({exc})") from None


def _v5_variables(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, MATLAB class)} of a v5 file's variables, from their headers alone."""
    try:
        from scipy.io import whosmat
    except ImportError:
        raise DataError(f"{path}: reading MATLAB v5 files needs scipy (pip install scipy)") from None
    try:
        return {name: (tuple(shape), matlab_class) for name, shape, matlab_class in whosmat(path)}
    except Exception as exc:
        raise DataError(f"{path}: not a readable MATLAB file ({exc})") from None


def _open_mat(path: Path, data) -> PatternSource:
    name = variable_name(data.meas_key or "meas")
    if is_hdf5(path):  # v7.3 files are HDF5; MATLAB writes arrays with reversed axes
        source = dataset_source(path, "/" + name)
        return PatternSource(path, source.key, _AxesReversed(source.array), source.close)
    variables = _v5_variables(path)
    if name not in variables:
        raise DataError(f"{path}: no variable '{name}'; variables in the file: {', '.join(variables) or 'none'}")
    array = _MatV5Variable(path, name, *variables[name])
    check_layout(path, name, array.shape)
    return PatternSource(path, name, array)


register_format(DataFormat("mat", _open_mat, extensions=(".mat",)))
