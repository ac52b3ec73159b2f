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


# --------------------------------------------------------------------------- realistic data
# What a real instrument adds to the quality datasets (issue 30). Every number is a choice of this
# module, written into the file's attributes and truth/ group with the true positions.
REALISTIC_THICKNESS_CELLS = 8  # 3.12 nm, reconstructed in 4 slices
REALISTIC_SLICES = 4
REALISTIC_GPTS = 256  # 0.061 Å sampling of the potential: coarser than the quality sets, for 7 configurations
REALISTIC_DOSE_E_PER_ANG2 = 5e4
PHONON_SIGMA_ANG = 0.08  # frozen phonons: Gaussian displacement std per direction (x, y, z)
SOURCE_SIGMA_ANG = 0.2  # finite source: Gaussian std per axis of the source's image on the specimen
SOURCE_POINTS = 7  # configurations: each one phonon configuration and one source point
# the global error of the raster: true = centre + M (nominal - centre), M = R(rotation) [[sy, shear], [0, sx]]
SCAN_SCALE_YX = (0.98, 1.03)  # step 2 % short along y (slow), 3 % long along x (fast)
SCAN_ROTATION_DEG = 1.5  # the same sense as experiment.scan.rotation_deg
SCAN_SHEAR = 0.02  # x displacement of the y axis, per step
# drift of the probe relative to the specimen over the scan's time t in [0, 1] (acquisition order):
# a settling part A (1 - exp(-t / tau)) plus a steady part v t, in object pixels (y, x)
DRIFT_SETTLE_PX = (3.0, -2.0)
DRIFT_SETTLE_TAU = 0.12
DRIFT_STEADY_PX = (0.5, 1.0)
JITTER_PX = 0.3  # independent Gaussian error of every position, std per axis
# detector point-spread function: a Gaussian core and a weak wide tail (what charge sharing and
# backscatter in the sensor do), in detector pixels
PSF_CORE_PX = 0.6
PSF_TAIL_PX = 3.0
PSF_TAIL_FRACTION = 0.1


def scan_affine_matrix(scale_yx=SCAN_SCALE_YX, rotation_deg=SCAN_ROTATION_DEG, shear=SCAN_SHEAR) -> np.ndarray:
    """The 2x2 map M acting on (y, x) column vectors: rotation (ptyflow's sense) after scale and shear."""
    t = np.radians(rotation_deg)
    rotation = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    return rotation @ np.array([[scale_yx[0], shear], [0.0, scale_yx[1]]])


def drift_px(t: np.ndarray, settle_px=DRIFT_SETTLE_PX, tau=DRIFT_SETTLE_TAU, steady_px=DRIFT_STEADY_PX) -> np.ndarray:
    """(N, 2) drift (y, x) in object pixels at scan times t (N,) in [0, 1]; zero at t = 0."""
    t = np.asarray(t, dtype=np.float64)[:, None]
    return np.asarray(settle_px) * -np.expm1(-t / tau) + np.asarray(steady_px) * t


def identifiable_scan_error(nominal_yx: np.ndarray, smooth_yx: np.ndarray, drift: np.ndarray) -> dict:
    """Split a smooth scan error into what data can tell apart. On a raster the scan time t is linear
    in the scan indices (t = (row * n_cols + col) / (N - 1)), so a steady drift is exactly an affine
    map plus an offset: no fit can tell it from a wrong step or shear. What is determined: the drift's
    departure from steady, the drift minus the straight line from its first to its last value (zero at
    the start and at the end of the scan), and the affine map that holds everything linear in the
    nominal positions, the straight line included. nominal_yx, smooth_yx (N, 2) in one unit, drift
    (N, 2) in that unit at the same N positions in acquisition order; returns the affine M (2, 2)
    (about any centre: an offset absorbs the rest) and the departure (N, 2)."""
    t = np.linspace(0.0, 1.0, len(drift))[:, None]
    departure = drift - drift[:1] - t * (drift[-1:] - drift[:1])
    design = np.column_stack([np.ones(len(nominal_yx)), nominal_yx])  # (N, 3)
    coeffs, *_ = np.linalg.lstsq(design, smooth_yx - departure, rcond=None)  # exact: no residual
    return {"affine": coeffs[1:].T, "drift_beyond_steady": departure}


