"""Stage 1: data in the run directory as the model uses it."""

from dataclasses import asdict

from prefect import get_run_logger, task

from ptycho_core.config import config_from_dict
from ptycho_core.stages.prepare import prepare
from tasks import stopping


@task(name="preprocess")
def preprocess_data(config: dict, run_dir: str) -> dict:
    """Write run_dir/config.yaml and preprocessed.h5, or confirm the existing ones (skipped)."""
    logger = get_run_logger()
    with stopping.stage("preprocessing"):
        outcome = prepare(config_from_dict(config), run_dir, warn=logger.warning)
    verb = "reused" if outcome.skipped else "wrote"
    logger.info(
        "%s preprocessed.h5: %d patterns of %dx%d, dx %.4f Å, dk %.4f mrad, bright-field disk radius %.1f px",
        verb, outcome.n_patterns, *outcome.window, outcome.dx_ang, outcome.dk_mrad,
        outcome.notes.get("bf_disk_radius_px", float("nan")),
    )
    logger.info(outcome.input_check)
    if "dk_mrad_measured" in outcome.notes:
        logger.info("dk measured from the bright-field disk: %.4f mrad/px", outcome.notes["dk_mrad_measured"])
    return asdict(outcome)
