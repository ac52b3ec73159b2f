"""model_params.scan_fit: the scan's affine map and drift fitted by joint moves of probes and object."""

import numpy as np
import pytest
import torch

from ptycho_core.checkpoint import read_checkpoint
from ptycho_core.config import ConfigError, ScanFitParams
from ptycho_core.io.preprocess import preprocess
from ptycho_core.quality import phase_pearson, scanned_field_mask
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.scan_fit import ScanFit, describe
from ptycho_core.simulate import read_ground_truth, simulate

from helpers import config_with

# a steady drift during a raster is a wrong step and shear of the scan: 0.5 Å down and 0.4 Å
# across over a 12 Å scan is about 4 % of step (y) and 3 % of shear
DRIFT_ANG = (0.5, 0.4)


@pytest.fixture(scope="module")
def drifted(tmp_path_factory):
    return simulate("small", tmp_path_factory.mktemp("drifted"), seed=4, drift_ang=DRIFT_ANG)


def _truth_in_fit_terms(config, prep) -> np.ndarray:
    """The least-squares parameters of the fit's own basis (plus a common shift) for the true
    positions: what a perfect fit would report."""
    truth_px = read_ground_truth(config.data.path)["positions_px"]
    fit = ScanFit(prep.geometry.positions_px, config.model_params.scan_fit, np.arange(len(truth_px)))
    n, p, _ = fit.basis.shape
    design = np.concatenate([fit.basis.transpose(0, 2, 1).reshape(2 * n, p), np.tile(np.eye(2), (n, 1))], axis=1)
    theta, *_ = np.linalg.lstsq(design, (truth_px - prep.geometry.positions_px).reshape(-1), rcond=None)
    return theta[:p]


def _run(config_path, iterations, **overrides):
    config = config_with(config_path, **{"recon_params.iterations": iterations, **overrides})
    prep = preprocess(config)
    rec = Reconstruction.create(config, prep)
    rec.run(iterations)
    truth = read_ground_truth(config.data.path)["objp"][0]
    mask = scanned_field_mask(prep.geometry.positions_px, prep.geometry.canvas_shape)
    score = phase_pearson(rec.model.objp.detach().numpy()[0].sum(0), truth.sum(0), mask)
    return rec, config, prep, score


def test_a_drifted_scan_is_fitted_and_the_image_follows(drifted):
    rec, config, prep, score = _run(drifted, 15, **{"model_params.scan_fit.fit_scale": True})
    _, _, _, score_default = _run(drifted, 15)  # the common scale left alone
    _, _, _, score_without = _run(drifted, 15, **{"model_params.scan_fit.start_iter": None})
    fitted, truth = describe(rec.state.scan_fit.params), describe(_truth_in_fit_terms(config, prep))
    matrix_error = np.abs(np.array(fitted["scan_affine"]) - np.array(truth["scan_affine"])).max()
    assert matrix_error < 0.3 * np.abs(np.array(truth["scan_affine"]) - np.eye(2)).max(), (fitted, truth)
    assert score > score_without + 0.05, (score, score_without)
    assert score_default > score_without + 0.03, (score_default, score_without)


def test_an_exact_scan_stays_put(small_dataset):
    rec, _, _, score = _run(small_dataset, 12)
    fitted = describe(rec.state.scan_fit.params)
    assert max(abs(v) for v in fitted["scan_scale_pct"]) < 0.5 and abs(fitted["scan_rotation_deg"]) < 0.3, fitted
    assert score >= 0.9


def test_a_resume_mid_fit_steps_as_an_uninterrupted_run(drifted, tmp_path, one_thread):
    config = config_with(drifted, **{"recon_params.iterations": 6})
    prep = preprocess(config)
    whole = Reconstruction.create(config, prep)
    whole.run(6)
    first = Reconstruction.create(config, prep)
    first.run(4)
    first.save(tmp_path / "model.hdf5")
    ckpt = read_checkpoint(tmp_path / "model.hdf5")
    assert set(ckpt.scan_fit) == {"params", "step", "last_sign", "measured"}
    second = Reconstruction.create(config, prep)
    second.resume(ckpt)
    second.run(6)
    for name in ("objp", "obja", "probe_pos_shifts"):
        assert torch.equal(getattr(whole.model, name), getattr(second.model, name)), name
    np.testing.assert_array_equal(whole.state.scan_fit.params, second.state.scan_fit.params)
    np.testing.assert_array_equal(whole.state.scan_fit.step, second.state.scan_fit.step)


