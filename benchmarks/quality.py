"""Reconstruction quality per iteration on independent data: ptyflow beside PtyRAD 1.0.0.

    python benchmarks/quality.py --ptyrad-python /path/to/ptyrad-venv/bin/python [--iterations 20]
        [--cases thin,thick] [--runs NAME,...] [--data DIR] [--out DIR]

The data are abTEM simulations of SrTiO3 [001] (tests/abtem_data.py: 300 keV, 20 mrad,
1024 patterns of 64², Poisson noise at 1e6 e/Å²; 1.6 nm thin, 9.4 nm thick reconstructed with 8
slices). Each run is scored by the Pearson correlation of its depth-summed object phase with
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

from abtem_data import quality_config, quality_dataset, score_against_truth  # noqa: E402  (shared with the slow quality test)

SLICES = {"thin": 1, "thick": 8}

# PtyRAD 1.0.0's defaults as ptyflow settings: Adam; object lr 5e-4, probe 1e-4 and positions
# 5e-4 from iteration 1; 4 probe modes; probe-mode orthogonalization, fixed probe intensity,
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
}
# name -> (code, settings, iterations factor)
RUNS = {
    "ptyrad-defaults": ("ptyrad", {}, 1),
    "ptyflow-ptyrad-settings": ("ptyflow", PTYRAD_SETTINGS, 1),
    "ptyflow-defaults": ("ptyflow", {}, 1),
    "ptyflow-reference": ("ptyflow", {"defaults": "reference"}, 1),
    "ptyrad-defaults-x5": ("ptyrad", {}, 5),
    "ptyflow-defaults-x10": ("ptyflow", {}, 10),
}


# --------------------------------------------------------------------------- the two codes
def ptyflow_config(data: Path, slices: int, iterations: int, settings: dict):
    from ptycho_core.config import config_from_dict, set_dotted

    raw = quality_config(data, slices, iterations)
    for key, value in settings.items():
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def run_ptyflow(data: Path, slices: int, iterations: int, settings: dict, threads: int) -> dict:
    import torch

    from ptycho_core.io.preprocess import read_preprocessed
    from ptycho_core.reconstruction import Reconstruction
    from ptycho_core.stages.prepare import prepare

    torch.set_num_threads(threads)
    config = ptyflow_config(data, slices, iterations, settings)
    with tempfile.TemporaryDirectory() as tmp:
        prepare(config, Path(tmp) / "run")
        prep = read_preprocessed(Path(tmp) / "run" / "preprocessed.h5")
    rec = Reconstruction.create(config, prep)
    started = time.perf_counter()
    rec.run(iterations)
    seconds = time.perf_counter() - started
    model = rec.model
    return {"phase_sum": model.objp.detach().cpu().numpy()[0].sum(axis=0), "positions_px": model.centres_px(),
            "loss": rec.state.history.get("loss", []), "seconds": seconds}


def run_ptyrad(python: str, data: Path, slices: int, iterations: int, settings: dict, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "settings.json"
        spec.write_text(json.dumps({"iterations": iterations, "threads": threads, "slices": slices, **settings}))
        out = Path(tmp) / "result.npz"
        started = time.perf_counter()
        proc = subprocess.run([python, str(HERE / "ptyrad_quality_driver.py"), str(data), str(spec), str(out)],
                              capture_output=True, text=True, cwd=HERE)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"PtyRAD failed:\n{proc.stderr[-3000:]}")
        result = dict(np.load(out))
    return {"phase_sum": result["objp"][0].sum(axis=0), "positions_px": result["positions_px"],
            "loss": result["loss"].tolist(), "seconds": time.perf_counter() - started}


def score_run(result: dict, data: Path) -> float:
    return score_against_truth(result["phase_sum"], result["positions_px"], data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptyrad-python", help="python of a venv with ptyrad==1.0.0 (PtyRAD runs are skipped without it)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--cases", default="thin,thick", help="thin, thick, thin-clean, thick-clean")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"any of {', '.join(RUNS)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default=str(HERE / "results" / "abtem"), help="cache of the abTEM datasets")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    rows = []
    for case in args.cases.split(","):
        name, _, clean = case.partition("-")
        data = quality_dataset(Path(args.data), name, noisy=not clean)
        for run in args.runs.split(","):
            code, settings, factor = RUNS[run]
            iterations = args.iterations * factor
            if code == "ptyrad" and not args.ptyrad_python:
                continue
            if code == "ptyrad":
                result = run_ptyrad(args.ptyrad_python, data, SLICES[name], iterations, settings, args.threads)
            else:
                result = run_ptyflow(data, SLICES[name], iterations, settings, args.threads)
            score = score_run(result, data)
            row = {"case": case, "run": run, "iterations": iterations, "pearson": round(score, 4),
                   "final_loss": result["loss"][-1] if len(result["loss"]) else None,
                   "seconds": round(result["seconds"], 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(rows, indent=1))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    lines = ["| run | iterations | " + " | ".join(cases) + " |", "|---|---|" + "---|" * len(cases)]
    for run in dict.fromkeys(r["run"] for r in rows):
        cells = {r["case"]: r for r in rows if r["run"] == run}
        its = next(iter(cells.values()))["iterations"]
        lines.append(f"| {run} | {its} | " + " | ".join(
            f"{cells[c]['pearson']:.3f}" if c in cells else "" for c in cases) + " |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
