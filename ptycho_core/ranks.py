"""The processes of one reconstruction on several devices (recon_params.devices).

Rank 0 is the process that runs the segment (stages.segment.run_segment; under Prefect the
segment task): it owns the signals, writes the checkpoints and figures. For one segment it starts
the other ranks as helper processes (``helper_ranks``); they load the same checkpoint, ignore
SIGTERM/SIGINT (rank 0's stop vote ends them at the same batch) and die with rank 0
(PR_SET_PDEATHSIG). A rank that dies ends the others with DistributedError naming it; the newest
checkpoint is left as it was. What the ranks compute together, and how a dead one is noticed while
they do, is collective.py's part.

Every rank selects its GPU (torch.cuda.set_device) before anything touches CUDA, so that none
holds a context on another rank's GPU.
"""

from __future__ import annotations

import ctypes
import os
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from .checkpoint import read_checkpoint
from .collective import COLLECTIVE_TIMEOUT, DistributedError, RankGroup
from .config import ConfigError
from .io.preprocess import read_preprocessed
from .reconstruction import Reconstruction
from .rundir import RunPaths, read_run_config

HELPER_START_TIMEOUT_S = 300.0
# NCCL's own error handling, read when a group is built: with blocking wait a failed collective
# raises in wait() on every torch from 2.4 (without it, 2.4 raises nothing there), and the watchdog
# that finds a timed-out or failed collective aborts the communicators instead of killing the
# process (2: CleanUpOnly; the default, 3, would end rank 0, the run's own process, with SIGABRT
# before it could name the rank).
NCCL_SETTINGS = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


def backend_for(devices: list[torch.device]) -> str:
    if not torch.distributed.is_available():
        raise ConfigError("recon_params.devices: this torch build has no torch.distributed; use one device")
    if devices[0].type == "cuda":
        if not torch.distributed.is_nccl_available():
            raise ConfigError("recon_params.devices: GPUs need the NCCL backend, which this torch build lacks")
        return "nccl"
    if not torch.distributed.is_gloo_available():
        raise ConfigError("recon_params.devices: CPU processes need the gloo backend, which this torch build lacks")
    return "gloo"


def process_group(backend: str, rendezvous: Path, rank: int, world: int):
    """The ranks' process group, met through a file store at ``rendezvous``. An explicit group
    object rather than torch's global default group: every segment makes its own and drops it,
    with no destroy_process_group (which, on torch 2.4, could hang after the other ranks left).
    NCCL's settings (NCCL_SETTINGS) hold for this group only: the environment is restored after."""
    store = torch.distributed.FileStore(str(rendezvous), world)
    if backend == "nccl":
        saved = {name: os.environ.get(name) for name in NCCL_SETTINGS}
        os.environ.update(NCCL_SETTINGS)
        try:
            return torch.distributed.ProcessGroupNCCL(store, rank, world, COLLECTIVE_TIMEOUT)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name)
                else:
                    os.environ[name] = value
    return torch.distributed.ProcessGroupGloo(store, rank, world, COLLECTIVE_TIMEOUT)


def _die_with_parent() -> None:
    try:
        failed = ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL) != 0  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        failed = True
    if failed:  # a killed rank 0's helpers then end only at their next collective (peer gone)
        print("ptyflow: warning: PR_SET_PDEATHSIG could not be set for this rank", file=sys.stderr)


