"""A trial of an adaptive sweep reports to its study between segments (see ptycho_core.tuning)."""

from prefect import task

from ptycho_core.stages.export import run_summary
from ptycho_core.tuning import report_segment


@task(name="report-to-trial")
def report_to_trial(trial: dict, run_dir: str, segment: dict) -> bool:
    """Report the run's objective after ``segment`` (reconstruct_segment's result) to its trial;
    True: the pruner stops the run. The segment's own numbers hold the validation loss; another
    objective (phase Pearson) reads the checkpoint the segment wrote and the ground truth."""
    summary = segment if segment.get(trial["objective"]) is not None else run_summary(run_dir)
    return report_segment(trial, summary, segment["iteration"])
