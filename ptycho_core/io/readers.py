"""Data readers: measured patterns and scan positions from the files microscopists have.

One interface for every format: ``open_patterns(data)`` returns a ``PatternSource`` that knows
the layout ((N, ky, kx) or (scan_y, scan_x, ky, kx)) and reads blocks of patterns on demand, so
a multi-GB dataset is not loaded whole. Formats: HDF5 (CXI 1.6 included), NumPy .npy
(memory-mapped), MATLAB .mat (v7.3 through h5py, in blocks; v5 through scipy, which reads a
variable whole: one larger than half the memory available is refused), TIFF stacks (tifffile;
memory-mapped, or a page at a time when compressed), zarr arrays, EMPAD .raw, Dectris (Arina, Eiger, Quadro) master files with their linked data files, EMD 1.0
datacubes (py4DSTEM's included), Thermo Fisher Velox .emd image stacks, and, through
RosettaSciIO, Quantum Detectors Merlin .mib and Gatan .dm3/.dm4 files. HDF5
datasets compressed with the filters detectors use (bitshuffle-LZ4, LZ4, Blosc, Zstd) are decoded
through hdf5plugin. Every problem is a ``DataError`` whose message names the file, the key and
what was expected.

``file_calibration(data)`` returns what a file states about the experiment (beam energy, dk,
bad pixels, the scan grid), for formats that carry it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import h5py
import numpy as np

try:  # registers the HDF5 compression filters detectors write (bitshuffle-LZ4 for Dectris)
    import hdf5plugin  # noqa: F401
except ImportError:  # reading such files then ends in a DataError that says what to install
    hdf5plugin = None


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


EXTENSIONS = {
    ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".nxs": "hdf5", ".emd": "hdf5", ".cxi": "cxi",
    ".npy": "npy", ".mat": "mat", ".tif": "tiff", ".tiff": "tiff", ".zarr": "zarr", ".raw": "empad",
    ".mib": "mib", ".dm4": "dm", ".dm3": "dm",
}
CXI_DATA = "/entry_1/data_1/data"
CXI_TRANSLATION = "/entry_1/sample_1/geometry_1/translation"
EMPAD_FRAME = (130, 128)  # rows, columns of one EMPAD frame; the last two rows are metadata
EMPAD_DETECTOR = (128, 128)
_MAX_ELEMENTS = 1 << 36  # refuse absurd declared sizes before allocating anything
DECTRIS_DATA = "/entry/data"
DECTRIS_DETECTOR = "/entry/instrument/detector"
DECTRIS_WAVELENGTH = "/entry/instrument/beam/incident_wavelength"
FORMATS = ("hdf5", "cxi", "npy", "mat", "tiff", "zarr", "empad", "dectris", "mib", "emd", "dm", "velox")


def check_data_path(data) -> None:
    """Fail early, before a run directory is touched, when the data file is missing."""
    if not Path(data.path).exists():
        raise DataError(f"{data.path}: data file not found (data.path)")


def data_format(data) -> str:
    """data.format, or for auto the format told by the extension and, for HDF5, by the layout (a
    Dectris master file)."""
    if data.format != "auto":
        return data.format
    suffix = Path(data.path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(
            f"{data.path}: cannot tell the format from the extension '{suffix}'; set data.format "
            f"(one of {', '.join(FORMATS)})"
        )
    fmt = EXTENSIONS[suffix]
    if fmt == "hdf5" and Path(data.path).is_file() and _is_hdf5(Path(data.path)):
        with _open_hdf5(Path(data.path)) as f:
            if _dectris_links(f):
                return "dectris"
            if _velox_version(f) is not None:
                return "velox"
            if _emd_groups(f):
                return "emd"
    return fmt


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


class _AxesReversed:
    """A MATLAB v7.3 dataset seen with MATLAB's axis order, read lazily: blocks along the first
    (MATLAB) axis are slices along the last HDF5 axis, transposed after reading."""

    def __init__(self, dataset):
        self.dataset = dataset

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.dataset.shape))

    def __getitem__(self, item):
        if not isinstance(item, slice):
            raise TypeError("MATLAB v7.3 patterns are read in blocks of the first axis")
        return np.asarray(self.dataset[..., item]).transpose()


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


def _check_layout(path: Path, key: str, shape: tuple[int, ...]) -> None:
    if len(shape) not in (3, 4):
        raise DataError(f"{path}:{key}: has shape {tuple(shape)}; expected (N, ky, kx) or (scan_y, scan_x, ky, kx)")
    if int(np.prod(shape, dtype=np.float64)) > _MAX_ELEMENTS:
        raise DataError(f"{path}:{key}: declared shape {tuple(shape)} is implausibly large; refusing to read it")


# --------------------------------------------------------------------------- HDF5 family
def _open_hdf5(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(f"{path}: data file not found (data.path)")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise DataError(f"{path}: not an HDF5 file (its content does not match the extension)") from None


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append("/" + name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _dataset(f: h5py.File, path: Path, key: str) -> h5py.Dataset:
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise DataError(f"{path}: no dataset '{key}'; datasets in the file: {', '.join(_datasets(f)) or 'none'}")
    return f[key]


def _hdf5_source(path: Path, key: str) -> PatternSource:
    f = _open_hdf5(path)
    try:
        ds = _dataset(f, path, key)
        _check_layout(path, key, ds.shape)
    except DataError:
        f.close()
        raise
    return PatternSource(path, key, ds, f.close)


# --------------------------------------------------------------------------- Dectris
def _dectris_links(f: h5py.File) -> list[str]:
    """The data_NNNNNN entries of a Dectris master file, in order; [] when ``f`` is not one."""
    if DECTRIS_DETECTOR not in f or not isinstance(f.get(DECTRIS_DATA), h5py.Group):
        return []
    return sorted(k for k in f[DECTRIS_DATA].keys() if re.fullmatch(r"data_\d{6}", k))


class _Frames:
    """The data_NNNNNN datasets of a Dectris master file (each (n_i, ky, kx), usually in its own
    linked file) seen as one (N, ky, kx) array, read in slices of the first axis."""

    def __init__(self, datasets: list):
        self.datasets = datasets
        self.starts = np.cumsum([0] + [len(d) for d in datasets])
        self.shape = (int(self.starts[-1]), *datasets[0].shape[1:])

    def __getitem__(self, item):
        if not isinstance(item, slice):
            raise TypeError("Dectris frames are read in blocks of the first axis")
        start, stop, _ = item.indices(self.shape[0])
        pieces = [d[max(start, s0) - s0:min(stop, s0 + len(d)) - s0]
                  for d, s0 in zip(self.datasets, self.starts[:-1]) if max(start, s0) < min(stop, s0 + len(d))]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _dectris_source(path: Path) -> PatternSource:
    f = _open_hdf5(path)
    try:
        names = _dectris_links(f)
        if not names:
            raise DataError(f"{path}: not a Dectris master file (no {DECTRIS_DATA}/data_NNNNNN entries under an "
                            f"{DECTRIS_DETECTOR} group)")
        datasets = []
        for name in names:
            link = f[DECTRIS_DATA].get(name, getlink=True)
            try:
                datasets.append(f[DECTRIS_DATA][name])
            except KeyError:
                target = f"{link.filename}:{link.path}" if isinstance(link, h5py.ExternalLink) else name
                raise DataError(f"{path}: {DECTRIS_DATA}/{name} links to {target}, which cannot be opened (keep the "
                                "data files next to the master file)") from None
        shapes = {tuple(d.shape[1:]) for d in datasets}
        if any(d.ndim != 3 for d in datasets) or len(shapes) != 1:
            raise DataError(f"{path}: the data_NNNNNN datasets should all be (frames, ky, kx) of one detector size; "
                            f"found {[tuple(d.shape) for d in datasets]}")
        frames = _Frames(datasets)
        _check_layout(path, DECTRIS_DATA, frames.shape)
    except DataError:
        f.close()
        raise
    return PatternSource(path, DECTRIS_DATA, frames, f.close)


# --------------------------------------------------------------------------- Quantum Detectors Merlin
def _rsciio(path: Path, module: str, what: str):
    try:
        return __import__(f"rsciio.{module}", fromlist=["file_reader"]).file_reader
    except ImportError:
        raise DataError(f"{path}: reading {what} needs RosettaSciIO "
                        "(pip install 'ptyflow[formats]', or pip install rosettasciio)") from None


def _mib_source(path: Path, data) -> PatternSource:
    """A Merlin .mib file (with its .hdr beside it when there is one), read lazily through
    RosettaSciIO: frames are memory-mapped past their headers and read a block at a time."""
    file_reader = _rsciio(path, "quantumdetector", "Quantum Detectors .mib files")
    with open(path, "rb") as fh:
        head = fh.read(384)
    fields = head.decode("ascii", errors="replace").split(",")
    if not head.startswith(b"MQ1,") or len(fields) < 8:
        raise DataError(f"{path}: not a Merlin .mib file (a frame header starts with 'MQ1,')")
    try:
        header_bytes, width, height = int(fields[2]), int(fields[4]), int(fields[5])
        depth = {"U08": 1, "U16": 2, "U32": 4}[fields[6]]
    except (ValueError, KeyError):
        raise DataError(f"{path}: unsupported Merlin frame header ({','.join(fields[:8])}): expected the "
                        "header size, width, height and U08/U16/U32 counts") from None
    frame_bytes = header_bytes + width * height * depth
    size = path.stat().st_size
    if size % frame_bytes:
        raise DataError(f"{path}: {size} bytes is not a whole number of {width}x{height} {fields[6]} frames of "
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
    _check_layout(path, "(frames)", tuple(frames.shape))
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


# --------------------------------------------------------------------------- Gatan DigitalMicrograph
def _dm_image(path: Path, key: Optional[str]) -> dict:
    """The 3D/4D image of a .dm3/.dm4 file as RosettaSciIO reads it lazily (its tag tree parsed,
    the pixels memory-mapped): the one such image, or the one whose name data.meas_key gives."""
    file_reader = _rsciio(path, "digitalmicrograph", "Gatan .dm3/.dm4 files")
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


def _dm_source(path: Path, key: Optional[str]) -> PatternSource:
    cube = _dm_image(path, key)
    title = cube["metadata"].get("General", {}).get("title", "") or "(image)"
    _check_layout(path, title, tuple(cube["data"].shape))
    return PatternSource(path, title, cube["data"])


def _dm_calibration(path: Path, key: Optional[str]) -> dict:
    """Beam energy (Microscope Info.Voltage), and from the image's axis calibrations the scan
    step and shape (a 4D image's first two axes, in lengths) and the detector's pixel size (mrad,
    or an inverse length: dk_inv_ang). DigiScan's rotation is the scan coils' setting, not the
    scan's angle to the detector, so it is not used."""
    cube = _dm_image(path, key)
    found: dict = {}
    tags = cube["original_metadata"].get("ImageList", {}).get("TagGroup0", {}).get("ImageTags", {})
    voltage = tags.get("Microscope Info", {}).get("Voltage") if isinstance(tags, dict) else None
    if isinstance(voltage, (int, float)) and voltage > 0:
        found["energy_kev"] = float(voltage) / 1e3
    axes = [(float(a["scale"]), str(a["units"])) for a in cube["axes"]]
    scan_shape = [a["size"] for a in cube["axes"][:2]]
    found.update(_axes_calibration(axes[:2] if len(axes) == 4 else None, scan_shape, axes[-1]))
    return found


# --------------------------------------------------------------------------- Thermo Fisher Velox
VELOX_IMAGES = "/Data/Image"


def _velox_version(f: h5py.File) -> Optional[str]:
    """The Velox file version (from its Version dataset's JSON), or None for other files."""
    if not isinstance(f.get("Version"), h5py.Dataset) or not isinstance(f.get(VELOX_IMAGES), h5py.Group):
        return None
    try:
        stated = json.loads(bytes(np.asarray(f["Version"][()]).reshape(-1)[0]).decode().rstrip("\x00"))
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    return str(stated.get("version")) if stated.get("format") in ("Velox", "DevelopersKit") else None


def _velox_metadata(group: h5py.Group) -> dict:
    """The JSON metadata Velox stores with an image, as bytes in column 0 of its Metadata."""
    try:
        raw = np.asarray(group["Metadata"][:, 0]).tobytes()
        return json.loads(raw.decode("utf-8").rstrip("\x00"))
    except (KeyError, ValueError, UnicodeDecodeError):
        return {}


class _VeloxFrames:
    """A Velox image stack, stored (ky, kx, frames) with one frame per chunk, seen as
    (frames, ky, kx); a block is read frame by frame, which for such chunks is one chunk read each
    (a strided read of several frames is scattered element by element and is slow)."""

    def __init__(self, dataset: h5py.Dataset):
        self.dataset = dataset
        self.shape = (dataset.shape[2], dataset.shape[0], dataset.shape[1])
        self.dtype = dataset.dtype

    def __getitem__(self, item):
        if not isinstance(item, slice):
            raise TypeError("Velox frames are read in blocks of the first axis")
        frames = range(*item.indices(self.shape[0]))
        out = np.empty((len(frames), *self.shape[1:]), self.dtype)
        for i, frame in enumerate(frames):
            self.dataset.read_direct(out, np.s_[:, :, frame], np.s_[i])
        return out


def _velox_stack(f: h5py.File, path: Path, key: Optional[str]) -> h5py.Group:
    """The image group holding the diffraction frames: the one stack of several frames, or the one
    data.meas_key names (its id under /Data/Image)."""
    images, groups = f[VELOX_IMAGES], {}
    for name in images:  # by name: h5py's items() holds its global lock between yields (see checkpoint.py)
        g = images[name]
        if isinstance(g, h5py.Group) and isinstance(g.get("Data"), h5py.Dataset) and g["Data"].ndim == 3:
            groups[name] = g
    stacks = [name for name, g in groups.items() if g["Data"].shape[2] > 1]
    if key is not None:
        name = key.strip("/").rsplit("/", 2)[-2 if key.rstrip("/").endswith("Data") else -1]
        if name not in groups:
            raise DataError(f"{path}: no Velox image '{key}'; image stacks in the file: {', '.join(stacks) or 'none'}")
        return groups[name]
    if len(stacks) != 1:
        raise DataError(f"{path}: set data.meas_key to the Velox image stack of diffraction frames; stacks in "
                        f"the file: {', '.join(stacks) or 'none'}")
    return groups[stacks[0]]


def _velox_source(path: Path, data) -> PatternSource:
    f = _open_hdf5(path)
    try:
        if _velox_version(f) is None:
            raise DataError(f"{path}: not a Velox file (no Version JSON naming Velox, or no {VELOX_IMAGES} group)")
        group = _velox_stack(f, path, data.meas_key)
        frames = _VeloxFrames(group["Data"])
        scan = data.scan_shape or _velox_scan_shape(_velox_metadata(group), frames.shape[0])
        array: Any = frames
        if scan is not None:
            if scan[0] * scan[1] != frames.shape[0]:
                raise DataError(f"{path}: holds {frames.shape[0]} frames but data.scan_shape {list(scan)} needs "
                                f"{scan[0] * scan[1]}")
            array = _ScanGrid(frames, tuple(scan))
        _check_layout(path, group["Data"].name, array.shape)
    except DataError:
        f.close()
        raise
    return PatternSource(path, group["Data"].name, array, f.close)


class _ScanGrid:
    """A flat (N, ky, kx) array seen as (scan_y, scan_x, ky, kx), read in blocks of scan rows."""

    def __init__(self, flat, scan: tuple[int, int]):
        self.flat, self.scan = flat, scan
        self.shape = (*scan, *flat.shape[1:])
        self.dtype = getattr(flat, "dtype", None)

    def __getitem__(self, item):
        start, stop, _ = item.indices(self.scan[0])
        return self.flat[start * self.scan[1]:stop * self.scan[1]].reshape(stop - start, *self.shape[1:])


def _velox_scan_shape(metadata: dict, n_frames: int) -> Optional[tuple[int, int]]:
    size = metadata.get("Scan", {}).get("ScanSize", {}) if isinstance(metadata.get("Scan"), dict) else {}
    try:
        shape = (int(size["height"]), int(size["width"]))
    except (KeyError, TypeError, ValueError):
        return None
    return shape if shape[0] * shape[1] == n_frames else None


def _velox_calibration(path: Path, key: Optional[str]) -> dict:
    """Beam energy (Optics.AccelerationVoltage, V), the frames' pixel size when it is an inverse
    length (BinaryResult.PixelSize in PixelUnitX: dk_inv_ang) and the scan shape (Scan.ScanSize,
    when it accounts for every frame). Velox's ScanRotation is the scan coils' setting, not the
    scan's angle to the camera, so it is not used."""
    with _open_hdf5(path) as f:
        group = _velox_stack(f, path, key)
        metadata = _velox_metadata(group)
        n_frames = group["Data"].shape[2]
    found: dict = {}
    try:
        found["energy_kev"] = float(metadata["Optics"]["AccelerationVoltage"]) / 1e3
    except (KeyError, TypeError, ValueError):
        pass
    result = metadata.get("BinaryResult", {})
    try:
        width = float(result["PixelSize"]["width"])
    except (KeyError, TypeError, ValueError):
        width = 0.0
    found.update(_axes_calibration(None, None, (width, str(result.get("PixelUnitX", "")))))
    scan = _velox_scan_shape(metadata, n_frames)
    if scan is not None:
        found["scan_shape"] = list(scan)
    return found


# --------------------------------------------------------------------------- EMD 1.0
def _emd_groups(f: h5py.File) -> list[str]:
    """Datacube groups of an EMD 1.0 file whose ``data`` is 3D or 4D: groups of emd_group_type 1
    (the Berkeley layout), or 'array' (py4DSTEM's, written through emdfile)."""
    if "version_major" not in f.attrs:
        return []
    found: list[str] = []

    def visit(name, obj):
        kind = obj.attrs.get("emd_group_type", 0) if isinstance(obj, h5py.Group) else 0
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if isinstance(kind, str):
            is_cube = kind == "array"
        else:
            kind = np.asarray(kind).reshape(-1)
            is_cube = kind.dtype.kind in "iu" and kind.size > 0 and kind[0] == 1
        if is_cube and isinstance(obj.get("data"), h5py.Dataset) and obj["data"].ndim in (3, 4):
            found.append("/" + name)

    f.visititems(visit)
    return found


def _emd_data_key(f: h5py.File, path: Path, key: Optional[str]) -> str:
    """The data dataset of the EMD group data.meas_key names (the group or its data), or of the
    file's only datacube."""
    groups = _emd_groups(f)
    if key is not None:
        group = key[:-len("/data")] if key.endswith("/data") else key
        group = "/" + group.strip("/")
        if group not in groups:
            raise DataError(f"{path}: no EMD datacube '{key}'; datacubes in the file: {', '.join(groups) or 'none'}")
        return group + "/data"
    if len(groups) != 1:
        raise DataError(f"{path}: set data.meas_key to one of the EMD datacubes: {', '.join(groups) or 'none'}")
    return groups[0] + "/data"


_INVERSE_LENGTH_PER_ANG = {"1/A": 1.0, "A^-1": 1.0, "1/Å": 1.0, "Å^-1": 1.0, "1/angstrom": 1.0, "1/nm": 0.1,
                           "nm^-1": 0.1, "1/m": 1e-10}


def _axes_calibration(scan_axes: Optional[list[tuple]], scan_shape, detector_axis: tuple) -> dict:
    """What axis calibrations say, each axis as (step, unit) with step None or 0 when unknown:
    ``scan`` ({shape, step_ang}) when the two scan axes (None: no scan grid) are equal lengths,
    and ``dk_mrad`` or ``dk_inv_ang`` (an inverse length per pixel, which needs the beam energy)
    from the detector axis. Shared by the formats that calibrate their axes (EMD, DM, Velox)."""
    found: dict = {}
    if scan_axes and all(unit in _LENGTH_M and step for step, unit in scan_axes):
        ys, xs = (abs(step) * _LENGTH_M[unit] * 1e10 for step, unit in scan_axes)
        if abs(ys - xs) <= 1e-6 * ys:
            found["scan"] = {"shape": [int(n) for n in scan_shape], "step_ang": ys}
    step, unit = detector_axis
    if step and unit == "mrad":
        found["dk_mrad"] = abs(step)
    elif step and unit in _INVERSE_LENGTH_PER_ANG:
        found["dk_inv_ang"] = abs(step) * _INVERSE_LENGTH_PER_ANG[unit]
    return found


def _emd_calibration(f: h5py.File, key: str) -> dict:
    """Scan step and shape, and the detector's pixel size, from the dim vectors of an EMD 1.0
    datacube: the first two along the scan (lengths), the last two along the detector (mrad, or an
    inverse length that needs the beam energy: dk_inv_ang). The Berkeley layout numbers the dim
    vectors from 1, emdfile (py4DSTEM) from 0. A py4DSTEM calibration next to the datacube adds
    the scan rotation (QR_rotation_degrees) and whether the patterns are transposed (QR_flip)."""
    group = f[key.rsplit("/", 1)[0]]
    ndim = group["data"].ndim
    first = 0 if "dim0" in group else 1

    def step(i):
        dim = group.get(f"dim{i + first}")
        if not isinstance(dim, h5py.Dataset) or dim.size < 2:
            return None, ""
        unit = dim.attrs.get("units", "")
        unit = unit.decode() if isinstance(unit, bytes) else str(unit)
        values = np.asarray(dim[()], dtype=np.float64).reshape(-1)
        return float(values[1] - values[0]), unit

    found = _axes_calibration([step(0), step(1)] if ndim == 4 else None, group["data"].shape[:2], step(ndim - 1))
    calibration = group.parent.get("metadatabundle/calibration")
    if isinstance(calibration, h5py.Group):
        rotation = calibration.get("QR_rotation_degrees")
        # py4DSTEM: the counter-clockwise rotation of real space relative to diffraction space,
        # the same sense as experiment.scan.rotation_deg (scan vectors turned into detector axes)
        if isinstance(rotation, h5py.Dataset) and "scan" in found:
            found["scan"]["rotation_deg"] = float(np.asarray(rotation[()]).reshape(-1)[0])
        flip = calibration.get("QR_flip")
        if isinstance(flip, h5py.Dataset) and bool(np.asarray(flip[()]).reshape(-1)[0]):
            found["transposed"] = True
    return found


_LENGTH_M = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "micron": 1e-6, "nm": 1e-9, "angstrom": 1e-10, "A": 1e-10,
             "Å": 1e-10}


