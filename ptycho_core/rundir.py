"""The run directory: the contract that resume relies on.

  <run_dir>/config.yaml                 the fully resolved configuration
  <run_dir>/preprocessed.h5             measurements as the model uses them, positions, calibration
  <run_dir>/checkpoints/iter_NNNNNN.h5  model.hdf5 after N iterations (iter_NNNNNN_bBBBB.h5: B batches
                                        into iteration N+1, written when a run was preempted)
  <run_dir>/model.hdf5                  the newest checkpoint (a hard link to it)
  <run_dir>/result.zarr, figures/       the export
  <run_dir>/.lock                       host and PID of the process working on it

Everything here is plain Python + torch; the Prefect tasks call these functions.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import yaml

from .checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write,
    checkpoint_name,
    last_value,
    latest_valid_checkpoint,
    leftover_temporaries,
    list_checkpoints,
    read_checkpoint,
    require_current_format,
)
from .config import PtyflowConfig, check_files, config_from_dict
from .distributed import device_list, helper_ranks, using_device
from .io.preprocess import check_inputs, preprocess, read_preprocessed
from .io.readers import DataError
from .reconstruction import Reconstruction

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


# --------------------------------------------------------------------------- lock
@contextmanager
def run_lock(run_dir: str | Path, owner: Optional[dict] = None) -> Iterator[dict]:
    """Hold the run directory for this process; a second holder is refused with host and PID.

    An flock on .lock is released by the kernel however the holder dies (SIGKILL included); the
    file's content tells who holds it (host, PID, start time, plus ``owner``, e.g. the flow run).
    A leftover content whose process is gone is a stale lock: it is taken over with a warning.
    Yields that stale holder's record ({} when the last holder let go normally), so the caller
    can close whatever the dead holder left open.
    """
    paths = RunPaths(Path(run_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = _read_holder(paths.lock)
            raise RunDirError(
                f"{paths.root} is in use by host {holder.get('host', '?')} PID {holder.get('pid', '?')} "
                f"(since {holder.get('since', '?')}); wait for it to finish or use another run directory"
            ) from None
        previous = _read_holder(paths.lock)
        if previous and previous.get("host") == socket.gethostname() and previous.get("pid") == os.getpid():
            previous = {}  # this process's own record, not a dead holder's
        if previous:
            log.warning(
                "taking over the stale lock of %s left by host %s PID %s (that process is gone)",
                paths.root, previous.get("host"), previous.get("pid"),
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              **(owner or {})}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        try:
            yield previous
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


def lock_holder(run_dir: str | Path) -> tuple[Optional[dict], Optional[dict]]:
    """(holder, stale): the record of the living process holding the run directory, or None; and
    the record a dead holder left in .lock (a SIGKILLed run), or None. Decided by the flock
    itself, not by the file's text, which outlives a killed process."""
    path = RunPaths(Path(run_dir)).lock
    if not path.is_file():
        return None, None
    record = _read_holder(path) or None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return record or {}, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None, record
    finally:
        os.close(fd)


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------- configuration
def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def read_run_config(run_dir: str | Path) -> PtyflowConfig:
    path = RunPaths(Path(run_dir)).config
    if not path.is_file():
        raise RunDirError(f"{path}: missing; the run directory was never preprocessed")
    return config_from_dict(yaml.safe_load(path.read_text()), source=str(path))


# --------------------------------------------------------------------------- stages
@dataclass
class PrepareOutcome:
    skipped: bool
    n_patterns: int
    window: tuple[int, int]
    dx_ang: float
    dk_mrad: float
    input_hash: str
    notes: dict = field(default_factory=dict)
    input_check: str = ""  # how the inputs were checked against the record (for the log)


