"""Reconstruction quality per iteration on independent data: ptyflow beside PtyRAD 1.0.0.

    python benchmarks/quality.py --ptyrad-python /path/to/ptyrad-venv/bin/python [--iterations 20]
        [--cases thin,thick,realistic] [--runs NAME,...] [--score-at 5,10,20,100] [--data DIR] [--out DIR]

The data are abTEM simulations of SrTiO3 [001] (tests/abtem_data.py: 300 keV, 20 mrad,
1024 patterns of 64², Poisson noise at 1e6 e/Å²; 1.6 nm thin, 9.4 nm thick reconstructed with 8
slices; realistic: 3.1 nm in 4 slices with frozen phonons, a finite source, scan errors, a
detector PSF and 5e4 e/Å², given the nominal raster like the others; runs named true-positions
are given the positions the probe really had, from the file's truth/ group). Each run is scored by the Pearson correlation of its depth-summed object phase with
abTEM's depth-summed transmission phase over the scanned field, after registering the two by the
shift that correlates best (the codes place their canvases differently). Writes quality.json and
quality.md to --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from abtem_data import (REALISTIC_SLICES, TRUE_POSITIONS, quality_config, quality_dataset,  # noqa: E402  (shared with the slow tests)
                        realistic_dataset, score_against_truth)

SLICES = {"thin": 1, "thick": 8, "realistic": REALISTIC_SLICES}

# PtyRAD 1.0.0's defaults as ptyflow settings: Adam; object lr 5e-4, probe 1e-4 and positions
# 5e-4 from iteration 1, held for the whole run; 4 probe modes; probe-mode orthogonalization, fixed probe intensity,
# lateral blur 0.4 px, depth blur 1 slice and position recentring after every iteration.
PTYRAD_SETTINGS = {
    "init.probe.n_modes": 4,
    "model_params.update_params.obja": {"start_iter": 1, "lr": 5e-4},
    "model_params.update_params.objp": {"start_iter": 1, "lr": 5e-4},
    "model_params.update_params.probe": {"start_iter": 1, "lr": 1e-4},
    "model_params.update_params.probe_pos_shifts": {"start_iter": 1, "lr": 5e-4},
    "constraint_params.obj_blur": {"start_iter": 1, "stop_iter": None, "std_px": 0.4},
    "constraint_params.depth_blur": {"start_iter": 1, "std_slices": 1.0},
    "constraint_params.position_limit": {"start_iter": 1, "max_px": 0.0, "remove_drift": True},
    "model_params.lr_schedule": {"kind": "constant"},
}
# name -> (code, settings, iterations factor)
RUNS = {
    "ptyrad-defaults": ("ptyrad", {}, 1),
    "ptyflow-ptyrad-settings": ("ptyflow", PTYRAD_SETTINGS, 1),
    "ptyflow-defaults": ("ptyflow", {}, 1),
    "ptyflow-reference": ("ptyflow", {"defaults": "reference"}, 1),
    "ptyrad-defaults-x5": ("ptyrad", {}, 5),
    "ptyflow-defaults-x10": ("ptyflow", {}, 10),
    # on the realistic case (the true positions are in its file only)
    "ptyflow-defaults-x5": ("ptyflow", {}, 5),
    "ptyflow-true-positions": ("ptyflow", TRUE_POSITIONS, 1),
    "ptyrad-true-positions": ("ptyrad", TRUE_POSITIONS, 1),
    # PtyRAD given the nominal raster through the same 'custom' position source: checks that source's
    # convention against its own raster (ptyrad-defaults)
    "ptyrad-nominal-as-custom": ("ptyrad", {"data.pos_key": "truth/nominal_positions_yx_ang", "data.pos_unit": "ang"}, 1),
    "ptyflow-true-positions-x5": ("ptyflow", TRUE_POSITIONS, 5),
    "ptyflow-modes4": ("ptyflow", {"init.probe.n_modes": 4}, 1),
    "ptyflow-detector-blur": ("ptyflow", {"model_params.detector_blur_std": 0.6}, 1),
    "ptyflow-modes4-detector-blur": ("ptyflow", {"init.probe.n_modes": 4, "model_params.detector_blur_std": 0.6}, 1),
    "ptyflow-true-positions-modes4": ("ptyflow", {**TRUE_POSITIONS, "init.probe.n_modes": 4}, 1),
    "ptyflow-true-positions-detector-blur": ("ptyflow", {**TRUE_POSITIONS, "model_params.detector_blur_std": 0.6}, 1),
    "ptyflow-true-positions-modes4-detector-blur": (
        "ptyflow", {**TRUE_POSITIONS, "init.probe.n_modes": 4, "model_params.detector_blur_std": 0.6}, 1),
}


# --------------------------------------------------------------------------- the two codes
def ptyflow_config(data: Path, slices: int, iterations: int, settings: dict):
    from ptycho_core.config import config_from_dict, set_dotted

    raw = quality_config(data, slices, iterations)
    for key, value in settings.items():
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def run_ptyflow(data: Path, slices: int, iterations: int, settings: dict, threads: int,
                score_at: tuple[int, ...] = ()) -> list[dict]:
    """One reconstruction of ``iterations``; a result after each iteration of score_at (and the last)."""
    import torch

    from ptycho_core.io.preprocess import read_preprocessed
    from ptycho_core.reconstruction import Reconstruction
    from ptycho_core.stages.prepare import prepare

    torch.set_num_threads(threads)
    config = ptyflow_config(data, slices, iterations, settings)
    results, seconds = [], 0.0
    # the reconstruction reads its patterns from preprocessed.h5: the folder lives as long as it runs
    with tempfile.TemporaryDirectory() as tmp:
        prepare(config, Path(tmp) / "run")
        rec = Reconstruction.create(config, read_preprocessed(Path(tmp) / "run" / "preprocessed.h5"))
        for stop in sorted({i for i in score_at if i < iterations} | {iterations}):
            started = time.perf_counter()
            rec.run(stop)
            seconds += time.perf_counter() - started
            model = rec.model
            per_iteration = rec.state.history.get("seconds", [])[1:]  # the first includes start-up
            results.append({"iterations": stop, "phase_sum": model.objp.detach().cpu().numpy()[0].sum(axis=0),
                            "positions_px": model.centres_px(), "loss": list(rec.state.history.get("loss", [])),
                            "validation_loss": (rec.state.history.get("validation_loss") or [None])[-1],
                            "seconds": seconds,
                            "s_per_it": float(np.median(per_iteration)) if per_iteration else None})
    return results


def run_ptyrad(python: str, data: Path, slices: int, iterations: int, settings: dict, threads: int,
               score_at: tuple[int, ...] = ()) -> list[dict]:
    """One PtyRAD run of ``iterations``; a result after each iteration of score_at (and the last)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "settings.json"
        spec.write_text(json.dumps({"iterations": iterations, "threads": threads, "slices": slices,
                                    "score_at": list(score_at), **settings}))
        out = Path(tmp) / "result.npz"
        started = time.perf_counter()
        proc = subprocess.run([python, str(HERE / "ptyrad_quality_driver.py"), str(data), str(spec), str(out)],
                              capture_output=True, text=True, cwd=HERE)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"PtyRAD failed:\n{proc.stderr[-3000:]}")
        result = dict(np.load(out))
    seconds, loss = result["seconds"], result["loss"].tolist()
    per_iteration = seconds[1:]
    results = []
    for stop in sorted({i for i in score_at if i < iterations}):
        results.append({"iterations": stop, "phase_sum": result[f"objp_iter{stop}"][0].sum(axis=0),
                        "positions_px": result[f"positions_px_iter{stop}"], "loss": loss[:stop],
                        "seconds": float(seconds[:stop].sum()),
                        "s_per_it": float(np.median(seconds[1:stop])) if stop > 1 else None})
    results.append({"iterations": iterations, "phase_sum": result["objp"][0].sum(axis=0),
                    "positions_px": result["positions_px"], "loss": loss,
                    "seconds": time.perf_counter() - started,
                    "s_per_it": float(np.median(per_iteration)) if len(per_iteration) else None})
    return results