def _length_m(dataset, default_unit: str) -> float:
    unit = dataset.attrs.get("units", default_unit)
    unit = unit.decode() if isinstance(unit, bytes) else str(unit)
    if unit not in _LENGTH_M:
        raise DataError(f"{dataset.file.filename}:{dataset.name}: unit '{unit}' is not a length ptyflow knows "
                        f"({', '.join(_LENGTH_M)})")
    return float(np.asarray(dataset[()]).reshape(-1)[0]) * _LENGTH_M[unit]


def file_calibration(data) -> dict:
    """What the data file states about the experiment, for the formats that carry it; {} for the
    others. Dectris master files: ``energy_kev`` (from the wavelength), ``dk_mrad`` (pixel size
    over the camera length), ``bad_pixels`` [(ky, kx)] (the detector's pixel mask) and
    ``detector_shape``. EMD 1.0 datacubes: ``scan`` ({shape, step_ang}, and rotation_deg from a
    py4DSTEM calibration), ``dk_mrad`` or ``dk_inv_ang`` (an inverse length per pixel, which the
    beam energy turns into mrad) and ``transposed`` (py4DSTEM's QR_flip)."""
    path = Path(data.path)
    fmt = data_format(data) if path.exists() else None
    if fmt == "emd":
        with _open_hdf5(path) as f:
            return _emd_calibration(f, _emd_data_key(f, path, getattr(data, "meas_key", None)))
    if fmt == "dm":
        return _dm_calibration(path, getattr(data, "meas_key", None))
    if fmt == "velox":
        return _velox_calibration(path, getattr(data, "meas_key", None))
    if fmt != "dectris":
        return {}
    from ..physics import energy_kev_from_wavelength

    found: dict = {}
    with _open_hdf5(path) as f:
        det = f[DECTRIS_DETECTOR]
        if DECTRIS_WAVELENGTH in f:
            found["energy_kev"] = energy_kev_from_wavelength(_length_m(f[DECTRIS_WAVELENGTH], "angstrom") * 1e10)
        if "x_pixel_size" in det and "detector_distance" in det:
            pixel_m, distance_m = _length_m(det["x_pixel_size"], "m"), _length_m(det["detector_distance"], "m")
            if distance_m > 0:
                found["dk_mrad"] = float(np.arctan(pixel_m / distance_m) * 1e3)
        mask_key = "detectorSpecific/pixel_mask"
        if mask_key in det:
            mask = np.asarray(det[mask_key][()])
            found["bad_pixels"] = [tuple(int(v) for v in yx) for yx in np.argwhere(mask != 0)]
            found["detector_shape"] = [int(v) for v in mask.shape]
    return found


