"""What the calibrations files state mean in ptyflow's units: lengths (scan steps, pixel sizes,
camera lengths) in metres, inverse lengths per Å, and the scan and detector calibration that axis
steps give (EMD, DigitalMicrograph, Velox)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .base import DataError

LENGTH_M = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "nm": 1e-9, "angstrom": 1e-10, "A": 1e-10,
            "Å": 1e-10}
INVERSE_LENGTH_PER_ANG = {"1/A": 1.0, "A^-1": 1.0, "1/Å": 1.0, "Å^-1": 1.0, "1/angstrom": 1.0, "1/nm": 0.1,
                          "nm^-1": 0.1, "1/m": 1e-10}


def length_m(dataset, default_unit: str) -> float:
    """The first value of an HDF5 dataset holding a length, in metres (its ``units`` attribute, or
    ``default_unit``)."""
    unit = dataset.attrs.get("units", default_unit)
    unit = unit.decode() if isinstance(unit, bytes) else str(unit)
    if unit not in LENGTH_M:
        raise DataError(f"{dataset.file.filename}:{dataset.name}: unit '{unit}' is not a length ptyflow knows "
                        f"({', '.join(LENGTH_M)})")
    return float(np.asarray(dataset[()]).reshape(-1)[0]) * LENGTH_M[unit]


def axes_calibration(scan_axes: Optional[list[tuple]], scan_shape, detector_axis: tuple) -> dict:
    """What axis calibrations say, each axis as (step, unit) with step None or 0 when unknown:
    ``scan`` ({shape, step_ang}) when the two scan axes (None: no scan grid) are equal lengths,
    and ``dk_mrad`` or ``dk_inv_ang`` (an inverse length per pixel, which needs the beam energy)
    from the detector axis."""
    found: dict = {}
    if scan_axes and all(unit in LENGTH_M and step for step, unit in scan_axes):
        ys, xs = (abs(step) * LENGTH_M[unit] * 1e10 for step, unit in scan_axes)
        if abs(ys - xs) <= 1e-6 * ys:
            found["scan"] = {"shape": [int(n) for n in scan_shape], "step_ang": ys}
    step, unit = detector_axis
    if step and unit == "mrad":
        found["dk_mrad"] = abs(step)
    elif step and unit in INVERSE_LENGTH_PER_ANG:
        found["dk_inv_ang"] = abs(step) * INVERSE_LENGTH_PER_ANG[unit]
    return found
