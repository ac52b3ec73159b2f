"""What one optimizer step and one round of constraints do: probe windows that follow large position
corrections, micro-batches that take the whole batch's step, Adam's state that follows the probe
modes, the constraint order, and a regularizer that acts where the data act."""

import copy

import h5py
import numpy as np
import pytest
import torch

from ptycho_core.config import ConstraintParams, config_from_dict
from ptycho_core.constraints import CONSTRAINT_ORDER, CONSTRAINTS, apply_constraints
from ptycho_core.engine import batch_order, batch_step_closure
from ptycho_core.io.preprocess import preprocess
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.simulate import read_ground_truth, simulate

from helpers import config_with

UP = "model_params.update_params"
FROZEN = {f"{UP}.{name}": {"start_iter": None, "lr": 0.0} for name in ("obja", "objp", "probe")}


def test_a_three_pixel_scan_error_is_corrected(tmp_path):
    """A block of the scan landed 3 px (0.75 Å) off in y. Refining the positions against the true
    object and a wide (250 Å defocused) probe brings every position back to within 0.05 px. The
    windows follow by whole pixels, so the sub-pixel shift stays within half a pixel and the probe's
    tail never wraps around its window: they end where the true positions put them (left in place,
    the windows kept 3 px shifts whose wrapped tails left the misfit ~10 % higher)."""
    config = simulate("small", tmp_path, seed=8, dose_e_per_ang2=None, defocus_ang=250.0)
    data = tmp_path / "data.h5"
    truth = read_ground_truth(data)
    with h5py.File(data, "a") as f:
        positions = f["positions_ang"][()].reshape(16, 16, 2)
        wrong = positions.copy()
        wrong[5:11, 5:11, 0] += 3 * float(f.attrs["dx_ang"])  # interior: the scanned field keeps its extent
        f["positions_wrong"] = wrong.reshape(-1, 2)
    block = np.zeros((16, 16), bool)
    block[5:11, 5:11] = True
    block = block.ravel()

    def fitted(pos_key, iterations):
        cfg = config_with(config, **FROZEN, **{
            "data.pos_key": pos_key, "constraint_params.position_limit": {"start_iter": None},
            f"{UP}.probe_pos_shifts": {"start_iter": 1, "lr": 0.1},
            "model_params.lr_schedule": {"kind": "exponential", "gamma": 0.93},  # Adam settles as its steps shrink
            "recon_params.iterations": max(iterations, 1)})
        prep = preprocess(cfg)
        rec = Reconstruction.create(cfg, prep)
        rec.model.load_tensors({name: torch.from_numpy(truth[name]) for name in ("obja", "objp", "probe")})
        start = rec.model.crop_pos.clone()
        rec.run(iterations)
        return rec, prep, start

    rec, prep, start = fitted("/positions_wrong", 25)
    found = rec.model.centres_px()
    error = np.abs(found - truth["positions_px"])  # the object is the truth: no common shift is free
    assert error.max() < 0.05, (error[block].max(), error[~block].max())
    moved = (rec.model.crop_pos - start).numpy()
    assert (moved[block, 0] <= -2).all() and not moved[~block].any()  # the windows followed their probes
    assert rec.model.probe_pos_shifts.detach().abs().max() <= 0.5 + 1e-6
    at_truth, *_ = fitted("/positions_ang", 0)
    assert torch.equal(rec.model.crop_pos, at_truth.model.crop_pos)


def test_micro_batches_take_exactly_the_whole_batch_step(small_dataset, small_prep):
    """A batch split in 3 (as after an out-of-memory error) gives the gradient and the step of the
    whole batch, with every loss term that depends on the batch: normalization, the batch-averaged
    pattern (pacbed) and the phase regularizer."""
    cfg = config_with(small_dataset, **{
        "recon_params.dtype": "float64", "loss_params.pacbed.weight": 0.5, "loss_params.phase_sparsity.weight": 0.1,
        f"{UP}.probe": {"start_iter": 1, "lr": 1e-3}, f"{UP}.probe_pos_shifts": {"start_iter": 1, "lr": 1e-2}})
    base = Reconstruction.create(cfg, small_prep)
    base.run(2)  # leave the uniform start, where many gradients vanish
    indices = batch_order(0, 3, base.model.n_positions, 32)[0]
    results = []
    for parts in (1, 3):
        rec = copy.deepcopy(base)
        rec.model.set_iteration(3)
        terms: dict = {}
        closure = batch_step_closure(rec.model, rec.optimizer, rec.problem, parts, indices,
                                     rec.problem.measurements[indices], terms, indices)
        loss = closure()
        grads = {n: getattr(rec.model, n).grad.clone() for n in rec.model.optimized_names()}
        rec.optimizer.step()
        results.append((loss, terms, grads, {n: t.clone() for n, t in rec.model.tensors().items()}))
    (loss_1, terms_1, grads_1, after_1), (loss_3, terms_3, grads_3, after_3) = results
    assert torch.allclose(loss_1, loss_3, rtol=1e-12)
    assert terms_1.keys() == terms_3.keys() and all(torch.allclose(terms_1[k], terms_3[k], rtol=1e-10) for k in terms_1)
    for name in grads_1:
        assert torch.allclose(grads_1[name], grads_3[name], rtol=1e-9, atol=1e-14 * grads_1[name].abs().max()), name
    for name in after_1:
        assert torch.allclose(after_1[name], after_3[name], rtol=1e-9, atol=1e-12), name


