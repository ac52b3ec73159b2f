"""Stage 2: one reconstruction segment, ending in a checkpoint.

The task runs in the flow's main thread so that it can own SIGTERM/SIGINT: a signal finishes
the current batch, writes a checkpoint and fails the task with "preempted at iteration N"
(tasks.stopping).
"""

from prefect import get_run_logger, task

from ptycho_core.checkpoint import last_value
from ptycho_core.stages.segment import run_segment
from tasks import progress, stopping


@task(name="reconstruct-segment")
def reconstruct_segment(run_dir: str, to_iteration: int) -> dict:
    """Continue run_dir from its newest valid checkpoint to global iteration ``to_iteration``."""
    logger = get_run_logger()
    with stopping.stage("the iterations"), stopping.deferred() as requested:
        outcome = run_segment(
            run_dir,
            to_iteration,
            stop_requested=lambda: requested() is not None,
            on_iteration=progress.iteration_done,
            warn=logger.warning,
            info=logger.info,
            signal_name=lambda: requested() or "signal",
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
