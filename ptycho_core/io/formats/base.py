"""What every reader shares: the ``PatternSource`` a reader returns, ``DataError``, and the
registry of formats (``DataFormat``, ``register_format``) through which ``io/readers.py``
recognises, opens, describes and calibrates a data file.

A format registers one ``DataFormat`` when its module is imported (``formats/__init__.py``
imports them all, in the order of ``FORMATS``); nothing outside its module names it again, but
``config.DataParams.format``, which lists the formats a config may name (a test holds the two
equal)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np


class DataError(ValueError):
    """Input data that cannot be used; the message names the file/key and what was expected."""


def host_available_bytes() -> int:
    """RAM the kernel can give without swapping (MemAvailable), or free pages where that is missing."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


MAX_ELEMENTS = 1 << 36  # refuse absurd declared sizes before allocating anything


def check_layout(path: Path, key: str, shape: tuple[int, ...]) -> None:
    """A DataError unless ``shape`` is (N, ky, kx) or (scan_y, scan_x, ky, kx) of a plausible size."""
    if len(shape) not in (3, 4):
        raise DataError(f"{path}:{key}: has shape {tuple(shape)}; expected (N, ky, kx) or (scan_y, scan_x, ky, kx)")
    if int(np.prod(shape, dtype=np.float64)) > MAX_ELEMENTS:
        raise DataError(f"{path}:{key}: declared shape {tuple(shape)} is implausibly large; refusing to read it")


@dataclass
class PatternSource:
    """Patterns in a file, read in blocks. ``array`` is any sliceable array-like (h5py dataset,
    memmap, zarr array, ndarray) of shape (N, ky, kx) or (scan_y, scan_x, ky, kx)."""

    path: Path
    key: str
    array: Any
    close: Callable[[], None] = lambda: None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def scan_shape(self) -> Optional[tuple[int, int]]:
        return self.shape[:2] if len(self.shape) == 4 else None

    @property
    def n_patterns(self) -> int:
        return int(np.prod(self.shape[:-2]))

    @property
    def detector_shape(self) -> tuple[int, int]:
        return self.shape[-2:]

    def read(self, flat_indices: np.ndarray) -> np.ndarray:
        """Patterns (len(flat_indices), ky, kx) as float32; indices sorted ascending."""
        idx = np.asarray(flat_indices)
        if len(self.shape) == 3:
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            block = self._read(lo, hi, lo)  # one contiguous read, then pick
            return block[idx - lo].astype(np.float32, copy=False)
        nx = self.shape[1]
        rows = idx // nx
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        block = self._read(lo, hi, lo * nx)  # whole scan rows
        return block.reshape(-1, *self.detector_shape)[idx - lo * nx].astype(np.float32, copy=False)

    def _read(self, lo: int, hi: int, first_pattern: int) -> np.ndarray:
        try:
            return np.asarray(self.array[lo:hi])
        except OSError as exc:
            if "filter" in str(exc) or "plugin" in str(exc):
                raise DataError(
                    f"{self.path}:{self.key}: the patterns are compressed with an HDF5 filter this installation "
                    f"cannot decode (bitshuffle-LZ4, as Dectris detectors write, or another); install hdf5plugin "
                    f"(pip install hdf5plugin). HDF5 said: {str(exc).splitlines()[0]}"
                ) from None
            raise DataError(f"{self.path}:{self.key}: cannot read pattern {first_pattern} on ({exc})") from None


def rsciio_reader(path: Path, module: str, what: str):
    """``rsciio.<module>.file_reader``, or a DataError saying how to install RosettaSciIO (an
    optional extra: it is GPL-3.0 licensed)."""
    try:
        return __import__(f"rsciio.{module}", fromlist=["file_reader"]).file_reader
    except ImportError:
        raise DataError(f"{path}: reading {what} needs RosettaSciIO "
                        "(pip install 'ptyflow[formats]', or pip install rosettasciio)") from None


# ------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DataFormat:
    """One format ptyflow reads, as the registry knows it. ``data`` below is the config's data
    group (or any object with its path, format, meas_key and scan_shape).

    name: the value of data.format.
    open(path, data): the file's patterns as a PatternSource; a DataError naming the file, the key
        and what was expected when they cannot be read.
    extensions: lower-case suffixes that tell this format under data.format: auto.
    among, recognise(path): a format told by its content among the files of another format's
        extensions (a Dectris master file among HDF5 files); tried in registration order before
        that format is taken.
    calibration(path, data): what the file states about the experiment (file_calibration's keys);
        None when the format states nothing.
    storage(source): what describe_data adds about how the patterns are stored (dtype, chunks,
        compression filters, linked files).
    positions(path): positions the file itself holds, (N, 2) as (y, x) in Å, and their key; read
        when the config names no other positions.
    follow(path, data): the patterns of a file still being written (live mode), as far as they
        are complete now: a PatternSource of the whole frames (or whole scan rows) written so far,
        opened afresh on every call, or None while not even one frame is complete. A frame still
        being written is left out, never an error. Left None: the format cannot be followed."""

    name: str
    open: Callable[[Path, Any], PatternSource]
    extensions: tuple[str, ...] = ()
    among: Optional[str] = None
    recognise: Optional[Callable[[Path], bool]] = None
    calibration: Optional[Callable[[Path, Any], dict]] = None
    storage: Optional[Callable[[PatternSource], dict]] = None
    positions: Optional[Callable[[Path], tuple[np.ndarray, str]]] = None
    follow: Optional[Callable[[Path, Any], Optional[PatternSource]]] = None


READERS: dict[str, DataFormat] = {}
EXTENSIONS: dict[str, str] = {}  # suffix -> the format it tells under data.format: auto
FORMATS = READERS.keys()  # the registered names, in registration order


def register_format(fmt: DataFormat) -> DataFormat:
    """Add ``fmt`` to the registry; its name and extensions must be new."""
    if fmt.name == "auto":
        raise ValueError("data format 'auto' is data.format's word for 'recognise the file'; choose another name")
    if fmt.name in READERS:
        raise ValueError(f"data format '{fmt.name}' is registered already")
    taken = [suffix for suffix in fmt.extensions if suffix in EXTENSIONS]
    if taken:
        raise ValueError(f"data format '{fmt.name}': extensions {taken} already tell {[EXTENSIONS[s] for s in taken]}")
    if (fmt.among is None) != (fmt.recognise is None):
        raise ValueError(f"data format '{fmt.name}': among and recognise go together")
    READERS[fmt.name] = fmt
    EXTENSIONS.update({suffix: fmt.name for suffix in fmt.extensions})
    return fmt
