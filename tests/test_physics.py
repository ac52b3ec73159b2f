"""Physics on simulated data with known truth: tilt, slice thickness, positions, mixed states,
and the intended effect of each loss, constraint and batching mode."""

import math

import h5py
import numpy as np
import pytest
import torch

from ptycho_core.config import config_from_dict
from ptycho_core.constraints import CONSTRAINTS, apply_constraints
from ptycho_core.engine import batch_order
from ptycho_core.io.preprocess import preprocess
from ptycho_core.quality import phase_pearson, scanned_field_mask
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.simulate import read_ground_truth, simulate

from helpers import config_with

UP = "model_params.update_params"
# Settings these physics tests were written against (the presets' before the defaults changed):
# a fixed, gentler object, no object filters, positions only where a test refines them.
TUNED = {f"{UP}.obja": {"start_iter": 1, "lr": 5e-3}, f"{UP}.objp": {"start_iter": 1, "lr": 5e-3},
         f"{UP}.probe": {"start_iter": 5, "lr": 1e-3}, f"{UP}.probe_pos_shifts": {"start_iter": None, "lr": 0.0},
         "constraint_params.obj_blur": {"start_iter": None}, "constraint_params.depth_blur": {"start_iter": None}}


def run(config_path, iterations, **overrides):
    cfg = config_with(config_path, **{"recon_params.iterations": iterations, **overrides})
    prep = preprocess(cfg)
    rec = Reconstruction.create(cfg, prep)
    rec.run(iterations)
    return rec, prep


def test_tilt_is_recovered_with_depth_regularization(tmp_path):
    # columns straight through a 200 Å crystal, tilted by (2, -1) mrad. A free multislice object
    # can mimic any tilt by shearing its slices; depth regularization removes that freedom.
    config = simulate("small", tmp_path, seed=6, n_slices=4, slice_thickness_ang=50.0, crystal=True,
                      tilt_mrad=(2.0, -1.0), dose_e_per_ang2=None, conv_angle_mrad=30.0)
    rec, _ = run(config, 25, **{
        f"{UP}.obj_tilts": {"start_iter": 1, "lr": 0.1},
        f"{UP}.objp": {"start_iter": 1, "lr": 2e-3}, f"{UP}.obja": {"start_iter": 1, "lr": 2e-3},
        "constraint_params.depth_blur": {"start_iter": 1, "std_slices": 2.0},
    })
    tilt = rec.model.obj_tilts.detach().numpy()[0]
    assert np.abs(tilt - [2.0, -1.0]).max() < 0.3, tilt


def test_slice_thickness_is_recovered_from_a_20_percent_error(tmp_path):
    config = simulate("small", tmp_path, seed=7, n_slices=4, slice_thickness_ang=25.0, dose_e_per_ang2=None,
                      conv_angle_mrad=30.0)
    rec, _ = run(config, 30, **TUNED, **{f"{UP}.slice_thickness": {"start_iter": 1, "lr": 0.2},
                                         "init.object.slice_thickness_ang": 20.0})
    thickness = float(rec.model.slice_thickness.detach())
    assert abs(thickness - 25.0) / 25.0 < 0.05, thickness


def test_position_refinement_cuts_the_error_three_fold(tmp_path):
    config = simulate("small", tmp_path, seed=5, position_jitter_ang=0.125)  # ~0.5 px per axis
    rec, prep = run(config, 40, **{**TUNED, f"{UP}.probe_pos_shifts": {"start_iter": 3, "lr": 2e-2}})
    with h5py.File(prep_path(config), "r") as f:
        true_ang = f["ground_truth/positions_ang"][()]
    offset = prep.geometry.positions_px[0] - prep.positions_ang[0] / prep.dx_ang
    true_px = true_ang / prep.dx_ang + offset

    def rms(estimate):
        error = estimate - true_px
        error -= error.mean(axis=0)  # a common shift only moves the whole image
        return math.sqrt((error**2).sum(axis=1).mean())

    refined = rec.model.centres_px()
    before, after = rms(prep.geometry.positions_px), rms(refined)
    assert before > 0.4 and after < before / 3, (before, after)


def prep_path(config):
    return config.parent / "data.h5"


