"""The scan's smooth error, fitted while iterating (model_params.scan_fit).

Most of what a real scan gets wrong is a few numbers: the map from the scan coils to the specimen
(step, rotation, shear) and a slow drift over the acquisition. Gradient steps on the positions
alone do not find them: in the first iterations the object forms in the frame of the nominal
positions, and from then on moving every probe by a smooth field is opposed by an object that
remembers the old frame. The data's only evidence of such a move is the specimen's scale under
each probe, which a diffraction pattern records at its true size.

So the fit moves probes and object together: a move ``u`` of the probes comes with the object
resampled along the same displacement field, and the fit's gradient is the loss's change under
that joint move (the probes' gradient plus the object's, carried through the resampling). What
the object cannot absorb decides the step. The steps are sign-based with a step size per
parameter that grows while the sign holds and halves when it flips (Rprop): the gradient's size
says little here, its sign says which way.

The move of probe n, in px (y, x), is ``B_n @ theta``:
  theta[0:4]  scale (both axes), scale of y against x, rotation (rad, experiment.scan.rotation_deg's
              sense), symmetric shear, of the nominal centres about their mean: u = D (nominal - mean),
              D = [[s + a, rot + sh], [sh - rot, s - a]]. The common scale trades against the probe's
              defocus (a shadow image's size), so it is fitted only with fit_scale; all four start
              from the map measured before the first iteration (scan_calibration.py).
  theta[4:]   the drift: (segments - 1) knots (y, x) in px of hat functions of the acquisition
              time t = n / (N - 1), each less its least-squares constant and line in t (a common
              shift of everything only moves the image, and a drift linear in t is an affine map
              on a raster scan): the knots hold only what bends.
Patterns are taken to be in acquisition order (index order), as every supported reader gives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from . import forward as fw
from .collective import Collective
from .losses import BatchStats, total_loss
from .model import PtychoAD
from .quality import scan_step_px

STEP_GROWTH, STEP_SHRINK = 1.2, 0.5  # Rprop's factors: sign kept, sign flipped


@dataclass
class ScanFitState:
    """Where the fit stands, saved in every checkpoint so a resume steps exactly as an
    uninterrupted run. params (P,): theta so far (the measured affine terms included); step (P,):
    the next step size of each; last_sign (P,): the sign of each one's last gradient (0 after a
    flip or before the first); measured (4,): the affine terms measured before the first iteration
    (scan_calibration.py; zeros when not measured or not applied)."""

    params: np.ndarray
    step: np.ndarray
    last_sign: np.ndarray
    measured: np.ndarray = field(default_factory=lambda: np.zeros(4))

    def arrays(self) -> dict[str, np.ndarray]:
        return {"params": self.params, "step": self.step, "last_sign": self.last_sign, "measured": self.measured}


class ScanFit:
    """The fit's fixed part for one run: the basis on the nominal centres and the settings."""

    def __init__(self, nominal_centres_px: np.ndarray, settings, subset: np.ndarray, measure: bool = True):
        """nominal_centres_px (N, 2): probe centres (y, x) on the canvas before any refinement;
        settings: config.ScanFitParams; subset: the patterns whose gradient steers the fit (the
        trained ones: on the realistic abTEM data every other or every fourth pattern gave a
        gradient whose signs differed from the whole set's, and the fit went astray); measure:
        whether the affine map may be measured before the first iteration (settings.measure_affine
        and a run that starts afresh, not from a model whose object formed on other positions)."""
        centres = np.asarray(nominal_centres_px, dtype=np.float64)
        n = len(centres)
        self.settings = settings
        self.measure = bool(measure and settings.measure_affine)
        self.subset = np.asarray(subset, dtype=np.int64)
        self._mean_intensity: Optional[torch.Tensor] = None  # of the subset's patterns, read at the first step
        self.centre = centres.mean(axis=0)
        r = centres - self.centre
        segments = settings.drift_segments
        t = np.arange(n) / max(n - 1, 1)
        knots = np.linspace(0.0, 1.0, segments + 1)[1:-1]
        hats = np.clip(1.0 - np.abs(t[:, None] - knots[None, :]) * segments, 0.0, None)
        # less the best constant and straight line in t: a common shift only moves the image, and
        # a drift linear in t is an affine map on a raster; the drift holds only what bends
        line = np.stack([np.ones(n), t], axis=1)
        hats -= line @ np.linalg.lstsq(line, hats, rcond=None)[0]
        basis = np.zeros((n, 4 + 2 * len(knots), 2))  # (N, P, 2)
        basis[:, 0, 0], basis[:, 0, 1] = r[:, 0], r[:, 1]
        basis[:, 1, 0], basis[:, 1, 1] = r[:, 0], -r[:, 1]
        basis[:, 2, 0], basis[:, 2, 1] = r[:, 1], -r[:, 0]
        basis[:, 3, 0], basis[:, 3, 1] = r[:, 1], r[:, 0]
        basis[:, 4::2, 0] = hats
        basis[:, 5::2, 1] = hats
        self.basis = basis
        # the displacement field on the canvas is the probes' moves spread by a Gaussian as wide
        # as the scan step (so it fills the gaps between probes and fades outside the scan)
        self.spread_px = max(scan_step_px(centres), 1.0)

    def mean_intensity(self, feed, chunks: list[torch.Tensor], collective: Collective, model: PtychoAD) -> torch.Tensor:
        """The subset's mean intensity per pixel (), which its score divides by: read once per run
        (data only), so the patterns stream through each step a batch at a time."""
        if self._mean_intensity is None:
            total = torch.zeros((), dtype=torch.float64, device=model.obja.device)
            with torch.no_grad(), feed.prefetch(chunks) as fed:
                for meas in fed:
                    total = total + meas.sum(dtype=torch.float64)
            self._mean_intensity = collective.sum(total) / (len(self.subset) * math.prod(model.window))
        return self._mean_intensity.to(model.objp.dtype)

    @property
    def n_params(self) -> int:
        return self.basis.shape[1]

    def initial_state(self, measured_matrix: Optional[np.ndarray] = None) -> ScanFitState:
        """The state before the first step; ``measured_matrix`` (2, 2): the affine map M measured
        before the first iteration, which the fit starts from (its common scale stays as measured
        unless fit_scale)."""
        s = self.settings
        step = np.full(self.n_params, s.drift_step_px)
        step[:4] = s.affine_step
        if not s.fit_scale:
            step[0] = 0.0
        zeros = np.zeros(self.n_params)
        measured = affine_terms(measured_matrix) if measured_matrix is not None else np.zeros(4)
        params = zeros.copy()
        params[:4] = measured
        return ScanFitState(params=params, step=step, last_sign=zeros.copy(), measured=measured)

    def active(self, iteration: int) -> bool:
        return self.settings.active(iteration)

    def moves_px(self, theta: np.ndarray) -> np.ndarray:
        """(N, 2) the probes' moves (y, x) in px for parameters ``theta`` (P,)."""
        return np.einsum("npd,p->nd", self.basis, theta)


