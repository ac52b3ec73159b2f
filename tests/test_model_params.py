"""model_params semantics: start_iter gating, learning rates, optimizers."""

import copy

import numpy as np
import pytest
import torch

from ptycho_core.config import ConfigError
from ptycho_core.io.patterns import ArrayPatterns
from ptycho_core.io.preprocess import preprocess
from ptycho_core.reconstruction import Reconstruction

from helpers import config_with

UP = "model_params.update_params"


def snapshot(rec):
    return {k: v.clone() for k, v in rec.model.tensors().items()}


def test_start_iter_null_never_changes_and_never_has_a_gradient(small_dataset, small_prep):
    cfg = config_with(small_dataset, **{
        f"{UP}.probe": {"start_iter": None, "lr": 1e-2},  # a large lr must not matter
        f"{UP}.obja": {"start_iter": None, "lr": 0.0},
        "recon_params.iterations": 3,
    })
    rec = Reconstruction.create(cfg, small_prep)
    before = snapshot(rec)
    grads_seen = []
    rec.run(3, on_iteration=lambda st, row: grads_seen.append(
        (rec.model.probe.grad, rec.model.obja.grad, rec.model.probe.requires_grad)))
    after = snapshot(rec)
    assert torch.equal(before["probe"], after["probe"])
    assert torch.equal(before["obja"], after["obja"])
    assert not torch.equal(before["objp"], after["objp"])
    assert all(g == (None, None, False) for g in grads_seen)
    assert "probe" not in rec.model.optimized_names()


def test_start_iter_n_gates_until_n(small_dataset, small_prep):
    cfg = config_with(small_dataset, **{f"{UP}.probe": {"start_iter": 3, "lr": 1e-3}, "recon_params.iterations": 4})
    rec = Reconstruction.create(cfg, small_prep)
    probes = [rec.model.probe_complex.detach().clone()]
    requires = []

    def watch(state, row):
        probes.append(rec.model.probe_complex.detach().clone())
        requires.append(rec.model.probe.requires_grad)

    rec.run(4, on_iteration=watch)
    # constraints (fixed intensity, ortho) act on the probe after each iteration, so compare the
    # probe's shape, normalized: unchanged through iterations 1 and 2, changed by 3 and 4
    norm = [p / p.abs().square().sum().sqrt() for p in probes]
    change = [float((norm[i + 1] - norm[i]).norm()) for i in range(4)]
    assert change[0] < 1e-6 and change[1] < 1e-6, change
    assert change[2] > 1e-4 and change[3] > 1e-4, change
    assert requires == [False, False, True, True]


def test_lr_zero_means_not_optimized(small_dataset, small_prep):
    cfg = config_with(small_dataset, **{f"{UP}.objp": {"start_iter": 1, "lr": 0.0}, "recon_params.iterations": 2})
    rec = Reconstruction.create(cfg, small_prep)
    before = rec.model.objp.detach().clone()
    rec.run(2)
    assert torch.equal(before, rec.model.objp.detach()) and "objp" not in rec.model.optimized_names()


@pytest.mark.parametrize("name, configs, lrs", [
    ("Adam", {}, None),
    ("SGD", {"momentum": 0.9}, {"objp": 2e2, "obja": 2e2}),
    ("LBFGS", {"lr": 1.0, "max_iter": 4, "history_size": 5, "line_search_fn": "strong_wolfe"}, None),
])
def test_optimizers_reduce_the_loss(noise_free_dataset, name, configs, lrs):
    overrides = {
        "model_params.optimizer_params": {"name": name, "configs": configs},
        f"{UP}.probe": {"start_iter": None, "lr": 0.0},
        "recon_params.iterations": 4,
        "recon_params.batch_size": 64,
    }
    for tensor, lr in (lrs or {}).items():
        overrides[f"{UP}.{tensor}"] = {"start_iter": 1, "lr": lr}
    cfg = config_with(noise_free_dataset, **overrides)
    rec = Reconstruction.create(cfg, preprocess(cfg))
    assert type(rec.optimizer).__name__ == name
    rec.run(4)
    loss = rec.state.history["loss"]
    assert loss[-1] < 0.5 * loss[0], loss


def test_param_groups_carry_the_per_tensor_lr(small_dataset, small_prep):
    rec = Reconstruction.create(config_with(small_dataset), small_prep)
    lrs = {g["names"][0]: g["lr"] for g in rec.optimizer.param_groups}
    # the probe's lr is in units of the brightest mean-pattern amplitude (sqrt counts)
    unit = float(np.sqrt(small_prep.measurements.load().mean(axis=0, dtype=np.float64).max()))
    assert lrs == pytest.approx({"obja": 1e-2, "objp": 1e-2, "probe": 1e-4 * unit, "probe_pos_shifts": 3e-3}, rel=1e-12)


