"""PNG figures of a reconstruction (in memory or a checkpoint): object phase, probe modes, loss, positions.

The object phase is shown over the scanned field: the margin that only the probe tails reach is
noise and would set the colour scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint, ResultView
from ..quality import scan_step_px, scanned_field_box

MAX_DRAWN_POSITIONS = 5000


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: runs have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scale_bar(ax, dx_ang: float, width_px: int) -> None:
    """A white bar of a round length in Å in the lower left corner."""
    target = width_px * dx_ang / 5
    length = min((1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), key=lambda v: abs(v - target))
    px = length / dx_ang
    ny = ax.get_images()[0].get_array().shape[0]
    ax.plot([0.05 * width_px, 0.05 * width_px + px], [0.93 * ny] * 2, color="white", lw=3)
    ax.text(0.05 * width_px + px / 2, 0.89 * ny, f"{length:g} Å", color="white", ha="center", va="bottom", fontsize=9)


def write_figures(folder: str | Path, ckpt: Checkpoint | ResultView, initial_positions_px: np.ndarray | None = None,
                  scan: dict | None = None) -> list[Path]:
    """Write object_phase.png, probe_modes.png, loss.png and positions.png; returns their paths.

    ckpt: a checkpoint read from disk, or Reconstruction.view() of a running reconstruction.

    initial_positions_px (N, 2): probe centres on the canvas before refinement, to draw the
    position corrections (magnified); without it none are drawn. scan: the scan's measured and
    fitted error (scan_fit.describe_saved), drawn beside the positions (its map in the title, its
    drift against the acquisition time)."""
    plt = pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    figures = {"object_phase": _object_phase, "probe_modes": _probe_modes, "loss": _loss_curve,
               "positions": lambda plt, ckpt: _positions(plt, ckpt, initial_positions_px, scan)}
    return [_save(draw(plt, ckpt), folder / f"{name}.png", plt) for name, draw in figures.items()]


def _probe_centres_px(ckpt: Checkpoint | ResultView) -> np.ndarray:
    """(N, 2) centres of the probe windows on the canvas (whole pixels)."""
    return ckpt.crop_pos.numpy() + np.array(ckpt.tensors["probe"].shape[-2:]) // 2


def _object_phase(plt, ckpt: Checkpoint | ResultView):
    """The phase summed over slices and, for multislice objects, each slice (up to 8)."""
    phase = ckpt.tensors["objp"].numpy()[0]
    # show the scanned field (plus a small margin): the rest is lit only by the probe tails
    phase = phase[(slice(None), *scanned_field_box(_probe_centres_px(ckpt), phase.shape[-2:], margin_px=4))]
    panels = [("sum over slices", phase.sum(0))] + ([(f"slice {z}", phase[z]) for z in range(len(phase))] if len(phase) > 1 else [])
    panels = panels[:9]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4), squeeze=False, layout="constrained")
    for ax, (title, image) in zip(axes[0], panels):
        vmin, vmax = np.percentile(image, [0.5, 99.5])
        im = ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax)
        ax.set_title(f"object phase, {title}")
        ax.set_axis_off()
        _scale_bar(ax, ckpt.dx_ang, image.shape[1])
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label("phase (rad)")
    fig.suptitle(f"iteration {ckpt.iteration}, scanned field")
    return fig


def _probe_modes(plt, ckpt: Checkpoint | ResultView):
    """Each probe mode's amplitude, with its share of the power, and its phase where it is lit."""
    probe = ckpt.tensors["probe"].numpy()
    power = (np.abs(probe) ** 2).sum(axis=(-2, -1))
    fig, axes = plt.subplots(2, len(probe), figsize=(3 * len(probe), 6), squeeze=False, layout="constrained")
    for m in range(len(probe)):
        axes[0, m].imshow(np.abs(probe[m]), cmap="magma")
        axes[0, m].set_title(f"mode {m}: {100 * power[m] / power.sum():.1f} % power")
        amplitude = np.abs(probe[m])
        # the phase means nothing where there is no intensity: show it only where it is lit
        shown = np.where(amplitude > 0.05 * amplitude.max(), np.angle(probe[m]), np.nan)
        axes[1, m].imshow(shown, cmap="twilight", vmin=-np.pi, vmax=np.pi)
        axes[1, m].set_title("phase")
        for ax in axes[:, m]:
            ax.set_axis_off()
    _scale_bar(axes[0, 0], ckpt.dx_ang, probe.shape[-1])
    return fig


def _loss_curve(plt, ckpt: Checkpoint | ResultView):
    """Every loss term per iteration, and the held-out patterns' score."""
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    hist = ckpt.history
    if hist.get("iteration"):
        for column, values in hist.items():
            if column.startswith("loss"):
                ax.semilogy(hist["iteration"], values, label="total" if column == "loss" else column[5:])
        if hist.get("validation_loss"):
            ax.semilogy(hist["iteration"], hist["validation_loss"], "k--", label="held-out patterns")
        ax.legend()
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    return fig


