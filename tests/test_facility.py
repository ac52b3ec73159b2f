"""Sweeps and the watched inbox in embedded mode (the server + worker versions are in
test_facility_server.py, slow)."""

import csv
import logging
import shutil

import pytest
import yaml


def short_config(config_path, iterations=2):
    raw = yaml.safe_load(config_path.read_text())
    raw["data"]["path"] = str(config_path.parent / raw["data"]["path"])
    raw["recon_params"].update(iterations=iterations, segment_iterations=iterations)
    return raw


def test_sweep_runs_every_point_once_and_reruns_nothing(tmp_path, small_dataset, in_prefect):
    from flows.sweep import sweep

    spec = {"mode": "list", "parameters": {"model_params.update_params.objp.lr": [2e-3, 5e-3, 1e-2],
                                           "recon_params.batch_size": [16, 32, 64]}}
    rows = sweep(short_config(small_dataset), spec, str(tmp_path / "sweep"), deployment=None)
    assert [r["state"] for r in rows] == ["Completed"] * 3
    assert all(r["phase_pearson"] > 0.5 and r["iteration"] == 2 for r in rows)
    with open(tmp_path / "sweep" / "sweep.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [float(t["model_params.update_params.objp.lr"]) for t in table] == [2e-3, 5e-3, 1e-2]
    assert (tmp_path / "sweep" / "sweep_phases.png").stat().st_size > 5000
    stamps = {r["point"]: (tmp_path / "sweep" / r["point"] / "model.hdf5").stat().st_mtime_ns for r in rows}

    again = sweep(short_config(small_dataset), spec, str(tmp_path / "sweep"), deployment=None)
    assert [r["state"] for r in again] == ["skipped (finished)"] * 3
    assert stamps == {r["point"]: (tmp_path / "sweep" / r["point"] / "model.hdf5").stat().st_mtime_ns for r in again}


def test_bad_sweep_spec_names_the_problem(tmp_path, small_dataset, in_prefect):
    from ptycho_core.config import ConfigError
    from flows.sweep import sweep

    with pytest.raises(ConfigError, match="mode list: every parameter needs the same number of values"):
        sweep(short_config(small_dataset), {"mode": "list", "parameters": {"a.b": [1, 2], "c.d": [1]}}, str(tmp_path),
              deployment=None)
    with pytest.raises(ConfigError, match="recon_params.batchsize: unknown key"):
        sweep(short_config(small_dataset), {"parameters": {"recon_params.batchsize": [1]}}, str(tmp_path), deployment=None)
    assert not any(tmp_path.iterdir())


def test_watch_reconstructs_each_dataset_once_and_gives_up_on_bad_ones(tmp_path, small_dataset, noise_free_dataset,
                                                                     in_prefect):
    from flows.watch import watch

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    shutil.copy(small_dataset.parent / "data.h5", inbox / "scan_a.h5")
    (inbox / "scan_a.h5.done").touch()
    shutil.copy(noise_free_dataset.parent / "data.h5", inbox / "scan_b.h5")  # no marker: needs a stable size
    (inbox / "broken.h5").write_text("not HDF5")
    (inbox / "broken.h5.done").touch()
    template = short_config(small_dataset)

    def poll():
        rows = watch(str(inbox), str(outbox), template, stable_seconds=0.0, max_attempts=2, deployment=None)
        return {r["dataset"]: r for r in rows}

    first = poll()
    assert first["scan_a.h5"]["status"] == "done" and first["scan_b.h5"]["status"] == "arriving"
    assert first["broken.h5"]["status"] == "retry" and "not an HDF5 file" in first["broken.h5"]["error"]
    second = poll()
    assert second["scan_b.h5"]["status"] == "done"
    assert second["broken.h5"]["status"] == "failed" and second["broken.h5"]["attempts"] == 2
    stamp = (outbox / "scan_a.h5" / "model.hdf5").stat().st_mtime_ns
    third = poll()
    assert {k: v["status"] for k, v in third.items()} == {"scan_a.h5": "done", "scan_b.h5": "done", "broken.h5": "failed"}
    assert (outbox / "scan_a.h5" / "model.hdf5").stat().st_mtime_ns == stamp
    assert (outbox / "scan_a.h5" / "result.zarr").is_dir() and (outbox / "scan_b.h5" / "result.zarr").is_dir()


def dectris_master(data_h5, out, energy_kev: float, dk_mrad: float):
    """The patterns and positions of a simulated data.h5 as a Dectris master file holding its
    frames itself, stating the beam energy (as a wavelength) and dk (pixel size over distance)."""
    import h5py
    import numpy as np

    from ptycho_core.physics import wavelength_ang

    with h5py.File(data_h5, "r") as src, h5py.File(out, "w") as f:
        meas = src["meas"][()]
        f["entry/data/data_000001"] = meas.reshape(-1, *meas.shape[-2:])
        f["positions_ang"] = src["positions_ang"][()]
        distance_m = 0.2
        f["entry/instrument/detector/detector_distance"] = distance_m
        f["entry/instrument/detector/x_pixel_size"] = distance_m * np.tan(dk_mrad * 1e-3)
        f["entry/instrument/beam/incident_wavelength"] = wavelength_ang(energy_kev)
        f["entry/instrument/beam/incident_wavelength"].attrs["units"] = "angstrom"


def test_each_watched_dataset_fills_the_template_with_what_its_own_file_states(tmp_path, small_dataset, in_prefect):
    """A template that leaves the beam energy and dk to the data: each dataset's run takes them
    from its own file (checked up front against the template's data.path, an example file); a
    dataset that states nothing fails, naming the missing field."""
    from ptycho_core.physics import dk_from_dx
    from flows.watch import watch

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    dk_mrad = dk_from_dx(300.0, 0.25, 64)  # the simulation's 0.25 Å pixels
    dectris_master(small_dataset.parent / "data.h5", tmp_path / "example_master.h5", 300.0, dk_mrad)
    dectris_master(small_dataset.parent / "data.h5", inbox / "a_master.h5", 300.0, dk_mrad)
    dectris_master(small_dataset.parent / "data.h5", inbox / "b_master.h5", 200.0, dk_mrad)
    shutil.copy(small_dataset.parent / "data.h5", inbox / "c_plain.h5")  # states no calibration
    for name in ("a_master.h5", "b_master.h5", "c_plain.h5"):
        (inbox / f"{name}.done").touch()
    template = short_config(small_dataset)
    template["data"] = {"path": str(tmp_path / "example_master.h5"), "pos_key": "/positions_ang"}
    for key in ("energy_kev", "dx_ang"):
        del template["experiment"][key]

    rows = {r["dataset"]: r for r in watch(str(inbox), str(outbox), template, stable_seconds=0.0, max_attempts=1,
                                           deployment=None)}
    assert rows["a_master.h5"]["status"] == "done" and rows["b_master.h5"]["status"] == "done", rows
    for name, energy_kev in (("a_master.h5", 300.0), ("b_master.h5", 200.0)):
        experiment = yaml.safe_load((outbox / name / "config.yaml").read_text())["experiment"]
        assert experiment["energy_kev"] == pytest.approx(energy_kev, rel=1e-9), name
        assert experiment["dk_mrad"] == pytest.approx(dk_mrad, rel=1e-9) and experiment["dx_ang"] is None, name
    assert rows["c_plain.h5"]["status"] == "failed" and not (outbox / "c_plain.h5").exists()
    assert "c_plain.h5: experiment.energy_kev: required but missing" in rows["c_plain.h5"]["error"]


def test_a_dectris_acquisition_with_linked_data_files_is_reconstructed_once(tmp_path, small_dataset, in_prefect):
    """An inbox holding a Dectris master and the data files it links to (as Arina/Eiger write them):
    the watch reconstructs the master, once; the data files are neither datasets nor failures."""
    import h5py

    from ptycho_core.physics import dk_from_dx
    from flows.watch import watch

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    dk_mrad = dk_from_dx(300.0, 0.25, 64)
    master = inbox / "scan_master.h5"
    dectris_master(small_dataset.parent / "data.h5", master, 300.0, dk_mrad)
    with h5py.File(master, "a") as f:  # the frames moved out to linked data files of 100 each
        frames = f["entry/data/data_000001"][()]
        del f["entry/data/data_000001"]
        for i, start in enumerate(range(0, len(frames), 100)):
            name = f"scan_data_{i + 1:06d}.h5"
            with h5py.File(inbox / name, "w") as data:
                data["entry/data/data"] = frames[start:start + 100]
            f[f"entry/data/data_{i + 1:06d}"] = h5py.ExternalLink(name, "/entry/data/data")
    template = short_config(small_dataset)
    template["data"] = {"path": str(master), "pos_key": "/positions_ang"}
    del template["experiment"]["energy_kev"], template["experiment"]["dx_ang"]
    (inbox / "scan_master.h5.done").touch()
    rows = watch(str(inbox), str(outbox), template, stable_seconds=3600.0, deployment=None)
    assert [(r["dataset"], r["status"]) for r in rows] == [("scan_master.h5", "done")], rows
    assert sorted(p.name for p in outbox.iterdir() if p.is_dir()) == ["scan_master.h5"]


def test_a_copy_of_a_reconstructed_dataset_is_recorded_as_duplicate(tmp_path, small_dataset, in_prefect):
    from flows.watch import watch

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    for name in ("a_first.h5", "b_copy.h5"):  # claimed in name order
        shutil.copy(small_dataset.parent / "data.h5", inbox / name)
        (inbox / f"{name}.done").touch()
    rows = {r["dataset"]: r for r in watch(str(inbox), str(outbox), short_config(small_dataset), stable_seconds=0.0,
                                                 deployment=None)}
    assert rows["b_copy.h5"]["status"] == "duplicate" and rows["b_copy.h5"]["duplicate_of"] == "a_first.h5"
    assert rows["a_first.h5"]["status"] == "done" and not (outbox / "b_copy.h5").exists()


def test_a_named_deployment_the_server_lacks_is_an_error_not_a_silent_fallback(tmp_path, small_dataset, in_prefect,
                                                                                run_cli):
    """The session's server has no deployments: asking for one is refused before anything runs,
    naming it and how to deploy it (inline runs are asked for with deployment=None, as the tests
    above do, or `ptyflow sweep --inline`)."""
    from ptycho_core.config import ConfigError
    from flows.sweep import sweep
    from flows.watch import watch

    spec = {"mode": "list", "parameters": {"model_params.update_params.objp.lr": [2e-3]}}
    missing = r"deployment 'reconstruct/reconstruct' not found on the Prefect server .*prefect deploy --prefect-file"
    with pytest.raises(ConfigError, match=missing):
        sweep(short_config(small_dataset), spec, str(tmp_path / "sweep"))
    with pytest.raises(ConfigError, match=r"deployment 'reconstruct': expected <flow name>/<deployment name>"):
        sweep(short_config(small_dataset), spec, str(tmp_path / "sweep"), deployment="reconstruct")
    assert not (tmp_path / "sweep").exists()

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy(small_dataset.parent / "data.h5", inbox / "scan.h5")
    (inbox / "scan.h5.done").touch()
    with pytest.raises(ConfigError, match=missing):
        watch(str(inbox), str(tmp_path / "outbox"), short_config(small_dataset), stable_seconds=0.0)
    assert not (tmp_path / "outbox").exists()

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(short_config(small_dataset)))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    refused = run_cli("sweep", base, tmp_path / "spec.yaml", "--out", tmp_path / "sweep")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "deployment 'reconstruct/reconstruct' not found" in refused.stderr and "--inline" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "sweep").exists()


