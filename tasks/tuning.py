"""A trial of an adaptive sweep reports to its study between segments (see ptycho_core.tuning)."""

from prefect import task

from ptycho_core.rundir import run_summary
from ptycho_core.tuning import report_segment


@task(name="report-to-trial")
def report_to_trial(trial: dict, run_dir: str, iteration: int) -> bool:
    """Report the run's objective at ``iteration`` to its trial; True: the pruner stops the run."""
    return report_segment(trial, run_summary(run_dir), iteration)
