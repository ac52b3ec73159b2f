"""Constraints: projections applied under no_grad to the model tensors after an iteration.

One function per constraint, registered by its name in ``constraint_params``. They change
parameter values in place and leave the optimizer state alone.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .forward import gaussian_blur
from .model import PtychoAD
from .physics import spatial_frequencies

CONSTRAINTS: dict[str, Callable[[PtychoAD, Any, dict], None]] = {}


def register_constraint(name: str):
    def decorate(fn):
        CONSTRAINTS[name] = fn
        return fn
    return decorate


@register_constraint("probe_ortho")
def orthogonalize_probe_modes(model: PtychoAD, params, context: dict) -> None:
    """Replace the probe modes by the orthogonal modes of the same mixed state, by power."""
    if model.probe.shape[0] < 2:
        return
    probe = model.probe_complex
    flat = probe.reshape(probe.shape[0], -1)
    # eigen-decomposition of the small (P, P) Gram matrix gives the orthogonal modes of rho
    gram = flat.conj() @ flat.T
    eigval, eigvec = torch.linalg.eigh(gram)
    order = torch.argsort(eigval, descending=True)
    modes = eigvec[:, order].T @ flat
    model.probe.copy_(torch.view_as_real(modes.reshape(probe.shape)))


@register_constraint("fix_probe_intensity")
def fix_probe_intensity(model: PtychoAD, params, context: dict) -> None:
    """Scale the probe so its total intensity equals the mean measured counts per pattern."""
    power = model.probe.square().sum()
    model.probe.mul_(torch.sqrt(context["mean_pattern_sum"] / power))


@register_constraint("fourier_probe_mask")
def fourier_probe_mask(model: PtychoAD, params, context: dict) -> None:
    """Remove probe intensity scattered outside the condenser aperture (times radius_factor)."""
    probe = model.probe_complex
    ky, kx = spatial_frequencies(model.window, model.dx_ang, device=probe.device, dtype=model.obja.dtype)
    alpha_mrad = model.wavelength_ang * torch.sqrt(ky**2 + kx**2) * 1e3
    mask = alpha_mrad <= params.radius_factor * context["conv_angle_mrad"]
    masked = torch.fft.ifft2(torch.fft.fft2(probe) * mask)
    model.probe.copy_(torch.view_as_real(masked))


@register_constraint("obja_thresh")
def threshold_amplitude(model: PtychoAD, params, context: dict) -> None:
    """Clip the object amplitude into [min, max]."""
    model.obja.clamp_(min=params.min, max=params.max)


@register_constraint("objp_thresh")
def threshold_phase(model: PtychoAD, params, context: dict) -> None:
    """Clip the object phase into [min, max]; min 0 is phase positivity."""
    model.objp.clamp_(min=params.min, max=params.max)


@register_constraint("obj_blur")
def blur_object(model: PtychoAD, params, context: dict) -> None:
    """Lateral Gaussian filter on amplitude and phase: damps pixel-scale noise."""
    model.obja.copy_(gaussian_blur(model.obja, params.std_px))
    model.objp.copy_(gaussian_blur(model.objp, params.std_px))


@register_constraint("depth_blur")
def blur_depth(model: PtychoAD, params, context: dict) -> None:
    """Gaussian filter along z: multislice depth resolution is poor, so slice-to-slice noise is
    mostly artefact. The filter matrix is made doubly stochastic (Sinkhorn), so a uniform column
    stays uniform and the total phase of every column is kept."""
    n_slices = model.objp.shape[1]
    if n_slices < 2:
        return
    z = torch.arange(n_slices, device=model.objp.device, dtype=torch.float64)
    weights = torch.exp(-0.5 * ((z[:, None] - z[None, :]) / params.std_slices) ** 2)
    for _ in range(100):
        weights = weights / weights.sum(dim=1, keepdim=True)
        weights = weights / weights.sum(dim=0, keepdim=True)
    weights = weights.to(model.objp.dtype)
    for tensor in (model.obja, model.objp):
        tensor.copy_(torch.einsum("zw,owyx->ozyx", weights, tensor))


@register_constraint("tilt_smooth")
def smooth_tilts(model: PtychoAD, params, context: dict) -> None:
    """Per-position tilts become their Gaussian-weighted mean over neighbouring positions."""
    tilts = model.obj_tilts
    if tilts.shape[0] < 2:
        return
    positions = context["positions_ang"].to(tilts.device, tilts.dtype)
    smoothed = torch.empty_like(tilts)
    for start in range(0, len(positions), 1024):  # chunks keep the distance matrix small
        d2 = torch.cdist(positions[start:start + 1024], positions).square()
        weights = torch.exp(-0.5 * d2 / params.std_ang**2)
        smoothed[start:start + 1024] = weights @ tilts / weights.sum(dim=1, keepdim=True)
    tilts.copy_(smoothed)


@register_constraint("position_limit")
def limit_positions(model: PtychoAD, params, context: dict) -> None:
    """Remove the mean position correction (global drift) and cap each correction at max_px."""
    if not model.update_rules["probe_pos_shifts"].optimized:
        return
    initial = context["initial_shifts"].to(model.probe_pos_shifts.device, model.probe_pos_shifts.dtype)
    moved = model.probe_pos_shifts - initial
    if params.remove_drift:
        moved = moved - moved.mean(dim=0, keepdim=True)
    if params.max_px:
        length = moved.norm(dim=1, keepdim=True)
        moved = moved * torch.clamp(params.max_px / (length + 1e-12), max=1.0)
    model.probe_pos_shifts.copy_(initial + moved)


def apply_constraints(model: PtychoAD, constraint_params, iteration: int, context: dict) -> list[str]:
    """Apply every constraint scheduled for this iteration; returns the names applied."""
    applied = []
    with torch.no_grad():
        for name in type(constraint_params).model_fields:
            params = getattr(constraint_params, name)
            if params.active(iteration):
                CONSTRAINTS[name](model, params, context)
                applied.append(name)
    model._propagator_cache = None
    return applied
