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
    list_checkpoints,
    read_checkpoint,
)
from ptycho_core.inspect import inspect_path
from ptycho_core.io.readers import DataError
from ptycho_core.model import TENSOR_NAMES
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.stages.prepare import prepare
from ptycho_core.stages.segment import run_segment

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


# plateau: an object lr that overshoots at first, so the factor is cut within the four iterations
@pytest.mark.parametrize("schedule, extra", [
    ({"kind": "constant"}, {}), ({"kind": "step", "gamma": 0.5, "step_iterations": 1}, {}),
    ({"kind": "plateau", "patience": 1}, {f"{UP}.objp": {"start_iter": 1, "lr": 0.3}})])
def test_resume_mid_iteration_is_bitwise(tmp_path, small_dataset, small_prep, one_thread, schedule, extra):
    cfg = config_with(small_dataset, **BASE, **extra, **{"model_params.lr_schedule": schedule})
    full = run(cfg, small_prep, 4)
    if schedule["kind"] == "plateau":  # the factor is cut within the run: the resume must repeat it
        assert cfg.model_params.lr_schedule.factor(4, full.state.history["loss"][:3]) < 1, full.state.history["loss"]

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


# --------------------------------------------------------------------------- files of an older ptyflow
def as_format_1(path, lr: dict[str, float], origin: bool = True):
    """Rewrite a model file in place as ptyflow wrote format 1: format_version 1; optimizer param
    groups as build_optimizer made them then (each group's lr as configured, the probe's without
    its amplitude unit, Adam's default eps, no base_lr); without origin_ang when ``origin`` is
    False (the first versions did not record it). Tensors, buffers and the rest of the layout are
    what format 1 had (git log -p ptycho_core/checkpoint.py)."""
    import json

    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 1
        groups = json.loads(f["optimizer"].attrs["param_groups"])
        for group in groups:
            group.pop("base_lr")
            group.update(lr=lr[group["names"][0]], eps=1e-8)
        f["optimizer"].attrs["param_groups"] = json.dumps(groups)
        if not origin:
            del f.attrs["origin_ang"]


def format_1_lrs(cfg):
    return {name: getattr(cfg.model_params.update_params, name).lr for name in TENSOR_NAMES}


@pytest.fixture
def old_run_dir(tmp_path, small_dataset):
    """A run directory whose checkpoints (iterations 1 and 2) an older ptyflow wrote."""
    cfg = config_with(small_dataset, **{"recon_params.iterations": 4, "recon_params.segment_iterations": 2,
                                        "recon_params.segment_figures": False, "recon_params.batch_size": 64})
    run_dir = tmp_path / "old_run"
    prepare(cfg, run_dir)
    run_segment(run_dir, 1)
    run_segment(run_dir, 2)
    for path in list_checkpoints(run_dir / "checkpoints"):  # model.hdf5 is a hard link to the newest
        as_format_1(path, format_1_lrs(cfg))
    return run_dir, cfg


