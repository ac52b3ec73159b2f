"""The reconstruct flow: preprocess, checkpointed segments, export. Re-running it on the same
run directory continues from the newest valid checkpoint; nothing finished is redone."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional, Union
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Crashed

from flows import send_core_logs_to_prefect
from flows.bookkeeping.tuning import report_to_trial
from ptycho_core.config import PtyflowConfig, check_files, config_from_dict
from ptycho_core.io.calibration import load_run_config
from ptycho_core.io.readers import check_data_path
from ptycho_core.rundir import newest_checkpoint, segment_ends, start_iteration
from ptycho_core.runlock import run_lock
from ptycho_core.stages.live import LiveState, final_iteration, is_live, live_segment_ends
from tasks import stopping
from tasks.export import export_results
from tasks.live import follow_acquisition
from tasks.preprocess import preprocess_data
from tasks.segment import reconstruct_segment


def resolve_config(config: Union[dict, str, PtyflowConfig]) -> PtyflowConfig:
    """A config file path (completed by what its data file states: a run starts here), a dict
    (relative paths from the working directory) or a model."""
    if isinstance(config, PtyflowConfig):
        return config
    if isinstance(config, (str, Path)):
        return load_run_config(config)
    from ptycho_core.config import resolve_paths

    return resolve_paths(config_from_dict(config), Path.cwd())


def with_devices(cfg: PtyflowConfig, devices) -> PtyflowConfig:
    """``cfg`` with recon_params.devices replaced (a setting a run may change when it resumes)."""
    if devices is None or devices == "":
        return cfg
    raw = cfg.to_dict()
    raw["recon_params"]["devices"] = devices
    return config_from_dict(raw, source="devices")


def close_abandoned_run(flow_run_id: str, holder: dict, run_dir: str, logger) -> None:
    """Mark Crashed the flow run of a process that died holding ``run_dir`` (SIGKILL, power loss).

    Nothing else would: a killed `ptyflow run` takes its embedded server down with it, and a
    worker that died too never reports the run, so it would show as Running forever."""
    with get_client(sync_client=True) as client:
        try:
            abandoned = client.read_flow_run(UUID(flow_run_id))
        except (ObjectNotFound, ValueError):
            return  # recorded by another server, or not an id
        if abandoned.state is None or abandoned.state.is_final():
            return
        reason = (f"its process (host {holder.get('host')}, PID {holder.get('pid')}) died holding {run_dir}; "
                  f"flow run {flow_run.id} continues from the last checkpoint")
        client.set_flow_run_state(abandoned.id, Crashed(message=reason), force=True)
    logger.warning("marked flow run %s (%s) Crashed: %s", abandoned.name, flow_run_id, reason)


def run_name(kind: str, path: str) -> str:
    """A flow run's name: what it does and the last two parts of its folder, e.g.
    "reconstruct study/trial_003_1a2b" (given to child runs when submitted, and the name the
    flow itself takes when started another way)."""
    path = Path(path).absolute()
    return f"{kind} {path.parent.name}/{path.name}"


def named_after(kind: str, parameter: str):
    """A flow's flow_run_name: run_name of its own path parameter."""
    return lambda: run_name(kind, str(flow_run.parameters[parameter]))


def child_run_key(scope: str, run_dir: Union[str, Path], config: PtyflowConfig) -> str:
    """The idempotency key of a reconstruct child run.

    Prefect hands back the run already created under a key (per flow, for as long as the server
    keeps that run), so the key names everything that makes the work distinct: the absolute run
    directory, the resolved config (its sha256, data.path included) and ``scope``, what else the
    submitter needs told apart (the parent sweep run, the trial, the dataset's attempt). Equal
    inputs give the key again, so a parent that Prefect reschedules finds what it had submitted.
    A sha256 of the three, 72 characters whatever the paths: Prefect sets no limit on a key, but a
    PostgreSQL server's unique index on it refuses entries over about 2.7 kB."""
    named = json.dumps([scope, str(Path(run_dir).resolve()), config.hash()])
    return f"ptyflow-{hashlib.sha256(named.encode()).hexdigest()}"


def submit_reconstruct(deployment: str, config: PtyflowConfig, run_dir: Union[str, Path], scope: str, **parameters):
    """Send one reconstruct run to the workers as a child run of the calling flow, without waiting
    for it (the caller waits, or records its id), under child_run_key(scope, run_dir, config).
    Returns Prefect's FlowRun."""
    from prefect.deployments import run_deployment

    return run_deployment(deployment, parameters={"config": config.to_dict(), "run_dir": str(run_dir), **parameters},
                          flow_run_name=run_name("reconstruct", run_dir), timeout=0, as_subflow=True,
                          idempotency_key=child_run_key(scope, run_dir, config))


