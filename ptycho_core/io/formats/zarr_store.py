"""zarr arrays: a store that is one array, or a group and the array data.meas_key names."""

from __future__ import annotations

from pathlib import Path

from .base import DataError, DataFormat, PatternSource, check_layout, register_format


def _open_zarr(path: Path, data) -> PatternSource:
    import zarr

    key = data.meas_key
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise DataError(f"{path}: not a zarr store ({exc})") from None
    if isinstance(node, zarr.Group):
        inner = (key or "meas").strip("/")
        if inner not in node:
            names = sorted(name for name, _ in node.arrays())
            raise DataError(f"{path}: no array '{inner}'; arrays in the store: {', '.join(names) or 'none'}")
        node = node[inner]
    check_layout(path, key or "(array)", node.shape)
    return PatternSource(path, key or "(array)", node)


register_format(DataFormat("zarr", _open_zarr, extensions=(".zarr",)))