def test_mixed_state_probe_beats_a_single_mode_on_partially_coherent_data(tmp_path):
    config = simulate("small", tmp_path, seed=8, defocus_spread_ang=100.0, dose_e_per_ang2=None)
    truth = read_ground_truth(prep_path(config))["objp"][0, 0]
    scores = {}
    for modes in (1, 4):
        rec, prep = run(config, 30, **{"init.probe.n_modes": modes, f"{UP}.probe": {"start_iter": 1, "lr": 2e-3}})
        mask = scanned_field_mask(prep.geometry.positions_px, prep.geometry.canvas_shape)
        scores[modes] = (rec.state.history["loss"][-1], phase_pearson(rec.model.objp.detach().numpy()[0, 0], truth, mask))
    assert scores[4][0] < scores[1][0] and scores[4][1] > scores[1][1], scores


# --------------------------------------------------------------------------- losses
def test_poisson_loss_alone_reconstructs_low_dose_data(tmp_path):
    config = simulate("small", tmp_path, seed=9, dose_e_per_ang2=1e4)  # ~6400 electrons a pattern
    rec, prep = run(config, 30, **{"loss_params.amplitude.weight": 0.0, "loss_params.poisson.weight": 1.0})
    truth = read_ground_truth(prep_path(config))["objp"][0, 0]
    mask = scanned_field_mask(prep.geometry.positions_px, prep.geometry.canvas_shape)
    assert phase_pearson(rec.model.objp.detach().numpy()[0, 0], truth, mask) > 0.85
    assert set(rec.state.history) >= {"loss", "loss_poisson"} and "loss_amplitude" not in rec.state.history


def test_pacbed_loss_fits_the_mean_pattern_without_positions(small_dataset, small_prep):
    # the probe starts 30 Å out of focus; fitting only the position-averaged pattern corrects it
    cfg = config_with(small_dataset, **{
        "loss_params.amplitude.weight": 0.0, "loss_params.pacbed.weight": 1.0, "experiment.defocus_ang": 10.0,
        f"{UP}.objp": {"start_iter": None, "lr": 0}, f"{UP}.obja": {"start_iter": None, "lr": 0},
        f"{UP}.probe": {"start_iter": 1, "lr": 3e-3}, "recon_params.batch_size": 256, "recon_params.iterations": 40})
    rec = Reconstruction.create(cfg, small_prep)
    rec.run(40)
    loss = rec.state.history["loss_pacbed"]
    assert loss[-1] < 0.6 * loss[0], (loss[0], loss[-1])


def test_phase_sparsity_shrinks_the_phase(small_dataset, small_prep):
    plain, _ = run(small_dataset, 10)
    sparse, _ = run(small_dataset, 10, **{"loss_params.phase_sparsity.weight": 0.05})
    assert sparse.model.objp.abs().mean() < 0.7 * plain.model.objp.abs().mean()
    assert "loss_phase_sparsity" in sparse.state.history


# --------------------------------------------------------------------------- constraints
@pytest.fixture
def busy_model(small_dataset, small_prep):
    """A model after a few iterations, with 3 probe modes, 3 slices and per-position tilts."""
    rec, _ = run(small_dataset, 3, **{"init.probe.n_modes": 3, "init.object.n_slices": 3,
                                       "init.object.tilt_mode": "each",
                                       f"{UP}.probe_pos_shifts": {"start_iter": 1, "lr": 5e-2},
                                       f"{UP}.obj_tilts": {"start_iter": 1, "lr": 0.5},
                                       "constraint_params.position_limit": {"start_iter": None}})
    return rec


def constrain(rec, name, **params):
    """Apply one constraint (all others off) at iteration 100."""
    settings = {n: {"start_iter": None} for n in CONSTRAINTS}
    settings[name] = {"start_iter": 100, "stop_iter": None, **params}
    cp = config_from_dict({"data": {"path": "x"}, "experiment": {"energy_kev": 300, "conv_angle_mrad": 25,
                                                                 "dx_ang": 0.25},
                           "constraint_params": settings}).constraint_params
    assert apply_constraints(rec.model, cp, 100, rec.problem.context) == [name]


