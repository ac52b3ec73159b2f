"""Stage 3: result.zarr and figures from the newest checkpoint."""

from prefect import get_run_logger, task

from ptycho_core.stages.export import export_run
from tasks import stopping


@task(name="export")
def export_results(run_dir: str) -> dict:
    with stopping.stage("the export"):
        summary = export_run(run_dir)
    get_run_logger().info("exported iteration %d to %s", summary["iteration"], summary["result"])
    return summary
