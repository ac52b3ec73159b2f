"""Parameter sweeps: points over dotted config keys, their run directories, the summary.

A sweep spec (YAML)::

    mode: grid            # grid: every combination; list: the i-th value of every key together;
                          # random: n draws, each key's value picked from its list
    n: 4                  # for random
    seed: 0               # for random
    wait_hours: 48        # how long to wait for points running on workers
    parameters:
      model_params.update_params.probe.lr: [1.0e-4, 3.0e-4]
      init.object.n_slices: [1, 4]
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import ConfigError, PtyflowConfig, config_from_dict, set_dotted
from .reconstruction import scanned_field_box


class SweepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["grid", "list", "random"] = "grid"
    parameters: dict[str, list[Any]] = Field(description="dotted config key -> values")
    n: Optional[int] = Field(None, ge=1, description="number of points in random mode")
    seed: int = 0
    wait_hours: float = Field(48.0, gt=0, description=(
        "how long the sweep waits for its points' flow runs on the workers (h); a point not finished by then "
        "is reported with its state, the sweep does not hang"))

    @model_validator(mode="after")
    def _consistent(self) -> "SweepSpec":
        if not self.parameters:
            raise ValueError("parameters: give at least one dotted key with a list of values")
        for key, values in self.parameters.items():
            if not values:
                raise ValueError(f"parameters.{key}: empty list of values")
        if self.mode == "list" and len({len(v) for v in self.parameters.values()}) != 1:
            raise ValueError("mode list: every parameter needs the same number of values")
        if self.mode == "random" and self.n is None:
            raise ValueError("mode random: give n, the number of points")
        return self


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
    columns = ["point", *keys, "state", "iteration", "final_loss", "phase_pearson", "seconds", "run_dir"]
    with open(out_dir / "sweep.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    figure = out_dir / "sweep_phases.png"
    _phase_montage(figure, rows, keys)
    return {"csv": out_dir / "sweep.csv", "figure": figure}


def _phase_montage(path: Path, rows: list[dict[str, Any]], keys: list[str]) -> None:
    import zarr

    from .io.figures import pyplot

    plt = pyplot()

    n = len(rows)
    cols = min(n, 4)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(3.6 * cols, 3.9 * ((n + cols - 1) // cols)),
                             squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, row in zip(axes.ravel(), rows):
        result = Path(row["run_dir"]) / "result.zarr"
        if result.is_dir():
            root = zarr.open_group(str(result), mode="r")
            phase = np.asarray(root["object_phase"][0]).sum(0)
            image = phase[scanned_field_box(np.asarray(root["positions_px_initial"][:]), phase.shape)]
            ax.imshow(image, cmap="gray", vmin=np.percentile(image, 0.5), vmax=np.percentile(image, 99.5))
        label = "\n".join(f"{k.split('.')[-2] if k.count('.') else ''}.{k.split('.')[-1]}={row.get(k)}".lstrip(".")
                          for k in keys)
        loss = row.get("final_loss")
        ax.set_title(f"{row['point']}\n{label}\nloss {loss:.4g}" if loss is not None else f"{row['point']}\n{label}",
                     fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