def affine_terms(matrix: np.ndarray) -> np.ndarray:
    """theta[0:4] (common scale, scale of y against x, rotation, symmetric shear) of an affine map
    M (2, 2) acting on (y, x): M = I + [[s + a, rot + sh], [sh - rot, s - a]]."""
    d = np.asarray(matrix, dtype=np.float64) - np.eye(2)
    return np.array([(d[0, 0] + d[1, 1]) / 2, (d[0, 0] - d[1, 1]) / 2, (d[0, 1] - d[1, 0]) / 2, (d[0, 1] + d[1, 0]) / 2])


def _affine_in_user_terms(terms: np.ndarray) -> dict:
    """theta[0:4] as the matrix M and its split M = R(rotation) [[1 + scale_y, shear], [0, 1 +
    scale_x]] (R in experiment.scan.rotation_deg's sense)."""
    scale, y_over_x, rot, sh = terms
    matrix = np.eye(2) + np.array([[scale + y_over_x, rot + sh], [sh - rot, scale - y_over_x]])
    angle = math.atan2(-matrix[1, 0], matrix[0, 0])
    c, s = math.cos(angle), math.sin(angle)
    upper = np.array([[c, -s], [s, c]]) @ matrix
    return {"affine": matrix.tolist(), "scale_pct": [float(100 * (upper[0, 0] - 1)), float(100 * (upper[1, 1] - 1))],
            "rotation_deg": math.degrees(angle), "shear": float(upper[0, 1])}


def describe(params: np.ndarray, measured: Optional[np.ndarray] = None) -> dict:
    """A fit's parameters (P,) in a user's terms: the affine map M = I + D acting on (y, x) about
    the scan's centre, split as M = R(rotation) [[1 + scale_y, shear], [0, 1 + scale_x]] (R in
    experiment.scan.rotation_deg's sense), and the drift's knots (y, x) in px at their times. The
    map is the whole one (measured and fitted); ``measured`` (4,), when given and not all zero, is
    also reported on its own as scan_measured."""
    params = np.asarray(params, dtype=np.float64)
    affine = _affine_in_user_terms(params[:4])
    knots = params[4:].reshape(-1, 2)
    measured_terms = np.asarray(measured, dtype=np.float64) if measured is not None else np.zeros(4)
    described = {
        "scan_affine": affine["affine"],
        "scan_scale_pct": affine["scale_pct"],
        "scan_rotation_deg": affine["rotation_deg"],
        "scan_shear": affine["shear"],
        "scan_measured": _affine_in_user_terms(measured_terms) if measured_terms.any() else None,
        "scan_drift_px": knots.tolist(),
        "scan_drift_times": np.linspace(0, 1, len(knots) + 2)[1:-1].tolist(),
        "scan_drift_largest_px": float(np.abs(knots).max()) if len(knots) else 0.0,
    }
    return {**described, "in_words": _in_words(described)}


