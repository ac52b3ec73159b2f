"""The forward model as pure functions: patches, sub-pixel shift, multislice, intensity, blur.

Shapes: B = batch of positions, P = probe modes, O = object modes, Z = slices,
(ny, nx) = probe window = detector size, (Ny, Nx) = object canvas.
"""

from __future__ import annotations

import functools
import math

import torch


def patch_indices(crop_pos: torch.Tensor, window: tuple[int, int], canvas_shape: tuple[int, ...]) -> torch.Tensor:
    """Flat indices (B, *lead, ny, nx) into canvas.reshape(-1) of the windows whose top-left corners
    are crop_pos (B, 2), for a canvas of shape (*lead, Ny, Nx) (lead: object modes and slices)."""
    ny, nx = window
    *lead, canvas_ny, canvas_nx = canvas_shape
    device = crop_pos.device
    layer_start = torch.arange(math.prod(lead), device=device).view(*lead, 1, 1) * (canvas_ny * canvas_nx)
    offsets = (layer_start + torch.arange(ny, device=device)[:, None] * canvas_nx
               + torch.arange(nx, device=device))  # (*lead, ny, nx), small
    corner = crop_pos[:, 0] * canvas_nx + crop_pos[:, 1]  # (B,)
    return corner.view(-1, *[1] * offsets.dim()) + offsets


def crop_patches(canvas: torch.Tensor, flat_idx: torch.Tensor) -> torch.Tensor:
    """Gather windows from a canvas (*lead, Ny, Nx) at flat_idx from patch_indices -> (B, *lead, ny, nx).

    One 1D index_select: its output is already batch-major (no transposing copy, forward or
    backward) and its backward is an index_add, cheaper than the accumulating index_put that
    advanced indexing differentiates to."""
    return canvas.reshape(-1).index_select(0, flat_idx.reshape(-1)).view(flat_idx.shape)