def prepare(config: PtyflowConfig, run_dir: str | Path, warn: Callable[[str], None] = log.warning
            ) -> PrepareOutcome:
    """Write config.yaml and preprocessed.h5, or confirm that the existing ones match.

    A run directory that holds a different input or a different configuration is refused
    (naming what differs) so that two reconstructions never mix in one place; so is one whose
    checkpoints an older ptyflow wrote (checkpoint.require_current_format says what to do).
    """
    check_files(config)  # a missing starting model is named as such, not as "a different configuration"
    paths = RunPaths(Path(run_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    newest = newest_checkpoint(run_dir, warn=lambda message: None)  # the segment warns about damaged files
    if newest is not None:  # a directory an older ptyflow wrote: that is what to say, not what differs
        require_current_format(newest)
    if paths.config.is_file():
        old = read_run_config(run_dir)
        changed = _differences(old.resume_dict(), config.resume_dict())
        if changed:
            raise RunDirError(
                f"{paths.root} holds a reconstruction with a different configuration "
                f"({', '.join(changed[:6])}{' ...' if len(changed) > 6 else ''} differ); use a new run directory"
            )
    existing = read_preprocessed(paths.preprocessed)
    if existing is not None:
        try:
            input_check = check_inputs(config, existing)
        except DataError as exc:
            raise RunDirError(f"{paths.preprocessed} does not match this run's input ({exc}): different input "
                              "data; use a new run directory") from None
        prep, skipped = existing, True
    else:
        # a process killed while preprocessing leaves its partial file (as large as the data): the
        # caller holds the run directory, so no living process is writing these
        for leftover in leftover_temporaries(paths.preprocessed):
            leftover.unlink()
            warn(f"removed {leftover.name}, left by a preprocessing that did not finish")
        prep, skipped = preprocess(config, paths.preprocessed), False
        input_check = "input hashed while it was preprocessed"
    # config.yaml is (re)written so iterations and other free settings reflect the latest run
    _write_text_atomic(paths.config, config.to_yaml())
    return PrepareOutcome(skipped, prep.n_patterns, prep.window, prep.dx_ang, prep.dk_mrad,
                          prep.input_hash, prep.notes, input_check)


def _write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


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


@dataclass
class SegmentOutcome:
    first_iteration: int
    iteration: int
    checkpoint: Path
    seconds: float
    seconds_per_iteration: float
    loss: Optional[float]
    history_tail: dict[str, list[float]] = field(default_factory=dict)


def run_segment(
    run_dir: str | Path,
    to_iteration: int,
    stop_requested: Callable[[], bool] = lambda: False,
    on_iteration: Optional[Callable] = None,
    warn: Callable[[str], None] = log.warning,
    signal_name: Callable[[], str] = lambda: "signal",
    info: Callable[[str], None] = log.info,
) -> SegmentOutcome:
    """Continue the run from its newest valid checkpoint up to ``to_iteration`` and checkpoint.

    If ``stop_requested()`` turns true, the current batch is finished, a checkpoint is written and
    ``Preempted`` is raised.
    """
    paths = RunPaths(Path(run_dir))
    config = read_run_config(run_dir)
    prep = read_preprocessed(paths.preprocessed)
    if prep is None:
        raise RunDirError(f"{paths.preprocessed}: missing or incomplete; run the preprocess step first")
    try:
        ckpt = newest_checkpoint(run_dir, warn)
        if ckpt is not None:  # an older ptyflow's file is refused as such, before anything starts
            require_current_format(ckpt)
        if ckpt is not None and ckpt.config_hash != config.resume_hash():
            raise RunDirError(
                f"{ckpt.path}: written with a different configuration than {paths.config}; "
                "use a new run directory"
            )
        devices = device_list(config.recon_params)
        with ExitStack() as ranks:
            ranks.enter_context(using_device(devices[0]))  # this thread's GPU, before anything touches CUDA
            collective = None
            if len(devices) > 1:  # this process is rank 0 of several; the others start now
                collective = ranks.enter_context(helper_ranks(
                    run_dir, to_iteration, ckpt.path if ckpt is not None else None, devices,
                    config.recon_params.threads, info))
            rec = Reconstruction.create(config, prep, device=devices[0], collective=collective)
            info(rec.tier.reason)
            if ckpt is not None:
                rec.resume(ckpt)
            if collective is not None:
                collective.connect()
            first = rec.state.iteration
            started = time.perf_counter()
            stopped = rec.run(to_iteration, stop_requested=stop_requested, on_iteration=on_iteration, warn=warn)
            seconds = time.perf_counter() - started
        paths.checkpoints.mkdir(exist_ok=True)
        target = paths.checkpoints / checkpoint_name(rec.state.iteration, rec.state.batch_cursor)
        if target.exists():  # only a damaged file can sit here (valid ones are older): keep it aside
            aside = target.with_name(f"{target.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(target, aside)
            warn(f"moved the damaged checkpoint {target.name} aside to {aside.name}")
        path = rec.save(target)
        link_newest(paths, path)
        last_segment = not segment_ends(config, rec.state.iteration)
        # the last segment's figures would be redrawn by the export straight after
        if config.recon_params.segment_figures and not stopped and not last_segment:
            from .io.figures import write_figures

            write_figures(paths.figures, rec.view(), prep.geometry.positions_px)
        if stopped or stop_requested():  # a signal in the segment's last batch still ends the run here
            raise Preempted(rec.state.iteration, rec.state.batch_cursor, path, signal_name())
        n_done = max(1, rec.state.iteration - first)
        history = rec.state.history
        return SegmentOutcome(
            first_iteration=first,
            iteration=rec.state.iteration,
            checkpoint=path,
            seconds=seconds,
            seconds_per_iteration=seconds / n_done,
            loss=last_value(history, "loss"),
            history_tail={k: v[-(rec.state.iteration - first):] for k, v in history.items()},
        )
    finally:
        prep.measurements.close()  # the next segment or a rerun opens it afresh


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


def finished(run_dir: str | Path) -> bool:
    """True when the newest checkpoint has reached the configured number of iterations."""
    return is_finished(read_run_config(run_dir), newest_checkpoint(run_dir, warn=lambda m: None))


def is_finished(config: PtyflowConfig, ckpt: Optional[Checkpoint]) -> bool:
    return ckpt is not None and not segment_ends(config, ckpt.iteration) and ckpt.batch_cursor == 0


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


# --------------------------------------------------------------------------- export and quality
def export_run(run_dir: str | Path, figures: bool = True) -> dict:
    """Write result.zarr (and figures) from the newest valid checkpoint; returns a summary
    (previews: {name: PNG bytes} of the phase and the loss curve)."""
    from .checkpoint import software_versions
    from .io.export import write_result
    from .io.figures import thumbnail_pngs, write_figures

    paths = RunPaths(Path(run_dir))
    config = read_run_config(run_dir)
    prep = read_preprocessed(paths.preprocessed)
    ckpt = newest_checkpoint(run_dir)
    if ckpt is None or prep is None:
        raise RunDirError(f"{paths.root}: nothing to export (no valid checkpoint or preprocessed data)")
    summary = run_summary(run_dir, ckpt, prep, config)
    timings = {k: summary[k] for k in ("iterations", "seconds_in_iterations", "median_seconds_per_iteration")}
    write_result(paths.result, ckpt, prep.positions_ang, prep.geometry.positions_px, prep.energy_kev,
                 config.to_dict(), software_versions(), timings)
    figure_paths = write_figures(paths.figures, ckpt, prep.geometry.positions_px) if figures else []
    # small PNGs of the phase and the loss, drawn from the checkpoint already read, for the
    # Prefect artifact (which embeds them: its file links open only where the run directory is)
    summary.update(result=str(paths.result), figures=[str(p) for p in figure_paths],
                   previews=thumbnail_pngs(ckpt) if figures else {})
    return summary


def run_summary(run_dir: str | Path, ckpt: Optional[Checkpoint] = None, prep=None,
                config: Optional[PtyflowConfig] = None) -> dict:
    """Iteration, final loss, timings and (for simulated data) quality of a run directory."""
    paths = RunPaths(Path(run_dir))
    config = config or read_run_config(run_dir)
    prep = prep or read_preprocessed(paths.preprocessed)
    ckpt = ckpt or newest_checkpoint(run_dir, warn=lambda m: None)
    if ckpt is None or prep is None:
        raise RunDirError(f"{paths.root}: no valid checkpoint or preprocessed data yet")
    seconds = ckpt.history.get("seconds", [])
    summary = {
        "run_dir": str(paths.root),
        "iteration": ckpt.iteration,
        "final_loss": last_value(ckpt.history, "loss"),
        # recon_params.validation_fraction: the score on held-out patterns, and where it was lowest
        "validation_loss": last_value(ckpt.history, "validation_loss"),
        "best_validation_loss": min(ckpt.history["validation_loss"]) if ckpt.history.get("validation_loss") else None,
        "iterations": len(seconds),
        "seconds_in_iterations": float(sum(seconds)),
        "median_seconds_per_iteration": float(sorted(seconds)[len(seconds) // 2]) if seconds else 0.0,
    }
    summary.update(quality_vs_truth(run_dir, ckpt, prep, config))
    return summary


def quality_vs_truth(run_dir, ckpt: Checkpoint, prep, config: PtyflowConfig) -> dict:
    """Phase Pearson against the ground truth, when the data file carries one (simulated data)."""
    from .reconstruction import phase_pearson, scanned_field_mask
    from .simulate import read_ground_truth

    try:
        truth = read_ground_truth(config.data.path)
    except OSError:
        return {}
    objp = ckpt.tensors["objp"].numpy()[0]
    if "objp" not in truth or truth["objp"][0].shape[1:] != objp.shape[1:]:
        return {}  # another canvas (other pixel size or padding): no pixel-to-pixel comparison
    true_phase = truth["objp"][0]
    mask = scanned_field_mask(prep.geometry.positions_px, prep.geometry.canvas_shape)
    per_slice = ([phase_pearson(objp[z], true_phase[z], mask) for z in range(objp.shape[0])]
                 if true_phase.shape == objp.shape else [])
    return {"phase_pearson": phase_pearson(objp.sum(0), true_phase.sum(0), mask), "phase_pearson_per_slice": per_slice}
