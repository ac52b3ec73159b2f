"""Running the segments of a multi-process run in a child process (rank 0) that the tests can watch
and kill around, with tests/rank_probe in its processes (no physics here)."""

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

PROBE = Path(__file__).parent / "rank_probe"

# rank 0: the given segments in turn, a line per finished iteration on stdout; a DistributedError
# is printed on stderr and ends it with 5 (what `ptyflow run` returns for one)
DRIVER = """
import sys
from ptycho_core import collective  # (the ranks module by its dotted name would match serverkit.rank_processes)
from ptycho_core.stages.segment import run_segment


def say(state, row):
    print(f"iteration {state.iteration}", flush=True)


try:
    for end in sys.argv[2:]:
        run_segment(sys.argv[1], int(end), on_iteration=say)
except collective.DistributedError as exc:
    print(f"DistributedError: {exc}", file=sys.stderr, flush=True)
    sys.exit(5)
"""


def probe_env(**settings) -> dict:
    """This environment with tests/rank_probe on PYTHONPATH and the probe's settings
    (PTYFLOW_PROBE_DIR, PTYFLOW_PROBE_HOLD)."""
    path = os.pathsep.join(p for p in (str(PROBE), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **{k: str(v) for k, v in settings.items()}}


class Segments:
    """The driver running ``ends`` of the run in ``run_dir``; its stdout lines arrive in a queue,
    its stderr in ``stderr``. A context manager: a driver still running at exit is killed."""

    def __init__(self, run_dir: Path, ends: list[int], env: dict):
        self.process = subprocess.Popen([sys.executable, "-c", DRIVER, str(run_dir), *map(str, ends)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, keep), daemon=True)
                        for stream, keep in ((self.process.stdout, self.lines.put),
                                             (self.process.stderr, self.errors.append))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream, keep):
        for line in stream:
            keep(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.errors)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def wait_for(self, line: str, timeout_s: float = 180.0) -> None:
        """Until the driver printed ``line``; fails if it ends first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.lines.get(timeout=0.1) == line:
                    return
            except queue.Empty:
                if self.process.poll() is not None:
                    raise AssertionError(f"the run ended before '{line}': {self.stderr}") from None
        raise AssertionError(f"no '{line}' within {timeout_s:g} s")

    def end(self, timeout_s: float) -> int:
        """The driver's exit status; a driver still running after ``timeout_s`` fails the test."""
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not end within {timeout_s:g} s") from None
        for reader in self.readers:
            reader.join()
        return self.process.returncode


def probe_reports(folder: Path) -> dict[int, dict]:
    """What tests/rank_probe wrote at exit, by pid."""
    return {int(p.stem): json.loads(p.read_text()) for p in folder.glob("*.json")}
