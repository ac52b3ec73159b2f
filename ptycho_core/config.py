"""The one configuration tree of ptyflow: YAML in, fully resolved YAML out.

Every group is a pydantic model with ``extra="forbid"`` so that a misspelt key is an error,
not a silently ignored setting. ``load_config`` turns any validation problem into a single
``ConfigError`` whose message names the dotted path of each offending field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field(s) at fault."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data
class DataParams(_Strict):
    """Where the measured diffraction patterns and scan positions live."""

    path: str = Field(description="file holding the diffraction patterns (relative to the config file)")
    format: Literal["auto", "hdf5", "cxi", "npy", "mat", "tiff", "zarr", "empad", "dectris", "mib", "emd", "dm",
                    "velox"] = Field(
        "auto", description="auto: from the extension, and for HDF5 from the layout. dectris: a Dectris "
        "Arina/Eiger/Quadro master file with its linked data files; mib: a Quantum Detectors Merlin file; emd: an "
        "EMD 1.0 datacube (py4DSTEM's included); dm: a Gatan .dm3/.dm4 file; velox: a Thermo Fisher Velox .emd file")
    meas_key: Optional[str] = Field(
        None, description="dataset/variable/array of patterns, (N, ky, kx) or (scan_y, scan_x, ky, kx); "
        "null: the format's default (the only 3D/4D dataset of an HDF5 file, CXI's /entry_1/data_1/data)")
    pos_path: Optional[str] = Field(None, description="file holding the positions; null: the data file")
    pos_key: Optional[str] = Field(
        None, description="dataset of probe positions (N, 2) as (y, x); null: generate from experiment.scan "
        "(CXI: the sample translations)")
    pos_unit: Literal["ang", "px"] = Field("ang", description="unit of the positions in pos_key: ang (Å) or px (object pixels)")
    scan_shape: Optional[tuple[int, int]] = Field(
        None, description="(scan_y, scan_x) of a flat stack of patterns (needed for EMPAD .raw; Merlin .mib and Velox "
        "files state it, or take it from here)")
    detector_shape: Optional[tuple[int, int]] = Field(
        None, description="expected (ky, kx) of the raw patterns; a file that differs is refused")


class PreprocessParams(_Strict):
    """How raw patterns become what the model uses (applied in this order)."""

    bad_pixels: list[tuple[int, int]] = Field(
        default_factory=list, description="(ky, kx) raw-detector pixels replaced by their neighbours' mean")
    transpose: bool = Field(False, description="swap the detector axes (ky, kx) -> (kx, ky)")
    flip_y: bool = Field(False, description="flip the detector's first axis (after transpose)")
    flip_x: bool = Field(False, description="flip the detector's second axis (after transpose)")
    scan_crop: Optional[tuple[int, int, int, int]] = Field(
        None, description="keep scan rows y0:y1 and columns x0:x1 (scan indices) of a scan grid")
    scan_step: int = Field(1, ge=1, description="keep every n-th scan row and column")
    background: float = Field(0.0, description="counts subtracted from every pixel")
    clip_negative: bool = Field(True, description="set negative counts to 0")
    bin: int = Field(1, ge=1, description="sum bin x bin detector pixels (dk grows by bin)")
    target_size_px: Optional[int] = Field(
        None, ge=8, description="centre-crop or zero-pad the (binned) patterns to this size")
    center_bf_disk: bool = Field(False, description="shift all patterns so the mean bright-field disk is centred")
    dk_from_bf_disk: bool = Field(
        False, description="measure dk from the bright-field disk radius and conv_angle_mrad")
    normalize: Literal["none", "mean_sum"] = Field(
        "none", description="mean_sum: scale so the mean pattern sums to 1 (the probe follows)")
    compression: Literal["none", "lzf", "gzip"] = Field(
        "none", description="compression of the patterns in preprocessed.h5 (chunked one pattern per chunk): lzf "
        "or gzip (level 1) trade CPU time per read for disk space; none reads fastest in measurements: disk")


# --------------------------------------------------------------------------- experiment
class ScanGrid(_Strict):
    """A raster scan, used when the data carries no positions."""

    shape: tuple[int, int] = Field(description="(scan_y, scan_x) number of positions")
    step_ang: float = Field(gt=0, description="scan step (Å)")
    rotation_deg: float = Field(0.0, description="scan rotation relative to the detector (deg)")
    affine: Optional[tuple[tuple[float, float], tuple[float, float]]] = Field(
        None, description="2x2 matrix applied to the (y, x) positions after rotation (shear, scale)")


_ABERRATION_KEY = re.compile(r"^(C|phi)(\d)(\d)$")


class ExperimentParams(_Strict):
    """Microscope and detector calibration."""

    energy_kev: float = Field(gt=0, description="beam energy (keV)")
    conv_angle_mrad: float = Field(gt=0, description="probe semi-convergence angle (mrad)")
    dx_ang: Optional[float] = Field(None, gt=0, description="object pixel size (Å) of the preprocessed patterns")
    dk_mrad: Optional[float] = Field(None, gt=0, description="raw detector pixel size (mrad), before binning")
    defocus_ang: float = Field(
        0.0, description="defocus (Å); positive = focus that far below the entrance surface (C10 = -defocus)"
    )
    cs_mm: float = Field(0.0, description="spherical aberration C30 (mm)")
    aberrations: dict[str, float] = Field(
        default_factory=dict,
        description="further Krivanek coefficients: Cnm in Å, phinm in rad (e.g. C12, phi12, C21, phi21)",
    )
    scan: Optional[ScanGrid] = None

    @field_validator("aberrations")
    @classmethod
    def _check_aberration_names(cls, value: dict[str, float]) -> dict[str, float]:
        for key in value:
            if not _ABERRATION_KEY.match(key):
                raise ValueError(f"unknown aberration '{key}': expected names like C12, phi12, C21, C30")
            if key in ("C10", "C30"):
                raise ValueError(f"give {key} as {'defocus_ang' if key == 'C10' else 'cs_mm'} instead")
        return value

    @model_validator(mode="after")
    def _one_calibration(self) -> "ExperimentParams":
        if self.dx_ang is not None and self.dk_mrad is not None:
            raise ValueError("give either dx_ang or dk_mrad, not both")
        return self


# --------------------------------------------------------------------------- init
class ProbeInit(_Strict):
    source: Literal["aberrations", "file", "previous"] = Field(
        "aberrations", description="aberrations: from experiment; file: a probe dataset as it is; "
        "previous: the probe of a model.hdf5 or result.zarr, resampled to this pixel size")
    path: Optional[str] = Field(None, description="file with a probe, when source is 'file' or 'previous'")
    key: str = Field("/tensors/probe", description="dataset of the probe in that file")
    n_modes: int = Field(1, ge=1, description="number of mixed-state probe modes")

    @model_validator(mode="after")
    def _path_for_file(self) -> "ProbeInit":
        if self.source != "aberrations" and not self.path:
            raise ValueError(f"path is required when source is '{self.source}'")
        return self


class ObjectInit(_Strict):
    source: Literal["uniform", "previous"] = Field(
        "uniform", description="uniform: amplitude 1, phase 0; previous: the object of a model.hdf5 or "
        "result.zarr, resampled to this canvas, pixel size and slice count")
    path: Optional[str] = Field(None, description="the previous run's model.hdf5 or result.zarr")
    n_slices: int = Field(1, ge=1, description="number of multislice slices (nz)")
    slice_thickness_ang: float = Field(1.0, gt=0, description="slice thickness (Å)")
    n_modes: int = Field(1, ge=1, description="number of object modes")
    occupancies: Optional[list[float]] = Field(None, description="fixed object-mode weights; null: equal")
    pad_px: int = Field(8, ge=0, description="margin added around the scanned field (px)")
    tilt_mode: Literal["global", "each"] = Field("global", description="one tilt, or one per position")
    tilt_mrad: tuple[float, float] = Field((0.0, 0.0), description="initial (y, x) object tilt (mrad)")

    @model_validator(mode="after")
    def _occupancies(self) -> "ObjectInit":
        if self.source == "previous" and not self.path:
            raise ValueError("path is required when source is 'previous'")
        if self.occupancies is not None:
            if len(self.occupancies) != self.n_modes:
                raise ValueError(f"occupancies has {len(self.occupancies)} values for n_modes={self.n_modes}")
            if any(o < 0 for o in self.occupancies) or sum(self.occupancies) <= 0:
                raise ValueError("occupancies must be >= 0 with a positive sum")
        return self


class InitParams(_Strict):
    probe: ProbeInit = Field(default_factory=ProbeInit)
    object: ObjectInit = Field(default_factory=ObjectInit)
    model_path: Optional[str] = Field(
        None, description="start every tensor from this model.hdf5 instead of initializing"
    )
    continue_iteration: bool = Field(
        True,
        description="with model_path: keep counting iterations from that file's iteration "
        "(start_iter gates and batch orders continue the old run)",
    )


# --------------------------------------------------------------------------- model_params
class UpdateParam(_Strict):
    start_iter: Optional[int] = Field(
        description="first global iteration (from 1) with a gradient; null: never optimized"
    )
    lr: float = Field(ge=0, description="learning rate; 0: not optimized")

    @field_validator("start_iter")
    @classmethod
    def _positive(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < 1:
            raise ValueError("must be >= 1 (iterations count from 1) or null")
        return value

    @property
    def optimized(self) -> bool:
        return self.start_iter is not None and self.lr > 0


class UpdateParams(_Strict):
    """Per tensor: from which iteration and how fast it is optimized. The defaults (measured on abTEM
    data, benchmarks/quality.py) let the object settle before the probe (from 5) and the positions
    (from 10) move; ``defaults: reference`` gives the reference text's values instead."""

    obja: UpdateParam = Field(default_factory=lambda: UpdateParam(start_iter=1, lr=1.0e-2),
                              description="object amplitude (lr per step, dimensionless; typical 1e-3 to 1e-2)")
    objp: UpdateParam = Field(default_factory=lambda: UpdateParam(start_iter=1, lr=1.0e-2),
                              description="object phase (lr in rad per step; typical 1e-3 to 1e-2)")
    obj_tilts: UpdateParam = Field(default_factory=lambda: UpdateParam(start_iter=None, lr=0.0),
                                   description="object tilts (lr in mrad per step; typical 1e-2 to 1e-1)")
    slice_thickness: UpdateParam = Field(default_factory=lambda: UpdateParam(start_iter=None, lr=0.0),
                                         description="slice thickness (lr in Å per step; typical 1e-2 to 1e-1)")
    probe: UpdateParam = Field(default_factory=lambda: UpdateParam(start_iter=5, lr=1.0e-4), description=(
        "probe (lr in units of the amplitude of the brightest pixel of the mean measured pattern, as PtyRAD's "
        "normalized data: the same step at any dose; typical 1e-4 to 1e-3)"))
    probe_pos_shifts: UpdateParam = Field(default_factory=lambda: UpdateParam(start_iter=10, lr=3.0e-3), description=(
        "probe positions, each on its own, on top of the scan fit (lr in px per step; typical 3e-3: with 32 batches "
        "an iteration, up to about a pixel by iteration 20, what a scan's jitter needs. On realistic abTEM data "
        "1e-4 reached 0.859, 3e-3 0.870, 1e-2 0.874; on ideal thick SrTiO3 3e-3 cost 0.013, on thin 0.001)"))

    @model_validator(mode="after")
    def _something_optimized(self) -> "UpdateParams":
        # known from the config alone: refuse it now, not after preprocessing
        if not any(getattr(self, name).optimized for name in type(self).model_fields):
            raise ValueError("no tensor is optimized (every start_iter is null or lr is 0)")
        return self


