"""PNG figures of a checkpoint: object phase, probe modes, loss curve, positions.

The object phase is shown with colour limits taken inside the scanned field (dashed box), since
the margin that only the probe tails reach is noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import Checkpoint


def _pyplot():
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


def _rectangle(lo, hi):
    from matplotlib.patches import Rectangle

    return Rectangle((lo[1] - 0.5, lo[0] - 0.5), hi[1] - lo[1], hi[0] - lo[0], fill=False, ec="C1", lw=0.8, ls="--")


def write_figures(folder: str | Path, ckpt: Checkpoint) -> list[Path]:
    """Write object_phase.png, probe_modes.png, loss.png and positions.png; returns their paths."""
    plt = _pyplot()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t = {k: v.numpy() for k, v in ckpt.tensors.items()}
    written = []

    phase = t["objp"][0]
    window = np.array(t["probe"].shape[-2:])
    centres = ckpt.crop_pos.numpy() + window // 2
    lo, hi = centres.min(axis=0), centres.max(axis=0) + 1
    scanned = (slice(None), slice(lo[0], hi[0]), slice(lo[1], hi[1]))
    panels = [("sum over slices", phase.sum(0))] + ([(f"slice {z}", phase[z]) for z in range(len(phase))] if len(phase) > 1 else [])
    panels = panels[:9]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, image) in zip(axes[0], panels):
        # colour limits from the scanned field: the barely lit margin is noise
        inside = image[scanned[1:]]
        vmin, vmax = np.percentile(inside, [0.5, 99.5]) if inside.size else (None, None)
        im = ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax)
        ax.add_patch(_rectangle(lo, hi))
        ax.set_title(f"object phase, {title}")
        ax.set_axis_off()
        _scale_bar(ax, ckpt.dx_ang, image.shape[1])
        fig.colorbar(im, ax=ax, fraction=0.046, label="rad")
    fig.suptitle(f"iteration {ckpt.iteration}")
    written.append(_save(fig, folder / "object_phase.png", plt))

    probe = t["probe"]
    power = (np.abs(probe) ** 2).sum(axis=(-2, -1))
    fig, axes = plt.subplots(2, len(probe), figsize=(3 * len(probe), 6), squeeze=False)
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
    written.append(_save(fig, folder / "probe_modes.png", plt))

    fig, ax = plt.subplots(figsize=(6, 4))
    hist = ckpt.history
    if hist.get("iteration"):
        for column, values in hist.items():
            if column.startswith("loss"):
                ax.semilogy(hist["iteration"], values, label="total" if column == "loss" else column[5:])
        ax.legend()
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    written.append(_save(fig, folder / "loss.png", plt))

    refined = ckpt.crop_pos.numpy() + t["probe_pos_shifts"] + window // 2
    initial = ckpt.crop_pos.numpy() + window // 2
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(initial[:, 1] * ckpt.dx_ang, initial[:, 0] * ckpt.dx_ang, s=6, c="0.6", label="initial grid px")
    ax.scatter(refined[:, 1] * ckpt.dx_ang, refined[:, 0] * ckpt.dx_ang, s=6, c="C3", label="refined")
    ax.set_xlabel("x (Å)")
    ax.set_ylabel("y (Å)")
    ax.invert_yaxis()
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=8)
    written.append(_save(fig, folder / "positions.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path
