"""Against abTEM, code nobody here wrote (slow; needs `pip install abtem`)."""

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import ndimage

from ptycho_core.config import config_from_dict, set_dotted
from ptycho_core.io.preprocess import read_preprocessed
from ptycho_core.physics import wavelength_ang
from ptycho_core.quality import phase_pearson, scanned_field_mask
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.stages.prepare import prepare

pytestmark = pytest.mark.slow
pytest.importorskip("abtem")

from abtem_data import (CONV_MRAD, DEFOCUS_ANG, ENERGY_KEV, REALISTIC_SLICES, TRUE_POSITIONS, quality_config,  # noqa: E402
                        quality_dataset, realistic_dataset, score_against_truth,
                        simulate_srtio3)


def test_reconstructs_an_abtem_dataset_from_config_alone(tmp_path):
    phase, sampling, dk_inv_ang = simulate_srtio3(tmp_path / "sto.h5")
    lam = wavelength_ang(ENERGY_KEV)
    config = config_from_dict({
        # abTEM's own layout and key names; only the config adapts them
        "data": {"path": str(tmp_path / "sto.h5"), "meas_key": "/abtem/diffraction", "pos_key": "/abtem/scan_yx_ang"},
        "experiment": {"energy_kev": ENERGY_KEV, "conv_angle_mrad": CONV_MRAD,
                       "dk_mrad": dk_inv_ang * lam * 1e3, "defocus_ang": DEFOCUS_ANG},
        "preprocess": {"transpose": True, "target_size_px": 64},
        "model_params": {"update_params": {
            "obja": {"start_iter": 1, "lr": 5e-3}, "objp": {"start_iter": 1, "lr": 5e-3},
            "probe": {"start_iter": 5, "lr": 1e-3}, "probe_pos_shifts": {"start_iter": None, "lr": 0}}},
        "recon_params": {"iterations": 40, "batch_size": 16},
    })
    prepare(config, tmp_path / "run")
    prep = read_preprocessed(tmp_path / "run" / "preprocessed.h5")
    rec = Reconstruction.create(config, prep)
    rec.run(40)
    ours = rec.model.objp.detach().numpy()[0, 0]

    # abTEM's transmission phase on our canvas (the supercell is periodic)
    rows, cols = np.mgrid[: ours.shape[0], : ours.shape[1]].astype(float)
    y = prep.positions_ang[0, 0] + (rows - prep.geometry.positions_px[0, 0]) * prep.dx_ang
    x = prep.positions_ang[0, 1] + (cols - prep.geometry.positions_px[0, 1]) * prep.dx_ang
    ky = np.fft.fftfreq(phase.shape[0], sampling)[:, None]
    kx = np.fft.fftfreq(phase.shape[1], sampling)[None]
    # the data carry spatial frequencies up to twice the aperture; beyond is not recoverable
    band_limited = np.real(np.fft.ifft2(np.fft.fft2(phase) * (np.hypot(ky, kx) <= 2 * CONV_MRAD * 1e-3 / lam)))
    truth = ndimage.map_coordinates(band_limited, [y / sampling, x / sampling], order=1, mode="grid-wrap")
    raw_truth = ndimage.map_coordinates(phase, [y / sampling, x / sampling], order=1, mode="grid-wrap")
    mask = scanned_field_mask(prep.geometry.positions_px, prep.geometry.canvas_shape)
    score, raw_score = phase_pearson(ours, truth, mask), phase_pearson(ours, raw_truth, mask)
    print(f"abTEM SrTiO3: phase Pearson {score:.3f} (band-limited truth), {raw_score:.3f} (raw)")
    assert abs(prep.dk_mrad - dk_inv_ang * lam * 1e3) < 1e-9 and prep.window == (64, 64)
    assert score >= 0.9 and raw_score >= 0.85
    # a wrong defocus sign gives a wrong probe: same run with the sign flipped must score clearly lower
    flipped = config.model_copy(deep=True)
    flipped.experiment.defocus_ang = -DEFOCUS_ANG
    flipped.model_params.update_params.probe.start_iter = None
    bad = Reconstruction.create(flipped, prep)
    bad.run(10)
    assert phase_pearson(bad.model.objp.detach().numpy()[0, 0], truth, mask) < score - 0.2