def _positions(plt, ckpt: Checkpoint | ResultView, initial_positions_px: np.ndarray | None, scan: dict | None = None):
    """The scan positions and their corrections, magnified (up to ten times); with ``scan``, the scan's
    affine map in the title and its drift over the acquisition in a second panel."""
    refined = _probe_centres_px(ckpt) + ckpt.tensors["probe_pos_shifts"].numpy()
    initial = refined if initial_positions_px is None else np.asarray(initial_positions_px)
    moved = refined - initial
    rms = float(np.sqrt((moved**2).sum(axis=1).mean()))
    # magnified up to ten times, so that the typical arrow is half a scan step (a pixel of
    # correction at a 2-pixel step would cover the scan at ten times)
    step = scan_step_px(initial) if len(initial) > 1 else 1.0
    magnify = float(np.clip(0.5 * step / max(rms, 1e-12), 1.0, 10.0)) if np.isfinite(step) else 10.0
    # a facility scan has 10^5-10^6 positions: draw an even subset (the RMS is over all of them)
    every = max(1, -(-len(initial) // MAX_DRAWN_POSITIONS))
    initial, moved = initial[::every], moved[::every]
    if scan:
        fig, (ax, drift_ax) = plt.subplots(1, 2, figsize=(10, 5.5), layout="constrained", width_ratios=(1.2, 1))
        _scan_panel(fig, drift_ax, scan)
    else:
        fig, ax = plt.subplots(figsize=(5.5, 5.5), layout="constrained")
    ax.scatter(initial[:, 1] * ckpt.dx_ang, initial[:, 0] * ckpt.dx_ang, s=5, c="0.5",
               label="initial" if every == 1 else f"initial, every {every}th")
    ax.quiver(initial[:, 1] * ckpt.dx_ang, initial[:, 0] * ckpt.dx_ang, magnify * moved[:, 1] * ckpt.dx_ang,
              magnify * moved[:, 0] * ckpt.dx_ang, angles="xy", scale_units="xy", scale=1, color="C3", width=0.004,
              label=f"correction x{magnify:.2g}")
    ax.set_title(f"probe positions, RMS correction {rms:.3f} px ({rms * ckpt.dx_ang:.3f} Å)")
    ax.set_xlabel("x (Å)")
    ax.set_ylabel("y (Å)")
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def _scan_panel(fig, ax, scan: dict) -> None:
    """The scan's error: its affine map (measured and fitted) as the figure's title, the drift's
    knots (y, x) against the acquisition time in ``ax``."""
    fig.suptitle("scan: " + scan["in_words"].replace(" (measured", "\n(measured"), fontsize=10)
    times, knots = np.asarray(scan["scan_drift_times"]), np.asarray(scan["scan_drift_px"]).reshape(-1, 2)
    ends = np.array([0.0, 1.0])
    for axis, name in enumerate(("y", "x")):
        # the knots of a drift that starts and ends at zero (its constant and linear parts are the map's)
        ax.plot(np.concatenate([ends[:1], times, ends[1:]]), np.concatenate([[0.0], knots[:, axis], [0.0]]),
                "o-", label=f"drift {name}")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("acquisition time (fraction of the scan)")
    ax.set_ylabel("drift beyond the affine map (px)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def thumbnail_pngs(ckpt: Checkpoint | ResultView, max_px: int = 192, min_px: int = 0) -> dict[str, bytes]:
    """Small PNGs to embed where a file link does not open (the Prefect UI on another machine):
    ``phase``, the object phase summed over slices over the scanned field, at most ``max_px`` on a
    side (every n-th pixel), and at least ``min_px`` (each pixel repeated: a markdown image
    cannot be given a size); ``loss``, the total loss per iteration."""
    import io

    plt = pyplot()
    phase = ckpt.tensors["objp"][0].numpy().sum(0)
    phase = phase[scanned_field_box(_probe_centres_px(ckpt), phase.shape, margin_px=4)]
    step = max(1, -(-max(phase.shape) // max_px))
    phase = phase[::step, ::step]
    repeat = max(1, min_px // max(phase.shape))
    phase = np.repeat(np.repeat(phase, repeat, axis=0), repeat, axis=1)
    vmin, vmax = np.percentile(phase, [0.5, 99.5])
    out = {}
    buffer = io.BytesIO()
    plt.imsave(buffer, phase, cmap="gray", vmin=vmin, vmax=vmax if vmax > vmin else vmin + 1, format="png")
    out["phase"] = buffer.getvalue()
    fig, ax = plt.subplots(figsize=(3.2, 2.0), layout="constrained")
    hist = ckpt.history
    if hist.get("iteration"):
        ax.semilogy(hist["iteration"], hist["loss"], color="C0")
        if hist.get("validation_loss"):
            ax.semilogy(hist["iteration"], hist["validation_loss"], "k--")
    ax.set_xlabel("iteration", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=80, format="png")
    plt.close(fig)
    out["loss"] = buffer.getvalue()
    return out


def _save(fig, path: Path, plt) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    # constrained layout, not bbox_inches="tight": "tight" draws every figure twice
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
