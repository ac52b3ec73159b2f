"""A DigitalMicrograph 4 (.dm4) writer for the tests, built from the published description of
the format (a tree of tag groups and data tags; no library writes DM4).

Layout: a big-endian header (version 4, a 64-bit length, 1 for little-endian data), then the
root tag group (sorted, open, 64-bit tag count). Each tag: 0x14 (group) or 0x15 (data), a 16-bit
name length and the name, a 64-bit byte count of what follows; a group continues with sorted,
open and the tag count, a data tag with '%%%%', the length of its type description, the
description (64-bit words) and the value in little-endian. Images live in ImageList as unnamed
groups holding ImageData (Data, DataType, Dimensions with x first, Calibrations) and ImageTags.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

GROUP, DATA = 0x14, 0x15
_SIMPLE = {np.dtype("int16"): 2, np.dtype("int32"): 3, np.dtype("uint16"): 4, np.dtype("uint32"): 5,
           np.dtype("float32"): 6, np.dtype("float64"): 7, np.dtype("bool"): 8, np.dtype("int8"): 9,
           np.dtype("uint8"): 10, np.dtype("int64"): 11, np.dtype("uint64"): 12}
IMAGE_DATA_TYPE = {np.dtype("int16"): 1, np.dtype("float32"): 2, np.dtype("uint8"): 6, np.dtype("int32"): 7,
                   np.dtype("int8"): 9, np.dtype("uint16"): 10, np.dtype("uint32"): 11, np.dtype("float64"): 12}


def _words(*values: int) -> bytes:
    return struct.pack(f">{len(values)}Q", *values)


def _data_tag(value) -> bytes:
    """'%%%%', the type description and the little-endian value of one data tag."""
    if isinstance(value, str):  # text is an array of 16-bit characters
        info, payload = (20, 4, len(value)), np.frombuffer(value.encode("utf-16-le"), "<u2").tobytes()
    elif isinstance(value, np.ndarray):
        array = value.astype(value.dtype.newbyteorder("<")).reshape(-1)
        info, payload = (20, _SIMPLE[value.dtype], array.size), array.tobytes()
    elif isinstance(value, bool):
        info, payload = (8,), struct.pack("<?", value)
    elif isinstance(value, int):
        info, payload = (3,), struct.pack("<i", value)
    else:
        info, payload = (7,), struct.pack("<d", float(value))
    return b"%%%%" + _words(len(info), *info) + payload


def _tag(name: str, value) -> bytes:
    raw_name = name.encode("latin-1")
    if isinstance(value, (dict, list)):
        items = value.items() if isinstance(value, dict) else (("", v) for v in value)  # a list: unnamed tags
        entries = [_tag(k, v) for k, v in items]
        body = struct.pack(">BB", 0, 1) + _words(len(entries)) + b"".join(entries)
        kind = GROUP
    else:
        body, kind = _data_tag(value), DATA
    return struct.pack(">BH", kind, len(raw_name)) + raw_name + _words(len(body)) + body


def image(array: np.ndarray, scales: list[float], units: list[str], name: str = "", tags: dict | None = None) -> dict:
    """An ImageList entry for ``array`` (C order; DM lists its dimensions fastest first), with
    one (scale, unit) per array axis, in the array's axis order."""
    return {"ImageData": {
        "Calibrations": {"Brightness": {"Origin": 0.0, "Scale": 1.0, "Units": "Counts"},
                         "Dimension": [{"Origin": 0.0, "Scale": float(s), "Units": u}
                                       for s, u in zip(reversed(scales), reversed(units))]},
        "Data": np.ascontiguousarray(array), "DataType": IMAGE_DATA_TYPE[array.dtype],
        "Dimensions": [int(n) for n in reversed(array.shape)]},
        "ImageTags": tags or {}, "Name": name}


def write_dm4(path: Path, images: list[dict], thumbnail: bool = True) -> Path:
    """A .dm4 file with ``images`` in its ImageList, after a small thumbnail as DM writes one."""
    entries = list(images)
    root: dict = {}
    if thumbnail:
        entries = [image(np.zeros((8, 8), np.uint8), [1, 1], ["", ""])] + entries
        root["Thumbnails"] = [{"ImageIndex": 0}]
    root = {"ImageList": entries, **root}
    body = struct.pack(">BB", 1, 0) + _words(len(root)) + b"".join(_tag(k, v) for k, v in root.items()) + _words(0)
    Path(path).write_bytes(struct.pack(">I", 4) + _words(len(body)) + struct.pack(">I", 1) + body)
    return Path(path)