def test_the_same_settings_mean_the_same_at_any_dose(small_dataset, small_prep):
    """Counts x 100 (a hundredfold dose, the same noise pattern): the same object and the same
    probe up to the factor 10 of its amplitude, iteration by iteration. Every lr, the probe's
    included, must mean the same step whatever the dose."""
    cfg = config_with(small_dataset, **{f"{UP}.probe": {"start_iter": 1, "lr": 1e-3}, "recon_params.iterations": 4})
    runs = []
    for scale in (1.0, 100.0):
        prep = copy.deepcopy(small_prep)
        prep.measurements = ArrayPatterns(prep.measurements.load() * np.float32(scale))
        prep.mean_pattern = prep.measurements.mean_pattern()
        rec = Reconstruction.create(cfg, prep)
        rec.run(4)
        runs.append((rec.model.objp.detach().clone(), rec.model.probe_complex.detach().clone() / np.sqrt(scale)))
    (phase_1, probe_1), (phase_100, probe_100) = runs
    assert torch.allclose(phase_1, phase_100, atol=2e-4), (phase_1 - phase_100).abs().max()
    assert torch.allclose(probe_1, probe_100, atol=2e-4 * probe_1.abs().max()), (probe_1 - probe_100).abs().max()


def test_unknown_optimizer_keyword_is_named(small_dataset, small_prep):
    cfg = config_with(small_dataset, **{"model_params.optimizer_params": {"name": "Adam", "configs": {"betaz": 1}}})
    with pytest.raises(ConfigError, match=r"model_params.optimizer_params.configs.betaz: not an argument of torch.optim.Adam"):
        Reconstruction.create(cfg, small_prep)


def test_nothing_to_optimize_is_refused_while_loading(small_dataset):
    frozen = {"start_iter": None, "lr": 0.0}
    with pytest.raises(ConfigError, match=r"model_params.update_params: no tensor is optimized"):
        config_with(small_dataset, **{f"{UP}.{n}": frozen for n in ("obja", "objp", "probe", "probe_pos_shifts")})


def test_reference_defaults_give_the_reference_texts_values(small_dataset):
    """`defaults: reference`: what the config leaves out takes the reference text's values; what it
    gives stays."""
    import yaml

    from ptycho_core.config import REFERENCE_DEFAULTS, config_from_dict

    raw = yaml.safe_load(small_dataset.read_text())
    raw.pop("model_params", None)
    ours = config_from_dict(raw)
    reference = config_from_dict(raw | {"defaults": "reference", "recon_params": {"iterations": 7}})
    wanted = REFERENCE_DEFAULTS["model_params"]["update_params"]
    assert reference.model_params.update_params.model_dump() == wanted
    assert reference.constraint_params.obj_blur.start_iter is None and reference.recon_params.iterations == 7
    assert (reference.model_params.lr_schedule.kind, ours.model_params.lr_schedule.kind) == ("constant", "plateau")
    assert ours.model_params.update_params.model_dump() != wanted and ours.constraint_params.obj_blur.start_iter == 1
    kept = config_from_dict(raw | {"defaults": "reference", "model_params": {"update_params": {"probe": {"lr": 1e-3}}}})
    assert kept.model_params.update_params.probe.lr == 1e-3 and kept.model_params.update_params.probe.start_iter == 1


def test_a_tensor_entry_with_only_start_iter_or_only_lr_keeps_the_other_default(small_dataset):
    """`probe: {start_iter: 21}` delays the probe and keeps its default lr, as a partial entry does
    under `defaults: reference` (it used to be refused: lr required but missing)."""
    import yaml

    from ptycho_core.config import UpdateParams, config_from_dict

    raw = yaml.safe_load(small_dataset.read_text())
    raw.pop("model_params", None)
    ours = UpdateParams()
    update = config_from_dict(raw | {"model_params": {"update_params": {
        "probe": {"start_iter": 21}, "probe_pos_shifts": {"lr": 1e-2}}}}).model_params.update_params
    assert (update.probe.start_iter, update.probe.lr) == (21, ours.probe.lr)
    assert (update.probe_pos_shifts.start_iter, update.probe_pos_shifts.lr) == (ours.probe_pos_shifts.start_iter, 1e-2)
    assert update.objp == ours.objp


