"""Starting a reconstruction from a previous one: read its object and probe and resample them
onto a new canvas, pixel size and slice count."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .io.readers import DataError


@dataclass
class PreviousRun:
    objp: torch.Tensor  # (O, Z, Ny, Nx)
    obja: torch.Tensor
    probe: torch.Tensor  # (P, ny, nx) complex
    dx_ang: float
    origin_ang: Optional[np.ndarray]  # (2,) physical (y, x) of canvas pixel (0, 0); None: not recorded
    path: Path


def read_previous(path: str | Path) -> PreviousRun:
    """Object and probe of a model.hdf5 (checkpoint) or a result.zarr."""
    path = Path(path)
    if path.suffix == ".zarr" or (path / "zarr.json").is_file():
        import zarr

        try:
            root = zarr.open_group(str(path), mode="r")
            meta = root.attrs["ptyflow"]
            dx = float(meta["dx_ang"])
            origin = np.asarray(root["positions_ang"][0]) - np.asarray(root["positions_px_initial"][0]) * dx
            return PreviousRun(torch.from_numpy(root["object_phase"][:]), torch.from_numpy(root["object_amplitude"][:]),
                               torch.from_numpy(root["probe"][:]), dx, origin, path)
        except (KeyError, FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path}: not a ptyflow result.zarr ({exc})") from None
    from .checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    # model files of the first ptyflow versions do not record their canvas origin
    origin = np.asarray(ckpt.attrs["origin_ang"], dtype=np.float64) if "origin_ang" in ckpt.attrs else None
    return PreviousRun(ckpt.tensors["objp"], ckpt.tensors["obja"], ckpt.tensors["probe"], ckpt.dx_ang, origin, path)


def _sample(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of images (C, H, W) at fractional pixel coordinates (h, w); 0 outside."""
    h, w = images.shape[-2:]
    grid = torch.stack([2 * cols / max(w - 1, 1) - 1, 2 * rows / max(h - 1, 1) - 1], dim=-1)[None]
    out = torch.nn.functional.grid_sample(images[None].double(), grid.double(), mode="bilinear",
                                          padding_mode="zeros", align_corners=True)
    return out[0]


def resample_object(prev: PreviousRun, canvas: tuple[int, int], dx_ang: float, origin_ang: np.ndarray,
                    n_slices: int, n_modes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(obja, objp) of shape (n_modes, n_slices, *canvas) from a previous object.

    Lateral: bilinear in physical coordinates (outside the old canvas: amplitude 1, phase 0).
    Depth: the same slices when the count matches; otherwise the projected phase is shared
    equally among the new slices (and the amplitude as its n_slices-th root).
    """
    if prev.origin_ang is None:
        raise DataError(
            f"{prev.path}: the model file does not record where its canvas lies (origin_ang), so its object "
            "cannot be placed on this canvas; start the object from that run's result.zarr instead"
        )
    rows = (origin_ang[0] + torch.arange(canvas[0], dtype=torch.float64) * dx_ang - prev.origin_ang[0]) / prev.dx_ang
    cols = (origin_ang[1] + torch.arange(canvas[1], dtype=torch.float64) * dx_ang - prev.origin_ang[1]) / prev.dx_ang
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    phase, amplitude = prev.objp[0].double(), prev.obja[0].double()
    if phase.shape[0] != n_slices:
        phase = phase.sum(0, keepdim=True).repeat(n_slices, 1, 1) / n_slices
        amplitude = amplitude.clamp_min(1e-6).log().sum(0, keepdim=True).div(n_slices).exp().repeat(n_slices, 1, 1)
    objp = _sample(phase, rr, cc)
    obja = _sample(amplitude - 1, rr, cc) + 1
    return obja[None].repeat(n_modes, 1, 1, 1), objp[None].repeat(n_modes, 1, 1, 1)


def resample_probe(probe: torch.Tensor, dx_from: float, dx_to: float, window: tuple[int, int],
                   n_modes: int, total_intensity: float) -> torch.Tensor:
    """Probe modes (n_modes, *window) interpolated from pixel dx_from to dx_to about the window
    centre, rescaled to total_intensity; missing modes are left out (n_modes <= available)."""
    if probe.shape[0] < n_modes:
        raise DataError(f"init.probe.n_modes is {n_modes} but the previous run has {probe.shape[0]} mode(s)")
    probe = probe[:n_modes].to(torch.complex128)
    h, w = probe.shape[-2:]
    rows = (torch.arange(window[0], dtype=torch.float64) - window[0] // 2) * dx_to / dx_from + h // 2
    cols = (torch.arange(window[1], dtype=torch.float64) - window[1] // 2) * dx_to / dx_from + w // 2
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")
    real = _sample(probe.real, rr, cc)
    imag = _sample(probe.imag, rr, cc)
    out = torch.complex(real, imag)
    return out * torch.sqrt(total_intensity / out.abs().square().sum())
