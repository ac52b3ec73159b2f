"""How the iteration loop shares its work with the other processes of its reconstruction.

The loop (engine.run_iterations) meets every batch through one ``Collective``, whatever the number
of processes (recon_params.devices):
- ``Collective`` itself is the one-process case: it holds every pattern and sums nothing;
- ``RankGroup`` is one rank of several (torch.distributed, gloo on CPUs, NCCL on GPUs). Every
  optimizer batch is split across the ranks by pattern, rank r computing the patterns i with
  i % world == r and holding only those in memory. Each rank scores its part against the whole
  batch (losses.BatchStats, summed across ranks first), so the parts' gradients add up to the
  whole batch's gradient; one all-reduce per batch sums them, together with the loss terms and
  a stop vote. Every rank then takes the same step on the same tensors and applies the same
  constraints: the result is a single process's on the same batches, to float rounding. Rank
  0's tensors are broadcast after each iteration all the same (``share_model``): on GPUs equal
  inputs need not round equally.

Starting and watching the ranks' processes is ranks.py's job; this module only talks to a group
that exists. A dead rank is noticed while waiting for a collective (``RankGroup._run`` asks
``failed``, which rank 0 answers by polling its helpers' processes), not by the backend: a gloo
peer's death closes its connections, which raises at once, but an NCCL collective whose peer died
raises nothing and spins on the GPU until the group's timeout (COLLECTIVE_TIMEOUT, which remains
for a rank that hangs without dying).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable, NoReturn, Optional

import numpy as np
import torch

from .losses import BatchStats

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank that hangs (not dies) ends the run after this
WATCH_INTERVAL_S = 0.002  # the longest pause between two looks at a collective and the other ranks


class DistributedError(RuntimeError):
    """A rank of a multi-process reconstruction failed; the message names it."""


class Collective:
    """One process: it holds and computes every pattern; sums are its own values; it stops when
    its own caller asks. The methods are those a rank of several needs (RankGroup)."""

    rank = 0
    world = 1

    def owned(self, n_patterns: int) -> Optional[np.ndarray]:
        """The pattern indices this process holds (sorted); None: all of them."""
        return None

    def own(self, indices: torch.Tensor) -> torch.Tensor:
        """This process's part of a batch (B,) of pattern indices."""
        return indices

    def start(self, feed, n_patterns: int) -> None:
        """Once per run, before the first batch (nothing to gather here)."""

    def batch_stats(self, meas: torch.Tensor, batch: torch.Tensor, pred_sum: Optional[torch.Tensor],
                    pattern_needed: bool) -> BatchStats:
        """The whole batch's BatchStats from its patterns ``meas`` (B, ky, kx) and the sum of its
        predictions ``pred_sum`` (ky, kx; when several parts need it, the pacbed term)."""
        return BatchStats.of(meas, pred_sum)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes."""
        return tensor

    def reduce_step(self, model: torch.nn.Module, parts: dict[str, torch.Tensor], keys: list[str]
                    ) -> dict[str, torch.Tensor]:
        """The batch's gradients and loss terms (``keys`` and 'total') summed over the processes."""
        return parts

    def vote(self, stop_requested: Callable[[], bool]) -> None:
        """Before a batch: this process's wish to stop after it (a signal came). One process asks
        after the batch instead (agreed_stop), which sees a signal that came during it."""

    def agreed_stop(self, stop_requested: Callable[[], bool]) -> bool:
        """After a batch: whether the processes stop now; here, whether this one is asked to."""
        return stop_requested()

    def share_model(self, model: torch.nn.Module) -> None:
        """Make every process's tensors rank 0's (nothing to do with one)."""