def test_a_preempted_point_stops_the_sweep_and_the_rerun_resumes_it(tmp_path, small_dataset, in_prefect):
    """SIGTERM while the first point iterates (in this process, as a scheduler would send it): the
    point checkpoints and the sweep ends with Preempted instead of starting the next point."""
    import os
    import signal

    from flows.sweep import sweep
    from ptycho_core.rundir import Preempted, newest_checkpoint
    from tasks import progress

    class SigtermAtFirstIteration:
        sent = False

        def iteration_done(self, state, row):
            if not self.sent:
                # the segment owns SIGTERM while it iterates; with the default action this would kill pytest
                assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
                self.sent = True
                os.kill(os.getpid(), signal.SIGTERM)

        def segment_done(self, outcome):
            pass

    config = short_config(small_dataset, iterations=4)
    config["recon_params"]["segment_iterations"] = 2
    spec = {"mode": "list", "parameters": {"model_params.update_params.objp.lr": [2e-3, 5e-3]}}
    out = tmp_path / "sweep"
    with progress.reporting_to(SigtermAtFirstIteration()), pytest.raises(Preempted, match="preempted at iteration 1"):
        sweep(config, spec, str(out), deployment=None)
    first, = out.glob("point_000_*")
    assert not list(out.glob("point_001_*"))  # the next point never started
    stopped = newest_checkpoint(first)
    assert stopped.iteration == 1, stopped

    rows = sweep(config, spec, str(out), deployment=None)
    assert [r["state"] for r in rows] == ["Completed", "Completed"] and all(r["iteration"] == 4 for r in rows)
    assert stopped.path.is_file() and newest_checkpoint(first).iteration == 4  # resumed from it


