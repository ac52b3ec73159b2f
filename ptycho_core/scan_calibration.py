"""The scan's affine map measured from the data before the first iteration
(model_params.scan_fit.measure_affine).

Every spatial frequency of the specimen shows in a dataset twice:
- over the scan: the patterns' Fourier transform over the probe positions peaks at the frequency
  as the nominal positions see it, Q_nom (cycles per object px);
- on the detector: at that scan frequency the bright-field disk holds its overlaps with copies of
  itself shifted by plus and minus the frequency as it truly is, q = K Q_true in detector px (the
  "trotters" of single-sideband ptychography; K is the pattern's size, since dx = lambda / (K dk)).
With true = centre + M (nominal - centre), a wave exp(2 pi i Q_true . r_true) reads
exp(2 pi i (M^T Q_true) . r_nom) over the nominal positions, so Q_nom = M^T Q_true, and a few strong
frequencies in two directions give M. Neither the object nor the probe enters, and so neither does
the probe's defocus, which trades against the scan's common scale in any fit of the positions
(scan_fit.py: the shadow image in each pattern has the size defocus / step).

The detector side is read from where G(k) (the patterns' transform at Q_nom, over detector pixels
k) changes abruptly: the squared gradient |grad_k G|^2 is matched to the mean pattern's edge
shifted by +-q, and q is the best match. That reading is biased by a few tenths of a pixel: the
edges in G are those of the aperture's amplitude, not its intensity, and the lenses' insides carry
the defocus's phase ramps. So the same reading is done on patterns simulated with the run's own
probe (and detector blur) and a weak phase grating at each frequency, where the answer is known,
and its error there is taken off. On abTEM data of SrTiO3 (300 keV, 20 mrad, 40 A defocus) the
raw reading missed the scale by 1 to 2 %, the corrected one by 0.5 % (thin) and 0.1 % (thick).
Each frequency's corrected reading is still off by up to 2 % in its own way (on clean data (200)
+0.5 %, (110) 0, (220) -0.9 %, (310) -1 to -2 %), which the nine or ten frequencies of ideal data
average out; on the realistic set a finite source damps the higher orders until four are read, and
the scale comes out 1 % short, with or without its detector blur in the simulation
(benchmarks/measured/realistic.md). Each peak
over the scan is searched with the others' sidelobes taken out (_separate): on a scan four lattice
periods wide they moved the peaks by a few hundredths of a pixel, a percent of the map.

Nothing here is applied unless enough frequencies agree and the map is further from the nominal
scan than the measurement's own accuracy (ScanCalibration.applied); a specimen without strong
frequencies inside the disk's overlap range leaves the scan as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import forward as fw

MAX_POSITIONS = 4096  # the positions nearest the scan's centre that are used (the map is global)
MAX_FREQUENCIES = 12  # the strongest scan frequencies read on the detector
# frequencies are searched this many of the scan's frequency bins (1 / extent) below its Nyquist limit;
# a peak is refined by up to 0.8 bins, and its alias must stay more than a bin away
NYQUIST_MARGIN_BINS = 2.0
BINNED_PX = 16  # the detector is binned to this size while the frequencies are searched
MIN_EDGE_MATCH = 0.7  # a frequency whose edges match the shifted disk's worse than this is not used
MAX_RESIDUAL_PX = 0.15  # the map's rms misfit on the detector above which it is not applied
MAX_ERROR = 0.15  # a measured map further than this from the identity is not believed
# a map closer than this to the identity is left alone: the measurement is good to about 0.5 % on ideal
# abTEM SrTiO3 (1 to 1.4 % on the realistic sets, whose scans are 2 to 3 % off), and on ideal thin data
# applying a 0.4 % error cost 0.012 in Pearson
MIN_ERROR = 0.01
SIMULATED_POSITIONS = 256  # positions of the simulated patterns that measure the reading's bias
GRATING_RAD = 0.05  # phase amplitude of the simulated grating: a weak phase object


@dataclass(frozen=True)
class ScanCalibration:
    """matrix (2, 2): M acting on (y, x) about the scan's centre (true = centre + M (nominal -
    centre)); the identity when not applied. frequencies: how many the map rests on; residual_px:
    its rms misfit on the detector; reason: why it was not applied (empty when it was)."""

    matrix: np.ndarray
    applied: bool
    frequencies: int
    residual_px: float
    reason: str = ""


def measure_scan_affine(feed, indices: np.ndarray, centres_px: np.ndarray, step_px: float, collective,
                        probe: torch.Tensor, detector_blur_std: float | None = None) -> ScanCalibration:
    """The scan's affine map from patterns ``indices`` (sorted) at nominal probe centres
    ``centres_px`` (N, 2) in object px, ``step_px`` the scan step. ``feed`` streams the patterns
    (B, K, K) in FFT order; ``collective`` sums over the processes that hold them; ``probe``
    (modes, K, K), real space, and ``detector_blur_std`` (detector px) are the run's own, which
    the simulated patterns that measure the reading's bias are made with."""
    probe = probe.detach().to("cpu", torch.complex128)
    chosen = _nearest_centre(indices, centres_px, MAX_POSITIONS)
    r = torch.from_numpy(centres_px[chosen] - centres_px[chosen].mean(axis=0))  # (S, 2) float64
    chunks = [c for c in collective.own(torch.from_numpy(chosen)).tensor_split(max(1, math.ceil(len(chosen) / 256)))
              if len(c)]
    where = {int(i): n for n, i in enumerate(chosen)}
    local = [torch.tensor([where[int(i)] for i in c], dtype=torch.long) for c in chunks]

    def patterns():
        with torch.no_grad(), feed.prefetch(chunks) as fed:
            for rows, meas in zip(local, fed):
                yield rows, torch.fft.fftshift(meas.detach().to("cpu", torch.float64), dim=(-2, -1))

    extent = (r.max(0).values - r.min(0).values + step_px).numpy()
    k = probe.shape[-1]

    def pooled(images: torch.Tensor) -> torch.Tensor:  # (B, K, K) -> (B, BINNED_PX ** 2)
        return torch.nn.functional.adaptive_avg_pool2d(images[:, None], BINNED_PX)[:, 0].reshape(len(images), -1)

    # one pass for the mean and the binned patterns: pooling is linear, so the mean comes off after
    mean = torch.zeros((k, k), dtype=torch.float64)  # (a process may hold none of the chosen patterns)
    binned = [torch.zeros((0, BINNED_PX ** 2), dtype=torch.float64)]
    for _, meas in patterns():
        mean = mean + meas.sum(0)
        binned.append(pooled(meas))
    mean = collective.sum(mean) / len(chosen)  # (K, K), the disk at the centre
    disk = _Disk(mean / mean.max())
    rows_here = torch.cat([torch.zeros(0, dtype=torch.long), *local])
    spectrum = _ScanSpectrum(r[rows_here], torch.cat(binned) - pooled(mean[None]), collective)

    # below the scan's Nyquist limit by NYQUIST_MARGIN_BINS: on a raster a frequency there and its
    # negative are the same over the positions, and unmixing them is a matter of rounding
    q_max = min(0.5 / step_px - NYQUIST_MARGIN_BINS / float(extent.min()), (2 * disk.radius - 3) / k)
    peaks = _strongest(lambda q: (spectrum.transform(q).abs() ** 2).sum(-1), extent, q_max, 2.0 / k)
    peaks = _separate(peaks, spectrum, extent)
    if len(peaks) < 3:
        return _not_applied(f"{len(peaks)} strong scan frequencies in the disks' overlap range (3 needed)")

    def transforms(q: torch.Tensor) -> torch.Tensor:  # (P, 2) cycles/px -> (P, K * K)
        total = torch.zeros((len(q), k * k), dtype=torch.complex128)
        for rows, meas in patterns():
            total += torch.exp(-2j * math.pi * (q @ r[rows].T)) @ (meas - mean).reshape(len(rows), -1).to(torch.complex128)
        return collective.sum(total)

    # each peak's detector signature with the others' sidelobes taken out, as in _separate
    both = torch.cat([peaks, -peaks])
    fine = _unmix(spectrum.overlaps(both, both), transforms(both))[: len(peaks)].reshape(-1, k, k) * len(chosen)
    power = (fine.abs() ** 2).sum((1, 2))
    # a random sample: a regular one (every n-th position of a raster) aliases some frequencies
    sampled = torch.from_numpy(np.sort(np.random.default_rng(0).permutation(len(r))[:SIMULATED_POSITIONS]))
    rows = []
    for q_nom, g, p in zip(peaks, fine, power):
        q, match = disk.locate(g, q_nom * k)
        if match >= MIN_EDGE_MATCH:
            # the reading's own error, where the answer is q_nom * k
            simulated = _simulated_transform(probe, detector_blur_std, q_nom, r[sampled])
            bias = disk.locate(simulated, q_nom * k)[0] - q_nom * k
            rows.append((q_nom.numpy(), (q - bias).numpy(), float(p)))
    return _fit_map(rows, k)


