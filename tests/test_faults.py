"""Fault injection: 20 SIGKILLs and 20 SIGTERMs (PTYFLOW_FAULT_CYCLES) at random moments of `ptyflow run` (preprocess,
mid-segment, inside a checkpoint write, during export), each followed by a rerun that must end
with the tensors of an uninterrupted run (slow, a few minutes)."""

import collections
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from ptycho_core.checkpoint import list_checkpoints, read_checkpoint
from ptycho_core.config import load_config
from ptycho_core.io.preprocess import preprocess
from ptycho_core.reconstruction import Reconstruction

from conftest import cli

pytestmark = pytest.mark.slow
ITERATIONS = 8
STAGES = ["preprocess", "segment", "checkpoint_write", "export"]
# 20 per signal by default; CI sets fewer (a round of every stage twice) to stay within its time
CYCLES = int(os.environ.get("PTYFLOW_FAULT_CYCLES", "20"))


@pytest.fixture(scope="module")
def fault_config(tmp_path_factory, small_dataset):
    raw = yaml.safe_load(Path(small_dataset).read_text())
    raw["data"]["path"] = str(Path(small_dataset).parent / raw["data"]["path"])
    raw["recon_params"].update(iterations=ITERATIONS, segment_iterations=2, batch_size=16, threads=1)
    path = tmp_path_factory.mktemp("faults") / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    before = torch.get_num_threads()
    rec = Reconstruction.create(cfg, preprocess(cfg))
    rec.run(ITERATIONS)
    torch.set_num_threads(before)
    return path, {k: v.clone() for k, v in rec.model.tensors().items()}


def interrupted_run(config, run_dir, env, stage, sig, rng):
    """Start a run, send ``sig`` at a random moment of ``stage``; returns what was seen."""
    pause_env = {**env, "PTYFLOW_FAULT_PAUSE": f"{stage}:0.6"} if stage != "segment" else env
    proc = subprocess.Popen(cli("run", config, "--run-dir", run_dir), env=pause_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines, entered = [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line)
            if f"fault-pause: {stage}" in line:
                entered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    if stage == "segment":
        while not list((run_dir / "checkpoints").glob("iter_*.h5")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.6))
    else:
        # the n-th pause of that stage (several checkpoint writes happen), then a random moment in it
        skip = rng.randrange(3) if stage == "checkpoint_write" else 0
        for _ in range(skip + 1):
            entered.clear()
            entered.wait(timeout=120)
        time.sleep(rng.uniform(0, 0.5))
    killed_alive = proc.poll() is None
    proc.send_signal(sig)
    proc.wait(timeout=60)
    reader.join(timeout=5)
    return killed_alive, proc.returncode, "".join(lines)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_twenty_interruptions_then_reruns_end_like_an_uninterrupted_run(tmp_path, fault_config, prefect_api, sig):
    config, reference = fault_config
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    rng = random.Random(1234 + int(sig))
    counts = collections.Counter()
    for cycle in range(CYCLES):
        stage = STAGES[cycle % len(STAGES)]
        run_dir = tmp_path / f"run{cycle:02d}"
        alive, code, stderr = interrupted_run(config, run_dir, env, stage, sig, rng)
        assert alive, f"cycle {cycle}: the run ended before the {stage} interruption: {stderr[-2000:]}"
        counts[f"{stage}"] += 1
        if sig == signal.SIGTERM and "preempted at iteration" in stderr:
            counts["preempted cleanly"] += 1
        rerun = subprocess.run(cli("run", config, "--run-dir", run_dir), env=env, capture_output=True, text=True,
                               timeout=300)
        assert rerun.returncode == 0, f"cycle {cycle} ({stage}): {rerun.stderr[-2000:]}"
        final = read_checkpoint(run_dir / "model.hdf5")
        assert final.iteration == ITERATIONS and final.batch_cursor == 0
        for name, value in reference.items():
            assert torch.equal(final.tensors[name], value), (cycle, stage, name)
        newest = list_checkpoints(run_dir / "checkpoints")[-1]
        assert read_checkpoint(newest).iteration == ITERATIONS  # the newest file is whole
        assert (run_dir / "result.zarr" / "zarr.json").is_file()
    print(f"{signal.Signals(sig).name}: {dict(counts)}")
    assert sum(counts[s] for s in STAGES) == CYCLES