def _in_words(fit: dict) -> str:
    """The scan's error on one line (the CLI's, the positions figure's title): measured and fitted,
    and what of it was measured before the first iteration."""
    sy, sx = fit["scan_scale_pct"]
    line = (f"step {sy:+.2f} % (y), {sx:+.2f} % (x), rotation {fit['scan_rotation_deg']:+.2f} deg, "
            f"shear {fit['scan_shear']:+.4f}, drift beyond the affine map up to {fit['scan_drift_largest_px']:.2f} px")
    measured = fit["scan_measured"]
    if measured:
        my, mx = measured["scale_pct"]
        line += (f" (measured before iterating: step {my:+.2f} % (y), {mx:+.2f} % (x), rotation "
                 f"{measured['rotation_deg']:+.2f} deg, shear {measured['shear']:+.4f})")
    return line


def describe_saved(arrays: Optional[dict[str, np.ndarray]]) -> Optional[dict]:
    """describe() of the state a checkpoint saved (ScanFitState.arrays()); None when it holds none."""
    if not arrays:
        return None
    return describe(arrays["params"], arrays.get("measured"))


def _fourier_gradient(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d/dy and d/dx (per px) of real images (..., H, W): exact for a band-limited object, where a
    finite difference would understate the fine detail the fit's evidence is in. The images are
    mirrored first, so the canvas's edges do not ring through the whole derivative."""
    h, w = images.shape[-2:]
    mirrored = torch.cat([images, images.flip(-2)], dim=-2)
    mirrored = torch.cat([mirrored, mirrored.flip(-1)], dim=-1)
    ky = torch.fft.fftfreq(2 * h, device=images.device, dtype=images.dtype)[:, None] * (2j * math.pi)
    kx = torch.fft.fftfreq(2 * w, device=images.device, dtype=images.dtype)[None, :] * (2j * math.pi)
    spectrum = torch.fft.fft2(mirrored)
    return (torch.fft.ifft2(spectrum * ky).real[..., :h, :w], torch.fft.ifft2(spectrum * kx).real[..., :h, :w])


class _Spread:
    """Probe moves (N, 2) to a displacement field (2, H, W) on the canvas and back (its adjoint)."""

    def __init__(self, centres_px: torch.Tensor, canvas: tuple[int, int], spread_px: float):
        h, w = canvas
        pix = torch.round(centres_px).long()
        pix[:, 0].clamp_(0, h - 1)
        pix[:, 1].clamp_(0, w - 1)
        self.flat = pix[:, 0] * w + pix[:, 1]
        self.canvas, self.spread_px = canvas, spread_px
        count = torch.zeros(h * w, dtype=centres_px.dtype, device=centres_px.device).index_add_(
            0, self.flat, torch.ones(len(pix), dtype=centres_px.dtype, device=centres_px.device))
        weight = fw.gaussian_blur(count.view(1, h, w), spread_px)[0]
        self.inverse_weight = 1.0 / torch.clamp(weight, min=0.05 * float(weight.max()))

    def field(self, moves: torch.Tensor) -> torch.Tensor:
        h, w = self.canvas
        splat = torch.zeros(2, h * w, dtype=moves.dtype, device=moves.device)
        splat.index_add_(1, self.flat, moves.T)
        return fw.gaussian_blur(splat.view(2, h, w), self.spread_px) * self.inverse_weight

    def at_probes(self, force: torch.Tensor) -> torch.Tensor:
        """The adjoint of ``field``: (2, H, W) -> (N, 2)."""
        h, w = self.canvas
        blurred = fw.gaussian_blur(force * self.inverse_weight, self.spread_px)
        return blurred.reshape(2, h * w)[:, self.flat].T


def _warp(images: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """images (..., H, W) resampled so that what was at x - field(x) is at x (bicubic)."""
    h, w = images.shape[-2:]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=field.dtype, device=field.device),
                            torch.arange(w, dtype=field.dtype, device=field.device), indexing="ij")
    src_y, src_x = yy - field[0], xx - field[1]
    grid = torch.stack([2 * src_x / max(w - 1, 1) - 1, 2 * src_y / max(h - 1, 1) - 1], dim=-1)[None]
    flat = images.reshape(1, -1, h, w)
    out = torch.nn.functional.grid_sample(flat, grid.to(images.dtype), mode="bicubic", padding_mode="border",
                                          align_corners=True)
    return out.reshape(images.shape)


