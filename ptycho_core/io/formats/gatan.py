"""Gatan DigitalMicrograph .dm3/.dm4 files, read lazily through RosettaSciIO (the tag tree
parsed, the pixels memory-mapped): the 3D/4D image of patterns, with the beam energy and the
axes' calibration the file states."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .axes import axes_calibration
from .base import DataError, DataFormat, PatternSource, check_layout, register_format, rsciio_reader


def _image(path: Path, key: Optional[str]) -> dict:
    """The 3D/4D image of a .dm3/.dm4 file as RosettaSciIO reads it: the one such image, or the one
    whose name data.meas_key gives."""
    file_reader = rsciio_reader(path, "digitalmicrograph", "Gatan .dm3/.dm4 files")
    try:
        images = file_reader(str(path), lazy=True)
    except Exception as exc:  # noqa: BLE001 - whatever the library raises on a bad file
        raise DataError(f"{path}: RosettaSciIO could not read it as a DigitalMicrograph file ({exc})") from None
    cubes = [im for im in images if im["data"].ndim in (3, 4)]
    names = [im["metadata"].get("General", {}).get("title", "") for im in cubes]
    if key is not None:
        cubes = [im for im, name in zip(cubes, names) if name == key.strip("/")]
    if len(cubes) != 1:
        listed = ", ".join(f"'{n}'" for n in names) or "none"
        raise DataError(f"{path}: " + (f"no 3D/4D image named '{key}'" if key is not None else
                                       "set data.meas_key to the name of the image of patterns")
                        + f"; 3D/4D images in the file: {listed}")
    return cubes[0]


def _open_dm(path: Path, data) -> PatternSource:
    cube = _image(path, data.meas_key)
    title = cube["metadata"].get("General", {}).get("title", "") or "(image)"
    check_layout(path, title, tuple(cube["data"].shape))
    return PatternSource(path, title, cube["data"])


def _calibration(path: Path, data) -> dict:
    """Beam energy (Microscope Info.Voltage), and from the image's axis calibrations the scan
    step and shape (a 4D image's first two axes, in lengths) and the detector's pixel size (mrad,
    or an inverse length: dk_inv_ang). DigiScan's rotation is the scan coils' setting, not the
    scan's angle to the detector, so it is not used."""
    cube = _image(path, data.meas_key)
    found: dict = {}
    tags = cube["original_metadata"].get("ImageList", {}).get("TagGroup0", {}).get("ImageTags", {})
    voltage = tags.get("Microscope Info", {}).get("Voltage") if isinstance(tags, dict) else None
    if isinstance(voltage, (int, float)) and voltage > 0:
        found["energy_kev"] = float(voltage) / 1e3
    axes = [(float(a["scale"]), str(a["units"])) for a in cube["axes"]]
    scan_shape = [a["size"] for a in cube["axes"][:2]]
    found.update(axes_calibration(axes[:2] if len(axes) == 4 else None, scan_shape, axes[-1]))
    return found


register_format(DataFormat("dm", _open_dm, extensions=(".dm4", ".dm3"), calibration=_calibration))