@pytest.mark.parametrize("antialias_cutoff, band_limit, tolerance", [
    (10.0, None, 1e-5),  # abTEM's antialiasing off, ours off: the same multislice to round-off
    (2 / 3, 2 / 3, 1e-5),  # both band-limited to 2/3 of Nyquist: the same again
])
def test_forward_model_agrees_with_abtem_multislice(antialias_cutoff, band_limit, tolerance):
    """Same transmission slices, probe, sampling and energy: the same diffraction intensities, with
    and without the 2/3-of-Nyquist band limit (abTEM's antialiasing aperture); without ours, abTEM's
    band-limited multislice differs from ours by far more than round-off (checked below)."""
    error = _multislice_error_against_abtem(antialias_cutoff, band_limit)
    print(f"abTEM multislice, antialias cutoff {antialias_cutoff:.3g}, ours {band_limit}: relative error {error:.2e}")
    assert error < tolerance
    if band_limit is not None:
        unlimited = _multislice_error_against_abtem(antialias_cutoff, None)
        print(f"  ours without the band limit: {unlimited:.2e}")
        assert unlimited > 100 * tolerance


def _multislice_error_against_abtem(antialias_cutoff, band_limit):
    """Relative error of our intensities against abTEM's, inside the band both keep."""
    import abtem
    import torch
    from ase import Atoms

    from ptycho_core.model import TENSOR_NAMES, PtychoAD, UpdateRule

    a = 3.905
    cell = Atoms("SrTiO3", scaled_positions=[(0, 0, 0), (0.5, 0.5, 0.5), (0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)],
                 cell=[a, a, a], pbc=True)
    energy_ev, dz = 200e3, a / 2
    with abtem.config.set({"antialias.cutoff": antialias_cutoff, "antialias.taper": 0.0}):
        potential = abtem.Potential(cell * (3, 3, 6), gpts=128, slice_thickness=dz, projection="infinite")
        probe = abtem.Probe(energy=energy_ev, semiangle_cutoff=20, defocus=30)
        probe.grid.match(potential)
        position = np.array([[5.0, 6.0]])
        wave = probe.build(scan=position).compute().array.reshape(128, 128)
        exit_wave = probe.multislice(potential, scan=position).compute().array.reshape(128, 128)
        # the transmission functions as they are before abTEM band-limits them
        transmission = potential.build().transmission_function(energy=energy_ev).compute().array
    theirs = (np.abs(np.fft.fft2(exit_wave)) ** 2).T  # abTEM arrays are [x, y]; FFT order
    tensors = {
        "obja": torch.from_numpy(np.abs(transmission).transpose(0, 2, 1)[None].copy()),
        "objp": torch.from_numpy(np.angle(transmission).transpose(0, 2, 1)[None].copy()),
        "obj_tilts": torch.zeros(1, 2, dtype=torch.float64),
        "slice_thickness": torch.tensor(dz, dtype=torch.float64),
        "probe": torch.from_numpy(wave.T.copy())[None].to(torch.complex128),
        "probe_pos_shifts": torch.zeros(1, 2, dtype=torch.float64),
    }
    model = PtychoAD(tensors, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, dtype=torch.float64),
                     potential.sampling[0], wavelength_ang(energy_ev / 1e3), {n: UpdateRule(None, 0.0) for n in TENSOR_NAMES},
                     band_limit=band_limit)
    ours = model(torch.arange(1), centered=False).detach().numpy()[0]
    # abTEM propagates after the last slice too, through its aperture; compare inside the band
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(128, potential.sampling[0]), np.fft.fftfreq(128, potential.sampling[0]),
                              indexing="ij"))
    band = k < min(antialias_cutoff, 1.0) / (2 * potential.sampling[0])
    theirs = theirs / theirs[band].sum() * ours[band].sum()  # abTEM's FFT is not orthonormal
    return float(np.linalg.norm((ours - theirs)[band]) / np.linalg.norm(theirs[band]))


