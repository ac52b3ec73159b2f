"""PtychoAD: the six optimizable tensors, their start_iter gating and the forward pass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import forward as fw
from .physics import fresnel_propagator, spatial_frequencies

TENSOR_NAMES = ("obja", "objp", "obj_tilts", "slice_thickness", "probe", "probe_pos_shifts")


@dataclass(frozen=True)
class UpdateRule:
    """When and how fast one tensor is optimized (model_params.update_params.<name>)."""

    start_iter: Optional[int]
    lr: float

    @property
    def optimized(self) -> bool:
        return self.start_iter is not None and self.lr > 0

    def active(self, iteration: int) -> bool:
        return self.optimized and iteration >= self.start_iter


class PtychoAD(torch.nn.Module):
    """Mixed-state multislice ptychography forward model with optimizable tensors.

    Tensors (user-facing shapes, see ``tensors()``):
      obja, objp        (O, Z, Ny, Nx) object amplitude and phase (rad)
      obj_tilts         (1 or N, 2) object tilt (y, x) in mrad
      slice_thickness   () slice thickness in Å
      probe             (P, ny, nx) complex probe modes (stored as a real view (P, ny, nx, 2) so
                        every torch optimizer, LBFGS included, treats it as plain real numbers)
      probe_pos_shifts  (N, 2) sub-pixel probe shifts (y, x) in px
    Buffers: crop_pos (N, 2) integer top-left corners of the probe windows on the object canvas
    (a window follows its probe by whole pixels, see ``recentre_windows``), occupancies (O,) fixed
    object-mode weights. origin_ang (2,): physical (y, x) in Å of canvas pixel (0, 0), recorded in
    checkpoints so that later runs can resample this object onto their own canvas.
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        crop_pos: torch.Tensor,
        occupancies: torch.Tensor,
        dx_ang: float,
        wavelength_ang: float,
        update_rules: dict[str, UpdateRule],
        obj_preblur_std: Optional[float] = None,
        detector_blur_std: Optional[float] = None,
        band_limit: Optional[float] = None,
        origin_ang: tuple[float, float] = (0.0, 0.0),
    ):
        super().__init__()
        missing = set(TENSOR_NAMES) - set(tensors)
        if missing:
            raise ValueError(f"PtychoAD needs the tensors {sorted(missing)}")
        for name in TENSOR_NAMES:
            value = tensors[name].detach().clone()
            if name == "probe":
                value = torch.view_as_real(value.resolve_conj()).contiguous()
            self.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
        # a copy: the windows move (recentre_windows), the caller's array must not
        self.register_buffer("crop_pos", crop_pos.to(torch.long).clone())
        self.register_buffer("occupancies", occupancies.to(self.obja.dtype))
        self.dx_ang = float(dx_ang)
        self.origin_ang = tuple(float(v) for v in origin_ang)
        self.wavelength_ang = float(wavelength_ang)
        self.update_rules = dict(update_rules)
        self.obj_preblur_std = obj_preblur_std or None
        self.detector_blur_std = detector_blur_std or None
        self.band_limit = band_limit or None  # kept fraction of Nyquist in multislice
        # (ny, nx) 1 where |k| < band_limit x Nyquist, else 0, in FFT order (None: no limit). Multiplying
        # two fields doubles their bandwidth; with both held below 2/3 of Nyquist, what a product wraps
        # around the window lands outside the band and the next propagation removes it, so thick
        # multislice objects do not alias (abTEM's antialiasing aperture). A buffer: built once, it
        # follows the model to its device.
        band_mask = None
        if self.band_limit:
            ky, kx = spatial_frequencies(self.window, self.dx_ang, dtype=self.obja.dtype)
            band_mask = (torch.sqrt(ky**2 + kx**2) < self.band_limit / (2 * self.dx_ang)).to(self.obja.dtype)
        self.register_buffer("band_mask", band_mask, persistent=False)
        self._nonzero_shifts = bool(torch.any(self.probe_pos_shifts != 0))  # kept by load_tensors
        self._propagator_cache: tuple[tuple, torch.Tensor] | None = None
        self.iteration = 0

    # ------------------------------------------------------------------ shapes and access
    @property
    def apply_shifts(self) -> bool:
        """Whether the forward pass shifts the probe by probe_pos_shifts: when they are optimized,
        and when any is non-zero even if they are not (known sub-pixel positions, or the refined
        ones of a model a run starts from). Not looked up per batch: on a GPU that would wait for
        the device every time; the shifts change only through the optimizer or load_tensors."""
        return self.update_rules["probe_pos_shifts"].optimized or self._nonzero_shifts

    @property
    def n_positions(self) -> int:
        return self.crop_pos.shape[0]

    @property
    def window(self) -> tuple[int, int]:
        return tuple(self.probe.shape[1:3])

    @property
    def probe_complex(self) -> torch.Tensor:
        return torch.view_as_complex(self.probe)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Detached user-facing tensors (probe complex), for checkpoints and export."""
        out = {name: getattr(self, name).detach() for name in TENSOR_NAMES}
        out["probe"] = torch.view_as_complex(out["probe"])
        return out

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.tensors().items()}

    @torch.no_grad()
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors into the model; a different shape is a ValueError naming the tensor."""
        for name, value in tensors.items():
            if name not in TENSOR_NAMES:
                raise ValueError(f"unknown tensor '{name}'")
            param = getattr(self, name)
            if name == "probe":
                value = torch.view_as_real(torch.as_tensor(value).to(self.probe_complex.dtype).resolve_conj())
            value = torch.as_tensor(value)
            if tuple(value.shape) != tuple(param.shape):
                shape = tuple(value.shape[:-1]) if name == "probe" else tuple(value.shape)
                own = self.parameter_shapes()[name]
                raise ValueError(f"tensor '{name}': file has shape {shape}, this model needs {own}")
            param.copy_(value.to(param.dtype))
        self._propagator_cache = None
        self._nonzero_shifts = bool(torch.any(self.probe_pos_shifts != 0))

    def centres_px(self) -> np.ndarray:
        """(N, 2) probe centres on the object canvas (y, x) in px: window corner, sub-pixel shift
        and half the window."""
        corners = (self.crop_pos + self.probe_pos_shifts.detach()).cpu().numpy()
        return corners + np.array(self.window) // 2

    @torch.no_grad()
    def move_probes(self, moves_px: torch.Tensor) -> None:
        """Move every probe by ``moves_px`` (N, 2), (y, x) in px (the scan fit's joint move; its
        windows follow at ``recentre_windows``)."""
        self.probe_pos_shifts.add_(moves_px.to(self.probe_pos_shifts.dtype))
        self._nonzero_shifts = True

    @torch.no_grad()
    def recentre_windows(self) -> int:
        """Move every probe window whose sub-pixel shift has grown past half a pixel by the whole
        pixels of that shift, keeping the remainder as the shift (the probe stays where it is).
        A window never leaves the canvas. Returns the number of windows moved."""
        shifts = self.probe_pos_shifts
        whole = torch.round(shifts).to(torch.long)
        if not bool(whole.any()):
            return 0
        last = torch.tensor(self.obja.shape[-2:], device=whole.device) - torch.tensor(self.window, device=whole.device)
        corners = torch.minimum(torch.clamp(self.crop_pos + whole, min=0), last)
        step = corners - self.crop_pos
        self.crop_pos.copy_(corners)
        shifts.sub_(step.to(shifts.dtype))
        return int(step.any(dim=1).sum())

    # ------------------------------------------------------------------ gating
    def set_iteration(self, iteration: int) -> None:
        """Switch gradients on exactly for the tensors whose start_iter has been reached."""
        self.iteration = iteration
        for name in TENSOR_NAMES:
            getattr(self, name).requires_grad_(self.update_rules[name].active(iteration))

    def optimized_names(self) -> list[str]:
        return [n for n in TENSOR_NAMES if self.update_rules[n].optimized]

    # ------------------------------------------------------------------ forward
    def propagator(self, indices: torch.Tensor) -> torch.Tensor:
        """(T, ny, nx) Fresnel propagator for the batch; cached while dz and tilts are fixed."""
        tilts = self.obj_tilts if self.obj_tilts.shape[0] == 1 else self.obj_tilts[indices]
        cacheable = self.obj_tilts.shape[0] == 1 and not (
            self.obj_tilts.requires_grad or self.slice_thickness.requires_grad
        )
        key = (self.obj_tilts._version, self.slice_thickness._version, self.obj_tilts.device)
        if cacheable and self._propagator_cache is not None and self._propagator_cache[0] == key:
            return self._propagator_cache[1]
        ky, kx = spatial_frequencies(self.window, self.dx_ang, device=self.obja.device, dtype=self.obja.dtype)
        prop = fresnel_propagator(ky, kx, self.wavelength_ang, self.slice_thickness, tilts)
        if self.band_mask is not None:
            prop = prop * self.band_mask
        self._propagator_cache = (key, prop.detach()) if cacheable else None
        return prop

    def forward(self, indices: torch.Tensor, centered: bool = True) -> torch.Tensor:
        """Predicted diffraction intensities (B, ky, kx) for the positions ``indices`` (B,).

        centered: DC at the pattern centre, as measured; False returns FFT order (the engine keeps
        its measurements in FFT order, saving two shifts per batch)."""
        obja, objp = self.obja, self.objp
        if self.obj_preblur_std:
            # the loss sees the blurred object, the gradient lands on the sharp one
            obja = fw.gaussian_blur(obja, self.obj_preblur_std)
            objp = fw.gaussian_blur(objp, self.obj_preblur_std)
        flat_idx = fw.patch_indices(self.crop_pos[indices], self.window, tuple(obja.shape))  # (B, O, Z, ny, nx)
        if obja.numel() < flat_idx.numel():
            # a canvas smaller than the batch's patches: one polar on the canvas, one complex gather
            trans = fw.crop_patches(fw.transmission(obja, objp), flat_idx)
        else:
            trans = fw.transmission(fw.crop_patches(obja, flat_idx), fw.crop_patches(objp, flat_idx))
        if self.band_mask is not None and obja.shape[1] > 1:
            trans = torch.fft.ifft2(torch.fft.fft2(trans) * self.band_mask)
        probe = self.probe_complex
        if self.apply_shifts:
            probes = fw.fourier_shift(probe, self.probe_pos_shifts[indices])
        else:
            probes = probe[None]
        propagator = self.propagator(indices) if obja.shape[1] > 1 else None
        exit_waves = fw.multislice_exit_waves(probes, trans, propagator)
        intensity = fw.farfield_intensity(exit_waves, self.occupancies, centered=centered)
        if self.detector_blur_std:
            intensity = fw.gaussian_blur(intensity, self.detector_blur_std, fft_order=not centered)
        return intensity