class RankGroup(Collective):
    """One rank of several, in a torch.distributed process group (``join``).

    ``failed(patience_s)``: which rank died, if one did, waiting up to that long for one to (rank 0
    answers by polling its helpers' processes; a helper knows nothing and answers None)."""

    def __init__(self, rank: int, world: int, failed: Callable[[float], Optional[str]] = lambda patience_s: None):
        self.rank = rank
        self.world = world
        self.failed = failed
        self.wish = False  # this rank's vote for the current batch (vote())
        self.stop = False  # what the ranks agreed after the last batch
        self.pattern_sums: Optional[torch.Tensor] = None  # (N,) float64: every pattern's counts (start())
        self.group = None  # the torch.distributed ProcessGroup of the ranks
        self.device = torch.device("cpu")  # where the group reduces (join): NCCL reduces CUDA tensors only

    def owned(self, n_patterns: int) -> np.ndarray:
        return np.arange(self.rank, n_patterns, self.world)

    def own(self, indices: torch.Tensor) -> torch.Tensor:
        return indices[indices % self.world == self.rank]

    def join(self, group, device: torch.device) -> None:
        """Take ``group`` and meet the other ranks in it once, so that NCCL sets up its
        communicators now, while every rank is here, rather than at the first batch."""
        self.group, self.device = group, torch.device(device)
        self._all_reduce(torch.zeros(1, device=device))

    def _run(self, launch: Callable[[], object]) -> None:
        """Run a collective (``launch`` starts it and returns its Work) to its end, watching the
        other ranks: a rank that died or a collective that failed or outlasted COLLECTIVE_TIMEOUT
        raises DistributedError naming what it knows. Waiting for the end (not merely queueing
        after it, as NCCL's wait() does) costs little: the loop reads every batch's sums and stop
        vote on the host anyway."""
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
        version is aborted when dropped, which ranks.helper_ranks does next.)"""
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
        """Every pattern's total counts, gathered from the ranks that hold them, so that a batch's
        mean intensity needs no collective."""
        if self.pattern_sums is not None:
            return
        sums = torch.zeros(n_patterns, dtype=torch.float64, device=feed.device)
        owned = torch.from_numpy(self.owned(n_patterns))
        for part in owned.split(chunk):
            sums[part.to(feed.device)] = feed.batch(part).sum(dim=(1, 2)).to(torch.float64)
        self.pattern_sums = self._all_reduce(sums)

    def batch_stats(self, meas: torch.Tensor, batch: torch.Tensor, pred_sum: Optional[torch.Tensor],
                    pattern_needed: bool) -> BatchStats:
        """``meas`` is this rank's part of ``batch``; the mean pattern costs one all-reduce, so it
        is gathered only when ``pattern_needed``."""
        pixels = meas.shape[1] * meas.shape[2]
        mean = (self.pattern_sums[batch.to(self.pattern_sums.device)].sum() / (len(batch) * pixels)).to(meas.dtype)
        pattern = self._all_reduce(meas.sum(dim=0)) / len(batch) if pattern_needed else None
        return BatchStats(size=len(batch), meas_mean=mean, meas_pattern=pattern, pred_sum=pred_sum)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Summed over the ranks, on ``tensor``'s own device: a tensor elsewhere than the group's
        device (the scan measurement's host sums on GPU ranks) goes through it, and a complex one
        as pairs of reals (as torch.distributed.all_reduce sends them)."""
        here = tensor if tensor.device == self.device else tensor.to(self.device)
        self._all_reduce(torch.view_as_real(here) if here.is_complex() else here)  # in place
        return here if here is tensor else here.to(tensor.device)

    def reduce_step(self, model: torch.nn.Module, parts: dict[str, torch.Tensor], keys: list[str]
                    ) -> dict[str, torch.Tensor]:
        """Gradients, loss terms and the stop votes of all ranks in one all-reduce. A tensor that
        got no gradient on any rank keeps none (the optimizer then skips it, as one process would)."""
        params = [p for p in model.parameters() if p.requires_grad]
        dtype = params[0].dtype if params else torch.float64
        device = params[0].device if params else torch.device("cpu")
        names = [*keys, "total"]
        values = [parts[k].to(device, dtype).reshape(1) if k in parts else torch.zeros(1, dtype=dtype, device=device)
                  for k in names]
        flat = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype, device=device)
                for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=device)
        vote = torch.tensor([float(self.wish)], dtype=dtype, device=device)
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

    def vote(self, stop_requested: Callable[[], bool]) -> None:
        """The vote rides in the batch's all-reduce (reduce_step)."""
        self.wish = stop_requested()

    def agreed_stop(self, stop_requested: Callable[[], bool]) -> bool:
        """What the votes of the last batch said: the ranks stop together, at the batch after
        which any of them asked to (rank 0 is the one signals reach)."""
        return self.stop

    def share_model(self, model: torch.nn.Module) -> None:
        """Rank 0's tensors and windows to every rank, once per iteration after the constraints:
        the ranks compute the same things, but on a GPU some kernels (atomic adds) round
        differently from run to run, and equal tensors must not drift apart."""
        for tensor in [*model.parameters(), model.crop_pos]:
            self._run(lambda: self.group.broadcast(tensor.data, 0))
