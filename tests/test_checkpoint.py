"""model.hdf5: continuing equals an uninterrupted run; bad files are refused by name."""

import h5py
import numpy as np
import pytest
import torch

from ptycho_core.checkpoint import (
    CheckpointError,
    StorageError,
    atomic_write,
    checkpoint_name,
    latest_valid_checkpoint,
    read_checkpoint,
)
from ptycho_core.reconstruction import Reconstruction

from helpers import config_with

UP = "model_params.update_params"
BASE = {
    f"{UP}.probe_pos_shifts": {"start_iter": 2, "lr": 1e-3},  # every optimized kind, start mid-run
    "recon_params.batch_size": 48,
}


def run(cfg, prep, to, **kw):
    rec = Reconstruction.create(cfg, prep)
    rec.run(to, **kw)
    return rec


def assert_same_tensors(a, b):
    for name, value in a.model.tensors().items():
        assert torch.equal(value, b.model.tensors()[name]), name


@pytest.mark.parametrize("optimizer", [
    {"name": "Adam", "configs": {}},
    {"name": "LBFGS", "configs": {"lr": 0.5, "max_iter": 3, "history_size": 4}},
])
def test_load_state_continues_bitwise(tmp_path, small_dataset, small_prep, one_thread, optimizer):
    cfg = config_with(small_dataset, **BASE, **{"model_params.optimizer_params": optimizer})
    full = run(cfg, small_prep, 6)

    first = run(cfg, small_prep, 3)
    path = first.save(tmp_path / "model.hdf5")
    resumed_cfg = config_with(small_dataset, **BASE, **{
        "model_params.optimizer_params": dict(optimizer, load_state=str(path)),
        "init.model_path": str(path),
    })
    second = Reconstruction.create(resumed_cfg, small_prep)
    assert second.state.iteration == 3
    second.run(6)
    assert_same_tensors(full, second)
    assert second.state.history["loss"] == full.state.history["loss"]


@pytest.mark.parametrize("schedule", [{"kind": "constant"}, {"kind": "step", "gamma": 0.5, "step_iterations": 1}])
def test_resume_mid_iteration_is_bitwise(tmp_path, small_dataset, small_prep, one_thread, schedule):
    cfg = config_with(small_dataset, **BASE, **{"model_params.lr_schedule": schedule})
    full = run(cfg, small_prep, 4)

    first = Reconstruction.create(cfg, small_prep)
    # as a SIGTERM would: ask to stop right after the first batch of iteration 2
    stop = lambda: (first.state.iteration, first.state.batch_cursor) == (1, 1)  # noqa: E731
    assert first.run(4, stop_requested=stop) is True
    assert (first.state.iteration, first.state.batch_cursor) == (1, 1)
    path = first.save(tmp_path / checkpoint_name(1, 1))
    assert path.name == "iter_000001_b0001.h5"

    second = Reconstruction.create(cfg, small_prep)
    second.resume(read_checkpoint(path))
    assert second.run(4) is False
    assert_same_tensors(full, second)
    assert second.state.history["loss"] == full.state.history["loss"]


def test_shape_mismatch_names_tensor_and_shapes(tmp_path, small_dataset, small_prep):
    path = run(config_with(small_dataset), small_prep, 1).save(tmp_path / "m.hdf5")
    cfg = config_with(small_dataset, **{
        "init.object.n_slices": 3,
        "model_params.optimizer_params": {"name": "Adam", "load_state": str(path)},
    })
    before = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        Reconstruction.create(cfg, small_prep)
    msg = str(info.value)
    assert "'obja'" in msg and "(1, 1, 128, 128)" in msg and "(1, 3, 128, 128)" in msg and str(path) in msg
    assert path.read_bytes() == before


def test_different_set_of_optimized_tensors_is_refused(tmp_path, small_dataset, small_prep):
    path = run(config_with(small_dataset), small_prep, 1).save(tmp_path / "m.hdf5")
    cfg = config_with(small_dataset, **{
        f"{UP}.probe": {"start_iter": None, "lr": 0.0},
        "model_params.optimizer_params": {"name": "Adam", "load_state": str(path)},
    })
    with pytest.raises(CheckpointError, match=r"optimizer state covers tensors \['obja', 'objp', 'probe', 'probe_pos_shifts'\]"):
        Reconstruction.create(cfg, small_prep)


def test_damaged_and_incomplete_files_are_refused_and_skipped(tmp_path, small_dataset, small_prep):
    rec = run(config_with(small_dataset), small_prep, 1)
    good = rec.save(tmp_path / checkpoint_name(1))
    rec.run(2)
    newest = rec.save(tmp_path / checkpoint_name(2))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # as if the machine died mid-copy
    with pytest.raises(CheckpointError, match=f"{newest}: damaged or unreadable"):
        read_checkpoint(newest)
    ckpt, skipped = latest_valid_checkpoint(tmp_path)
    assert ckpt.path == good and ckpt.iteration == 1
    assert [p for p, _ in skipped] == [newest] and newest.exists()  # reported, never deleted

    with h5py.File(newest, "w") as f:  # a file whose completeness mark was never written
        f.attrs["format"] = "ptyflow-model"
    with pytest.raises(CheckpointError, match="incomplete model file"):
        read_checkpoint(newest)
    with pytest.raises(CheckpointError, match="model file not found"):
        read_checkpoint(tmp_path / "absent.h5")


def test_failed_write_leaves_previous_file_and_no_temp(tmp_path):
    target = tmp_path / "x.h5"
    target.write_bytes(b"previous")

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="x.h5: No space left on device; what was there before is intact"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["x.h5"]


def test_file_holds_plain_arrays_named_by_tensor(tmp_path, small_dataset, small_prep):
    path = run(config_with(small_dataset, **BASE), small_prep, 2).save(tmp_path / "m.hdf5")
    kinds = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: kinds.append(o.dtype.kind) if isinstance(o, h5py.Dataset) else None)
        # the probe starts at iteration 5 in this config: no optimizer state for it yet
        assert set(f["optimizer/state"]) == {"obja", "objp", "probe_pos_shifts"}
        assert set(f["optimizer/state/objp"]) == {"step", "exp_avg", "exp_avg_sq"}
        assert f["tensors/probe"].dtype == np.complex64 and f.attrs["complete"]
        assert f.attrs["iteration"] == 2
    assert set(kinds) <= {"f", "c", "i", "u", "b"}  # numbers only: nothing to unpickle