def test_the_fit_is_reported_by_summary_and_inspect(drifted, tmp_path):
    from ptycho_core.inspect import inspect_path
    from ptycho_core.stages.export import run_summary
    from ptycho_core.stages.prepare import prepare

    config = config_with(drifted, **{"recon_params.iterations": 4})
    run_dir = tmp_path / "run"
    prepare(config, run_dir)
    rec = Reconstruction.create(config, preprocess(config))
    rec.run(4)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    rec.save(run_dir / "checkpoints" / "iter_000004.h5")
    summary = run_summary(run_dir)
    report = inspect_path(run_dir / "checkpoints" / "iter_000004.h5")
    for fit in (summary["scan_fit"], report["scan_fit"]):
        assert fit == describe(rec.state.scan_fit.params)
        assert len(fit["scan_drift_px"]) == config.model_params.scan_fit.drift_segments - 1
    # the positions figure draws it: the map in its title, the drift against the time beside
    from ptycho_core.io.figures import _positions, pyplot
    from ptycho_core.scan_fit import describe_saved

    figure = _positions(pyplot(), rec.view(), rec.model.centres_px(), describe_saved(rec.state.scan_fit.arrays()))
    assert len(figure.axes) == 2 and figure.get_suptitle().startswith("scan: step ")
    drift_y = figure.axes[1].lines[0].get_ydata()
    np.testing.assert_allclose(drift_y[1:-1], np.array(summary["scan_fit"]["scan_drift_px"])[:, 0])
    # the CLI says it on one line, in a user's units
    import subprocess

    from conftest import cli
    shown = subprocess.run(cli("inspect", run_dir / "checkpoints" / "iter_000004.h5"), capture_output=True, text=True)
    line = next(l for l in shown.stdout.splitlines() if l.startswith("scan_fit:"))
    scale_y = summary["scan_fit"]["scan_scale_pct"][0]
    assert f"step {scale_y:+.2f} % (y)" in line and "rotation" in line and "drift" in line, line


def test_the_fit_is_off_when_positions_are_not_refined(small_dataset):
    config = config_with(small_dataset, **{"model_params.update_params.probe_pos_shifts": {"start_iter": None, "lr": 0}})
    rec = Reconstruction.create(config, preprocess(config))
    assert rec.problem.scan_fit is None


def test_a_stop_before_the_start_is_a_config_error(small_dataset):
    with pytest.raises((ConfigError, ValueError), match="stop_iter"):
        config_with(small_dataset, **{"model_params.scan_fit": {"start_iter": 5, "stop_iter": 3}})
    assert ScanFitParams().start_iter == 2


def test_a_run_that_followed_an_acquisition_does_not_fit_the_scan(drifted):
    """Live mode: no step while the scan is acquired, nor after its completion."""
    import dataclasses

    from ptycho_core.arrivals import Arrivals

    config = config_with(drifted, **{"recon_params.iterations": 8})
    prep = preprocess(config)
    rec = Reconstruction.create(config, prep)
    n = rec.model.n_positions
    rec.problem = dataclasses.replace(rec.problem, arrivals=Arrivals(acquired=n // 2, acquiring=True))
    rec.run(3)
    assert rec.state.scan_fit is None and rec.state.history["acquiring"] == [1.0, 1.0, 1.0]
    rec.problem = dataclasses.replace(rec.problem, arrivals=Arrivals(acquired=n, acquiring=False))
    rec.run(8)
    assert rec.state.scan_fit is None
    # the same file read whole (no acquisition followed): the fit steps from its start_iter
    complete = Reconstruction.create(config, prep)
    complete.problem = dataclasses.replace(complete.problem, arrivals=Arrivals(acquired=n, acquiring=False))
    complete.run(2)
    assert complete.state.scan_fit is not None


@pytest.mark.parametrize("n", [2, 50, 4096, 4097, 20000])
def test_the_scan_step_is_the_median_distance_to_the_nearest_other_centre(n):
    """quality.scan_step_px (the fit's spread, every positions figure) against scipy's k-d tree, on
    a jittered raster, scattered centres, lines, a spot scanned many times and duplicates: up to
    4096 centres every one counts (a duplicate is at 0 px), above a sample of about 2048 against all
    (a centre at the very place of a sampled one does not count)."""
    from scipy.spatial import cKDTree

    from ptycho_core.quality import scan_step_px

    rng = np.random.default_rng(n)
    side = int(np.ceil(np.sqrt(n)))
    raster = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)[:n] * 3.7
    scattered = rng.uniform(0, 40 * side, (n, 2))
    sets = {"raster": raster + rng.normal(0, 0.3, raster.shape), "scattered": scattered,
            "line": np.stack([np.zeros(n), np.arange(n) * 2.0], 1),
            "a line with rounding across it": np.stack([rng.normal(0, 1e-9, n), np.arange(n) * 2.0], 1),
            "a spot scanned many times": np.vstack([scattered[: n // 2], rng.normal(5, 0.01, (n - n // 2, 2))]),
            "duplicates": np.vstack([scattered[: max(1, n // 2)], scattered[: n - max(1, n // 2)]])}
    for name, centres in sets.items():
        tree = cKDTree(centres)
        if n <= 4096:
            wanted = np.median(tree.query(centres, k=2)[0][:, 1])
        else:
            probes = centres[:: n // 2048]
            distances = tree.query(probes, k=3)[0]  # itself, its one duplicate at most, the nearest other
            wanted = np.median([row[row > 0][0] for row in distances])
        assert scan_step_px(centres) == pytest.approx(wanted, rel=1e-12, abs=1e-12), name
