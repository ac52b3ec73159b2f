"""Live mode (`ptyflow run --follow`): iterate on the rows acquired so far, look for new ones
after every short segment and publish a preview, until acquisition is over.

One task for the whole acquisition, not one per look: a scan of hundreds of looks would
otherwise make hundreds of task runs, which back up Prefect's embedded server. The iterations
inside it stop on SIGTERM/SIGINT as a segment task's do (tasks.stopping): batch finished,
checkpoint written, rundir.Preempted.
"""

from __future__ import annotations

import base64
import hashlib
import time
from pathlib import Path
from typing import Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from ptycho_core.checkpoint import read_checkpoint
from ptycho_core.config import config_from_dict
from ptycho_core.io.figures import thumbnail_pngs
from ptycho_core.rundir import newest_checkpoint
from ptycho_core.stages.live import LiveState, drop_older_checkpoints, look, prepare_live
from ptycho_core.stages.segment import run_segment
from tasks import progress, stopping


def preview_key(run_dir: str) -> str:
    """The preview artifact's key: one per run directory, so the UI shows its history."""
    return f"live-preview-{hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]}"


@task(name="follow-acquisition")
def follow_acquisition(config: dict, run_dir: str) -> dict:
    """Iterate while the scan is acquired; returns the LiveState (as a dict) once it is over."""
    logger = get_run_logger()
    cfg = config_from_dict(config)
    with stopping.stage("the wait for the first rows"):
        state = prepare_live(cfg, run_dir, warn=logger.warning, info=logger.info)
    progress_id: Optional[object] = None
    while state.acquiring:
        newest = newest_checkpoint(run_dir, warn=logger.warning)
        done = newest.iteration if newest else 0
        with stopping.stage("the iterations"), stopping.deferred() as requested:
            outcome = run_segment(run_dir, done + cfg.live.segment_iterations,
                                  stop_requested=lambda: requested() is not None,
                                  on_iteration=progress.iteration_done, warn=logger.warning, info=logger.info,
                                  signal_name=lambda: requested() or "signal", figures=False)
        progress.segment_done(outcome)
        drop_older_checkpoints(run_dir)
        with stopping.stage("the live preview"):
            progress_id = _publish_preview(run_dir, state, outcome, progress_id)
        logger.info("live preview: %d of %d patterns acquired, iteration %d", state.acquired, state.planned,
                    outcome.iteration)
        with stopping.stage("the look for new rows"):
            state = look(cfg, run_dir, state, outcome.iteration, info=logger.info, warn=logger.warning)
    return state.as_dict()


def _publish_preview(run_dir: str, state: LiveState, outcome, progress_id):
    """The object phase and the loss so far (one markdown artifact under a stable key) and the
    progress artifact (patterns acquired, iterations done)."""
    pngs = thumbnail_pngs(read_checkpoint(outcome.checkpoint), min_px=240)
    images = " ".join(f"![{name}](data:image/png;base64,{base64.b64encode(png).decode()})"
                      for name, png in pngs.items())
    where = f"{state.acquired} of {state.planned} patterns acquired, iteration {outcome.iteration}"
    create_markdown_artifact(
        f"## Live preview of {run_dir}\n\n{where}, loss {outcome.loss or float('nan'):.5g} "
        f"({time.strftime('%H:%M:%S')}).\n\n{images}\n",
        key=preview_key(run_dir), description=f"live preview: {where}")
    fraction = 100.0 * state.acquired / max(1, state.planned)
    if progress_id is None:
        return create_progress_artifact(fraction, description=f"acquisition of {run_dir}: {where}")
    update_progress_artifact(progress_id, fraction, description=f"acquisition of {run_dir}: {where}")
    return progress_id