def test_adam_state_follows_the_probe_modes(small_dataset, small_prep):
    """probe_ortho sorts the modes by power; each mode's Adam moments must move with it, and modes
    that are already orthogonal must come back unchanged (not with a new arbitrary phase)."""
    cfg = config_with(small_dataset, **{"init.probe.n_modes": 3, f"{UP}.probe": {"start_iter": 1, "lr": 1e-3}})
    rec = Reconstruction.create(cfg, small_prep)
    rec.run(3)
    probe = rec.model.probe.detach().clone()
    state = rec.optimizer.state[rec.model.probe]
    moments = {k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.shape == probe.shape}
    reverse = torch.tensor([2, 1, 0])
    with torch.no_grad():  # the same mixed state with its modes (and their moments) in reverse order
        rec.model.probe.copy_(probe[reverse])
        for key, value in moments.items():
            state[key].copy_(value[reverse])
    cp = ConstraintParams.model_validate({n: {"start_iter": None} for n in CONSTRAINT_ORDER} | {"probe_ortho": {"start_iter": 1}})
    assert apply_constraints(rec.model, cp, 4, rec.problem.context, rec.optimizer) == ["probe_ortho"]
    assert torch.allclose(rec.model.probe.detach(), probe, atol=1e-5 * probe.abs().max())
    for key, value in moments.items():
        assert torch.allclose(state[key], value, rtol=1e-6), key


def test_adam_state_is_mixed_as_the_probe_modes_are(small_dataset, small_prep):
    """Modes far from orthogonal are mixed, not only reordered. The loss sees only the mixed state,
    so the gradient with respect to the new modes is the same mixture of the old modes' gradients:
    Adam's first moment after one step at the old modes must become exactly (1 - beta1) times the
    gradient at the new modes. The second moment keeps its total (the squared mixing weights are
    doubly stochastic)."""
    cfg = config_with(small_dataset, **{"init.probe.n_modes": 3, "recon_params.dtype": "float64",
                                        f"{UP}.probe": {"start_iter": 1, "lr": 1e-3}})
    rec = Reconstruction.create(cfg, small_prep)
    rec.model.set_iteration(1)
    with torch.no_grad():  # overlapping modes
        p = rec.model.probe_complex.clone()
        rec.model.probe.copy_(torch.view_as_real(torch.stack([p[0], p[1] + 0.6 * p[0], p[2] + 0.4j * p[0] + 0.5 * p[1]])))
    rec.optimizer.state.clear()
    before_step = {name: getattr(rec.model, name).detach().clone() for name in rec.model.optimized_names()}
    at_old = before_step["probe"]
    indices = batch_order(0, 1, rec.model.n_positions, 64)[0]

    def gradient():
        closure = batch_step_closure(rec.model, rec.optimizer, rec.problem, 1, indices,
                                     rec.problem.measurements[indices], {}, indices)
        closure()
        return rec.model.probe.grad.clone()

    gradient()
    rec.optimizer.step()  # Adam's first step: exp_avg = (1 - beta1) g, exp_avg_sq = (1 - beta2) g^2
    with torch.no_grad():  # back to where g was taken: the state belongs to the old modes there
        for name, value in before_step.items():
            getattr(rec.model, name).copy_(value)
    state = rec.optimizer.state[rec.model.probe]
    (beta1, beta2), = {group["betas"] for group in rec.optimizer.param_groups if group["names"] == ["probe"]}
    total_sq = state["exp_avg_sq"].sum()
    cp = ConstraintParams.model_validate({n: {"start_iter": None} for n in CONSTRAINT_ORDER} | {"probe_ortho": {"start_iter": 1}})
    assert apply_constraints(rec.model, cp, 1, rec.problem.context, rec.optimizer) == ["probe_ortho"]
    assert not torch.allclose(rec.model.probe.detach(), at_old, rtol=0.1)  # the modes did mix
    g_new = gradient()
    assert torch.allclose(state["exp_avg"], (1 - beta1) * g_new, rtol=1e-9, atol=1e-9 * g_new.abs().max())
    assert torch.isclose(state["exp_avg_sq"].sum(), total_sq, rtol=1e-12)
    assert (state["exp_avg_sq"] >= 0).all()


