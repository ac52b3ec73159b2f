"""SrTiO3 datasets simulated by abTEM (an independent multislice code), for the slow tests and for
benchmarks/quality.py."""

from pathlib import Path

import h5py
import numpy as np

LATTICE_ANG = 3.905
ENERGY_KEV = 300.0
CONV_MRAD = 25.0
DEFOCUS_ANG = 40.0
CELLS = 4  # 4x4 unit cells: a 15.62 Å periodic supercell


def simulate_srtio3(path, scan_end_cells=2.5, step_ang=0.6):
    """Write abTEM's patterns in its own layout (scan_x, scan_y, kx, ky) and keys; returns the
    true transmission phase (y, x) summed over slices and its sampling (Å)."""
    import abtem
    from ase import Atoms

    a = LATTICE_ANG
    cell = Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                 cell=[a, a, a], pbc=True)
    potential = abtem.Potential(cell * (CELLS, CELLS, 1), sampling=0.05, slice_thickness=a / 2, projection="infinite")
    probe = abtem.Probe(energy=ENERGY_KEV * 1e3, semiangle_cutoff=CONV_MRAD, defocus=DEFOCUS_ANG)
    probe.grid.match(potential)
    scan = abtem.GridScan(start=(0, 0), end=(scan_end_cells * a, scan_end_cells * a), sampling=step_ang)
    patterns = probe.scan(potential, scan=scan, detectors=abtem.PixelatedDetector(max_angle=None)).compute()
    positions_xy = np.asarray(scan.get_positions()).reshape(-1, 2)
    transmission = potential.build().transmission_function(energy=ENERGY_KEV * 1e3).compute().array
    phase_yx = np.angle(transmission).sum(axis=0).T
    with h5py.File(path, "w") as f:
        f["abtem/diffraction"] = patterns.array.astype(np.float32)  # (scan_x, scan_y, kx, ky)
        f["abtem/diffraction"].attrs["dk_inv_ang"] = patterns.sampling[0]
        f["abtem/scan_yx_ang"] = positions_xy[:, ::-1]  # same flattened order as the patterns
    return phase_yx, potential.sampling[0], patterns.sampling[0]


# The quality datasets (benchmarks/quality.py and the slow quality test): 20 mrad, 1024 patterns of
# 64², 1.6 nm and 9.4 nm thick. Patterns in ptyflow's and PtyRAD's layout, (scan_y, scan_x, ky, kx) with
# the scan row-major (y slow), so both codes read the same raster; the ground truth is the
# depth-summed transmission phase of one periodic supercell, sampled at 1/POTENTIAL_GPTS of it. The
# reconstruction pixel is exactly 1/DETECTOR_PX of the supercell, so the truth tiles any canvas.
QUALITY_CONV_MRAD = 20.0
POTENTIAL_GPTS = 320  # 0.049 Å sampling of the potential
DETECTOR_PX = 64  # patterns cropped to 64 x 64 around the undiffracted beam
SCAN_PX = 32  # 32 x 32 = 1024 positions spanning one supercell
THICKNESS_CELLS = {"thin": 4, "thick": 24}  # 1.56 nm and 9.37 nm


def simulate_quality(path: Path, thickness_cells: int, dose_e_per_ang2: float | None, seed: int = 0) -> Path:
    """Write one dataset; dose None keeps abTEM's noise-free intensities (scaled to 1e6 e/Å²)."""
    import abtem
    from ase import Atoms

    a = LATTICE_ANG
    cell = Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                 cell=[a, a, a], pbc=True)
    supercell = cell * (CELLS, CELLS, thickness_cells)
    potential = abtem.Potential(supercell, gpts=POTENTIAL_GPTS, slice_thickness=a / 2, projection="infinite")
    probe = abtem.Probe(energy=ENERGY_KEV * 1e3, semiangle_cutoff=QUALITY_CONV_MRAD, defocus=DEFOCUS_ANG)
    probe.grid.match(potential)
    period_ang = CELLS * a
    step_ang = period_ang / SCAN_PX
    scan = abtem.GridScan(start=(0, 0), end=(period_ang, period_ang), gpts=SCAN_PX, endpoint=False)
    measured = probe.scan(potential, scan=scan, detectors=abtem.PixelatedDetector(max_angle=None)).compute()
    patterns = np.asarray(measured.array)  # (scan_x, scan_y, kx, ky), DC at the centre
    cy, cx = patterns.shape[-2] // 2, patterns.shape[-1] // 2
    half = DETECTOR_PX // 2
    patterns = patterns[..., cy - half:cy + half, cx - half:cx + half].transpose(1, 0, 3, 2)  # (sy, sx, ky, kx)
    dose_for_counts = dose_e_per_ang2 or 1e6
    patterns = patterns / patterns.sum(axis=(-2, -1)).mean() * dose_for_counts * step_ang**2
    if dose_e_per_ang2 is not None:
        patterns = np.random.default_rng(seed).poisson(patterns).astype(np.float32)
    transmission = potential.build().transmission_function(energy=ENERGY_KEV * 1e3).compute().array
    phase_yx = np.angle(transmission).sum(axis=0).T  # abTEM arrays are [x, y]
    dk_inv_ang = float(measured.sampling[0])
    wavelength = 12.398419843320026 / np.sqrt(ENERGY_KEV * (ENERGY_KEV + 2 * 510.99895))
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["meas"] = patterns.astype(np.float32)
        f["truth_phase"] = phase_yx.astype(np.float64)
        f.attrs.update({
            "energy_kev": ENERGY_KEV, "conv_angle_mrad": QUALITY_CONV_MRAD, "defocus_ang": DEFOCUS_ANG,
            "dk_mrad": dk_inv_ang * wavelength * 1e3, "dx_ang": 1 / (DETECTOR_PX * dk_inv_ang),
            "step_ang": step_ang, "period_ang": period_ang, "thickness_ang": thickness_cells * a,
            "dose_e_per_ang2": dose_e_per_ang2 or 0.0, "truth_sampling_ang": float(potential.sampling[0]),
        })
    return path


