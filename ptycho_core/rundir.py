"""The run directory: the contract that resume relies on.

  <run_dir>/config.yaml                 the fully resolved configuration
  <run_dir>/preprocessed.h5             measurements as the model uses them, positions, calibration
  <run_dir>/checkpoints/iter_NNNNNN.h5  model.hdf5 after N iterations (iter_NNNNNN_bBBBB.h5: B batches
                                        into iteration N+1, written when a run was preempted)
  <run_dir>/model.hdf5                  the newest checkpoint (a hard link to it)
  <run_dir>/result.zarr, figures/       the export
  <run_dir>/.lock                       host and PID of the process working on it (runlock.py)

- A run is three stages (stages/): prepare writes config.yaml and preprocessed.h5 (or confirms
  them: a different input or configuration is refused); segments continue from the newest valid
  checkpoint to the next segment end (segment_ends) and write a checkpoint; export writes
  result.zarr and the figures from the newest checkpoint.
- What is finished is never redone: a rerun reuses preprocessed.h5, starts from the newest valid
  checkpoint (newest_checkpoint skips damaged files), and a finished run only exports again.
- A segment stopped by SIGTERM/SIGINT finishes its batch, writes a checkpoint and raises
  Preempted; iterations count from 1 across segments and resumes.
- One process at a time works in a run directory (runlock.run_lock).

Everything here is plain Python + torch; the Prefect tasks call the stages.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from .checkpoint import (Checkpoint, CheckpointError, latest_valid_checkpoint, list_checkpoints, read_checkpoint,
                         require_current_format)
from .config import NOT_SET, PtyflowConfig, as_this_ptyflow_reads, config_differences, config_from_dict

log = logging.getLogger("ptyflow")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; nothing in it was changed."""


class Preempted(RuntimeError):
    """A segment stopped on SIGTERM/SIGINT after writing its checkpoint."""

    def __init__(self, iteration: int, batch_cursor: int, checkpoint: Path, signal_name: str = "signal"):
        where = f"iteration {iteration}"
        if batch_cursor:
            where += f" (+{batch_cursor} batches of iteration {iteration + 1})"
        super().__init__(f"preempted at {where} by {signal_name}; checkpoint {checkpoint}")
        self.iteration = iteration
        self.batch_cursor = batch_cursor
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed.h5"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model.hdf5"

    @property
    def result(self) -> Path:
        return self.root / "result.zarr"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


def read_run_config(run_dir: str | Path) -> PtyflowConfig:
    path = RunPaths(Path(run_dir)).config
    if not path.is_file():
        raise RunDirError(f"{path}: missing; the run directory was never preprocessed")
    # written resolved by this or an older ptyflow: settings added or removed since are read as what
    # its writer computed
    written = as_this_ptyflow_reads(yaml.safe_load(path.read_text()), source=str(path))
    return config_from_dict(written, source=str(path))


def require_same_config(saved: dict, current: PtyflowConfig, holder: str) -> None:
    """Refuse to go on in a run directory whose reconstruction was made with another configuration.
    saved: the resume_dict it was made with; holder: what holds it, to start the message. The
    message names each setting that differs with both values and says how to go on."""
    differences = config_differences(saved, current.resume_dict())
    if not differences:
        return
    named = "; ".join(f"{key}: {now!r} here, {before!r} before" for key, now, before in differences[:4])
    named += f"; and {len(differences) - 4} more" if len(differences) > 4 else ""
    if any(before == NOT_SET for _, _, before in differences):
        advice = "settings this ptyflow has and the one that made it had not; finish it with that ptyflow"
    else:  # set as it was, the run goes on exactly as it would have
        advice = ("to resume, set each as it was before (a setting left to the defaults may have changed with a "
                  "ptyflow update)")
    raise RunDirError(f"{holder} with a different configuration ({named}): {advice}, or use a new run directory")


def require_resumable(ckpt: Checkpoint, config: PtyflowConfig, config_path: Path) -> None:
    """Refuse to continue ``ckpt`` under ``config`` (read from ``config_path``) where this ptyflow
    cannot: an older file format (CheckpointError), or another configuration, each setting named
    (RunDirError)."""
    require_current_format(ckpt)
    if ckpt.config_hash == config.resume_hash():
        return
    if not ckpt.config_resolved:  # written before checkpoints kept their configuration
        raise RunDirError(f"{ckpt.path}: written with a different configuration than {config_path}; a setting left "
                          "to the defaults may have changed with a ptyflow update (this file does not say which); "
                          "use a new run directory, or the ptyflow that wrote it to finish this one")
    require_same_config(ckpt.config_resolved, config, f"{ckpt.path}: written")


def newest_checkpoint(run_dir: str | Path, warn: Callable[[str], None] = log.warning) -> Optional[Checkpoint]:
    """The newest valid checkpoint; damaged newer files are reported by name and left in place."""
    ckpt, skipped = latest_valid_checkpoint(RunPaths(Path(run_dir)).checkpoints)
    for path, reason in skipped:
        warn(f"skipping damaged checkpoint {path.name}: {reason}")
    return ckpt


def start_iteration(config: PtyflowConfig) -> int:
    """Iterations already behind a run before its first own iteration (init.model_path)."""
    if config.init.model_path and config.init.continue_iteration:
        return read_checkpoint(config.init.model_path).iteration
    return 0


def segment_ends(config: PtyflowConfig, done_iteration: int) -> list[int]:
    """Global iterations at which the remaining segments end."""
    first = start_iteration(config)
    target = first + config.recon_params.iterations
    step = config.recon_params.segment_iterations
    ends = list(range(first + step, target, step)) + [target]
    return [e for e in ends if e > done_iteration]


def is_finished(config: PtyflowConfig, ckpt: Optional[Checkpoint]) -> bool:
    return ckpt is not None and not segment_ends(config, ckpt.iteration) and ckpt.batch_cursor == 0


def finished(run_dir: str | Path) -> bool:
    """True when the newest checkpoint has reached the configured number of iterations."""
    return is_finished(read_run_config(run_dir), newest_checkpoint(run_dir, warn=lambda m: None))


def link_newest(paths: RunPaths, checkpoint: Path) -> None:
    """Point run_dir/model.hdf5 at ``checkpoint`` atomically (hard link; copy where links fail)."""
    tmp = paths.model.with_name(f".model.hdf5.{os.getpid()}.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(checkpoint, tmp)
    except OSError:
        import shutil

        shutil.copyfile(checkpoint, tmp)
    os.replace(tmp, paths.model)


def checkpoint_summary(run_dir: str | Path) -> list[dict]:
    """Every checkpoint file with its iteration and whether it is valid (for inspect)."""
    rows = []
    for path in list_checkpoints(RunPaths(Path(run_dir)).checkpoints):
        try:
            ck = read_checkpoint(path)
            rows.append({"file": path.name, "iteration": ck.iteration, "batch_cursor": ck.batch_cursor, "valid": True,
                         "format_version": ck.format_version})
        except CheckpointError as exc:
            rows.append({"file": path.name, "valid": False, "reason": str(exc)})
    return rows
