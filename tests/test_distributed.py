"""One reconstruction on several processes (recon_params.devices, torch.distributed with gloo on
the CPU): equal to one process's, stopping together on SIGTERM, no process left behind."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from ptycho_core.checkpoint import read_checkpoint
from ptycho_core.config import ConfigError, config_from_dict, resolve_paths
from ptycho_core.io.preprocess import read_preprocessed
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.rundir import read_run_config
from ptycho_core.stages.prepare import prepare
from ptycho_core.stages.segment import run_segment

from conftest import cli
from rankkit import Segments, probe_env
from serverkit import alive, rank_processes

# Measured (float32, Adam, 2 slices, 2 probe modes, object, probe and positions updated from the
# first iteration): the largest difference from one process is 6e-6 of a tensor's largest value
# after 3 iterations and 1.3e-5 after 10 (the object phase); the loss agrees to 1e-7. The
# processes add a batch's gradient in another order than one process does.
RELATIVE_TOLERANCE = 2e-4
ITERATIONS = 6


def raw_config(dataset: Path, devices, iterations=3, segment=3, every_loss=False) -> dict:
    raw = yaml.safe_load(Path(dataset).read_text())
    raw["data"]["path"] = str(Path(dataset).parent / raw["data"]["path"])
    raw["recon_params"].update(iterations=iterations, segment_iterations=segment, batch_size=16, threads=1,
                               devices=devices)
    raw.setdefault("init", {}).setdefault("probe", {})["n_modes"] = 2
    update = raw.setdefault("model_params", {}).setdefault("update_params", {})
    for name in ("probe", "probe_pos_shifts"):  # ptyflow's learning rates, from the first iteration
        update[name] = {"start_iter": 1, "lr": 1e-4}
    # the batch-averaged term needs the whole batch's patterns and predictions. (phase_sparsity is
    # left out: its gradient is the sign of a phase that starts at 0, so rounding flips it; one
    # process splitting its batches in two differs by 8 % of the phase after 3 iterations too)
    if every_loss:  # and a held-out set, scored by both processes' shares
        raw["loss_params"] = {"pacbed": {"weight": 0.5}}
        raw["recon_params"]["validation_fraction"] = 0.1
    return raw


def run_dir_for(tmp_path: Path, name: str, raw: dict, dataset: Path) -> Path:
    run_dir = tmp_path / name
    prepare(resolve_paths(config_from_dict(raw), Path(dataset).parent), run_dir)
    return run_dir


def assert_close(a: dict, b: dict, tolerance=RELATIVE_TOLERANCE):
    for name, value in a.items():
        scale = max(value.abs().max().item(), 1e-12)
        difference = (value - b[name]).abs().max().item()
        assert difference <= tolerance * scale, (name, difference / scale)


def test_two_processes_take_the_steps_one_process_takes(tmp_path, small_multislice):
    one = run_dir_for(tmp_path, "one", raw_config(small_multislice, None, every_loss=True), small_multislice)
    two = run_dir_for(tmp_path, "two", raw_config(small_multislice, "cpu:2", every_loss=True), small_multislice)
    before = torch.get_num_threads()
    try:
        run_segment(one, 3)
        messages: list[str] = []
        run_segment(two, 3, info=messages.append)
    finally:
        torch.set_num_threads(before)
    assert any("devices: 2 processes (cpu, cpu), gloo" in m for m in messages), messages
    a, b = read_checkpoint(one / "model.hdf5"), read_checkpoint(two / "model.hdf5")
    assert b.iteration == 3
    initial = Reconstruction.create(read_run_config(one), read_preprocessed(one / "preprocessed.h5")).model.tensors()
    moved = {name for name, value in a.tensors.items() if not torch.equal(value, initial[name])}
    assert {"obja", "objp", "probe", "probe_pos_shifts"} <= moved  # the comparison covers tensors that changed
    assert_close(a.tensors, b.tensors)
    for key in ("loss", "loss_amplitude", "loss_pacbed", "validation_loss"):
        assert b.history[key] == pytest.approx(a.history[key], rel=1e-5), key
    assert not rank_processes(two)


def test_device_settings_that_cannot_work_are_refused_naming_the_setting(tmp_path, small_dataset):
    base = raw_config(small_dataset, None)
    for devices, message in ((64, "devices: 64 processes would share batches of 16 patterns"),
                             ("gpu:2", "'gpu:2' is not a device setting"), ([0, 0], "expected distinct GPU ids")):
        base["recon_params"]["devices"] = devices
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_dict(base)
    if not torch.cuda.is_available():
        run_dir = run_dir_for(tmp_path, "gpus", raw_config(small_dataset, 2), small_dataset)
        with pytest.raises(ConfigError, match=r"recon_params.devices: 2 names GPUs but torch sees none on this "
                                              r"machine; use 'cpu:2'"):
            run_segment(run_dir, 3)


def test_a_rank_that_dies_ends_the_run_naming_it_and_leaves_the_checkpoint(tmp_path, small_dataset, prefect_api):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw_config(small_dataset, "cpu:2", iterations=40, segment=20)))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cli("run", config, "--run-dir", run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PREFECT_API_URL": prefect_api})
    deadline = time.monotonic() + 120
    while not (run_dir / "model.hdf5").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    while not rank_processes(run_dir) and time.monotonic() < deadline:  # a later segment's rank
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.5)
    newest = read_checkpoint(run_dir / "model.hdf5")
    killed = rank_processes(run_dir)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 5, (stdout, stderr)
    assert re.search(rf"a process of the run failed: rank 1 \(pid {killed[0]}, cpu\) was killed by SIGKILL", stderr), stderr
    assert "Traceback" not in stderr
    kept = read_checkpoint(run_dir / "model.hdf5")  # the newest checkpoint is the one before the kill
    assert (kept.iteration, kept.batch_cursor) == (newest.iteration, newest.batch_cursor) and kept.iteration < 40
    assert not rank_processes(run_dir)


def test_a_dead_rank_whose_connections_stay_open_is_named_at_once(tmp_path, small_dataset):
    """How a rank dies under NCCL on one machine: nothing reaches the other ranks through the
    transport, and their collective waits (for the 10-minute timeout, before rank 0 watched its
    helpers' processes). Here a copy of the helper (tests/rank_probe) keeps its gloo sockets open
    when it is killed, so only that watch can see the death."""
    run_dir = run_dir_for(tmp_path, "run", raw_config(small_dataset, "cpu:2", iterations=1000, segment=1000),
                          small_dataset)
    hold = tmp_path / "hold"
    hold.mkdir()
    holder = None
    with Segments(run_dir, [1000], probe_env(PTYFLOW_PROBE_HOLD=hold)) as run:
        try:
            run.wait_for("iteration 1")  # both ranks are in the batches
            (helper,) = rank_processes(run_dir)
            (hold / "hold").touch()
            deadline = time.monotonic() + 30
            while not (hold / f"holder.{helper}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            holder = int((hold / f"holder.{helper}").read_text())
            os.kill(helper, signal.SIGKILL)
            assert run.end(timeout_s=60) == 5, run.stderr
        finally:
            if holder is not None:
                os.kill(holder, signal.SIGKILL)
    assert re.search(rf"DistributedError: rank 1 \(pid {helper}, cpu\) was killed by SIGKILL", run.stderr), run.stderr
    assert not (run_dir / "model.hdf5").exists()  # no checkpoint from a failed segment
    time.sleep(0.5)
    assert not rank_processes(run_dir)


def test_sigterm_stops_every_rank_at_one_batch_and_a_one_process_rerun_finishes(tmp_path, small_multislice,
                                                                                  run_cli):
    reference_dir = run_dir_for(tmp_path, "reference", raw_config(small_multislice, None, ITERATIONS, 2),
                                small_multislice)
    before = torch.get_num_threads()
    try:
        for end in (2, 4, 6):
            run_segment(reference_dir, end)
    finally:
        torch.set_num_threads(before)
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(raw_config(small_multislice, "cpu:2", ITERATIONS, 2)))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cli("run", two, "--run-dir", run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("iter_*.h5")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    while not rank_processes(run_dir) and time.monotonic() < deadline:  # the second segment's ranks
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, (stdout, stderr)
    match = re.search(r"preempted at iteration (\d+)(?: \(\+(\d+) batches)?", stderr)
    assert match and "Traceback" not in stderr, stderr
    iteration, batches = int(match.group(1)), int(match.group(2) or 0)
    written = read_checkpoint(run_dir / "model.hdf5")
    assert (written.iteration, written.batch_cursor) == (iteration, batches)
    assert iteration < ITERATIONS
    time.sleep(0.5)
    assert not rank_processes(run_dir), "a rank outlived the preempted run"

    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(raw_config(small_multislice, None, ITERATIONS, 2)))
    rerun = run_cli("run", one, "--run-dir", run_dir)
    assert rerun.returncode == 0, rerun.stderr
    final, reference = read_checkpoint(run_dir / "model.hdf5"), read_checkpoint(reference_dir / "model.hdf5")
    assert final.iteration == ITERATIONS
    assert_close(reference.tensors, final.tensors)


def test_sigkill_of_rank_0_leaves_no_rank_behind(tmp_path, small_dataset):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw_config(small_dataset, "cpu:2", 40, 40)))
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cli("run", config, "--run-dir", run_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not rank_processes(run_dir) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    helpers = rank_processes(run_dir)
    assert helpers
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in helpers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in helpers), "a rank outlived the killed run"
