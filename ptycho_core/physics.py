"""Electron optics: wavelength, sampling, aberration phase, Fresnel propagator, probe.

Conventions used throughout ptyflow
- Arrays are (..., y, x); spatial frequencies come from ``torch.fft.fftfreq`` (unshifted).
- A probe is ``IFFT[A(k) exp(-i chi(k))]``; ``chi = 2pi/lambda * sum C_nm a^(n+1)/(n+1) cos(m(phi-phi_nm))``
  (Krivanek notation) with C10 = -defocus, so positive defocus focuses below the entrance surface.
- Propagating by dz multiplies by ``exp(-i pi lambda dz |k|^2)``, so it undoes a positive defocus.
- A positive object tilt (mrad) moves the beam towards +y / +x as it travels downstream.
"""

from __future__ import annotations

import math
import re

import torch

# physical constants (CODATA)
_M0C2_KEV = 510.99895  # electron rest energy (keV)
_HC_KEV_ANG = 12.398419843320026  # h*c (keV·Å)


def wavelength_ang(energy_kev: float) -> float:
    """Relativistic electron wavelength (Å) for a beam energy in keV."""
    pc = math.sqrt(energy_kev * (energy_kev + 2 * _M0C2_KEV))
    return _HC_KEV_ANG / pc


def energy_kev_from_wavelength(wavelength_ang: float) -> float:
    """Beam energy (keV) of electrons of a relativistic wavelength (Å); inverse of wavelength_ang."""
    pc = _HC_KEV_ANG / wavelength_ang
    return math.sqrt(pc * pc + _M0C2_KEV * _M0C2_KEV) - _M0C2_KEV


def dx_from_dk(energy_kev: float, dk_mrad: float, n_px: int) -> float:
    """Real-space pixel size (Å) of an n_px detector with pixels of dk_mrad."""
    return wavelength_ang(energy_kev) / (n_px * dk_mrad * 1e-3)


def dk_from_dx(energy_kev: float, dx_ang: float, n_px: int) -> float:
    """Detector pixel size (mrad) that gives an object pixel of dx_ang on an n_px detector."""
    return wavelength_ang(energy_kev) / (n_px * dx_ang) * 1e3


def dk_mrad_from_inverse_length(dk_inv_ang: float, energy_kev: float) -> float:
    """Detector pixel size (mrad) of a pixel calibrated as dk_inv_ang (1/Å): theta = q * lambda
    at small angles."""
    return dk_inv_ang * wavelength_ang(energy_kev) * 1e3


def spatial_frequencies(shape: tuple[int, int], dx_ang: float, device=None, dtype=torch.float32):
    """(ky, kx) grids in 1/Å, each (ny, nx), unshifted FFT order."""
    ky = torch.fft.fftfreq(shape[0], d=dx_ang, device=device, dtype=dtype)
    kx = torch.fft.fftfreq(shape[1], d=dx_ang, device=device, dtype=dtype)
    return torch.meshgrid(ky, kx, indexing="ij")


_COEF = re.compile(r"^C(\d)(\d)$")


def aberration_coefficients(defocus_ang: float = 0.0, cs_mm: float = 0.0, extra: dict | None = None) -> dict:
    """Collect {(n, m): (C_nm in Å, phi_nm in rad)} from the config's fields."""
    coeffs: dict[tuple[int, int], tuple[float, float]] = {}
    if defocus_ang:
        coeffs[(1, 0)] = (-defocus_ang, 0.0)
    if cs_mm:
        coeffs[(3, 0)] = (cs_mm * 1e7, 0.0)
    for key, value in (extra or {}).items():
        match = _COEF.match(key)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            coeffs[(n, m)] = (float(value), float((extra or {}).get(f"phi{n}{m}", 0.0)))
    return coeffs


def aberration_phase(ky, kx, wavelength: float, coeffs: dict):
    """chi(k) in rad for the aberration coefficients (see module conventions)."""
    alpha = wavelength * torch.sqrt(ky**2 + kx**2)
    phi = torch.atan2(ky, kx)
    chi = torch.zeros_like(alpha)
    for (n, m), (c_nm, phi_nm) in coeffs.items():
        chi = chi + c_nm * alpha ** (n + 1) / (n + 1) * torch.cos(m * (phi - phi_nm))
    return 2 * math.pi / wavelength * chi


