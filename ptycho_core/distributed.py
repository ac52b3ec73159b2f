"""One reconstruction on several processes (recon_params.devices), through torch.distributed.

Data parallel, with the optimizer's steps unchanged: every optimizer batch is split across the
processes (ranks) by pattern, rank r computing the patterns i with i % world == r, and holding
only those in memory. Each rank scores its part against the whole batch (losses.BatchStats,
summed across ranks first), so the parts' gradients add up to the whole batch's gradient; one
all-reduce per batch sums them, together with the loss terms and a stop vote. Every rank then
takes the same optimizer step on the same tensors, and the constraints, being deterministic,
keep them equal: the result is a single process's on the same batches, to float rounding.

Rank 0 is the process that runs the segment (``rundir.run_segment``, under Prefect the segment
task): it owns the signals, writes the checkpoints and figures. It starts the other ranks as
spawned helper processes for one segment (``helper_ranks``); they load the same checkpoint,
ignore SIGTERM/SIGINT (rank 0's stop vote ends them at the same batch) and die with rank 0
(PR_SET_PDEATHSIG). A rank that dies ends the others with DistributedError naming it; the
newest checkpoint is left as it was. Backends: gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .config import ConfigError
from .losses import BatchStats

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank that hangs (not dies) ends the run after this
HELPER_START_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A rank of a multi-process reconstruction failed; the message names it."""


# --------------------------------------------------------------------------- which devices
def device_list(recon) -> list[torch.device]:
    """The torch devices of ``recon`` (ReconParams).devices, one per process, checked against
    this machine. None or 1: one process on recon.device. ``N``: GPUs 0..N-1. ``[i, j, ...]``:
    those GPUs. ``"cpu:N"``: N processes on the CPU."""
    from .reconstruction import resolve_device

    devices = recon.devices
    if devices is None or devices == 1:
        return [resolve_device(recon.device)]
    if isinstance(devices, str):
        return [torch.device("cpu")] * recon.process_count
    ids = list(range(devices)) if isinstance(devices, int) else list(devices)
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not available:
        raise ConfigError(f"recon_params.devices: {devices} names GPUs but torch sees none on this machine; "
                          f"use 'cpu:{len(ids)}' for {len(ids)} CPU processes")
    missing = [i for i in ids if i >= available]
    if missing:
        raise ConfigError(f"recon_params.devices: GPU {missing[0]} does not exist; this machine has {available} "
                          f"(0 to {available - 1})")
    return [torch.device("cuda", i) for i in ids]


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


def process_group(backend: str, rendezvous: Path, rank: int, world: int, device: torch.device):
    """The ranks' process group, met through a file store at ``rendezvous``. An explicit group
    object rather than torch's global default group: every segment makes its own and drops it,
    with no destroy_process_group (which, on torch 2.4, could hang after the other ranks left)."""
    store = torch.distributed.FileStore(str(rendezvous), world)
    if backend == "nccl":
        torch.cuda.set_device(device)
        return torch.distributed.ProcessGroupNCCL(store, rank, world)
    return torch.distributed.ProcessGroupGloo(store, rank, world, COLLECTIVE_TIMEOUT)


