"""The preprocessed patterns, held in memory or in preprocessed.h5, read by pattern index.

Both stores answer the same questions: ``shape``, ``read(indices)`` (any order, repeats allowed),
``blocks()`` (the whole set, a bounded block at a time) and ``load()`` (all of it at once, for
data that fits). A reconstruction reads from them through a measurement tier
(ptycho_core/measurements.py); nothing else needs the whole array in memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import h5py
import numpy as np

from .readers import DataError

PATTERNS_KEY = "measurements"
BLOCK_BYTES = 32 << 20  # what blocks() holds at a time


def contiguous_runs(sorted_unique: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop), ...] of the runs of consecutive values in a sorted array of unique ints."""
    if len(sorted_unique) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_unique) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(sorted_unique)]])
    return [(int(sorted_unique[a]), int(sorted_unique[b - 1]) + 1) for a, b in zip(starts, stops)]


def mean_of_blocks(blocks: Iterable[np.ndarray], n: int,
                   each: Optional[Callable[[int, np.ndarray], None]] = None) -> np.ndarray:
    """(ky, kx) float64 mean of n patterns that arrive in blocks (b, ky, kx), summed block by block
    the same way wherever they come from, so a mean taken while preprocessing equals one taken from
    preprocessed.h5 later; ``each(first index, block)`` sees every block on the way."""
    total, done = 0.0, 0
    for block in blocks:
        if each is not None:
            each(done, block)
        total = total + block.sum(axis=0, dtype=np.float64)
        done += len(block)
    return total / n


