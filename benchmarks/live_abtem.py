"""Live mode on independent data: an abTEM quality set written as a detector would, against offline.

    python benchmarks/live_abtem.py [--case thin] [--frames-per-s 64] [--layout mib] [--data DIR] [--work DIR]

The abTEM dataset (tests/abtem_data.quality_dataset: SrTiO3, 1024 patterns of 64², simulated into
--data on first use) is written again by tests/acquisition.py at --frames-per-s while
`ptyflow run --follow` reconstructs it (quality_config: data, optics, slicing, 20 iterations). Then
`ptyflow run` on the complete file. Printed: acquisition time, time from the last frame to the live
run's result, from the complete file to the offline result, and both phase Pearsons against abTEM's
truth (abtem_data.score_against_truth) with their iteration counts.
"""

from __future__ import annotations

import argparse
import shutil
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
from acquisition import Acquisition, Plan  # noqa: E402
from ptycho_core.checkpoint import read_checkpoint  # noqa: E402

SLICES = {"thin": 1, "thick": 8}


def score(run_dir: Path, data: Path) -> tuple[float, int]:
    ckpt = read_checkpoint(run_dir / "model.hdf5")
    window = np.array(ckpt.tensors["probe"].shape[1:])
    centres = ckpt.crop_pos.numpy() + ckpt.tensors["probe_pos_shifts"].numpy() + window // 2
    return score_against_truth(ckpt.tensors["objp"].numpy()[0].sum(0), centres, data), ckpt.iteration


def ptyflow(*args) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *map(str, args)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="thin", choices=sorted(SLICES))
    parser.add_argument("--frames-per-s", type=float, default=64.0)
    parser.add_argument("--layout", default="mib", choices=("mib", "dectris"),
                        help="layouts whose planned scan comes from experiment.scan")
    parser.add_argument("--data", default="benchmarks/results/abtem", help="folder of the abTEM datasets")
    parser.add_argument("--work", default="benchmarks/results/live_abtem")
    args = parser.parse_args()
    data = quality_dataset(Path(args.data), args.case)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with h5py.File(data, "r") as f:
        patterns = f["meas"][()]
    plan = Plan(layout=args.layout, out_dir=str(work / "data"), frames_per_s=args.frames_per_s, meta={})
    raw = quality_config(data, SLICES[args.case], 20)
    offline_raw = yaml.safe_load(yaml.safe_dump(raw))
    raw["data"] = {"path": str(plan.data_path), "format": args.layout}
    raw["live"] = {"timeout_s": 60, "poll_s": 0.2}
    (work / "live.yaml").write_text(yaml.safe_dump(raw))
    (work / "offline.yaml").write_text(yaml.safe_dump(offline_raw))

    run = subprocess.Popen(ptyflow("run", work / "live.yaml", "--run-dir", work / "live", "--follow"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(10.0)  # the run is up (imports, Prefect) and waiting for the file
    positions = np.zeros((patterns.shape[0] * patterns.shape[1], 2))  # the config states the raster
    acquisition = Acquisition(patterns, positions, plan).start()
    started = time.time()
    acquisition.join()
    last_frame = time.time()
    output = run.communicate()[0]
    live_end = time.time()
    if run.returncode != 0:
        raise SystemExit(f"live run failed ({run.returncode}):\n{output[-3000:]}")
    live_score, live_iterations = score(work / "live", data)

    started_offline = time.time()
    offline = subprocess.run(ptyflow("run", work / "offline.yaml", "--run-dir", work / "offline"),
                             capture_output=True, text=True)
    offline_end = time.time()
    if offline.returncode != 0:
        raise SystemExit(f"offline run failed ({offline.returncode}):\n{offline.stderr[-3000:]}")
    offline_score, offline_iterations = score(work / "offline", data)
    print(f"abTEM {args.case}, {args.layout} at {args.frames_per_s:g} frames/s: acquisition {last_frame - started:.1f} s")
    print(f"live:    last frame -> result {live_end - last_frame:.1f} s, phase Pearson {live_score:.3f} "
          f"({live_iterations} iterations)")
    print(f"offline: complete file -> result {offline_end - started_offline:.1f} s, phase Pearson "
          f"{offline_score:.3f} ({offline_iterations} iterations)")


if __name__ == "__main__":
    main()
