"""Prefect's embedded (ephemeral) API server, tied to the life of this process.

Prefect's own ephemeral server is a subprocess that outlives a killed parent. When no
PREFECT_API_URL is configured, ptyflow starts the same server itself with the Linux parent-death
signal set, so it ends with the ptyflow process however that process ends (SIGKILL included).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

_PR_SET_PDEATHSIG = 1


PDEATHSIG_FAILED = (b"ptyflow: warning: PR_SET_PDEATHSIG could not be set, so the embedded Prefect server may "
                    b"outlive a killed ptyflow (look for a leftover uvicorn process)\n")


def _die_with_parent() -> None:  # runs in the child between fork and exec: only os-level calls
    try:
        failed = ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:  # the guarantee is lost: say so rather than leave a server behind silently
        os.write(2, PDEATHSIG_FAILED)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the embedded Prefect server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the embedded Prefect server did not answer at {url} within {timeout_s:.0f} s")


def _drain_to_server() -> None:
    """Send queued run logs and events while the server still listens (else they retry for ~1 min)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        try:
            service.drain_all(timeout=10)
        except Exception:  # best effort: results on disk do not depend on it
            pass


@contextlib.contextmanager
def prefect_backend(timeout_s: float = 60.0) -> Iterator[str]:
    """Use the configured Prefect server, or start an embedded one for the duration.

    Yields the API URL in use (or "" when Prefect's own settings decide).
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured or sys.platform != "linux":
        yield configured or ""
        return
    import prefect

    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env=env, preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(url, proc, timeout_s)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_to_server()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
