"""Bad numbers, full disks, hostile files and fuzzed configs: one clear message, nothing lost."""

import contextlib
import importlib
import io
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptycho_core.checkpoint import CheckpointError, StorageError, read_checkpoint
from ptycho_core.engine import NumericalError
from ptycho_core.reconstruction import Reconstruction
from ptycho_core.stages.export import export_run
from ptycho_core.stages.prepare import prepare
from ptycho_core.stages.segment import run_segment

from helpers import config_with

UP = "model_params.update_params"


@pytest.fixture
def run_dir(tmp_path, small_dataset):
    """A run directory with two finished segments (iterations 2 and 4)."""
    cfg = config_with(small_dataset, **{"recon_params.iterations": 8, "recon_params.segment_iterations": 2,
                                        "recon_params.segment_figures": False})
    prepare(cfg, tmp_path / "run")
    run_segment(tmp_path / "run", 2)
    run_segment(tmp_path / "run", 4)
    return tmp_path / "run"


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_numerical_failure_names_iteration_and_tensor_and_keeps_the_last_good_checkpoint(tmp_path, small_dataset):
    # the probe joins at iteration 5 with an absurd learning rate and blows up there
    cfg = config_with(small_dataset, **{"recon_params.iterations": 8, "recon_params.segment_iterations": 4,
                                        f"{UP}.probe": {"start_iter": 5, "lr": 1e30}})
    run_dir = tmp_path / "run"
    prepare(cfg, run_dir)
    run_segment(run_dir, 4)
    before = snapshot(run_dir / "checkpoints")
    with pytest.raises(NumericalError) as info:
        run_segment(run_dir, 8)
    message = str(info.value)
    assert "at iteration 5" in message and "probe" in message and "lower the learning rates" in message
    assert snapshot(run_dir / "checkpoints") == before
    assert read_checkpoint(run_dir / "model.hdf5").iteration == 4


@pytest.mark.parametrize("stage", ["checkpoint", "export"])
def test_a_failed_write_is_a_clear_error_and_keeps_what_was_there(run_dir, monkeypatch, stage):
    export_run(run_dir, figures=False)
    before = snapshot(run_dir)
    real_file = h5py.File

    def no_space(*args, **kwargs):
        if len(args) > 1 and args[1] == "w" or kwargs.get("mode") == "w":
            raise OSError(28, "No space left on device")
        return real_file(*args, **kwargs)

    if stage == "checkpoint":
        monkeypatch.setattr(h5py, "File", no_space)
        with pytest.raises(StorageError, match=r"iter_000006.h5: No space left on device; what was there before is intact"):
            run_segment(run_dir, 6)
    else:
        import zarr

        def zarr_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(zarr, "open_group", zarr_full)
        with pytest.raises(StorageError, match=r"result.zarr: No space left on device; the previous export is intact"):
            export_run(run_dir, figures=False)
    monkeypatch.undo()
    assert snapshot(run_dir) == before
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]


def test_hostile_model_files_are_refused_before_reading(tmp_path, run_dir):
    good = read_checkpoint(run_dir / "model.hdf5")
    import shutil

    for label, edit, message in [
        ("pickled bytes", lambda f: (f["tensors"].pop("probe"), f["tensors"].create_dataset(
            "probe", data=np.void(b"\x80\x04cos\nsystem\n"))), "only numbers are read from model files"),
        ("absurd size", lambda f: (f["tensors"].pop("objp"), f["tensors"].create_dataset(
            "objp", shape=(1 << 20, 1 << 20, 1 << 10), dtype="f4", chunks=(1, 1, 1024))), "refusing to allocate it"),
        ("unknown dtype", lambda f: f["optimizer/state/objp/exp_avg"].attrs.__setitem__("torch_dtype", "Tensor"),
         "unknown torch dtype"),
    ]:
        path = tmp_path / f"{label.replace(' ', '_')}.h5"
        shutil.copy(run_dir / "model.hdf5", path)
        with h5py.File(path, "r+") as f:
            edit(f)
        with pytest.raises(CheckpointError, match=message) as info:
            read_checkpoint(path)
        assert str(path) in str(info.value), label
    assert good.iteration == 4


def test_out_of_memory_splits_batches_and_carries_on(small_dataset, small_prep, monkeypatch):
    cfg = config_with(small_dataset, **{"recon_params.iterations": 3, "recon_params.batch_size": 64})
    rec = Reconstruction.create(cfg, small_prep)
    forward = rec.model.forward

    def small_memory(indices, **kwargs):
        if len(indices) > 16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(indices, **kwargs)

    monkeypatch.setattr(rec.model, "forward", small_memory)
    warnings = []
    rec.run(3, warn=warnings.append)
    assert rec.state.micro_batches == 4
    assert warnings and "splitting each batch into 2 parts" in warnings[0] and "into 4 parts" in warnings[1]
    reference = Reconstruction.create(cfg, small_prep)
    reference.run(3)
    assert np.allclose(rec.state.history["loss"], reference.state.history["loss"], rtol=0.02)