class PatternStore:
    """(N, ky, kx) float32 patterns, DC at the centre."""

    shape: tuple[int, int, int]

    @property
    def n_patterns(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 4

    def _read_range(self, start: int, stop: int, out: np.ndarray) -> None:
        raise NotImplementedError

    def _read_sorted(self, unique: np.ndarray, out: np.ndarray) -> None:
        """Patterns of sorted unique indices into out, one read per run of neighbours."""
        done = 0
        for start, stop in contiguous_runs(unique):
            self._read_range(start, stop, out[done:done + stop - start])
            done += stop - start

    def _before_read(self, first: int) -> None:
        """Checks once per read() or block (FilePatterns: is the file still the one opened?)."""

    def read(self, indices) -> np.ndarray:
        """Patterns (len(indices), ky, kx) in the order of ``indices``. Neighbouring indices are
        read as one range, so spatially compact batches of a raster scan cost few reads."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_patterns):
            raise IndexError(f"pattern indices outside 0..{self.n_patterns - 1}")
        unique, inverse = np.unique(idx, return_inverse=True)
        out = np.empty((len(unique), *self.shape[1:]), dtype=np.float32)
        if len(unique):
            self._before_read(int(unique[0]))
            self._read_sorted(unique, out)
        return out if (np.diff(idx) > 0).all() else out[inverse]  # ascending: already in order

    def blocks(self, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, np.ndarray]]:
        """(first index, patterns) for consecutive blocks of at most block_bytes."""
        per_block = max(1, block_bytes // (4 * int(np.prod(self.shape[1:]))))
        for start in range(0, self.n_patterns, per_block):
            stop = min(start + per_block, self.n_patterns)
            out = np.empty((stop - start, *self.shape[1:]), dtype=np.float32)
            self._before_read(start)
            self._read_range(start, stop, out)
            yield start, out

    def load(self) -> np.ndarray:
        """Every pattern, in memory (only for data that fit)."""
        out = np.empty(self.shape, dtype=np.float32)
        for start, block in self.blocks():
            out[start:start + len(block)] = block
        return out

    def mean_pattern(self) -> np.ndarray:
        """(ky, kx) float64 mean over all patterns, in one bounded pass."""
        return mean_of_blocks((block for _, block in self.blocks()), self.n_patterns)


class ArrayPatterns(PatternStore):
    """Patterns already in memory (data preprocessed without a run directory: tests, benchmarks)."""

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array, dtype=np.float32)
        self.shape = tuple(self.array.shape)

    def _read_range(self, start: int, stop: int, out: np.ndarray) -> None:
        out[...] = self.array[start:stop]

    def load(self) -> np.ndarray:
        return self.array


class FilePatterns(PatternStore):
    """The patterns dataset of preprocessed.h5, opened on first read and kept open.

    Uncompressed patterns (one chunk each, as preprocessing writes them) are read with os.preadv
    at the chunks' file offsets, listed once when the file is opened: h5py holds the GIL through
    a read, so a prefetching thread reading through it stalls the compute thread's Python, and
    one h5py call per chunk costs about ten times a preadv. Compressed chunks go through h5py.

    A read that fails, or a file whose size or modification time changed since it was opened
    (rewritten or truncated under a running reconstruction), is a DataError naming the file and
    the first pattern index of the read."""

    def __init__(self, path: str | Path, key: str = PATTERNS_KEY):
        self.path = Path(path)
        self.key = key
        with h5py.File(self.path, "r") as f:
            self.shape = tuple(f[key].shape)
        self._reset()

    def _reset(self) -> None:
        self._file: Optional[h5py.File] = None
        self._dataset = None
        self._stat: Optional[tuple[int, int]] = None
        self._fd: Optional[int] = None
        self._offsets: Optional[np.ndarray] = None  # (N,) file offset of each pattern's bytes

    def _stat_now(self) -> tuple[int, int]:
        st = os.stat(self.path)
        return st.st_size, st.st_mtime_ns

    def _open(self):
        if self._dataset is None:
            self._stat = self._stat_now()
            self._file = h5py.File(self.path, "r")
            self._dataset = self._file[self.key]
            self._offsets = _raw_offsets(self._dataset)
            if self._offsets is not None:
                self._fd = os.open(self.path, os.O_RDONLY)
        return self._dataset

    def _before_read(self, first: int) -> None:
        self._open()
        try:
            changed = self._stat_now() != self._stat
        except OSError:
            changed = True
        if changed:
            raise DataError(f"{self.path}: the file changed (rewritten, truncated or removed) while patterns "
                            f"were being read from it; pattern {first} was not read")

    def _read_range(self, start: int, stop: int, out: np.ndarray) -> None:
        if self._offsets is not None:
            return self._read_sorted(np.arange(start, stop), out)
        try:
            self._dataset.read_direct(out, source_sel=np.s_[start:stop])
        except (OSError, ValueError, RuntimeError) as exc:
            raise DataError(f"{self.path}:{self.key}: cannot read patterns {start}..{stop - 1} ({exc})") from None

    def _read_sorted(self, unique: np.ndarray, out: np.ndarray) -> None:
        if self._offsets is None:
            return super()._read_sorted(unique, out)
        offsets = self._offsets[unique]
        pattern_bytes = out[0].nbytes
        breaks = np.flatnonzero(np.diff(offsets) != pattern_bytes) + 1  # one read per span in file order
        for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), len(offsets)]):
            try:
                if os.preadv(self._fd, [out[a:b]], int(offsets[a])) != (b - a) * pattern_bytes:
                    raise OSError("the file ends early")
            except OSError as exc:
                raise DataError(f"{self.path}:{self.key}: cannot read patterns {unique[a]}..{unique[b - 1]} "
                                f"({exc})") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._fd is not None:
            os.close(self._fd)
        self._reset()

    def __getstate__(self):  # a store passed to another process reopens the file there
        return {"path": self.path, "key": self.key, "shape": self.shape}

    def __setstate__(self, state):
        self.path, self.key, self.shape = state["path"], state["key"], state["shape"]
        self._reset()


def _raw_offsets(dataset) -> Optional[np.ndarray]:
    """File offsets (N,) of each pattern's bytes when the dataset stores plain little-endian
    float32 one pattern per chunk (or contiguously), every chunk written; else None."""
    if dataset.dtype != np.dtype("<f4") or dataset.id.get_create_plist().get_nfilters() != 0:
        return None
    n, pattern_bytes = dataset.shape[0], int(np.prod(dataset.shape[1:])) * 4
    if dataset.chunks is None:
        start = dataset.id.get_offset()
        return None if start is None else start + np.arange(n, dtype=np.int64) * pattern_bytes
    if tuple(dataset.chunks) != (1, *dataset.shape[1:]) or not hasattr(dataset.id, "chunk_iter"):
        return None
    offsets = np.full(n, -1, dtype=np.int64)

    def visit(info):
        offsets[info.chunk_offset[0]] = info.byte_offset

    try:
        dataset.id.chunk_iter(visit)
    except (OSError, RuntimeError):  # an HDF5 library without H5Dchunk_iter
        return None
    return None if (offsets < 0).any() else offsets
