"""result.zarr: the reconstruction in a form other tools open (zarr v3, OME-NGFF 0.5 images).

Layout (all arrays (..., y, x); attributes carry units):
  /                      attrs["ptyflow"]: format, iteration, dx_ang, dz_ang, energy_kev,
                         wavelength_ang, units, config (resolved), versions, timings
  /object_phase          (omode, nz, Ny, Nx) float32, rad
  /object_amplitude      (omode, nz, Ny, Nx) float32
  /probe                 (pmode, ky, kx) complex64, real space, sqrt(counts)
  /positions_ang         (N, 2) probe centres (y, x) in Å as measured
  /positions_px          (N, 2) refined probe centres on the object canvas (px)
  /positions_px_initial  (N, 2) the same before refinement
  /obj_tilts_mrad        (1 or N, 2)
  /loss/<column>         (iterations,) loss history per iteration (loss, loss_<term>,
                                   validation_loss when patterns were held out, seconds)
  /phase_sum             OME-NGFF 0.5 multiscale image (y, x): depth- and mode-0 summed phase
  /phase_slices          OME-NGFF 0.5 multiscale image (z, y, x): mode-0 phase per slice
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ..checkpoint import Checkpoint, StorageError, last_value
from ..faults import pause_point

RESULT_FORMAT = "ptyflow-result"
PYRAMID_LEVELS = 3
VIEWER_CHUNK = 256


def _chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Viewer-friendly chunks: whole leading axes one at a time, 256x256 tiles in (y, x)."""
    return tuple([1] * (len(shape) - 2) + [min(VIEWER_CHUNK, s) for s in shape[-2:]])


def _downsample(image: np.ndarray) -> np.ndarray:
    """Halve the last two axes by 2x2 mean (odd edges dropped)."""
    ny, nx = (image.shape[-2] // 2) * 2, (image.shape[-1] // 2) * 2
    img = image[..., :ny, :nx]
    return img.reshape(*img.shape[:-2], ny // 2, 2, nx // 2, 2).mean(axis=(-3, -1))


def _write_ome_image(root: zarr.Group, name: str, image: np.ndarray, axes: list[str], scale_ang: list[float]) -> None:
    """An OME-NGFF 0.5 multiscale image group with PYRAMID_LEVELS levels of 2x in (y, x)."""
    group = root.create_group(name)
    datasets = []
    level_image = image.astype(np.float32, copy=False)
    scale = list(scale_ang)
    for level in range(PYRAMID_LEVELS):
        if level and min(level_image.shape[-2:]) < 2:
            break
        if level:
            level_image = _downsample(level_image)
            scale = scale[:-2] + [scale[-2] * 2, scale[-1] * 2]
        group.create_array(str(level), data=level_image, chunks=_chunks(level_image.shape),
                           dimension_names=axes)
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]})
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{
            "name": name,
            "axes": [{"name": a, "type": "space", "unit": "angstrom"} for a in axes],
            "datasets": datasets,
            "type": "2x2 mean",
        }],
    }


def _write_result(
    path: Path,
    ckpt: Checkpoint,
    positions_ang: np.ndarray,
    positions_px_initial: np.ndarray,
    energy_kev: float,
    config: dict[str, Any],
    versions: dict[str, str],
    timings: dict[str, float],
) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    t = {k: v.numpy() for k, v in ckpt.tensors.items()}
    window = np.array(t["probe"].shape[-2:])
    positions_px = ckpt.crop_pos.numpy() + t["probe_pos_shifts"] + window // 2
    dz = float(t["slice_thickness"])
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for name, source, unit in (("object_phase", t["objp"], "rad"), ("object_amplitude", t["obja"], "1")):
        # plane by plane: a large object is never copied whole (float64 runs convert per plane)
        arr = root.create_array(name, shape=source.shape, dtype=np.float32, chunks=_chunks(source.shape),
                                dimension_names=["mode", "z", "y", "x"])
        for mode in range(source.shape[0]):
            for z in range(source.shape[1]):
                arr[mode, z] = source[mode, z].astype(np.float32, copy=False)
        arr.attrs["unit"] = unit
    arrays = {
        "probe": (t["probe"].astype(np.complex64), "sqrt(counts)", ["mode", "y", "x"]),
        "positions_ang": (np.asarray(positions_ang, np.float64), "angstrom", ["position", "yx"]),
        "positions_px": (positions_px.astype(np.float64), "px", ["position", "yx"]),
        "positions_px_initial": (np.asarray(positions_px_initial, np.float64), "px", ["position", "yx"]),
        "obj_tilts_mrad": (t["obj_tilts"].astype(np.float64), "mrad", ["position", "yx"]),
    }
    for name, (data, unit, dims) in arrays.items():
        chunks = _chunks(data.shape) if data.ndim >= 3 else data.shape
        arr = root.create_array(name, data=data, chunks=chunks, dimension_names=dims)
        arr.attrs["unit"] = unit
    loss = root.create_group("loss")
    for column, values in ckpt.history.items():
        loss.create_array(column, data=np.asarray(values, np.float64), chunks=(max(1, len(values)),))
    phase0 = t["objp"][0].astype(np.float32, copy=False)
    _write_ome_image(root, "phase_sum", phase0.sum(axis=0), ["y", "x"], [ckpt.dx_ang, ckpt.dx_ang])
    _write_ome_image(root, "phase_slices", phase0, ["z", "y", "x"], [dz, ckpt.dx_ang, ckpt.dx_ang])
    root.attrs["ptyflow"] = {
        "format": RESULT_FORMAT,
        "format_version": 1,
        "iteration": ckpt.iteration,
        "dx_ang": ckpt.dx_ang,
        "dz_ang": dz,
        "energy_kev": energy_kev,
        "wavelength_ang": ckpt.wavelength_ang,
        "units": {"object_phase": "rad", "positions_ang": "angstrom", "positions_px": "px",
                  "obj_tilts_mrad": "mrad", "probe": "sqrt(counts), real space", "dx_ang": "angstrom"},
        "config": config,
        "versions": versions,
        "timings": timings,
        "final_loss": last_value(ckpt.history, "loss"),
        "final_validation_loss": last_value(ckpt.history, "validation_loss"),
    }
    pause_point("export")
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def write_result(path: str | Path, *args, **kwargs) -> Path:
    """Write result.zarr from a checkpoint; the old export is replaced only once the new is whole.
    A write that fails (disk full, permissions) is a StorageError and leaves the old export."""
    path = Path(path)
    try:
        return _write_result(path, *args, **kwargs)
    except OSError as exc:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}; the previous export is intact") from exc


def read_result_summary(path: str | Path) -> dict[str, Any]:
    """The root attributes and array shapes of a result.zarr (for inspect)."""
    root = zarr.open_group(str(path), mode="r")
    meta = dict(root.attrs.get("ptyflow", {}))
    meta.pop("config", None)
    meta["arrays"] = {name: list(arr.shape) for name, arr in root.arrays()}
    return meta
