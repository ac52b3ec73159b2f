"""Data larger than memory: streaming preprocessing, the measurement tiers (device, host, disk),
the input check that does not re-read the raw file, and faults while streaming."""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from ptycho_core.checkpoint import latest_valid_checkpoint, read_checkpoint
from ptycho_core.config import ConfigError
from ptycho_core.io import preprocess as preprocess_module
from ptycho_core.io.preprocess import read_preprocessed
from ptycho_core.io.readers import DataError
from ptycho_core.measurements import choose_tier
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.rundir import RunDirError
from ptycho_core.stages.prepare import prepare
from ptycho_core.stages.segment import run_segment

from conftest import cli
from helpers import config_with

MULTI = {"init.object.n_slices": 2, "init.object.slice_thickness_ang": 4.0, "init.probe.n_modes": 2,
         "recon_params.batch_size": 24, "recon_params.threads": 1}


def tensors_after(config, prep, iterations):
    rec = Reconstruction.create(config, prep)
    rec.run(iterations)
    return rec, {k: v.detach().clone() for k, v in rec.model.tensors().items()}


@pytest.mark.parametrize("batching", ["random", "compact"])
def test_every_tier_gives_bitwise_equal_tensors(tmp_path, small_dataset, one_thread, batching):
    """Multislice, two probe modes, Adam: device, host and disk tiers take the same steps."""
    config = config_with(small_dataset, **MULTI, **{"recon_params.batching": batching})
    prepare(config, tmp_path / "run")
    prep = read_preprocessed(tmp_path / "run" / "preprocessed.h5")
    results = {}
    for tier in ("device", "host", "disk"):
        config.recon_params.measurements = tier
        rec, results[tier] = tensors_after(config, prep, 3)
        assert rec.tier.tier == tier and type(rec.problem.measurements).tier == tier
        assert rec.state.history["loss"][-1] < rec.state.history["loss"][0]
    assert not hasattr(rec.problem.measurements, "all"), "the disk tier must not hold the patterns"
    for tier in ("host", "disk"):
        for name, value in results["device"].items():
            assert torch.equal(results[tier][name], value), (tier, name)


def test_auto_takes_the_fastest_tier_that_fits_the_budget():
    window, n = (64, 64), 10_000  # 164 MB as float32, 328 MB as float64
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_tier("auto", n, window, torch.float32, 32, cpu, 1.0).tier == "device"
    assert choose_tier("auto", n, window, torch.float32, 32, cpu, 0.1).tier == "disk"
    # on a GPU the patterns go to pinned host memory when only float32 copies fit the budget there
    assert choose_tier("auto", n, window, torch.float64, 32, gpu, 0.2).tier == "host"
    assert choose_tier("auto", n, window, torch.float64, 32, gpu, 0.4).tier == "device"
    choice = choose_tier("auto", n, window, torch.float32, 32, cpu, None)  # half of this machine's free RAM
    assert choice.tier == "device" and "budget" in choice.reason
    assert choose_tier("disk", n, window, torch.float32, 32, cpu, 1.0).tier == "disk"


def test_a_budget_too_small_for_the_batches_in_flight_is_refused_before_anything_starts(tmp_path, small_dataset):
    config = config_with(small_dataset, **{"recon_params.memory_budget_gb": 1e-5, "recon_params.batch_size": 64})
    prepare(config, tmp_path / "run")
    prep = read_preprocessed(tmp_path / "run" / "preprocessed.h5")
    with pytest.raises(ConfigError, match=r"recon_params\.memory_budget_gb: .* needs at least .* GB.*batch_size"):
        Reconstruction.create(config, prep)
    with pytest.raises(ConfigError):
        run_segment(tmp_path / "run", 2)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_resume_checks_the_input_without_reading_it_whole(tmp_path, small_dataset, monkeypatch):
    data = tmp_path / "data.h5"
    shutil.copy(Path(small_dataset).parent / "data.h5", data)
    config = config_with(small_dataset, **{"data.path": str(data)})
    first = prepare(config, tmp_path / "run")
    assert not first.skipped

    def no_full_read(*args, **kwargs):
        raise AssertionError("the whole input file was read again")

    with monkeypatch.context() as patch:
        patch.setattr(preprocess_module, "content_digest", no_full_read)
        again = prepare(config, tmp_path / "run")
    assert again.skipped and "not re-hashed" in again.input_check

    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # copied or touched: same bytes
    touched = prepare(config, tmp_path / "run")
    assert touched.skipped and "hashed whole" in touched.input_check

    with open(data, "r+b") as fh:  # same size, other bytes at the start (the file's header)
        head = fh.read(16)
        fh.seek(0)
        fh.write(bytes(255 - b for b in head))
    with pytest.raises(RunDirError, match=rf"{data}.*changed.*different input"):
        prepare(config, tmp_path / "run")
    with open(data, "r+b") as fh:
        fh.write(head)
    with open(data, "ab") as fh:  # grown
        fh.write(b"\0")
    with pytest.raises(RunDirError, match="size"):
        prepare(config, tmp_path / "run")


