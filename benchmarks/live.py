"""Live mode against the offline path, on the path users run (`ptyflow run`, embedded Prefect).

    python benchmarks/live.py [--out benchmarks/measured] [--runs hdf5:16,hdf5:400,mib:16,dectris:16]

A `ptyflow simulate --preset small` dataset (256 patterns of 64², 30 iterations) is written again
by tests/acquisition.py, row by row at each frame rate, in each layout, while
`ptyflow run --follow --verbose` reconstructs it. Measured per run:
- first row -> first preview: from the writer's first row to the log line of the first preview;
- last frame -> offline quality: from the writer's last frame to the first checkpoint whose phase
  Pearson (against the simulation's truth) is within 0.01 of the offline run's final one, and to
  the end of the live run (result exported);
- the offline path: `ptyflow run` started once the file is complete; its wall time is its time
  from the last frame to the result (run before and after the live runs: the machine's load moves);
- quality: phase Pearson at completion (the preview's object when the last frame landed) and at the
  end, live and offline.
The live runs use recon_params.segment_iterations 1 so that every iteration after completion
leaves a checkpoint to score (this costs time per iteration, so the live figures are upper bounds).
Writes live.json and live.md to --out.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from acquisition import Plan, live_config, start_subprocess  # noqa: E402
from ptycho_core.checkpoint import list_checkpoints, read_checkpoint  # noqa: E402
from ptycho_core.io.preprocess import read_preprocessed  # noqa: E402
from ptycho_core.quality import phase_pearson, scanned_field_mask  # noqa: E402
from ptycho_core.simulate import read_ground_truth, simulate  # noqa: E402


def pearson(ckpt_path: Path, run_dir: Path, truth: np.ndarray) -> float:
    prep = read_preprocessed(run_dir / "preprocessed.h5")
    phase = read_checkpoint(ckpt_path).tensors["objp"][0].numpy().sum(0)
    return phase_pearson(phase, truth, scanned_field_mask(prep.geometry.positions_px, prep.geometry.canvas_shape))


def ptyflow(*args) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *map(str, args)]


def live_run(sim: Path, work: Path, layout: str, rate: float, truth: np.ndarray, offline_final: float) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    plan = Plan(layout=layout, out_dir=str(work / "data"), frames_per_s=rate, meta={"energy_kev": 300.0})
    raw = live_config(sim, plan, live={"timeout_s": 120, "poll_s": 0.1}, recon_params={"segment_iterations": 1})
    config = work / "live.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = work / "live"
    stamps: list[tuple[float, str]] = []
    run = subprocess.Popen(ptyflow("run", config, "--run-dir", run_dir, "--follow", "--verbose"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = threading.Thread(target=lambda: [stamps.append((time.time(), line)) for line in run.stdout], daemon=True)
    reader.start()
    time.sleep(12.0)  # the run is up (imports, Prefect) and waiting for the file
    writer = start_subprocess(sim.parent / "data.h5", plan)
    written = json.loads(writer.communicate()[0].strip().splitlines()[-1])
    run.wait()
    reader.join(10)
    ended = time.time()
    if run.returncode != 0:
        raise RuntimeError("".join(line for _, line in stamps[-30:]))
    previews = [t for t, line in stamps if "live preview:" in line]
    history = read_checkpoint(run_dir / "model.hdf5").history
    completed_at = int(np.sum(np.asarray(history["acquiring"]) == 1.0))
    scores = []
    for path in list_checkpoints(run_dir / "checkpoints"):
        ckpt = read_checkpoint(path)
        if ckpt.iteration >= completed_at and ckpt.batch_cursor == 0:
            scores.append((ckpt.iteration, path.stat().st_mtime, pearson(path, run_dir, truth)))
    good = [(it, t, q) for it, t, q in scores if q >= offline_final - 0.01]
    at_completion = next((q for it, _, q in scores if it == completed_at), None)
    return {
        "layout": layout, "frames_per_s": rate, "acquisition_s": written["last_frame_at"] - written["first_frame_at"],
        "first_row_to_first_preview_s": previews[0] - written["first_frame_at"] if previews else None,
        "previews": len(previews),
        "iterations_while_acquiring": completed_at,
        "pearson_at_completion": at_completion,
        "last_frame_to_offline_quality_s": good[0][1] - written["last_frame_at"] if good else None,
        "iterations_after_completion_to_offline_quality": good[0][0] - completed_at if good else None,
        "last_frame_to_result_s": ended - written["last_frame_at"],
        "pearson_final": scores[-1][2],
    }


def offline_run(sim: Path, work: Path, truth: np.ndarray) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    plan = Plan(layout="hdf5", out_dir=str(work / "data"), frames_per_s=1e6)
    written = subprocess.run([sys.executable, str(HERE.parent / "tests" / "acquisition.py"),
                              str(sim.parent / "data.h5"), json.dumps(plan.__dict__)], capture_output=True, text=True)
    if written.returncode:
        raise RuntimeError(written.stderr[-3000:])
    config = work / "offline.yaml"
    config.write_text(yaml.safe_dump(live_config(sim, plan)))
    started = time.time()
    subprocess.run(ptyflow("run", config, "--run-dir", work / "offline"), check=True, capture_output=True)
    return {"wall_s": time.time() - started, "pearson_final": pearson(work / "offline" / "model.hdf5",
                                                                       work / "offline", truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "measured"))
    parser.add_argument("--work", default="/tmp/ptyflow-live-bench")
    parser.add_argument("--from-log", help="take the live runs from this earlier log (its printed rows)")
    parser.add_argument("--runs", default="hdf5:16,hdf5:400,mib:16,dectris:16", help="layout:frames per second,...")
    args = parser.parse_args()
    work = Path(args.work)
    if not args.from_log:
        shutil.rmtree(work, ignore_errors=True)
    sim = simulate("small", work / "sim", seed=1) if not (work / "sim" / "config.yaml").exists() else work / "sim" / "config.yaml"
    truth = read_ground_truth(work / "sim" / "data.h5")["objp"][0].sum(0)
    if args.from_log:  # the live runs of an earlier invocation's log; only the offline runs again
        logged = [line for line in Path(args.from_log).read_text().splitlines() if line.startswith(("{", "offline {"))]
        offline = ast.literal_eval(logged[0].removeprefix("offline "))
        rows = [ast.literal_eval(line) for line in logged[1:]]
    else:
        offline = offline_run(sim, work / "offline", truth)
        print("offline", offline, flush=True)
        rows = []
        for spec in args.runs.split(","):
            layout, rate = spec.split(":")
            row = live_run(sim, work / f"{layout}_{rate}", layout, float(rate), truth, offline["pearson_final"])
            print(row, flush=True)
            rows.append(row)
    offline_after = offline_run(sim, work / "offline_after", truth)
    print("offline after", offline_after, flush=True)
    offline["wall_s_after"] = offline_after["wall_s"]
    report(Path(args.out), offline, rows)


def report(out: Path, offline: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "live.json").write_text(json.dumps({"offline": offline, "live": rows}, indent=1))
    lines = ["# Live mode against the offline path (benchmarks/live.py)", "",
             f"small preset, 256 patterns of 64², 30 iterations; offline: {offline['wall_s']:.1f} s (before the live "
             f"runs) and {offline['wall_s_after']:.1f} s (after) from the complete file to the result, phase Pearson "
             f"{offline['pearson_final']:.3f}", "",
             "| layout | frames/s | acquisition s | first row -> first preview s | iterations while acquiring | "
             "Pearson at last frame | last frame -> offline quality s (iterations) | last frame -> result s | "
             "Pearson final |", "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['layout']} | {r['frames_per_s']:g} | {fmt(r['acquisition_s'])} | "
                     f"{fmt(r['first_row_to_first_preview_s'])} | {r['iterations_while_acquiring']} | "
                     f"{fmt(r['pearson_at_completion'], '{:.3f}')} | {fmt(r['last_frame_to_offline_quality_s'])} "
                     f"({r['iterations_after_completion_to_offline_quality']}) | {fmt(r['last_frame_to_result_s'])} | "
                     f"{fmt(r['pearson_final'], '{:.3f}')} |")
    (out / "live.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