@pytest.fixture
def warnings_of():
    """warnings_of(logger name) -> the list its WARNING records' messages go to (Prefect's logging
    set-up replaces the root handlers, pytest's caplog among them)."""
    attached = []

    def attach(name):
        lines = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda record: lines.append(record.getMessage())
        logging.getLogger(name).addHandler(handler)
        attached.append((name, handler))
        return lines

    yield attach
    for name, handler in attached:
        logging.getLogger(name).removeHandler(handler)


def test_a_watch_state_cut_to_nothing_is_set_aside_and_rebuilt_without_reprocessing(tmp_path, small_dataset,
                                                                                    in_prefect, warnings_of):
    """A power loss left .watch-state.json empty: the next poll sets it aside with a warning and
    rebuilds it from the outbox's finished run directories, so the dataset done before is not
    reconstructed again, and its content hash still makes a byte-identical copy a duplicate."""
    from flows.watch import watch

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    shutil.copy(small_dataset.parent / "data.h5", inbox / "scan_a.h5")
    (inbox / "scan_a.h5.done").touch()

    def poll():
        rows = watch(str(inbox), str(outbox), short_config(small_dataset), stable_seconds=0.0, deployment=None)
        return {r["dataset"]: r for r in rows}

    assert poll()["scan_a.h5"]["status"] == "done"
    done_before = (outbox / "scan_a.h5" / "model.hdf5").stat().st_mtime_ns
    (outbox / ".watch-state.json").write_bytes(b"")
    shutil.copy(small_dataset.parent / "data.h5", inbox / "scan_b.h5")  # the same bytes, under another name
    (inbox / "scan_b.h5.done").touch()
    warned = warnings_of("ptyflow")
    rows = poll()
    assert any(".watch-state.json could not be read; set aside as .watch-state.json.damaged-" in w for w in warned)
    assert rows["scan_a.h5"]["status"] == "done" and rows["scan_a.h5"]["run_dir"] == str(outbox / "scan_a.h5")
    assert rows["scan_b.h5"]["status"] == "duplicate" and rows["scan_b.h5"]["duplicate_of"] == "scan_a.h5"
    assert (outbox / "scan_a.h5" / "model.hdf5").stat().st_mtime_ns == done_before
    assert not (outbox / "scan_b.h5").exists()
    assert [p.stat().st_size for p in outbox.glob(".watch-state.json.damaged-*")] == [0]