def score_run(result: dict, data: Path) -> float:
    return score_against_truth(result["phase_sum"], result["positions_px"], data)


def case_dataset(folder: Path, case: str) -> tuple[Path, int]:
    """The dataset of a case (thin, thick, their -clean variants, realistic) and its slices."""
    name, _, clean = case.partition("-")
    if name not in SLICES:
        raise SystemExit(f"--cases: unknown case '{case}'; expected thin, thick, thin-clean, thick-clean or realistic")
    if name == "realistic":
        return realistic_dataset(folder), SLICES[name]
    return quality_dataset(folder, name, noisy=not clean), SLICES[name]


def has_true_positions(data: Path) -> bool:
    import h5py

    with h5py.File(data, "r") as f:
        return TRUE_POSITIONS["data.pos_key"] in f


def markdown_table(rows: list[dict]) -> str:
    """One line per case and run, one column per scored iteration count."""
    counts = sorted({r["iterations"] for r in rows})
    lines = ["| case | run | " + " | ".join(f"iter {i}" for i in counts) + " | s/it |",
             "|---|---|" + "---|" * (len(counts) + 1)]
    for case, run in dict.fromkeys((r["case"], r["run"]) for r in rows):
        cells = {r["iterations"]: r for r in rows if (r["case"], r["run"]) == (case, run)}
        s_per_it = cells[max(cells)]["s_per_it"]
        scores = " | ".join(f"{cells[i]['pearson']:.3f}" if i in cells else "" for i in counts)
        timing = f"{s_per_it:.3f}" if s_per_it is not None else ""
        lines.append(f"| {case} | {run} | {scores} | {timing} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptyrad-python", help="python of a venv with ptyrad==1.0.0 (PtyRAD runs are skipped without it)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--cases", default="thin,thick", help="thin, thick, thin-clean, thick-clean, realistic")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"any of {', '.join(RUNS)}")
    parser.add_argument("--score-at", default="", help="also score at these iterations (e.g. 5,10,20): each "
                        "run is scored as it goes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(HERE / "results" / "abtem"), help="cache of the abTEM datasets")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--name", default="quality", help="output files NAME.json and NAME.md")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a setting added to every ptyflow run, e.g. recon_params.validation_fraction=0.05")
    args = parser.parse_args()
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE (VALUE in JSON)")
        extra[key] = json.loads(value)
    score_at = tuple(int(i) for i in args.score_at.split(",") if i)
    unknown = [run for run in args.runs.split(",") if run not in RUNS]
    if unknown:
        raise SystemExit(f"--runs: unknown {', '.join(unknown)}; expected any of {', '.join(RUNS)}")
    rows = []
    for case in args.cases.split(","):
        data, slices = case_dataset(Path(args.data), case)
        for run in args.runs.split(","):
            code, settings, factor = RUNS[run]
            iterations = args.iterations * factor
            if code == "ptyrad" and not args.ptyrad_python:
                continue
            if "data.pos_key" in settings and not has_true_positions(data):
                continue  # only the realistic case keeps the true positions
            if code == "ptyrad":
                results = run_ptyrad(args.ptyrad_python, data, slices, iterations, settings, args.threads, score_at)
            else:
                results = run_ptyflow(data, slices, iterations, {**settings, **extra}, args.threads, score_at)
            for result in results:
                row = {"case": case, "run": run, "iterations": result["iterations"],
                       "pearson": round(score_run(result, data), 4),
                       "final_loss": result["loss"][-1] if len(result["loss"]) else None,
                       "validation_loss": result.get("validation_loss"),
                       "seconds": round(result["seconds"], 1),
                       "s_per_it": round(result["s_per_it"], 4) if result["s_per_it"] is not None else None}
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    table = markdown_table(rows)
    (out / f"{args.name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