@flow(name="reconstruct", flow_run_name=named_after("reconstruct", "run_dir"))
def reconstruct(config: Union[dict, str], run_dir: str, devices: Union[int, str, list[int], None] = None,
                trial: Optional[dict] = None, follow: bool = False) -> dict:
    """Reconstruct one dataset into ``run_dir`` (see the run-directory contract in README).
    ``devices``: instead of the config's recon_params.devices (the whole-node deployment gives
    every run all of the node's GPUs). ``trial``: this run is a trial of an optuna sweep
    (flows.bookkeeping.tuning.TrialLink); it reports its objective after every segment and ends
    early, exported, when the study's pruner stops it (the summary then has pruned_at_iteration).
    ``follow``: live mode, the data file is still being written (tasks/live.py); a run directory
    that a live run started is followed whatever ``follow`` says."""
    send_core_logs_to_prefect()
    with stopping.owned("Prefect's calls"):
        logger = get_run_logger()
        cfg = with_devices(resolve_config(config), devices)
        run_dir = str(Path(run_dir).resolve())
        if not follow:  # a live run waits for its data file (tasks/live.py)
            check_data_path(cfg.data)
        check_files(cfg)
        me = {"flow_run_id": str(flow_run.id)} if flow_run.id else {}
        with run_lock(run_dir, owner=me) as stale:
            if stale.get("flow_run_id") and stale["flow_run_id"] != me.get("flow_run_id"):
                close_abandoned_run(stale["flow_run_id"], stale, run_dir, logger)
            clock = time.perf_counter()
            live = follow or is_live(run_dir)
            if live:  # preprocessing, and iterations while the scan is acquired
                acquisition = LiveState(**follow_acquisition(cfg.to_dict(), run_dir))
            else:
                preprocess_data(cfg.to_dict(), run_dir)
            stage_seconds = {"preprocess": time.perf_counter() - clock, "iterations": 0.0, "segments": 0.0,
                             "trial_reports": 0.0}
            newest = newest_checkpoint(run_dir, warn=logger.warning)
            done = newest.iteration if newest else start_iteration(cfg)
            ends = live_segment_ends(cfg, acquisition, done) if live else segment_ends(cfg, done)
            target = final_iteration(cfg, acquisition) if live else start_iteration(cfg) + cfg.recon_params.iterations
            logger.info("run %s: at iteration %d of %d, %d segment(s) to go", run_dir, done, target, len(ends))
            progress_id = create_progress_artifact(100.0 * done / target, description=f"iterations of {run_dir}")
            pruned_at = None
            for end in ends:
                clock = time.perf_counter()
                segment = reconstruct_segment(run_dir, end)
                stage_seconds["segments"] += time.perf_counter() - clock
                stage_seconds["iterations"] += segment["seconds"]
                update_progress_artifact(progress_id, 100.0 * end / target)
                clock = time.perf_counter()
                stop = trial is not None and end < target and report_to_trial(trial, run_dir, segment)
                stage_seconds["trial_reports"] += time.perf_counter() - clock
                if stop:
                    pruned_at = end
                    logger.info("trial %s pruned at iteration %d: its score is worse than the study's other trials",
                                trial["trial_number"], end)
                    break
            clock = time.perf_counter()
            summary = export_results(run_dir)
            stage_seconds["export"] = time.perf_counter() - clock
            # where the flow's time went: iterations, and the rest of each segment (its set-up, reading
            # and writing checkpoints, figures); benchmarks/run.py --user-path reads it
            summary.update(pruned_at_iteration=pruned_at, stage_seconds=stage_seconds)
            if live:  # a scan that ended short says so wherever the summary goes
                summary["acquisition"] = (f"{acquisition.acquisition}: {acquisition.acquired} of "
                                          f"{acquisition.planned} planned patterns")
        previews = summary.pop("previews")  # PNG bytes for the artifact, not part of what the flow returns
        _publish(run_dir, summary, previews)
    return summary


def _publish(run_dir: str, summary: dict, previews: dict[str, bytes]) -> None:
    """The run's summary table and its results (inline previews, links) as Prefect artifacts."""
    table = {k: [v] for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None}
    create_table_artifact(table, description=f"summary of {run_dir}")
    links = "\n".join(f"- [{Path(p).name}](file://{p})" for p in summary["figures"])
    create_markdown_artifact(
        f"## Reconstruction of {run_dir}\n\nIteration {summary['iteration']}, final loss "
        f"{summary['final_loss']:.5g}.\n\n{_inline_images(previews)}\n\n"
        f"- result: [{summary['result']}](file://{summary['result']})\n{links}\n",
        description=f"results of {run_dir}",
    )


def _inline_images(previews: dict[str, bytes]) -> str:
    """The export's small PNGs (phase, loss curve) inside the markdown: file links open only on
    the machine that holds the run directory, the artifact opens wherever the UI does."""
    import base64

    return " ".join(f"![{name}](data:image/png;base64,{base64.b64encode(png).decode()})"
                    for name, png in previews.items())
