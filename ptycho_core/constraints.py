"""Constraints: projections applied under no_grad to the model tensors after an iteration.

One function per constraint, registered by its name in ``constraint_params``, applied in the
fixed order of ``CONSTRAINT_ORDER``. They change parameter values in place; one that mixes the
probe modes returns the mixing so the optimizer state can follow (``mix_state``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from .forward import gaussian_blur
from .model import PtychoAD
from .physics import spatial_frequencies


# a held-out pattern's position follows this many nearest trained ones (more when several are
# equally near the last): the 8 around it on a raster, 6 on a hexagonal scan
HELD_OUT_NEIGHBOURS = 12


@dataclass(frozen=True)
class HeldOutNeighbours:
    """How the positions of the held-out patterns (recon_params.validation_fraction) follow the
    trained ones: held-out pattern ``held[i]`` takes the inverse-distance-weighted mean of the
    position corrections of the trained patterns ``neighbours[i]``.

    held: (K,) pattern indices; trained: (N - K,) the others; neighbours: (K, M) trained pattern
    indices; weights: (K, M) float64, 1/distance² normalized to sum 1 over a row (0 where a row
    has fewer than M neighbours)."""

    held: torch.Tensor
    trained: torch.Tensor
    neighbours: torch.Tensor
    weights: torch.Tensor


def held_out_neighbours(positions_px: np.ndarray, held: np.ndarray, k: int = HELD_OUT_NEIGHBOURS
                        ) -> Optional[HeldOutNeighbours]:
    """The neighbours and weights of each held-out pattern ``held`` (K,) among the trained ones,
    from the initial positions (N, 2) in px: fixed for a run, and the same on every process.
    Inverse-distance weights average and never extrapolate: at the scan's edge a held-out pattern
    takes a mean of the corrections beside it, not a trend continued past the data. None when
    nothing is held out."""
    if not len(held):
        return None
    positions = np.asarray(positions_px, dtype=np.float64)
    held = np.asarray(held, dtype=np.int64)
    keep = np.ones(len(positions), dtype=bool)
    keep[held] = False
    trained = np.flatnonzero(keep)
    k = min(k, len(trained))
    # Candidates come from a box around each small group of held-out patterns, reaching four mean
    # scan steps past it, which keeps this linear in N on large scans (0.4 s for 512 x 512). A
    # pattern whose k-th neighbour lies farther than that is searched among all trained patterns.
    extent = np.ptp(positions, axis=0)
    reach = 4 * math.sqrt(extent[0] * extent[1] / len(positions))
    by_y = trained[np.argsort(positions[trained, 0], kind="stable")]
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for rows in _boxes(positions, held, 256):
        lo, hi = np.searchsorted(positions[by_y, 0], [positions[rows, 0].min() - reach,
                                                      positions[rows, 0].max() + reach], side="right")
        band = by_y[lo:hi]
        band = band[np.argsort(positions[band, 1], kind="stable")]
        for group in _boxes(positions[:, ::-1], rows, 32):
            lo, hi = np.searchsorted(positions[band, 1], [positions[group, 1].min() - reach,
                                                         positions[group, 1].max() + reach], side="right")
            candidates = band[lo:hi] if hi - lo >= k else trained
            limit = np.inf if len(candidates) == len(trained) else reach
            for index, near in zip(group, _nearest(positions, group, candidates, k, limit)):
                found[int(index)] = near
    for index, near in found.items():
        if near is None:  # its k-th neighbour lies beyond the box
            found[index] = _nearest(positions, [index], trained, k, np.inf)[0]
    width = max(len(n) for n, _ in found.values())
    neighbours = np.zeros((len(held), width), dtype=np.int64)
    weights = np.zeros((len(held), width), dtype=np.float64)
    for row, index in enumerate(held):
        n, w = found[int(index)]
        neighbours[row, :len(n)], weights[row, :len(w)] = n, w
    return HeldOutNeighbours(torch.from_numpy(held), torch.from_numpy(trained),
                             torch.from_numpy(neighbours), torch.from_numpy(weights))


def _boxes(positions: np.ndarray, indices: np.ndarray, size: int) -> list[np.ndarray]:
    """``indices`` in groups of about ``size`` consecutive ones in the order of positions[:, 0]."""
    ordered = indices[np.argsort(positions[indices, 0], kind="stable")]
    return np.array_split(ordered, math.ceil(len(ordered) / size))


def _nearest(positions: np.ndarray, rows, candidates: np.ndarray, k: int, limit: float
             ) -> list[Optional[tuple[np.ndarray, np.ndarray]]]:
    """For each of ``rows``: its k nearest ``candidates`` and any as near as the k-th, in index
    order, with weights 1/distance² that sum to 1; None where the k-th lies at ``limit`` or beyond
    (candidates farther than ``limit`` may have been left out)."""
    dy = positions[rows, None, 0] - positions[None, candidates, 0]
    dx = positions[rows, None, 1] - positions[None, candidates, 1]
    distance = np.sqrt(dy * dy + dx * dx)
    kth = np.partition(distance, k - 1, axis=1)[:, k - 1] * (1 + 1e-9)  # raster ties differ in the last digit
    result = []
    for row, reach in zip(distance, kth):
        if reach >= limit:
            result.append(None)
            continue
        inside = np.flatnonzero(row <= reach)
        order = np.argsort(candidates[inside], kind="stable")
        weight = 1.0 / np.maximum(row[inside][order], 1e-9) ** 2  # a coinciding trained pattern dominates
        result.append((candidates[inside][order], weight / weight.sum()))
    return result


@dataclass(frozen=True)
class DataContext:
    """What the constraints know of the data; fixed for a reconstruction.

    conv_angle_mrad: probe semi-convergence angle; mean_pattern_sum: () mean measured counts per
    pattern; positions_ang: (N, 2) measured probe centres (y, x) in Å; initial_positions_px: (N, 2)
    probe window corners plus sub-pixel shifts at iteration 0 (what position corrections are
    measured from); held_out: the patterns held out of the optimizer and how their positions
    follow the trained ones (None: every pattern is trained)."""

    conv_angle_mrad: float
    mean_pattern_sum: torch.Tensor
    positions_ang: torch.Tensor
    initial_positions_px: torch.Tensor
    held_out: Optional[HeldOutNeighbours] = None


# The order in which constraints act after an iteration (each only when its schedule says so):
CONSTRAINT_ORDER = (
    "fourier_probe_mask",   # probe first: cut what scattered outside the aperture ...
    "probe_ortho",          # ... orthogonalize the modes (keeps the total power) ...
    "fix_probe_intensity",  # ... and restore the measured counts last, after the mask removed some
    "obj_blur",             # object: filters first ...
    "depth_blur",
    "obja_thresh",          # ... thresholds after them, so the blurred values obey the limits
    "objp_thresh",
    "position_limit",       # positions: drift removed and corrections capped
    "tilt_smooth",          # tilts
)

# the tensors each constraint changes: it acts only on those that are optimized, so a tensor with
# start_iter null never changes (model_params semantics), filters included
CONSTRAINT_TENSORS = {
    "fourier_probe_mask": ("probe",), "probe_ortho": ("probe",), "fix_probe_intensity": ("probe",),
    "obj_blur": ("obja", "objp"), "depth_blur": ("obja", "objp"), "obja_thresh": ("obja",), "objp_thresh": ("objp",),
    "position_limit": ("probe_pos_shifts",), "tilt_smooth": ("obj_tilts",),
}

CONSTRAINTS: dict[str, Callable[[PtychoAD, Any, DataContext], Optional[torch.Tensor]]] = {}


def _optimized(model: PtychoAD, *names: str) -> list[torch.Tensor]:
    return [getattr(model, n) for n in names if model.update_rules[n].optimized]


def register_constraint(name: str):
    def decorate(fn):
        CONSTRAINTS[name] = fn
        return fn
    return decorate


def _assignment(weights: torch.Tensor) -> torch.Tensor:
    """A permutation pairing each column k with a row source[k], strongest pairs first (P x P, P
    small): the old mode each new mode mostly comes from."""
    weights = weights.clone()
    source = torch.empty(weights.shape[1], dtype=torch.long, device=weights.device)
    for _ in range(weights.shape[1]):
        row, col = divmod(int(torch.argmax(weights)), weights.shape[1])
        source[col] = row
        weights[row, :] = -1
        weights[:, col] = -1
    return source


@register_constraint("probe_ortho")
def orthogonalize_probe_modes(model: PtychoAD, params, context: DataContext) -> Optional[torch.Tensor]:
    """Replace the probe modes by the orthogonal modes of the same mixed state, by power.

    Returns the unitary mixing (P, P), new modes = mixing @ old modes, so the optimizer's
    per-element state can follow (mix_state)."""
    if model.probe.shape[0] < 2:
        return None
    probe = model.probe_complex
    flat = probe.reshape(probe.shape[0], -1)
    # eigen-decomposition of the small (P, P) Gram matrix gives the orthogonal modes of rho
    gram = flat.conj() @ flat.T
    eigval, eigvec = torch.linalg.eigh(gram)
    mixing = eigvec[:, torch.argsort(eigval, descending=True)]  # column k: new mode k from the old ones
    source = _assignment(mixing.abs())
    # eigenvectors carry an arbitrary phase: choose the one that leaves each mode closest to where
    # it came from, so modes that are already orthogonal stay exactly as they are (up to order)
    lead = mixing[source, torch.arange(mixing.shape[1])]
    mixing = mixing * (lead.conj() / lead.abs())
    modes = mixing.T @ flat
    model.probe.copy_(torch.view_as_real(modes.reshape(probe.shape)))
    return mixing.T


@register_constraint("fix_probe_intensity")
def fix_probe_intensity(model: PtychoAD, params, context: DataContext) -> None:
    """Scale the probe so its total intensity equals the mean measured counts per pattern."""
    power = model.probe.square().sum()
    model.probe.mul_(torch.sqrt(context.mean_pattern_sum.to(power) / power))


@register_constraint("fourier_probe_mask")
def fourier_probe_mask(model: PtychoAD, params, context: DataContext) -> None:
    """Remove probe intensity scattered outside the condenser aperture (times radius_factor)."""
    probe = model.probe_complex
    ky, kx = spatial_frequencies(model.window, model.dx_ang, device=probe.device, dtype=model.obja.dtype)
    alpha_mrad = model.wavelength_ang * torch.sqrt(ky**2 + kx**2) * 1e3
    mask = alpha_mrad <= params.radius_factor * context.conv_angle_mrad
    masked = torch.fft.ifft2(torch.fft.fft2(probe) * mask)
    model.probe.copy_(torch.view_as_real(masked))


@register_constraint("obja_thresh")
def threshold_amplitude(model: PtychoAD, params, context: DataContext) -> None:
    """Clip the object amplitude into [min, max]."""
    model.obja.clamp_(min=params.min, max=params.max)


@register_constraint("objp_thresh")
def threshold_phase(model: PtychoAD, params, context: DataContext) -> None:
    """Clip the object phase into [min, max]; min 0 is phase positivity."""
    model.objp.clamp_(min=params.min, max=params.max)


@register_constraint("obj_blur")
def blur_object(model: PtychoAD, params, context: DataContext) -> None:
    """Lateral Gaussian filter on amplitude and phase: damps pixel-scale noise."""
    for tensor in _optimized(model, "obja", "objp"):
        tensor.copy_(gaussian_blur(tensor, params.std_px))


@register_constraint("depth_blur")
def blur_depth(model: PtychoAD, params, context: DataContext) -> None:
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
    for tensor in _optimized(model, "obja", "objp"):
        tensor.copy_(torch.einsum("zw,owyx->ozyx", weights, tensor))


@register_constraint("tilt_smooth")
def smooth_tilts(model: PtychoAD, params, context: DataContext) -> None:
    """Per-position tilts become their Gaussian-weighted mean over neighbouring positions."""
    tilts = model.obj_tilts
    if tilts.shape[0] < 2:
        return
    positions = context.positions_ang.to(tilts.device, tilts.dtype)
    smoothed = torch.empty_like(tilts)
    for start in range(0, len(positions), 1024):  # chunks keep the distance matrix small
        d2 = torch.cdist(positions[start:start + 1024], positions).square()
        weights = torch.exp(-0.5 * d2 / params.std_ang**2)
        smoothed[start:start + 1024] = weights @ tilts / weights.sum(dim=1, keepdim=True)
    tilts.copy_(smoothed)


def position_corrections(model: PtychoAD, context: DataContext) -> torch.Tensor:
    """(N, 2) float64: how far each probe has moved from its initial position (px). float64:
    canvas coordinates of hundreds of pixels would lose the sub-pixel digits in float32."""
    corners = model.crop_pos.to(torch.float64)
    initial = context.initial_positions_px.to(corners.device, torch.float64)
    return corners + model.probe_pos_shifts.to(torch.float64) - initial


@register_constraint("position_limit")
def limit_positions(model: PtychoAD, params, context: DataContext) -> None:
    """Remove the mean position correction of the trained patterns (global drift) from them and
    cap each of their corrections at max_px. Held-out patterns are left out: they get no gradient,
    so their corrections are not evidence of a drift (``place_held_out`` sets them)."""
    shifts = model.probe_pos_shifts
    rows = slice(None) if context.held_out is None else context.held_out.trained.to(shifts.device)
    moved = position_corrections(model, context)[rows]
    if params.remove_drift:
        moved = moved - moved.mean(dim=0, keepdim=True)
    if params.max_px:
        length = moved.norm(dim=1, keepdim=True)
        moved = moved * torch.clamp(params.max_px / (length + 1e-12), max=1.0)
    initial = context.initial_positions_px.to(shifts.device, torch.float64)
    shifts[rows] = (initial[rows] + moved - model.crop_pos[rows].to(torch.float64)).to(shifts.dtype)


@torch.no_grad()
def place_held_out(model: PtychoAD, context: DataContext) -> None:
    """Give every held-out pattern the interpolated position correction of its trained neighbours
    (``HeldOutNeighbours``), so it is scored where the refinement puts the probes around it; a
    held-out pattern gets no gradient and would otherwise be scored at its uncorrected position,
    which penalizes position refinement in the validation loss. Only the held-out rows of
    ``probe_pos_shifts`` change, by this rule and never by the optimizer (their gradient is zero);
    the trained rows and the optimizer state are untouched. The result can pass half a pixel:
    ``recentre_windows``, which runs next, moves such windows by whole pixels."""
    placement = context.held_out
    if placement is None or not model.update_rules["probe_pos_shifts"].optimized:
        return
    shifts = model.probe_pos_shifts
    device = shifts.device
    held, neighbours = placement.held.to(device), placement.neighbours.to(device)
    corrections = position_corrections(model, context)
    interpolated = (corrections[neighbours] * placement.weights.to(device)[..., None]).sum(dim=1)
    initial = context.initial_positions_px.to(device, torch.float64)[held]
    shifts[held] = (initial + interpolated - model.crop_pos[held].to(torch.float64)).to(shifts.dtype)


# optimizer state that is a running sum of gradients (or of parameters: ASGD's average), so linear
# in them; every other per-element state (exp_avg_sq, max_exp_avg_sq, square_avg, ...) is taken to
# be a running sum of squared components
LINEAR_STATE = ("exp_avg", "momentum_buffer", "grad_avg", "prev", "ax")


def mix_state(optimizer: Optional[torch.optim.Optimizer], param: torch.Tensor, mixing: torch.Tensor) -> None:
    """Carry the optimizer's per-element state of the probe (real view (P, ny, nx, 2)) over to the
    modes ``mixing @ modes`` (mixing (P, P) complex, unitary).

    The gradient with respect to the new modes is the same mixture of the old modes' gradients
    (the loss sees only the mixed state, which a unitary mixing keeps), so the linear state
    (Adam's first moment, momentum) is mixed exactly as the modes are. A running mean of squared
    real and imaginary parts (Adam's second moment) becomes the expected squares of the mixed
    parts: sum_j Re(m)^2 v_re + Im(m)^2 v_im (and the same with re and im exchanged), exact for a
    reordering and when the modes' gradients, and their two parts, are uncorrelated. LBFGS keeps
    its history as flat vectors, not per element: it is left as it is."""
    if optimizer is None:
        return
    n_modes = param.shape[0]
    for key, value in optimizer.state.get(param, {}).items():
        if not (torch.is_tensor(value) and value.shape == param.shape):
            continue
        weights = mixing.to(value.device)
        if key in LINEAR_STATE:
            flat = torch.view_as_complex(value).reshape(n_modes, -1)
            value.copy_(torch.view_as_real(weights.to(flat.dtype) @ flat).reshape(value.shape))
            continue
        real_sq, imag_sq = weights.real.square().to(value.dtype), weights.imag.square().to(value.dtype)
        parts = value.reshape(n_modes, -1, 2)
        re, im = parts[..., 0], parts[..., 1]
        mixed = torch.stack([real_sq @ re + imag_sq @ im, real_sq @ im + imag_sq @ re], dim=-1)
        value.copy_(mixed.reshape(value.shape))


def apply_constraints(model: PtychoAD, constraint_params, iteration: int, context: DataContext,
                      optimizer: Optional[torch.optim.Optimizer] = None) -> list[str]:
    """Apply every constraint scheduled for this iteration whose tensors are optimized, in
    CONSTRAINT_ORDER; returns the names applied."""
    applied = []
    with torch.no_grad():
        for name in CONSTRAINT_ORDER:
            params = getattr(constraint_params, name)
            if params.active(iteration) and _optimized(model, *CONSTRAINT_TENSORS[name]):
                mixing = CONSTRAINTS[name](model, params, context)
                if mixing is not None:
                    mix_state(optimizer, model.probe, mixing)
                applied.append(name)
    return applied
