"""One reconstruction on several processes (recon_params.devices), through torch.distributed.

Data parallel, with the optimizer's steps unchanged: every optimizer batch is split across the
processes (ranks) by pattern, rank r computing the patterns i with i % world == r, and holding
only those in memory. Each rank scores its part against the whole batch (losses.BatchStats,
summed across ranks first), so the parts' gradients add up to the whole batch's gradient; one
all-reduce per batch sums them, together with the loss terms and a stop vote. Every rank then
takes the same optimizer step on the same tensors and applies the same constraints: the result is
a single process's on the same batches, to float rounding. Rank 0's tensors are broadcast after
each iteration all the same (Collective.share_model): on GPUs equal inputs need not round equally.

Rank 0 is the process that runs the segment (``rundir.run_segment``, under Prefect the segment
task): it owns the signals, writes the checkpoints and figures. It starts the other ranks as
spawned helper processes for one segment (``helper_ranks``); they load the same checkpoint,
ignore SIGTERM/SIGINT (rank 0's stop vote ends them at the same batch) and die with rank 0
(PR_SET_PDEATHSIG). A rank that dies ends the others with DistributedError naming it; the
newest checkpoint is left as it was. Backends: gloo on CPUs, NCCL on GPUs.

A dead rank is noticed by rank 0 watching its helpers' processes while it waits for a collective,
not by the backend: a gloo peer's death closes its connections, which raises at once, but an NCCL
collective whose peer died raises nothing and spins on the GPU until the process-group timeout
(COLLECTIVE_TIMEOUT, which remains for a rank that hangs without dying). Every rank selects its
GPU (torch.cuda.set_device) before anything touches CUDA, so that none holds a context on
another rank's GPU.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

import numpy as np
import torch

from .config import ConfigError
from .losses import BatchStats

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank that hangs (not dies) ends the run after this
HELPER_START_TIMEOUT_S = 300.0
WATCH_INTERVAL_S = 0.002  # the longest pause between two looks at a collective and the helpers
# NCCL's own error handling, read when a group is built: with blocking wait a failed collective
# raises in wait() on every torch from 2.4 (without it, 2.4 raises nothing there), and the watchdog
# that finds a timed-out or failed collective aborts the communicators instead of killing the
# process (2: CleanUpOnly; the default, 3, would end rank 0, the run's own process, with SIGABRT
# before it could name the rank).
NCCL_SETTINGS = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


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


def using_device(device: torch.device):
    """A context in which ``device`` is this thread's CUDA device (nothing on the CPU), for a
    segment's process (rank 0, or the only one), entered before anything touches CUDA. A thread
    starts on GPU 0: a CUDA call made there by a process meant for GPU 1 (a stream switch, a
    check of the current stream) creates a context on GPU 0, some hundreds of MB of another
    process's memory. (torch.cuda.device leaves without creating one on the device it restores.)"""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


# --------------------------------------------------------------------------- the engine's side
@dataclass
class Collective:
    """What the engine needs to split batches across ranks and sum what they computed."""

    rank: int
    world: int
    vote: bool = False  # this rank's wish to stop after the current batch (rank 0: a signal came)
    stop: bool = False  # what the ranks agreed after the last batch
    # which rank died, if one did, waiting up to the given seconds for one to (rank 0 watches its helpers)
    failed: Callable[[float], Optional[str]] = field(default=lambda patience_s: None)
    connect: Callable[[], None] = field(default=lambda: None)  # rank 0: wait for the others, then join them
    pattern_sums: Optional[torch.Tensor] = None  # (N,) float64: every pattern's counts (start())
    group: object = None  # the torch.distributed ProcessGroup of the ranks (process_group())

    def owned(self, n_patterns: int) -> np.ndarray:
        """The pattern indices this rank holds and computes (sorted)."""
        return np.arange(self.rank, n_patterns, self.world)

    def own(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's part of a batch."""
        return indices[indices % self.world == self.rank]

    def join(self, group, device: torch.device) -> None:
        """Take ``group`` (process_group()) and meet the other ranks in it once, so that NCCL sets
        up its communicators now, while every rank is here, rather than at the first batch."""
        self.group = group
        self._all_reduce(torch.zeros(1, device=device))

    def _run(self, launch: Callable[[], object]) -> None:
        """Run a collective (``launch`` starts it and returns its Work) to its end, watching the
        other ranks: a rank that died (rank 0 polls its helpers' processes) or a collective that
        failed or outlasted COLLECTIVE_TIMEOUT raises DistributedError naming what it knows.
        Waiting for the end (not merely queueing after it, as NCCL's wait() does) costs little:
        the engine reads every batch's sums and stop vote on the host anyway."""
        try:
            work = launch()
        except (RuntimeError, torch.distributed.DistBackendError) as exc:
            self._fail(exc)
        deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
        pause_s = 5e-5
        while not work.is_completed():
            dead = self.failed(0.0)
            if dead or time.monotonic() > deadline:
                self._abandon()
                raise DistributedError(dead or f"the other ranks did not answer within {COLLECTIVE_TIMEOUT}")
            time.sleep(pause_s)
            pause_s = min(2 * pause_s, WATCH_INTERVAL_S)
        try:
            work.wait()  # raises the backend's error, if the collective failed
        except (RuntimeError, torch.distributed.DistBackendError) as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> NoReturn:
        """A collective failed: the rank that died (a peer's death is what usually breaks one)."""
        self._abandon()
        raise DistributedError(self.failed(5.0) or f"another rank failed ({str(exc).splitlines()[0]})") from None

    def _abandon(self) -> None:
        """Abort the group's communicators after a failure: an NCCL collective whose peer is gone
        would keep a GPU busy until this process exits. (A group without abort() in some torch
        version is aborted when dropped, which helper_ranks does next.)"""
        abort = getattr(self.group, "abort", None)
        if abort is None:
            return
        try:
            abort()
        except RuntimeError:
            pass  # the failure being reported is what matters

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self._run(lambda: self.group.allreduce([tensor]))
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
            self._run(lambda: self.group.broadcast(tensor.data, 0))


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

        device = torch.device(args["device"])
        if device.type == "cuda":  # before the model, the feed and its buffers are made (see using_device)
            torch.cuda.set_device(device)
        if args["threads"]:
            torch.set_num_threads(args["threads"])
        config = read_run_config(args["run_dir"])
        prep = read_preprocessed(RunPaths(Path(args["run_dir"])).preprocessed)
        collective = Collective(rank, args["world"])
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


@contextmanager
def helper_ranks(run_dir: str | Path, to_iteration: int, checkpoint: Optional[Path], devices: list[torch.device],
                 threads: Optional[int], info: Callable[[str], None]) -> Iterator[Collective]:
    """Start ranks 1..N-1 for one segment (each loads the run and ``checkpoint``) and make this
    process rank 0 (on devices[0], which the caller makes this thread's: using_device); yields
    rank 0's Collective. The helpers load while this process builds its own reconstruction;
    ``connect()`` then waits for them. On exit the process group is dropped and the helpers are
    joined: after a segment that ended well they finish their last batch and exit; after a
    failure (a dead rank, an error here) they are killed at once, since nothing of theirs is
    kept and under NCCL they would wait for the dead rank until the timeout.

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

    def failed(patience_s: float) -> Optional[str]:
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

    connected: list[bool] = []

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

    collective = Collective(0, world, failed=failed, connect=connect)
    ended_well = False
    try:
        yield collective
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
    import json

    _helper_main(json.loads(sys.argv[1]))