class OptimizerParams(_Strict):
    name: str = Field("Adam", description="any torch.optim optimizer class (Adam, AdamW, SGD, LBFGS, ...)")
    configs: Optional[dict[str, Any]] = Field(
        default_factory=dict, description="keyword arguments of that optimizer (e.g. betas, eps; LBFGS: lr, max_iter)")
    load_state: Optional[str] = Field(None, description="model.hdf5 whose optimizer state to continue")

    @field_validator("configs")
    @classmethod
    def _none_is_empty(cls, value: Optional[dict[str, Any]]) -> dict[str, Any]:
        return dict(value or {})

    @field_validator("name")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        import torch.optim

        cls_ = getattr(torch.optim, value, None)
        if not (isinstance(cls_, type) and issubclass(cls_, torch.optim.Optimizer)):
            known = sorted(
                n for n, c in vars(torch.optim).items()
                if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
            )
            raise ValueError(f"'{value}' is not a torch.optim optimizer; choose one of {', '.join(known)}")
        return value


PLATEAU_MIN_DROP = 1e-3  # lr_schedule plateau: a loss counts as a new lowest when 0.1 % under the lowest so far


class LrSchedule(_Strict):
    """Learning rates as every tensor's lr (update_params.<tensor>.lr, or LBFGS's configs.lr) times
    a factor of the iteration and of the training loss of the iterations before it, which
    checkpoints keep: a resumed run repeats the factors exactly.

    The default, plateau, halves the factor when the loss has stopped falling: near convergence
    Adam's steps stay about lr in size whatever the gradient, so at a constant lr the loss climbs
    again from its lowest (on ptyflow simulate's demo from iteration 9 on). On abTEM SrTiO3 it
    first cut after iteration 40 (the 20-iteration figures are unchanged) and gave at 100
    iterations realistic seeds 0 and 1 0.884 and 0.866 (0.878 and 0.856 at a constant lr), thick
    0.988 (0.983), thin 0.977 (0.977); the demo 0.995 at 30 (0.983)
    (benchmarks/measured/lr_schedule.md)."""

    kind: Literal["constant", "step", "exponential", "plateau"] = Field(
        "plateau", description=(
            "constant: factor 1; step: gamma every step_iterations; exponential: gamma each iteration; plateau: "
            "gamma each time the training loss has gone patience iterations without a new lowest (0.1 % under the "
            "lowest so far), counted from the lowest or from the last cut. In live mode the iterations while the scan is "
            "acquired do not count (each has more patterns than the last)"))
    gamma: float = Field(0.5, gt=0, le=1, description="factor per step (step), per iteration (exponential) or per "
                         "plateau (plateau); typical 0.5")
    step_iterations: int = Field(20, ge=1, description="iterations between steps (step; typical 20)")
    patience: int = Field(5, ge=1, description=(
        "iterations without a new lowest loss that make a plateau (plateau; typical 5: on abTEM SrTiO3 and the "
        "demo 3 cut earlier and gained nothing more)"))
    min_factor: float = Field(0.0625, ge=0, le=1, description=(
        "the factor never falls below this (typical 1/16 = 0.0625; 0: no floor)"))

    def factor(self, iteration: int, losses: Sequence[float] = ()) -> float:
        """lr multiplier of ``iteration`` (1-based); ``losses``: the training loss of each earlier
        iteration that counts (plateau; live mode leaves out those while the scan was acquired)."""
        if self.kind == "constant":
            return 1.0
        if self.kind == "plateau":
            factor, lowest, since = 1.0, math.inf, 0
            for loss in losses:
                if loss < lowest * (1 - PLATEAU_MIN_DROP):
                    lowest, since = loss, 0
                    continue
                since += 1
                if since >= self.patience:  # a plateau: cut, and count the next one from here
                    factor, lowest, since = factor * self.gamma, loss, 0
            return max(factor, self.min_factor)
        steps = (iteration - 1) // self.step_iterations if self.kind == "step" else iteration - 1
        return max(self.gamma ** steps, self.min_factor)


