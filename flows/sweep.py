"""The sweep flow: one reconstruct flow run per point, each in its own run directory.

With ``deployment`` named (the default, the `reconstruct` deployment), every point is a child flow
run sent to the workers through run_deployment (Prefect's concurrency limits decide how many run
at once); a server without that deployment is an error, never a silent fallback. With
``deployment=None`` the points run one after the other as subflows in this process (embedded
mode, `ptyflow sweep --inline`). Finished points are skipped, so rerunning a sweep completes only
what is missing.

Mode optuna asks an Optuna study for the points instead (flows.bookkeeping.tuning): each trial is a
reconstruct run that reports its objective at its segment ends, where the study's pruner may stop
it; a rerun continues the study in its database.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.runtime import flow_run

from flows import send_core_logs_to_prefect
from flows.bookkeeping import tuning
from flows.bookkeeping.sweeps import SweepSpec, load_sweep_spec, point_config, point_name, sweep_points, write_summary
from flows.reconstruct import named_after, reconstruct, resolve_config, submit_reconstruct
from ptycho_core.config import ConfigError, PtyflowConfig
from ptycho_core.rundir import Preempted, finished
from ptycho_core.stages.export import run_summary
from tasks import stopping

if TYPE_CHECKING:
    import optuna

RECONSTRUCT_DEPLOYMENT = "reconstruct/reconstruct"


def checked_deployment(deployment: Optional[str]) -> Optional[str]:
    """``deployment`` once the server is seen to have it; None (run in this process) stays None.

    A missing deployment is a ConfigError naming it: after a typo, or against a server where
    nothing was deployed, running every reconstruction on the control process instead (CPU
    reconstructions on a small control worker) would go unnoticed."""
    if not deployment:
        return None
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if deployment.count("/") != 1:
        raise ConfigError(f"deployment {deployment!r}: expected <flow name>/<deployment name>, "
                          f"e.g. {RECONSTRUCT_DEPLOYMENT}")
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(deployment)
            return deployment
        except ObjectNotFound:
            pass
    raise ConfigError(
        f"deployment {deployment!r} not found on the Prefect server {PREFECT_API_URL.value() or ''}: deploy it "
        "(PTYFLOW_WORKDIR=<repository> prefect deploy --prefect-file deployments/prefect.yaml --all, see README, "
        "'Under a Prefect server and workers'), or run the reconstructions in this process (deployment: null, "
        "`ptyflow sweep --inline`)")


STOP_CHECK_S = 5  # how often a wait for child runs looks whether this process is being stopped


def _wait_final(flow_run_ids: list, timeout_s: float) -> dict:
    """The flow runs once final, through Prefect's own wait (event-driven, bounded): a run still
    not final after ``timeout_s`` comes back as it stands (read_flow_run), not as a hang.

    The wait is cut into STOP_CHECK_S pieces, so that a signal to this process (tasks.stopping)
    also ends the waits of optuna's trial threads, which no signal reaches: the process exits
    within seconds and the child runs go on on their workers (a rerun waits for them)."""
    import asyncio

    from prefect.exceptions import FlowRunWaitTimeout
    from prefect.flow_runs import wait_for_flow_run

    async def wait_one(flow_run_id):
        deadline = time.monotonic() + timeout_s
        while True:
            stopping.check()
            piece = min(STOP_CHECK_S, deadline - time.monotonic())
            try:
                return await wait_for_flow_run(flow_run_id, timeout=max(1, int(piece)))
            except FlowRunWaitTimeout:
                if time.monotonic() >= deadline:
                    raise

    async def wait_all():
        return await asyncio.gather(*(wait_one(i) for i in flow_run_ids), return_exceptions=True)

    finished = asyncio.run(wait_all())
    stopped = next((run for run in finished if isinstance(run, stopping.Stopped)), None)
    if stopped is not None:
        raise stopped
    with get_client(sync_client=True) as client:
        return {i: run if not isinstance(run, BaseException) else client.read_flow_run(i)
                for i, run in zip(flow_run_ids, finished)}


@flow(name="sweep", flow_run_name=named_after("sweep", "out_dir"))
def sweep(base_config: Union[dict, str], spec: Union[dict, str], out_dir: str,
          deployment: Optional[str] = RECONSTRUCT_DEPLOYMENT) -> list[dict]:
    """Reconstruct every point of ``spec`` over ``base_config`` into ``out_dir/point_NNN_<hash>``:
    as child runs of ``deployment``, or in this process when it is None.

    Each child run's idempotency key names this sweep run, the point's run directory and its
    config: a sweep that Prefect reschedules after a preemption finds the children it had already
    submitted instead of submitting them again (a new sweep run, started by hand, resubmits what is
    unfinished). A point preempted in this process stops the sweep (rundir.Preempted); the rerun
    resumes that point."""
    send_core_logs_to_prefect()
    with stopping.owned("the sweep"):
        base = resolve_config(base_config)
        sweep_spec = load_sweep_spec(spec)
        out = Path(out_dir).resolve()
        deployment = checked_deployment(deployment)
        if sweep_spec.mode == "optuna":
            return tune(base, sweep_spec, out, deployment)
        return grid(base, sweep_spec, out, deployment)


def grid(base, spec: SweepSpec, out: Path, deployment: Optional[str]) -> list[dict]:
    """Modes grid and list: every point of ``spec``, skipping finished ones; as child runs of
    ``deployment`` (all submitted, then waited for) or one after the other in this process."""
    logger = get_run_logger()
    points = sweep_points(spec)
    configs = [point_config(base, point) for point in points]  # every point is validated up front
    logger.info("sweep of %d points into %s (%s)", len(points), out,
                f"child runs of {deployment}" if deployment else "subflows in this process")
    rows, submitted = [], {}
    for index, (point, cfg) in enumerate(zip(points, configs)):
        name = point_name(index, point)
        run_dir = out / name
        row = {"point": name, **point, "run_dir": str(run_dir), "state": "skipped (finished)"}
        rows.append(row)
        if run_dir.is_dir() and (run_dir / "config.yaml").is_file() and finished(run_dir):
            continue
        started = time.perf_counter()
        if deployment:
            run = submit_reconstruct(deployment, cfg, run_dir, f"sweep {flow_run.id}")
            submitted[run.id] = row
        else:
            state = reconstruct(cfg.to_dict(), str(run_dir), return_state=True)
            error = state.result(raise_on_failure=False) if not state.is_completed() else None
            if isinstance(error, Preempted):
                raise error  # the process is being stopped: no next point; the rerun resumes this one
            row.update(state=state.name, seconds=time.perf_counter() - started)
    if submitted:
        for run_id, run in _wait_final(list(submitted), spec.wait_hours * 3600).items():
            seconds = (run.end_time - run.start_time).total_seconds() if run.start_time and run.end_time else None
            submitted[run_id].update(state=run.state.name, seconds=seconds, flow_run_id=str(run_id))
    for row in rows:
        add_run_summary(row)
    files = write_summary(out, rows, list(spec.parameters))
    create_table_artifact(artifact_table(rows), description=f"sweep {out}: {files['csv']}, {files['figure']}")
    logger.info("sweep table %s, figure %s", files["csv"], files["figure"])
    return rows


def add_run_summary(row: dict) -> None:
    """Add what the row's run directory reached (iteration, losses, phase Pearson on simulated
    data); a run with nothing to summarize (it failed early) is reported in the row, not fatal to
    the sweep."""
    try:
        summary = run_summary(row["run_dir"])
    except Exception as exc:
        row.setdefault("error", str(exc))
        return
    row.update(iteration=summary["iteration"], final_loss=summary["final_loss"],
               validation_loss=summary.get("validation_loss"), phase_pearson=summary.get("phase_pearson"))


def artifact_table(rows: list[dict]) -> list[dict]:
    """The rows as a Prefect table artifact takes them (numbers, strings and None)."""
    return [{k: (v if isinstance(v, (int, float, str)) or v is None else str(v)) for k, v in row.items()}
            for row in rows]


class _TrialStopped(BaseException):
    """A trial's run was stopped by a signal (rundir.Preempted or tasks.stopping.Stopped). Carries
    that stop out of study.optimize, which logs every Exception an objective raises as a failed
    trial with its traceback; the trial is already told FAIL and queued again."""

    def __init__(self, stop: BaseException):
        super().__init__(str(stop))
        self.stop = stop


class TrialFailed(Exception):
    """A trial's run failed (recorded as FAIL in the study; the study goes on). Not a RuntimeError,
    so that a preemption (rundir.Preempted) still stops the sweep."""


def tune(base, spec: SweepSpec, out: Path, deployment: Optional[str]) -> list[dict]:
    """Mode optuna: run trials until the study holds spec.n_trials finished (complete or pruned)
    ones. Trials run as child runs of ``deployment`` on the workers (spec.parallel at a time) or,
    without one, one after the other in this process."""
    logger = get_run_logger()
    tuning.check_before_trials(base, spec)
    pruning = tuning.pruner_settings(spec, base.recon_params.segment_iterations, base.recon_params.iterations)
    study = tuning.open_study(spec, out, pruning)
    released = tuning.release_abandoned(study)
    if released:
        logger.warning("trials %s had lost their sweep process; they run again from their checkpoints", released)
    remaining = spec.n_trials - len(tuning.finished_trials(study))
    logger.info("study %s in %s: %d of %d trials to go (%s)", study.study_name, tuning.storage_url(spec, out),
                max(remaining, 0), spec.n_trials, f"child runs of {deployment}" if deployment else "in this process")
    if remaining > 0:
        run_trials(study, remaining, TrialRun(base, spec, out, deployment, study, pruning))
    return report_study(study, base, spec, out)


def run_trials(study, count: int, trial_run: "TrialRun") -> None:
    """Let the study run up to ``count`` more trials through ``trial_run``, ending once it holds
    spec.n_trials finished ones; a trial stopped by a signal stops them all with its stop."""
    import optuna

    spec = trial_run.spec
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    stop_when_done = optuna.study.MaxTrialsCallback(spec.n_trials, states=finished)
    context = contextvars.copy_context()  # the flow run context, for trials in optuna's threads
    try:
        study.optimize(lambda trial: context.copy().run(trial_run, trial), n_trials=count,
                       n_jobs=spec.parallel if trial_run.deployment else 1, catch=(TrialFailed,),
                       callbacks=[stop_when_done])
    except _TrialStopped as stopped:
        raise stopped.stop from None


@dataclass(frozen=True)
class TrialRun:
    """One trial as a reconstruct run (optuna's objective): its values drawn, its config and run
    directory, the run as a child run of ``deployment`` or here, and its score read back."""

    base: PtyflowConfig
    spec: SweepSpec
    out: Path
    deployment: Optional[str]
    study: optuna.Study
    pruning: dict  # the pruner's settings, which the run needs to judge its reports

    def __call__(self, trial) -> float:
        tuning.claim(trial)
        point = tuning.suggest(trial, self.spec.ranges())
        cfg = tuning.trial_config(self.base, self.spec, point)
        fresh = self.out / point_name(trial.number, point).replace("point", "trial")
        run_dir = Path(trial.user_attrs.get("run_dir") or fresh)  # a retried trial keeps the one it retries
        trial.set_user_attr("run_dir", str(run_dir))
        link = tuning.TrialLink(tuning.storage_url(self.spec, self.out), self.study.study_name, trial.number,
                                self.spec.objective, self.spec.pruner, self.pruning).to_dict()
        if self.deployment:
            self.on_a_worker(trial, cfg, run_dir, link)
        else:
            self.in_this_process(trial, cfg, run_dir, link)
        return self.score(trial, run_dir)

    def on_a_worker(self, trial, cfg: PtyflowConfig, run_dir: Path, link: dict) -> None:
        """The run as a child run of the deployment, waited for; TrialFailed unless it completes."""
        earlier = trial.user_attrs.get("flow_run_id")
        if earlier:  # a retried trial: the child run of its lost sweep may still work in run_dir
            _wait_final([UUID(earlier)], self.spec.wait_hours * 3600)
        # a retry is a new trial (new number), so a new run; the start time tells this study's
        # trial from one of a study deleted and created again in the same folder
        run = submit_reconstruct(self.deployment, cfg, run_dir, f"trial {trial.number} of study "
                                 f"{self.study.study_name} started {trial.datetime_start.isoformat()}", trial=link)
        trial.set_user_attr("flow_run_id", str(run.id))
        run = _wait_final([run.id], self.spec.wait_hours * 3600)[run.id]
        if not run.state.is_completed():
            raise TrialFailed(f"trial {trial.number}: flow run {run.name} ended {run.state.name}: {run.state.message}")

    def in_this_process(self, trial, cfg: PtyflowConfig, run_dir: Path, link: dict) -> None:
        """The run as a subflow here; TrialFailed when it fails. A stop by a signal ends this
        attempt and the study (_TrialStopped); a copy of the trial, queued, continues from the
        checkpoint when the sweep is rerun."""
        try:
            state = reconstruct(cfg.to_dict(), str(run_dir), trial=link, return_state=True)
            error = None if state.is_completed() else state.result(raise_on_failure=False)
        except stopping.Stopped as stop:
            error = stop
        if isinstance(error, (Preempted, stopping.Stopped)):
            tuning.queue_again(self.study, trial, run_dir)
            raise _TrialStopped(error)
        if error is not None:
            raise TrialFailed(f"trial {trial.number}: {error}")

    def score(self, trial, run_dir: Path) -> float:
        """The objective of the trial's finished run; optuna's TrialPruned when the run was pruned
        (the run records where in the study's database, from wherever it ran)."""
        import optuna

        pruned_at = tuning.stored_user_attrs(self.study, trial.number).get("pruned_at_iteration")
        if pruned_at is not None:
            raise optuna.TrialPruned(f"pruned at iteration {pruned_at}")
        value = tuning.objective_value(run_summary(run_dir), self.spec.objective)
        if value is None:
            raise TrialFailed(f"trial {trial.number}: {run_dir} has no {self.spec.objective}")
        return value


def report_study(study, base, spec: SweepSpec, out: Path) -> list[dict]:
    """The study's table (sweep.csv, sweep_phases.png), best_config.yaml and Optuna's plots, and
    its table artifact; returns the rows."""
    keys = list(spec.parameters)
    rows = study_rows(study, keys)
    files = write_summary(out, rows, keys)
    files.update(tuning.write_study_report(study, out, base, spec))
    best = study.best_trial if "best_config" in files else None  # written when a trial is complete
    verdict = (f"best trial_{best.number:03d}, {spec.objective} {best.value:.5g}, {best.params}, "
               f"config {files['best_config']}" if best else "no complete trial")
    create_table_artifact(artifact_table(rows), description=f"optuna study {study.study_name} ({out}): {verdict}")
    get_run_logger().info("study table %s, best trial's config %s", files["csv"], files.get("best_config"))
    return rows


def study_rows(study, keys: list[str]) -> list[dict]:
    """One row per trial: its values, state, objective and run directory's summary."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        run_dir = trial.user_attrs.get("run_dir")
        row = {"point": f"trial_{trial.number:03d}", **{k: trial.params.get(k) for k in keys},
               "state": trial.state.name, "objective": trial.value,
               "pruned_at_iteration": trial.user_attrs.get("pruned_at_iteration"), "run_dir": run_dir,
               "seconds": trial.duration.total_seconds() if trial.duration else None}
        if run_dir:
            add_run_summary(row)
        rows.append(row)
    return rows
