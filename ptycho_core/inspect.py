"""What a run directory, a checkpoint or a result.zarr holds, as a dict with stable keys."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import FORMAT_VERSION, CheckpointError, last_value, read_checkpoint
from .rundir import (
    RunDirError,
    RunPaths,
    checkpoint_summary,
    is_finished,
    newest_checkpoint,
    read_run_config,
    require_resumable,
    segment_ends,
)
from .runlock import lock_holder
from .scan_fit import describe_saved as describe_scan_fit


def inspect_path(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise RunDirError(f"{path}: no such file or directory")
    if path.suffix == ".zarr" or (path / "zarr.json").is_file():
        from .io.export import read_result_summary

        return {"kind": "result", "path": str(path), **read_result_summary(path)}
    if path.is_file():
        ckpt = read_checkpoint(path)
        return {
            "kind": "checkpoint",
            "path": str(path),
            "iteration": ckpt.iteration,
            "batch_cursor": ckpt.batch_cursor,
            "last_loss": last_value(ckpt.history, "loss"),
            "last_validation_loss": last_value(ckpt.history, "validation_loss"),
            "scan_fit": describe_scan_fit(ckpt.scan_fit),
            "tensors": {k: list(v) for k, v in ckpt.shapes().items()},
            "optimizer": ckpt.optimizer_name,
            "optimizer_state_for": sorted(ckpt.optimizer_state),
            "created": ckpt.attrs.get("created"),
            "format_version": ckpt.format_version,
            "format": (f"ptyflow model file format {ckpt.format_version}" if ckpt.format_version == FORMAT_VERSION
                       else f"ptyflow model file format {ckpt.format_version}, from an older ptyflow: its tensors "
                            "can start a run (init.model_path), its optimizer state cannot be continued"),
        }
    return inspect_run_dir(path)


def inspect_run_dir(run_dir: Path) -> dict:
    paths = RunPaths(run_dir)
    report = {
        "kind": "run_dir",
        "path": str(run_dir),
        "preprocessed": paths.preprocessed.is_file(),
        "iteration": 0,
        "target_iteration": None,
        "finished": False,
        "segments_done": 0,
        "last_loss": None,
        "last_validation_loss": None,  # recon_params.validation_fraction > 0: the held-out patterns' loss
        "scan_fit": None,  # model_params.scan_fit: the scan's fitted affine map and drift
        "checkpoints": checkpoint_summary(run_dir),
        "export": paths.result.is_dir(),
        "figures": sorted(p.name for p in paths.figures.glob("*.png")) if paths.figures.is_dir() else [],
        "locked_by": None,  # the living process holding it (host, PID, since, flow run)
        "stale_lock": None,  # what a process that died holding it (SIGKILL) left in .lock
        # whether this ptyflow can continue its newest checkpoint under the settings the run
        # directory's config.yaml holds (None: nothing to continue), and if not why: what to check
        # in every run directory after an update (a rerun with another config file is compared
        # with config.yaml as well, by prepare)
        "resumable": None,
        "resume_refused": None,
    }
    try:
        config = read_run_config(run_dir)
    except RunDirError:
        return report
    ckpt = newest_checkpoint(run_dir, warn=lambda m: None)
    done = ckpt.iteration if ckpt else 0
    all_ends = segment_ends(config, 0)
    report.update(
        iteration=done,
        target_iteration=all_ends[-1] if all_ends else done,
        finished=is_finished(config, ckpt),
        segments_done=sum(1 for e in all_ends if e <= done),
        last_loss=last_value(ckpt.history, "loss") if ckpt else None,
        last_validation_loss=last_value(ckpt.history, "validation_loss") if ckpt else None,
        scan_fit=describe_scan_fit(ckpt.scan_fit) if ckpt else None,
    )
    if ckpt is not None and not report["finished"]:
        try:
            require_resumable(ckpt, config, paths.config)
            report["resumable"] = True
        except (RunDirError, CheckpointError) as exc:
            report["resumable"], report["resume_refused"] = False, str(exc)
    report["locked_by"], report["stale_lock"] = lock_holder(run_dir)
    return report