def describe_affine_yx(matrix: np.ndarray) -> dict:
    """M = R(rotation) [[1 + scale_y, shear], [0, 1 + scale_x]] (scan_affine_matrix's form) read back:
    scale_pct [y, x], rotation_deg and shear, by the QR decomposition with a positive diagonal."""
    q, r = np.linalg.qr(np.asarray(matrix, dtype=np.float64))
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    q, r = q * signs[None, :], r * signs[:, None]
    return {"scale_pct": [100 * (r[0, 0] - 1), 100 * (r[1, 1] - 1)],
            "rotation_deg": float(np.degrees(np.arctan2(q[0, 1], q[0, 0]))), "shear": float(r[0, 1])}


def realistic_scan(scan_shape: tuple[int, int], step_ang: float, dx_ang: float, seed: int) -> dict:
    """Nominal raster (what a user's config states) and true probe positions (y, x) in Å, row by row
    (y slow) as ptyflow's raster_positions_ang orders them; scan time t is the acquisition index
    over (N - 1)."""
    iy, ix = np.meshgrid(np.arange(scan_shape[0]), np.arange(scan_shape[1]), indexing="ij")
    nominal = np.stack([iy.ravel(), ix.ravel()], axis=1) * step_ang
    n = len(nominal)
    t = np.arange(n) / (n - 1)
    centre = nominal.mean(axis=0)
    matrix = scan_affine_matrix()
    smooth = centre + (nominal - centre) @ matrix.T + drift_px(t) * dx_ang
    jitter = np.random.default_rng(seed + 1).normal(0.0, JITTER_PX, (n, 2)) * dx_ang
    return {"nominal": nominal, "true": smooth + jitter, "smooth": smooth, "t": t, "centre": centre,
            "affine": matrix}


def _source_offsets_ang() -> np.ndarray:
    """(SOURCE_POINTS, 2) equally weighted points with the source Gaussian's mean (0) and covariance
    (SOURCE_SIGMA_ANG² I): the centre and a hexagon of radius sigma sqrt(7/3)."""
    angles = np.arange(SOURCE_POINTS - 1) * np.pi / 3
    radius = SOURCE_SIGMA_ANG * np.sqrt(SOURCE_POINTS / 3)
    ring = radius * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    return np.vstack([np.zeros((1, 2)), ring])


def detector_psf(patterns: np.ndarray) -> np.ndarray:
    """The detector's point-spread function on the last two axes: a Gaussian core plus a wide tail."""
    from scipy import ndimage

    sigma_core = (0,) * (patterns.ndim - 2) + (PSF_CORE_PX, PSF_CORE_PX)
    sigma_tail = (0,) * (patterns.ndim - 2) + (PSF_TAIL_PX, PSF_TAIL_PX)
    return ((1 - PSF_TAIL_FRACTION) * ndimage.gaussian_filter(patterns, sigma_core, mode="constant")
            + PSF_TAIL_FRACTION * ndimage.gaussian_filter(patterns, sigma_tail, mode="constant"))