_START = "first iteration it acts on; null: off"
_STOP = "last iteration it acts on; null: to the end"


class IterationWindow(_Strict):
    """From start_iter to stop_iter (both included; start_iter null: never, stop_iter null: to the end)."""

    start_iter: Optional[int] = Field(None, description=_START)
    stop_iter: Optional[int] = Field(None, description=_STOP)

    @model_validator(mode="after")
    def _stop_after_start(self):
        if self.start_iter is not None and self.stop_iter is not None and self.stop_iter < self.start_iter:
            raise ValueError(f"stop_iter {self.stop_iter} comes before start_iter {self.start_iter} "
                             "(stop_iter: null keeps it on to the end)")
        return self

    def in_window(self, iteration: int) -> bool:
        if self.start_iter is None or iteration < self.start_iter:
            return False
        return self.stop_iter is None or iteration <= self.stop_iter


class IterationSchedule(IterationWindow):
    """Every freq iterations from start_iter to stop_iter."""

    freq: int = Field(1, ge=1, description="acts every freq iterations")

    def active(self, iteration: int) -> bool:
        return self.in_window(iteration) and (iteration - self.start_iter) % self.freq == 0


class ScanFitParams(IterationSchedule):
    """The scan's smooth error (an affine map of the nominal positions and a drift over the
    acquisition time) fitted from start_iter by joint moves of the probes and the object
    (ptycho_core/scan_fit.py). It runs only while the positions and the object are refined at all
    (update_params.probe_pos_shifts and objp or obja have a start_iter and an lr), and resamples only
    the object tensors that are optimized; the per-position refinement starts from what it fitted."""

    start_iter: Optional[int] = Field(2, ge=1, description="first iteration the fit steps at (typical 2; null: off)")
    stop_iter: Optional[int] = Field(20, ge=1, description=(
        "last iteration it steps at (typical 20; null: to the end). Each step costs about one more pass over the "
        "patterns (forward and backward, no optimizer step)"))
    freq: int = Field(2, ge=1, description=(
        "steps every freq iterations (typical 2: on the realistic abTEM data every iteration from 2 to 20 gave "
        "the same image, 0.867 against 0.868, with twice the steps)"))
    drift_segments: int = Field(8, ge=1, description=(
        "pieces of the piecewise-linear drift over the acquisition time (1: no drift beyond the affine map; typical "
        "8: a stage that settles within a tenth of the scan)"))
    affine_step: float = Field(0.003, gt=0, description=(
        "first step of each affine term (dimensionless: 0.003 is 0.3 % of scale, or 0.003 rad of rotation); steps "
        "grow 1.2x while the gradient's sign holds, halve when it flips, and stay under 4x this. Typical 0.003 "
        "after the measured map (measure_affine); 0.01 moved the realistic abTEM scan 1.5 % off the truth when "
        "started from it"))
    drift_step_px: float = Field(0.5, gt=0, description="first step of each drift knot (px; typical 0.5), as affine_step")
    fit_scale: bool = Field(False, description=(
        "also fit the scan's common scale (both axes alike). Off by default: it trades against the probe's defocus "
        "(the size of the shadow image in each pattern), and on abTEM data of thin SrTiO3 it ran to +8 % and the "
        "image fell apart; the scale of y against x, rotation and shear are always fitted"))
    measure_affine: bool = Field(True, description=(
        "before the first iteration, measure the scan's affine map (step, rotation, shear, and the common scale "
        "the fit leaves alone) from the data: the strong spatial frequencies of the specimen as the nominal scan "
        "sees them, against where they overlap the bright-field disk on the detector (ptycho_core/"
        "scan_calibration.py). Applied only when at least 3 frequencies in two directions agree and the map is "
        "more than 1 % off (the measurement's own accuracy); a specimen without strong frequencies keeps its "
        "nominal scan. Takes two passes over up to 4096 patterns (1.6 s for 1024 patterns of 64², 1 thread)"))


