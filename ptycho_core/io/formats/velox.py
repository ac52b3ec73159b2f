"""Thermo Fisher Velox .emd files: the image stack of camera frames (one pattern per frame) under
/Data/Image, with the beam energy, the frames' pixel size and the scan shape its metadata state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from .axes import axes_calibration
from .base import DataError, DataFormat, PatternSource, check_layout, register_format
from .hdf5 import has_layout, open_hdf5

VELOX_IMAGES = "/Data/Image"


def _version(f: h5py.File) -> Optional[str]:
    """The Velox file version (from its Version dataset's JSON), or None for other files."""
    if not isinstance(f.get("Version"), h5py.Dataset) or not isinstance(f.get(VELOX_IMAGES), h5py.Group):
        return None
    try:
        stated = json.loads(bytes(np.asarray(f["Version"][()]).reshape(-1)[0]).decode().rstrip("\x00"))
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    return str(stated.get("version")) if stated.get("format") in ("Velox", "DevelopersKit") else None


def _metadata(group: h5py.Group) -> dict:
    """The JSON metadata Velox stores with an image, as bytes in column 0 of its Metadata."""
    try:
        raw = np.asarray(group["Metadata"][:, 0]).tobytes()
        return json.loads(raw.decode("utf-8").rstrip("\x00"))
    except (KeyError, ValueError, UnicodeDecodeError):
        return {}


class _VeloxFrames:
    """A Velox image stack, stored (ky, kx, frames) with one frame per chunk, seen as
    (frames, ky, kx); a block is read frame by frame, which for such chunks is one chunk read each
    (a strided read of several frames is scattered element by element and is slow)."""

    def __init__(self, dataset: h5py.Dataset):
        self.dataset = dataset
        self.shape = (dataset.shape[2], dataset.shape[0], dataset.shape[1])
        self.dtype = dataset.dtype

    def __getitem__(self, item):
        if not isinstance(item, slice):
            raise TypeError("Velox frames are read in blocks of the first axis")
        frames = range(*item.indices(self.shape[0]))
        out = np.empty((len(frames), *self.shape[1:]), self.dtype)
        for i, frame in enumerate(frames):
            self.dataset.read_direct(out, np.s_[:, :, frame], np.s_[i])
        return out


class _ScanGrid:
    """A flat (N, ky, kx) array seen as (scan_y, scan_x, ky, kx), read in blocks of scan rows."""

    def __init__(self, flat, scan: tuple[int, int]):
        self.flat, self.scan = flat, scan
        self.shape = (*scan, *flat.shape[1:])
        self.dtype = getattr(flat, "dtype", None)

    def __getitem__(self, item):
        start, stop, _ = item.indices(self.scan[0])
        return self.flat[start * self.scan[1]:stop * self.scan[1]].reshape(stop - start, *self.shape[1:])


def _stack(f: h5py.File, path: Path, key: Optional[str]) -> h5py.Group:
    """The image group holding the diffraction frames: the one stack of several frames, or the one
    data.meas_key names (its id under /Data/Image)."""
    images, groups = f[VELOX_IMAGES], {}
    for name in images:  # by name: h5py's items() holds its global lock between yields (see checkpoint.py)
        g = images[name]
        if isinstance(g, h5py.Group) and isinstance(g.get("Data"), h5py.Dataset) and g["Data"].ndim == 3:
            groups[name] = g
    stacks = [name for name, g in groups.items() if g["Data"].shape[2] > 1]
    if key is not None:
        name = key.strip("/").rsplit("/", 2)[-2 if key.rstrip("/").endswith("Data") else -1]
        if name not in groups:
            raise DataError(f"{path}: no Velox image '{key}'; image stacks in the file: {', '.join(stacks) or 'none'}")
        return groups[name]
    if len(stacks) != 1:
        raise DataError(f"{path}: set data.meas_key to the Velox image stack of diffraction frames; stacks in "
                        f"the file: {', '.join(stacks) or 'none'}")
    return groups[stacks[0]]


def _scan_shape(metadata: dict, n_frames: int) -> Optional[tuple[int, int]]:
    size = metadata.get("Scan", {}).get("ScanSize", {}) if isinstance(metadata.get("Scan"), dict) else {}
    try:
        shape = (int(size["height"]), int(size["width"]))
    except (KeyError, TypeError, ValueError):
        return None
    return shape if shape[0] * shape[1] == n_frames else None


def _open_velox(path: Path, data) -> PatternSource:
    f = open_hdf5(path)
    try:
        if _version(f) is None:
            raise DataError(f"{path}: not a Velox file (no Version JSON naming Velox, or no {VELOX_IMAGES} group)")
        group = _stack(f, path, data.meas_key)
        frames = _VeloxFrames(group["Data"])
        scan = data.scan_shape or _scan_shape(_metadata(group), frames.shape[0])
        array: Any = frames
        if scan is not None:
            if scan[0] * scan[1] != frames.shape[0]:
                raise DataError(f"{path}: holds {frames.shape[0]} frames but data.scan_shape {list(scan)} needs "
                                f"{scan[0] * scan[1]}")
            array = _ScanGrid(frames, tuple(scan))
        check_layout(path, group["Data"].name, array.shape)
    except DataError:
        f.close()
        raise
    return PatternSource(path, group["Data"].name, array, f.close)


def _calibration(path: Path, data) -> dict:
    """Beam energy (Optics.AccelerationVoltage, V), the frames' pixel size when it is an inverse
    length (BinaryResult.PixelSize in PixelUnitX: dk_inv_ang) and the scan shape (Scan.ScanSize,
    when it accounts for every frame). Velox's ScanRotation is the scan coils' setting, not the
    scan's angle to the camera, so it is not used."""
    with open_hdf5(path) as f:
        group = _stack(f, path, data.meas_key)
        metadata = _metadata(group)
        n_frames = group["Data"].shape[2]
    found: dict = {}
    try:
        found["energy_kev"] = float(metadata["Optics"]["AccelerationVoltage"]) / 1e3
    except (KeyError, TypeError, ValueError):
        pass
    result = metadata.get("BinaryResult", {})
    try:
        width = float(result["PixelSize"]["width"])
    except (KeyError, TypeError, ValueError):
        width = 0.0
    found.update(axes_calibration(None, None, (width, str(result.get("PixelUnitX", "")))))
    scan = _scan_shape(metadata, n_frames)
    if scan is not None:
        found["scan_shape"] = list(scan)
    return found


register_format(DataFormat("velox", _open_velox, among="hdf5",
                           recognise=lambda path: has_layout(path, lambda f: _version(f) is not None),
                           calibration=_calibration))
