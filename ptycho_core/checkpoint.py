"""model.hdf5: the one checkpoint reader and writer.

Layout (HDF5, no pickle anywhere):
  /                 attrs: format, format_version, iteration, batch_cursor, shape_hash,
                    config_hash, ptyflow/torch versions, created, complete (written last)
  /tensors/<name>   the six optimizable tensors (probe complex)
  /buffers/...      crop_pos (N, 2), occupancies (O,); attrs dx_ang, wavelength_ang
  /optimizer        attrs name, param_groups (JSON: names and settings of each group)
  /optimizer/state/<tensor name>/<key>   optimizer state keyed by tensor name, not by index
  /history/<column> loss history per completed iteration
  /partial_loss     attrs: loss sums of the batches done in an unfinished iteration
  /scan_fit/<name>  where model_params.scan_fit stands (params, step, last_sign; scan_fit.py);
                    absent before its first step
  /rng/torch_cpu    torch's global RNG state
Writes go to a temp file in the same folder, are flushed and fsynced, then os.replace'd.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np
import torch

from .faults import pause_point
from .model import TENSOR_NAMES, PtychoAD

FORMAT = "ptyflow-model"
# 2: the probe's learning rate is in units of the brightest mean-pattern amplitude (its group's lr
#    and eps are scaled) and the loss has a floor relative to the batch's mean intensity, so the
#    optimizer state of a format-1 file was accumulated for other steps. Tensors, buffers and
#    layout are unchanged: a format-1 file still starts a run (init.model_path), it cannot be
#    continued (resume, optimizer_params.load_state).
FORMAT_VERSION = 2


class CheckpointError(ValueError):
    """A model.hdf5 that cannot be used; the message names the file (and tensor, if any)."""


class NewerFormatError(CheckpointError):
    """A model.hdf5 written by a newer ptyflow: not damaged, so a resume must not skip it."""


class StorageError(RuntimeError):
    """A file could not be written (disk full, permissions); the previous version is intact."""


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    iteration: int
    batch_cursor: int
    partial_loss: dict[str, float]
    history: dict[str, list[float]]
    crop_pos: torch.Tensor
    occupancies: torch.Tensor
    dx_ang: float
    wavelength_ang: float
    optimizer_name: Optional[str]
    optimizer_groups: list[dict[str, Any]]
    optimizer_state: dict[str, dict[str, Any]]
    rng_state: Optional[torch.Tensor]
    shape_hash: str
    config_hash: str
    format_version: int = FORMAT_VERSION
    # the configuration the hash is of (PtyflowConfig.resume_dict), so a refusal can name what
    # differs; empty in files written before it was kept
    config_resolved: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    scan_fit: dict[str, np.ndarray] = field(default_factory=dict)  # empty: no step of the fit yet

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.tensors.items()}


@dataclass(frozen=True)
class ResultView:
    """The state of a reconstruction that figures and summaries read, in memory and on the CPU
    (Reconstruction.view). A Checkpoint has the same fields, so either can be drawn."""

    tensors: dict[str, torch.Tensor]  # user-facing shapes, see PtychoAD.tensors()
    crop_pos: torch.Tensor  # (N, 2)
    dx_ang: float
    iteration: int
    history: dict[str, list[float]]
    scan_fit: dict[str, np.ndarray] = field(default_factory=dict)


def shape_hash(shapes: dict[str, tuple[int, ...]]) -> str:
    """Hash of the tensor shapes: two files with equal hashes hold interchangeable tensors."""
    text = json.dumps({k: list(v) for k, v in sorted(shapes.items())})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def checkpoint_name(iteration: int, batch_cursor: int = 0) -> str:
    """iter_000040.h5 after 40 iterations; iter_000040_b0003.h5 after 3 batches of the 41st."""
    return f"iter_{iteration:06d}.h5" if batch_cursor == 0 else f"iter_{iteration:06d}_b{batch_cursor:04d}.h5"


_NAME = re.compile(r"^iter_(\d{6})(?:_b(\d{4}))?\.h5$")


def parse_checkpoint_name(name: str) -> Optional[tuple[int, int]]:
    match = _NAME.match(name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


# Refuse absurd declared sizes before allocating (a crafted file can declare petabytes).
MAX_ELEMENTS = 1 << 34


def _array(ds: h5py.Dataset) -> np.ndarray:
    """A dataset's values, after checking it holds plain numbers of a plausible size."""
    if ds.dtype.kind not in "fciub":
        raise CheckpointError(f"dataset {ds.name} has type {ds.dtype}; only numbers are read from model files")
    if ds.size > MAX_ELEMENTS:
        raise CheckpointError(f"dataset {ds.name} declares {ds.shape} = {ds.size} elements; refusing to allocate it")
    return np.array(ds[()])


