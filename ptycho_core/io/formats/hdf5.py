"""HDF5 files: any dataset of patterns (``hdf5``) and CXI 1.6 files (``cxi``, with the sample
translations as positions). The helpers here open, list and describe HDF5 datasets for the
other HDF5-based formats (dectris, emd, velox, MATLAB v7.3). Datasets compressed with the filters
detectors use (bitshuffle-LZ4, LZ4, Blosc, Zstd) are decoded through hdf5plugin."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from .base import DataError, DataFormat, PatternSource, check_layout, register_format

try:  # registers the HDF5 compression filters detectors write (bitshuffle-LZ4 for Dectris)
    import hdf5plugin  # noqa: F401
except ImportError:  # reading such files then ends in a DataError that says what to install
    hdf5plugin = None

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
CXI_DATA = "/entry_1/data_1/data"
CXI_TRANSLATION = "/entry_1/sample_1/geometry_1/translation"


def is_hdf5(path: Path) -> bool:
    """Whether ``path`` starts like an HDF5 file (the signature may sit after a 512-byte user block)."""
    with open(path, "rb") as fh:
        head = fh.read(512 + 8)
    return HDF5_SIGNATURE in head


def open_hdf5(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.path)")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise DataError(f"{path}: not an HDF5 file (its content does not match the extension)") from None


def has_layout(path: Path, layout) -> bool:
    """Whether ``path`` is an HDF5 file for which ``layout(file)`` is true (a format's recognise)."""
    if not path.is_file() or not is_hdf5(path):
        return False
    with open_hdf5(path) as f:
        return bool(layout(f))


def dataset_names(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
    return names


def dataset(f: h5py.File, path: Path, key: str) -> h5py.Dataset:
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise DataError(f"{path}: no dataset '{key}'; datasets in the file: {', '.join(dataset_names(f)) or 'none'}")
    return f[key]


def dataset_source(path: Path, key: str) -> PatternSource:
    """The patterns of dataset ``key``, read from the open file until the source is closed."""
    f = open_hdf5(path)
    try:
        ds = dataset(f, path, key)
        check_layout(path, key, ds.shape)
    except DataError:
        f.close()
        raise
    return PatternSource(path, key, ds, f.close)


def dataset_storage(datasets: list[h5py.Dataset]) -> dict:
    """dtype, chunks and compression filters of the (first of the) datasets holding the patterns."""
    first = datasets[0]
    plist = first.id.get_create_plist()
    return {"dtype": str(first.dtype), "chunks": list(first.chunks) if first.chunks else None,
            "filters": [plist.get_filter(i)[3].decode(errors="replace") or str(plist.get_filter(i)[0])
                        for i in range(plist.get_nfilters())]}


def _only_pattern_dataset(path: Path) -> str:
    """With no data.meas_key: the file's one 3D/4D dataset, or an error listing the candidates."""
    with open_hdf5(path) as f:
        candidates = [n for n in dataset_names(f) if f[n].ndim in (3, 4)]
    if len(candidates) != 1:
        raise DataError(
            f"{path}: set data.meas_key to the dataset of patterns; 3D/4D datasets in the file: "
            f"{', '.join(candidates) or 'none'}"
        )
    return candidates[0]


def _cxi_positions(path: Path) -> tuple[np.ndarray, str]:
    """The sample translations of a CXI file, (N, 2) as (y, x) in Å."""
    with open_hdf5(path) as f:
        translation = np.asarray(dataset(f, path, CXI_TRANSLATION)[()], dtype=np.float64)
    if translation.ndim != 2 or translation.shape[1] < 2:
        raise DataError(f"{path}:{CXI_TRANSLATION}: has shape {translation.shape}; expected (N, 3) in metres")
    return translation[:, [1, 0]] * 1e10, CXI_TRANSLATION  # CXI stores (x, y, z) in metres


def source_storage(source: PatternSource) -> dict:
    """describe_data's storage fields of a source whose array is one HDF5 dataset."""
    return dataset_storage([source.array])


def _open_hdf5_patterns(path: Path, data) -> PatternSource:
    return dataset_source(path, data.meas_key or _only_pattern_dataset(path))


def _open_cxi_patterns(path: Path, data) -> PatternSource:
    return dataset_source(path, data.meas_key or CXI_DATA)


def _follow_hdf5(path: Path, data) -> PatternSource:
    """A dataset extended along its first axis while it is written (frames, or scan rows of a 4D
    dataset), opened as an SWMR reader when the writer allows it: the frames written so far."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.path)")
    try:
        f = h5py.File(path, "r", swmr=True)
    except OSError:  # not written in SWMR mode: a plain open sees what the writer has flushed
        f = open_hdf5(path)
    try:
        key = data.meas_key
        if key is None:
            candidates = [n for n in dataset_names(f) if f[n].ndim in (3, 4)]
            key = candidates[0] if len(candidates) == 1 else _only_pattern_dataset(path)  # the latter names them
        ds = dataset(f, path, key)
        check_layout(path, ds.name, ds.shape)
    except DataError:
        f.close()
        raise
    return PatternSource(path, ds.name, ds, f.close)


register_format(DataFormat("hdf5", _open_hdf5_patterns, extensions=(".h5", ".hdf5", ".hdf", ".nxs", ".emd"),
                           storage=source_storage, follow=_follow_hdf5))
register_format(DataFormat("cxi", _open_cxi_patterns, extensions=(".cxi",), storage=source_storage,
                           positions=_cxi_positions))