# --------------------------------------------------------------------------- the engine's side
@dataclass
class Collective:
    """What the engine needs to split batches across ranks and sum what they computed."""

    rank: int
    world: int
    vote: bool = False  # this rank's wish to stop after the current batch (rank 0: a signal came)
    stop: bool = False  # what the ranks agreed after the last batch
    failed: Callable[[], Optional[str]] = field(default=lambda: None)  # which rank died, if one did
    connect: Callable[[], None] = field(default=lambda: None)  # rank 0: wait for the others, then join them
    pattern_sums: Optional[torch.Tensor] = None  # (N,) float64: every pattern's counts (start())
    group: object = None  # the torch.distributed ProcessGroup of the ranks (process_group())

    def owned(self, n_patterns: int) -> np.ndarray:
        """The pattern indices this rank holds and computes (sorted)."""
        return np.arange(self.rank, n_patterns, self.world)

    def own(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's part of a batch."""
        return indices[indices % self.world == self.rank]

    def _guarded(self, collective_call: Callable[[], object]) -> None:
        """Run a collective; a peer that died turns its error into one naming the rank."""
        try:
            collective_call()
        except (RuntimeError, torch.distributed.DistBackendError) as exc:
            raise DistributedError(self.failed() or f"another rank failed ({str(exc).splitlines()[0]})") from None

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._guarded(lambda: self.group.allreduce([tensor]).wait())
        return tensor

    def start(self, feed, n_patterns: int, chunk: int = 256) -> None:
        """Once per run, before the first batch: every pattern's total counts, gathered from the
        ranks that hold them, so that a batch's mean intensity needs no collective."""
        if self.pattern_sums is not None:
            return
        sums = torch.zeros(n_patterns, dtype=torch.float64, device=feed.device)
        owned = torch.from_numpy(self.owned(n_patterns))
        for part in owned.split(chunk):
            sums[part.to(feed.device)] = feed.batch(part).sum(dim=(1, 2)).to(torch.float64)
        self.pattern_sums = self._all_reduce(sums)

    def batch_stats(self, meas: torch.Tensor, batch: torch.Tensor, pattern_needed: bool) -> BatchStats:
        """The whole ``batch``'s BatchStats from this rank's patterns ``meas`` (b, ky, kx); the
        mean pattern (one all-reduce) only when ``pattern_needed`` (the pacbed term)."""
        pixels = meas.shape[1] * meas.shape[2]
        mean = (self.pattern_sums[batch.to(self.pattern_sums.device)].sum() / (len(batch) * pixels)).to(meas.dtype)
        pattern = self._all_reduce(meas.sum(dim=0)) / len(batch) if pattern_needed else None
        return BatchStats(size=len(batch), meas_mean=mean, meas_pattern=pattern)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor)

    def reduce_step(self, model: torch.nn.Module, parts: dict, keys: list[str]) -> dict:
        """Sum the gradients, the loss terms ``keys`` (and 'total') and the stop votes of all ranks,
        in one all-reduce. A tensor that got no gradient on any rank keeps none (the optimizer then
        skips it, as a single process would)."""
        params = [p for p in model.parameters() if p.requires_grad]
        dtype = params[0].dtype if params else torch.float64
        device = params[0].device if params else torch.device("cpu")
        names = [*keys, "total"]
        values = [parts[k].to(device, dtype).reshape(1) if k in parts else torch.zeros(1, dtype=dtype, device=device)
                  for k in names]
        flat = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=device)
                for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=device)
        vote = torch.tensor([float(self.vote)], dtype=dtype, device=device)
        buffer = self._all_reduce(torch.cat([*flat, has, *values, vote]))
        start = 0
        for p in params:
            piece = buffer[start:start + p.numel()]
            start += p.numel()
            p.grad = piece.view_as(p).clone()
        for p, got in zip(params, buffer[start:start + len(params)].tolist()):
            if not got:
                p.grad = None
        start += len(params)
        summed = {k: buffer[start + i] for i, k in enumerate(names)}
        self.stop = bool(buffer[-1] > 0)
        return summed

    def share_model(self, model: torch.nn.Module) -> None:
        """Rank 0's tensors and windows to every rank, once per iteration after the constraints:
        the ranks compute the same things, but on a GPU some kernels (atomic adds) round
        differently from run to run, and equal tensors must not drift apart."""
        for tensor in [*model.parameters(), model.crop_pos]:
            self._guarded(lambda: self.group.broadcast(tensor.data, 0).wait())


