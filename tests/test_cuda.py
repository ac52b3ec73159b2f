"""On a CUDA GPU: the same reconstruction as on the CPU, the measurement tiers that exist for GPUs
(pinned host memory, disk) and a resume, on the device facilities run on.

Skipped without CUDA (CI has none); benchmarks/gpu.sh runs them first when a session is lent a
GPU. GPU kernels add in a different order than the CPU's (scatter-adds are not deterministic on
CUDA), so results are compared within float32 tolerances, not bitwise."""

import os

import numpy as np
import pytest
import torch

from ptycho_core.io.preprocess import read_preprocessed
from ptycho_core.reconstruction import Reconstruction, phase_pearson, scanned_field_mask
from ptycho_core.rundir import newest_checkpoint, prepare, run_segment
from ptycho_core.simulate import read_ground_truth

from helpers import config_with

# PTYFLOW_GPU_TEST_DEVICE=cpu runs the same tests on the CPU: how gpu.sh's dry run checks them here
GPU = os.environ.get("PTYFLOW_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(GPU == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (benchmarks/gpu.sh)")

MULTI = {"init.object.n_slices": 2, "init.object.slice_thickness_ang": 4.0, "init.probe.n_modes": 2,
         "recon_params.batch_size": 24}


def reconstruct(config, prep, iterations):
    rec = Reconstruction.create(config, prep)
    rec.run(iterations)
    return rec


def test_a_gpu_reconstruction_matches_the_cpu_one(tmp_path, small_dataset):
    prepare(config_with(small_dataset), tmp_path / "run")
    prep = read_preprocessed(tmp_path / "run" / "preprocessed.h5")
    truth = read_ground_truth(small_dataset.parent / "data.h5")["objp"][0, 0]
    mask = scanned_field_mask(prep.geometry.positions_px, prep.geometry.canvas_shape)
    scores, losses = {}, {}
    for device in ("cpu", GPU):
        rec = reconstruct(config_with(small_dataset, **{"recon_params.device": device}), prep, 20)
        assert rec.model.objp.device.type == device
        scores[device] = phase_pearson(rec.model.objp.detach().cpu().numpy()[0, 0], truth, mask)
        losses[device] = np.array(rec.state.history["loss"])
    assert scores[GPU] > 0.8 and abs(scores[GPU] - scores["cpu"]) < 0.02, scores
    np.testing.assert_allclose(losses[GPU], losses["cpu"], rtol=2e-2)


def test_the_gpu_tiers_take_the_same_steps(tmp_path, small_dataset):
    """Patterns on the GPU, in pinned host memory (copied per batch on a side stream) or read from
    disk: the same batches reach the same kernels."""
    prepare(config_with(small_dataset), tmp_path / "run")
    prep = read_preprocessed(tmp_path / "run" / "preprocessed.h5")
    tensors = {}
    for tier in ("device", "host", "disk"):
        config = config_with(small_dataset, **MULTI, **{"recon_params.device": GPU,
                                                        "recon_params.measurements": tier})
        rec = reconstruct(config, prep, 3)
        assert rec.tier.tier == tier
        tensors[tier] = {k: v.detach().cpu() for k, v in rec.model.tensors().items()}
    for tier in ("host", "disk"):
        for name, value in tensors["device"].items():
            torch.testing.assert_close(tensors[tier][name], value, rtol=1e-4, atol=1e-5, msg=f"{tier}: {name}")


def test_a_resumed_gpu_run_matches_an_uninterrupted_one(tmp_path, small_dataset):
    def run_dir(name):
        config = config_with(small_dataset, **MULTI, **{"recon_params.device": GPU,
                                                        "recon_params.iterations": 6,
                                                        "recon_params.segment_iterations": 3})
        prepare(config, tmp_path / name)
        return tmp_path / name

    whole, parts = run_dir("whole"), run_dir("parts")
    run_segment(whole, 6)
    run_segment(parts, 3)
    run_segment(parts, 6)  # a new Reconstruction, from the checkpoint the first segment wrote
    a, b = newest_checkpoint(whole), newest_checkpoint(parts)
    assert a.iteration == b.iteration == 6
    for name, value in a.tensors.items():
        torch.testing.assert_close(b.tensors[name], value, rtol=1e-3, atol=1e-5, msg=name)
