"""Adaptive sweeps (sweep spec ``mode: optuna``): the study in its database, the values a trial
draws, and what a running trial reports at its segment ends so that a pruner can stop it.

A trial is one reconstruct run in its own run directory. The sweep process asks the study for a
trial and runs it (in process, or as a child flow run on a worker); the run itself reports its
objective to the study after every segment (``report_to_trial``, a plain call of the reconstruct
flow) and ends early, checkpoint kept, when the pruner says so. The study lives in an RDB storage
(a SQLite file next to the sweep, or any SQLAlchemy URL), so several sweeps and workers can share
it and a rerun continues it.

A trial whose sweep process died stays "running" in the database. Two things give it back:
Optuna's heartbeat (the sweep process beats while a trial runs; a trial silent for
``GRACE_SECONDS`` is failed and retried, with the same values and run directory, by the next
sweep that asks for a trial), and, faster, ``release_abandoned``: a trial whose sweep ran on this
host under a PID that no longer exists is retried at once.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from flows.bookkeeping.sweeps import OBJECTIVES, Range, SweepSpec, corner_points, point_config
from ptycho_core.config import ConfigError, PtyflowConfig
from ptycho_core.stages.export import run_summary
from ptycho_core.simulate import read_ground_truth

log = logging.getLogger("ptyflow")

HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 120
MAX_RETRIES = 3  # a trial that keeps losing its sweep process is not retried forever

SAMPLERS = {"tpe": "TPESampler", "random": "RandomSampler", "qmc": "QMCSampler", "gp": "GPSampler",
            "cmaes": "CmaEsSampler"}
PRUNERS = {"median": "MedianPruner", "percentile": "PercentilePruner", "hyperband": "HyperbandPruner",
           "successive_halving": "SuccessiveHalvingPruner", "none": "NopPruner"}


@dataclass(frozen=True)
class TrialLink:
    """What a reconstruct run needs to report to its trial (a flow parameter, so plain values)."""

    storage: str
    study_name: str
    trial_number: int
    objective: str
    pruner: str
    pruner_options: dict

    def to_dict(self) -> dict:
        return asdict(self)


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO and marks the heartbeat experimental: the sweep's own log
    and table say what happened."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def retry_callback():
    """Enqueue a trial that lost its sweep process again, same values and user attributes (its
    run directory, so it continues from its checkpoint)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)


def storage_url(spec: SweepSpec, out_dir: Path) -> str:
    return spec.storage or f"sqlite:///{(Path(out_dir) / 'study.db').resolve()}"


def study_name(spec: SweepSpec, out_dir: Path) -> str:
    return spec.study_name or Path(out_dir).resolve().name


def open_storage(url: str, heartbeat: bool = True):
    """Optuna's RDB storage at ``url``; one message naming the URL when it cannot be opened."""
    from optuna.storages import RDBStorage

    quiet_optuna()
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # workers share the file
    beat = ({"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS,
             "heartbeat_stale_trial_callback": retry_callback()} if heartbeat else {})
    try:
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(url, engine_kwargs=engine, **beat)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy's and the drivers' errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"sweep spec storage: cannot open the study database {url} ({reason})") from None


def pruner_settings(spec: SweepSpec, segment_iterations: int, iterations: int) -> dict:
    """The pruner's arguments: ptyflow's defaults for short studies under the spec's own."""
    defaults = {
        # the median of 2 finished trials already tells a poor one; a trial is judged from its second
        # segment end on (the first is dominated by how the run starts)
        "median": {"n_startup_trials": 2, "n_warmup_steps": segment_iterations + 1},
        "percentile": {"percentile": 50.0, "n_startup_trials": 2, "n_warmup_steps": segment_iterations + 1},
        # resources are iterations and reports come at segment ends
        "hyperband": {"min_resource": segment_iterations, "max_resource": iterations, "reduction_factor": 3},
        "successive_halving": {"min_resource": segment_iterations, "reduction_factor": 3},
    }.get(spec.pruner, {})
    return {**defaults, **spec.pruner_options}


def make_pruner(name: str, options: dict):
    import optuna

    cls = getattr(optuna.pruners, PRUNERS[name])
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"sweep spec pruner_options: optuna's {PRUNERS[name]} refused them ({exc})") from None


