"""A reconstruction assembled from config + preprocessed data: model, optimizer, data, state.

This is the core's public entry point; the Prefect tasks and the tests both drive it::

    rec = Reconstruction.create(config, prep)          # initialize (or continue init.model_path)
    rec.resume(read_checkpoint(path))                  # or continue a checkpoint of this run
    rec.run(to_iteration=50)
    rec.save(run_dir / "checkpoints" / checkpoint_name(rec.state.iteration))
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .checkpoint import (
    Checkpoint,
    ResultView,
    check_shapes,
    load_optimizer_state,
    read_checkpoint,
    save_checkpoint,
)
from .config import PtyflowConfig
from .devices import resolve_device
from .constraints import DataContext, held_out_neighbours
from .arrivals import Arrivals
from .collective import Collective
from .engine import (
    EngineState,
    Problem,
    build_optimizer,
    compiled_forward_loss,
    forward_loss,
    held_out_indices,
    run_iterations,
)
from .io.preprocess import Preprocessed
from .measurements import TierChoice, choose_tier, open_feed
from .model import TENSOR_NAMES, PtychoAD, UpdateRule
from .physics import aberration_coefficients, make_probe
from .resample import read_previous, resample_object, resample_probe
from .scan_fit import ScanFit, read_state as read_scan_fit


def initial_tensors(config: PtyflowConfig, prep: Preprocessed, mean_counts: float) -> dict[str, torch.Tensor]:
    """The six tensors at iteration 0, from the experiment and init settings (float64/complex128);
    the probe carries mean_counts, the mean measured counts per pattern."""
    obj = config.init.object
    exp = config.experiment
    n_pos = prep.n_patterns
    canvas = prep.geometry.canvas_shape
    origin = canvas_origin_ang(prep)
    if config.init.probe.source == "file":
        probe = _probe_from_file(config, prep)
    elif config.init.probe.source == "previous":
        prev = read_previous(config.init.probe.path)
        probe = resample_probe(prev.probe, prev.dx_ang, prep.dx_ang, prep.window, config.init.probe.n_modes, mean_counts)
    else:
        coeffs = aberration_coefficients(exp.defocus_ang, exp.cs_mm, exp.aberrations)
        probe = make_probe(
            prep.window, prep.dx_ang, exp.energy_kev, exp.conv_angle_mrad, coeffs,
            n_modes=config.init.probe.n_modes, total_intensity=mean_counts, dtype=torch.complex128,
        )
    n_tilts = 1 if obj.tilt_mode == "global" else n_pos
    if obj.source == "previous":
        obja, objp = resample_object(read_previous(obj.path), canvas, prep.dx_ang, origin, obj.n_slices, obj.n_modes)
    else:
        obja = torch.ones(obj.n_modes, obj.n_slices, *canvas, dtype=torch.float64)
        objp = torch.zeros(obj.n_modes, obj.n_slices, *canvas, dtype=torch.float64)
    return {
        "obja": obja,
        "objp": objp,
        "obj_tilts": torch.tensor([obj.tilt_mrad], dtype=torch.float64).repeat(n_tilts, 1),
        "slice_thickness": torch.tensor(obj.slice_thickness_ang, dtype=torch.float64),
        "probe": probe,
        "probe_pos_shifts": torch.from_numpy(prep.geometry.shifts_px.astype(np.float64)),
    }


def probe_amplitude_unit(mean_pattern: np.ndarray) -> float:
    """The unit of the probe's learning rate: the amplitude sqrt(I) of the brightest pixel of the
    mean measured pattern (ky, kx).

    An adaptive optimizer moves each element by about lr per step in the tensor's own units, and
    the probe carries sqrt(counts): without a unit the same probe lr would be a 10x larger or
    smaller step at 100x less or more dose. PtyRAD divides its measurements by the same maximum,
    so a probe lr means the same in both codes."""
    return float(np.sqrt(mean_pattern.max()))


def canvas_origin_ang(prep: Preprocessed) -> np.ndarray:
    """Physical (y, x) in Å of canvas pixel (0, 0): ties canvases of different runs together."""
    return prep.positions_ang[0] - prep.geometry.positions_px[0] * prep.dx_ang


def _probe_from_file(config: PtyflowConfig, prep: Preprocessed) -> torch.Tensor:
    import h5py

    from .io.readers import DataError

    src = config.init.probe
    try:
        with h5py.File(src.path, "r") as f:
            probe = np.asarray(f[src.key][()])
    except (OSError, KeyError) as exc:
        raise DataError(f"init.probe.path {src.path}: cannot read '{src.key}' ({exc})") from None
    if probe.ndim == 2:
        probe = probe[None]
    if probe.shape[-2:] != prep.window:
        raise DataError(f"init.probe.path {src.path}:{src.key}: probe is {probe.shape[-2:]}, patterns are {prep.window}")
    probe = torch.from_numpy(probe.astype(np.complex128))
    n_modes = config.init.probe.n_modes
    if probe.shape[0] < n_modes:
        raise DataError(f"init.probe.n_modes is {n_modes} but {src.path}:{src.key} holds {probe.shape[0]} mode(s)")
    return probe[:n_modes]


def scan_fit_for(config: PtyflowConfig, nominal_centres_px: np.ndarray, held_out: np.ndarray) -> Optional[ScanFit]:
    """model_params.scan_fit for this run, None when off: no start_iter, positions not refined, or
    an object that is not optimized (nothing that must follow the probes)."""
    settings = config.model_params.scan_fit
    positions = config.model_params.update_params.probe_pos_shifts
    objects = [getattr(config.model_params.update_params, name) for name in ("objp", "obja")]
    if settings.start_iter is None or positions.start_iter is None or not positions.lr:
        return None
    if not any(o.start_iter is not None and o.lr for o in objects):
        return None  # a fixed object: the positions alone are refined, by their own gradient
    trained = np.setdiff1d(np.arange(len(nominal_centres_px)), held_out)
    # a run that starts from a model: its object formed on that model's positions
    return ScanFit(nominal_centres_px, settings, trained, measure=config.init.model_path is None)


def update_rules(config: PtyflowConfig) -> dict[str, UpdateRule]:
    params = config.model_params.update_params
    return {name: UpdateRule(getattr(params, name).start_iter, getattr(params, name).lr) for name in TENSOR_NAMES}


class Reconstruction:
    """Model + optimizer + data + where the run stands."""

    def __init__(self, config: PtyflowConfig, model: PtychoAD, optimizer: torch.optim.Optimizer,
                 problem: Problem, state: EngineState, tier: TierChoice):
        self.config = config
        self.tier = tier  # where the measurements live, and why
        self.model = model
        self.optimizer = optimizer
        self.problem = problem
        self.state = state

    @classmethod
    def create(cls, config: PtyflowConfig, prep: Preprocessed, device: Optional[torch.device] = None,
               collective: Optional[Collective] = None) -> "Reconstruction":
        """Initialize from the config; honours init.model_path and optimizer_params.load_state.
        ``device``: instead of recon_params.device; ``collective``: this process is one rank of
        several (recon_params.devices, a collective.RankGroup) and holds only its share of the
        patterns; None: the only process."""
        recon = config.recon_params
        if recon.threads:
            torch.set_num_threads(recon.threads)
        device = resolve_device(device if device is not None else recon.device)
        collective = collective if collective is not None else Collective()
        owned = collective.owned(prep.n_patterns)
        real = getattr(torch, recon.dtype)
        complex_dtype = torch.complex64 if real == torch.float32 else torch.complex128
        mean_pattern = prep.mean_pattern  # (ky, kx), measured while preprocessing
        mean_counts = float(mean_pattern.sum())
        held = len(owned) if owned is not None else prep.n_patterns
        tier = choose_tier(recon.measurements, held, prep.window, real, recon.batch_size, device,
                           recon.memory_budget_gb)
        tensors = initial_tensors(config, prep, mean_counts)
        tensors = {k: v.to(complex_dtype if v.is_complex() else real) for k, v in tensors.items()}
        obj = config.init.object
        occ = torch.tensor(obj.occupancies or [1.0] * obj.n_modes, dtype=real)
        model = PtychoAD(
            tensors,
            crop_pos=torch.from_numpy(prep.geometry.crop_pos),
            occupancies=occ / occ.sum(),
            dx_ang=prep.dx_ang,
            wavelength_ang=prep.wavelength_ang,
            update_rules=update_rules(config),
            obj_preblur_std=config.model_params.obj_preblur_std,
            detector_blur_std=config.model_params.detector_blur_std,
            band_limit=config.model_params.band_limit,
            origin_ang=tuple(canvas_origin_ang(prep)),
        ).to(device)
        opt_params = config.model_params.optimizer_params
        optimizer = build_optimizer(model, opt_params.name, opt_params.configs,
                                    lr_units={"probe": probe_amplitude_unit(mean_pattern)})
        validation = held_out_indices(prep.geometry.positions_px, recon.validation_fraction, recon.seed)
        problem = Problem(
            measurements=open_feed(tier.tier, prep.measurements, device, real, owned),
            loss_weights={name: term.weight for name, term in config.loss_params.active_terms().items()},
            constraint_params=config.constraint_params,
            batch_size=recon.batch_size,
            seed=recon.seed,
            batching=recon.batching,
            positions_px=prep.geometry.positions_px,
            context=DataContext(
                conv_angle_mrad=config.experiment.conv_angle_mrad,
                mean_pattern_sum=torch.tensor(mean_counts, dtype=real, device=device),
                positions_ang=torch.from_numpy(prep.positions_ang),
                initial_positions_px=torch.from_numpy(prep.geometry.crop_pos + prep.geometry.shifts_px),
                held_out=held_out_neighbours(prep.geometry.positions_px, validation),
            ),
            forward_loss=compiled_forward_loss() if recon.compile else forward_loss,
            lr_factor=config.model_params.lr_schedule.factor,
            collective=collective,
            validation_indices=validation,
            scan_fit=scan_fit_for(config, prep.geometry.positions_px, validation),
            arrivals=(Arrivals(prep.acquired, prep.acquisition == "acquiring") if prep.acquired is not None else None),
        )
        rec = cls(config, model, optimizer, problem, EngineState(), tier)
        if config.init.model_path:
            source = read_checkpoint(config.init.model_path)
            rec._load_tensors(source)
            if config.init.continue_iteration:
                rec.state = EngineState(iteration=source.iteration, history={k: list(v) for k, v in source.history.items()},
                                        scan_fit=read_scan_fit(source.scan_fit, problem.scan_fit))
        if opt_params.load_state:
            source = read_checkpoint(opt_params.load_state)
            check_shapes(source, model)
            load_optimizer_state(optimizer, source)
        return rec

    def _load_tensors(self, ckpt: Checkpoint) -> None:
        check_shapes(ckpt, self.model)
        self.model.load_tensors({k: v.to(self.model.obja.device) for k, v in ckpt.tensors.items()})
        if tuple(ckpt.crop_pos.shape) == tuple(self.model.crop_pos.shape):
            # windows that followed their corrected positions: the shifts are relative to them
            self.model.crop_pos.copy_(ckpt.crop_pos.to(self.model.crop_pos))

    def resume(self, ckpt: Checkpoint) -> None:
        """Continue exactly where ``ckpt`` (a checkpoint of this same run) stopped."""
        self._load_tensors(ckpt)
        load_optimizer_state(self.optimizer, ckpt)
        if ckpt.rng_state is not None:
            torch.set_rng_state(ckpt.rng_state)
        self.state = EngineState(
            iteration=ckpt.iteration,
            batch_cursor=ckpt.batch_cursor,
            partial_loss=dict(ckpt.partial_loss),
            history={k: list(v) for k, v in ckpt.history.items()},
            scan_fit=read_scan_fit(ckpt.scan_fit, self.problem.scan_fit),
            arrivals_in=((int(ckpt.attrs["patterns_in"]), bool(ckpt.attrs["acquiring"]))
                         if "patterns_in" in ckpt.attrs else None),
        )

    def run(self, to_iteration: int, stop_requested: Callable[[], bool] = lambda: False,
            on_iteration: Optional[Callable[[EngineState, dict], None]] = None,
            warn: Optional[Callable[[str], None]] = None) -> bool:
        """Iterate up to global iteration ``to_iteration``; True if stopped early by request."""
        extra = {"warn": warn} if warn is not None else {}
        return run_iterations(self.model, self.optimizer, self.problem, self.state, to_iteration,
                              stop_requested=stop_requested, on_iteration=on_iteration, **extra)

    def view(self) -> ResultView:
        """The current tensors and history, without a round trip through a checkpoint file."""
        return ResultView(
            tensors={name: t.cpu() for name, t in self.model.tensors().items()},
            crop_pos=self.model.crop_pos.cpu(), dx_ang=self.model.dx_ang, iteration=self.state.iteration,
            history={k: list(v) for k, v in self.state.history.items()},
            scan_fit=self.state.scan_fit.arrays() if self.state.scan_fit else {},
        )

    def save(self, path: str | Path) -> Path:
        return save_checkpoint(
            path, self.model, self.optimizer, self.state.iteration, self.state.batch_cursor,
            self.state.partial_loss, self.state.history, config_hash=self.config.resume_hash(),
            scan_fit=self.state.scan_fit.arrays() if self.state.scan_fit else None,
            arrivals_in=self.state.arrivals_in, config_resolved=self.config.resume_dict(),
        )
