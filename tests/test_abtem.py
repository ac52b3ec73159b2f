"""Against abTEM, code nobody here wrote (slow; needs `pip install abtem`)."""

import numpy as np
import pytest
from scipy import ndimage

from ptycho_core.config import config_from_dict
from ptycho_core.io.preprocess import read_preprocessed
from ptycho_core.physics import wavelength_ang
from ptycho_core.reconstruction import Reconstruction, phase_pearson, scanned_field_mask
from ptycho_core.rundir import prepare

pytestmark = pytest.mark.slow
pytest.importorskip("abtem")

from abtem_data import CONV_MRAD, DEFOCUS_ANG, ENERGY_KEV, simulate_srtio3  # noqa: E402


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
    assert abs(prep.dk_mrad - dk_inv_ang * lam * 1e3) < 1e-9 and prep.measurements.shape[1:] == (64, 64)
    assert score >= 0.9 and raw_score >= 0.85
    # a wrong defocus sign gives a wrong probe: same run with the sign flipped must score clearly lower
    flipped = config.model_copy(deep=True)
    flipped.experiment.defocus_ang = -DEFOCUS_ANG
    flipped.model_params.update_params.probe.start_iter = None
    bad = Reconstruction.create(flipped, prep)
    bad.run(10)
    assert phase_pearson(bad.model.objp.detach().numpy()[0, 0], truth, mask) < score - 0.2
