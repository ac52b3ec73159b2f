"""recon_params.validation_fraction: held-out patterns that never enter the optimizer, scored
after every iteration; a score for tuning on data without a ground truth."""

import numpy as np
import pytest

from ptycho_core.checkpoint import read_checkpoint
from ptycho_core.engine import held_out_indices
from ptycho_core.io.preprocess import preprocess
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.simulate import simulate

from helpers import config_with

POSITIONS_FROM_START = {"model_params.update_params.probe_pos_shifts": {"start_iter": 1, "lr": 1e-3}}


def test_the_held_out_patterns_are_seeded_and_spread_over_the_scan():
    grid = np.stack(np.meshgrid(np.arange(20.0), np.arange(20.0), indexing="ij"), -1).reshape(-1, 2)
    held = held_out_indices(grid, 0.05, seed=3)
    assert np.array_equal(held, held_out_indices(grid.copy(), 0.05, seed=3))
    assert not np.array_equal(held, held_out_indices(grid, 0.05, seed=4))
    assert len(held) == pytest.approx(20, abs=2) and len(np.unique(held)) == len(held)
    # spread: every 10 x 10 quarter of the scan holds about a quarter of them
    quarters = np.bincount((grid[held, 0] >= 10) * 2 + (grid[held, 1] >= 10), minlength=4)
    assert quarters.min() >= 4, quarters
    assert len(held_out_indices(grid, 0.0, seed=3)) == 0


def test_held_out_patterns_get_no_gradient_and_a_resume_scores_them_as_an_unbroken_run(tmp_path, small_dataset):
    cfg = config_with(small_dataset, **POSITIONS_FROM_START, **{
        "recon_params.validation_fraction": 0.1, "recon_params.iterations": 4, "recon_params.device": "cpu"})
    prep = preprocess(cfg)
    straight = Reconstruction.create(cfg, prep)
    initial = straight.model.tensors()["probe_pos_shifts"].clone()
    held = straight.problem.validation_indices
    assert len(held) == pytest.approx(0.1 * prep.n_patterns, abs=3)
    straight.run(4)

    moved = straight.model.tensors()["probe_pos_shifts"] - initial
    trained = np.setdiff1d(np.arange(prep.n_patterns), held)
    # never in a batch, so no gradient: a held-out position moved only with the drift that the
    # position_limit constraint removes from all of them, the same vector for each (to float32
    # rounding of canvas coordinates), while every trained position moved on its own
    drift = moved[held].mean(dim=0)
    assert (moved[held] - drift).abs().max() < 1e-7
    individual = (moved[trained] - drift).abs().sum(dim=1)
    assert individual.median() > 1e-4 and (individual > 1e-6).float().mean() > 0.9

    first = Reconstruction.create(cfg, prep)
    first.run(2)
    path = first.save(tmp_path / "two.hdf5")
    resumed = Reconstruction.create(cfg, prep)
    resumed.resume(read_checkpoint(path))
    assert np.array_equal(resumed.problem.validation_indices, held)
    resumed.run(4)
    history = straight.state.history
    assert len(history["validation_loss"]) == 4
    assert resumed.state.history["validation_loss"] == pytest.approx(history["validation_loss"], rel=1e-6)
    assert resumed.state.history["loss"] == pytest.approx(history["loss"], rel=1e-6)


def test_no_validation_column_without_held_out_patterns(small_dataset):
    cfg = config_with(small_dataset, **{"recon_params.iterations": 1, "recon_params.device": "cpu"})
    rec = Reconstruction.create(cfg, preprocess(cfg))
    rec.run(1)
    assert "validation_loss" not in rec.state.history


def test_the_validation_loss_rises_when_the_fit_goes_on_into_the_noise(tmp_path):
    """Low dose (100 e/Å², about 64 counts per pattern): the object keeps fitting the training
    patterns' noise, so their loss keeps falling while the held-out patterns' loss turns up."""
    path = simulate("small", tmp_path / "noisy", seed=5, dose_e_per_ang2=100.0)
    cfg = config_with(path, **{"recon_params.validation_fraction": 0.1, "recon_params.iterations": 45,
                               "recon_params.device": "cpu"})
    rec = Reconstruction.create(cfg, preprocess(cfg))
    rec.run(45)
    train = np.array(rec.state.history["loss"])
    held = np.array(rec.state.history["validation_loss"])
    best = int(np.argmin(held))
    assert 5 <= best < 35, held  # it first improves with the fit, then turns
    assert held[-1] > held[best] * 1.005, (held[best], held[-1])
    assert train[-1] < train[best] * 0.995, (train[best], train[-1])  # while the training loss falls