def test_lr_schedule_scales_every_lr_by_a_factor_of_the_iteration(small_dataset, small_prep):
    schedule = {"kind": "step", "gamma": 0.5, "step_iterations": 2, "min_factor": 0.3}
    cfg = config_with(small_dataset, **{"model_params.lr_schedule": schedule})
    rec = Reconstruction.create(cfg, small_prep)
    base = {g["names"][0]: g["lr"] for g in rec.optimizer.param_groups}
    seen = []
    rec.run(5, on_iteration=lambda st, row: seen.append({g["names"][0]: g["lr"] for g in rec.optimizer.param_groups}))
    for iteration, factor in zip(range(1, 6), [1.0, 1.0, 0.5, 0.5, 0.3]):  # 0.25 is held at min_factor
        assert seen[iteration - 1] == pytest.approx({k: v * factor for k, v in base.items()}), iteration


def test_the_plateau_schedule_cuts_the_lr_once_the_loss_stops_falling():
    """plateau (the default): gamma after `patience` iterations without a loss 0.1 % under the
    lowest, counted again from each cut, never under min_factor; live iterations while the scan was
    acquired do not count."""
    from ptycho_core.config import LrSchedule
    from ptycho_core.engine import settled_losses

    schedule = LrSchedule()
    assert (schedule.kind, schedule.gamma, schedule.patience) == ("plateau", 0.5, 5)
    falling = [10.0 * 0.9 ** n for n in range(8)]
    assert schedule.factor(9, falling) == 1.0
    flat = falling + [falling[-1] * 1.0005] * 4  # under 0.1 % lower is no new lowest
    assert schedule.factor(13, flat) == 1.0
    assert schedule.factor(14, flat + [falling[-1]]) == 0.5  # the fifth without a new lowest: cut
    rising = falling + [falling[-1] * (1 + 0.01 * n) for n in range(1, 11)]
    assert schedule.factor(19, rising) == 0.25  # two plateaus of five
    assert schedule.factor(200, falling + [falling[-1]] * 200) == schedule.min_factor == 0.0625
    # live: three iterations while acquiring (a loss that grows with the scan), then four that fall
    history = {"loss": [1.0, 2.0, 3.0, 2.9, 2.8, 2.7, 2.6], "acquiring": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]}
    assert settled_losses(history) == [2.9, 2.8, 2.7, 2.6]
    assert settled_losses({"loss": [3.0, 2.0]}) == [3.0, 2.0]  # an offline run: every iteration counts


def test_a_decaying_lr_settles_where_a_constant_one_drifts(noise_free_dataset):
    """Near convergence Adam's steps stay lr-sized, so with a constant lr the loss of noise-free
    data climbs again; stepping the lr down, or halving it at each plateau (the default), keeps it
    falling."""
    final = {}
    for kind in ("constant", "step", "plateau"):
        cfg = config_with(noise_free_dataset, **{
            "model_params.lr_schedule": {"kind": kind, "gamma": 0.3 if kind == "step" else 0.5, "step_iterations": 10},
            "constraint_params.obj_blur": {"start_iter": None},  # the schedule alone
            "recon_params.iterations": 40,
        })
        rec = Reconstruction.create(cfg, preprocess(cfg))
        rec.run(40)
        final[kind] = rec.state.history["loss"]
    constant = final["constant"]
    assert constant[-1] > 1.2 * min(constant), "the constant lr should drift up from its best"
    for kind in ("step", "plateau"):
        decayed = final[kind]
        assert decayed[-1] < 0.8 * constant[-1] and decayed[-1] <= min(decayed[-10:]) * 1.05, (kind, decayed[-10:], constant[-1])


def test_a_model_started_from_refined_positions_uses_them_when_they_are_frozen(tmp_path, small_dataset, small_prep):
    """init.model_path with refined probe_pos_shifts and positions no longer optimized: the forward
    pass must shift the probes by the loaded shifts (whether it shifts was decided when the model was
    built, from the zero shifts of the scan grid, so the refinement was silently dropped)."""
    import dataclasses

    # a scan on the pixel grid: the model is built with zero shifts
    on_grid = dataclasses.replace(small_prep, geometry=dataclasses.replace(
        small_prep.geometry, shifts_px=np.zeros_like(small_prep.geometry.shifts_px)))
    refined = config_with(small_dataset, **{f"{UP}.probe_pos_shifts": {"start_iter": 1, "lr": 0.05},
                                            "recon_params.iterations": 3})
    source = Reconstruction.create(refined, on_grid)
    source.run(3)
    assert float(source.model.probe_pos_shifts.detach().abs().max()) > 0.05  # the refinement moved them
    path = source.save(tmp_path / "refined.h5")

    frozen = config_with(small_dataset, **{f"{UP}.probe_pos_shifts": {"start_iter": None, "lr": 0.0},
                                           "init.model_path": str(path)})
    started = Reconstruction.create(frozen, on_grid)
    assert started.model.apply_shifts
    indices = torch.arange(16)
    with torch.no_grad():
        assert torch.allclose(started.model(indices), source.model(indices), rtol=1e-6, atol=1e-9)
