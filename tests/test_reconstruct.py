"""Reconstructions recover the known object of simulated data."""

import numpy as np

from ptycho_core.engine import forward_loss
from ptycho_core.io.preprocess import preprocess
from ptycho_core.quality import phase_pearson, scanned_field_mask
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.simulate import read_ground_truth

from helpers import config_with


def reconstruct(config_path, **overrides):
    cfg = config_with(config_path, **overrides)
    prep = preprocess(cfg)
    rec = Reconstruction.create(cfg, prep)
    rec.run(cfg.recon_params.iterations)
    truth = read_ground_truth(cfg.data.path)["objp"][0]
    mask = scanned_field_mask(prep.geometry.positions_px, prep.geometry.canvas_shape)
    return rec, rec.model.objp.detach().numpy()[0], truth, mask


def test_single_slice_recovers_the_phase(small_dataset):
    rec, phase, truth, mask = reconstruct(small_dataset)
    start = phase_pearson(np.zeros_like(phase[0]) + np.random.default_rng(0).normal(size=phase[0].shape), truth[0], mask)
    score = phase_pearson(phase[0], truth[0], mask)
    assert score >= 0.9 and abs(start) < 0.1, (score, start)
    assert rec.state.history["loss"][-1] < rec.state.history["loss"][0]


def test_multislice_recovers_each_slice(small_multislice):
    # the default depth blur trades depth resolution for stability; this object's slices differ
    rec, phase, truth, mask = reconstruct(small_multislice, **{"constraint_params.depth_blur": {"start_iter": None}})
    assert phase.shape[0] == 2
    per_slice = [phase_pearson(phase[z], truth[z], mask) for z in range(2)]
    crossed = [phase_pearson(phase[z], truth[1 - z], mask) for z in range(2)]
    assert min(per_slice) >= 0.9, per_slice
    # depth is resolved: each slice matches its own truth far better than the other slice's
    assert min(per_slice) > max(crossed) + 0.2, (per_slice, crossed)
    assert phase_pearson(phase.sum(0), truth.sum(0), mask) >= 0.95


def test_truth_is_not_reached_from_a_wrong_defocus_without_probe_updates(small_dataset):
    """Contrast: the same run with a badly wrong probe and no probe optimization scores lower,
    so the Pearson above measures the reconstruction, not the metric."""
    _, good, truth, mask = reconstruct(small_dataset, **{"recon_params.iterations": 10})
    _, bad, _, _ = reconstruct(small_dataset, **{
        "recon_params.iterations": 10,
        "experiment.defocus_ang": -150.0,
        "model_params.update_params.probe": {"start_iter": None, "lr": 0.0},
    })
    assert phase_pearson(good[0], truth[0], mask) > phase_pearson(bad[0], truth[0], mask) + 0.2


def test_compiled_forward_follows_the_eager_one(small_multislice):
    """recon_params.compile: the same iterations under torch.compile end where the eager ones do
    (fused kernels round differently, so close, not bitwise)."""
    import torch

    settings = {"recon_params.iterations": 2, "recon_params.threads": 1,
                "model_params.update_params.probe_pos_shifts": {"start_iter": 1, "lr": 1e-3}}
    results, threads = {}, torch.get_num_threads()
    for compile_ in (False, True):
        cfg = config_with(small_multislice, **settings, **{"recon_params.compile": compile_})
        rec = Reconstruction.create(cfg, preprocess(cfg))
        rec.run(2)
        results[compile_] = (rec.model.tensors(), rec.state.history["loss"])
    torch.set_num_threads(threads)
    (eager, eager_loss), (compiled, compiled_loss) = results[False], results[True]
    np.testing.assert_allclose(compiled_loss, eager_loss, rtol=1e-4)
    for name, value in eager.items():
        # Adam steps are lr-sized wherever the gradient is tiny, so rounding differences show up as
        # absolute, not relative, differences: bound them well below one step (lr 5e-3)
        difference = float((compiled[name] - value).abs().max())
        assert difference < 2e-4, (name, difference)
    assert rec.problem.forward_loss is not forward_loss, "recon_params.compile did not reach the engine"


def test_a_compiler_failure_is_one_config_error(small_dataset, small_prep, monkeypatch):
    """Where torch.compile cannot work (no C++ compiler, say), the run stops with a message naming
    recon_params.compile instead of a compiler traceback."""
    import pytest
    import torch

    from ptycho_core.config import ConfigError

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines of detail")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    cfg = config_with(small_dataset, **{"recon_params.compile": True})
    rec = Reconstruction.create(cfg, small_prep)
    with pytest.raises(ConfigError, match=r"^recon_params.compile: torch.compile failed \(InvalidCxxCompiler: No "
                                          r"working C\+\+ compiler found\); set it to false$"):
        rec.run(1)