# --------------------------------------------------------------------------- generic values
def _write_value(group: h5py.Group, key: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu()
        ds = group.create_dataset(key, data=array.numpy())
        ds.attrs["kind"] = "tensor"
        ds.attrs["torch_dtype"] = str(array.dtype).replace("torch.", "")
    elif isinstance(value, (list, tuple)):
        sub = group.create_group(key)
        sub.attrs["kind"] = "list"
        for i, item in enumerate(value):
            _write_value(sub, str(i), item)
    elif value is None:
        group.create_group(key).attrs["kind"] = "none"
    elif isinstance(value, (bool, int, float)):
        ds = group.create_dataset(key, data=value)
        ds.attrs["kind"] = type(value).__name__
    else:
        raise TypeError(f"cannot store optimizer state '{key}' of type {type(value).__name__}")


def _read_value(node: h5py.Dataset | h5py.Group) -> Any:
    kind = node.attrs.get("kind")
    if kind == "tensor":
        dtype = getattr(torch, str(node.attrs["torch_dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{node.name}: unknown torch dtype {node.attrs['torch_dtype']!r}")
        return torch.from_numpy(_array(node)).to(dtype)
    if kind == "list":
        return [_read_value(node[str(i)]) for i in range(len(node))]
    if kind == "none":
        return None
    if kind in ("bool", "int", "float"):
        return {"bool": bool, "int": int, "float": float}[kind](_array(node))
    raise CheckpointError(f"unknown stored value kind {kind!r} at {node.name}")


# --------------------------------------------------------------------------- optimizer state by name
def optimizer_state_by_name(optimizer: torch.optim.Optimizer) -> tuple[list[dict], dict[str, dict]]:
    """(param groups without tensors, {tensor name: state}) of a ptyflow-built optimizer."""
    sd = optimizer.state_dict()
    index_to_name = {}
    groups = []
    for group in sd["param_groups"]:
        for index, name in zip(group["params"], group["names"]):
            index_to_name[index] = name
        groups.append({k: v for k, v in group.items() if k != "params"})
    return groups, {index_to_name[i]: s for i, s in sd["state"].items()}


def require_current_format(ckpt: Checkpoint) -> None:
    """Refuse to continue a model file of an older format: its optimizer state means other steps."""
    if ckpt.format_version >= FORMAT_VERSION:
        return
    raise CheckpointError(
        f"{ckpt.path}: written by an older ptyflow (model file format {ckpt.format_version}; this ptyflow "
        f"writes format {FORMAT_VERSION}): its optimizer state was accumulated with the probe's learning rate "
        f"in other units and another loss floor, so continuing it would take other steps. Its tensors mean "
        f"what they meant: start a new run directory with init.model_path: {ckpt.path} (and "
        f"init.continue_iteration: true to count on from iteration {ckpt.iteration}), without "
        f"optimizer_params.load_state; the optimizer then starts afresh"
    )


def load_optimizer_state(optimizer: torch.optim.Optimizer, ckpt: Checkpoint) -> None:
    """Continue from ckpt's optimizer state. The current param-group settings (lr, ...) stay."""
    require_current_format(ckpt)
    if ckpt.optimizer_name is None:
        raise CheckpointError(f"{ckpt.path}: holds no optimizer state")
    if ckpt.optimizer_name != type(optimizer).__name__:
        raise CheckpointError(
            f"{ckpt.path}: optimizer state is from {ckpt.optimizer_name}, "
            f"model_params.optimizer_params.name is {type(optimizer).__name__}"
        )
    sd = optimizer.state_dict()
    name_to_index = {}
    for group in sd["param_groups"]:
        name_to_index.update(zip(group["names"], group["params"]))
    file_names = sorted(n for g in ckpt.optimizer_groups for n in g["names"])
    if file_names != sorted(name_to_index):
        raise CheckpointError(
            f"{ckpt.path}: optimizer state covers tensors {file_names}, this run optimizes "
            f"{sorted(name_to_index)}; the set of optimized tensors must be the same"
        )
    sd["state"] = {name_to_index[name]: state for name, state in ckpt.optimizer_state.items()}
    optimizer.load_state_dict(sd)


def check_shapes(ckpt: Checkpoint, model: PtychoAD) -> None:
    own = model.parameter_shapes()
    for name in TENSOR_NAMES:
        if name not in ckpt.tensors:
            raise CheckpointError(f"{ckpt.path}: tensor '{name}' is missing")
        if ckpt.shapes()[name] != own[name]:
            raise CheckpointError(
                f"{ckpt.path}: tensor '{name}' has shape {ckpt.shapes()[name]} in the file "
                f"but {own[name]} in this reconstruction"
            )


# --------------------------------------------------------------------------- write
def software_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ptyflow_version = version("ptyflow")
    except PackageNotFoundError:
        ptyflow_version = "unknown"
    return {"ptyflow_version": str(ptyflow_version), "torch_version": str(torch.__version__)}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path, host: str, pid) -> Path:
    return path.with_name(f".{path.name}.{host}.{pid}.tmp")


def leftover_temporaries(path: Path) -> list[Path]:
    """The partial files that atomic_write calls for ``path`` left behind when their process was
    killed (only meaningful while the caller holds whatever guards ``path``)."""
    path = Path(path)
    return sorted(path.parent.glob(_temporary(path, "*", "*").name))


def atomic_write(path: Path, write) -> None:
    """Write ``path`` through ``write(tmp_path)`` so readers only ever see a complete file."""
    path = Path(path)
    tmp = _temporary(path, socket.gethostname(), os.getpid())
    try:
        write(tmp)
        pause_point("checkpoint_write")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}; what was there before is intact") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(
    path: str | Path,
    model: PtychoAD,
    optimizer: Optional[torch.optim.Optimizer],
    iteration: int,
    batch_cursor: int = 0,
    partial_loss: Optional[dict[str, float]] = None,
    history: Optional[dict[str, list[float]]] = None,
    config_hash: str = "",
    scan_fit: Optional[dict[str, np.ndarray]] = None,
    arrivals_in: Optional[tuple[int, bool]] = None,
    config_resolved: Optional[dict[str, Any]] = None,
) -> Path:
    """Write model.hdf5 atomically; returns the path. ``arrivals_in``: live mode's (patterns
    acquired, acquisition going on) that the iteration in progress draws with (attributes
    ``patterns_in`` and ``acquiring``; arrivals.py); ``config_resolved``: the configuration
    ``config_hash`` is of, kept as JSON (attribute ``config_resolved``)."""
    path = Path(path)

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.attrs.update(
                format=FORMAT,
                format_version=FORMAT_VERSION,
                iteration=int(iteration),
                batch_cursor=int(batch_cursor),
                shape_hash=shape_hash(model.parameter_shapes()),
                config_hash=config_hash,
                config_resolved=json.dumps(config_resolved or {}, sort_keys=True),
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(),
                **software_versions(),
            )
            tensors = f.create_group("tensors")
            for name, value in model.tensors().items():
                tensors.create_dataset(name, data=value.cpu().numpy())
            buffers = f.create_group("buffers")
            buffers.create_dataset("crop_pos", data=model.crop_pos.cpu().numpy())
            buffers.create_dataset("occupancies", data=model.occupancies.cpu().numpy())
            buffers.attrs.update(dx_ang=model.dx_ang, wavelength_ang=model.wavelength_ang)
            f.attrs["origin_ang"] = np.asarray(model.origin_ang, dtype=np.float64)
            if arrivals_in is not None:
                f.attrs.update(patterns_in=int(arrivals_in[0]), acquiring=bool(arrivals_in[1]))
            if optimizer is not None:
                groups, states = optimizer_state_by_name(optimizer)
                opt = f.create_group("optimizer")
                opt.attrs["name"] = type(optimizer).__name__
                opt.attrs["param_groups"] = json.dumps(groups, default=str)
                state_group = opt.create_group("state")
                for name, state in states.items():
                    sub = state_group.create_group(name)
                    for key, value in state.items():
                        _write_value(sub, key, value)
            hist = f.create_group("history")
            for key, values in (history or {}).items():
                hist.create_dataset(key, data=np.asarray(values, dtype=np.float64))
            partial = f.create_group("partial_loss")
            partial.attrs.update({k: float(v) for k, v in (partial_loss or {}).items()})
            if scan_fit:
                fit = f.create_group("scan_fit")
                for key, values in scan_fit.items():
                    fit.create_dataset(key, data=np.asarray(values, dtype=np.float64))
            f.create_group("rng").create_dataset("torch_cpu", data=torch.get_rng_state().numpy())
            f.flush()
            f.attrs["complete"] = True  # the completeness mark goes last

    atomic_write(path, write)
    return path