def _simulated_transform(probe: torch.Tensor, detector_blur_std: float | None, q_nom: torch.Tensor,
                         r: torch.Tensor) -> torch.Tensor:
    """(K, K) the transform at q_nom (cycles/px) of patterns simulated at positions ``r`` (S, 2) px
    with ``probe`` (modes, K, K; real space) through a weak phase grating of that frequency."""
    k = probe.shape[-1]
    window = torch.stack(torch.meshgrid(torch.arange(k, dtype=torch.float64), torch.arange(k, dtype=torch.float64),
                                        indexing="ij"))  # (2, K, K)
    phase = 2 * math.pi * (q_nom[0] * (r[:, 0, None, None] + window[0]) + q_nom[1] * (r[:, 1, None, None] + window[1]))
    # the run's own forward model (one slice, one object mode)
    grating = fw.transmission(torch.ones_like(phase), GRATING_RAD * torch.cos(phase))[:, None, None]  # (S, 1, 1, K, K)
    exit_waves = fw.multislice_exit_waves(probe.expand(len(r), -1, -1, -1), grating, None)
    patterns = fw.farfield_intensity(exit_waves, torch.ones(1, dtype=torch.float64))
    if detector_blur_std:
        patterns = fw.gaussian_blur(patterns, detector_blur_std)
    patterns = patterns - patterns.mean(0)
    return torch.einsum("s,skl->kl", torch.exp(-2j * math.pi * (r @ q_nom)), patterns.to(torch.complex128))


