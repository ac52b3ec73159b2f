"""Datasets with known ground truth: a crystal-like phase object, a probe, a raster scan.

``simulate(preset, out_dir, seed)`` writes out_dir/data.h5 (patterns, positions, calibration and
the ground truth) and out_dir/config.yaml that reconstructs it. Patterns come from the same
forward model the reconstruction uses (PtychoAD); independent checks against abTEM live in tests.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
import torch
import yaml

from .checkpoint import atomic_write
from .io.preprocess import raster_positions_ang, scan_geometry
from .model import PtychoAD, UpdateRule, TENSOR_NAMES
from .physics import aberration_coefficients, dk_from_dx, make_probe, wavelength_ang


@dataclass(frozen=True)
class Preset:
    energy_kev: float = 300.0
    conv_angle_mrad: float = 25.0
    dx_ang: float = 0.25
    window_px: int = 64
    defocus_ang: float = 40.0
    scan_shape: tuple[int, int] = (16, 16)
    step_ang: float = 0.8
    n_slices: int = 1
    slice_thickness_ang: float = 20.0
    dose_e_per_ang2: Optional[float] = 1.0e6  # None: no noise
    lattice_ang: float = 1.95  # spacing of the atom columns
    atom_sigma_ang: float = 0.3
    atom_phase_rad: float = 0.5
    pad_px: int = 8
    iterations: int = 30
    batch_size: int = 16
    tilt_mrad: tuple[float, float] = (0.0, 0.0)  # true global object tilt (y, x)
    # scan errors: the true probe positions differ from the nominal grid that data.h5's positions_ang
    # and the config give (the truth keeps the true ones; scan_errors_ang)
    position_jitter_ang: float = 0.0  # independent Gaussian error of every position, std per axis
    drift_ang: tuple[float, float] = (0.0, 0.0)  # specimen drift (y, x) over the scan's time, in scan order
    drift_settle: float = 0.0  # 0: steady; > 0: slowing as exp(-t / drift_settle), t the scan's time from 0 to 1
    defocus_spread_ang: float = 0.0  # partial coherence: incoherent sum over a Gaussian defocus spread
    crystal: bool = False  # every slice the same (atom columns straight through the sample)


PRESETS = {
    "small": Preset(),
    "medium": Preset(scan_shape=(32, 32), window_px=96, dx_ang=0.2, step_ang=0.6, defocus_ang=50.0,
                     iterations=40, batch_size=32),
}


def atom_object(canvas: tuple[int, int], dx_ang: float, preset: Preset, n_slices: int,
                rng: np.random.Generator) -> np.ndarray:
    """Phase (nz, Ny, Nx) of Gaussian atom columns on a square lattice, different in every slice:
    each slice keeps a random ~70 % of the sites with random strength and small displacements."""
    ny, nx = canvas
    y = np.arange(ny)[:, None] * dx_ang
    x = np.arange(nx)[None, :] * dx_ang
    sites = np.stack(np.meshgrid(np.arange(-1, ny * dx_ang / preset.lattice_ang + 1),
                                 np.arange(-1, nx * dx_ang / preset.lattice_ang + 1), indexing="ij"), -1)
    sites = sites.reshape(-1, 2) * preset.lattice_ang
    phase = np.zeros((n_slices, ny, nx))
    for z in range(n_slices):
        keep = rng.random(len(sites)) < 0.7
        centres = sites[keep] + rng.normal(0, 0.1, (keep.sum(), 2))
        strength = preset.atom_phase_rad * rng.uniform(0.5, 1.0, keep.sum()) / math.sqrt(n_slices)
        for (cy, cx), s in zip(centres, strength):
            phase[z] += s * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * preset.atom_sigma_ang**2))
    return phase


def scan_errors_ang(p: Preset, rng: np.random.Generator) -> np.ndarray:
    """(N, 2) true minus nominal probe positions (y, x) in Å of a raster scan acquired row by row,
    about their mean.

    Drift: the specimen moves by ``drift_ang`` from the first pattern to the last, steadily, or,
    with ``drift_settle`` > 0, fast at first and slowing as exp(-t / drift_settle) (t: time as a
    fraction of the scan), as a stage settling after a move does. Errors in scan order distort
    the image: in a raster, steady drift shears or stretches it; settling drift bends it. Jitter:
    independent Gaussian errors of std ``position_jitter_ang`` per axis (drawn from ``rng``)."""
    n = p.scan_shape[0] * p.scan_shape[1]
    t = np.linspace(0.0, 1.0, n)[:, None]
    if p.drift_settle > 0:
        t = -np.expm1(-t / p.drift_settle) / -np.expm1(-1.0 / p.drift_settle)
    errors = t * np.asarray(p.drift_ang, dtype=np.float64)
    if p.position_jitter_ang:
        errors = errors + rng.normal(0, p.position_jitter_ang, (n, 2))
    # about their mean: a common offset of the whole scan only moves the image, and a reconstruction
    # that removes the mean correction (position_limit) then lands on the truth's canvas
    return errors - errors.mean(axis=0)


def simulate(preset: str | Preset, out_dir: str | Path, seed: int = 0, n_slices: Optional[int] = None,
             dose_e_per_ang2: Optional[float] | str = "preset", **changes) -> Path:
    """Simulate a dataset with ground truth into out_dir; returns out_dir/config.yaml.

    ``changes`` replace preset fields (e.g. tilt_mrad=(2, 0), position_jitter_ang=0.1)."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    if n_slices is not None:
        p = replace(p, n_slices=n_slices)
    if dose_e_per_ang2 != "preset":
        p = replace(p, dose_e_per_ang2=dose_e_per_ang2)
    p = replace(p, **changes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    window = (p.window_px, p.window_px)
    positions = raster_positions_ang(p.scan_shape, p.step_ang)
    errors_ang = scan_errors_ang(p, rng)
    true_positions = positions + errors_ang
    # The truth lives on the canvas a reconstruction from the nominal positions builds (same pad_px),
    # so the two compare pixel for pixel; the patterns are simulated on that canvas, grown by a
    # margin when a probe window at its true position would leave it.
    nominal = scan_geometry(positions, p.dx_ang, window, p.pad_px)
    true_px = nominal.positions_px + errors_ang / p.dx_ang  # true probe centres on that canvas
    margin, crop, shifts = 0, nominal.crop_pos, nominal.shifts_px
    if errors_ang.any():
        top_left = nominal.crop_pos + nominal.shifts_px + errors_ang / p.dx_ang
        last = np.array(nominal.canvas_shape) - window
        margin = int(np.ceil(max(0.0, 0.5 - top_left.min(), (top_left - last).max() + 0.5)))
        crop = np.round(top_left).astype(np.int64) + margin
        shifts = top_left + margin - crop
    canvas = tuple(int(v) + 2 * margin for v in nominal.canvas_shape)
    if p.crystal:
        phase = np.repeat(atom_object(canvas, p.dx_ang, p, 1, rng), p.n_slices, axis=0) / math.sqrt(p.n_slices)
    else:
        phase = atom_object(canvas, p.dx_ang, p, p.n_slices, rng)
    amplitude = np.exp(-0.1 * phase)  # weak absorption where the atoms are
    on_nominal_canvas = (..., slice(margin, canvas[0] - margin), slice(margin, canvas[1] - margin))
    counts = (p.dose_e_per_ang2 or 1.0e6) * p.step_ang**2
    if p.defocus_spread_ang:
        # partial temporal coherence: probes at 7 defoci with Gaussian weights, summed incoherently
        offsets = np.linspace(-2, 2, 7) * p.defocus_spread_ang
        weights = np.exp(-0.5 * (offsets / p.defocus_spread_ang) ** 2)
        weights /= weights.sum()
        probe = torch.cat([
            make_probe(window, p.dx_ang, p.energy_kev, p.conv_angle_mrad, aberration_coefficients(p.defocus_ang + d),
                       total_intensity=counts * w, dtype=torch.complex128) for d, w in zip(offsets, weights)])
    else:
        probe = make_probe(window, p.dx_ang, p.energy_kev, p.conv_angle_mrad,
                           aberration_coefficients(p.defocus_ang), total_intensity=counts, dtype=torch.complex128)
    tensors = {
        "obja": torch.from_numpy(amplitude[None]),
        "objp": torch.from_numpy(phase[None]),
        "obj_tilts": torch.tensor([p.tilt_mrad], dtype=torch.float64),
        "slice_thickness": torch.tensor(p.slice_thickness_ang, dtype=torch.float64),
        "probe": probe,
        "probe_pos_shifts": torch.from_numpy(shifts),
    }
    frozen = {name: UpdateRule(None, 0.0) for name in TENSOR_NAMES}
    model = PtychoAD(tensors, torch.from_numpy(crop), torch.ones(1, dtype=torch.float64),
                     p.dx_ang, wavelength_ang(p.energy_kev), frozen)
    with torch.no_grad():
        patterns = torch.cat([model(idx) for idx in torch.arange(len(positions)).split(64)]).numpy()
    if p.dose_e_per_ang2 is not None:
        patterns = rng.poisson(np.clip(patterns, 0, None)).astype(np.float32)
    patterns = patterns.astype(np.float32).reshape(*p.scan_shape, *window)

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(
                energy_kev=p.energy_kev, conv_angle_mrad=p.conv_angle_mrad, dx_ang=p.dx_ang,
                dk_mrad=dk_from_dx(p.energy_kev, p.dx_ang, p.window_px), defocus_ang=p.defocus_ang,
                step_ang=p.step_ang, seed=seed, dose_e_per_ang2=p.dose_e_per_ang2 or 0.0,
                generator="ptyflow.simulate",
            )
            f.create_dataset("meas", data=patterns, chunks=(1, 1, *window), compression="gzip", compression_opts=1)
            f["meas"].attrs["layout"] = "(scan_y, scan_x, ky, kx), counts, DC at the centre"
            f.create_dataset("positions_ang", data=positions)
            f["positions_ang"].attrs["layout"] = "(N, 2) probe centres (y, x) in Å, row by row"
            gt = f.create_group("ground_truth")
            gt.create_dataset("objp", data=phase[None][on_nominal_canvas].astype(np.float32))
            gt.create_dataset("obja", data=amplitude[None][on_nominal_canvas].astype(np.float32))
            gt.create_dataset("probe", data=probe.numpy().astype(np.complex64))
            gt.create_dataset("positions_px", data=true_px)
            gt["positions_px"].attrs["layout"] = "(N, 2) true probe centres (y, x) on the truth's canvas, px"
            gt.create_dataset("positions_ang", data=true_positions)
            gt["positions_ang"].attrs["layout"] = "(N, 2) true probe centres (y, x) in Å; /positions_ang: nominal"
            gt.attrs.update(slice_thickness_ang=p.slice_thickness_ang, pad_px=p.pad_px, tilt_mrad=list(p.tilt_mrad),
                            note="object on the canvas a reconstruction with init.object.pad_px = pad_px uses")
            f.attrs["preset"] = yaml.safe_dump(asdict(p))

    atomic_write(out / "data.h5", write)
    config = preset_config(p, "data.h5")
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return out / "config.yaml"


def preset_config(p: Preset, data_path: str) -> dict:
    """A config that reconstructs a preset's data in a minute or so on two CPU cores: data, optics,
    slicing and iterations; everything else is ptyflow's defaults."""
    return {
        "data": {"path": data_path, "meas_key": "/meas", "pos_key": "/positions_ang", "pos_unit": "ang"},
        "experiment": {"energy_kev": p.energy_kev, "conv_angle_mrad": p.conv_angle_mrad,
                       "dx_ang": p.dx_ang, "defocus_ang": p.defocus_ang},
        "init": {"probe": {"n_modes": 1},
                 "object": {"n_slices": p.n_slices, "slice_thickness_ang": p.slice_thickness_ang, "pad_px": p.pad_px}},
        "recon_params": {"iterations": p.iterations, "segment_iterations": 10, "batch_size": p.batch_size, "seed": 0},
    }


def read_ground_truth(data_path: str | Path) -> dict[str, np.ndarray]:
    with h5py.File(data_path, "r") as f:
        if "ground_truth" not in f:
            return {}
        gt = f["ground_truth"]
        return {k: gt[k][()] for k in gt} | {"pad_px": int(gt.attrs["pad_px"])}
