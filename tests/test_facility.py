"""Sweeps and the watched inbox in embedded mode (the server + worker versions are in
test_facility_server.py, slow)."""

import csv
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
    rows = sweep(short_config(small_dataset), spec, str(tmp_path / "sweep"))
    assert [r["state"] for r in rows] == ["Completed"] * 3
    assert all(r["phase_pearson"] > 0.5 and r["iteration"] == 2 for r in rows)
    with open(tmp_path / "sweep" / "sweep.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [float(t["model_params.update_params.objp.lr"]) for t in table] == [2e-3, 5e-3, 1e-2]
    assert (tmp_path / "sweep" / "sweep_phases.png").stat().st_size > 5000
    stamps = {r["point"]: (tmp_path / "sweep" / r["point"] / "model.hdf5").stat().st_mtime_ns for r in rows}

    again = sweep(short_config(small_dataset), spec, str(tmp_path / "sweep"))
    assert [r["state"] for r in again] == ["skipped (finished)"] * 3
    assert stamps == {r["point"]: (tmp_path / "sweep" / r["point"] / "model.hdf5").stat().st_mtime_ns for r in again}


def test_bad_sweep_spec_names_the_problem(tmp_path, small_dataset, in_prefect):
    from ptycho_core.config import ConfigError
    from flows.sweep import sweep

    with pytest.raises(ConfigError, match="mode list: every parameter needs the same number of values"):
        sweep(short_config(small_dataset), {"mode": "list", "parameters": {"a.b": [1, 2], "c.d": [1]}}, str(tmp_path))
    with pytest.raises(ConfigError, match="recon_params.batchsize: unknown key"):
        sweep(short_config(small_dataset), {"parameters": {"recon_params.batchsize": [1]}}, str(tmp_path))
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
        rows = watch(str(inbox), str(outbox), template, stable_seconds=0.0, max_attempts=2)
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


def test_a_copy_of_a_reconstructed_dataset_is_recorded_as_duplicate(tmp_path, small_dataset, in_prefect):
    from flows.watch import watch

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    for name in ("a_first.h5", "b_copy.h5"):  # claimed in name order
        shutil.copy(small_dataset.parent / "data.h5", inbox / name)
        (inbox / f"{name}.done").touch()
    rows = {r["dataset"]: r for r in watch(str(inbox), str(outbox), short_config(small_dataset), stable_seconds=0.0)}
    assert rows["b_copy.h5"]["status"] == "duplicate" and rows["b_copy.h5"]["duplicate_of"] == "a_first.h5"
    assert rows["a_first.h5"]["status"] == "done" and not (outbox / "b_copy.h5").exists()