HOLD_THE_LOCK = (
    "import fcntl, sys, time\n"
    "lock = open(sys.argv[1], 'a+')\n"
    "fcntl.flock(lock, fcntl.LOCK_EX)\n"
    "print('held', flush=True)\n"
    "time.sleep(30)\n"
)


def test_a_poll_that_cannot_have_the_state_lock_ends_at_once_saying_so(tmp_path, small_dataset, in_prefect,
                                                                       monkeypatch, warnings_of):
    """Another process holds the state's lock (a watcher stuck on a slow filesystem): the poll
    waits its bounded time, then ends Completed with the reason in its state, its log and its
    table, claiming nothing; it neither fails the watch run nor hangs."""
    import subprocess
    import sys

    from flows.bookkeeping import inbox as inbox_state
    from flows.watch import watch

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    shutil.copy(small_dataset.parent / "data.h5", inbox / "scan.h5")
    (inbox / "scan.h5.done").touch()
    monkeypatch.setattr(inbox_state, "LOCK_WAIT_S", 1.0, raising=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(outbox / ".watch-state.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        warned = warnings_of("prefect.flow_runs")
        state = watch(str(inbox), str(outbox), short_config(small_dataset), stable_seconds=0.0, deployment=None,
                      return_state=True)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert state.is_completed()
    assert state.message.startswith("poll skipped: ") and ".watch-state.lock is held by another process" in state.message
    assert "waited 1 s" in state.message and any(w.startswith(f"poll of {inbox} skipped: ") for w in warned)
    assert state.result() == [] and not (outbox / "scan.h5").exists()


def test_a_child_run_key_names_the_run_directory_the_config_and_the_scope(tmp_path, small_dataset, monkeypatch):
    """Prefect hands back the run made under a key: equal inputs give the key again (a rescheduled
    parent finds its runs), a change of any one gives a new key, and its length does not grow
    with the paths."""
    from flows.reconstruct import child_run_key, resolve_config

    config = resolve_config(short_config(small_dataset))
    fewer = resolve_config({**short_config(small_dataset), "recon_params": {
        **short_config(small_dataset)["recon_params"], "iterations": 1}})
    key = child_run_key("sweep 1", tmp_path / "point", config)
    monkeypatch.chdir(tmp_path)
    assert key == child_run_key("sweep 1", "point", resolve_config(short_config(small_dataset)))
    others = {child_run_key("sweep 2", tmp_path / "point", config), child_run_key("sweep 1", tmp_path / "other", config),
              child_run_key("sweep 1", tmp_path / "point", fewer)}
    assert len(others) == 3 and key not in others
    deep = tmp_path.joinpath(*["a_rather_long_folder_name"] * 40)
    assert len(key) == len(child_run_key("sweep 1", deep, config)) == 72