def simulate_realistic(path: Path, dose_e_per_ang2: float = REALISTIC_DOSE_E_PER_ANG2, seed: int = 0) -> Path:
    """A dataset as a microscope records it, in the quality datasets' layout and attributes (meas
    (scan_y, scan_x, ky, kx), 64² patterns, 1024 positions, 300 keV, 20 mrad, 40 Å defocus, SrTiO3
    [001] 3.12 nm thick) with:

    - frozen phonons: SOURCE_POINTS abTEM FrozenPhonons configurations, std PHONON_SIGMA_ANG per
      direction;
    - a finite source (partial spatial coherence): the pattern at a position is the incoherent mean
      of patterns with the probe displaced by points of the source's Gaussian (std SOURCE_SIGMA_ANG
      per axis). SOURCE_POINTS equally weighted points carry its mean and covariance, and each is
      simulated with its own phonon configuration: the mean over configurations averages over the
      phonons and over the source together (each configuration is one independent draw of both);
    - scan errors (truth/): a global affine error of the raster about its centre (step scale,
      rotation, shear), a drift in acquisition order (settling plus steady) and Gaussian jitter;
    - a detector point-spread function (detector_psf) applied to each pattern before cropping;
    - Poisson noise at dose_e_per_ang2 (counts per pattern: dose x nominal step²).

    The file holds the nominal raster only as attributes (step_ang, like the quality datasets: ptyflow
    and PtyRAD build it from experiment.scan) and the truth under truth/: positions_yx_ang (N, 2),
    smooth_positions_yx_ang (no jitter), drift_px (N, 2), scan_time (N,), the affine (attrs) and
    the identifiable split (see identifiable_scan_error). truth_phase is the depth-summed
    transmission phase averaged over the phonon configurations."""
    import abtem
    from ase import Atoms

    a = LATTICE_ANG
    cell = Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                 cell=[a, a, a], pbc=True)
    supercell = cell * (CELLS, CELLS, REALISTIC_THICKNESS_CELLS)
    period_ang = CELLS * a
    step_ang = period_ang / SCAN_PX
    dx_ang = period_ang / DETECTOR_PX
    scan = realistic_scan((SCAN_PX, SCAN_PX), step_ang, dx_ang, seed)
    margin = 16  # detector pixels kept around the crop so the PSF's tail sees its neighbours
    crop = DETECTOR_PX + 2 * margin
    total = np.zeros((len(scan["true"]), crop, crop))
    phase_yx = np.zeros((REALISTIC_GPTS, REALISTIC_GPTS))
    for k, offset in enumerate(_source_offsets_ang()):
        phonons = abtem.FrozenPhonons(supercell, num_configs=1, sigmas=PHONON_SIGMA_ANG, seed=seed * 1000 + k)
        displaced = phonons.randomize(supercell)  # this configuration's atoms, as abTEM would draw them
        potential = abtem.Potential(displaced, gpts=REALISTIC_GPTS, slice_thickness=a / 2, projection="infinite")
        probe = abtem.Probe(energy=ENERGY_KEV * 1e3, semiangle_cutoff=QUALITY_CONV_MRAD, defocus=DEFOCUS_ANG)
        probe.grid.match(potential)
        positions_xy = (scan["true"] + offset)[:, ::-1]  # abTEM takes (x, y)
        measured = probe.scan(potential, scan=abtem.CustomScan(positions_xy),
                              detectors=abtem.PixelatedDetector(max_angle=None)).compute()
        patterns = np.asarray(measured.array).reshape(len(positions_xy), *measured.array.shape[-2:])  # (N, kx, ky)
        cy, cx = patterns.shape[-2] // 2, patterns.shape[-1] // 2
        total += patterns[:, cy - crop // 2:cy + crop // 2, cx - crop // 2:cx + crop // 2].transpose(0, 2, 1)
        transmission = np.asarray(potential.build().transmission_function(energy=ENERGY_KEV * 1e3).compute().array)
        phase_yx += np.angle(transmission).reshape(-1, REALISTIC_GPTS, REALISTIC_GPTS).sum(axis=0).T
        dk_inv_ang = float(measured.sampling[-1])
    patterns = detector_psf(total / SOURCE_POINTS)[:, margin:margin + DETECTOR_PX, margin:margin + DETECTOR_PX]
    patterns = patterns / patterns.sum(axis=(-2, -1)).mean() * dose_e_per_ang2 * step_ang**2
    patterns = np.random.default_rng(seed).poisson(patterns).astype(np.float32)
    wavelength = 12.398419843320026 / np.sqrt(ENERGY_KEV * (ENERGY_KEV + 2 * 510.99895))
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["meas"] = patterns.reshape(SCAN_PX, SCAN_PX, DETECTOR_PX, DETECTOR_PX)
        f["truth_phase"] = phase_yx / SOURCE_POINTS
        write_scan_truth(f, scan, dx_ang, seed)
        f.attrs.update({
            "energy_kev": ENERGY_KEV, "conv_angle_mrad": QUALITY_CONV_MRAD, "defocus_ang": DEFOCUS_ANG,
            "dk_mrad": dk_inv_ang * wavelength * 1e3, "dx_ang": dx_ang,
            "step_ang": step_ang, "period_ang": period_ang, "thickness_ang": REALISTIC_THICKNESS_CELLS * a,
            "dose_e_per_ang2": dose_e_per_ang2, "truth_sampling_ang": period_ang / REALISTIC_GPTS,
        })
    return path


def write_scan_truth(f: h5py.File, scan: dict, dx_ang: float, seed: int) -> None:
    """The truth/ group of a realistic dataset: positions, drift, the scan-error parameters and their
    identifiable split (identifiable_scan_error, in object pixels), replacing any there."""
    if "truth" in f:
        del f["truth"]
    drift = drift_px(scan["t"])
    split = identifiable_scan_error(scan["nominal"] / dx_ang, scan["smooth"] / dx_ang, drift)
    departure = split["drift_beyond_steady"]
    largest = [float(departure[np.argmax(np.abs(departure[:, axis])), axis]) for axis in (0, 1)]
    effective = describe_affine_yx(split["affine"])
    truth = f.create_group("truth")
    truth["positions_yx_ang"] = scan["true"]
    truth["smooth_positions_yx_ang"] = scan["smooth"]
    truth["nominal_positions_yx_ang"] = scan["nominal"]
    truth["drift_px"] = drift
    truth["drift_beyond_steady_px"] = departure
    truth["scan_time"] = scan["t"]
    truth["source_offsets_yx_ang"] = _source_offsets_ang()
    truth.attrs.update({
        "affine_yx": scan["affine"], "affine_centre_yx_ang": scan["centre"],
        "scale_yx": SCAN_SCALE_YX, "rotation_deg": SCAN_ROTATION_DEG, "shear": SCAN_SHEAR,
        "drift_settle_px": DRIFT_SETTLE_PX, "drift_settle_tau": DRIFT_SETTLE_TAU,
        "drift_steady_px": DRIFT_STEADY_PX, "drift_end_px": drift[-1], "jitter_px": JITTER_PX,
        "affine_with_steady_drift_yx": split["affine"],
        "affine_with_steady_drift_scale_pct": effective["scale_pct"],
        "affine_with_steady_drift_rotation_deg": effective["rotation_deg"],
        "affine_with_steady_drift_shear": effective["shear"],
        "drift_beyond_steady_largest_px": largest,
        "phonon_sigma_ang": PHONON_SIGMA_ANG, "phonon_configurations": SOURCE_POINTS,
        "source_sigma_ang": SOURCE_SIGMA_ANG, "psf_core_px": PSF_CORE_PX, "psf_tail_px": PSF_TAIL_PX,
        "psf_tail_fraction": PSF_TAIL_FRACTION, "seed": seed,
    })


def realistic_dataset(folder: Path, name: str = "realistic", seed: int = 0) -> Path:
    """The cached realistic dataset ``name``, simulated on first use (written to a temporary name and
    renamed, so an interrupted simulation leaves no half file behind)."""
    path = Path(folder) / f"sto_{name}_seed{seed}.h5"
    if not path.exists():
        partial = path.with_suffix(".partial.h5")
        simulate_realistic(partial, seed=seed)
        partial.rename(path)
    return path


# config settings (dotted keys) that give a run the realistic dataset's true positions instead of
# the nominal raster that quality_config states
TRUE_POSITIONS = {"data.pos_key": "truth/positions_yx_ang", "data.pos_unit": "ang"}