def test_a_partial_preprocessed_file_of_a_killed_run_is_removed(tmp_path, small_dataset):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    leftover = run_dir / ".preprocessed.h5.otherhost.4242.tmp"
    leftover.write_bytes(b"\0" * 4096)
    warnings = []
    prepare(config_with(small_dataset), run_dir, warn=warnings.append)
    assert not leftover.exists() and (run_dir / "preprocessed.h5").is_file()
    assert warnings == [f"removed {leftover.name}, left by a preprocessing that did not finish"]


def test_a_damaged_or_changed_file_under_a_disk_run_is_one_message_and_the_rerun_resumes(
        tmp_path, small_dataset, one_thread):
    config = config_with(small_dataset, **{"recon_params.measurements": "disk", "recon_params.iterations": 4,
                                           "recon_params.segment_iterations": 2, "recon_params.threads": 1,
                                           "preprocess.compression": "gzip", "recon_params.segment_figures": False})
    run_dir = tmp_path / "run"
    prepare(config, run_dir)
    preprocessed = run_dir / "preprocessed.h5"
    prep = read_preprocessed(preprocessed)
    _, reference = tensors_after(config, prep, 4)
    prep.measurements.close()  # HDF5 would serve this process's later reads from the open file's cache
    run_segment(run_dir, 2)

    # a damaged chunk (the file's size and time kept): the read fails, naming file and patterns
    with h5py.File(preprocessed, "r") as f:
        info = f["measurements"].id.get_chunk_info(17)
    stat = preprocessed.stat()
    with open(preprocessed, "r+b") as fh:
        fh.seek(info.byte_offset)
        fh.write(b"\xff" * info.size)
    os.utime(preprocessed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match=rf"{preprocessed}:measurements: cannot read patterns") as failed:
        run_segment(run_dir, 4)
    first, last = map(int, re.search(r"patterns (\d+)\.\.(\d+)", str(failed.value)).groups())
    assert first <= 17 <= last
    assert latest_valid_checkpoint(run_dir / "checkpoints")[0].iteration == 2

    # the file rewritten while the segment runs: the next read says so
    preprocessed.unlink()
    prepare(config, run_dir)  # preprocessed again; the checkpoint of iteration 2 is kept

    def rewrite_once(state, row):
        if state.iteration == 3:
            with open(preprocessed, "ab") as fh:
                fh.write(b"\0" * 16)

    with pytest.raises(DataError, match=rf"{preprocessed}: the file changed .* pattern \d+ was not read"):
        run_segment(run_dir, 4, on_iteration=rewrite_once)
    assert latest_valid_checkpoint(run_dir / "checkpoints")[0].iteration == 2

    outcome = run_segment(run_dir, 4)  # the trailing bytes change no pattern: it resumes from 2
    assert outcome.first_iteration == 2 and outcome.iteration == 4
    final = read_checkpoint(outcome.checkpoint)
    for name, value in reference.items():
        assert torch.equal(final.tensors[name], value), name


