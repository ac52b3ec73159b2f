"""Fault injection: 20 SIGKILLs and 20 SIGTERMs (PTYFLOW_FAULT_CYCLES) at random moments of `ptyflow run` (preprocess,
mid-segment, inside a checkpoint write, during export), each followed by a rerun that must end
with the tensors of an uninterrupted run; then 20 SIGTERMs and SIGINTs to the run or to its whole
process group, as batch schedulers send them, each of which must end the run cleanly (slow, a few
minutes each)."""

import collections
import os
import random
import re
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
from serverkit import descendants, with_environment

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


def interrupted_run(config, run_dir, env, stage, sig, rng, to_group=False):
    """Start a run (in a session of its own), send ``sig`` at a random moment of ``stage`` to it or
    to its whole process group, as a batch scheduler does; returns what was seen. Stages: those of
    STAGES; "start-up" (once the run has started its embedded server); "any" (a random moment of
    the first 10 s)."""
    paused = stage in ("preprocess", "checkpoint_write", "export")
    pause_env = {**env, "PTYFLOW_FAULT_PAUSE": f"{stage}:0.6"} if paused else env
    proc = subprocess.Popen(cli("run", config, "--run-dir", run_dir), env=pause_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
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
    elif stage == "start-up":
        while not descendants(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 2.0))
    elif stage == "any":
        time.sleep(rng.uniform(0.5, 10.0))
    else:
        # the n-th pause of that stage (several checkpoint writes happen), then a random moment in it
        skip = rng.randrange(3) if stage == "checkpoint_write" else 0
        for _ in range(skip + 1):
            entered.clear()
            entered.wait(timeout=120)
        time.sleep(rng.uniform(0, 0.5))
    killed_alive = proc.poll() is None
    if to_group and killed_alive:
        os.killpg(proc.pid, sig)
    else:
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


# what a run prints on stderr besides the one line that says why it stopped
ROUTINE = re.compile(r"^(fault-pause: \w+|iterations \d+-\d+: loss .*|warning: .*)$")
STOP_LINE = re.compile(r"^(stopped by (SIGTERM|SIGINT) during .+|preempted at iteration \d+.* by (SIGTERM|SIGINT);"
                       r" checkpoint .+); rerun the same command to resume$")
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


def stop_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are not routine progress."""
    return [line for line in stderr.splitlines() if line.strip() and not ROUTINE.match(line)]


def test_signals_to_the_run_or_its_process_group_at_every_stage_stop_cleanly(tmp_path, fault_config):
    """As Slurm, PBS or Kubernetes preempt a job (every process of it signalled at once) or a user
    presses Ctrl-C: SIGTERM and SIGINT, to the run alone or to its whole process group, at random
    moments of every stage, with the embedded server. Each run ends with 143/130 and exactly one
    line saying where it stopped, leaves no process behind, and its rerun ends like an
    uninterrupted run."""
    config, reference = fault_config
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    stages = ["start-up", "preprocess", "segment", "checkpoint_write", "export", "any"]
    rng = random.Random(4321)
    counts = collections.Counter()
    for cycle in range(CYCLES):
        stage = stages[cycle % len(stages)]
        sig = (signal.SIGTERM, signal.SIGINT)[cycle % 2]
        to_group = (cycle // 2) % 2 == 0
        run_dir = tmp_path / f"run{cycle:02d}"
        what = f"cycle {cycle}: {signal.Signals(sig).name} to the {'group' if to_group else 'run'} in {stage}"
        alive_then, code, stderr = interrupted_run(config, run_dir, env, stage, sig, rng, to_group)
        if not alive_then and stage == "any":
            counts["finished before the signal"] += 1
        else:
            assert alive_then, f"{what}: the run ended before the signal: {stderr[-2000:]}"
            assert code == EXIT_CODES[sig], f"{what}: exit {code}: {stderr[-3000:]}"
            assert "Traceback" not in stderr, f"{what}: {stderr[-3000:]}"
            lines = stop_lines(stderr)
            assert len(lines) == 1 and STOP_LINE.match(lines[0]), f"{what}: {lines}"
            counts["clean stops"] += 1
        deadline = time.monotonic() + 10
        while with_environment("PREFECT_HOME", home) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not with_environment("PREFECT_HOME", home), f"{what}: a process outlived the run"
        rerun = subprocess.run(cli("run", config, "--run-dir", run_dir), env=env, capture_output=True, text=True,
                               timeout=300)
        assert rerun.returncode == 0, f"{what}: rerun: {rerun.stderr[-2000:]}"
        final = read_checkpoint(run_dir / "model.hdf5")
        assert final.iteration == ITERATIONS and final.batch_cursor == 0
        for name, value in reference.items():
            assert torch.equal(final.tensors[name], value), (what, name)
    print(dict(counts))


@pytest.mark.parametrize("command", ["sweep-grid", "sweep-optuna", "demo"])
def test_sigterm_to_the_process_group_stops_sweeps_and_the_demo_cleanly(tmp_path, small_dataset, command):
    """The same for `ptyflow sweep` (grid and optuna, in this process) and `ptyflow demo`: SIGTERM
    to the whole group in the second point's iterations (the demo's first) ends the command with
    143, one line and no process left; the rerun finishes what is missing and nothing else."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    out = tmp_path / "out"
    if command == "demo":
        args, first_of = ["demo", "--out", out], lambda: next(out.glob("run/checkpoints/iter_*.h5"), None)
    else:
        raw = yaml.safe_load(Path(small_dataset).read_text())
        raw["data"]["path"] = str(Path(small_dataset).parent / raw["data"]["path"])
        raw["recon_params"].update(iterations=6, segment_iterations=3, threads=1, validation_fraction=0.1)
        base = tmp_path / "base.yaml"
        base.write_text(yaml.safe_dump(raw))
        lr = "model_params.update_params.objp.lr"
        spec = ({"mode": "list", "parameters": {lr: [2e-3, 5e-3, 1e-2]}} if command == "sweep-grid" else
                {"mode": "optuna", "n_trials": 3, "seed": 1, "pruner": "none", "parameters": {
                    lr: {"low": 1e-3, "high": 0.1, "log": True}}})
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
        args = ["sweep", base, tmp_path / "spec.yaml", "--out", out]
        second = "point_001_*" if command == "sweep-grid" else "trial_001_*"
        first_of = lambda: next(out.glob(f"{second}/checkpoints/iter_*.h5"), None)  # noqa: E731
    proc = subprocess.Popen(cli(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while first_of() is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    lines = stop_lines(stderr)
    assert len(lines) == 1 and STOP_LINE.match(lines[0]), lines
    time.sleep(2)
    assert not with_environment("PREFECT_HOME", home), "a process outlived the command"

    rerun = subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    if command == "demo":
        assert "phase Pearson vs ground truth" in rerun.stdout
        assert read_checkpoint(out / "run" / "model.hdf5").iteration == 30
    else:
        finished_dirs = sorted(p.name for p in out.iterdir() if (p / "model.hdf5").is_file()
                               and read_checkpoint(p / "model.hdf5").iteration == 6)
        assert len(finished_dirs) == 3, sorted(p.name for p in out.iterdir())