def _only_pattern_dataset(path: Path) -> str:
    """With no data.meas_key: the file's one 3D/4D dataset, or an error listing the candidates."""
    with _open_hdf5(path) as f:
        candidates = [n for n in _datasets(f) if f[n].ndim in (3, 4)]
    if len(candidates) != 1:
        raise DataError(
            f"{path}: set data.meas_key to the dataset of patterns; 3D/4D datasets in the file: "
            f"{', '.join(candidates) or 'none'}"
        )
    return candidates[0]


# numpy types of the MATLAB classes a v5 file's patterns can have (scipy's whosmat names them)
MATLAB_NUMERIC = {"double": np.float64, "single": np.float32, "int8": np.int8, "uint8": np.uint8, "int16": np.int16,
                  "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32, "int64": np.int64, "uint64": np.uint64}
MATLAB_V5_MEMORY_FRACTION = 0.5  # of the memory available that one v5 variable, read whole, may take


class _MatV5Variable:
    """A numeric variable of a MATLAB v5 file. v5 variables can be compressed and are not laid out
    for reading in blocks, so scipy reads the variable whole, at the first block asked for (shape
    and type come from its header, read without its data). One that would take more than
    MATLAB_V5_MEMORY_FRACTION of the memory available is refused before it is read."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], matlab_class: str):
        if matlab_class not in MATLAB_NUMERIC:
            raise DataError(f"{path}: variable '{name}' is a MATLAB {matlab_class}, not a numeric array")
        self.path, self.name, self.shape = path, name, tuple(int(n) for n in shape)
        self.dtype = np.dtype(MATLAB_NUMERIC[matlab_class])
        self._array: Optional[np.ndarray] = None

    def __getitem__(self, item):
        if self._array is None:
            nbytes = int(np.prod(self.shape, dtype=np.float64)) * self.dtype.itemsize
            available = host_available_bytes()
            if nbytes > MATLAB_V5_MEMORY_FRACTION * available:
                raise DataError(
                    f"{self.path}: variable '{self.name}' {self.shape} {self.dtype} is {nbytes / 1e9:.3g} GB; a MATLAB "
                    f"v5 file is read whole, and this machine has {available / 1e9:.3g} GB of memory available. Save "
                    f"it as MATLAB v7.3 (save -v7.3: an HDF5 file, read in blocks) or as .npy or HDF5"
                )
            self._array = np.asarray(_mat_v5(self.path, variable_names=[self.name])[self.name])
        return self._array[item]


def _mat_v5(path: Path, **options) -> dict:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError(f"{path}: reading MATLAB v5 files needs scipy (pip install scipy)") from None
    try:
        return loadmat(path, **options)
    except Exception as exc:
        raise DataError(f"{path}: not a readable MATLAB file ({exc})") from None


def _mat_v5_variables(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, MATLAB class)} of a v5 file's variables, from their headers alone."""
    try:
        from scipy.io import whosmat
    except ImportError:
        raise DataError(f"{path}: reading MATLAB v5 files needs scipy (pip install scipy)") from None
    try:
        return {name: (tuple(shape), matlab_class) for name, shape, matlab_class in whosmat(path)}
    except Exception as exc:
        raise DataError(f"{path}: not a readable MATLAB file ({exc})") from None


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(512 + 8)
    return b"\x89HDF\r\n\x1a\n" in head


def _matlab_key(key: str) -> str:
    return key.lstrip("/")


def open_patterns(data) -> PatternSource:
    """The configured patterns as a PatternSource (call ``.close()`` when done)."""
    path = Path(data.path)
    fmt = data_format(data)
    if not path.exists():
        raise DataError(f"{path}: data file not found (data.path)")
    key = data.meas_key
    if fmt == "hdf5":
        return _hdf5_source(path, key or _only_pattern_dataset(path))
    if fmt == "cxi":
        return _hdf5_source(path, key or CXI_DATA)
    if fmt == "npy":
        with open(path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise DataError(f"{path}: not a .npy file (no NumPy header; its content does not match the extension)")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise DataError(f"{path}: not a plain numeric .npy array ({exc})") from None
        except OSError as exc:
            raise DataError(f"{path}: not a .npy file ({exc})") from None
        _check_layout(path, "(array)", array.shape)
        return PatternSource(path, "(array)", array)
    if fmt == "mat":
        if _is_hdf5(path):  # v7.3 files are HDF5; MATLAB writes arrays with reversed axes
            source = _hdf5_source(path, "/" + _matlab_key(key or "meas"))
            return PatternSource(path, source.key, _AxesReversed(source.array), source.close)
        variables = _mat_v5_variables(path)
        name = _matlab_key(key or "meas")
        if name not in variables:
            raise DataError(f"{path}: no variable '{name}'; variables in the file: {', '.join(variables) or 'none'}")
        array = _MatV5Variable(path, name, *variables[name])
        _check_layout(path, name, array.shape)
        return PatternSource(path, name, array)
    if fmt == "tiff":
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
            _check_layout(path, "(stack)", array.shape)
        except DataError:
            close()
            raise
        return PatternSource(path, "(stack)", array, close)
    if fmt == "zarr":
        import zarr

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
        _check_layout(path, key or "(array)", node.shape)
        return PatternSource(path, key or "(array)", node)
    if fmt == "empad":
        return _empad_source(path, data)
    if fmt == "dectris":
        return _dectris_source(path)
    if fmt == "mib":
        return _mib_source(path, data)
    if fmt == "emd":
        with _open_hdf5(path) as f:
            key = _emd_data_key(f, path, key)
        return _hdf5_source(path, key)
    if fmt == "dm":
        return _dm_source(path, key)
    if fmt == "velox":
        return _velox_source(path, data)
    raise DataError(f"data.format: unknown format '{fmt}'")


def _empad_source(path: Path, data) -> PatternSource:
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


# --------------------------------------------------------------------------- what a file holds
def describe_data(data) -> dict:
    """What a data file holds, without reading its patterns: format, key, shapes, dtype, storage
    (chunks and compression for HDF5) and the calibration it states (file_calibration)."""
    fmt = data_format(data)
    source = open_patterns(data)
    try:
        report = {"path": str(source.path), "format": fmt, "key": source.key, "shape": list(source.shape),
                  "n_patterns": source.n_patterns, "detector_shape": list(source.detector_shape),
                  "scan_shape": list(source.scan_shape) if source.scan_shape else None,
                  "dtype": str(getattr(source.array, "dtype", "float32"))}
        datasets = source.array.datasets if isinstance(source.array, _Frames) else [source.array]
        if all(isinstance(d, h5py.Dataset) for d in datasets):
            report["dtype"] = str(datasets[0].dtype)
            report["chunks"] = list(datasets[0].chunks) if datasets[0].chunks else None
            plist = datasets[0].id.get_create_plist()
            report["filters"] = [plist.get_filter(i)[3].decode(errors="replace") or str(plist.get_filter(i)[0])
                                 for i in range(plist.get_nfilters())]
            if isinstance(source.array, _Frames):
                report["data_files"] = [d.file.filename for d in datasets]
    finally:
        source.close()
    calibration = file_calibration(data)
    if "bad_pixels" in calibration:
        calibration["bad_pixels"] = len(calibration["bad_pixels"])  # a count here; the list goes into the config
    report["calibration"] = calibration
    return report


# --------------------------------------------------------------------------- positions
def read_positions(data, n_patterns: int) -> np.ndarray:
    """Positions (N, 2) as (y, x) in data.pos_unit from data.pos_path (or the data file) at
    data.pos_key; for CXI files without pos_key, the sample translations (metres) in Å."""
    fmt = data_format(data)
    path = Path(data.pos_path or data.path)
    key = data.pos_key
    if fmt == "cxi" and key is None and data.pos_path is None:
        with _open_hdf5(path) as f:
            translation = np.asarray(_dataset(f, path, CXI_TRANSLATION)[()], dtype=np.float64)
        if translation.ndim != 2 or translation.shape[1] < 2:
            raise DataError(f"{path}:{CXI_TRANSLATION}: has shape {translation.shape}; expected (N, 3) in metres")
        positions = translation[:, [1, 0]] * 1e10  # CXI stores (x, y, z) in metres
        key = CXI_TRANSLATION
    else:
        positions = _read_array(path, key)
    if positions.ndim == 3 and positions.shape[-1] == 2:
        positions = positions.reshape(-1, 2)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise DataError(f"{path}:{key}: has shape {positions.shape}; expected (N, 2) as (y, x)")
    if len(positions) != n_patterns:
        raise DataError(f"{path}:{key}: holds {len(positions)} positions but the data hold {n_patterns} patterns")
    if not np.isfinite(positions).all():
        raise DataError(f"{path}:{key}: contains NaN or Inf values")
    return positions


def _read_array(path: Path, key: Optional[str]) -> np.ndarray:
    suffix = path.suffix.lower()
    if not path.exists():
        raise DataError(f"{path}: positions file not found (data.pos_path)")
    if suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False).astype(np.float64)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: not a plain numeric .npy array ({exc})") from None
    if suffix in (".txt", ".csv", ".dat"):
        try:
            return np.loadtxt(path, delimiter="," if suffix == ".csv" else None, dtype=np.float64)
        except ValueError as exc:
            raise DataError(f"{path}: not a table of numbers ({exc})") from None
    if suffix == ".mat" and not _is_hdf5(path):
        variables = _mat_v5(path)
        name = _matlab_key(key or "positions")
        if name not in variables:
            raise DataError(f"{path}: no variable '{name}' for the positions")
        return np.asarray(variables[name], dtype=np.float64)
    if key is None:
        raise DataError(f"{path}: set data.pos_key to the dataset holding the positions")
    with _open_hdf5(path) as f:
        array = np.asarray(_dataset(f, path, key)[()], dtype=np.float64)
    return array.T if suffix == ".mat" else array
