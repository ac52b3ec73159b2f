"""Tuning without ground truth, checked against one: an optuna sweep scored by the validation
loss on abTEM data, every trial then scored against abTEM's true phase.

    python benchmarks/tuning.py [--dose 1e4] [--trials 16] [--iterations 20] [--data DIR] [--out DIR]

The data are the thick SrTiO3 quality dataset (tests/abtem_data.py: 9.4 nm, 300 keV, 20 mrad,
1024 patterns of 64²), made from abTEM's noise-free patterns at ``--dose`` e/Å² with Poisson noise.
The sweep runs on the path users run (`ptyflow sweep`, embedded Prefect): the object's learning
rate, the slice count and thickness and the probe modes, chosen by Optuna's TPE sampler on the
held-out patterns' loss, median pruner. Then each trial's phase is scored against the truth
(Pearson after registration, as in quality.py), which the sweep never saw: does the validation
loss rank the trials as the truth does? Writes tuning.json and tuning.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from abtem_data import quality_config, quality_dataset, score_against_truth  # noqa: E402

SPEC = {
    "mode": "optuna", "objective": "validation_loss", "sampler": "tpe", "pruner": "median", "seed": 0,
    "parameters": {
        "model_params.update_params.objp.lr": {"low": 1e-3, "high": 1e-1, "log": True},
        "init.object.n_slices": {"choices": [1, 2, 4, 8]},
        "init.object.slice_thickness_ang": {"low": 5.0, "high": 50.0, "log": True},
        "init.probe.n_modes": {"low": 1, "high": 4},
    },
}


def low_dose_copy(clean: Path, dose: float, out: Path, seed: int = 0) -> Path:
    """The clean dataset at ``dose`` e/Å² with Poisson noise (same scaling as simulate_quality)."""
    if out.exists():
        return out
    with h5py.File(clean, "r") as f:
        patterns = f["meas"][()].astype(np.float64)
        attrs = dict(f.attrs)
        truth = f["truth_phase"][()]
    patterns *= dose * attrs["step_ang"] ** 2 / patterns.sum(axis=(-2, -1)).mean()
    noisy = np.random.default_rng(seed).poisson(patterns).astype(np.float32)
    with h5py.File(out, "w") as f:
        f["meas"] = noisy
        f["truth_phase"] = truth
        f.attrs.update({**attrs, "dose_e_per_ang2": dose})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dose", type=float, default=1e4)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--segment", type=int, default=5, help="iterations per segment (pruning points)")
    parser.add_argument("--data", default=str(HERE / "results" / "abtem"), help="cache of the abTEM datasets")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()

    out = Path(args.out)
    work = out / "tuning"
    work.mkdir(parents=True, exist_ok=True)
    data = low_dose_copy(quality_dataset(Path(args.data), "thick", noisy=False), args.dose,
                         Path(args.data) / f"sto_thick_dose{args.dose:g}.h5")
    base = quality_config(data, slices=1, iterations=args.iterations)
    base["recon_params"].update(segment_iterations=args.segment, segment_figures=False)
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    (work / "spec.yaml").write_text(yaml.safe_dump({**SPEC, "n_trials": args.trials}))
    study = work / "study"
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "sweep", str(work / "base.yaml"), str(work / "spec.yaml"),
                           "--out", str(study)], cwd=HERE.parent, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(HERE.parent)})
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"ptyflow sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    import zarr

    rows = []
    with open(study / "sweep.csv") as fh:
        import csv

        for row in csv.DictReader(fh):
            result = zarr.open_group(str(Path(row["run_dir"]) / "result.zarr"), mode="r")
            phase = np.asarray(result["object_phase"][0]).sum(0)
            centres = np.asarray(result["positions_px"][:])
            rows.append({
                "trial": row["point"], "state": row["state"], "pruned_at": row["pruned_at_iteration"] or None,
                "objp_lr": float(row["model_params.update_params.objp.lr"]),
                "n_slices": int(row["init.object.n_slices"]),
                "slice_thickness_ang": round(float(row["init.object.slice_thickness_ang"]), 2),
                "probe_modes": int(row["init.probe.n_modes"]),
                "validation_loss": float(row["validation_loss"]), "seconds": round(float(row["seconds"]), 1),
                "pearson_vs_truth": round(score_against_truth(phase, centres, data), 4),
            })
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    ranks = lambda values: np.argsort(np.argsort(values))  # noqa: E731
    spearman = float(np.corrcoef(ranks([r["validation_loss"] for r in complete]),
                                 ranks([-r["pearson_vs_truth"] for r in complete]))[0, 1]) if len(complete) > 2 else None
    best_val = min(complete, key=lambda r: r["validation_loss"])
    best_truth = max(complete, key=lambda r: r["pearson_vs_truth"])
    summary = {"dose_e_per_ang2": args.dose, "trials": len(rows), "pruned": sum(r["state"] == "PRUNED" for r in rows),
               "wall_seconds": round(wall, 1), "spearman_validation_vs_truth": spearman,
               "best_by_validation": best_val, "best_by_truth": best_truth}
    (out / "tuning.json").write_text(json.dumps({"summary": summary, "trials": rows}, indent=1))
    lines = [f"abTEM SrTiO3 9.4 nm, {args.dose:g} e/Å², {args.iterations} iterations per trial "
             f"(segments of {args.segment}); `ptyflow sweep`, {len(rows)} trials, {summary['pruned']} pruned, "
             f"{wall:.0f} s wall.", "",
             "| trial | state | objp lr | slices | dz (Å) | probe modes | validation loss | Pearson vs truth | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        state = r["state"] + (f" at {r['pruned_at']}" if r["pruned_at"] else "")
        lines.append(f"| {r['trial']} | {state} | {r['objp_lr']:.2g} | {r['n_slices']} | {r['slice_thickness_ang']} | "
                     f"{r['probe_modes']} | {r['validation_loss']:.5f} | {r['pearson_vs_truth']:.3f} | {r['seconds']} |")
    lines += ["", f"Spearman rank correlation of the validation loss with the truth's ranking over the complete "
              f"trials: {spearman:.2f}. Best by validation loss: {best_val['trial']} (Pearson "
              f"{best_val['pearson_vs_truth']:.3f}); best by the truth: {best_truth['trial']} (Pearson "
              f"{best_truth['pearson_vs_truth']:.3f})."]
    (out / "tuning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
