"""Parameter sweeps: the spec, its points over dotted config keys, their run directories, the
summary table and figure.

A sweep spec (YAML)::

    mode: grid            # grid: every combination; list: the i-th value of every key together;
                          # random: n draws, each key's value picked from its list;
                          # optuna: an adaptive study (see tuning.py beside this)
    n: 4                  # for random
    seed: 0               # for random, and optuna's sampler
    wait_hours: 48        # how long to wait for points running on workers
    parameters:
      model_params.update_params.probe.lr: [1.0e-4, 3.0e-4]
      init.object.n_slices: [1, 4]

In mode optuna a parameter is a range, ``{low: 1.0e-3, high: 1.0e-1, log: true}`` (integers when
low and high are; ``step`` optional), or a list of choices; the study's settings are below.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ptycho_core.config import ConfigError, PtyflowConfig, config_from_dict, set_dotted
from ptycho_core.quality import scanned_field_box


class Range(BaseModel):
    """A parameter's range in an optuna study: low..high (floats, or integers when both are), on a
    log scale or in steps; or a list of choices."""

    model_config = ConfigDict(extra="forbid")

    low: Optional[Union[int, float]] = Field(None, description="smallest value, e.g. 1.0e-4")
    high: Optional[Union[int, float]] = Field(None, description="largest value, e.g. 1.0e-1")
    log: bool = Field(False, description="sample on a log scale (learning rates)")
    step: Optional[Union[int, float]] = Field(None, gt=0, description="values low, low+step, ... only")
    choices: Optional[list[Any]] = Field(None, description="categorical values instead of a range, e.g. [1, 2, 4]")

    @model_validator(mode="after")
    def _consistent(self) -> "Range":
        if self.choices is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either choices or low/high, not both")
            if not self.choices:
                raise ValueError("choices: empty list")
            return self
        if self.low is None or self.high is None:
            raise ValueError("give low and high (or choices)")
        if not self.low < self.high:
            raise ValueError(f"empty or inverted range: low {self.low} must be below high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log: low must be > 0 (got {self.low})")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int) and isinstance(self.step or 1, int)

    def corners(self) -> list[Any]:
        """Values that reach every kind of value the range can take (checked before a trial runs)."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


OBJECTIVES = {"validation_loss": "minimize", "phase_pearson": "maximize"}


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["grid", "list", "random", "optuna"] = "grid"
    parameters: dict[str, Union[list[Any], Range]] = Field(description=(
        "dotted config key -> list of values (grid, list, random) or a Range (optuna)"))
    n: Optional[int] = Field(None, ge=1, description="number of points in random mode")
    seed: int = 0
    wait_hours: float = Field(48.0, gt=0, description=(
        "how long the sweep waits for its points' flow runs on the workers (h); a point not finished by then "
        "is reported with its state, the sweep does not hang"))
    # ---- mode optuna
    n_trials: Optional[int] = Field(None, ge=1, description="trials that finish (complete or pruned), e.g. 20")
    objective: Literal["validation_loss", "phase_pearson"] = Field("validation_loss", description=(
        "validation_loss (minimized): the held-out patterns' loss, needs no ground truth; phase_pearson "
        "(maximized): against the ground truth of simulated data"))
    validation_fraction: float = Field(0.05, gt=0, le=0.5, description=(
        "recon_params.validation_fraction of every trial when the base config holds out nothing"))
    sampler: Literal["tpe", "random", "qmc", "gp", "cmaes"] = Field("tpe", description="optuna sampler")
    sampler_options: dict[str, Any] = Field(default_factory=dict, description="its arguments, e.g. n_startup_trials: 5")
    pruner: Literal["median", "percentile", "hyperband", "successive_halving", "none"] = Field(
        "median", description="stops poor trials at segment ends (recon_params.segment_iterations)")
    pruner_options: dict[str, Any] = Field(default_factory=dict, description=(
        "its arguments, e.g. n_startup_trials: 2 (median defaults here: 2 startup trials, no warm-up)"))
    storage: Optional[str] = Field(None, description=(
        "SQLAlchemy URL of the study database, e.g. postgresql://user@db/ptyflow; null: sqlite file study.db in "
        "the sweep's folder. Sweeps naming the same storage and study_name share one study"))
    study_name: Optional[str] = Field(None, description="null: the sweep folder's name")
    parallel: int = Field(1, ge=1, description="trials in flight at once when they run on workers")

    @model_validator(mode="after")
    def _consistent(self) -> "SweepSpec":
        if not self.parameters:
            raise ValueError("parameters: give at least one dotted key with a list of values")
        for key, values in self.parameters.items():
            if isinstance(values, Range) and self.mode != "optuna":
                raise ValueError(f"parameters.{key}: mode {self.mode} takes a list of values, a range needs mode optuna")
            if isinstance(values, list) and not values:
                raise ValueError(f"parameters.{key}: empty list of values")
        if self.mode == "list" and len({len(v) for v in self.parameters.values()}) != 1:
            raise ValueError("mode list: every parameter needs the same number of values")
        if self.mode == "random" and self.n is None:
            raise ValueError("mode random: give n, the number of points")
        if self.mode == "optuna" and self.n_trials is None:
            raise ValueError("mode optuna: give n_trials, the number of trials")
        return self

    def ranges(self) -> dict[str, Range]:
        """mode optuna: every parameter as a Range (a list is a list of choices)."""
        return {k: v if isinstance(v, Range) else Range(choices=v) for k, v in self.parameters.items()}


