"""TIFF stacks (tifffile): memory-mapped when uncompressed and contiguous, otherwise decoded a
page at a time as blocks are read."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .base import DataError, DataFormat, PatternSource, check_layout, register_format


class _TiffPages:
    """A TIFF series that cannot be memory-mapped (compressed, or its pages not contiguous), read a
    page at a time as blocks are asked for. A page holds whole patterns: one (ky, kx) image, or a
    stack of them (sample planes or a volume, (k, ky, kx)), in the series' order; the page decoded
    last is kept, since consecutive blocks often share one. A compressed page is decoded whole, so
    memory holds a page, never the file."""

    def __init__(self, tif, path: Path):
        series = tif.series[0]
        self.tif = tif
        self.shape = tuple(series.shape)
        self.dtype = series.dtype
        page_shape = tuple(series.keyframe.shape)
        self.per_page = int(np.prod(page_shape[:-2], dtype=np.int64))
        n_patterns = int(np.prod(self.shape[:-2], dtype=np.int64))
        if page_shape[-2:] != self.shape[-2:] or len(series) * self.per_page != n_patterns:
            raise DataError(
                f"{path}: its pages (shape {page_shape}, {len(series)} of them) do not hold whole patterns of "
                f"the stack {self.shape}; expected pages of one (ky, kx) pattern or of a stack of them"
            )
        self._last: tuple[int, Optional[np.ndarray]] = (-1, None)

    def _page(self, index: int) -> np.ndarray:
        """(per_page, ky, kx) patterns of page ``index`` of the series."""
        if self._last[0] != index:
            self._last = (index, self.tif.asarray(key=index, series=0).reshape(-1, *self.shape[-2:]))
        return self._last[1]

    def __getitem__(self, item):
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("TIFF pages are read in blocks of the first axis")
        lo, hi, _ = item.indices(self.shape[0])
        per_index = int(np.prod(self.shape[1:-2], dtype=np.int64))  # patterns per index of the first axis
        first, end = lo * per_index, max(hi, lo) * per_index
        pages = range(first // self.per_page, -(-end // self.per_page))
        if not len(pages):
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        flat = np.concatenate([self._page(i) for i in pages]) if len(pages) > 1 else self._page(pages[0])
        offset = pages[0] * self.per_page
        return flat[first - offset:end - offset].reshape(max(hi - lo, 0), *self.shape[1:])


def _open_tiff(path: Path, data) -> PatternSource:
    try:
        import tifffile
    except ImportError:
        raise DataError(f"{path}: reading TIFF needs tifffile (pip install tifffile)") from None
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise DataError(f"{path}: not a readable TIFF stack ({exc})") from None
    try:
        if tif.series[0].dataoffset is not None and not tif.pages[0].compression > 1:
            tif.close()  # contiguous and uncompressed: memory-map it
            array, close = tifffile.memmap(path, mode="r"), (lambda: None)
        else:  # compressed or scattered: decoded a page at a time, as blocks are read
            array, close = _TiffPages(tif, path), tif.close
    except DataError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise DataError(f"{path}: not a readable TIFF stack ({exc})") from None
    try:
        check_layout(path, "(stack)", array.shape)
    except DataError:
        close()
        raise
    return PatternSource(path, "(stack)", array, close)


register_format(DataFormat("tiff", _open_tiff, extensions=(".tif", ".tiff")))