class ModelParams(_Strict):
    obj_preblur_std: Optional[float] = Field(None, ge=0, description="Gaussian std (px) on the object before the forward pass")
    detector_blur_std: Optional[float] = Field(None, ge=0, description="Gaussian std (detector px) on the predicted pattern")
    band_limit: Optional[float] = Field(
        None, gt=0, le=1, description="multislice anti-aliasing: spatial frequencies kept in the transmission "
        "functions and in the propagator between slices, as a fraction of the Nyquist frequency 1/(2 dx) (typical "
        "2/3, abTEM's antialiasing aperture); null: no limit. Off by default: the detector records scattering out "
        "to Nyquist, and on abTEM data of 9.4 nm SrTiO3 the limit lowered the 20-iteration phase Pearson from "
        "0.93 to 0.90 and cost 1.5x the time per iteration")
    scan_fit: ScanFitParams = Field(default_factory=ScanFitParams)
    optimizer_params: OptimizerParams = Field(default_factory=OptimizerParams)
    lr_schedule: LrSchedule = Field(default_factory=LrSchedule)
    update_params: UpdateParams = Field(default_factory=UpdateParams)


# --------------------------------------------------------------------------- losses
class LossTerm(_Strict):
    weight: float = Field(ge=0, description="weight in the total loss; 0 switches the term off")


class LossParams(_Strict):
    amplitude: LossTerm = Field(default_factory=lambda: LossTerm(weight=1.0), description="Gaussian noise on sqrt(I)")
    poisson: LossTerm = Field(default_factory=lambda: LossTerm(weight=0.0), description="Poisson negative log-likelihood")
    pacbed: LossTerm = Field(default_factory=lambda: LossTerm(weight=0.0),
                             description="amplitude misfit of the batch-averaged pattern (position-averaged CBED)")
    phase_sparsity: LossTerm = Field(default_factory=lambda: LossTerm(weight=0.0),
                                     description="L1 norm of the object phase (favours sparse, atom-like phase)")

    @model_validator(mode="after")
    def _something_on(self) -> "LossParams":
        if all(getattr(self, name).weight == 0 for name in ("amplitude", "poisson", "pacbed")):
            raise ValueError("amplitude, poisson and pacbed all have weight 0: nothing ties the model to the data")
        return self

    def active_terms(self, include_off: bool = False) -> dict[str, LossTerm]:
        terms = {name: getattr(self, name) for name in type(self).model_fields}
        return terms if include_off else {k: v for k, v in terms.items() if v.weight > 0}


