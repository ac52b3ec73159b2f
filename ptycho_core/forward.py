"""The forward model as pure functions: patches, sub-pixel shift, multislice, intensity, blur.

Shapes: B = batch of positions, P = probe modes, O = object modes, Z = slices,
(ny, nx) = probe window = detector size, (Ny, Nx) = object canvas.
"""

from __future__ import annotations

import math

import torch


def patch_indices(crop_pos: torch.Tensor, window: tuple[int, int], canvas_nx: int) -> torch.Tensor:
    """Flat canvas indices (B, ny, nx) of the windows whose top-left corners are crop_pos (B, 2)."""
    ny, nx = window
    rows = crop_pos[:, 0, None] + torch.arange(ny, device=crop_pos.device)  # (B, ny)
    cols = crop_pos[:, 1, None] + torch.arange(nx, device=crop_pos.device)  # (B, nx)
    return rows[:, :, None] * canvas_nx + cols[:, None, :]


def crop_patches(canvas: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """Gather windows from a canvas (..., Ny, Nx) at flat_idx (B, ny, nx) -> (B, ..., ny, nx)."""
    flat = canvas.reshape(*canvas.shape[:-2], -1)
    patches = flat[..., flat_idx]  # (..., B, ny, nx)
    return patches.movedim(-3, 0)


def fourier_shift(field: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Shift complex fields (P, ny, nx) by shifts_px (B, 2) (y, x) pixels -> (B, P, ny, nx)."""
    ny, nx = field.shape[-2:]
    real_dtype = shifts_px.dtype
    ky = torch.fft.fftfreq(ny, device=field.device, dtype=real_dtype)
    kx = torch.fft.fftfreq(nx, device=field.device, dtype=real_dtype)
    phase = -2 * math.pi * (shifts_px[:, 0, None, None] * ky[:, None] + shifts_px[:, 1, None, None] * kx[None, :])
    ramp = torch.polar(torch.ones_like(phase), phase)  # (B, ny, nx)
    return torch.fft.ifft2(torch.fft.fft2(field)[None] * ramp[:, None])


def transmission(obja: torch.Tensor, objp: torch.Tensor) -> torch.Tensor:
    """Complex transmission amplitude * exp(i phase); same shape as the inputs."""
    return torch.polar(obja, objp)


def multislice_exit_waves(probes: torch.Tensor, trans: torch.Tensor, propagator: torch.Tensor | None) -> torch.Tensor:
    """Exit waves after transmitting through Z slices.

    probes: (B, P, ny, nx); trans: (B, O, Z, ny, nx); propagator: (T, ny, nx) with T 1 or B,
    needed when Z > 1. Returns (B, P, O, ny, nx).
    """
    psi = probes[:, :, None]  # (B, P, 1, ny, nx)
    # unbind, not trans[:, :, z]: each indexed slice would cost a zero-filled full-size gradient
    layers = trans.unbind(dim=2)
    if len(layers) > 1:
        prop = propagator[:, None, None]  # (T, 1, 1, ny, nx)
    for z, layer in enumerate(layers):
        psi = psi * layer[:, None]
        if z < len(layers) - 1:
            psi = torch.fft.ifft2(torch.fft.fft2(psi) * prop)
    return psi


def farfield_intensity(exit_waves: torch.Tensor, occupancies: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """Diffraction intensity (B, ky, kx) summed over probe and object modes.

    exit_waves: (B, P, O, ny, nx); occupancies: (O,) weights of the object modes. The orthonormal
    FFT keeps sum(|psi|^2) equal to the summed pattern (Parseval), so the probe carries the counts.
    centered: DC at the centre (as measured); False keeps FFT order, which saves two shifts per
    batch when the measurements are stored in FFT order too.
    """
    far = torch.view_as_real(torch.fft.fft2(exit_waves, norm="ortho"))
    amp2 = far.square().sum(dim=-1)  # re^2 + im^2: cheaper than |.|^2 and its backward
    if amp2.shape[2] == 1:
        intensity = amp2[:, :, 0].sum(dim=1) * occupancies[0]
    else:
        intensity = torch.einsum("bpoyx,o->byx", amp2, occupancies)
    return torch.fft.fftshift(intensity, dim=(-2, -1)) if centered else intensity


def gaussian_kernel_1d(std_px: float, device=None, dtype=torch.float32) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * std_px)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / std_px) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, std_px: float) -> torch.Tensor:
    """Separable Gaussian blur over the last two axes of a real tensor, reflecting at the edges."""
    if not std_px:
        return images
    kernel = gaussian_kernel_1d(std_px, images.device, images.dtype)
    radius = kernel.numel() // 2
    shape = images.shape
    x = images.reshape(-1, 1, *shape[-2:])
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
    return x.reshape(shape)