def _joint_move_gradient(model: PtychoAD, fit: ScanFit, feed, weights: dict[str, float], collective: Collective,
                         spread: _Spread, batch_size: int) -> np.ndarray:
    """dL/dtheta (P,) at theta = 0 of the data terms on fit.subset, under the joint move."""
    objects = _moved_object_tensors(model)
    leaves = (*objects, model.probe_pos_shifts)
    flags = [t.requires_grad for t in leaves]
    indices = collective.own(torch.from_numpy(fit.subset))
    chunks = [c for c in indices.tensor_split(max(1, math.ceil(len(indices) / batch_size))) if len(c)]
    device = model.obja.device
    grads = [torch.zeros_like(t) for t in leaves]
    try:
        for t in leaves:
            t.requires_grad_(True)
        stats = BatchStats(size=len(fit.subset), meas_mean=fit.mean_intensity(feed, chunks, collective, model),
                           meas_pattern=None)
        with feed.prefetch(chunks) as fed:
            for chunk, meas in zip(chunks, fed):
                loss, _ = total_loss(model(chunk.to(device), centered=False), meas, weights, model, chunk, stats)
                for acc, g in zip(grads, torch.autograd.grad(loss, leaves, allow_unused=True)):
                    if g is not None:
                        acc += g
    finally:
        for t, flag in zip(leaves, flags):
            t.requires_grad_(flag)
    grads = [collective.sum(g) for g in grads]
    g_pos = grads[-1]
    # the object's part: resampling along u changes O(x) by -grad O(x) . u(x)
    force = torch.zeros((2, *model.objp.shape[-2:]), dtype=model.objp.dtype, device=device)
    with torch.no_grad():
        for tensor, g in zip(objects, grads):
            dy, dx = _fourier_gradient(tensor.detach())
            force[0] -= (g * dy).sum(dim=(0, 1))
            force[1] -= (g * dx).sum(dim=(0, 1))
        per_probe = g_pos.to(torch.float64) + spread.at_probes(force).to(torch.float64)
    return np.einsum("nd,npd->p", per_probe.cpu().numpy(), fit.basis)


def scan_fit_step(model: PtychoAD, fit: ScanFit, state: ScanFitState, feed, weights: dict[str, float],
                  collective: Collective, batch_size: int) -> ScanFitState:
    """One step of the fit: the joint move's gradient, a sign-based step, probes and object moved.
    The optimizer's per-pixel state of the object stays where it is: moved along (bicubic for
    momentum, bilinear for squares), the realistic abTEM data's phase Pearson fell from 0.86 to
    0.84. Returns the new state (``state`` is not changed)."""
    centres = torch.from_numpy(model.centres_px()).to(model.objp.device, model.objp.dtype)
    spread = _Spread(centres, tuple(model.objp.shape[-2:]), fit.spread_px)
    sign = np.sign(_joint_move_gradient(model, fit, feed, weights, collective, spread, batch_size))
    agree = sign * state.last_sign
    step = np.where(agree > 0, np.minimum(state.step * STEP_GROWTH, _max_steps(fit)),
                    np.where(agree < 0, state.step * STEP_SHRINK, state.step))
    delta = np.where(agree < 0, 0.0, -sign * step)
    moves = torch.from_numpy(fit.moves_px(delta)).to(model.objp.device, model.objp.dtype)
    with torch.no_grad():
        field = spread.field(moves)
        for tensor in _moved_object_tensors(model):
            tensor.copy_(_warp(tensor.detach(), field))
    model.move_probes(moves)
    return ScanFitState(params=state.params + delta, step=step, last_sign=np.where(agree < 0, 0.0, sign),
                        measured=state.measured)


def _moved_object_tensors(model: PtychoAD) -> list[torch.Tensor]:
    """The object tensors a joint move resamples: the optimized ones (start_iter null means a
    tensor never changes, so a fixed amplitude stays as it was given)."""
    return [getattr(model, name) for name in ("objp", "obja") if model.update_rules[name].optimized]


def _max_steps(fit: ScanFit) -> np.ndarray:
    cap = np.full(fit.n_params, 4.0 * fit.settings.drift_step_px)
    cap[:4] = 4.0 * fit.settings.affine_step
    return cap


def read_state(arrays: Optional[dict[str, np.ndarray]], fit: Optional[ScanFit]) -> Optional[ScanFitState]:
    """A checkpoint's saved state, when it matches this run's fit (None: start the fit afresh)."""
    if fit is None or not arrays or len(arrays.get("params", ())) != fit.n_params:
        return None
    # a checkpoint from before the measurement existed has no "measured": nothing was measured
    return ScanFitState(**{k: np.asarray(arrays[k], dtype=np.float64) for k in ("params", "step", "last_sign")},
                        measured=np.asarray(arrays.get("measured", np.zeros(4)), dtype=np.float64))