def make_sampler(spec: SweepSpec, trials_so_far: int = 0):
    """The spec's sampler, seeded with (seed, trials already in the study): a new study is
    reproducible, and a continued one does not replay the draws of the process before it."""
    import numpy as np
    import optuna

    cls = getattr(optuna.samplers, SAMPLERS[spec.sampler])
    seed = int(np.random.SeedSequence([spec.seed, trials_so_far]).generate_state(1)[0]) if trials_so_far else spec.seed
    options = {"seed": seed, **spec.sampler_options}
    try:
        return cls(**options)
    except (TypeError, ValueError, ImportError) as exc:
        raise ConfigError(f"sweep spec sampler_options: optuna's {SAMPLERS[spec.sampler]} refused them ({exc})") from None


def open_study(spec: SweepSpec, out_dir: Path, pruner_options: dict):
    """The spec's study, created or continued (same storage and name: the same study)."""
    import optuna

    storage = open_storage(storage_url(spec, out_dir))
    try:
        study = optuna.create_study(storage=storage, study_name=study_name(spec, out_dir), load_if_exists=True,
                                    direction=OBJECTIVES[spec.objective], sampler=make_sampler(spec),
                                    pruner=make_pruner(spec.pruner, pruner_options))
    except ValueError as exc:  # e.g. the stored study optimizes in the other direction
        raise ConfigError(f"sweep spec study_name {study_name(spec, out_dir)}: {exc}") from None
    existing = len(study.get_trials(deepcopy=False))
    if existing:
        study.sampler = make_sampler(spec, existing)
    return study


def trial_config(base: PtyflowConfig, spec: SweepSpec, point: dict[str, Any]) -> PtyflowConfig:
    """The base config with a trial's values, holding out spec.validation_fraction of the patterns
    when the objective is the validation loss and the base config holds out none."""
    cfg = point_config(base, point)
    if spec.objective == "validation_loss" and not cfg.recon_params.validation_fraction:
        cfg = point_config(cfg, {"recon_params.validation_fraction": spec.validation_fraction})
    return cfg


def check_before_trials(base: PtyflowConfig, spec: SweepSpec) -> None:
    """ConfigError, before any trial runs, for a key or a range's end the config refuses (every
    corner point's config is built) and for objective phase_pearson without ground truth."""
    for point in corner_points(spec):
        trial_config(base, spec, point)
    if spec.objective == "phase_pearson":
        try:
            read_ground_truth(base.data.path)
        except (OSError, KeyError):
            raise ConfigError(f"sweep spec objective phase_pearson: {base.data.path} holds no ground truth; "
                              "use objective validation_loss") from None


def suggest(trial, ranges: dict[str, Range]) -> dict[str, Any]:
    """The trial's value of every dotted key."""
    point = {}
    for key, r in ranges.items():
        if r.choices is not None:
            point[key] = trial.suggest_categorical(key, r.choices)
        elif r.integer:
            point[key] = trial.suggest_int(key, r.low, r.high, step=r.step or 1, log=r.log)
        else:
            point[key] = trial.suggest_float(key, float(r.low), float(r.high), step=r.step, log=r.log)
    return point


def finished_trials(study) -> list:
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=done)


def stored_user_attrs(study, number: int) -> dict[str, Any]:
    """Trial ``number``'s user attributes as the database holds them now, including those its run
    set from a worker (get_trials reads unfinished trials afresh; a Trial object's own copy does not)."""
    return next(t.user_attrs for t in study.get_trials(deepcopy=False) if t.number == number)


def claim(trial) -> None:
    """Record which process runs the trial (release_abandoned reads it)."""
    trial.set_user_attr("sweep_host", socket.gethostname())
    trial.set_user_attr("sweep_pid", os.getpid())


def queue_again(study, trial, run_dir: Path) -> None:
    """End ``trial``, stopped by a signal in this process, as FAIL, and queue a copy with its
    values and run directory: the rerun of the sweep continues it from its checkpoint."""
    import optuna

    study.enqueue_trial(trial.params, user_attrs={"run_dir": str(run_dir)})
    study.tell(trial, state=optuna.trial.TrialState.FAIL)