# --------------------------------------------------------------------------- constraints
class ConstraintSchedule(IterationSchedule):
    """When a constraint acts."""


class ProbeOrthoConstraint(ConstraintSchedule):
    """Orthogonalize mixed-state probe modes and sort them by power."""

    start_iter: Optional[int] = Field(1, description=_START)


class FixProbeIntensityConstraint(ConstraintSchedule):
    """Rescale the probe to the mean measured intensity per pattern."""

    start_iter: Optional[int] = Field(1, description=_START)


class ObjaThreshConstraint(ConstraintSchedule):
    """Clip the object amplitude into [min, max]."""

    start_iter: Optional[int] = Field(1, description=_START)
    min: float = Field(0.0, description="lowest amplitude (dimensionless; typical 0, or 0.8 for a weak object)")
    max: Optional[float] = Field(None, description="highest amplitude (typical 1.0 to 1.2); null: no limit")


class FourierProbeMaskConstraint(ConstraintSchedule):
    """Zero the probe's Fourier transform outside radius_factor x the aperture (conv_angle_mrad)."""

    radius_factor: float = Field(1.2, gt=0, description="mask radius over the aperture radius (typical 1.1 to 1.5)")


class ObjpThreshConstraint(ConstraintSchedule):
    """Clip the object phase into [min, max] (min 0: phase positivity)."""

    min: Optional[float] = Field(0.0, description="lowest phase (rad; 0: phase positivity); null: no limit")
    max: Optional[float] = Field(None, description="highest phase (rad); null: no limit")


class ObjBlurConstraint(ConstraintSchedule):
    """Lateral Gaussian filter of object amplitude and phase (std in px). On for the first 20
    iterations by default: it damps the noise of the first, large steps; left on, Adam's equal-size
    steps against it drift the phase of the whole field (abTEM thin SrTiO3, 200 iterations: Pearson
    0.94 falling to 0.63 with it, 0.98 held with it stopped at 20)."""

    start_iter: Optional[int] = Field(1, description=_START)
    stop_iter: Optional[int] = Field(20, description=_STOP)
    std_px: float = Field(0.4, gt=0, description="Gaussian std (px); typical 0.3 to 0.6")


class DepthBlurConstraint(ConstraintSchedule):
    """Depth regularization of multislice objects: Gaussian filter along z (std in slices); does
    nothing to a single slice."""

    start_iter: Optional[int] = Field(1, description=_START)
    std_slices: float = Field(1.0, gt=0, description="Gaussian std (slices); typical 0.5 to 2")


class TiltSmoothConstraint(ConstraintSchedule):
    """Smooth per-position tilts with a Gaussian of std_ang over the scan positions."""

    std_ang: float = Field(5.0, gt=0, description="Gaussian std over the scan (Å; typical a few scan steps)")


class PositionLimitConstraint(ConstraintSchedule):
    """Keep every probe-position correction within max_px of its start (0: no limit) and, with
    remove_drift, subtract the mean correction (a global drift that only shifts the image)."""

    max_px: float = Field(0.0, ge=0, description="largest correction from the initial position (px); 0: no limit")
    remove_drift: bool = Field(True, description="subtract the mean correction (a common drift only moves the image)")


class ConstraintParams(_Strict):
    probe_ortho: ProbeOrthoConstraint = Field(default_factory=ProbeOrthoConstraint)
    fix_probe_intensity: FixProbeIntensityConstraint = Field(default_factory=FixProbeIntensityConstraint)
    fourier_probe_mask: FourierProbeMaskConstraint = Field(default_factory=FourierProbeMaskConstraint)
    obja_thresh: ObjaThreshConstraint = Field(default_factory=ObjaThreshConstraint)
    objp_thresh: ObjpThreshConstraint = Field(default_factory=ObjpThreshConstraint)
    obj_blur: ObjBlurConstraint = Field(default_factory=ObjBlurConstraint)
    depth_blur: DepthBlurConstraint = Field(default_factory=DepthBlurConstraint)
    tilt_smooth: TiltSmoothConstraint = Field(default_factory=TiltSmoothConstraint)
    position_limit: PositionLimitConstraint = Field(default_factory=lambda: PositionLimitConstraint(start_iter=1))