def _threads_per_process(devices: list[torch.device], threads: Optional[int]) -> Optional[int]:
    if threads or devices[0].type != "cpu":
        return threads
    return max(1, (os.cpu_count() or 1) // len(devices))


def _helper_main(args: dict) -> None:
    """A helper rank: the same reconstruction as rank 0, on its share of each batch, for one segment.
    Reports through files in the scratch folder: ``ready.<rank>`` once loaded, ``error.<rank>``
    with the traceback when it fails."""
    rank, scratch = args["rank"], Path(args["scratch"])
    _die_with_parent()
    if os.getppid() != args["parent"]:  # rank 0 died before the line above took effect
        os._exit(4)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 owns the signals and votes to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        device = torch.device(args["device"])
        if device.type == "cuda":  # before the model, the feed and its buffers are made (see using_device)
            torch.cuda.set_device(device)
        if args["threads"]:
            torch.set_num_threads(args["threads"])
        config = read_run_config(args["run_dir"])
        prep = read_preprocessed(RunPaths(Path(args["run_dir"])).preprocessed)
        collective = RankGroup(rank, args["world"])
        rec = Reconstruction.create(config, prep, device=device, collective=collective)
        if args["checkpoint"] is not None:
            rec.resume(read_checkpoint(args["checkpoint"]))
        (scratch / f"ready.{rank}").touch()
        collective.join(process_group(args["backend"], scratch / "rendezvous", rank, args["world"]), device)
        rec.run(args["to_iteration"])
        prep.measurements.close()
    except DistributedError:
        os._exit(3)  # rank 0 went away or failed; it reports
    except BaseException:  # noqa: BLE001 - reported to rank 0, which names this rank
        try:
            (scratch / f"error.{rank}").write_text(traceback.format_exc(limit=6))
        finally:
            os._exit(2)


@dataclass(frozen=True)
class HelperRanks:
    """Rank 0's side of a segment on several processes."""

    collective: RankGroup  # what rank 0's iteration loop shares its batches through
    connect: Callable[[], None]  # wait for the helpers to load, then join them in the process group


def _start_helpers(run_dir, to_iteration: int, checkpoint: Optional[Path], devices: list[torch.device],
                   threads: Optional[int], backend: str, scratch: Path) -> list:
    """Ranks 1..N-1 as ``python -m ptycho_core.ranks`` processes rather than multiprocessing
    children, so nothing depends on how the caller's main module can be re-imported."""
    helpers = []
    for rank in range(1, len(devices)):
        args = {"rank": rank, "world": len(devices), "scratch": str(scratch), "backend": backend,
                "run_dir": str(run_dir), "to_iteration": to_iteration,
                "checkpoint": str(checkpoint) if checkpoint is not None else None,
                "device": str(devices[rank]), "threads": threads, "parent": os.getpid()}
        helpers.append(subprocess.Popen([sys.executable, "-m", "ptycho_core.ranks", json.dumps(args)]))
    return helpers


def _first_failure(helpers: list, devices: list[torch.device], scratch: Path, patience_s: float) -> Optional[str]:
    """The first helper that died, with its exit status and error; waits up to ``patience_s``
    for one to (a peer's broken connection can be seen before its exit status is)."""
    deadline = time.monotonic() + patience_s
    while True:
        for rank, process in enumerate(helpers, start=1):
            code = process.poll()
            if code:  # None: running; 0: its segment is done
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                error = scratch / f"error.{rank}"
                detail = ": " + error.read_text().strip().splitlines()[-1] if error.is_file() else ""
                return f"rank {rank} (pid {process.pid}, {devices[rank]}) {how}{detail}"
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


@contextmanager
def helper_ranks(run_dir: str | Path, to_iteration: int, checkpoint: Optional[Path], devices: list[torch.device],
                 threads: Optional[int], info: Callable[[str], None]) -> Iterator[HelperRanks]:
    """Start ranks 1..N-1 for one segment (each loads the run and ``checkpoint``) and make this
    process rank 0 (on devices[0], which the caller makes this thread's: using_device); yields
    HelperRanks: rank 0's RankGroup, and ``connect()``. The helpers load while this process builds
    its own reconstruction; ``connect()`` then waits for them. On exit the process group is
    dropped and the helpers are joined: after a segment that ended well they finish their last
    batch and exit; after a failure (a dead rank, an error here) they are killed at once, since
    nothing of theirs is kept and under NCCL they would wait for the dead rank until the timeout."""
    backend = backend_for(devices)
    world = len(devices)
    threads = _threads_per_process(devices, threads)
    if threads:
        torch.set_num_threads(threads)
    scratch = Path(tempfile.mkdtemp(prefix="ptyflow-ranks-"))
    helpers = _start_helpers(run_dir, to_iteration, checkpoint, devices, threads, backend, scratch)

    def failed(patience_s: float) -> Optional[str]:
        return _first_failure(helpers, devices, scratch, patience_s)

    connected: list[bool] = []
    collective = RankGroup(0, world, failed=failed)

    def connect() -> None:
        started = time.monotonic()
        while not all((scratch / f"ready.{rank}").exists() for rank in range(1, world)):
            # a helper that fails while loading is reported here, not as a hang
            if any(process.poll() is not None for process in helpers):
                raise DistributedError(failed(5.0) or "a rank exited while loading")
            if time.monotonic() - started > HELPER_START_TIMEOUT_S:
                raise DistributedError(f"the other ranks did not start in {HELPER_START_TIMEOUT_S:g} s")
            time.sleep(0.02)
        connected.append(True)
        collective.join(process_group(backend, scratch / "rendezvous", 0, world), devices[0])
        info(f"devices: {world} processes ({', '.join(str(d) for d in devices)}), {backend}"
             + (f", {threads} threads each" if threads else ""))

    ended_well = False
    try:
        yield HelperRanks(collective, connect)
        ended_well = True
    finally:
        # an explicit group, not torch's global one: nothing to destroy, it is dropped. After a
        # failure that happens aside: a collective still waiting on a silent peer (a hung rank; a
        # gloo connection some other process holds open) blocks the group's destructor until the
        # timeout, and the failure is to be reported now
        dropped = [collective.group]
        collective.group = None
        if ended_well:
            dropped.clear()
        else:
            threading.Thread(target=dropped.clear, daemon=True, name="ptyflow-drop-group").start()
        for process in helpers:
            try:
                process.wait(timeout=30 if connected and ended_well else 0.01)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()


if __name__ == "__main__":
    _helper_main(json.loads(sys.argv[1]))