def files_in(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_an_older_run_directory_is_refused_with_what_to_do_and_left_as_it_was(old_run_dir):
    """Resuming continues the optimizer state, which format 1 accumulated for other steps: the run
    stops with one message naming the file and the way on, instead of taking other steps (or
    skipping the file as damaged and starting over)."""
    run_dir, cfg = old_run_dir
    newest = run_dir / "checkpoints" / "iter_000002.h5"
    before = files_in(run_dir)
    ckpt, skipped = latest_valid_checkpoint(run_dir / "checkpoints")
    assert ckpt.path == newest and ckpt.format_version == 1 and not skipped  # old, not damaged
    for attempt in (lambda: prepare(cfg, run_dir), lambda: run_segment(run_dir, 4)):
        with pytest.raises(CheckpointError) as info:
            attempt()
        message = str(info.value)
        assert message.startswith(f"{newest}: written by an older ptyflow (model file format 1"), message
        assert f"init.model_path: {newest}" in message and "init.continue_iteration: true" in message
        assert "\n" not in message  # the CLI prints it as one line
    assert files_in(run_dir) == before


def test_load_state_from_an_older_file_is_refused(old_run_dir, small_dataset, small_prep):
    run_dir, _ = old_run_dir
    old = run_dir / "model.hdf5"
    cfg = config_with(small_dataset, **{"model_params.optimizer_params": {"name": "Adam", "load_state": str(old)}})
    with pytest.raises(CheckpointError, match=rf"^{old}: written by an older ptyflow \(model file format 1; "
                                              r"this ptyflow writes format 2\): its optimizer state"):
        Reconstruction.create(cfg, small_prep)


def test_an_older_file_still_starts_a_run_through_init_model_path(old_run_dir, small_dataset, small_prep, tmp_path):
    """Format 2 changed what the optimizer state means, not the tensors: init.model_path takes them
    from an old file exactly as from the same file in the current format."""
    run_dir, cfg = old_run_dir
    old = run_dir / "model.hdf5"
    current = tmp_path / "current.h5"
    Reconstruction.create(config_with(small_dataset, **{"init.model_path": str(old)}), small_prep).save(current)
    started = {}
    for label, path in (("old", old), ("current", current)):
        rec = Reconstruction.create(config_with(small_dataset, **{
            "init.model_path": str(path), "init.continue_iteration": True, "recon_params.batch_size": 64}), small_prep)
        assert rec.state.iteration == 2
        rec.run(3)
        started[label] = rec
    assert torch.equal(started["old"].model.crop_pos, read_checkpoint(old).crop_pos)
    assert_same_tensors(started["old"], started["current"])


def test_inspect_says_what_an_older_file_is(old_run_dir):
    run_dir, _ = old_run_dir
    report = inspect_path(run_dir / "model.hdf5")
    assert report["kind"] == "checkpoint" and report["iteration"] == 2 and report["format_version"] == 1
    assert "from an older ptyflow" in report["format"] and "init.model_path" in report["format"]
    rows = inspect_path(run_dir)["checkpoints"]
    assert [(r["file"], r["valid"], r["format_version"]) for r in rows] == [
        ("iter_000001.h5", True, 1), ("iter_000002.h5", True, 1)]


def test_a_file_of_a_newer_format_is_refused_not_skipped(tmp_path, small_dataset, small_prep):
    rec = run(config_with(small_dataset), small_prep, 1)
    good = rec.save(tmp_path / checkpoint_name(1))
    newer = rec.save(tmp_path / checkpoint_name(2))
    with h5py.File(newer, "r+") as f:
        f.attrs["format_version"] = 3
    with pytest.raises(CheckpointError, match=rf"^{newer}: written by a newer ptyflow \(model file format 3; "
                                              r"this ptyflow reads formats up to 2\)"):
        latest_valid_checkpoint(tmp_path)  # not skipped as damaged: a resume would start from the older one
    assert read_checkpoint(good).format_version == 2


def test_an_object_from_a_file_without_its_canvas_origin_is_refused(tmp_path, small_dataset, small_prep):
    """The first versions wrote no origin_ang; placing their object as if its canvas started at
    (0, 0) Å would shift it silently."""
    cfg = config_with(small_dataset)
    path = run(cfg, small_prep, 1).save(tmp_path / "m.hdf5")
    as_format_1(path, format_1_lrs(cfg), origin=False)
    with pytest.raises(DataError, match=rf"^{path}: the model file does not record where its canvas lies"):
        Reconstruction.create(config_with(small_dataset, **{
            "init.object.source": "previous", "init.object.path": str(path)}), small_prep)
    # its probe needs no canvas: still taken
    rec = Reconstruction.create(config_with(small_dataset, **{
        "init.probe.source": "previous", "init.probe.path": str(path)}), small_prep)
    assert torch.allclose(rec.model.probe_complex, read_checkpoint(path).tensors["probe"].to(rec.model.probe_complex),
                          rtol=1e-5, atol=1e-5 * rec.model.probe_complex.abs().max())


def _uninterrupted_and_cut(tmp_path, config):
    """(a run directory run to iteration 4, one of the same config stopped at 2)."""
    straight, run_dir = tmp_path / "straight", tmp_path / "run"
    for folder, to_iteration in ((straight, 4), (run_dir, 2)):
        prepare(config, folder)
        run_segment(folder, to_iteration)
    return straight, run_dir


def _assert_same_model(run_dir, other):
    resumed, uninterrupted = read_checkpoint(run_dir / "model.hdf5"), read_checkpoint(other / "model.hdf5")
    assert resumed.iteration == uninterrupted.iteration
    for name in ("objp", "probe"):
        assert torch.equal(resumed.tensors[name], uninterrupted.tensors[name]), name


def _as_an_older_ptyflow_wrote_it(run_dir, key, value=None, config_yaml=True):
    """Make a run directory's newest checkpoint (and config.yaml) read as if a ptyflow that did not
    have the setting ``key`` (dotted) had written them (value None), or one that had it, at ``value``."""
    import json

    import yaml

    def edit(tree):
        *groups, name = key.split(".")
        for group in groups:
            tree = tree[group]
        if value is None:
            del tree[name]
        else:
            tree[name] = value

    if config_yaml:
        written = yaml.safe_load((run_dir / "config.yaml").read_text())
        edit(written)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(written))
    newest = sorted((run_dir / "checkpoints").iterdir())[-1]
    with h5py.File(newest, "r+") as f:
        kept = json.loads(f.attrs["config_resolved"])
        edit(kept)
        f.attrs["config_resolved"] = json.dumps(kept)
        f.attrs["config_hash"] = "from an older ptyflow"