# --------------------------------------------------------------------------- reconstruction
class ReconParams(_Strict):
    iterations: int = Field(50, ge=1, description="iterations this run performs (one pass over all patterns each)")
    segment_iterations: int = Field(10, ge=1, description="iterations per pipeline segment (checkpoint after each)")
    batch_size: int = Field(32, ge=1, description="patterns per optimizer step")
    batching: Literal["random", "compact", "sparse"] = Field(
        "random", description="random: any positions; compact: spatial neighbours; sparse: spread over the field")
    seed: int = Field(0, ge=0, description="batch order of iteration i depends only on (seed, i)")
    validation_fraction: float = Field(0.0, ge=0.0, le=0.5, description=(
        "fraction of the patterns held out of the optimizer (e.g. 0.05): picked from (positions, seed), one per "
        "region of the scan, and scored after every iteration as validation_loss, the model's prediction of "
        "patterns it was not fitted to. A score without ground truth for tuning (it rises when a setting fits "
        "noise); 0: every pattern is fitted"))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when torch sees a GPU, else cpu")
    dtype: Literal["float32", "float64"] = Field(
        "float32", description="real precision of the tensors (complex ones follow); float64 for checks, 2x slower")
    threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch; null: torch's default")
    segment_figures: bool = Field(True, description="rewrite figures/*.png after every segment, to watch a running job")
    measurements: Literal["auto", "device", "host", "disk"] = Field("auto", description=(
        "where the patterns live while iterating: device (all on the GPU, or in RAM on the CPU), host (in RAM, "
        "pinned, each batch copied to the GPU one batch ahead), disk (each batch read from preprocessed.h5 two "
        "batches ahead); auto: the fastest that fits memory_budget_gb, logged. The choice never changes the "
        "results"))
    memory_budget_gb: Optional[float] = Field(None, gt=0, description=(
        "GB the patterns may take on the device or in RAM (e.g. 40); null: half of what the device and the "
        "host have free when the run starts"))
    compile: bool = Field(False, description=(
        "torch.compile the forward model and loss. Compiling takes tens of seconds per process and "
        "inductor generates no code for complex arithmetic, so it pays only on long runs; measure it "
        "with benchmarks/run.py --compile"))
    devices: Optional[Union[int, str, list[int]]] = Field(None, description=(
        "one reconstruction on several processes, each computing a share of every batch (gradients summed "
        "with torch.distributed; results equal one process's to float rounding): a GPU count (4: GPUs 0-3), "
        "a list of GPU ids ([0, 2]) or 'cpu:N' for N CPU processes; null: one process on recon_params.device"))

    @field_validator("devices", mode="before")
    @classmethod
    def _no_booleans(cls, value):
        if isinstance(value, bool):  # YAML's true would otherwise pass as 1
            raise ValueError("expected a GPU count, a list of GPU ids or 'cpu:N'")
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):  # from a command line or a template
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)+", value):
            return [int(v) for v in value.split(",")]
        return value

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value):
        if value is None:
            return value
        if isinstance(value, str):
            match = re.fullmatch(r"cpu:(\d+)", value.strip())
            if not match or int(match.group(1)) < 1:
                raise ValueError(f"'{value}' is not a device setting; expected a GPU count (4), a list of GPU ids "
                                 "([0, 1]) or 'cpu:N' (cpu:2)")
            return f"cpu:{int(match.group(1))}"
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"{value} devices; expected at least 1")
            return value
        if not value or any(i < 0 for i in value) or len(set(value)) != len(value):
            raise ValueError(f"{value}: expected distinct GPU ids >= 0")
        return value

    @property
    def process_count(self) -> int:
        """How many processes compute each batch."""
        if self.devices is None:
            return 1
        if isinstance(self.devices, str):
            return int(self.devices.split(":")[1])
        return self.devices if isinstance(self.devices, int) else len(self.devices)

    @model_validator(mode="after")
    def _enough_patterns_per_process(self):
        if self.process_count > self.batch_size:
            raise ValueError(f"devices: {self.process_count} processes would share batches of "
                             f"{self.batch_size} patterns (recon_params.batch_size); use at most {self.batch_size} "
                             "processes or larger batches")
        return self


# --------------------------------------------------------------------------- root
REFERENCE_DEFAULTS: dict[str, Any] = {
    # the reference text's model_params, and no object filters: `defaults: reference`
    "model_params": {"update_params": {
        "obja": {"start_iter": 1, "lr": 5.0e-4}, "objp": {"start_iter": 1, "lr": 5.0e-4},
        "obj_tilts": {"start_iter": None, "lr": 0.0}, "slice_thickness": {"start_iter": None, "lr": 0.0},
        "probe": {"start_iter": 1, "lr": 1.0e-4}, "probe_pos_shifts": {"start_iter": 1, "lr": 1.0e-4}},
        "lr_schedule": {"kind": "constant"}},  # the reference text's learning rates hold for the whole run
    "constraint_params": {"obj_blur": {"start_iter": None, "stop_iter": None},
                          "depth_blur": {"start_iter": None}},
}


def _ptyflow_defaults() -> dict[str, Any]:
    """The ptyflow defaults that a config's partial entries are filled from, as REFERENCE_DEFAULTS:
    each tensor's start_iter and lr (a field default applies only to a group left out whole)."""
    return {"model_params": {"update_params": UpdateParams().model_dump()}}


