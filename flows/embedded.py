"""Prefect's embedded (ephemeral) API server, tied to the life of this process.

Prefect's own ephemeral server is a subprocess that outlives a killed parent. When no
PREFECT_API_URL is configured, ptyflow starts the same server itself, tied to the ptyflow process:
- it ends with it however that process ends: the Linux parent-death signal (SIGKILL included),
  and the end of its stdin, which only ptyflow holds (``stop``: a clean shutdown);
- no signal meant for the run takes it down first. A batch scheduler signals every process of
  the job, and a terminal's Ctrl-C the whole process group; the run then still needs the server to
  record where it stopped. So the server runs in a session of its own (out of the terminal's
  process group) and ignores SIGTERM and SIGINT (Slurm signals the job's processes whatever
  their session).
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
from pathlib import Path
from typing import Iterator, Optional

from tasks import stopping

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


class EmbeddedServer:
    """The embedded API server process, started but perhaps not answering yet."""

    def __init__(self):
        import importlib.util

        # the app directory without importing prefect's server modules (the child imports them)
        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flows.embedded", str(prefect_dir.parent), str(self.port)],
            env=env, preexec_fn=_die_with_parent, start_new_session=True, stdin=subprocess.PIPE,
        )

    def stop(self) -> None:
        """Close its stdin (it shuts down cleanly), or kill it after 10 s."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_embedded_server() -> Optional[EmbeddedServer]:
    """Start the embedded server now, when no Prefect server is configured (None otherwise), so
    that it comes up while the caller imports and checks what it needs; hand it to
    prefect_backend, which waits for it.

    The server starts before Prefect is imported here (1.3 s of the server's 5-7 s start): it is
    stopped again at once if Prefect's settings name a server that the environment did not (a
    profile, prefect.toml, .env)."""
    if sys.platform != "linux" or os.environ.get("PREFECT_API_URL"):
        return None
    server = EmbeddedServer()
    try:
        from prefect.settings import PREFECT_API_URL

        configured = PREFECT_API_URL.value()
    except BaseException:  # settings that do not load (a damaged profile): not a reason to keep it
        server.stop()
        raise
    if configured:
        server.stop()
        return None
    return server


@contextlib.contextmanager
def prefect_backend(timeout_s: float = 60.0, started: Optional[EmbeddedServer] = None) -> Iterator[str]:
    """Use the configured Prefect server, or an embedded one for the duration (``started`` by
    start_embedded_server, or started now).

    Yields the API URL in use (or "" when Prefect's own settings decide).
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    server = started
    if server is None:
        configured = PREFECT_API_URL.value()
        if configured or sys.platform != "linux":
            yield configured or ""
            return
        server = EmbeddedServer()
    try:
        with stopping.stage("the wait for the Prefect server"):
            _wait_healthy(server.url, server.proc, timeout_s)
        # no flow-run heartbeats (Prefect 3.9 sends one every 180 s by default): nothing watches an
        # embedded server's runs, and each flow run's end waits up to 1 s for the heartbeat thread
        with temporary_settings(updates={PREFECT_API_URL: server.url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            try:
                yield server.url
            finally:
                _drain_to_server()
    finally:
        server.stop()


def _serve(app_dir: str, port: int) -> None:
    """The server process: Prefect's API app under uvicorn, deaf to SIGTERM and SIGINT, until its
    stdin ends (ptyflow's stop, or ptyflow's death)."""
    import threading

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    sys.path.insert(0, app_dir)
    import uvicorn

    class Server(uvicorn.Server):
        def capture_signals(self):  # uvicorn would stop on SIGTERM/SIGINT: the run still needs it
            return contextlib.nullcontext()

    server = Server(uvicorn.Config("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                                   port=port, log_level="error", lifespan="on"))

    def stop_at_end_of_input():
        sys.stdin.buffer.read()
        if not server.started:  # still importing or migrating: nothing served, nothing to close
            os._exit(0)
        server.should_exit = True

    threading.Thread(target=stop_at_end_of_input, daemon=True).start()
    server.run()


if __name__ == "__main__":
    try:
        _serve(sys.argv[1], int(sys.argv[2]))
    except BaseException as exc:  # noqa: BLE001 - one line: ptyflow reports the cause (or its wait names this exit)
        # e.g. Prefect settings that do not load: ptyflow, which started this server before reading
        # them, says so in its own one-line error; a screen of uvicorn's traceback here only hides it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"ptyflow's embedded Prefect server stopped: {type(exc).__name__}: {first}", file=sys.stderr, flush=True)
        os._exit(3)  # not sys.exit: the thread blocked on stdin would make the interpreter's shutdown fail