# --------------------------------------------------------------------------- the processes
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
        from .checkpoint import read_checkpoint
        from .io.preprocess import read_preprocessed
        from .reconstruction import Reconstruction
        from .rundir import RunPaths, read_run_config

        if args["threads"]:
            torch.set_num_threads(args["threads"])
        config = read_run_config(args["run_dir"])
        prep = read_preprocessed(RunPaths(Path(args["run_dir"])).preprocessed)
        collective = Collective(rank, args["world"])
        rec = Reconstruction.create(config, prep, device=torch.device(args["device"]), collective=collective)
        if args["checkpoint"] is not None:
            rec.resume(read_checkpoint(args["checkpoint"]))
        (scratch / f"ready.{rank}").touch()
        collective.group = process_group(args["backend"], scratch / "rendezvous", rank, args["world"],
                                         torch.device(args["device"]))
        rec.run(args["to_iteration"])
        prep.measurements.close()
    except DistributedError:
        os._exit(3)  # rank 0 went away or failed; it reports
    except BaseException:  # noqa: BLE001 - reported to rank 0, which names this rank
        try:
            (scratch / f"error.{rank}").write_text(traceback.format_exc(limit=6))
        finally:
            os._exit(2)


@contextmanager
def helper_ranks(run_dir: str | Path, to_iteration: int, checkpoint: Optional[Path], devices: list[torch.device],
                 threads: Optional[int], info: Callable[[str], None]) -> Iterator[Collective]:
    """Start ranks 1..N-1 for one segment (each loads the run and ``checkpoint``) and make this
    process rank 0; yields rank 0's Collective. The helpers load while this process builds its
    own reconstruction; ``connect()`` then waits for them. On exit the process group is closed and
    the helpers are joined (killed if they linger, or at once if they never connected).

    Helpers are ``python -m ptycho_core.distributed`` processes rather than multiprocessing
    children, so nothing depends on how the caller's main module can be re-imported."""
    import json
    import subprocess

    backend = backend_for(devices)
    world = len(devices)
    threads = _threads_per_process(devices, threads)
    if threads:
        torch.set_num_threads(threads)
    scratch = Path(tempfile.mkdtemp(prefix="ptyflow-ranks-"))
    helpers: list[subprocess.Popen] = []
    for rank in range(1, world):
        args = {"rank": rank, "world": world, "scratch": str(scratch), "backend": backend, "run_dir": str(run_dir),
                "to_iteration": to_iteration, "checkpoint": str(checkpoint) if checkpoint is not None else None,
                "device": str(devices[rank]), "threads": threads, "parent": os.getpid()}
        helpers.append(subprocess.Popen([sys.executable, "-m", "ptycho_core.distributed", json.dumps(args)]))

    def failed() -> Optional[str]:
        """The first helper that died, with its exit status and error (waits briefly for one)."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            for rank, process in enumerate(helpers, start=1):
                code = process.poll()
                if code is not None and code != 0:
                    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                    error = scratch / f"error.{rank}"
                    detail = ": " + error.read_text().strip().splitlines()[-1] if error.is_file() else ""
                    return f"rank {rank} (pid {process.pid}, {devices[rank]}) {how}{detail}"
            time.sleep(0.05)
        return None

    connected: list[bool] = []

    def connect() -> None:
        started = time.monotonic()
        while not all((scratch / f"ready.{rank}").exists() for rank in range(1, world)):
            # a helper that fails while loading is reported here, not as a hang
            if any(process.poll() is not None for process in helpers):
                raise DistributedError(failed() or "a rank exited while loading")
            if time.monotonic() - started > HELPER_START_TIMEOUT_S:
                raise DistributedError(f"the other ranks did not start in {HELPER_START_TIMEOUT_S:g} s")
            time.sleep(0.02)
        collective.group = process_group(backend, scratch / "rendezvous", 0, world, devices[0])
        connected.append(True)
        info(f"devices: {world} processes ({', '.join(str(d) for d in devices)}), {backend}"
             + (f", {threads} threads each" if threads else ""))

    collective = Collective(0, world, failed=failed, connect=connect)
    try:
        yield collective
    finally:
        collective.group = None  # an explicit group, not torch's global one: nothing to destroy
        for process in helpers:
            try:
                process.wait(timeout=30 if connected else 0.01)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()


if __name__ == "__main__":
    import json

    _helper_main(json.loads(sys.argv[1]))