def test_the_constraint_order_is_one_explicit_tuple(small_dataset, small_prep):
    """Every configurable constraint has its place in CONSTRAINT_ORDER and acts there; the probe's
    intensity is restored after the Fourier mask removed some of it."""
    assert sorted(CONSTRAINT_ORDER) == sorted(ConstraintParams.model_fields) == sorted(CONSTRAINTS)
    cfg = config_with(small_dataset, **{"init.probe.n_modes": 2, "init.object.n_slices": 2, "init.object.tilt_mode": "each",
                                        f"{UP}.obj_tilts": {"start_iter": 1, "lr": 0.1},
                                        f"{UP}.probe_pos_shifts": {"start_iter": 1, "lr": 0.01}})
    rec = Reconstruction.create(cfg, small_prep)
    everything = ConstraintParams.model_validate({n: {"start_iter": 1} for n in CONSTRAINT_ORDER}
                                                 | {"fourier_probe_mask": {"start_iter": 1, "radius_factor": 0.8}})
    assert apply_constraints(rec.model, everything, 1, rec.problem.context, rec.optimizer) == list(CONSTRAINT_ORDER)
    power = rec.model.probe_complex.detach().abs().square().sum()
    assert torch.isclose(power, rec.problem.context.mean_pattern_sum.to(power), rtol=1e-5)


def test_constraints_leave_tensors_that_are_never_optimized_alone(small_dataset, small_prep):
    """start_iter null: the tensor never changes, not even through a filter or a projection."""
    cfg = config_with(small_dataset, **{"init.probe.n_modes": 2, "init.object.n_slices": 2,
                                        f"{UP}.obja": {"start_iter": None, "lr": 0.0},
                                        f"{UP}.probe": {"start_iter": None, "lr": 0.0}})
    rec = Reconstruction.create(cfg, small_prep)
    before = {n: t.clone() for n, t in rec.model.tensors().items()}
    with torch.no_grad():
        rec.model.objp.copy_(torch.randn_like(rec.model.objp))
    everything = ConstraintParams.model_validate({n: {"start_iter": 1} for n in CONSTRAINT_ORDER})
    applied = apply_constraints(rec.model, everything, 1, rec.problem.context, rec.optimizer)
    assert "obj_blur" in applied and not {"probe_ortho", "fix_probe_intensity", "obja_thresh"} & set(applied)
    assert torch.equal(rec.model.tensors()["obja"], before["obja"])
    assert torch.equal(rec.model.tensors()["probe"], before["probe"])


def test_phase_regularizer_acts_where_the_data_act(small_dataset, small_prep):
    """phase_sparsity covers the batch's own probe windows, like the data term: over an iteration its
    gradient has the same ratio to the data term's whatever the batch size, and it never reaches
    canvas pixels that no window covers."""
    ratios = []
    for batch_size in (8, 64):
        cfg = config_with(small_dataset, **{"recon_params.batch_size": batch_size,
                                            "loss_params.phase_sparsity.weight": 1.0})
        rec = Reconstruction.create(cfg, small_prep)
        with torch.no_grad():
            # the same object for both batch sizes (the global RNG would give each its own)
            noise = torch.randn(rec.model.objp.shape, generator=torch.Generator().manual_seed(0),
                                dtype=rec.model.objp.dtype)
            rec.model.objp.copy_(noise * 0.1)
        rec.model.set_iteration(1)
        sums = {}
        for name in ("amplitude", "phase_sparsity"):
            total = torch.zeros_like(rec.model.objp)
            for indices in batch_order(0, 1, rec.model.n_positions, batch_size):
                rec.model.objp.grad = None
                loss, _ = rec.problem.forward_loss(rec.model, indices, rec.problem.measurements[indices], {name: 1.0})
                loss.backward()
                total += rec.model.objp.grad
            sums[name] = total
        ratios.append(float(sums["phase_sparsity"].norm() / sums["amplitude"].norm()))
        covered = torch.zeros(rec.model.objp.shape[-2:], dtype=torch.bool)
        ny, nx = rec.model.window
        for y, x in rec.model.crop_pos.tolist():
            covered[y:y + ny, x:x + nx] = True
        assert not sums["phase_sparsity"][..., ~covered].any()
    assert ratios[0] == pytest.approx(ratios[1], rel=0.05), ratios


def test_band_limit_setting():
    base = {"data": {"path": "x"}, "experiment": {"energy_kev": 300, "conv_angle_mrad": 25, "dx_ang": 0.25}}
    assert config_from_dict(base).model_params.band_limit is None
    assert config_from_dict(base | {"model_params": {"band_limit": 2 / 3}}).model_params.band_limit == pytest.approx(2 / 3)
    with pytest.raises(Exception, match=r"model_params.band_limit: must be <= 1"):
        config_from_dict(base | {"model_params": {"band_limit": 1.5}})


def test_the_batch_indices_reach_a_gpu_in_one_copy_and_unchanged():
    """On a GPU every batch's indices are copied at once (one host wait an iteration, not one a
    batch); the "meta" device stands in for the GPU here: same split, same sizes and order."""
    from ptycho_core.engine import _to_device_at_once

    batches = batch_order(0, 1, 100, 32, "random")
    assert _to_device_at_once(batches, torch.device("cpu")) is batches
    moved = _to_device_at_once(batches, torch.device("meta"))
    assert [m.device.type for m in moved] == ["meta"] * len(batches)
    assert [m.shape for m in moved] == [b.shape for b in batches] and len(moved) == 4
    assert _to_device_at_once([], torch.device("meta")) == []
