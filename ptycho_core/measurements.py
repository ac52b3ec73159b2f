"""Where the measured patterns live while a reconstruction iterates: the memory tiers.

- device: every pattern on the model's device (on the CPU: in RAM), gathered per batch;
- host: every pattern in host RAM as float32 (pinned when the device is a GPU); a background
  thread gathers the next batch and copies it to the GPU on a side stream, one batch ahead, so
  the copy overlaps the current batch's compute;
- disk: nothing held; a background thread reads each batch from preprocessed.h5, DISK_AHEAD
  batches ahead (and on a GPU copies it like the host tier).

``recon_params.measurements: auto`` takes the fastest tier whose memory fits
``recon_params.memory_budget_gb`` (``choose_tier``). Every tier hands the loop the same values in
the same order (a float32 pattern in FFT order, then cast to the run's dtype), so the tier never
changes a result: the tests compare tensors bitwise.
"""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from .config import ConfigError
from .io.patterns import PatternStore
from .io.readers import host_available_bytes

HOST_AHEAD = 1
DISK_AHEAD = 2
IN_FLIGHT = DISK_AHEAD + 2  # batches queued, being read, and being used
DEFAULT_BUDGET_FRACTION = 0.5


def device_available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available_bytes()


@dataclass(frozen=True)
class TierChoice:
    tier: str
    reason: str  # one sentence for the run's log


def _gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.3g} GB"


def choose_tier(requested: str, n_patterns: int, window: tuple[int, int], real_dtype: torch.dtype, batch_size: int,
                device: torch.device, budget_gb: Optional[float]) -> TierChoice:
    """The tier to use, and why. Refuses (ConfigError) a budget that cannot hold even the batches
    in flight, whatever the tier, before anything starts."""
    pixels = int(np.prod(window))
    item = torch.empty((), dtype=real_dtype).element_size()
    on_device = n_patterns * pixels * item  # device tier: in the run's dtype
    on_host = n_patterns * pixels * 4  # host tier: float32
    in_flight = IN_FLIGHT * batch_size * pixels * item
    if budget_gb is not None:
        device_budget = host_budget = budget_gb * 1e9
        what = f"recon_params.memory_budget_gb {budget_gb:g} GB"
    else:
        device_budget = DEFAULT_BUDGET_FRACTION * device_available_bytes(device)
        host_budget = DEFAULT_BUDGET_FRACTION * host_available_bytes()
        what = f"the default budget (half of the free memory, {_gb(min(device_budget, host_budget))})"
    if in_flight > min(device_budget, host_budget):
        raise ConfigError(
            f"recon_params.memory_budget_gb: {what} cannot hold the {IN_FLIGHT} batches in flight "
            f"({batch_size} patterns of {window[0]}x{window[1]} each); that needs at least {_gb(in_flight)}. "
            "Raise the budget or lower recon_params.batch_size"
        )
    if requested != "auto":
        return TierChoice(requested, f"measurements: {requested} (set by recon_params.measurements)")
    if on_device <= device_budget:
        where = "GPU memory" if device.type == "cuda" else "RAM"
        return TierChoice("device", f"measurements: device ({_gb(on_device)} of patterns fit the {_gb(device_budget)} "
                                    f"budget in {where})")
    if device.type == "cuda" and on_host <= host_budget:
        return TierChoice("host", f"measurements: host ({_gb(on_host)} of patterns exceed the GPU budget "
                                  f"{_gb(device_budget)} but fit the {_gb(host_budget)} budget in RAM)")
    return TierChoice("disk", f"measurements: disk ({_gb(on_host)} of patterns exceed the {_gb(host_budget)} budget; "
                              f"each batch is read from preprocessed.h5, {DISK_AHEAD} batches ahead)")


def _fft_order(block: np.ndarray) -> np.ndarray:
    """Patterns with DC moved to [0, 0], like the model's uncentred predictions."""
    return np.fft.ifftshift(block, axes=(-2, -1))