def shift_ramps(shifts_px: torch.Tensor, window: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable Fourier phase ramps exp(-2 pi i k s) of sub-pixel shifts (B, 2) (y, x) pixels:
    (B, ny, 1) and (B, 1, nx), in FFT order."""
    ny, nx = window
    ky = torch.fft.fftfreq(ny, device=shifts_px.device, dtype=shifts_px.dtype)
    kx = torch.fft.fftfreq(nx, device=shifts_px.device, dtype=shifts_px.dtype)
    phase_y = (-2 * math.pi) * shifts_px[:, 0, None] * ky  # (B, ny)
    phase_x = (-2 * math.pi) * shifts_px[:, 1, None] * kx  # (B, nx)
    return (torch.polar(torch.ones_like(phase_y), phase_y)[:, :, None],
            torch.polar(torch.ones_like(phase_x), phase_x)[:, None, :])


def fourier_shift(field: torch.Tensor, shifts_px: torch.Tensor) -> torch.Tensor:
    """Shift complex fields (P, ny, nx) by shifts_px (B, 2) (y, x) pixels -> (B, P, ny, nx)."""
    ramp_y, ramp_x = shift_ramps(shifts_px, field.shape[-2:])
    # the ramp is an outer product: two 1D polars instead of one full-size polar per pattern
    ramp = ramp_y * ramp_x  # (B, ny, nx)
    return torch.fft.ifft2(torch.fft.fft2(field)[None] * ramp[:, None])


class _Transmission(torch.autograd.Function):
    """amplitude * exp(i phase) with a backward of one complex and one real multiply.

    torch.polar's own backward goes through sgn(result), a division per element. With
    w = grad * exp(-i phase): d/d amplitude = Re(w), d/d phase = amplitude * Im(w).
    """

    @staticmethod
    def forward(ctx, amplitude, phase):
        unit = torch.polar(torch.ones_like(phase), phase)
        ctx.save_for_backward(amplitude, unit)
        return unit * amplitude

    @staticmethod
    def backward(ctx, grad):
        amplitude, unit = ctx.saved_tensors
        w = grad * unit.conj()
        grad_amplitude = w.real.contiguous() if ctx.needs_input_grad[0] else None
        grad_phase = w.imag * amplitude if ctx.needs_input_grad[1] else None
        return grad_amplitude, grad_phase


def transmission(obja: torch.Tensor, objp: torch.Tensor) -> torch.Tensor:
    """Complex transmission amplitude * exp(i phase); same shape as the inputs."""
    return _Transmission.apply(obja, objp)


def multislice_exit_waves(probes: torch.Tensor, trans: torch.Tensor, propagator: torch.Tensor | None) -> torch.Tensor:
    """Exit waves after transmitting through Z slices.

    probes: (B, P, ny, nx); trans: (B, O, Z, ny, nx); propagator: (T, ny, nx) with T 1 or B,
    needed when Z > 1. Returns (B, P, O, ny, nx).
    """
    psi = probes[:, :, None]  # (B, P, 1, ny, nx)
    # unbind, not trans[:, :, z]: each indexed slice would cost a zero-filled full-size gradient;
    # one slice is a view (unbind's backward would stack a copy)
    layers = [trans.squeeze(2)] if trans.shape[2] == 1 else trans.unbind(dim=2)
    if len(layers) > 1:
        prop = propagator[:, None, None]  # (T, 1, 1, ny, nx)
    for z, layer in enumerate(layers):
        psi = psi * layer[:, None]
        if z < len(layers) - 1:
            psi = torch.fft.ifft2(torch.fft.fft2(psi) * prop)
    return psi


class _FarFieldIntensity(torch.autograd.Function):
    """sum over modes of occupancy * |FFT(exit wave)|^2, differentiated by hand.

    Autograd of the same expression spends more time in view_as_real, square and a sum over a
    size-2 axis than in the FFT. The adjoint of the orthonormal FFT is its inverse, so
    d/d psi = ifft2(2 * weight * grad * F).
    """

    @staticmethod
    def forward(ctx, exit_waves, occupancies):
        far = torch.fft.fft2(exit_waves, norm="ortho")  # (B, P, O, ny, nx)
        amp2 = far.real.square() + far.imag.square()
        if amp2.shape[2] == 1:
            intensity = amp2[:, :, 0].sum(dim=1) * occupancies[0]
        else:
            intensity = torch.einsum("bpoyx,o->byx", amp2, occupancies)
        ctx.save_for_backward(far, occupancies)
        return intensity

    @staticmethod
    def backward(ctx, grad):
        far, occupancies = ctx.saved_tensors
        scale = 2 * grad[:, None, None] * occupancies[:, None, None]  # (B, 1, O, ny, nx)
        return torch.fft.ifft2(far * scale, norm="ortho"), None


def farfield_intensity(exit_waves: torch.Tensor, occupancies: torch.Tensor, centered: bool = True) -> torch.Tensor:
    """Diffraction intensity (B, ky, kx) summed over probe and object modes.

    exit_waves: (B, P, O, ny, nx); occupancies: (O,) weights of the object modes. The orthonormal
    FFT keeps sum(|psi|^2) equal to the summed pattern (Parseval), so the probe carries the counts.
    centered: DC at the centre (as measured); False keeps FFT order, which saves two shifts per
    batch when the measurements are stored in FFT order too.
    """
    intensity = _FarFieldIntensity.apply(exit_waves, occupancies)
    return torch.fft.fftshift(intensity, dim=(-2, -1)) if centered else intensity


def gaussian_kernel_1d(std_px: float, device=None, dtype=torch.float32) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * std_px)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    kernel = torch.exp(-0.5 * (x / std_px) ** 2)
    return kernel / kernel.sum()


# Up to this side a blur is two dense products with an (n, n) matrix, which BLAS does faster than
# single-channel convolutions (forward and backward, 1 CPU thread: 32 patterns of 64² 0.9 against
# 11.5 ms, which had made model_params.detector_blur_std cost 1.28x per iteration; a 4-slice
# 256² canvas 6.4 against 35 ms; one 1024² image at 2.5 px 96 against 351 ms). Above it the
# matrix's n³ work and n² memory grow past the convolution's n² times the kernel's length.
DENSE_BLUR_MAX_PX = 1024


def gaussian_blur(images: torch.Tensor, std_px: float, fft_order: bool = False) -> torch.Tensor:
    """Gaussian blur (std in px) over the last two axes of a real tensor, mirrored at the edges
    (the edge sample is not repeated, as scipy's 'mirror' and torch's 'reflect' padding).

    fft_order: the images are diffraction patterns in FFT order (DC at [0, 0]); the blur is the
    one of the centred patterns, edges included, and the result stays in FFT order."""
    if not std_px:
        return images
    h, w = images.shape[-2:]
    if max(h, w) <= DENSE_BLUR_MAX_PX:
        rows = blur_matrix(h, std_px, images.device, images.dtype, fft_order)
        cols = blur_matrix(w, std_px, images.device, images.dtype, fft_order)
        return rows @ images @ cols.T
    if fft_order:
        centred = torch.fft.fftshift(images, dim=(-2, -1))
        return torch.fft.ifftshift(gaussian_blur(centred, std_px), dim=(-2, -1))
    kernel = gaussian_kernel_1d(std_px, images.device, images.dtype)
    radius = kernel.numel() // 2
    shape = images.shape
    x = images.reshape(-1, 1, *shape[-2:])
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
    return x.reshape(shape)


@functools.lru_cache(maxsize=16)
def blur_matrix(n: int, std_px: float, device: torch.device, dtype: torch.dtype, fft_order: bool = False
                ) -> torch.Tensor:
    """(n, n) the 1D Gaussian blur of ``gaussian_blur`` as a matrix acting on a column: row i holds
    the kernel's weights at the mirrored source samples. With fft_order, the same blur of centred
    data conjugated into FFT order (S^-1 M S, S the fftshift permutation). Cached: read only."""
    kernel = gaussian_kernel_1d(std_px, device, torch.float64)
    radius = kernel.numel() // 2
    source = torch.arange(n, device=device)[:, None] + torch.arange(-radius, radius + 1, device=device)[None, :]
    if n == 1:
        source = torch.zeros_like(source)
    while bool(((source < 0) | (source > n - 1)).any()):  # mirror until inside (a kernel wider than n)
        source = source.abs()
        source = torch.where(source > n - 1, 2 * (n - 1) - source, source)
    rows = torch.arange(n, device=device)[:, None].expand_as(source)
    matrix = torch.zeros(n, n, dtype=torch.float64, device=device)
    matrix.index_put_((rows.reshape(-1), source.reshape(-1)), kernel.expand_as(source).reshape(-1), accumulate=True)
    if fft_order:
        shift = torch.fft.fftshift(torch.arange(n, device=device))  # centred[i] = fft_order[shift[i]]
        unshift = torch.argsort(shift)
        matrix = matrix[unshift][:, unshift]
    return matrix.to(dtype)