def quality_config(data: Path, slices: int, iterations: int) -> dict:
    """A raw ptyflow config for a quality dataset with only data, optics, slicing and iterations:
    everything else is left to the defaults."""
    with h5py.File(data, "r") as f:
        attrs = dict(f.attrs)
        scan = f["meas"].shape[:2]
    return {
        "data": {"path": str(data), "meas_key": "meas"},
        "experiment": {
            "energy_kev": float(attrs["energy_kev"]), "conv_angle_mrad": float(attrs["conv_angle_mrad"]),
            "dx_ang": float(attrs["dx_ang"]), "defocus_ang": float(attrs["defocus_ang"]),
            "scan": {"shape": list(scan), "step_ang": float(attrs["step_ang"])},
        },
        "init": {"object": {"n_slices": slices, "slice_thickness_ang": float(attrs["thickness_ang"]) / slices}},
        "recon_params": {"iterations": iterations},
    }


def quality_dataset(folder: Path, name: str, noisy: bool = True) -> Path:
    """The cached dataset ``name`` (thin or thick), simulated on first use."""
    path = Path(folder) / f"sto_{name}_{'noisy' if noisy else 'clean'}.h5"
    if not path.exists():
        simulate_quality(path, THICKNESS_CELLS[name], 1e6 if noisy else None)
    return path


# scoring a reconstruction against the quality datasets' truth
def truth_on_grid(truth: np.ndarray, n_px: int, shift_px=(0.0, 0.0)) -> np.ndarray:
    """The periodic truth (T, T) resampled to n_px x n_px pixels per period by Fourier cropping (an
    ideal low-pass: the reconstruction holds nothing finer) and shifted by shift_px (y, x) pixels."""
    centre, half = truth.shape[0] // 2, n_px // 2
    spectrum = np.fft.fftshift(np.fft.fft2(truth))[centre - half:centre + half, centre - half:centre + half]
    freq = np.fft.fftfreq(n_px)
    ramp = np.exp(-2j * np.pi * (freq[:, None] * shift_px[0] + freq[None, :] * shift_px[1]))
    return np.real(np.fft.ifft2(np.fft.ifftshift(spectrum) * ramp)) * (n_px / truth.shape[0]) ** 2


def _best_integer_shift(field: np.ndarray, tiled_truth: np.ndarray, period: int) -> tuple[float, tuple[int, int]]:
    h, w = field.shape
    windows = np.lib.stride_tricks.sliding_window_view(tiled_truth, (h, w))[:period, :period]  # (P, P, h, w)
    f = (field - field.mean()) / field.std()
    std = windows.std(axis=(-2, -1))
    corr = (np.einsum("abhw,hw->ab", windows, f) / (h * w)) / std  # f has zero mean: no window mean needed
    best = np.unravel_index(np.argmax(corr), corr.shape)
    return float(corr[best]), (int(best[0]), int(best[1]))


def phase_score(phase_sum: np.ndarray, positions_px: np.ndarray, truth: np.ndarray, period_px: int) -> float:
    """Best Pearson of the reconstruction's phase over the scanned field with the truth, over all
    shifts (integer search, then sub-pixel steps of 0.1 px)."""
    lo = np.ceil(positions_px.min(axis=0)).astype(int)
    hi = np.floor(positions_px.max(axis=0)).astype(int) + 1
    field = np.asarray(phase_sum, dtype=np.float64)[lo[0]:hi[0], lo[1]:hi[1]]
    h, w = field.shape
    if h > period_px or w > period_px:
        field = field[:period_px, :period_px]
        h, w = field.shape
    base = truth_on_grid(truth, period_px)
    tiled = np.tile(base, (2, 2))
    score, (sy, sx) = _best_integer_shift(field, tiled, period_px)
    f = (field - field.mean()) / field.std()
    for dy in np.arange(-0.5, 0.51, 0.1):
        for dx in np.arange(-0.5, 0.51, 0.1):
            shifted = np.tile(truth_on_grid(truth, period_px, (-dy, -dx)), (2, 2))[sy:sy + h, sx:sx + w]
            s = float(np.mean(f * (shifted - shifted.mean())) / shifted.std())
            score = max(score, s)
    return score


def score_against_truth(phase_sum: np.ndarray, positions_px: np.ndarray, data: Path) -> float:
    """phase_score of a depth-summed phase (Ny, Nx) whose probe centres are positions_px (N, 2),
    against the truth stored in a quality dataset."""
    with h5py.File(data, "r") as f:
        truth = f["truth_phase"][()]
        period_px = int(round(f.attrs["period_ang"] / f.attrs["dx_ang"]))
    return phase_score(phase_sum, positions_px, truth, period_px)