def test_probe_ortho_makes_modes_orthogonal_and_sorted(busy_model):
    rec = busy_model
    with torch.no_grad():  # mix the modes so they overlap
        p = rec.model.probe_complex.clone()
        rec.model.probe.copy_(torch.view_as_real(torch.stack([p[0] + 0.3 * p[1], p[1] + 0.5 * p[0], p[2] + p[0]])))
    density_before = torch.einsum("pyx,pab->yxab", rec.model.probe_complex[:, :8, :8],
                                  rec.model.probe_complex[:, :8, :8].conj()).clone()
    constrain(rec, "probe_ortho")
    modes = rec.model.probe_complex.reshape(3, -1)
    gram = modes.conj() @ modes.T
    off = gram - torch.diag(torch.diagonal(gram))
    assert off.abs().max() < 1e-3 * gram.abs().max()
    power = torch.diagonal(gram).real
    assert power[0] >= power[1] >= power[2]
    density_after = torch.einsum("pyx,pab->yxab", rec.model.probe_complex[:, :8, :8], rec.model.probe_complex[:, :8, :8].conj())
    assert torch.allclose(density_before, density_after, rtol=1e-3, atol=1e-3 * density_before.abs().max())


def test_fix_probe_intensity(busy_model):
    rec = busy_model
    with torch.no_grad():
        rec.model.probe.mul_(1.7)
    constrain(rec, "fix_probe_intensity")
    power = rec.model.probe_complex.abs().square().sum()
    assert torch.isclose(power, rec.problem.context.mean_pattern_sum.to(power.dtype), rtol=1e-5)


def test_fourier_probe_mask_clears_outside_the_aperture(busy_model):
    rec = busy_model
    with torch.no_grad():
        rec.model.probe.add_(torch.randn_like(rec.model.probe) * rec.model.probe.abs().max() * 0.1)
    constrain(rec, "fourier_probe_mask", radius_factor=1.0)
    spectrum = torch.fft.fft2(rec.model.probe_complex).abs()
    n = spectrum.shape[-1]
    k = torch.fft.fftfreq(n, d=rec.model.dx_ang)
    alpha = rec.model.wavelength_ang * torch.sqrt(k[:, None] ** 2 + k[None] ** 2) * 1e3
    assert spectrum[:, alpha > 25.0].max() < 1e-4 * spectrum.max()
    assert spectrum[:, alpha < 20.0].mean() > 0.01 * spectrum.max()


def test_object_thresholds(busy_model):
    rec = busy_model
    constrain(rec, "obja_thresh", min=0.9, max=1.0)
    assert rec.model.obja.min() >= 0.9 and rec.model.obja.max() <= 1.0
    assert rec.model.objp.min() < 0
    constrain(rec, "objp_thresh", min=0.0)
    assert rec.model.objp.min() >= 0


def test_lateral_blur_removes_pixel_noise(busy_model):
    rec = busy_model
    with torch.no_grad():
        rec.model.objp.add_(torch.randn_like(rec.model.objp) * 0.1)
    def roughness():
        p = rec.model.objp.detach()
        return (p[..., 1:, :] - p[..., :-1, :]).abs().mean()
    before, mean_before = roughness(), rec.model.objp.detach().mean()
    constrain(rec, "obj_blur", std_px=1.0)
    assert roughness() < 0.5 * before
    assert torch.isclose(rec.model.objp.detach().mean(), mean_before, atol=2e-3)


def test_depth_blur_makes_slices_alike_and_keeps_the_total(busy_model):
    rec = busy_model
    with torch.no_grad():
        rec.model.objp[:, 1].add_(0.3)
    total_before = rec.model.objp.detach().sum()
    spread_before = rec.model.objp.detach().std(dim=1).mean()
    constrain(rec, "depth_blur", std_slices=1.0)
    assert rec.model.objp.detach().std(dim=1).mean() < 0.6 * spread_before
    assert torch.isclose(rec.model.objp.detach().sum(), total_before, rtol=1e-4)


def test_tilt_smoothing_keeps_the_mean_and_cuts_the_scatter(busy_model):
    rec = busy_model
    with torch.no_grad():
        rec.model.obj_tilts.copy_(torch.randn_like(rec.model.obj_tilts) + torch.tensor([1.0, -2.0]))
    mean_before, scatter_before = rec.model.obj_tilts.detach().mean(0), rec.model.obj_tilts.detach().std(0)
    constrain(rec, "tilt_smooth", std_ang=2.0)
    tilts = rec.model.obj_tilts.detach()
    assert (tilts.std(0) < 0.3 * scatter_before).all()
    assert torch.allclose(tilts.mean(0), mean_before, atol=0.1)