def test_a_stop_mid_iteration_in_disk_mode_resumes_in_another_tier_to_the_same_tensors(
        tmp_path, small_dataset, one_thread):
    """What SIGTERM does (the task's stop flag): the prefetching reader is shut down, the checkpoint
    is written mid-iteration, and the rerun, here from host memory, ends where an uninterrupted
    run does."""
    from ptycho_core.rundir import Preempted

    config = config_with(small_dataset, **{"recon_params.measurements": "disk", "recon_params.iterations": 3,
                                           "recon_params.segment_iterations": 3, "recon_params.threads": 1,
                                           "recon_params.batch_size": 16, "recon_params.segment_figures": False})
    run_dir = tmp_path / "run"
    prepare(config, run_dir)
    prep = read_preprocessed(run_dir / "preprocessed.h5")
    _, reference = tensors_after(config, prep, 3)
    prep.measurements.close()
    batches = []

    def stop_after_20_batches():
        batches.append(1)
        return len(batches) >= 20

    threads_before = set(threading.enumerate())
    with pytest.raises(Preempted, match=r"preempted at iteration 1 \(\+\d+ batches of iteration 2\)"):
        run_segment(run_dir, 3, stop_requested=stop_after_20_batches)
    assert not set(threading.enumerate()) - threads_before, "a reader thread lives on"
    config.recon_params.measurements = "host"
    (run_dir / "config.yaml").write_text(config.to_yaml())  # a free setting: the rerun takes it
    outcome = run_segment(run_dir, 3)
    assert outcome.first_iteration == 1
    final = read_checkpoint(outcome.checkpoint)
    for name, value in reference.items():
        assert torch.equal(final.tensors[name], value), name


def test_disk_tier_sigkill_then_rerun_equals_an_uninterrupted_run(tmp_path, small_dataset, prefect_api, run_cli):
    raw = yaml.safe_load(Path(small_dataset).read_text())
    raw["data"]["path"] = str(Path(small_dataset).parent / raw["data"]["path"])
    raw["recon_params"].update(iterations=16, segment_iterations=4, batch_size=8, threads=1, measurements="disk")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = config_with(path, **{"recon_params.measurements": "device"})
    before = torch.get_num_threads()
    prepare(config, tmp_path / "reference")
    _, reference = tensors_after(config, read_preprocessed(tmp_path / "reference" / "preprocessed.h5"), 16)
    torch.set_num_threads(before)

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cli("run", path, "--run-dir", run_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PREFECT_API_URL": prefect_api})
    deadline = time.monotonic() + 120
    while not list((run_dir / "checkpoints").glob("iter_*.h5")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_checkpoint(run_dir / "model.hdf5").iteration < 16, "the kill came too late to test anything"

    rerun = run_cli("run", path, "--run-dir", run_dir)
    assert rerun.returncode == 0, rerun.stderr
    final = read_checkpoint(run_dir / "model.hdf5")
    assert final.iteration == 16
    for name, value in reference.items():
        assert torch.equal(final.tensors[name], value), name


PEAK_SCRIPT = textwrap.dedent("""
    import sys
    from ptycho_core.config import load_config
    from ptycho_core.io.preprocess import preprocess
    preprocess(load_config(sys.argv[1]), sys.argv[2])
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print(int(line.split()[1]) * 1024)
""")


def test_preprocessing_peak_memory_does_not_grow_with_the_dataset(tmp_path, small_dataset):
    """4096 and 32768 patterns of 64x64 (uint16 raw, as detectors write them), centred and
    normalized (two streaming passes): the child process's peak RSS grows by far less than the
    448 MB the larger output adds."""
    with h5py.File(Path(small_dataset).parent / "data.h5", "r") as f:
        tile = np.asarray(f["meas"][:4], dtype=np.float32).reshape(64, 64, 64)
    raw = yaml.safe_load(Path(small_dataset).read_text())
    peaks = {}
    for n, scan in ((4096, [64, 64]), (32768, [128, 256])):
        data = tmp_path / f"raw_{n}.h5"
        with h5py.File(data, "w") as f:
            ds = f.create_dataset("patterns", shape=(n, 64, 64), dtype=np.uint16, chunks=(64, 64, 64))
            for start in range(0, n, 1024):
                ds[start:start + 1024] = np.tile(np.round(tile * 20), (16, 1, 1)).astype(np.uint16)
        config = {**raw, "data": {"path": str(data), "meas_key": "/patterns"},
                  "experiment": {**raw["experiment"], "scan": {"shape": scan, "step_ang": 0.4}},
                  "preprocess": {"center_bf_disk": True, "normalize": "mean_sum"}}
        path = tmp_path / f"config_{n}.yaml"
        path.write_text(yaml.safe_dump(config))
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(tmp_path / f"pre_{n}.h5")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        peaks[n] = int(out.stdout.strip().splitlines()[-1])
        assert read_preprocessed(tmp_path / f"pre_{n}.h5").n_patterns == n
    grown = peaks[32768] - peaks[4096]
    assert grown < 64e6, f"peak RSS grew by {grown / 1e6:.0f} MB: {peaks}"