def aperture(ky, kx, wavelength: float, conv_angle_mrad: float, dx_ang: float):
    """Condenser aperture with a one-pixel soft edge (anti-aliased), values in [0, 1]."""
    alpha = wavelength * torch.sqrt(ky**2 + kx**2)
    dalpha = wavelength / (ky.shape[0] * dx_ang)  # angular size of one detector pixel
    return torch.clamp((conv_angle_mrad * 1e-3 - alpha) / dalpha + 0.5, 0.0, 1.0)


def make_probe(
    shape: tuple[int, int],
    dx_ang: float,
    energy_kev: float,
    conv_angle_mrad: float,
    coeffs: dict,
    n_modes: int = 1,
    total_intensity: float = 1.0,
    dtype=torch.complex64,
) -> torch.Tensor:
    """Probe modes (pmode, ky, kx), complex, centred in the window.

    Mode 0 is the aberrated aperture. Further modes multiply its Fourier transform by low-order
    polynomials in the scattering vector (|k|^2, ky, kx, ky*kx, ky^2-kx^2, |k|^4, ...), Gram-Schmidt
    orthogonalized: these are the directions in which partial coherence spreads a probe (defocus
    spread, finite source size), and they stay inside the aperture. Mode 0 carries 90 % of the power
    and the others share the rest with powers halving from mode to mode. The summed intensity over
    all modes equals ``total_intensity``.
    """
    real = torch.float64
    wavelength = wavelength_ang(energy_kev)
    ky, kx = spatial_frequencies(shape, dx_ang, dtype=real)
    ap = aperture(ky, kx, wavelength, conv_angle_mrad, dx_ang)
    chi = aberration_phase(ky, kx, wavelength, coeffs)
    # a linear phase ramp puts the probe at the window centre instead of the corner
    ny, nx = shape
    centring = torch.exp(-2j * math.pi * (ky * (ny // 2) * dx_ang + kx * (nx // 2) * dx_ang))
    probe0_k = ap * torch.exp(-1j * chi) * centring
    k2 = ky**2 + kx**2
    polynomials = [torch.ones_like(k2), k2, ky, kx, ky * kx, ky**2 - kx**2, k2**2, ky * k2, kx * k2]
    while len(polynomials) < n_modes:
        k = len(polynomials)
        polynomials.append(ky ** (k % 3 + 1) * kx ** (k // 3))
    modes: list[torch.Tensor] = []
    for poly in polynomials[:n_modes]:
        mode = probe0_k * poly
        for other in modes:
            mode = mode - torch.sum(other.conj() * mode) * other
        modes.append(mode / torch.linalg.vector_norm(mode))
    if n_modes == 1:
        powers = [1.0]
    else:
        rest = [0.5**j for j in range(n_modes - 1)]
        powers = [0.9] + [0.1 * r / sum(rest) for r in rest]
    # the orthonormal inverse FFT keeps each mode's norm, so the powers carry over to real space
    probe = torch.stack([torch.fft.ifft2(m, norm="ortho") * math.sqrt(p * total_intensity) for m, p in zip(modes, powers)])
    return probe.to(dtype)


def fresnel_propagator(ky, kx, wavelength: float, dz_ang, tilt_mrad):
    """Fresnel propagator for one slice, (..., ky, kx) complex.

    dz_ang: scalar tensor (Å). tilt_mrad: (T, 2) tensor of (y, x) tilts; the result has a
    leading dimension T (1 for a global tilt, or one per position in the batch).
    """
    tan_y = torch.tan(tilt_mrad[:, 0] * 1e-3)[:, None, None]
    tan_x = torch.tan(tilt_mrad[:, 1] * 1e-3)[:, None, None]
    phase = -math.pi * wavelength * dz_ang * (ky**2 + kx**2) - 2 * math.pi * dz_ang * (ky * tan_y + kx * tan_x)
    return torch.polar(torch.ones_like(phase), phase)
