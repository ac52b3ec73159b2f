"""Stage 3 of a run directory: result.zarr and the figures; what a run reached (run_summary)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..checkpoint import Checkpoint, last_value
from ..config import PtyflowConfig
from ..io.preprocess import read_preprocessed
from ..quality import phase_pearson, scanned_field_mask
from ..scan_fit import describe_saved as describe_scan_fit
from ..rundir import RunDirError, RunPaths, newest_checkpoint, read_run_config


def export_run(run_dir: str | Path, figures: bool = True) -> dict:
    """Write result.zarr (and figures) from the newest valid checkpoint; returns a summary
    (previews: {name: PNG bytes} of the phase and the loss curve)."""
    from ..checkpoint import software_versions
    from ..io.export import write_result
    from ..io.figures import thumbnail_pngs, write_figures

    paths = RunPaths(Path(run_dir))
    config = read_run_config(run_dir)
    prep = read_preprocessed(paths.preprocessed)
    ckpt = newest_checkpoint(run_dir)
    if ckpt is None or prep is None:
        raise RunDirError(f"{paths.root}: nothing to export (no valid checkpoint or preprocessed data)")
    summary = run_summary(run_dir, ckpt, prep, config)
    timings = {k: summary[k] for k in ("iterations", "seconds_in_iterations", "median_seconds_per_iteration")}
    write_result(paths.result, ckpt, prep.positions_ang, prep.geometry.positions_px, prep.energy_kev,
                 config.to_dict(), software_versions(), timings)
    figure_paths = (write_figures(paths.figures, ckpt, prep.geometry.positions_px, describe_scan_fit(ckpt.scan_fit))
                    if figures else [])
    # small PNGs of the phase and the loss, drawn from the checkpoint already read, for the
    # Prefect artifact (which embeds them: its file links open only where the run directory is)
    summary.update(result=str(paths.result), figures=[str(p) for p in figure_paths],
                   previews=thumbnail_pngs(ckpt) if figures else {})
    return summary


def run_summary(run_dir: str | Path, ckpt: Optional[Checkpoint] = None, prep=None,
                config: Optional[PtyflowConfig] = None) -> dict:
    """Iteration, final loss, timings and (for simulated data) quality of a run directory."""
    paths = RunPaths(Path(run_dir))
    config = config or read_run_config(run_dir)
    prep = prep or read_preprocessed(paths.preprocessed)
    ckpt = ckpt or newest_checkpoint(run_dir, warn=lambda m: None)
    if ckpt is None or prep is None:
        raise RunDirError(f"{paths.root}: no valid checkpoint or preprocessed data yet")
    seconds = ckpt.history.get("seconds", [])
    summary = {
        "run_dir": str(paths.root),
        "iteration": ckpt.iteration,
        "final_loss": last_value(ckpt.history, "loss"),
        # recon_params.validation_fraction: the score on held-out patterns, and where it was lowest
        "validation_loss": last_value(ckpt.history, "validation_loss"),
        "best_validation_loss": min(ckpt.history["validation_loss"]) if ckpt.history.get("validation_loss") else None,
        "iterations": len(seconds),
        "seconds_in_iterations": float(sum(seconds)),
        "median_seconds_per_iteration": float(sorted(seconds)[len(seconds) // 2]) if seconds else 0.0,
        # model_params.scan_fit: how far off the scan was (a user wants to know it was 3 % off)
        "scan_fit": describe_scan_fit(ckpt.scan_fit),
    }
    summary.update(quality_vs_truth(run_dir, ckpt, prep, config))
    return summary


def quality_vs_truth(run_dir, ckpt: Checkpoint, prep, config: PtyflowConfig) -> dict:
    """Phase Pearson against the ground truth, when the data file carries one (simulated data)."""
    from ..simulate import read_ground_truth

    try:
        truth = read_ground_truth(config.data.path)
    except OSError:
        return {}
    objp = ckpt.tensors["objp"].numpy()[0]
    if "objp" not in truth or truth["objp"][0].shape[1:] != objp.shape[1:]:
        return {}  # another canvas (other pixel size or padding): no pixel-to-pixel comparison
    true_phase = truth["objp"][0]
    mask = scanned_field_mask(prep.geometry.positions_px, prep.geometry.canvas_shape)
    per_slice = ([phase_pearson(objp[z], true_phase[z], mask) for z in range(objp.shape[0])]
                 if true_phase.shape == objp.shape else [])
    return {"phase_pearson": phase_pearson(objp.sum(0), true_phase.sum(0), mask), "phase_pearson_per_slice": per_slice}