def test_out_of_memory_inside_the_optimizer_update_ends_the_run_and_keeps_the_checkpoints(
        tmp_path, run_dir, small_dataset, monkeypatch, one_thread):
    """Adam updates its param groups one after another: running out of memory at the second group
    leaves the first one stepped. Retrying with smaller batches (what the split did) would step it
    twice; the run ends instead, naming what happened, saves nothing of it, and the rerun from the
    newest checkpoint gives the tensors of a run that never ran out of memory."""
    adam_module = importlib.import_module("torch.optim.adam")  # Adam.step calls its adam() once per group
    real_adam = adam_module.adam
    calls = []

    def adam_short_of_memory(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # the objp group of the second step, after the obja group's update
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_adam(*args, **kwargs)

    before = snapshot(run_dir)
    monkeypatch.setattr(adam_module, "adam", adam_short_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"^out of memory in the optimizer's update at iteration 5, "
                                                          r"after the batch's gradient was computed: the update was "
                                                          r"partly applied, so it is not retried"):
        run_segment(run_dir, 6)
    monkeypatch.undo()
    assert len(calls) == 6 and snapshot(run_dir) == before
    run_segment(run_dir, 6)

    reference = tmp_path / "reference"
    prepare(config_with(small_dataset, **{"recon_params.iterations": 8, "recon_params.segment_iterations": 2,
                                          "recon_params.segment_figures": False}), reference)
    run_segment(reference, 6)
    resumed, uninterrupted = read_checkpoint(run_dir / "model.hdf5"), read_checkpoint(reference / "model.hdf5")
    for name, value in uninterrupted.tensors.items():
        assert torch.equal(resumed.tensors[name], value), name


LBFGS = {"name": "LBFGS", "configs": {"lr": 0.5, "max_iter": 3, "history_size": 4}}


def test_lbfgs_out_of_memory_in_its_first_evaluation_splits_the_batch_and_takes_the_same_steps(
        small_dataset, small_prep, monkeypatch):
    """Before LBFGS's first evaluation of a step returns, it has changed nothing: the batch is split
    and the step retried, with the whole batch's gradient."""
    cfg = config_with(small_dataset, **{"recon_params.dtype": "float64", "recon_params.batch_size": 128,
                                        "model_params.optimizer_params": LBFGS})
    rec = Reconstruction.create(cfg, small_prep)
    forward = rec.model.forward

    def small_memory(indices, **kwargs):
        if len(indices) > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(indices, **kwargs)

    monkeypatch.setattr(rec.model, "forward", small_memory)
    warnings = []
    rec.run(1, warn=warnings.append)
    assert rec.state.micro_batches == 2 and len(warnings) == 1
    reference = Reconstruction.create(cfg, small_prep)
    reference.run(1)
    for name, value in reference.model.tensors().items():
        assert torch.allclose(rec.model.tensors()[name], value, rtol=1e-9, atol=1e-9 * value.abs().max()), name


def test_lbfgs_out_of_memory_after_its_first_evaluation_is_not_retried(small_dataset, small_prep, monkeypatch):
    """LBFGS's later evaluations follow a change of the tensors (and of its history): retrying the
    step would start it from there, so the run ends."""
    cfg = config_with(small_dataset, **{"model_params.optimizer_params": LBFGS})
    rec = Reconstruction.create(cfg, small_prep)
    forward = rec.model.forward
    calls = []

    def short_at_the_second_evaluation(indices, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(indices, **kwargs)

    monkeypatch.setattr(rec.model, "forward", short_at_the_second_evaluation)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="the update was partly applied, so it is not retried"):
        rec.run(1)
    assert rec.state.micro_batches == 1 and len(calls) == 2


# --------------------------------------------------------------------------- config fuzzing
KEYS = {
    "data": ["path", "format", "meas_key", "pos_key", "pos_unit", "scan_shape"],
    "experiment": ["energy_kev", "conv_angle_mrad", "dx_ang", "dk_mrad", "defocus_ang", "aberrations", "scan"],
    "init": ["probe", "object", "model_path"],
    "model_params": ["obj_preblur_std", "optimizer_params", "update_params"],
    "loss_params": ["amplitude", "poisson", "pacbed"],
    "recon_params": ["iterations", "batch_size", "seed", "device", "dtype", "batching"],
    "preprocess": ["bin", "target_size_px", "scan_crop", "normalize"],
}
# no subnormal floats: hypothesis refuses to draw them once something in the process has switched
# the CPU to flush-to-zero (it happened in the suite on torch 2.4.1's CUDA build; the culprit was
# not identified), and a config gains nothing from them
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6),
                    st.floats(allow_nan=True, allow_subnormal=False),
                    st.text(max_size=12), st.lists(st.integers(-3, 300), max_size=4))
values = st.recursive(scalars, lambda inner: st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


@st.composite
def configs(draw):
    raw = {}
    for group in draw(st.lists(st.sampled_from(sorted(KEYS) + ["bogus_group"]), max_size=6, unique=True)):
        keys = KEYS.get(group, ["x"])
        raw[group] = {k: draw(values) for k in draw(st.lists(st.sampled_from(keys + ["bogus"]), max_size=4, unique=True))}
    return raw


def cli_in_process(args) -> tuple[int, str]:
    """Run ``ptyflow ARGS`` in this process: (exit code, stderr)."""
    from flows import cli

    err = io.StringIO()
    old_argv, old_console = sys.argv, cli.console
    sys.argv = ["ptyflow", *map(str, args)]
    cli.console = cli.Console(file=err, soft_wrap=True, width=400)
    try:
        with contextlib.redirect_stderr(err):
            cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv, cli.console = old_argv, old_console
    return code, err.getvalue()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=configs(), as_text=st.booleans(), garbage=st.text(max_size=40))
def test_fuzzed_configs_end_in_one_message(tmp_path_factory, raw, as_text, garbage):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "config.yaml"
    path.write_text(garbage if as_text else yaml.safe_dump(raw))
    code, err = cli_in_process(["run", path, "--run-dir", folder / "run"])
    assert code == 2, (code, err)
    assert "Traceback" not in err and err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    assert not (folder / "run").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]

