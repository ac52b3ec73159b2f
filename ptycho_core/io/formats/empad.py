"""EMPAD .raw files: 130x128 float32 frames whose last two rows are metadata; the file states no
scan shape, so data.scan_shape gives it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DataError, DataFormat, PatternSource, register_format

EMPAD_FRAME = (130, 128)  # rows, columns of one EMPAD frame; the last two rows are metadata
EMPAD_DETECTOR = (128, 128)


def _open_empad(path: Path, data) -> PatternSource:
    frame_bytes = EMPAD_FRAME[0] * EMPAD_FRAME[1] * 4
    size = path.stat().st_size
    if size % frame_bytes:
        raise DataError(
            f"{path}: {size} bytes is not a whole number of EMPAD frames ({EMPAD_FRAME[1]}x{EMPAD_FRAME[0]} "
            "float32, the last 2 rows metadata)"
        )
    n = size // frame_bytes
    scan = data.scan_shape
    if scan is None:
        raise DataError(f"{path}: EMPAD .raw files carry no scan shape; set data.scan_shape [scan_y, scan_x]")
    if scan[0] * scan[1] != n:
        raise DataError(f"{path}: holds {n} EMPAD frames but data.scan_shape {list(scan)} needs {scan[0] * scan[1]}")
    frames = np.memmap(path, dtype="<f4", mode="r", shape=(scan[0], scan[1], *EMPAD_FRAME))
    return PatternSource(path, "(raw)", frames[:, :, : EMPAD_DETECTOR[0], :])


register_format(DataFormat("empad", _open_empad, extensions=(".raw",)))
