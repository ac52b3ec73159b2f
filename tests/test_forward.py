"""The forward model against a plain numpy loop over positions, modes and slices, and gradcheck."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from ptycho_core.model import TENSOR_NAMES, PtychoAD, UpdateRule
from ptycho_core.physics import wavelength_ang

DX = 0.3
ENERGY = 200.0


def random_case(rng, n_pos=5, window=12, canvas=24, probe_modes=2, obj_modes=2, slices=3, tilts=1):
    probe = rng.normal(size=(probe_modes, window, window)) + 1j * rng.normal(size=(probe_modes, window, window))
    return {
        "obja": rng.uniform(0.7, 1.0, (obj_modes, slices, canvas, canvas)),
        "objp": rng.uniform(-0.5, 0.5, (obj_modes, slices, canvas, canvas)),
        "obj_tilts": rng.uniform(-5, 5, (tilts, 2)),
        "slice_thickness": np.array(7.5),
        "probe": probe,
        "probe_pos_shifts": rng.uniform(-0.5, 0.5, (n_pos, 2)),
    }, rng.integers(0, canvas - window, (n_pos, 2)), np.array([0.7, 0.3])[:obj_modes]


def reference_intensity(case, crop, occ, preblur=None, detector_blur=None):
    """Explicit loops, numpy only: what the forward model is meant to compute."""
    lam = wavelength_ang(ENERGY)
    p, ny, nx = case["probe"].shape
    ky = np.fft.fftfreq(ny, DX)[:, None]
    kx = np.fft.fftfreq(nx, DX)[None, :]
    fy = np.fft.fftfreq(ny)[:, None]
    fx = np.fft.fftfreq(nx)[None, :]
    obja, objp = case["obja"].copy(), case["objp"].copy()
    if preblur:
        r = math.ceil(3 * preblur)
        obja = ndimage.gaussian_filter(obja, (0, 0, preblur, preblur), mode="mirror", radius=(0, 0, r, r))
        objp = ndimage.gaussian_filter(objp, (0, 0, preblur, preblur), mode="mirror", radius=(0, 0, r, r))
    dz = float(case["slice_thickness"])
    out = []
    for b, (y0, x0) in enumerate(crop):
        tilt = case["obj_tilts"][0 if len(case["obj_tilts"]) == 1 else b] * 1e-3
        H = np.exp(-1j * math.pi * lam * dz * (ky**2 + kx**2)
                   - 2j * math.pi * dz * (ky * math.tan(tilt[0]) + kx * math.tan(tilt[1])))
        sy, sx = case["probe_pos_shifts"][b]
        pattern = np.zeros((ny, nx))
        for pm in range(p):
            probe = np.fft.ifft2(np.fft.fft2(case["probe"][pm]) * np.exp(-2j * math.pi * (fy * sy + fx * sx)))
            for om in range(len(occ)):
                psi = probe
                for z in range(obja.shape[1]):
                    t = obja[om, z, y0:y0 + ny, x0:x0 + nx] * np.exp(1j * objp[om, z, y0:y0 + ny, x0:x0 + nx])
                    psi = psi * t
                    if z < obja.shape[1] - 1:
                        psi = np.fft.ifft2(np.fft.fft2(psi) * H)
                pattern += occ[om] * np.abs(np.fft.fft2(psi)) ** 2 / (ny * nx)
        pattern = np.fft.fftshift(pattern)
        if detector_blur:
            r = math.ceil(3 * detector_blur)
            pattern = ndimage.gaussian_filter(pattern, detector_blur, mode="mirror", radius=r)
        out.append(pattern)
    return np.stack(out)


def make_model(case, crop, occ, **kw):
    rules = {n: UpdateRule(1, 1e-3) for n in TENSOR_NAMES}
    tensors = {k: torch.as_tensor(v) for k, v in case.items()}
    return PtychoAD(tensors, torch.as_tensor(crop), torch.as_tensor(occ), DX, wavelength_ang(ENERGY), rules, **kw)


@pytest.mark.parametrize("tilts", [1, 5])
@pytest.mark.parametrize("blur", [(None, None), (0.8, 0.6)])
@pytest.mark.parametrize("n_pos", [5, 3])  # 5 windows outsize the canvas (transmit the canvas), 3 do not
def test_forward_matches_explicit_loops(tilts, blur, n_pos):
    rng = np.random.default_rng(3)
    case, crop, occ = random_case(rng, n_pos=n_pos, tilts=n_pos if tilts > 1 else 1)
    model = make_model(case, crop, occ, obj_preblur_std=blur[0], detector_blur_std=blur[1])
    got = model(torch.arange(len(crop))).detach().numpy()
    want = reference_intensity(case, crop, occ, *blur)
    assert np.max(np.abs(got - want)) / np.max(want) < 1e-10
    # the engine's FFT order (DC at [0, 0]) is the same prediction, shifted
    fft_order = model(torch.arange(len(crop)), centered=False).detach().numpy()
    assert np.max(np.abs(np.fft.fftshift(fft_order, axes=(-2, -1)) - got)) / np.max(want) < 1e-12


def test_forward_conserves_probe_intensity_for_a_pure_phase_object():
    rng = np.random.default_rng(4)
    case, crop, occ = random_case(rng, probe_modes=1, obj_modes=1, slices=2)
    case["obja"][:] = 1.0
    model = make_model(case, crop, np.ones(1))
    total = model(torch.arange(len(crop))).sum(dim=(-2, -1))
    power = float(np.sum(np.abs(case["probe"]) ** 2))
    assert torch.allclose(total, torch.full_like(total, power), rtol=1e-10)


@pytest.mark.parametrize("n_pos, canvas, obj_modes, slices", [
    (2, 10, 1, 2),  # windows smaller than the canvas: transmit the patches
    (4, 8, 2, 1),  # windows larger than the canvas: transmit the canvas, then gather
])
def test_gradcheck_double_precision(n_pos, canvas, obj_modes, slices):
    rng = np.random.default_rng(5)
    case, crop, occ = random_case(rng, n_pos=n_pos, window=6, canvas=canvas, probe_modes=2, obj_modes=obj_modes,
                                  slices=slices)
    model = make_model(case, crop, occ, detector_blur_std=0.5)
    model.set_iteration(1)
    idx = torch.arange(n_pos)
    names = list(TENSOR_NAMES)

    def f(*values):
        for name, value in zip(names, values):
            setattr(model, name, value)  # plain tensors in place of the parameters, for gradcheck
        return model(idx)

    inputs = [getattr(model, n).detach().clone().requires_grad_(True) for n in names]
    for n in names:
        delattr(model, n)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_integer_shift_equals_moving_the_window():
    """A probe shift of exactly one pixel must equal cropping one pixel further on."""
    rng = np.random.default_rng(6)
    case, crop, occ = random_case(rng, n_pos=1, probe_modes=1, obj_modes=1, slices=1)
    case["probe_pos_shifts"][:] = 0.0
    # a compact probe, so the circular wrap of the shifted probe is negligible
    yy, xx = np.mgrid[:12, :12]
    case["probe"] = np.exp(-((yy - 6) ** 2 + (xx - 6) ** 2) / 1.0).astype(complex)[None]
    base = make_model(case, np.array([[5, 5]]), occ)(torch.arange(1))
    # the probe moved +1 px inside a window that starts 1 px earlier: same spot on the object
    case2 = dict(case, probe_pos_shifts=np.array([[1.0, 0.0]]))
    shifted = make_model(case2, np.array([[4, 5]]), occ)(torch.arange(1))
    assert torch.allclose(base, shifted, rtol=1e-6, atol=1e-8 * float(base.max()))


@pytest.mark.parametrize("shape, std", [((3, 64, 62), 0.6), ((2, 9, 7), 4.0), ((1, 1100, 12), 2.5)])
def test_gaussian_blur_mirrors_at_the_edges_as_scipy(shape, std):
    """Both ways the blur is computed (dense matrices up to DENSE_BLUR_MAX_PX, separable
    convolution above), a kernel wider than the image included, against scipy's 'mirror' mode."""
    from ptycho_core.forward import DENSE_BLUR_MAX_PX, gaussian_blur

    assert max(shape[-2:]) <= DENSE_BLUR_MAX_PX or shape[-2] > DENSE_BLUR_MAX_PX  # the cases cover both paths
    images = np.random.default_rng(0).uniform(size=shape)
    blurred = gaussian_blur(torch.from_numpy(images), std).numpy()
    r = math.ceil(3 * std)
    expected = ndimage.gaussian_filter(images, (0, std, std), mode="mirror", radius=(0, r, r))
    np.testing.assert_allclose(blurred, expected, atol=1e-12)


@pytest.mark.parametrize("n", [64, 63])
def test_a_pattern_in_fft_order_is_blurred_as_its_centred_self(n):
    """The detector blur of patterns kept in FFT order (the engine's) equals the blur of the centred
    pattern, shifted back: edges at the pattern's rim, not at the DC term."""
    from ptycho_core.forward import gaussian_blur

    centred = torch.from_numpy(np.random.default_rng(1).uniform(size=(2, n, n)))
    in_fft_order = torch.fft.ifftshift(centred, dim=(-2, -1))
    expected = torch.fft.ifftshift(gaussian_blur(centred, 0.7), dim=(-2, -1))
    torch.testing.assert_close(gaussian_blur(in_fft_order, 0.7, fft_order=True), expected, atol=1e-12, rtol=0)