def test_a_resume_under_other_settings_is_refused_naming_them(tmp_path, small_dataset):
    """A run directory whose settings now resolve otherwise (a default changed with an update, or
    config.yaml edited) is refused, the message naming each setting with both values; set as it was,
    the run resumes. Nothing saved is touched by the refusal."""
    import yaml

    from ptycho_core.rundir import RunDirError

    run_dir = tmp_path / "run"
    prepare(config_with(small_dataset, **{"recon_params.iterations": 4}), run_dir)
    run_segment(run_dir, 2)
    saved = {p: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    config_path = run_dir / "config.yaml"
    written = yaml.safe_load(config_path.read_text())
    edited = dict(written, model_params={**written.get("model_params", {}), "lr_schedule": {"kind": "constant"}})
    config_path.write_text(yaml.safe_dump(edited))
    with pytest.raises(RunDirError) as refused:
        run_segment(run_dir, 4)
    assert "model_params.lr_schedule.kind: 'constant' here, 'plateau' before" in str(refused.value)
    assert {p: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()} == saved
    report = inspect_path(run_dir)  # what an operator checks in each run directory after an update
    assert report["resumable"] is False and report["resume_refused"] == str(refused.value)
    edited["model_params"]["lr_schedule"] = {"kind": "plateau"}  # as it was: the same configuration
    config_path.write_text(yaml.safe_dump(edited))
    assert inspect_path(run_dir)["resumable"] is True
    # a file from a ptyflow that had no lr_schedule.patience yet (and none declared how it behaved)
    _as_an_older_ptyflow_wrote_it(run_dir, "model_params.lr_schedule.patience", config_yaml=False)
    with pytest.raises(RunDirError, match=r"lr_schedule.patience: 5 here, '\(not set\)' before.*finish it with that ptyflow"):
        run_segment(run_dir, 4)
    for path, content in saved.items():  # as written: the run resumes
        path.write_bytes(content)
    run_segment(run_dir, 4)
    assert read_checkpoint(run_dir / "model.hdf5").iteration == 4
    assert inspect_path(run_dir)["resumable"] is None  # finished: nothing to continue


def test_preparing_a_run_directory_under_other_settings_is_refused_naming_them(tmp_path, small_dataset):
    """`ptyflow run` on a run directory made with other settings is refused before anything is
    written, naming each setting with both values and how to go on, as a resume is (one check,
    rundir.require_same_config); the free settings (iterations) may change."""
    from ptycho_core.rundir import RunDirError

    run_dir = tmp_path / "run"
    prepare(config_with(small_dataset, **{"recon_params.iterations": 2}), run_dir)
    run_segment(run_dir, 2)
    kept = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    other = config_with(small_dataset, **{"recon_params.iterations": 2, "model_params.update_params.objp.lr": 0.02})
    with pytest.raises(RunDirError, match=r"holds a reconstruction with a different configuration "
                       r"\(model_params.update_params.objp.lr: 0.02 here, 0.01 before\): to resume, set each as it "
                       r"was before .*or use a new run directory"):
        prepare(other, run_dir)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == kept
    prepare(config_with(small_dataset, **{"recon_params.iterations": 4}), run_dir)  # more iterations: the same run
    run_segment(run_dir, 4)
    assert read_checkpoint(run_dir / "model.hdf5").iteration == 4


def test_a_run_an_older_ptyflow_left_resumes_while_a_new_setting_holds_its_old_value(tmp_path, small_dataset,
                                                                                     monkeypatch):
    """After an update that added a setting (config.SETTINGS_ADDED: the setting and the value that
    computes what ptyflow computed without it), a run directory an older ptyflow wrote resumes once
    the setting holds that value, and ends exactly as an uninterrupted run; left to a default that
    computes otherwise, `ptyflow run` refuses it naming the value to set. (lr_schedule.patience
    stands in for a setting added by an update, with 3 as the older ptyflow's behaviour and the
    default 5 as the new one: the run directory's config.yaml and checkpoint are stripped of it.)"""
    from ptycho_core import config as config_module
    from ptycho_core.rundir import RunDirError

    older_behaviour = {"recon_params.iterations": 4, "model_params.lr_schedule.patience": 3}
    straight, run_dir = _uninterrupted_and_cut(tmp_path, config_with(small_dataset, **older_behaviour))
    _as_an_older_ptyflow_wrote_it(run_dir, "model_params.lr_schedule.patience")
    monkeypatch.setattr(config_module, "SETTINGS_ADDED", (("model_params.lr_schedule.patience", 3),))
    kept = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(RunDirError, match=r"lr_schedule.patience: 5 here, 3 before\): to resume, set each as it was"):
        prepare(config_with(small_dataset, **{"recon_params.iterations": 4}), run_dir)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == kept
    prepare(config_with(small_dataset, **older_behaviour), run_dir)  # set as the older ptyflow computed
    run_segment(run_dir, 4)
    _assert_same_model(run_dir, straight)


def test_a_run_an_older_ptyflow_left_resumes_when_a_removed_setting_held_the_value_computed_now(
        tmp_path, small_dataset, monkeypatch):
    """After an update that removed a setting (config.SETTINGS_REMOVED: the setting and the value
    whose results this ptyflow computes), a run directory an older ptyflow made with that value
    resumes and ends exactly as an uninterrupted run; made with another value it is refused, named,
    and nothing saved is touched. (model_params.old_knob stands in for the removed setting.)"""
    from ptycho_core import config as config_module
    from ptycho_core.config import ConfigError

    settings = {"recon_params.iterations": 4}
    straight, run_dir = _uninterrupted_and_cut(tmp_path, config_with(small_dataset, **settings))
    _as_an_older_ptyflow_wrote_it(run_dir, "model_params.old_knob", "on")
    monkeypatch.setattr(config_module, "SETTINGS_REMOVED", (("model_params.old_knob", "off"),))
    kept = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    refusal = r"model_params.old_knob: 'on', a setting this ptyflow no longer has \(it computes as model_params.old_knob: 'off'\)"
    with pytest.raises(ConfigError, match=refusal):
        prepare(config_with(small_dataset, **settings), run_dir)
    with pytest.raises(ConfigError, match=refusal):
        run_segment(run_dir, 4)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == kept
    _as_an_older_ptyflow_wrote_it(run_dir, "model_params.old_knob", "off")  # made as this ptyflow computes
    prepare(config_with(small_dataset, **settings), run_dir)
    run_segment(run_dir, 4)
    _assert_same_model(run_dir, straight)
