"""Live mode's stages (`ptyflow run CONFIG --run-dir D --follow`): the run directory of a scan
that is still being written, followed a look at a time.

- ``prepare_live``: config.yaml and preprocessed.h5 for the planned scan, once its first rows
  exist (waiting for them), or the existing ones confirmed and brought up to date on a rerun.
- ``look``: the patterns completed since the last look added (io/live.extend), and what follows:
  go on, acquisition complete (every planned pattern, or a ``<data>.done`` marker, or nothing new
  for ``live.timeout_s``: the last two end short of the plan), or stopped.
- ``finish``: acquisition over: the whole-set steps refined, the file marked complete, and the
  iteration at which that happened recorded; the run then continues to that iteration plus
  ``recon_params.iterations`` over all patterns.

A scan that ends short of the plan is finished on what exists only with
``live.finish_incomplete``; otherwise ``AcquisitionStopped`` ends the run (exit code 7) with the
newest checkpoint kept, and a rerun of the same command continues following the file.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import h5py

from ..checkpoint import list_checkpoints
from ..config import ConfigError, PtyflowConfig, check_files
from ..io import live
from ..io.preprocess import read_preprocessed, settings_hash
from ..rundir import RunDirError, RunPaths, newest_checkpoint, read_run_config, require_same_config, start_iteration
from .prepare import _write_text_atomic, prepare

log = logging.getLogger("ptyflow")

COMPLETED_AT = "live_completed_at_iteration"  # preprocessed.h5 attribute


class AcquisitionStopped(RuntimeError):
    """The data file stopped growing before the planned scan was complete (and the config does
    not say to finish on what exists). Nothing is lost: the newest checkpoint is kept."""


@dataclass
class LiveState:
    """Where the acquisition stands, for the flow: ``acquired`` of ``planned`` patterns in
    preprocessed.h5, ``acquisition`` (acquiring, complete, ended short), ``completed_at``: the
    iteration reached when it was over (None while acquiring), ``changed_at``: time.time() of the
    last change seen in the data files, ``files``: their [name, size, mtime]."""

    acquired: int
    planned: int
    acquisition: str
    completed_at: Optional[int]
    changed_at: float
    files: list
    added: int = 0

    @property
    def acquiring(self) -> bool:
        return self.acquisition == live.ACQUIRING

    def as_dict(self) -> dict:
        return asdict(self)


def _refuse_unsupported(config: PtyflowConfig) -> None:
    if config.recon_params.validation_fraction:
        raise ConfigError("recon_params.validation_fraction: live mode (--follow) holds out no patterns yet; set it "
                          "to 0 or run without --follow once the file is complete")


def _state(paths: RunPaths, files: list, changed_at: float, added: int = 0) -> LiveState:
    acquisition, acquired, planned = live.acquisition_state(paths.preprocessed)
    with h5py.File(paths.preprocessed, "r") as f:
        completed = f.attrs.get(COMPLETED_AT)
    return LiveState(acquired, planned, acquisition, int(completed) if completed is not None else None,
                     changed_at, files, added)


def prepare_live(config: PtyflowConfig, run_dir: str | Path, warn: Callable[[str], None] = log.warning,
                 info: Callable[[str], None] = log.info, sleep: Callable[[float], None] = time.sleep) -> LiveState:
    """config.yaml and preprocessed.h5 of a live run, waiting (``live.poll_s`` at a time) until
    the first ``live.first_rows`` rows of the scan exist; AcquisitionStopped when the data file
    (or its absence) stays unchanged for ``live.timeout_s`` before that."""
    _refuse_unsupported(config)
    check_files(config)
    paths = RunPaths(Path(run_dir))
    existing = read_preprocessed(paths.preprocessed)
    if existing is not None and existing.acquired is None:
        raise RunDirError(f"{paths.preprocessed}: made from a finished file without --follow; rerun without --follow, "
                          "or use a new run directory")
    if existing is not None and existing.acquisition != live.ACQUIRING:
        prepare(config, run_dir, warn)  # a finished live run: the inputs are checked as for any run
        return _state(paths, live.data_files(config), time.time())
    if existing is not None:  # a live run stopped while acquiring: same settings, then catch up
        require_same_config(read_run_config(run_dir).resume_dict(), config, f"{paths.root} holds a reconstruction")
        if existing.settings_hash != settings_hash(config):
            raise RunDirError(f"{paths.preprocessed}: made with different preprocessing settings; use a new run "
                              "directory")
        _write_text_atomic(paths.config, config.to_yaml())
        files = live.data_files(config)
        found = live.extend(config, paths.preprocessed)
        info(f"live: {found.acquired} of {found.planned} planned patterns in preprocessed.h5 "
             f"(+{found.added} since the last run)")
        return _state(paths, files, time.time(), found.added)
    paths.root.mkdir(parents=True, exist_ok=True)
    remade = paths.preprocessed.exists()
    if remade:  # unreadable: a process killed (SIGKILL) while it added rows in place. The planned scan
        # and the first rows make the same file again, so the checkpoints still fit it
        aside = paths.preprocessed.with_name(f"{paths.preprocessed.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(paths.preprocessed, aside)
        warn(f"{paths.preprocessed.name} could not be read (a process killed while it added rows?): moved aside to "
             f"{aside.name}; it is made again from the data file")
    newest = newest_checkpoint(run_dir, warn=lambda message: None)
    if newest is not None and not remade:
        raise RunDirError(f"{paths.root}: holds checkpoints but no preprocessed.h5; use a new run directory")
    changed_at, files = time.time(), None
    while True:
        now_files = live.data_files(config) if Path(config.data.path).exists() else []
        if now_files != files:
            changed_at, files = time.time(), now_files
        if now_files:
            found = live.start(config, paths.preprocessed)
            if found is not None:
                break
        if time.time() - changed_at > config.live.timeout_s:
            what = "does not exist" if not now_files else "holds fewer than live.first_rows whole rows"
            raise AcquisitionStopped(
                f"acquisition stopped before it started: {config.data.path} {what} and has not changed for "
                f"{config.live.timeout_s:g} s (live.timeout_s); nothing was reconstructed")
        sleep(config.live.poll_s)
    _write_text_atomic(paths.config, config.to_yaml())
    info(f"live: started on {found.acquired} of {found.planned} planned patterns")
    return _state(paths, files, changed_at, found.added)


def look(config: PtyflowConfig, run_dir: str | Path, before: LiveState, iteration: int,
         info: Callable[[str], None] = log.info, warn: Callable[[str], None] = log.warning) -> LiveState:
    """Add the patterns completed since ``before`` and decide how the run goes on; ``iteration``:
    the one reached (recorded as the completion point when acquisition is over). Raises
    AcquisitionStopped when the scan ended short of the plan and live.finish_incomplete is off."""
    paths = RunPaths(Path(run_dir))
    files = live.data_files(config)
    found = live.extend(config, paths.preprocessed)
    changed_at = before.changed_at if files == before.files and not found.added else time.time()
    state = _state(paths, files, changed_at, found.added)
    if not state.acquiring:
        return state
    if found.complete:
        return finish(config, run_dir, iteration, ended_short=False, info=info, files=files)
    marker = live.marker_path(config)
    quiet_s = time.time() - changed_at
    if marker.exists() or quiet_s > config.live.timeout_s:
        why = (f"{marker.name} marks the scan done" if marker.exists()
               else f"{Path(config.data.path).name} has not changed for {quiet_s:.0f} s (live.timeout_s "
                    f"{config.live.timeout_s:g})")
        rows = _rows(config, found.acquired, found.planned)
        if not config.live.finish_incomplete:
            raise AcquisitionStopped(
                f"acquisition ended short: {why}, with {found.acquired} of {found.planned} planned patterns{rows}; "
                f"iteration {iteration} is checkpointed in {paths.root}; rerun the same command if the writer "
                "resumes, or set live.finish_incomplete: true to finish on what exists")
        warn(f"live: acquisition ended short ({why}) with {found.acquired} of {found.planned} planned "
             f"patterns{rows}; finishing on those (live.finish_incomplete)")
        return finish(config, run_dir, iteration, ended_short=True, info=info, files=files)
    return state


def _rows(config: PtyflowConfig, acquired: int, planned: int) -> str:
    grid = config.data.scan_shape or (config.experiment.scan.shape if config.experiment.scan else None)
    if grid is None or grid[0] * grid[1] != planned:
        return ""
    return f" ({acquired // grid[1]} of {grid[0]} rows)"


def finish(config: PtyflowConfig, run_dir: str | Path, iteration: int, ended_short: bool,
           info: Callable[[str], None] = log.info, files: Optional[list] = None) -> LiveState:
    """Acquisition over at ``iteration``: io/live.finish, and the completion point recorded."""
    paths = RunPaths(Path(run_dir))
    live.finish(config, paths.preprocessed, ended_short, info)
    with h5py.File(paths.preprocessed, "r+") as f:
        f.attrs[COMPLETED_AT] = int(iteration)
    state = _state(paths, files if files is not None else live.data_files(config), time.time())
    info(f"live: acquisition {state.acquisition} with {state.acquired} of {state.planned} planned patterns at "
         f"iteration {iteration}; {config.recon_params.iterations} iterations over all of them follow")
    return state


def final_iteration(config: PtyflowConfig, state: LiveState) -> int:
    """The iteration a live run ends at: recon_params.iterations past the completion point."""
    return (state.completed_at if state.completed_at is not None else start_iteration(config)) \
        + config.recon_params.iterations


def live_segment_ends(config: PtyflowConfig, state: LiveState, done: int) -> list[int]:
    """The segment ends still to run once acquisition is over (every segment_iterations from the
    completion point, and the final iteration)."""
    first = state.completed_at if state.completed_at is not None else start_iteration(config)
    target = final_iteration(config, state)
    step = config.recon_params.segment_iterations
    ends = list(range(first + step, target, step)) + [target]
    return [e for e in ends if e > done]



def is_live(run_dir: str | Path) -> bool:
    """Whether run_dir's preprocessed.h5 was made by a live run (its end follows the completion point)."""
    path = RunPaths(Path(run_dir)).preprocessed
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return "acquisition" in f.attrs
    except OSError:
        return False


