"""The sweep flow: one reconstruct flow run per point, each in its own run directory.

With a server where the `reconstruct` deployment exists, every point is a child flow run sent to
the workers through run_deployment (Prefect's concurrency limits decide how many run at once);
otherwise (embedded mode) the points run one after the other as subflows. Finished points are
skipped, so rerunning a sweep completes only what is missing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from flows.reconstruct import reconstruct, resolve_config
from ptycho_core.rundir import finished, run_summary
from ptycho_core.sweep import load_sweep_spec, point_config, point_name, sweep_points, write_summary

RECONSTRUCT_DEPLOYMENT = "reconstruct/reconstruct"


def deployment_exists(name: str) -> bool:
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
            return True
        except ObjectNotFound:
            return False


def _wait_final(flow_run_ids: list, timeout_s: float) -> dict:
    """The flow runs once final, through Prefect's own wait (event-driven, bounded): a run still
    not final after ``timeout_s`` comes back as it stands (read_flow_run), not as a hang."""
    import asyncio

    from prefect.flow_runs import wait_for_flow_run

    async def wait_all():
        return await asyncio.gather(*(wait_for_flow_run(i, timeout=int(timeout_s)) for i in flow_run_ids),
                                    return_exceptions=True)

    finished = asyncio.run(wait_all())
    with get_client(sync_client=True) as client:
        return {i: run if not isinstance(run, BaseException) else client.read_flow_run(i)
                for i, run in zip(flow_run_ids, finished)}


@flow(name="sweep")
def sweep(base_config: Union[dict, str], spec: Union[dict, str], out_dir: str,
          deployment: Optional[str] = RECONSTRUCT_DEPLOYMENT) -> list[dict]:
    """Reconstruct every point of ``spec`` over ``base_config`` into ``out_dir/point_NNN_<hash>``.

    Each child run has an idempotency key made of this sweep run's id and the point: a sweep that
    Prefect reschedules after a preemption finds the children it had already submitted instead
    of submitting them again (a new sweep run, started by hand, resubmits what is unfinished)."""
    logger = get_run_logger()
    base = resolve_config(base_config)
    sweep_spec = load_sweep_spec(spec)
    points = sweep_points(sweep_spec)
    out = Path(out_dir).resolve()
    configs = [point_config(base, point) for point in points]  # every point is validated up front
    use_workers = bool(deployment) and deployment_exists(deployment)
    logger.info("sweep of %d points into %s (%s)", len(points), out,
                f"child runs of {deployment}" if use_workers else "subflows in this process")
    rows, submitted = [], {}
    for index, (point, cfg) in enumerate(zip(points, configs)):
        name = point_name(index, point)
        run_dir = out / name
        row = {"point": name, **point, "run_dir": str(run_dir), "state": "skipped (finished)"}
        rows.append(row)
        if run_dir.is_dir() and (run_dir / "config.yaml").is_file() and finished(run_dir):
            continue
        started = time.perf_counter()
        if use_workers:
            run = run_deployment(deployment, parameters={"config": cfg.to_dict(), "run_dir": str(run_dir)},
                                 flow_run_name=f"{out.name}-{name}", timeout=0, as_subflow=True,
                                 idempotency_key=f"ptyflow-sweep-{flow_run.id}-{name}")
            submitted[run.id] = row
        else:
            state = reconstruct(cfg.to_dict(), str(run_dir), return_state=True)
            row.update(state=state.name, seconds=time.perf_counter() - started)
    if submitted:
        for run_id, run in _wait_final(list(submitted), sweep_spec.wait_hours * 3600).items():
            seconds = (run.end_time - run.start_time).total_seconds() if run.start_time and run.end_time else None
            submitted[run_id].update(state=run.state.name, seconds=seconds, flow_run_id=str(run_id))
    for row in rows:
        try:
            summary = run_summary(row["run_dir"])
            row.update(iteration=summary["iteration"], final_loss=summary["final_loss"],
                       phase_pearson=summary.get("phase_pearson"))
        except Exception as exc:  # a failed point is reported in the table, not fatal to the sweep
            row.setdefault("error", str(exc))
    files = write_summary(out, rows, list(sweep_spec.parameters))
    table = [{k: (v if isinstance(v, (int, float, str)) or v is None else str(v)) for k, v in row.items()} for row in rows]
    create_table_artifact(table, description=f"sweep {out}: {files['csv']}, {files['figure']}")
    logger.info("sweep table %s, figure %s", files["csv"], files["figure"])
    return rows
