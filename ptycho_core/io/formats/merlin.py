"""Quantum Detectors Merlin .mib files (single chip, U08/U16/U32 counts), with the .hdr beside
them when there is one, read lazily through RosettaSciIO. The header states no optics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .base import DataError, DataFormat, PatternSource, check_layout, register_format, rsciio_reader


HEADER_PEEK = 384  # bytes that hold the fields of a frame header that tell its layout


def _frame_layout(path: Path, head: bytes) -> tuple[int, int, int, int, str]:
    """(header bytes, width, height, bytes per count, count type) from the start of a .mib file."""
    fields = head.decode("ascii", errors="replace").split(",")
    if not head.startswith(b"MQ1,") or len(fields) < 8:
        raise DataError(f"{path}: not a Merlin .mib file (a frame header starts with 'MQ1,')")
    try:
        header_bytes, width, height = int(fields[2]), int(fields[4]), int(fields[5])
        depth = {"U08": 1, "U16": 2, "U32": 4}[fields[6]]
    except (ValueError, KeyError):
        raise DataError(f"{path}: unsupported Merlin frame header ({','.join(fields[:8])}): expected the "
                        "header size, width, height and U08/U16/U32 counts") from None
    return header_bytes, width, height, depth, fields[6]


def _open_mib(path: Path, data) -> PatternSource:
    """Frames memory-mapped past their headers and read a block at a time; their count is checked
    against the .hdr and data.scan_shape."""
    file_reader = rsciio_reader(path, "quantumdetector", "Quantum Detectors .mib files")
    with open(path, "rb") as fh:
        head = fh.read(HEADER_PEEK)
    header_bytes, width, height, depth, count_type = _frame_layout(path, head)
    frame_bytes = header_bytes + width * height * depth
    size = path.stat().st_size
    if size % frame_bytes:
        raise DataError(f"{path}: {size} bytes is not a whole number of {width}x{height} {count_type} frames of "
                        f"{frame_bytes} bytes (a truncated or mixed file)")
    n_frames = size // frame_bytes
    hdr = path.with_suffix(".hdr")
    if hdr.is_file():
        declared = _hdr_value(hdr, "Frames in Acquisition (Number)")
        if declared is not None and declared != n_frames:
            raise DataError(f"{hdr}: says {declared} frames in the acquisition but {path.name} holds {n_frames}")
    scan = data.scan_shape
    navigation = (scan[1], scan[0]) if scan is not None else (n_frames,)  # rsciio takes (x, y)
    if scan is not None and scan[0] * scan[1] != n_frames:
        raise DataError(f"{path}: holds {n_frames} frames but data.scan_shape {list(scan)} needs {scan[0] * scan[1]}")
    try:
        frames = file_reader(str(path), lazy=True, navigation_shape=navigation)[0]["data"]
    except Exception as exc:  # noqa: BLE001 - whatever the library raises on a bad file
        raise DataError(f"{path}: RosettaSciIO could not read it as a Merlin .mib file ({exc})") from None
    check_layout(path, "(frames)", tuple(frames.shape))
    return PatternSource(path, "(frames)", frames)


def _hdr_value(hdr: Path, name: str):
    for line in hdr.read_text(errors="replace").splitlines():
        key, _, value = line.partition("\t")
        if key.rstrip(":") == name:
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


class _GrowingFrames:
    """The whole frames of a .mib file being written, (n, height, width), each turned top to bottom
    as RosettaSciIO shows them (see _open_mib), so a followed file reads like a finished one."""

    def __init__(self, path: Path, header_bytes: int, width: int, height: int, depth: int, n_frames: int):
        counts = np.dtype(f">u{depth}")
        record = np.dtype([("header", f"V{header_bytes}"), ("counts", counts, (height, width))])
        self.frames = np.memmap(path, dtype=record, mode="r", shape=(n_frames,))
        self.shape = (n_frames, height, width)

    def __getitem__(self, item):
        return np.asarray(self.frames[item]["counts"][:, ::-1, :])


def _follow_mib(path: Path, data) -> Optional[PatternSource]:
    """The whole frames written so far (a frame is header + counts; a partial one at the end is
    left out until it is complete)."""
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.path)")
    with open(path, "rb") as fh:
        head = fh.read(HEADER_PEEK)
    if len(head) < HEADER_PEEK:
        return None  # the first header is still being written
    header_bytes, width, height, depth, _ = _frame_layout(path, head)
    n_frames = path.stat().st_size // (header_bytes + width * height * depth)
    if n_frames == 0:
        return None
    return PatternSource(path, "(frames)", _GrowingFrames(path, header_bytes, width, height, depth, n_frames))


register_format(DataFormat("mib", _open_mib, extensions=(".mib",), follow=_follow_mib))
