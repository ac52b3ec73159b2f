"""NumPy .npy arrays, memory-mapped."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DataError, DataFormat, PatternSource, check_layout, register_format


def _open_npy(path: Path, data) -> PatternSource:
    with open(path, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise DataError(f"{path}: not a .npy file (no NumPy header; its content does not match the extension)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path}: not a plain numeric .npy array ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: not a .npy file ({exc})") from None
    check_layout(path, "(array)", array.shape)
    return PatternSource(path, "(array)", array)


register_format(DataFormat("npy", _open_npy, extensions=(".npy",)))
