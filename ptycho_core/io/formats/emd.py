"""EMD 1.0 datacubes (the Berkeley layout, and py4DSTEM's written through emdfile): the 3D/4D
``data`` of a datacube group, with the scan and detector calibration its dim vectors state, and
from a py4DSTEM calibration the scan rotation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import h5py
import numpy as np

from .axes import axes_calibration
from .base import DataError, DataFormat, PatternSource, register_format
from .hdf5 import dataset_source, has_layout, open_hdf5, source_storage


def _datacubes(f: h5py.File) -> list[str]:
    """Datacube groups of an EMD 1.0 file whose ``data`` is 3D or 4D: groups of emd_group_type 1
    (the Berkeley layout), or 'array' (py4DSTEM's, written through emdfile)."""
    if "version_major" not in f.attrs:
        return []
    found: list[str] = []

    def visit(name, obj):
        kind = obj.attrs.get("emd_group_type", 0) if isinstance(obj, h5py.Group) else 0
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if isinstance(kind, str):
            is_cube = kind == "array"
        else:
            kind = np.asarray(kind).reshape(-1)
            is_cube = kind.dtype.kind in "iu" and kind.size > 0 and kind[0] == 1
        if is_cube and isinstance(obj.get("data"), h5py.Dataset) and obj["data"].ndim in (3, 4):
            found.append("/" + name)

    f.visititems(visit)
    return found


def _data_key(f: h5py.File, path: Path, key: Optional[str]) -> str:
    """The data dataset of the EMD group data.meas_key names (the group or its data), or of the
    file's only datacube."""
    groups = _datacubes(f)
    if key is not None:
        group = key[:-len("/data")] if key.endswith("/data") else key
        group = "/" + group.strip("/")
        if group not in groups:
            raise DataError(f"{path}: no EMD datacube '{key}'; datacubes in the file: {', '.join(groups) or 'none'}")
        return group + "/data"
    if len(groups) != 1:
        raise DataError(f"{path}: set data.meas_key to one of the EMD datacubes: {', '.join(groups) or 'none'}")
    return groups[0] + "/data"


def _open_emd(path: Path, data) -> PatternSource:
    with open_hdf5(path) as f:
        key = _data_key(f, path, data.meas_key)
    return dataset_source(path, key)


def _calibration(path: Path, data) -> dict:
    """Scan step and shape, and the detector's pixel size, from the dim vectors of an EMD 1.0
    datacube: the first two along the scan (lengths), the last two along the detector (mrad, or an
    inverse length that needs the beam energy: dk_inv_ang). The Berkeley layout numbers the dim
    vectors from 1, emdfile (py4DSTEM) from 0. A py4DSTEM calibration next to the datacube adds
    the scan rotation (QR_rotation_degrees) and whether the patterns are transposed (QR_flip)."""
    with open_hdf5(path) as f:
        group = f[_data_key(f, path, data.meas_key).rsplit("/", 1)[0]]
        ndim = group["data"].ndim
        first = 0 if "dim0" in group else 1

        def step(i):
            dim = group.get(f"dim{i + first}")
            if not isinstance(dim, h5py.Dataset) or dim.size < 2:
                return None, ""
            unit = dim.attrs.get("units", "")
            unit = unit.decode() if isinstance(unit, bytes) else str(unit)
            values = np.asarray(dim[()], dtype=np.float64).reshape(-1)
            return float(values[1] - values[0]), unit

        found = axes_calibration([step(0), step(1)] if ndim == 4 else None, group["data"].shape[:2], step(ndim - 1))
        calibration = group.parent.get("metadatabundle/calibration")
        if isinstance(calibration, h5py.Group):
            rotation = calibration.get("QR_rotation_degrees")
            # py4DSTEM: the counter-clockwise rotation of real space relative to diffraction space,
            # the same sense as experiment.scan.rotation_deg (scan vectors turned into detector axes)
            if isinstance(rotation, h5py.Dataset) and "scan" in found:
                found["scan"]["rotation_deg"] = float(np.asarray(rotation[()]).reshape(-1)[0])
            flip = calibration.get("QR_flip")
            if isinstance(flip, h5py.Dataset) and bool(np.asarray(flip[()]).reshape(-1)[0]):
                found["transposed"] = True
    return found


register_format(DataFormat("emd", _open_emd, among="hdf5", recognise=lambda path: has_layout(path, _datacubes),
                           calibration=_calibration, storage=source_storage))
