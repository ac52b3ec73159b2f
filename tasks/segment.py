"""Stage 2: one reconstruction segment, ending in a checkpoint.

The task runs in the flow's main thread so that it can own SIGTERM/SIGINT: a signal finishes
the current batch, writes a checkpoint and fails the task with "preempted at iteration N".
"""

import signal
import threading
from contextlib import contextmanager

from prefect import get_run_logger, task

from ptycho_core.checkpoint import last_value
from ptycho_core.rundir import run_segment
from tasks import progress


@contextmanager
def stop_on_signals():
    """Yield a flag dict; SIGTERM/SIGINT set it instead of killing the process."""
    flag = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals cannot be caught here; Prefect's own handling applies
        return

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@task(name="reconstruct-segment")
def reconstruct_segment(run_dir: str, to_iteration: int) -> dict:
    """Continue run_dir from its newest valid checkpoint to global iteration ``to_iteration``."""
    logger = get_run_logger()
    with stop_on_signals() as flag:
        outcome = run_segment(
            run_dir,
            to_iteration,
            stop_requested=lambda: flag["signal"] is not None,
            on_iteration=progress.iteration_done,
            warn=logger.warning,
            info=logger.info,
            signal_name=lambda: flag["signal"] or "signal",
        )
    logger.info(
        "iterations %d-%d: loss %.5g, %.3f s/iteration, checkpoint %s",
        outcome.first_iteration + 1, outcome.iteration, outcome.loss or float("nan"),
        outcome.seconds_per_iteration, outcome.checkpoint.name,
    )
    progress.segment_done(outcome)
    return {"iteration": outcome.iteration, "loss": outcome.loss, "seconds": outcome.seconds,
            "seconds_per_iteration": outcome.seconds_per_iteration, "checkpoint": str(outcome.checkpoint),
            "validation_loss": last_value(outcome.history_tail, "validation_loss")}
