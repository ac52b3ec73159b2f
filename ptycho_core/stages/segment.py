"""Stage 2 of a run directory: one segment, from the newest valid checkpoint to a segment end."""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..checkpoint import checkpoint_name, last_value
from ..io.figures import write_figures
from ..io.preprocess import read_preprocessed
from ..scan_fit import describe_saved as describe_scan_fit
from ..devices import device_list, using_device
from ..ranks import helper_ranks
from ..reconstruction import Reconstruction
from ..rundir import (Preempted, RunDirError, RunPaths, link_newest, newest_checkpoint, read_run_config,
                      require_resumable, segment_ends)

log = logging.getLogger("ptyflow")


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
    figures: bool = True,
) -> SegmentOutcome:
    """Continue the run from its newest valid checkpoint up to ``to_iteration`` and checkpoint.

    If ``stop_requested()`` turns true, the current batch is finished, a checkpoint is written and
    ``Preempted`` is raised. ``figures``: False leaves figures/ alone whatever
    recon_params.segment_figures says (live mode's short segments publish a preview instead).
    """
    paths = RunPaths(Path(run_dir))
    config = read_run_config(run_dir)
    prep = read_preprocessed(paths.preprocessed)
    if prep is None:
        raise RunDirError(f"{paths.preprocessed}: missing or incomplete; run the preprocess step first")
    try:
        ckpt = newest_checkpoint(run_dir, warn)
        if ckpt is not None:  # refused before anything starts: an older file, other settings (named)
            require_resumable(ckpt, config, paths.config)
        devices = device_list(config.recon_params)
        with ExitStack() as ranks:
            ranks.enter_context(using_device(devices[0]))  # this thread's GPU, before anything touches CUDA
            helpers = None
            if len(devices) > 1:  # this process is rank 0 of several; the others start now
                helpers = ranks.enter_context(helper_ranks(
                    run_dir, to_iteration, ckpt.path if ckpt is not None else None, devices,
                    config.recon_params.threads, info))
            rec = Reconstruction.create(config, prep, device=devices[0],
                                        collective=helpers.collective if helpers is not None else None)
            info(rec.tier.reason)
            if ckpt is not None:
                rec.resume(ckpt)
            if helpers is not None:
                helpers.connect()
            first = rec.state.iteration
            started = time.perf_counter()
            stopped = rec.run(to_iteration, stop_requested=stop_requested, on_iteration=on_iteration, warn=warn)
            seconds = time.perf_counter() - started
        path = _write_checkpoint(paths, rec, warn)
        last_segment = not segment_ends(config, rec.state.iteration)
        # the last segment's figures would be redrawn by the export straight after
        if figures and config.recon_params.segment_figures and not stopped and not last_segment:
            view = rec.view()
            write_figures(paths.figures, view, prep.geometry.positions_px, describe_scan_fit(view.scan_fit))
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


def _write_checkpoint(paths: RunPaths, rec: Reconstruction, warn: Callable[[str], None]) -> Path:
    """rec's checkpoint under its iteration's name, and model.hdf5 pointed at it."""
    paths.checkpoints.mkdir(exist_ok=True)
    target = paths.checkpoints / checkpoint_name(rec.state.iteration, rec.state.batch_cursor)
    if target.exists():  # only a damaged file can sit here (valid ones are older): keep it aside
        aside = target.with_name(f"{target.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(target, aside)
        warn(f"moved the damaged checkpoint {target.name} aside to {aside.name}")
    path = rec.save(target)
    link_newest(paths, path)
    return path
