"""Adaptive sweeps (mode optuna): trials are reconstruct runs scored on held-out patterns,
pruned at segment ends, in a study database that a rerun continues."""

import csv
import os
import signal
import subprocess
import time

import optuna
import pytest
import yaml

from ptycho_core.config import ConfigError, load_config
from ptycho_core.rundir import newest_checkpoint
from ptycho_core.simulate import simulate

from conftest import cli
from serverkit import wait

# noisy enough (100 e/Å², about 64 counts per pattern) for the held-out loss to tell settings apart
DOSE = 100.0


@pytest.fixture(scope="module")
def noisy_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("noisy")
    config = simulate("small", folder, seed=5, dose_e_per_ang2=DOSE)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["path"] = str(folder / raw["data"]["path"])
    raw["recon_params"].update(iterations=8, segment_iterations=2, threads=1, segment_figures=False)
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def spec(n_trials=6, **changes):
    """Six trials over the object's learning rate and the probe modes (the median pruner)."""
    return {"mode": "optuna", "n_trials": n_trials, "seed": 1, "parameters": {
        "model_params.update_params.objp.lr": {"low": 1.0e-3, "high": 0.3, "log": True},
        "init.probe.n_modes": {"low": 1, "high": 3}}, **changes}


def study_trials(out):
    return optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}").get_trials()


def mtimes(out):
    return {p.name: (p / "model.hdf5").stat().st_mtime_ns for p in out.glob("trial_*") if (p / "model.hdf5").exists()}


def test_a_study_prunes_poor_trials_at_segment_ends_and_a_rerun_adds_none(tmp_path, noisy_base, in_prefect):
    from flows.sweep import sweep

    out = tmp_path / "study"
    rows = sweep(str(noisy_base), spec(), str(out), deployment=None)
    states = [r["state"] for r in rows]
    assert len(rows) == 6 and set(states) <= {"COMPLETE", "PRUNED"}, rows
    assert states.count("PRUNED") >= 1 and states.count("COMPLETE") >= 2, states
    for row in rows:
        ckpt = newest_checkpoint(row["run_dir"])
        if row["state"] == "PRUNED":  # stopped between segments, checkpoint and result kept
            assert row["pruned_at_iteration"] in (4, 6) and ckpt.iteration == row["pruned_at_iteration"]
        else:
            assert ckpt.iteration == 8 and row["objective"] == pytest.approx(row["validation_loss"])
        assert (tmp_path / "study" / row["run_dir"].split("/")[-1] / "result.zarr").is_dir()
        assert len(ckpt.history["validation_loss"]) == ckpt.iteration  # the trials held patterns out

    best = min((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: r["objective"])
    chosen = load_config(out / "best_config.yaml")
    assert chosen.model_params.update_params.objp.lr == pytest.approx(best["model_params.update_params.objp.lr"])
    assert chosen.init.probe.n_modes == best["init.probe.n_modes"]
    assert chosen.recon_params.validation_fraction == 0.05
    with open(out / "sweep.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [t["state"] for t in table] == states and all(t["objective"] for t in table)
    for name in ("study_history.png", "study_importance.png", "sweep_phases.png"):
        assert (out / name).stat().st_size > 5000, name

    before = mtimes(out)
    again = sweep(str(noisy_base), spec(), str(out), deployment=None)
    assert len(again) == 6 and len(study_trials(out)) == 6
    assert mtimes(out) == before  # no trial ran again


def test_bad_study_settings_are_refused_before_any_trial(tmp_path, noisy_base, in_prefect):
    from flows.sweep import sweep

    out = tmp_path / "bad"

    def refused(message, **changes):
        bad = spec(**changes)
        with pytest.raises(ConfigError, match=message):
            sweep(str(noisy_base), bad, str(out), deployment=None)
        assert not out.exists() or not any(out.glob("trial_*"))

    refused("init.probe.nmodes: unknown key", parameters={"init.probe.nmodes": {"low": 1, "high": 2}})
    refused("empty or inverted range: low 0.3 must be below high 0.001",
            parameters={"model_params.update_params.objp.lr": {"low": 0.3, "high": 1.0e-3}})
    refused("sampler: Input should be 'tpe'", sampler="bayes")
    refused("pruner: Input should be 'median'", pruner="early")
    refused("pruner_options: optuna's MedianPruner refused them", pruner_options={"patience": 3})
    refused("mode optuna: give n_trials", n_trials=None)
    refused("init.probe.n_modes: must be >= 1", parameters={"init.probe.n_modes": {"low": 0, "high": 2}})
    refused(r"storage: cannot open the study database sqlite:////proc/self/no/study.db",
            storage="sqlite:////proc/self/no/study.db")


def test_a_released_trial_s_run_goes_on_without_reporting(tmp_path, caplog):
    """A worker's run whose trial was released meanwhile (its sweep process was lost; a rerun
    failed the trial and retries it in the same run directory): its next segment report is no
    error and does not stop it, so the retry, which waits for it, takes its score."""
    from flows.bookkeeping import tuning

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="released")
    trial = study.ask()
    link = tuning.TrialLink(storage, "released", trial.number, "validation_loss", "median", {}).to_dict()
    assert tuning.report_segment(link, {"validation_loss": 1.0}, 3) is False
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # what a rerun of its sweep does to it
    with caplog.at_level("WARNING", logger="ptyflow"):
        assert tuning.report_segment(link, {"validation_loss": 0.9}, 6) is False
    assert "was released by a rerun of its sweep" in caplog.text
    assert study.trials[0].intermediate_values == {3: 1.0}


def test_an_abandoned_trial_is_released_once_with_its_values_and_run_directory(tmp_path):
    """A running trial whose sweep process on this host is gone is failed and queued again (same
    values, same run directory) by the next sweep, once: a second sweep that saw it running at the
    same moment but comes second leaves it alone, and a trial whose process lives is not touched."""
    import socket

    from flows.bookkeeping import tuning

    url = f"sqlite:///{tmp_path / 'study.db'}"
    earlier_sweeps = optuna.create_study(storage=url, study_name="abandoned")
    gone = subprocess.Popen(["true"])
    gone.wait()
    for pid in (gone.pid, os.getpid()):
        trial = earlier_sweeps.ask()
        trial.suggest_float("model_params.update_params.objp.lr", 1.0e-3, 0.3, log=True)
        trial.set_user_attr("run_dir", str(tmp_path / f"trial_{trial.number:03d}"))
        trial.set_user_attr("sweep_host", socket.gethostname())
        trial.set_user_attr("sweep_pid", pid)
    study, other = (optuna.load_study(study_name="abandoned", storage=tuning.open_storage(url)) for _ in range(2))
    seen_running = other.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))

    assert tuning.release_abandoned(study) == [0]
    other.get_trials = lambda deepcopy=True, states=None: seen_running  # what it saw before the first released
    assert tuning.release_abandoned(other) == []
    assert tuning.release_abandoned(study) == []
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "WAITING"]
    assert trials[2].params == trials[0].params and trials[2].user_attrs["run_dir"] == str(tmp_path / "trial_000")
    assert trials[2].system_attrs["failed_trial"] == 0


