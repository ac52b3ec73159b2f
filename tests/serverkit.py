"""Helpers for tests that run real processes: a Prefect server and workers on 127.0.0.1, process trees."""

import socket
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


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


def alive(pid):
    """True while pid exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def rank_processes(run_dir):
    """Living helper ranks of a multi-process run in ``run_dir`` (their command line names it)."""
    return [pid for pid, (_, cmd) in processes().items()
            if "ptycho_core.ranks" in cmd and str(run_dir) in cmd and alive(pid)]


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


def deploy_all(env, tmp_path):
    """Create the work pools and deploy every flow of deployments/prefect.yaml (the node
    deployment with devices cpu:2, as a node of two CPU processes)."""
    for pool in ("ptyflow", "ptyflow-control", "ptyflow-node"):
        assert prefect("work-pool", "create", pool, "--type", "process", env=env).returncode == 0
    inbox_env = {"PTYFLOW_INBOX": str(tmp_path / "inbox"), "PTYFLOW_OUTBOX": str(tmp_path / "outbox"),
                 "PTYFLOW_WATCH_CONFIG": str(tmp_path / "watch.yaml"), "PTYFLOW_NODE_GPUS": "cpu:2"}
    deploy = prefect("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all",
                     env={**env, "PTYFLOW_WORKDIR": str(REPO), **inbox_env}, cwd=REPO)
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr


def with_environment(name, value):
    """Living processes whose environment holds name=value (e.g. the PREFECT_HOME of one test)."""
    found = []
    for pid in processes():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # ended meanwhile, or not ours to read
            continue
        if f"{name}={value}".encode() in environ.split(b"\0") and alive(pid):
            found.append(pid)
    return found
