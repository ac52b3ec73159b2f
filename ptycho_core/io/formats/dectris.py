"""Dectris (Arina, Eiger, Quadro) master files: the data_NNNNNN entries, usually external links
to data files compressed with bitshuffle-LZ4, read as one stack; the master file states the beam
energy, the detector's pixel size and distance, and its pixel mask."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from .axes import length_m
from .base import DataError, DataFormat, PatternSource, check_layout, register_format
from .hdf5 import dataset_storage, has_layout, open_hdf5

DECTRIS_DATA = "/entry/data"
DECTRIS_DETECTOR = "/entry/instrument/detector"
DECTRIS_WAVELENGTH = "/entry/instrument/beam/incident_wavelength"


# how Dectris software names a master's data files: <stem>_master.h5 links <stem>_data_000001.h5, ...
DATA_FILE_NAME = re.compile(r"(?P<stem>.+)_data_\d{6}\.h5", re.IGNORECASE)


def is_data_file_name(path: Path) -> bool:
    """Whether ``path`` is named as a Dectris master's data file is (<stem>_data_NNNNNN.h5): a part
    of an acquisition, not one of its own."""
    return DATA_FILE_NAME.fullmatch(Path(path).name) is not None


def linked_files(path: Path) -> list[Path]:
    """The data files of a Dectris master file (named <stem>_master.h5, as Dectris software names
    it) that exist now, in the master's order: those its data_NNNNNN entries link to, or, while the
    master cannot be opened yet (still being written), those named after it
    (<stem>_data_NNNNNN.h5). [] for any other file, which is not opened (a file another program is
    writing in live mode is only looked at)."""
    path = Path(path)
    if not path.is_file() or path.suffix.lower() != ".h5" or not path.stem.lower().endswith("_master"):
        return []
    stem = path.stem[: -len("_master")]
    try:
        # opened as the readers open it: HDF5 refuses a second open of one file with other locking
        with h5py.File(path, "r") as f:
            names = []
            for name in _links(f):
                link = f[DECTRIS_DATA].get(name, getlink=True)
                if isinstance(link, h5py.ExternalLink):
                    names.append(link.filename)
    except OSError:
        return sorted(p for p in path.parent.glob(f"{stem}_data_*.h5") if is_data_file_name(p))
    found = [path.parent / name for name in dict.fromkeys(names)]
    return [p for p in found if p.is_file() and p.resolve() != path.resolve()]


def _links(f: h5py.File) -> list[str]:
    """The data_NNNNNN entries of a Dectris master file, in order; [] when ``f`` is not one."""
    if DECTRIS_DETECTOR not in f or not isinstance(f.get(DECTRIS_DATA), h5py.Group):
        return []
    return sorted(k for k in f[DECTRIS_DATA].keys() if re.fullmatch(r"data_\d{6}", k))


class _Frames:
    """The data_NNNNNN datasets of a Dectris master file (each (n_i, ky, kx), usually in its own
    linked file) seen as one (N, ky, kx) array, read in slices of the first axis."""

    def __init__(self, datasets: list):
        self.datasets = datasets
        self.starts = np.cumsum([0] + [len(d) for d in datasets])
        self.shape = (int(self.starts[-1]), *datasets[0].shape[1:])

    def __getitem__(self, item):
        if not isinstance(item, slice):
            raise TypeError("Dectris frames are read in blocks of the first axis")
        start, stop, _ = item.indices(self.shape[0])
        pieces = [d[max(start, s0) - s0:min(stop, s0 + len(d)) - s0]
                  for d, s0 in zip(self.datasets, self.starts[:-1]) if max(start, s0) < min(stop, s0 + len(d))]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _open_dectris(path: Path, data) -> PatternSource:
    f = open_hdf5(path)
    datasets: list = []
    try:
        names = _links(f)
        if not names:
            raise DataError(f"{path}: not a Dectris master file (no {DECTRIS_DATA}/data_NNNNNN entries under an "
                            f"{DECTRIS_DETECTOR} group)")
        for name in names:
            link = f[DECTRIS_DATA].get(name, getlink=True)
            try:
                datasets.append(f[DECTRIS_DATA][name])
            except KeyError:
                target = f"{link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else name
                raise DataError(f"{path}: {DECTRIS_DATA}/{name} links to {target}, which cannot be opened (keep the "
                                "data files next to the master file)") from None
        shapes = {tuple(d.shape[1:]) for d in datasets}
        if any(d.ndim != 3 for d in datasets) or len(shapes) != 1:
            raise DataError(f"{path}: the data_NNNNNN datasets should all be (frames, ky, kx) of one detector size; "
                            f"found {[tuple(d.shape) for d in datasets]}")
        frames = _Frames(datasets)
        check_layout(path, DECTRIS_DATA, frames.shape)
    except DataError:
        _close_all(f, datasets)
        raise
    return PatternSource(path, DECTRIS_DATA, frames, lambda: _close_all(f, datasets))


def _close_all(master: h5py.File, datasets: list) -> None:
    """The master and the data files it opened: closing the master alone leaves those open, and a
    later open of one in this process (a watcher's next dataset) would be handed that stale copy."""
    for chunk in datasets:
        chunk.file.close()
    master.close()


def _follow_dectris(path: Path, data) -> Optional[PatternSource]:
    """The data files complete so far, in order: the master file names them all from the start and
    they appear one by one. The first that is missing, cannot be opened, or whose last frame cannot
    be read (still being written, truncated) ends what is read now; it is tried again next time."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.path)")
    try:
        f = h5py.File(path, "r")
    except OSError:
        return None  # the master file itself is still being written
    datasets = []
    try:
        for name in _links(f):
            try:
                chunk = f[DECTRIS_DATA][name]
                if chunk.ndim != 3 or (datasets and chunk.shape[1:] != datasets[0].shape[1:]):
                    break
                if len(chunk):
                    chunk[len(chunk) - 1]  # the whole file is there only if its last frame reads
            except (KeyError, OSError, RuntimeError):
                break
            datasets.append(chunk)
    except BaseException:
        f.close()
        raise
    if not datasets:
        f.close()
        return None

    return PatternSource(path, DECTRIS_DATA, _Frames(datasets), lambda: _close_all(f, datasets))


def _calibration(path: Path, data) -> dict:
    """``energy_kev`` (from the wavelength), ``dk_mrad`` (pixel size over the camera length),
    ``bad_pixels`` [(ky, kx)] (the detector's pixel mask) and ``detector_shape``."""
    from ...physics import energy_kev_from_wavelength

    found: dict = {}
    with open_hdf5(path) as f:
        det = f[DECTRIS_DETECTOR]
        if DECTRIS_WAVELENGTH in f:
            found["energy_kev"] = energy_kev_from_wavelength(length_m(f[DECTRIS_WAVELENGTH], "angstrom") * 1e10)
        if "x_pixel_size" in det and "detector_distance" in det:
            pixel_m, distance_m = length_m(det["x_pixel_size"], "m"), length_m(det["detector_distance"], "m")
            if distance_m > 0:
                found["dk_mrad"] = float(np.arctan(pixel_m / distance_m) * 1e3)
        mask_key = "detectorSpecific/pixel_mask"
        if mask_key in det:
            mask = np.asarray(det[mask_key][()])
            found["bad_pixels"] = [tuple(int(v) for v in yx) for yx in np.argwhere(mask != 0)]
            found["detector_shape"] = [int(v) for v in mask.shape]
    return found


def _storage(source: PatternSource) -> dict:
    datasets = source.array.datasets
    return {**dataset_storage(datasets), "data_files": [d.file.filename for d in datasets]}


register_format(DataFormat("dectris", _open_dectris, among="hdf5", recognise=lambda path: has_layout(path, _links),
                           calibration=_calibration, storage=_storage, follow=_follow_dectris))