def _nearest_centre(indices: np.ndarray, centres_px: np.ndarray, limit: int) -> np.ndarray:
    """Up to ``limit`` of ``indices`` (sorted), the ones nearest the scan's centre: a block of the
    scan keeps its frequencies sharp, where a sample spread over all of it would not."""
    if len(indices) <= limit:
        return np.asarray(indices)
    c = centres_px[indices]
    distance = np.abs(c - c.mean(axis=0)).max(axis=1)
    return np.sort(np.asarray(indices)[np.argsort(distance, kind="stable")[:limit]])


def _strongest(transform, extent: np.ndarray, q_max: float, q_min: float) -> torch.Tensor:
    """(P, 2) the strongest scan frequencies (cycles/px, one of each +-pair), each refined to its
    local maximum between grid points. ``transform`` maps (M, 2) frequencies to their power."""
    ny, nx = (int(math.floor(q_max * e)) for e in extent)
    fy = torch.arange(-1, ny + 1, dtype=torch.float64) / extent[0]
    fx = torch.arange(-nx, nx + 1, dtype=torch.float64) / extent[1]
    # a half plane (each +-pair once) and the row below it, so that a peak just across the border
    # is seen as a maximum of its own and not as a false one at the border
    grid = torch.stack(torch.meshgrid(fy, fx, indexing="ij"), -1)  # (ny + 2, 2 nx + 1, 2)
    power = transform(grid.reshape(-1, 2)).reshape(grid.shape[:2])
    size = grid.norm(dim=-1)
    power[(size < q_min) | (size > q_max)] = 0.0
    padded = torch.nn.functional.pad(power[None, None], (1, 1, 1, 1), mode="constant", value=0.0)
    local_max = power >= torch.nn.functional.max_pool2d(padded, 3, 1)[0, 0]
    local_max[0] = False  # the row below: its maxima are the other half's
    local_max[1, :nx] = False
    candidates = torch.nonzero(local_max & (power > 0))
    order = torch.argsort(power[candidates[:, 0], candidates[:, 1]], descending=True)[:MAX_FREQUENCIES]
    bins = torch.tensor([1.0 / extent[0], 1.0 / extent[1]], dtype=torch.float64)
    peaks = [_refine(transform, grid[iy, ix], 0.6 * bins)[0] for iy, ix in candidates[order].tolist()]
    return torch.stack(peaks) if peaks else torch.zeros((0, 2), dtype=torch.float64)


