"""Under a real Prefect server and process worker, a SIGTERM'd flow run is rescheduled by Prefect
and finishes from its checkpoint with nobody acting (slow: starts a server and a worker)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ptycho_core.checkpoint import read_checkpoint
from ptycho_core.config import load_config
from ptycho_core.io.preprocess import preprocess
from ptycho_core.reconstruction import Reconstruction

from serverkit import alive, deploy_all, descendants, final_states, prefect, rank_processes, wait

pytestmark = pytest.mark.slow


def test_sigterm_under_process_worker_is_rescheduled_and_resumes(tmp_path, server, small_dataset):
    env = server
    raw = yaml.safe_load(Path(small_dataset).read_text())
    raw["data"]["path"] = str(Path(small_dataset).parent / raw["data"]["path"])
    raw["recon_params"].update(iterations=30, segment_iterations=3, batch_size=8, threads=1)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"

    cfg = load_config(config_path)
    rec = Reconstruction.create(cfg, preprocess(cfg))
    rec.run(30)
    reference = {k: v.clone() for k, v in rec.model.tensors().items()}

    deploy_all(env, tmp_path)
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ptyflow"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        run = prefect("deployment", "run", "reconstruct/reconstruct", "--param", f"config={config_path}",
                      "--param", f"run_dir={run_dir}", env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        flow_run_id = next(line.split()[-1] for line in run.stdout.splitlines() if "UUID" in line)

        wait(lambda: list((run_dir / "checkpoints").glob("iter_*.h5")), 180, "a first checkpoint")
        supervisors = [pid for pid, cmd in descendants(worker.pid) if "flow-run execute" in cmd]
        assert supervisors, descendants(worker.pid)
        before = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("iter_*.h5")}
        os.kill(supervisors[0], signal.SIGTERM)

        states = wait(lambda: final_states(env, flow_run_id), 300, "the flow run to finish")
        print("flow run states:", states)
        assert states[-1] == "Completed", states
        assert "AwaitingRetry" in states, states  # Prefect itself put it back in the queue
        # the resumed run continued from the checkpoints: none written before the SIGTERM was redone
        after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").glob("iter_*.h5")}
        assert before and all(after[name] == mtime for name, mtime in before.items())
        final = read_checkpoint(run_dir / "model.hdf5")
        assert final.iteration == 30
        for name, value in reference.items():
            assert torch.equal(final.tensors[name], value), name
    finally:
        worker.send_signal(signal.SIGTERM)
        time.sleep(1)
        worker.send_signal(signal.SIGTERM)  # a second SIGTERM makes the worker stop at once
        worker.wait(timeout=60)


def test_the_node_deployment_runs_one_reconstruction_on_two_processes(tmp_path, server, small_dataset):
    """reconstruct-node gives a run every device of its node (PTYFLOW_NODE_GPUS, here cpu:2): rank 0
    runs under the worker's `prefect flow-run execute`, rank 1 beside it."""
    env = server
    raw = yaml.safe_load(Path(small_dataset).read_text())
    raw["data"]["path"] = str(Path(small_dataset).parent / raw["data"]["path"])
    raw["recon_params"].update(iterations=12, segment_iterations=6, batch_size=8, threads=1)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    deploy_all(env, tmp_path)
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "ptyflow-node"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        run = prefect("deployment", "run", "reconstruct/reconstruct-node", "--param", f"config={config_path}",
                      "--param", f"run_dir={run_dir}", env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        flow_run_id = next(line.split()[-1] for line in run.stdout.splitlines() if "UUID" in line)
        ranks = wait(lambda: rank_processes(run_dir), 180, "a second rank")
        states = wait(lambda: final_states(env, flow_run_id), 300, "the flow run to finish")
        assert states[-1] == "Completed", states
        assert read_checkpoint(run_dir / "model.hdf5").iteration == 12
        time.sleep(0.5)
        assert not any(alive(pid) for pid in ranks)
    finally:
        worker.send_signal(signal.SIGTERM)
        time.sleep(1)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