def wait_for_data(config_path: str | Path, sleep: Callable[[float], None] = time.sleep) -> None:
    """Before a live run's config is completed: wait until its data file exists when the file may
    state part of the config (a Dectris master file's energy and pixel mask; a format told only
    by the file's content), so that nothing it states is missed; AcquisitionStopped after
    live.timeout_s without it. A file of a format that states nothing is waited for by the run
    itself, which meanwhile has its Prefect flow run and imports ready."""
    from ..config import LiveParams, read_config_file

    config_path = Path(config_path)
    raw = read_config_file(config_path)  # not validated yet: what the data file states may be missing
    settings = LiveParams(**(raw.get("live") or {}))
    data = raw.get("data") or {}
    path = Path(data.get("path") or "")
    path = path if path.is_absolute() else config_path.parent / path
    if path.exists() or not _may_state_calibration(path, data.get("format", "auto")):
        return
    started = time.time()
    while not path.exists():
        if time.time() - started > settings.timeout_s:
            raise AcquisitionStopped(f"acquisition stopped before it started: {path} did not appear within "
                                     f"{settings.timeout_s:g} s (live.timeout_s); nothing was reconstructed")
        sleep(settings.poll_s)


def _may_state_calibration(path: Path, name: str) -> bool:
    from ..io.formats import EXTENSIONS, READERS

    if name == "auto":
        name = EXTENSIONS.get(path.suffix.lower(), "")
        if any(fmt.among == name for fmt in READERS.values()):
            return True  # which format it is shows only in the file
    fmt = READERS.get(name)
    return fmt is None or fmt.calibration is not None


def drop_older_checkpoints(run_dir: str | Path, keep: int = 2) -> int:
    """Delete all but the ``keep`` newest checkpoints: while the scan is acquired a checkpoint ends
    every look (live.segment_iterations), and hundreds of them would fill the disk. Two are kept
    so that a damaged newest file still leaves one to resume from. Returns how many went."""
    files = list_checkpoints(RunPaths(Path(run_dir)).checkpoints)
    for old in files[:-keep] if len(files) > keep else []:
        old.unlink(missing_ok=True)
    return max(0, len(files) - keep)
