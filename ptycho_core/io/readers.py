"""Data readers: measured patterns from the files microscopists have, through one interface.

``open_patterns(data)`` returns a ``PatternSource`` that knows the layout ((N, ky, kx) or
(scan_y, scan_x, ky, kx)) and reads blocks of patterns on demand, so a multi-GB dataset is not
loaded whole. Each format is one module of ``formats/`` registered by name (``FORMATS``); this
module recognises a file's format (``data.format: auto``: the extension, and for HDF5 the layout)
and hands the file to its reader. ``file_calibration(data)`` returns what a file states about the
experiment (beam energy, dk, bad pixels, the scan grid), for formats that carry it, and
``describe_data(data)`` what a file holds without reading its patterns. Every problem is a
``DataError`` whose message names the file, the key and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .formats import EXTENSIONS, FORMATS, READERS, DataError, DataFormat, PatternSource
from .formats.base import host_available_bytes
from .formats.dectris import is_data_file_name, linked_files

__all__ = ["EXTENSIONS", "FORMATS", "DataError", "PatternSource", "check_data_path", "data_format", "data_reader",
           "dataset_files", "describe_data", "file_calibration", "host_available_bytes", "is_part_of_a_dataset",
           "open_patterns"]


def dataset_files(path: Path) -> list[Path]:
    """The files one dataset is made of, as they are now: a file; a folder's files (a zarr store),
    sorted; a Dectris master file and then the data files it links to. What fingerprints the
    input (preprocess.input_fingerprint) and tells a watched inbox that a dataset is complete."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path, *linked_files(path)]


def is_part_of_a_dataset(path: Path) -> bool:
    """Whether ``path`` is a piece of a dataset named by another file rather than one of its own: a
    Dectris data file (<stem>_data_NNNNNN.h5), read through its master file."""
    return is_data_file_name(path)


def check_data_path(data) -> None:
    """Fail early, before a run directory is touched, when the data file is missing."""
    if not Path(data.path).exists():
        raise DataError(f"{data.path}: data file not found (data.path)")


def data_format(data) -> str:
    """data.format, or for auto the format told by the extension and, among the files of that
    format, by the content (a Dectris master file among HDF5 files)."""
    if data.format != "auto":
        return data.format
    path = Path(data.path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(
            f"{data.path}: cannot tell the format from the extension '{suffix}'; set data.format "
            f"(one of {', '.join(FORMATS)})"
        )
    told = EXTENSIONS[suffix]
    return next((fmt.name for fmt in READERS.values() if fmt.among == told and fmt.recognise(path)), told)


def data_reader(data) -> DataFormat:
    """The registered reader of the configured data's format."""
    return _reader(data_format(data))


def _reader(name: str) -> DataFormat:
    if name not in READERS:
        raise DataError(f"data.format: unknown format '{name}'")
    return READERS[name]


def open_patterns(data) -> PatternSource:
    """The configured patterns as a PatternSource (call ``.close()`` when done)."""
    path = Path(data.path)
    name = data_format(data)
    if not path.exists():
        raise DataError(f"{path}: data file not found (data.path)")
    return _reader(name).open(path, data)


def follow_patterns(data) -> Optional[PatternSource]:
    """The configured patterns of a file still being written: the whole frames written so far
    (DataFormat.follow), or None while there is not one yet. A format that cannot be followed is a
    DataError naming those that can."""
    path = Path(data.path)
    if not path.exists():
        raise DataError(f"{path}: data file not found (data.path)")
    name = data_format(data)
    reader = _reader(name)
    if reader.follow is None:
        followed = [fmt.name for fmt in READERS.values() if fmt.follow is not None]
        raise DataError(f"data.format {name}: a file of this format cannot be followed while it is written "
                        f"(live mode reads {', '.join(followed)})")
    return reader.follow(path, data)


def file_calibration(data) -> dict:
    """What the data file states about the experiment, for the formats that carry it; {} for the
    others and for a file not there. Keys: ``energy_kev``; ``dk_mrad``, or ``dk_inv_ang`` (an
    inverse length per pixel, which the beam energy turns into mrad); ``scan`` ({shape, step_ang},
    rotation_deg when stated); ``scan_shape`` (a flat stack's grid); ``bad_pixels`` [(ky, kx)] and
    ``detector_shape`` (a detector's pixel mask); ``transposed`` (py4DSTEM's QR_flip)."""
    path = Path(data.path)
    reader = READERS.get(data_format(data)) if path.exists() else None
    return reader.calibration(path, data) if reader is not None and reader.calibration is not None else {}


def describe_data(data) -> dict:
    """What a data file holds, without reading its patterns: format, key, shapes, dtype, storage
    (chunks and compression for HDF5) and the calibration it states (file_calibration)."""
    reader = data_reader(data)
    source = open_patterns(data)
    try:
        report = {"path": str(source.path), "format": reader.name, "key": source.key, "shape": list(source.shape),
                  "n_patterns": source.n_patterns, "detector_shape": list(source.detector_shape),
                  "scan_shape": list(source.scan_shape) if source.scan_shape else None,
                  "dtype": str(getattr(source.array, "dtype", "float32"))}
        if reader.storage is not None:
            report.update(reader.storage(source))
    finally:
        source.close()
    calibration = file_calibration(data)
    if "bad_pixels" in calibration:
        calibration["bad_pixels"] = len(calibration["bad_pixels"])  # a count here; the list goes into the config
    report["calibration"] = calibration
    return report