def release_abandoned(study) -> list[int]:
    """Fail and retry (same values, same run directory) the running trials whose sweep process
    on this host is gone (SIGKILL, a crash, a reboot); returns their numbers."""
    import optuna

    released = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("sweep_host") != socket.gethostname() or _alive(attrs.get("sweep_pid")):
            continue
        try:
            failed = study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            # another sweep released it first: tell refuses a trial it finds finished (ValueError),
            # the storage one that was finished while it was told
            continue
        retry_callback()(study, failed)
        released.append(trial.number)
    return released


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return True  # not recorded: leave it to the heartbeat
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def objective_value(summary: dict, objective: str) -> Optional[float]:
    """The trial's score from a run summary (stages.export.run_summary); None when the run has none."""
    value = summary.get(objective)
    return None if value is None or not math.isfinite(value) else float(value)


def report_segment(link: dict, summary: dict, iteration: int) -> bool:
    """Report a segment's objective to the trial as the value at step ``iteration``; True when the
    pruner stops the trial (recorded in its user attribute pruned_at_iteration)."""
    import optuna

    link = TrialLink(**link)
    value = objective_value(summary, link.objective)
    if value is None:
        return False
    storage = open_storage(link.storage, heartbeat=False)
    study = optuna.load_study(study_name=link.study_name, storage=storage,
                              pruner=make_pruner(link.pruner, link.pruner_options))
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(link.study_name),
                                                               link.trial_number)
    # a running trial by its number: optuna has no call that hands one back, but its public Trial
    # class takes the storage's id of it (read through the storage's public methods above)
    trial = optuna.trial.Trial(study, trial_id)
    try:
        trial.report(value, iteration)
    except optuna.exceptions.UpdateFinishedTrialError:
        # released: its sweep process was lost and a rerun retries it in this run directory, after
        # this run ends (flows.sweep waits for it), so the run goes on and the retry takes its score
        log.warning(
            "trial %d of study %s was released by a rerun of its sweep; this run finishes without reporting, and the "
            "retried trial takes its score", trial.number, link.study_name)
        return False
    if not trial.should_prune():
        return False
    trial.set_user_attr("pruned_at_iteration", iteration)
    return True


def report_to_trial(link: dict, run_dir: str, segment: dict) -> bool:
    """Report the run's objective after ``segment`` (tasks.segment.reconstruct_segment's result) to
    its trial; True: the pruner stops the run. The segment's own numbers hold the validation loss;
    another objective (phase Pearson) reads the checkpoint the segment wrote and the ground truth."""
    summary = segment if segment.get(link["objective"]) is not None else run_summary(run_dir)
    return report_segment(link, summary, segment["iteration"])


def write_study_report(study, out_dir: Path, base, spec: SweepSpec) -> dict[str, Path]:
    """best_config.yaml (the best finished trial's whole config), study_history.png and, with two
    or more finished trials, study_importance.png (Optuna's own plots)."""
    import warnings

    import optuna
    import yaml

    from ptycho_core.io.figures import pyplot

    files: dict[str, Path] = {}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        config = trial_config(base, spec, best.params).to_dict()
        header = (f"# best trial {best.number} of study {study.study_name}: {spec.objective} {best.value:.6g}\n"
                  f"# values: {best.params}\n# run directory: {best.user_attrs.get('run_dir')}\n")
        path = Path(out_dir) / "best_config.yaml"
        path.write_text(header + yaml.safe_dump(config, sort_keys=False))
        files["best_config"] = path
    plt = pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        from optuna.visualization import matplotlib as plots

        drawings = {"study_history.png": plots.plot_optimization_history}
        if len(complete) >= 2:
            drawings["study_importance.png"] = plots.plot_param_importances
        for name, draw in drawings.items():
            try:
                ax = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. every trial drew the same values: no importance to show
            figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            figure.set_size_inches(7, 4.5)
            figure.tight_layout()
            figure.savefig(Path(out_dir) / name, dpi=90)
            plt.close(figure)
            files[name.removesuffix(".png")] = Path(out_dir) / name
    return files
