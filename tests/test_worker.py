"""Under a real Prefect server and process worker, a SIGTERM'd flow run is rescheduled by Prefect
and finishes from its checkpoint with nobody acting (slow: starts a server and a worker)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from ptycho_core.checkpoint import read_checkpoint
from ptycho_core.config import load_config
from ptycho_core.io.preprocess import preprocess
from ptycho_core.reconstruction import Reconstruction

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect(*args, env, **kw):
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True,
                          timeout=120, **kw)


def wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def processes():
    """{pid: (ppid, cmdline)} of this machine."""
    out = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def descendants(root):
    table = processes()
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cmd) in table.items():
            if ppid == parent:
                found.append((pid, cmd))
                frontier.append(pid)
    return found


@pytest.fixture
def server(tmp_path):
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait(healthy, 90, "the Prefect server")
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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

    assert prefect("work-pool", "create", "ptyflow", "--type", "process", env=env).returncode == 0
    deploy = prefect("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all",
                     env={**env, "PTYFLOW_WORKDIR": str(REPO)}, cwd=REPO)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
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


def final_states(env, flow_run_id):
    """Names of the run's states in order once it is final, else None."""
    code = (
        "import asyncio, sys\n"
        "from uuid import UUID\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as c:\n"
        f"        run = await c.read_flow_run(UUID('{flow_run_id}'))\n"
        "        if not run.state.is_final(): return\n"
        f"        states = await c.read_flow_run_states(UUID('{flow_run_id}'))\n"
        "        print(' '.join(s.name.replace(' ', '') for s in states))\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return out.stdout.split() or None