def test_probe_from_aberrations_matches_abtem():
    """Defocus, two-fold astigmatism, axial coma, three-fold astigmatism and Cs, with angles:
    the same probe as abTEM's (the overlap of the two wave functions is 1)."""
    import abtem
    import torch

    from ptycho_core.physics import aberration_coefficients, make_probe

    n, dx, energy_kev, conv = 96, 0.2, 300.0, 25.0
    aberrations = {"C10": -40.0, "C12": 30.0, "phi12": 0.7, "C21": 800.0, "phi21": 1.2, "C23": 300.0,
                   "phi23": -0.4, "C30": 2e4}
    probe = abtem.Probe(energy=energy_kev * 1e3, semiangle_cutoff=conv, gpts=n, sampling=dx, aberrations=aberrations)
    theirs = probe.build(scan=np.array([[n // 2 * dx, n // 2 * dx]])).compute().array.reshape(n, n).T

    def ours(extra):
        coeffs = aberration_coefficients(defocus_ang=40.0, cs_mm=2e-3, extra=extra)
        return make_probe((n, n), dx, energy_kev, conv, coeffs, dtype=torch.complex128)[0].numpy()

    def overlap(a, b):
        return abs(np.vdot(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b))

    extra = {k: v for k, v in aberrations.items() if k not in ("C10", "C30")}
    mirrored = {k: (-v if k.startswith("phi") else v) for k, v in extra.items()}
    assert overlap(theirs, ours(extra)) > 0.9999
    assert overlap(theirs, ours(mirrored)) < 0.5  # the angles matter, and ours run the same way


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory):
    return tmp_path_factory.mktemp("abtem_quality")


# Floors from benchmarks/quality.py (2026-11-26): the defaults reached 0.937 (thin) and 0.928 (thick)
# in 20 iterations, PtyRAD 1.0.0 at its defaults 0.764 and 0.747 in 100.
@pytest.mark.parametrize("name, slices, floor", [("thin", 1, 0.88), ("thick", 8, 0.86)])
def test_defaults_reconstruct_abtem_srtio3_in_20_iterations(quality_data, tmp_path, name, slices, floor):
    """Only data, optics and slicing given: in 20 iterations the depth-summed phase correlates with
    abTEM's projected potential better than PtyRAD 1.0.0 reaches in 100 at its own defaults."""
    data = quality_dataset(quality_data, name)
    config = config_from_dict(quality_config(data, slices, 20))
    prepare(config, tmp_path / "run")
    rec = Reconstruction.create(config, read_preprocessed(tmp_path / "run" / "preprocessed.h5"))
    rec.run(20)
    score = score_against_truth(rec.model.objp.detach().numpy()[0].sum(axis=0), rec.model.centres_px(), data)
    print(f"abTEM SrTiO3 {name}: phase Pearson {score:.3f} after 20 iterations at the defaults")
    assert score > floor


# --------------------------------------------------------------------------- realistic data (issue 30)
@pytest.fixture(scope="module")
def realistic_data(tmp_path_factory):
    """The realistic dataset (abtem_data.simulate_realistic, about 2.5 minutes on 2 cores);
    PTYFLOW_ABTEM_CACHE names a folder that keeps it between sessions."""
    folder = os.environ.get("PTYFLOW_ABTEM_CACHE") or tmp_path_factory.mktemp("abtem_realistic")
    return realistic_dataset(Path(folder))


# issue 30 (2026-12-04, benchmarks/measured/realistic.md): given the true positions, the defaults reached
# 0.891 in 20 iterations (0.909 before the scan fit); given the nominal raster 0.870 (0.685 before)
TRUE_POSITIONS_FLOOR = 0.87


def _realistic_config(data, iterations, settings=()):
    raw = quality_config(data, REALISTIC_SLICES, iterations)
    for key, value in dict(settings).items():
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def _realistic_run(data, run_dir, iterations, settings=()):
    """(phase Pearson against the truth, the probes' moves (N, 2) in px) after ``iterations`` at the
    defaults (plus settings)."""
    config = _realistic_config(data, iterations, settings)
    prepare(config, run_dir)
    rec = Reconstruction.create(config, read_preprocessed(run_dir / "preprocessed.h5"))
    start_px = rec.model.centres_px().copy()
    rec.run(iterations)
    score = score_against_truth(rec.model.objp.detach().numpy()[0].sum(axis=0), rec.model.centres_px(), data)
    return score, rec.model.centres_px() - start_px


def _realistic_score(data, run_dir, iterations, settings=()):
    return _realistic_run(data, run_dir, iterations, settings)[0]


def _measured_scan(data, run_dir, settings=()):
    """The scan_calibration result of a run's start on ``data`` (nominal raster unless settings)."""
    from ptycho_core.engine import measure_scan_map

    config = _realistic_config(data, 1, settings) if "realistic" in Path(data).name else \
        config_from_dict(quality_config(data, 1, 1))
    prepare(config, run_dir)
    rec = Reconstruction.create(config, read_preprocessed(run_dir / "preprocessed.h5"))
    return measure_scan_map(rec.model, rec.problem)


def test_the_scan_map_is_measured_on_realistic_data_and_left_alone_on_ideal(realistic_data, quality_data, tmp_path):
    """Issue 30: before the first iteration the scan's affine map is read from the data
    (scan_calibration.py). On the realistic data it is 3 % off: measured within 2 % (the source's
    partial coherence leaves few scan frequencies to read, each with its own bias). On the
    ideal data it is exact: measured within 1 %, so left alone."""
    with h5py.File(realistic_data, "r") as f:
        nominal, smooth = f["truth/nominal_positions_yx_ang"][()], f["truth/smooth_positions_yx_ang"][()]
    design = np.concatenate([np.ones((len(nominal), 1)), nominal], axis=1)
    truth = np.linalg.lstsq(design, smooth, rcond=None)[0][1:].T  # the smooth error's linear part
    measured = _measured_scan(realistic_data, tmp_path / "realistic")
    print(f"realistic: measured {measured}; truth {truth.tolist()}")
    assert measured.applied, measured.reason
    assert np.abs(measured.matrix - truth).max() < 0.02
    assert np.abs(measured.matrix - truth).max() < 0.5 * np.abs(truth - np.eye(2)).max()
    for name in ("thin", "thick"):
        ideal = _measured_scan(quality_dataset(quality_data, name), tmp_path / name)
        print(f"{name}: {ideal}")
        assert not ideal.applied and "within 1%" in ideal.reason, ideal


def test_realistic_dataset_keeps_its_truth(realistic_data, tmp_path):
    """ptyflow reads the nominal raster by default; the file's true positions are that raster under the
    stated affine map, drift and jitter, and the identifiable split adds up to the same smooth error."""
    with h5py.File(realistic_data, "r") as f:
        truth = {key: f["truth"][key][()] for key in f["truth"]}
        attrs, dx_ang = dict(f["truth"].attrs), float(f.attrs["dx_ang"])
    prepare(_realistic_config(realistic_data, 1), tmp_path / "run")
    prep = read_preprocessed(tmp_path / "run" / "preprocessed.h5")
    np.testing.assert_allclose(prep.positions_ang, truth["nominal_positions_yx_ang"], atol=1e-9)
    nominal, centre = truth["nominal_positions_yx_ang"], attrs["affine_centre_yx_ang"]
    smooth = centre + (nominal - centre) @ attrs["affine_yx"].T + truth["drift_px"] * dx_ang
    np.testing.assert_allclose(truth["smooth_positions_yx_ang"], smooth, atol=1e-9)
    jitter_px = (truth["positions_yx_ang"] - smooth) / dx_ang
    assert abs(jitter_px.std() - attrs["jitter_px"]) < 0.03 and np.abs(jitter_px.mean(axis=0)).max() < 0.05
    error_px = (smooth - nominal) / dx_ang
    assert np.abs(error_px).max() > 3  # a few pixels: the positions ptyflow is given are far off
    # offset + the affine holding the steady drift + the drift beyond steady = the smooth error, exactly
    departure = truth["drift_beyond_steady_px"]
    np.testing.assert_allclose(departure[[0, -1]], 0.0, atol=1e-12)
    assert np.abs(departure).max() > 1  # the settling is more than a straight line
    effective = (smooth / dx_ang - departure) * dx_ang
    offset = (effective - nominal @ attrs["affine_with_steady_drift_yx"].T).mean(axis=0)
    np.testing.assert_allclose(effective, offset + nominal @ attrs["affine_with_steady_drift_yx"].T, atol=1e-9)
    true_settings = dict(TRUE_POSITIONS)
    prepare(_realistic_config(realistic_data, 1, true_settings), tmp_path / "true")
    np.testing.assert_allclose(read_preprocessed(tmp_path / "true" / "preprocessed.h5").positions_ang,
                               truth["positions_yx_ang"], atol=1e-9)


def test_defaults_on_realistic_data_come_within_003_of_the_true_positions(realistic_data, tmp_path):
    """Issue 30: on data with scan errors, the defaults given the nominal raster reach in 20 iterations
    a phase Pearson within 0.03 of the same run given the positions the probe really had, and their
    positions end closer to the true ones than half the raster's smooth error (the scan's map and
    drift; 2026-12-05: 1.29 px RMS from the raster, 0.50 px after 20 iterations, seed 1 0.55 px)."""
    nominal, moves_px = _realistic_run(realistic_data, tmp_path / "nominal", 20)
    true = _realistic_score(realistic_data, tmp_path / "true", 20, TRUE_POSITIONS)
    with h5py.File(realistic_data, "r") as f:
        dx_ang = float(f.attrs["dx_ang"])
        raster_px = f["truth/nominal_positions_yx_ang"][()] / dx_ang
        smooth_px = f["truth/smooth_positions_yx_ang"][()] / dx_ang

    def smooth_error_px(positions_px):  # RMS less the common shift, which only moves the image
        error = positions_px - smooth_px
        return float(np.sqrt(((error - error.mean(axis=0)) ** 2).sum(axis=1).mean()))

    before, after = smooth_error_px(raster_px), smooth_error_px(raster_px + moves_px)
    print(f"realistic abTEM SrTiO3, 20 iterations at the defaults: phase Pearson {nominal:.3f} from the nominal "
          f"raster, {true:.3f} from the true positions; smooth scan error {before:.2f} -> {after:.2f} px RMS")
    assert true > TRUE_POSITIONS_FLOOR  # the data allow a good reconstruction
    assert nominal > true - 0.03
    assert after < 0.5 * before


@pytest.mark.xfail(strict=True, reason="issue 30: the measured and fitted scan (model_params.scan_fit) is not within "
                   "20 % of the truth on any term (2026-12-04: scale y +0.23 % against +1.36 %, x +1.25 % against "
                   "+2.99 %, rotation 1.07 against 1.54 deg, shear 0.026 against 0.020, drift knots up to 1.27 "
                   "against 1.75 px). The measured common scale, which the fit keeps, is 1 % short: the finite "
                   "source leaves four scan frequencies whose disk edges can be read, and each reading is off by "
                   "up to 2 % (on clean data nine or ten average out); the fit ends near where it starts "
                   "(benchmarks/measured/realistic.md, 'Why the measured common scale is 1 % short'). And on clean "
                   "data, where the measured common scale is exact, the fit walks the y/x anisotropy away from the "
                   "truth (-0.65 % to -0.03 % against -0.79 %; 'The fit's path on clean data'): issue 30 blocked")
def test_fitted_scan_affine_and_drift_match_the_truth(realistic_data, tmp_path):
    """Issue 30: the scan fit's affine map and drift (summary["scan_fit"]) within 20 % of the truth
    after 20 iterations at the defaults. The truth is stated in the fit's own terms: the
    least-squares parameters of its basis (scan_fit.ScanFit) for the true smooth positions."""
    from ptycho_core.scan_fit import ScanFit, describe
    from ptycho_core.stages.export import run_summary
    from ptycho_core.stages.segment import run_segment

    run_dir = tmp_path / "run"
    config = _realistic_config(realistic_data, 20)
    prepare(config, run_dir)
    run_segment(run_dir, 20)
    fitted = run_summary(run_dir)["scan_fit"]
    with h5py.File(realistic_data, "r") as f:
        dx_ang = float(f.attrs["dx_ang"])
        nominal = f["truth/nominal_positions_yx_ang"][()] / dx_ang
        smooth = f["truth/smooth_positions_yx_ang"][()] / dx_ang
    basis = ScanFit(nominal, config.model_params.scan_fit, np.arange(len(nominal))).basis
    n, p, _ = basis.shape
    design = np.concatenate([basis.transpose(0, 2, 1).reshape(2 * n, p), np.tile(np.eye(2), (n, 1))], axis=1)
    truth = describe(np.linalg.lstsq(design, (smooth - nominal).reshape(-1), rcond=None)[0][:p])
    print(f"scan fit after 20 iterations: {fitted}; truth in its terms: {truth}")
    for name, fit, true in [("scale y", fitted["scan_scale_pct"][0] / 100, truth["scan_scale_pct"][0] / 100),
                            ("scale x", fitted["scan_scale_pct"][1] / 100, truth["scan_scale_pct"][1] / 100),
                            ("rotation", np.radians(fitted["scan_rotation_deg"]), np.radians(truth["scan_rotation_deg"])),
                            ("shear", fitted["scan_shear"], truth["scan_shear"])]:
        assert abs(fit - true) <= 0.2 * max(abs(true), 0.01), f"{name}: fitted {fit:.4f}, truth {true:.4f}"
    fit_knots, true_knots = np.array(fitted["scan_drift_px"]), np.array(truth["scan_drift_px"])
    assert np.abs(fit_knots - true_knots).max() <= 0.2 * np.abs(true_knots).max(), (fit_knots, true_knots)