def _fill(raw: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """raw with every key it leaves out taken from defaults (nested), raw's own values untouched."""
    out = dict(raw)
    for key, value in defaults.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _fill(out[key], value)
        elif key not in out:
            out[key] = value
    return out


class LiveParams(_Strict):
    """Live mode (`ptyflow run --follow`): reconstructing while the scan is still being written."""

    timeout_s: float = Field(120.0, gt=0, description=(
        "a data file that stays unchanged this long before the planned scan is complete ends the run: exit code 7 "
        "and one line, or finishing on the rows that exist with finish_incomplete"))
    first_rows: int = Field(1, ge=1, description=(
        "scan rows that must exist before the reconstruction starts; centring and normalization "
        "(preprocess.center_bf_disk, normalize) are fixed from them and refined once at completion"))
    segment_iterations: int = Field(1, ge=1, description=(
        "iterations between two looks for new rows while the scan is acquired (each look publishes a preview)"))
    poll_s: float = Field(0.5, gt=0, description="seconds between looks at the file while there is nothing to iterate on")
    finish_incomplete: bool = Field(False, description=(
        "a scan that ends with fewer patterns than planned (a .done marker, or the file unchanged for timeout_s) "
        "is finished on what exists (reported) instead of ending the run with exit code 7"))


class PtyflowConfig(_Strict):
    defaults: Literal["ptyflow", "reference"] = Field(
        "ptyflow", description="what a setting left out means: ptyflow's defaults (fast, stable on abTEM data) or "
        "reference: the reference text's learning rates (object 5e-4, probe and positions 1e-4, all from iteration "
        "1) without object filters")
    data: DataParams
    experiment: ExperimentParams
    preprocess: PreprocessParams = Field(default_factory=PreprocessParams)
    init: InitParams = Field(default_factory=InitParams)
    model_params: ModelParams = Field(default_factory=ModelParams)
    loss_params: LossParams = Field(default_factory=LossParams)
    constraint_params: ConstraintParams = Field(default_factory=ConstraintParams)
    recon_params: ReconParams = Field(default_factory=ReconParams)
    live: LiveParams = Field(default_factory=LiveParams)

    @model_validator(mode="after")
    def _one_calibration(self) -> "PtyflowConfig":
        sources = [self.experiment.dx_ang is not None, self.experiment.dk_mrad is not None,
                   self.preprocess.dk_from_bf_disk]
        if sum(sources) != 1:
            raise ValueError(
                "calibration: give exactly one of experiment.dx_ang, experiment.dk_mrad or "
                "preprocess.dk_from_bf_disk: true"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """sha256 of the resolved configuration (key order independent; the same before and after
        an update that added or removed a setting, for the same results: stable_across_updates)."""
        return _sha256(stable_across_updates(self.to_dict()))

    def resume_dict(self) -> dict[str, Any]:
        """The configuration without the settings a resumed run may change (how many iterations,
        where checkpoints fall, which device/threads): equal resume_dicts give equal results."""
        data = self.to_dict()
        for group, keys in _FREE_TO_CHANGE.items():
            for key in keys:
                data[group].pop(key, None)
        for group in _FREE_GROUPS:
            data.pop(group)
        return data

    def resume_hash(self) -> str:
        return _sha256(stable_across_updates(self.resume_dict()))


def _sha256(tree: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


NOT_SET = "(not set)"  # config_differences: a setting one of the two configurations does not have

# Settings added since checkpoints keep their configuration (2026-12-05), as (dotted key, the value
# that computes what ptyflow computed before the setting existed), and settings removed since, as
# (dotted key, the value whose results this ptyflow computes). A run directory that an older
# ptyflow left unfinished resumes under this one while each added setting holds its value and each
# removed one held its value there, so an update does not strand a preempted run.
# tests/test_config.py fails for a setting added to or removed from tests/data/settings_2026-12-05.txt
# that is not declared here.
SETTINGS_ADDED: tuple[tuple[str, Any], ...] = ()
SETTINGS_REMOVED: tuple[tuple[str, Any], ...] = ()


def _group(tree: Any, key: str, create: bool = False) -> tuple[Optional[dict], str]:
    """(the dict that holds dotted ``key`` in ``tree``, the key's last part); None where a group on
    the way is missing (created empty when ``create``) or is not a dict (an optional group left
    empty)."""
    *groups, name = key.split(".")
    node = tree
    for group in groups:
        if not isinstance(node, dict):
            return None, name
        node = node.setdefault(group, {}) if create else node.get(group)
    return (node if isinstance(node, dict) else None), name


def as_this_ptyflow_reads(written: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """A configuration as a ptyflow resolved and wrote it (a run directory's config.yaml), as this
    one reads it: an added setting it lacks takes its SETTINGS_ADDED value (what its writer
    computed), a removed one that holds its SETTINGS_REMOVED value (or is one a resume may change,
    such as recon_params.threads) is left out; a removed one set otherwise is a ConfigError naming
    it (this ptyflow cannot compute that). Returns a new dict."""
    read = copy.deepcopy(written)
    for key, before in SETTINGS_ADDED:
        group, name = _group(read, key, create=True)
        if group is not None:
            group.setdefault(name, before)
    for key, computed in SETTINGS_REMOVED:
        group, name = _group(read, key)
        if group is None or name not in group:
            continue
        if group[name] != computed and not _free_to_change(key):  # a free setting never changed the results
            raise ConfigError(f"{source}: {key}: {group[name]!r}, a setting this ptyflow no longer has (it computes "
                              f"as {key}: {computed!r}); finish this run with the ptyflow that wrote it, or use a "
                              "new run directory")
        del group[name]
    return read


def stable_across_updates(tree: dict[str, Any]) -> dict[str, Any]:
    """A configuration tree (or part of one, grouped as the whole) for the hashes that tell runs
    apart: less each added setting that holds its SETTINGS_ADDED value, plus each removed one at
    its SETTINGS_REMOVED value (where its group is in the tree), so a run's hashes are the ones the
    ptyflow before the update computed for the same results. Returns a new dict."""
    kept = copy.deepcopy(tree)
    for key, before in SETTINGS_ADDED:
        group, name = _group(kept, key)
        if group is not None and name in group and group[name] == before:
            del group[name]
    for key, computed in SETTINGS_REMOVED:
        group, name = _group(kept, key)
        if group is not None:
            group.setdefault(name, computed)
    return kept


def setting_fields(model: type[BaseModel] | None = None, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted key, pydantic field) of every setting of the configuration tree, the groups (and
    optional groups such as experiment.scan) opened."""
    for name, info in (model or PtyflowConfig).model_fields.items():
        nested = next((t for t in (info.annotation, *get_args(info.annotation))
                       if isinstance(t, type) and issubclass(t, BaseModel)), None)
        if nested is not None:
            yield from setting_fields(nested, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, value now, value before) of each setting that differs between two
    resume_dicts, NOT_SET where one of them lacks it: what a refused resume names. A setting added
    since ``saved`` was written counts as holding its SETTINGS_ADDED value there, one removed since
    as holding its SETTINGS_REMOVED value now; one not declared is NOT_SET."""
    def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix: tree}
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out

    old, new = leaves(saved), leaves(current)
    old.update({key: before for key, before in SETTINGS_ADDED if key not in old and key in new})
    new.update({key: computed for key, computed in SETTINGS_REMOVED if key not in new and key in old})
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, NOT_SET) != new.get(k, NOT_SET))
    return [(k, new.get(k, NOT_SET), old.get(k, NOT_SET)) for k in keys]


_FREE_TO_CHANGE = {"recon_params": ("iterations", "segment_iterations", "device", "threads", "segment_figures",
                                      "compile", "measurements", "memory_budget_gb", "devices")}
_FREE_GROUPS = ("live",)  # how a scan is followed while it is written, never what is computed from it


def _free_to_change(dotted_key: str) -> bool:
    """Whether a setting is one a resumed run may change (left out of resume_dict)."""
    group, _, name = dotted_key.partition(".")
    return group in _FREE_GROUPS or name in _FREE_TO_CHANGE.get(group, ())


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key (not part of the configuration)"
        elif item["type"] == "missing":
            message = "required but missing"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        elif item["type"] in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
            limit = next(iter(item.get("ctx", {}).values()), "")
            op = {"greater_than_equal": ">=", "greater_than": ">", "less_than": "<", "less_than_equal": "<="}[item["type"]]
            message = f"must be {op} {limit}"
        lines.append(f"{path}: {message} (got {item.get('input')!r})" if item["type"] != "missing" else f"{path}: {message}")
    return "; ".join(lines)


def config_from_dict(raw: Any, source: str = "config") -> PtyflowConfig:
    if raw is None:
        raise ConfigError(f"{source}: the configuration is empty; it needs at least the groups data and experiment "
                          "(ptyflow simulate --out DIR writes an example)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of configuration groups, got {type(raw).__name__}")
    # a tensor's entry that names only start_iter or only lr keeps the other from the defaults in force
    raw = _fill(raw, REFERENCE_DEFAULTS if raw.get("defaults") == "reference" else _ptyflow_defaults())
    try:
        return PtyflowConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_errors(exc)}") from None