def test_position_limit_caps_corrections_and_removes_drift(busy_model):
    rec = busy_model
    initial = rec.problem.context.initial_positions_px - rec.model.crop_pos
    with torch.no_grad():
        rec.model.probe_pos_shifts.copy_(initial + torch.randn_like(initial) + torch.tensor([2.0, -1.0]))
    constrain(rec, "position_limit", max_px=0.5, remove_drift=True)
    moved = rec.model.probe_pos_shifts.detach() - initial
    assert moved.norm(dim=1).max() <= 0.5 + 1e-6  # float32 shifts
    assert moved.mean(0).abs().max() < 0.1


# --------------------------------------------------------------------------- batching
@pytest.mark.parametrize("mode", ["compact", "sparse"])
def test_batching_modes(small_prep, mode):
    positions = small_prep.geometry.positions_px
    batches = batch_order(3, 7, len(positions), 16, mode, positions)
    assert sorted(torch.cat(batches).tolist()) == list(range(len(positions)))
    again = batch_order(3, 7, len(positions), 16, mode, positions)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not all(torch.equal(a, b) for a, b in zip(batches, batch_order(3, 8, len(positions), 16, mode, positions)))
    random = batch_order(3, 7, len(positions), 16, "random", positions)

    def spread(bs):  # mean over batches of the mean distance between members
        return np.mean([np.mean(np.linalg.norm(positions[b][:, None] - positions[b][None], axis=-1)) for b in bs])

    if mode == "compact":
        assert spread(batches) < 0.5 * spread(random)
    else:
        def nearest(bs):  # mean distance from a member to its nearest batch-mate
            return np.mean([np.sort(np.linalg.norm(positions[b][:, None] - positions[b][None], axis=-1), axis=1)[:, 1].mean()
                            for b in bs])

        assert nearest(batches) > 1.5 * nearest(random), (nearest(batches), nearest(random))


# --------------------------------------------------------------------------- init from a previous run
def test_init_from_a_previous_run_resamples_pixel_size_and_slices(tmp_path, small_dataset):
    first, prep = run(small_dataset, 20)
    first.save(tmp_path / "model.hdf5")
    truth = read_ground_truth(prep_path(small_dataset))["objp"][0, 0]
    # the same data binned 2x: twice the pixel size, and two slices instead of one
    second_cfg = config_with(small_dataset, **{
        "preprocess.bin": 2, "preprocess.target_size_px": 64, "experiment.dx_ang": None,
        "experiment.dk_mrad": float(prep.dk_mrad), "init.object.n_slices": 2,
        "init.object.source": "previous", "init.object.path": str(tmp_path / "model.hdf5"),
        "init.probe.source": "previous", "init.probe.path": str(tmp_path / "model.hdf5"),
    })
    second_prep = preprocess(second_cfg)
    assert math.isclose(second_prep.dx_ang, prep.dx_ang / 2, rel_tol=1e-6)  # dk doubled, same 64 px
    second = Reconstruction.create(second_cfg, second_prep)
    start = second.model.objp.detach().numpy()[0].sum(0)
    rows = np.arange(start.shape[0]) * second_prep.dx_ang + second.model.origin_ang[0]
    cols = np.arange(start.shape[1]) * second_prep.dx_ang + second.model.origin_ang[1]
    # compare with the truth sampled at the same physical points
    from scipy import ndimage

    origin = first.model.origin_ang
    truth_here = ndimage.map_coordinates(truth, np.meshgrid((rows - origin[0]) / prep.dx_ang,
                                                             (cols - origin[1]) / prep.dx_ang, indexing="ij"), order=1)
    mask = scanned_field_mask(second_prep.geometry.positions_px, second_prep.geometry.canvas_shape)
    assert phase_pearson(start, truth_here, mask) > 0.85
    probe = second.model.probe_complex.detach()
    assert torch.isclose(probe.abs().square().sum(), torch.tensor(float(second_prep.measurements.load().sum((1, 2)).mean())),
                         rtol=1e-4)