def load_sweep_spec(source: str | Path | dict) -> SweepSpec:
    raw = source
    if not isinstance(source, dict):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: sweep spec not found")
        raw = yaml.safe_load(path.read_text())
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"sweep spec: {problems}") from None


def corner_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """mode optuna: points that take every range's low and high and every choice, so that a key or
    a value the config refuses is found before any trial runs."""
    ranges = spec.ranges()
    count = max(len(r.corners()) for r in ranges.values())
    return [{k: r.corners()[min(i, len(r.corners()) - 1)] for k, r in ranges.items()} for i in range(count)]


def sweep_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The parameter values of every point, in a stable order."""
    keys = list(spec.parameters)
    values = [spec.parameters[k] for k in keys]
    if spec.mode == "grid":
        combos = list(itertools.product(*values))
    elif spec.mode == "list":
        combos = list(zip(*values))
    else:
        rng = np.random.default_rng(spec.seed)
        combos = [tuple(v[rng.integers(len(v))] for v in values) for _ in range(spec.n)]
    return [dict(zip(keys, combo)) for combo in combos]


def point_name(index: int, point: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(point, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"point_{index:03d}_{digest}"


def point_config(base: PtyflowConfig, point: dict[str, Any]) -> PtyflowConfig:
    """The base configuration with the point's values set; a bad key or value names itself."""
    raw = base.to_dict()
    for key, value in point.items():
        set_dotted(raw, key, value)
    return config_from_dict(raw, source=f"sweep point {point}")


def write_summary(out_dir: Path, rows: list[dict[str, Any]], keys: list[str]) -> dict[str, Path]:
    """sweep.csv and sweep_phases.png (the phase of every point side by side)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["point", *keys, "state", "objective", "pruned_at_iteration", "iteration", "final_loss",
               "validation_loss", "phase_pearson", "seconds", "run_dir"]
    with open(out_dir / "sweep.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    figure = out_dir / "sweep_phases.png"
    _phase_montage(figure, rows, keys)
    return {"csv": out_dir / "sweep.csv", "figure": figure}


def _short(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


def _phase_montage(path: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    import zarr

    from ptycho_core.io.figures import pyplot

    plt = pyplot()

    n = len(rows)
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.6 * cols, 3.9 * ((n + cols - 1) // cols)),
                             squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, row in zip(axes.ravel(), rows):
        result = Path(row["run_dir"]) / "result.zarr" if row.get("run_dir") else None
        if result is not None and result.is_dir():
            root = zarr.open_group(str(result), mode="r")
            phase = np.asarray(root["object_phase"][0]).sum(0)
            image = phase[scanned_field_box(np.asarray(root["positions_px_initial"][:]), phase.shape)]
            ax.imshow(image, cmap="gray", vmin=np.percentile(image, 0.5), vmax=np.percentile(image, 99.5))
        label = "\n".join(f"{k.split('.')[-2] if k.count('.') else ''}.{k.split('.')[-1]}={_short(row.get(k))}"
                          .lstrip(".") for k in keys)
        loss = row.get("final_loss")
        if row.get("pruned_at_iteration"):
            label += f"\npruned at {row['pruned_at_iteration']}"
        ax.set_title(f"{row['point']}\n{label}\nloss {loss:.4g}" if loss is not None else f"{row['point']}\n{label}",
                     fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