class _ScanSpectrum:
    """The patterns' transform over the probe positions, on the binned detector: this process's
    positions r (S, 2) px and binned patterns less their mean (S, BINNED_PX ** 2)."""

    def __init__(self, r: torch.Tensor, binned: torch.Tensor, collective):
        self.r, self.binned, self.collective = r, binned.to(torch.complex128), collective

    def phases(self, q: torch.Tensor) -> torch.Tensor:
        """(M, S) exp(-2 pi i q . r) for frequencies q (M, 2) in cycles/px."""
        return torch.exp(-2j * math.pi * (q @ self.r.T))

    def transform(self, q: torch.Tensor, phases: torch.Tensor | None = None) -> torch.Tensor:
        """(M, BINNED_PX ** 2) the transform at q (M, 2)."""
        return self.collective.sum((self.phases(q) if phases is None else phases) @ self.binned)

    def overlaps(self, q: torch.Tensor, peaks: torch.Tensor, phases: torch.Tensor | None = None) -> torch.Tensor:
        """(M, P) the scan's own transform at q - peaks: how much of a peak's signal shows at q."""
        return self.collective.sum((self.phases(q) if phases is None else phases) @ self.phases(peaks).conj().T)


def _separate(peaks: torch.Tensor, spectrum: _ScanSpectrum, extent: np.ndarray, rounds: int = 2) -> torch.Tensor:
    """The peaks (P, 2) refined each with the others taken out. On a scan a few lattice periods
    wide a peak's sidelobes reach its neighbours and pull them by a few hundredths of a pixel on the
    detector's scale, a percent of the map; so the patterns' transform is fitted as the sum of all
    peaks (each a complex amplitude per binned detector pixel times the scan's own transform about
    +-its frequency), and each peak is searched again in what the others leave."""
    if len(peaks) < 2:
        return peaks
    bins = torch.from_numpy(1.0 / extent)
    for _ in range(rounds):
        both = torch.cat([peaks, -peaks])  # (2P, 2): each real signal's +- pair
        # the transform at each of the 2P frequencies is the sum of every peak's window there
        amplitudes = _unmix(spectrum.overlaps(both, both), spectrum.transform(both))  # (2P, pixels)
        refined = []
        for n, q in enumerate(peaks):
            others = [m for m in range(len(both)) if m != n]

            def power_of(trial: torch.Tensor, others=others) -> torch.Tensor:
                phases = spectrum.phases(trial)
                leak = spectrum.overlaps(trial, both[others], phases)
                return ((spectrum.transform(trial, phases) - leak @ amplitudes[others]).abs() ** 2).sum(-1)
            refined.append(_refine(power_of, q, 0.3 * bins)[0])
        peaks = torch.stack(refined)
    return peaks


def _unmix(overlaps: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The peaks' amplitudes (2P, ...) whose windows sum to ``values`` (2P, ...) at the peaks:
    overlaps (2P, 2P) @ amplitudes = values. Least squares that drops directions the scan cannot
    tell apart (two peaks that are one over the positions) instead of amplifying rounding in them."""
    return torch.linalg.lstsq(overlaps, values, rcond=1e-10, driver="gelsd").solution


def _refine(score_of, centre: torch.Tensor, span, points: int = 9) -> tuple[torch.Tensor, float]:
    """The best of ``score_of`` ((M, 2) trial points -> (M,) scores) within +-span (a float or (2,),
    per axis) of ``centre`` (2,), by three ever finer points x points grids, each a quarter of the
    last one's span about its best point; returns that point and its score."""
    score = float("-inf")
    for _ in range(3):
        steps = torch.linspace(-1.0, 1.0, points, dtype=torch.float64)
        trial = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2) * span + centre
        scores = score_of(trial)
        best = int(torch.argmax(scores))
        centre, span, score = trial[best], span / 4, float(scores[best])
    return centre, score


