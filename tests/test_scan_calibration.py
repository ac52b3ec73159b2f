"""model_params.scan_fit.measure_affine: the scan's affine map measured from the data before the
first iteration (ptycho_core/scan_calibration.py)."""

import contextlib
import logging
import math

import h5py
import numpy as np
import pytest
import torch

from ptycho_core import physics
from ptycho_core.collective import Collective
from ptycho_core.config import config_from_dict
from ptycho_core.io.preprocess import preprocess
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.scan_calibration import measure_scan_affine

ENERGY_KEV, CONV_MRAD, DEFOCUS_ANG, DX_ANG, WINDOW = 300.0, 20.0, 40.0, 0.244, 64
SCAN, STEP_PX = 24, 2.0
LATTICE_PX = 16.0  # a square lattice of 3.9 Å: frequencies at 4, 5.7, 8, 8.9, 11.3 detector px
# the true scan: 3 % long along y, 2.5 % short along x, a shear of 0.015, rotated by 1.5 degrees
TRUE_MAP = np.array([[math.cos(math.radians(1.5)), math.sin(math.radians(1.5))],
                     [-math.sin(math.radians(1.5)), math.cos(math.radians(1.5))]]) @ np.array([[1.03, 0.015], [0.0, 0.975]])


def _nominal_px() -> np.ndarray:
    """(N, 2) the nominal raster (y, x) in object px, row by row."""
    rows, cols = np.meshgrid(np.arange(SCAN), np.arange(SCAN), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1) * STEP_PX


def _patterns(matrix: np.ndarray, dose: float = 2e5, seed: int = 0) -> np.ndarray:
    """(N, K, K) centred patterns of a thin crystal (a weak phase lattice) scanned at the nominal
    raster mapped by ``matrix`` about its centre, with Poisson noise of ``dose`` counts per pattern."""
    nominal = _nominal_px()
    centre = nominal.mean(axis=0)
    true = centre + (nominal - centre) @ matrix.T
    probe = physics.make_probe((WINDOW, WINDOW), DX_ANG, ENERGY_KEV, CONV_MRAD,
                               physics.aberration_coefficients(defocus_ang=DEFOCUS_ANG), dtype=torch.complex128)[0]
    y, x = torch.meshgrid(torch.arange(WINDOW, dtype=torch.float64), torch.arange(WINDOW, dtype=torch.float64),
                          indexing="ij")
    reflections = [(1, 0, 0.08), (0, 1, 0.08), (1, 1, 0.05), (1, -1, 0.05), (2, 0, 0.04), (0, 2, 0.04), (2, 1, 0.03)]
    rng = np.random.default_rng(seed)
    out = np.empty((len(true), WINDOW, WINDOW))
    for n, (ty, tx) in enumerate(true):
        phase = sum(a * torch.cos(2 * math.pi * (h * (y + ty) + k * (x + tx)) / LATTICE_PX) for h, k, a in reflections)
        pattern = torch.fft.fftshift(torch.fft.fft2(probe * torch.exp(1j * phase)).abs() ** 2).numpy()
        out[n] = rng.poisson(pattern / pattern.sum() * dose)
    return out


class _Feed:
    """Patterns (N, K, K), centred, served in batches in FFT order as the engine's feed serves them."""

    def __init__(self, patterns: np.ndarray):
        self.patterns = np.fft.ifftshift(patterns, axes=(-2, -1))

    @contextlib.contextmanager
    def prefetch(self, batches):
        yield (torch.from_numpy(self.patterns[b.numpy()]) for b in batches)


def _measure(patterns: np.ndarray):
    probe = physics.make_probe((WINDOW, WINDOW), DX_ANG, ENERGY_KEV, CONV_MRAD,
                               physics.aberration_coefficients(defocus_ang=DEFOCUS_ANG))
    return measure_scan_affine(_Feed(patterns), np.arange(len(patterns)), _nominal_px() + 40.0, STEP_PX, Collective(), probe)


@pytest.fixture(scope="module")
def distorted() -> np.ndarray:
    return _patterns(TRUE_MAP)


def test_the_map_is_measured_from_the_data(distorted):
    calibration = _measure(distorted)
    assert calibration.applied, calibration.reason
    assert calibration.frequencies >= 3
    # most of it: the scan is up to 4 % off, the measurement within 1.1 % (the readings on the
    # detector lean towards the nominal direction: a third of the rotation is missed here, 16 % on
    # the realistic abTEM data)
    error = np.abs(calibration.matrix - TRUE_MAP).max()
    assert error < 0.3 * np.abs(TRUE_MAP - np.eye(2)).max(), (calibration.matrix, TRUE_MAP)


def test_an_exact_scan_is_left_alone():
    """Measured within 0.5 % of the identity, closer than the measurement can tell: not applied."""
    calibration = _measure(_patterns(np.eye(2), seed=1))
    assert not calibration.applied and "within 1%" in calibration.reason, calibration
    np.testing.assert_array_equal(calibration.matrix, np.eye(2))


def test_data_without_strong_frequencies_keep_the_nominal_scan():
    """An amorphous specimen's transform has no peaks that stand out: nothing is applied."""
    rng = np.random.default_rng(2)
    disk = _patterns(np.eye(2), dose=1e12)[0]
    noise = rng.poisson(np.broadcast_to(disk / disk.sum() * 2e5, (SCAN * SCAN, WINDOW, WINDOW))).astype(np.float64)
    calibration = _measure(noise)
    assert not calibration.applied and calibration.reason
    np.testing.assert_array_equal(calibration.matrix, np.eye(2))


