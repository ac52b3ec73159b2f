"""Which torch devices a run uses: recon_params.device and recon_params.devices, checked
against this machine, and the CUDA device a thread works on."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from .config import ConfigError


def resolve_device(name: str | torch.device) -> torch.device:
    """recon_params.device (or a torch.device) as the device this process computes on: 'auto'
    chosen, a bare 'cuda' numbered (the one place that numbers it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"recon_params.device: '{name}' requested but torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        # a numbered device: torch.cuda.set_device (in the feed's thread, in helper ranks) refuses a bare 'cuda'
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_list(recon) -> list[torch.device]:
    """The torch devices of ``recon`` (ReconParams).devices, one per process, checked against
    this machine. None or 1: one process on recon.device. ``N``: GPUs 0..N-1. ``[i, j, ...]``:
    those GPUs. ``"cpu:N"``: N processes on the CPU."""
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


def using_device(device: torch.device):
    """A context in which ``device`` is this thread's CUDA device (nothing on the CPU), for a
    segment's process (rank 0, or the only one), entered before anything touches CUDA. A thread
    starts on GPU 0: a CUDA call made there by a process meant for GPU 1 (a stream switch, a
    check of the current stream) creates a context on GPU 0, some hundreds of MB of another
    process's memory. (torch.cuda.device leaves without creating one on the device it restores.)"""
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()