class _Disk:
    """The bright-field disk of the mean pattern (K, K), centred, normalised to 1: its edges,
    shifted, are what the transforms' edges are matched to."""

    def __init__(self, mean: torch.Tensor):
        self.mean = mean.clamp(0.0, 1.0)
        k = mean.shape[-1]
        inside = self.mean > 0.5
        self.radius = math.sqrt(float(inside.sum()) / math.pi)
        # two pixels in from the rim: the rim's own edge is as strong as any arc, and not moved by q
        self.interior = inside.double()
        for _ in range(2):
            self.interior = -torch.nn.functional.max_pool2d(-self.interior[None, None], 3, 1, 1)[0, 0]
        self.frequencies = (torch.fft.fftfreq(k, dtype=torch.float64)[:, None], torch.fft.fftfreq(k, dtype=torch.float64)[None, :])
        gy, gx = torch.gradient(self.mean)
        self._edge_spectrum = torch.fft.fft2(torch.sqrt(gy ** 2 + gx ** 2))

    def _shifted_edges(self, q: torch.Tensor) -> torch.Tensor:
        """(M, K, K) the edge map shifted by each of q (M, 2) px."""
        fy, fx = self.frequencies
        # the ramp as a product of one row and one column: a K-th of the exponentials
        ramp = torch.exp(-2j * math.pi * q[:, 0, None, None] * fy) * torch.exp(-2j * math.pi * q[:, 1, None, None] * fx)
        return torch.fft.ifft2(self._edge_spectrum * ramp).real

    def locate(self, transform: torch.Tensor, q_guess: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The shift q (2,) px near ``q_guess`` whose disk edges at +-q best match the edges of
        ``transform`` (K, K) inside the disk, and how well (Pearson, -1..1)."""
        edges = _edge_energy(transform)
        target = edges * self.interior
        target = target - target.mean()

        def match_of(trial: torch.Tensor) -> torch.Tensor:  # (M, 2) shifts -> (M,) Pearson
            template = self.interior * (self._shifted_edges(trial) + self._shifted_edges(-trial))
            template = template - template.mean((1, 2), keepdim=True)
            return (template * target).sum((1, 2)) / (template.norm(dim=(1, 2)) * target.norm()).clamp(min=1e-30)

        return _refine(match_of, q_guess.clone(), 0.12 * float(q_guess.norm()) + 0.5, points=11)


def _edge_energy(images: torch.Tensor) -> torch.Tensor:
    """(..., K, K) the squared differences to each pixel's four neighbours, summed: large where a
    (real or complex) image steps."""
    edges = torch.zeros(images.shape, dtype=torch.float64)
    for axis in (-2, -1):
        n = images.shape[axis]
        step = (images.narrow(axis, 1, n - 1) - images.narrow(axis, 0, n - 1)).abs() ** 2
        edges.narrow(axis, 0, n - 1).add_(step)
        edges.narrow(axis, 1, n - 1).add_(step)
    return edges


def _fit_map(rows: list[tuple[np.ndarray, np.ndarray, float]], k: int) -> ScanCalibration:
    """M from (Q_nom (2,), q (2,) px, power) of each frequency: q = K M^-T Q_nom by least squares
    weighted by the square root of the power, refitted without the frequency that misses most
    while it misses by far more than the rest (a weak frequency near the overlap range's end can
    be read a few tenths of a pixel off)."""
    q_nom = np.array([row[0] for row in rows]).reshape(-1, 2)
    q = np.array([row[1] for row in rows]).reshape(-1, 2)
    weight = np.sqrt(np.array([row[2] for row in rows]))[:, None]
    keep = np.ones(len(rows), dtype=bool)
    while True:
        if keep.sum() < 3:
            return _not_applied(f"{int(keep.sum())} scan frequencies whose disk edges could be read (3 needed)")
        directions = q_nom[keep] / np.linalg.norm(q_nom[keep], axis=1, keepdims=True)
        if np.linalg.svd(directions, compute_uv=False)[-1] < 0.3 * math.sqrt(keep.sum()):
            return _not_applied("the strong scan frequencies do not span two directions")
        c = np.linalg.lstsq(q_nom[keep] * weight[keep], q[keep] * weight[keep], rcond=None)[0].T  # q = c Q_nom
        miss = np.where(keep, np.linalg.norm(q - q_nom @ c.T, axis=1), -1.0)
        worst = int(np.argmax(miss))
        rest = np.delete(miss, worst)
        if keep.sum() <= 3 or miss[worst] <= max(0.05, 3 * float(np.median(rest[rest >= 0]))):
            break
        keep[worst] = False
    residual = float(np.sqrt(np.average(miss[keep] ** 2, weights=weight[keep, 0] ** 2)))
    matrix = np.linalg.inv(c / k).T
    n = int(keep.sum())
    if residual > MAX_RESIDUAL_PX:
        return _not_applied(f"the frequencies disagree by {residual:.2f} px on the detector", n, residual)
    if np.abs(matrix - np.eye(2)).max() > MAX_ERROR:
        return _not_applied(f"a map {np.round(matrix, 3).tolist()} further from the nominal scan than "
                            f"{MAX_ERROR:.0%}", n, residual)
    if np.abs(matrix - np.eye(2)).max() < MIN_ERROR:
        return _not_applied(f"the scan is within {MIN_ERROR:.0%} of nominal ({np.round(matrix, 4).tolist()}), "
                            "closer than the measurement can tell", n, residual)
    return ScanCalibration(matrix=matrix, applied=True, frequencies=n, residual_px=residual)


def _not_applied(reason: str, frequencies: int = 0, residual_px: float = float("nan")) -> ScanCalibration:
    return ScanCalibration(matrix=np.eye(2), applied=False, frequencies=frequencies, residual_px=residual_px, reason=reason)