class _Prefetcher:
    """Runs ``load`` over ``batches`` in a daemon thread, at most ``ahead`` results ahead of the
    consumer; an exception in ``load`` is raised to the consumer at that batch. ``device``: the
    feed's, made the thread's CUDA device first (a new thread starts on GPU 0, where the copy's
    stream switch would otherwise create a context in a run on another GPU)."""

    def __init__(self, load: Callable, batches: list[torch.Tensor], ahead: int, device: torch.device):
        self.batches = batches
        self.results: queue.Queue = queue.Queue(maxsize=ahead)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(load, device), daemon=True, name="ptyflow-prefetch")
        self.thread.start()

    def _run(self, load, device):
        for indices in self.batches:
            try:
                if device.type == "cuda":  # numbered: Reconstruction.create resolves every device
                    torch.cuda.set_device(device)  # a no-op after the first batch
                item = (load(indices), None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
                item = (None, exc)
            while not self.stopped.is_set():
                try:
                    self.results.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is not None or self.stopped.is_set():
                return

    def __iter__(self):
        for _ in self.batches:
            value, exc = self.results.get()
            if exc is not None:
                raise exc
            yield value

    def close(self):
        self.stopped.set()
        while self.thread.is_alive():
            try:
                self.results.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()


class MeasurementFeed:
    """The patterns of a reconstruction as batches on its device, (B, ky, kx) in FFT order."""

    tier: str
    ahead: int = 0

    def __init__(self, store: PatternStore, device: torch.device, dtype: torch.dtype,
                 owned: Optional[np.ndarray] = None):
        self.store = store
        self.device = torch.device(device)
        self.dtype = dtype
        self.n_patterns = store.n_patterns
        # the patterns this process uses (one rank of several: recon_params.devices); the memory
        # tiers hold only these, at rows[index]
        self.owned = owned
        self.rows = None
        if owned is not None:
            self.rows = torch.full((store.n_patterns,), -1, dtype=torch.long)
            self.rows[torch.from_numpy(owned)] = torch.arange(len(owned))

    def _held(self) -> tuple[int, ...]:
        """Shape of what a memory tier holds: every pattern, or this process's."""
        shape = tuple(self.store.shape)
        return shape if self.owned is None else (len(self.owned), *shape[1:])

    def _fill(self, target: torch.Tensor, chunk: int = 1024) -> None:
        """Copy the held patterns into ``target``: the whole store block by block, or this
        process's patterns ``chunk`` at a time (a rank reads only what it holds)."""
        if self.owned is None:
            for start, block in self.store.blocks():
                target[start:start + len(block)] = torch.from_numpy(_fft_order(block)).to(target.device, target.dtype)
            return
        for first in range(0, len(self.owned), chunk):
            patterns = torch.from_numpy(_fft_order(self.store.read(self.owned[first:first + chunk])))
            target[first:first + len(patterns)] = patterns.to(target.device, target.dtype)

    def _row(self, indices: torch.Tensor) -> torch.Tensor:
        return indices if self.rows is None else self.rows[indices.cpu()]

    def _load(self, indices: torch.Tensor):
        """What the prefetch thread prepares for one batch (see _ready)."""
        raise NotImplementedError

    def _ready(self, loaded) -> torch.Tensor:
        return loaded

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """The patterns of ``indices``, read now."""
        return self._ready(self._load(indices.cpu()))

    __getitem__ = batch

    @contextmanager
    def prefetch(self, batches: list[torch.Tensor]) -> Iterator[Iterator[torch.Tensor]]:
        """The batches' patterns in order, prepared ahead in a thread (tiers with ``ahead``)."""
        if not self.ahead or not batches:
            yield (self.batch(indices) for indices in batches)
            return
        fetcher = _Prefetcher(self._load, [b.cpu() for b in batches], self.ahead, self.device)
        try:
            yield (self._ready(loaded) for loaded in fetcher)
        finally:
            fetcher.close()


class DeviceFeed(MeasurementFeed):
    tier = "device"

    def __init__(self, store: PatternStore, device: torch.device, dtype: torch.dtype,
                 owned: Optional[np.ndarray] = None):
        super().__init__(store, device, dtype, owned)
        self.all = torch.empty(self._held(), dtype=dtype, device=self.device)
        self._fill(self.all)
        self.rows_on_device = None if self.rows is None else self.rows.to(self.device)

    def _load(self, indices):
        return self.batch(indices)

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Gathered where the patterns are: the engine moves an iteration's batch indices to the
        device once, so no batch makes the host wait for the GPU (a round trip through the host
        here cost one wait per batch)."""
        indices = indices.to(self.device)
        return self.all[indices if self.rows_on_device is None else self.rows_on_device[indices]]


class _CopiedFeed(MeasurementFeed):
    """A tier whose batches are prepared on the host (float32) and copied to the device: on a GPU
    from pinned memory on a side stream, so the copy overlaps the compute of the batch before."""

    def __init__(self, store: PatternStore, device: torch.device, dtype: torch.dtype,
                 owned: Optional[np.ndarray] = None):
        super().__init__(store, device, dtype, owned)
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _to_device(self, patterns: torch.Tensor):
        if not self.cuda:
            return patterns.to(self.dtype)
        pinned = patterns if patterns.is_pinned() else patterns.pin_memory()
        with torch.cuda.stream(self.copy_stream):
            on_device = pinned.to(self.device, non_blocking=True).to(self.dtype)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return on_device, done, pinned  # the pinned source lives until the copy is waited for

    def _ready(self, loaded):
        if not self.cuda:
            return loaded
        on_device, done, _ = loaded
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        on_device.record_stream(current)  # the allocator must not reuse it while the compute stream runs
        return on_device


class HostFeed(_CopiedFeed):
    tier = "host"
    ahead = HOST_AHEAD

    def __init__(self, store: PatternStore, device: torch.device, dtype: torch.dtype,
                 owned: Optional[np.ndarray] = None):
        super().__init__(store, device, dtype, owned)
        self.all = torch.empty(self._held(), dtype=torch.float32, pin_memory=self.cuda)
        self._fill(self.all)

    def _load(self, indices):
        return self._to_device(torch.index_select(self.all, 0, self._row(indices)))


class DiskFeed(_CopiedFeed):
    tier = "disk"
    ahead = DISK_AHEAD

    def _load(self, indices):
        block = _fft_order(self.store.read(indices.numpy()))
        return self._to_device(torch.from_numpy(np.ascontiguousarray(block)))


FEEDS = {"device": DeviceFeed, "host": HostFeed, "disk": DiskFeed}


def open_feed(tier: str, store: PatternStore, device: torch.device, dtype: torch.dtype,
              owned: Optional[np.ndarray] = None) -> MeasurementFeed:
    """The feed of ``tier``; ``owned``: the sorted pattern indices this process uses (of several)."""
    return FEEDS[tier](store, device, dtype, owned)