def test_a_killed_sweep_reruns_into_the_same_study(tmp_path, noisy_base, prefect_api):
    """SIGKILL of `ptyflow sweep` in its second trial: the rerun finds that trial abandoned, runs
    it again (same values, same run directory, from its checkpoint) and finishes the study."""
    out = tmp_path / "killed"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec(n_trials=3, pruner="none")))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    first = subprocess.Popen(cli("sweep", noisy_base, spec_path, "--out", out, "--inline"), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        second = lambda: next(out.glob("trial_001_*/checkpoints/*.h5"), None)  # noqa: E731
        wait(lambda: second() is not None or first.poll() is not None, 240, "the second trial's first checkpoint")
        assert first.poll() is None, first.stderr.read()
        os.kill(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    killed_at = time.time()
    interrupted = next(out.glob("trial_001_*"))
    done_before = mtimes(out)[next(out.glob("trial_000_*")).name]
    assert [t.state.name for t in study_trials(out)] == ["COMPLETE", "RUNNING"]

    rerun = subprocess.run(cli("sweep", noisy_base, spec_path, "--out", out, "--inline"), env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    trials = study_trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"], trials
    retried = next(t for t in trials if t.system_attrs.get("failed_trial") == 1)
    assert retried.params == trials[1].params and retried.user_attrs["run_dir"] == str(interrupted)
    # the rerun's sampler does not replay the killed process's draws
    assert trials[3].params not in (trials[0].params, trials[1].params)
    checkpoints = sorted((interrupted / "checkpoints").glob("*.h5"))
    assert checkpoints[0].stat().st_mtime < killed_at  # continued from what the killed run had written
    assert newest_checkpoint(interrupted).iteration == 8
    assert mtimes(out)[next(out.glob("trial_000_*")).name] == done_before
    assert "lost their sweep process" in rerun.stderr + rerun.stdout


@pytest.mark.slow
def test_sigterm_stops_the_study_and_the_rerun_continues_the_trial(tmp_path, noisy_base, prefect_api):
    """SIGTERM to `ptyflow sweep` (a preemption): the trial's run checkpoints and the sweep exits 143
    instead of going on to the next trial; the rerun continues that trial from its checkpoint."""
    out = tmp_path / "preempted"
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec(n_trials=2, pruner="none")))
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    # checkpoint writes pause, and the signal comes in the first (inside the segment, where the run
    # owns SIGTERM), not between two stages of the run
    first = subprocess.Popen(cli("sweep", noisy_base, spec_path, "--out", out, "--inline"), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**env, "PTYFLOW_FAULT_PAUSE": "checkpoint_write:3"})
    try:
        lines = []
        for line in first.stdout:
            lines.append(line)
            # config.yaml and preprocessed.h5 are written the same way, before the segment
            if "fault-pause: checkpoint_write" in line and any(out.glob("trial_000_*/checkpoints")):
                first.send_signal(signal.SIGTERM)
                break
        output = "".join(lines) + first.communicate(timeout=120)[0]
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, output
    assert "rerun the same command to resume" in output
    interrupted = next(out.glob("trial_000_*"))
    stopped_at = newest_checkpoint(interrupted).iteration
    assert stopped_at < 8 and not list(out.glob("trial_001_*"))
    assert [t.state.name for t in study_trials(out)] == ["FAIL", "WAITING"]

    rerun = subprocess.run(cli("sweep", noisy_base, spec_path, "--out", out, "--inline"), env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    trials = study_trials(out)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].user_attrs["run_dir"] == str(interrupted) and trials[1].params == trials[0].params
    ckpt = newest_checkpoint(interrupted)
    assert ckpt.iteration == 8 and len(ckpt.history["loss"]) == 8