def read_config_file(path: str | Path) -> Any:
    """The YAML of a config file as it stands (not validated), or a ConfigError naming the file
    and, for bad YAML, the line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None


def load_config(path: str | Path) -> PtyflowConfig:
    """Read and validate a YAML config; relative data/model paths are taken from its folder. No
    data file is opened: a run fills in the calibration its data file states through
    io.calibration.load_run_config."""
    path = Path(path)
    return resolve_paths(config_from_dict(read_config_file(path), source=str(path)), path.parent)


def resolve_paths(config: PtyflowConfig, base: Path) -> PtyflowConfig:
    """Make every file path in the config absolute, relative to ``base``."""
    def absolute(p: Optional[str]) -> Optional[str]:
        if p is None:
            return None
        pp = Path(p).expanduser()
        return str(pp if pp.is_absolute() else (base / pp).resolve())

    config = config.model_copy(deep=True)
    config.data.path = absolute(config.data.path)
    config.data.pos_path = absolute(config.data.pos_path)
    config.init.model_path = absolute(config.init.model_path)
    config.init.probe.path = absolute(config.init.probe.path)
    config.init.object.path = absolute(config.init.object.path)
    config.model_params.optimizer_params.load_state = absolute(config.model_params.optimizer_params.load_state)
    return config


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_files(config: PtyflowConfig) -> None:
    """Every file the config names besides the data (a starting model, a probe or object to
    start from, an optimizer state) exists and is of the kind expected: a ConfigError naming the
    field and the file, before anything compares or writes a run directory."""
    def check(field: str, path: Optional[str], zarr_allowed: bool = False) -> None:
        if path is None:
            return
        where = Path(path)
        if not where.exists():
            raise ConfigError(f"{field}: {where}: file not found")
        if where.is_dir():
            if not zarr_allowed:
                raise ConfigError(f"{field}: {where} is a folder; expected an HDF5 file")
            return
        with open(where, "rb") as fh:
            if fh.read(8) != _HDF5_SIGNATURE:
                raise ConfigError(f"{field}: {where} is not an HDF5 file" +
                                  ("; expected a model.hdf5 or a result.zarr" if zarr_allowed else ""))

    init = config.init
    check("init.model_path", init.model_path)
    check("model_params.optimizer_params.load_state", config.model_params.optimizer_params.load_state)
    if init.probe.source != "aberrations":
        check("init.probe.path", init.probe.path, zarr_allowed=init.probe.source == "previous")
    if init.object.source == "previous":
        check("init.object.path", init.object.path, zarr_allowed=True)


def set_dotted(raw: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict (creating groups), for sweeps and CLI overrides."""
    node = raw
    parts = dotted_key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted_key}: '{part}' is not a group")
    node[parts[-1]] = value