def _dataset(path, patterns: np.ndarray) -> dict:
    """A raw config for ``patterns`` written as one HDF5 file (scan_y, scan_x, ky, kx)."""
    with h5py.File(path, "w") as f:
        f["meas"] = patterns.reshape(SCAN, SCAN, WINDOW, WINDOW).astype(np.float32)
    return {
        "data": {"path": str(path), "meas_key": "meas"},
        "experiment": {"energy_kev": ENERGY_KEV, "conv_angle_mrad": CONV_MRAD, "dx_ang": DX_ANG,
                       "defocus_ang": DEFOCUS_ANG, "scan": {"shape": [SCAN, SCAN], "step_ang": STEP_PX * DX_ANG}},
        "recon_params": {"iterations": 2},
    }


def test_a_run_starts_from_the_measured_scan_and_reports_it(distorted, tmp_path, caplog):
    from ptycho_core.scan_fit import describe_saved

    config = config_from_dict(_dataset(tmp_path / "data.h5", distorted))
    prep = preprocess(config)
    rec = Reconstruction.create(config, prep)
    with caplog.at_level(logging.INFO, logger="ptyflow"):
        rec.run(0)
    assert "affine map measured" in caplog.text
    nominal = prep.geometry.positions_px
    centre = nominal.mean(axis=0)
    report = describe_saved(rec.state.scan_fit.arrays())
    measured = np.array(report["scan_measured"]["affine"])
    assert np.abs(measured - TRUE_MAP).max() < 0.3 * np.abs(TRUE_MAP - np.eye(2)).max()
    np.testing.assert_allclose(report["scan_affine"], measured, atol=1e-12)  # no step of the fit yet
    # the probes start where the measured map puts them (to the windows' float32 rounding)
    np.testing.assert_allclose(rec.model.centres_px(), centre + (nominal - centre) @ measured.T, atol=1e-3)
    # off by config: the probes stay on the nominal raster
    off = config_from_dict({**_dataset(tmp_path / "data.h5", distorted),
                            "model_params": {"scan_fit": {"measure_affine": False}}})
    rec_off = Reconstruction.create(off, prep)
    rec_off.run(0)
    np.testing.assert_allclose(rec_off.model.centres_px(), nominal, atol=1e-9)


def test_a_frequency_at_the_scans_nyquist_limit_does_not_make_the_map_depend_on_rounding():
    """On a raster, a frequency at half the scan's sampling rate and its negative are one and the
    same over the positions; kept in, they made the peaks' unmixing singular and the map a matter of
    rounding (abTEM thick SrTiO3: 0.10 px misfit on one machine, 0.32 px on another). Every second
    position of an exact raster puts the lattice's (2, 0) and (0, 2) reflections there."""
    coarse = (np.arange(SCAN)[:, None] % 2 == 0) & (np.arange(SCAN)[None, :] % 2 == 0)
    patterns = _patterns(np.eye(2), dose=2e6, seed=1)[coarse.ravel()]
    probe = physics.make_probe((WINDOW, WINDOW), DX_ANG, ENERGY_KEV, CONV_MRAD,
                               physics.aberration_coefficients(defocus_ang=DEFOCUS_ANG))
    centres = _nominal_px()[coarse.ravel()] + 40.0

    def measured(data):
        return measure_scan_affine(_Feed(data), np.arange(len(data)), centres, 2 * STEP_PX, Collective(), probe)

    exact = measured(patterns)
    # a change in the last digits of the counts, as another machine's simulation makes
    nudged = measured(patterns * (1 + 1e-12 * np.random.default_rng(3).standard_normal(patterns.shape)))
    assert exact.frequencies >= 3, exact
    np.testing.assert_allclose(nudged.matrix, exact.matrix, atol=1e-6)
    assert nudged.residual_px == pytest.approx(exact.residual_px, abs=1e-6)


def test_two_processes_measure_the_map_one_process_measures(distorted, tmp_path):
    """With recon_params.devices, each process reads its share of the patterns and the sums are
    shared (collective): the measured map is the one process's."""
    from ptycho_core.checkpoint import read_checkpoint
    from ptycho_core.stages.prepare import prepare
    from ptycho_core.stages.segment import run_segment

    measured = {}
    before = torch.get_num_threads()
    try:
        for name, devices in (("one", None), ("two", "cpu:2")):
            raw = _dataset(tmp_path / "data.h5", distorted)
            raw["recon_params"].update(iterations=1, segment_iterations=1, batch_size=32, threads=1, devices=devices)
            prepare(config_from_dict(raw), tmp_path / name)
            messages: list[str] = []
            run_segment(tmp_path / name, 1, info=messages.append)
            measured[name] = read_checkpoint(tmp_path / name / "model.hdf5").scan_fit["measured"]
    finally:
        torch.set_num_threads(before)
    assert any("devices: 2 processes" in m for m in messages), messages
    assert np.abs(measured["one"]).max() > 0.01, measured  # the map was measured and applied
    np.testing.assert_allclose(measured["two"], measured["one"], rtol=1e-9, atol=1e-12)