# --------------------------------------------------------------------------- read
def last_value(history: dict[str, list[float]], column: str) -> Optional[float]:
    """The newest entry of a history column ("loss", "validation_loss", ...), None while empty."""
    return history[column][-1] if history.get(column) else None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a model.hdf5; anything unusable is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            if attrs.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a ptyflow model file (format attribute {attrs.get('format')!r})")
            if not attrs.get("complete", False):
                raise CheckpointError(f"{path}: incomplete model file (no completeness mark; the write was interrupted)")
            version = attrs.get("format_version")
            if not isinstance(version, (int, np.integer)) or version < 1:
                raise CheckpointError(f"{path}: damaged model file (format_version attribute {version!r})")
            if version > FORMAT_VERSION:
                raise NewerFormatError(
                    f"{path}: written by a newer ptyflow (model file format {version}; this ptyflow reads "
                    f"formats up to {FORMAT_VERSION}); continue it with that ptyflow or a newer one"
                )
            tensors = {name: torch.from_numpy(_array(f["tensors"][name])) for name in f["tensors"]}
            buffers = f["buffers"]
            optimizer_name, groups, states = None, [], {}
            if "optimizer" in f:
                optimizer_name = str(f["optimizer"].attrs["name"])
                groups = json.loads(f["optimizer"].attrs["param_groups"])
                # members by name, never group.items()/.values(): h5py holds its global lock between
                # their yields, so one left suspended by an exception keeps it; freed later by the
                # garbage collector in another thread, the lock is never released and that thread
                # deadlocks (a CI run hung at exit that way)
                state = f["optimizer"]["state"]
                states = {name: {key: _read_value(state[name][key]) for key in state[name]} for name in state}
            return Checkpoint(
                path=path,
                tensors=tensors,
                iteration=int(attrs["iteration"]),
                batch_cursor=int(attrs.get("batch_cursor", 0)),
                partial_loss={k: float(f["partial_loss"].attrs[k]) for k in f["partial_loss"].attrs},
                history={k: _array(f["history"][k]).tolist() for k in f["history"]},
                crop_pos=torch.from_numpy(_array(buffers["crop_pos"])),
                occupancies=torch.from_numpy(_array(buffers["occupancies"])),
                dx_ang=float(buffers.attrs["dx_ang"]),
                wavelength_ang=float(buffers.attrs["wavelength_ang"]),
                optimizer_name=optimizer_name,
                optimizer_groups=groups,
                optimizer_state=states,
                rng_state=torch.from_numpy(_array(f["rng"]["torch_cpu"])) if "rng" in f else None,
                shape_hash=str(attrs.get("shape_hash", "")),
                config_hash=str(attrs.get("config_hash", "")),
                config_resolved=json.loads(attrs.get("config_resolved", "") or "{}"),
                format_version=int(version),
                attrs={k: (v.tolist() if isinstance(v, np.ndarray) else v.item() if hasattr(v, "item") else v)
                       for k, v in attrs.items()},
                scan_fit={k: _array(f["scan_fit"][k]) for k in f["scan_fit"]} if "scan_fit" in f else {},
            )
    except CheckpointError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise CheckpointError(f"{path}: {exc}") from None
    except Exception as exc:  # h5py raises OSError/KeyError/... for damaged files
        raise CheckpointError(f"{path}: damaged or unreadable model file ({type(exc).__name__}: {exc})") from None


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Checkpoint files in ``folder``, oldest first (by iteration, then batch cursor)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(parse_checkpoint_name(p.name), p) for p in folder.iterdir()]
    return [p for key, p in sorted((k, p) for k, p in found if k is not None)]


def latest_valid_checkpoint(folder: str | Path) -> tuple[Optional[Checkpoint], list[tuple[Path, str]]]:
    """Newest readable checkpoint in ``folder`` and the (path, reason) of newer damaged ones
    skipped. A file of a newer format is not damaged: its NewerFormatError stops the search (an
    older file's format is for the caller to judge, see require_current_format)."""
    skipped = []
    for path in reversed(list_checkpoints(folder)):
        try:
            return read_checkpoint(path), skipped
        except NewerFormatError:
            raise
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
    return None, skipped
