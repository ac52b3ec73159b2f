"""On a CUDA GPU: the same reconstruction as on the CPU, the measurement tiers that exist for GPUs
(pinned host memory, disk) and a resume, on the device facilities run on; with two GPUs or more,
one reconstruction on two (NCCL): each process keeps to its own GPU, and a rank that dies ends
the run at once, naming it.

Skipped without CUDA (CI has none); benchmarks/gpu.sh runs them first when a session is lent a
GPU. GPU kernels add in a different order than the CPU's (scatter-adds are not deterministic on
CUDA), so results are compared within float32 tolerances, not bitwise."""

import json
import os
import re
import signal
import time

import numpy as np
import pytest
import torch

from ptycho_core.io.preprocess import read_preprocessed
from ptycho_core.quality import phase_pearson, scanned_field_mask
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.rundir import newest_checkpoint
from ptycho_core.stages.prepare import prepare
from ptycho_core.stages.segment import run_segment
from ptycho_core.simulate import read_ground_truth

from helpers import config_with
from rankkit import Segments, probe_env, probe_reports
from serverkit import rank_processes

# PTYFLOW_GPU_TEST_DEVICE=cpu runs the same tests on the CPU: how gpu.sh's dry run checks them here
GPU = os.environ.get("PTYFLOW_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(GPU == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (benchmarks/gpu.sh)")

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
# NCCL puts each rank on its own GPU; in the dry run two CPU processes (gloo) stand in for them
TWO_GPUS = pytest.mark.skipif(GPU == "cuda" and GPUS < 2, reason="needs two GPUs (one per rank)")

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


def run_dir_with(tmp_path, dataset, **settings):
    """A prepared run folder of ``dataset`` with these settings (dotted keys), batches of 16."""
    config = config_with(dataset, **{"recon_params.batch_size": 16, "recon_params.threads": 1, **settings})
    prepare(config, tmp_path / "run")
    return tmp_path / "run"


def ordinal(device: str):
    """The GPU of a torch device name ('cuda' is GPU 0); None for the CPU."""
    if not device.startswith("cuda"):
        return None
    return torch.device(device).index or 0


# (recon_params.device, recon_params.devices): one process on the second GPU, two ranks in both
# orders (each order puts one rank on a GPU other than 0), and two CPU ranks, which must leave
# every GPU alone (the one case a one-GPU machine checks; in the dry run, the probe's plumbing)
PLACEMENTS = [("cuda:1", None), ("cuda", [0, 1]), ("cuda", [1, 0]), ("cpu", "cpu:2")]


@pytest.mark.parametrize("device, devices", PLACEMENTS if GPU == "cuda" else PLACEMENTS[-1:])
def test_every_process_holds_a_cuda_context_on_its_own_gpu_only(tmp_path, small_dataset, device, devices):
    """A context on a GPU takes some hundreds of MB there. Every process of a segment selects its
    GPU before it builds anything (helper ranks used to build their feed first), and so does the
    pinned tier's copy thread before its stream switches: a thread starts on GPU 0, where a CUDA
    call leaves a context. Each process says at exit on which GPUs it holds one (tests/rank_probe
    asks the CUDA driver)."""
    if device != "cpu" and GPUS < 2:
        pytest.skip("needs two GPUs")
    run_dir = run_dir_with(tmp_path, small_dataset, **{"recon_params.device": device, "recon_params.devices": devices,
                                                       "recon_params.measurements": "host"})
    reports = tmp_path / "reports"
    reports.mkdir()
    with Segments(run_dir, [2], probe_env(PTYFLOW_PROBE_DIR=reports)) as run:
        assert run.end(timeout_s=300) == 0, run.stderr
    written = probe_reports(reports)
    expected = {run.process.pid: devices[0] if isinstance(devices, list) else ordinal(device)}
    for pid, report in written.items():
        if "ptycho_core.ranks" in report["command"]:
            expected[pid] = ordinal(json.loads(report["command"][-1])["device"])
    assert set(written) == set(expected) and len(expected) == (2 if devices else 1), written
    for pid, gpu in expected.items():
        held = written[pid]["contexts"] or []  # None: no CUDA driver (the dry run)
        assert held == ([] if gpu is None else [gpu]), (pid, written[pid])


@TWO_GPUS
def test_a_rank_killed_under_nccl_ends_the_run_at_once_naming_it(tmp_path, small_dataset):
    """An NCCL collective whose peer died raises nothing: it spins on the GPU, and without rank 0
    watching its helpers' processes the run would hang for the 10-minute timeout (or be ended by
    NCCL's watchdog with SIGABRT). Killed in its second segment, the helper is named, the newest
    checkpoint is the first segment's, and no process is left."""
    devices = [0, 1] if GPU == "cuda" else "cpu:2"
    run_dir = run_dir_with(tmp_path, small_dataset, **{"recon_params.device": GPU, "recon_params.devices": devices,
                                                       "recon_params.iterations": 1000,
                                                       "recon_params.segment_iterations": 2})
    with Segments(run_dir, [2, 1000], probe_env()) as run:
        run.wait_for("iteration 4")  # the second segment's ranks are in its batches
        newest = newest_checkpoint(run_dir)
        (helper,) = rank_processes(run_dir)
        os.kill(helper, signal.SIGKILL)
        assert run.end(timeout_s=60) == 5, run.stderr
    rank_1 = "cuda:1" if GPU == "cuda" else "cpu"
    assert re.search(rf"DistributedError: rank 1 \(pid {helper}, {rank_1}\) was killed by SIGKILL", run.stderr), \
        run.stderr
    kept = newest_checkpoint(run_dir)
    assert newest.iteration == 2 and (kept.iteration, kept.batch_cursor) == (newest.iteration, newest.batch_cursor)
    time.sleep(0.5)
    assert not rank_processes(run_dir)
