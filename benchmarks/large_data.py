"""Data larger than memory: preprocessing and reconstruction in measurements: disk, and the three
memory tiers side by side on data that fit. Not run by CI.

    python benchmarks/large_data.py --dir /scratch/ptyflow-large [--raw-gb 26] [--fit-patterns 16384]
                                    [--threads 2] [--skip-large] [--keep] [--out benchmarks/results]

The large case: a raw HDF5 file of uint16 patterns on a 256x256 detector (as detectors write
them), made by tiling the 256 patterns of the simulated small preset (each pattern upsampled 4x4)
over a square raster scan until the file holds --raw-gb GB; --raw-gb above the machine's RAM makes
it a dataset that cannot be loaded. It is preprocessed (bin 4, to 64x64 patterns) and
reconstructed for 2 iterations with measurements: disk, each in its own process, recording wall
time and the process's peak RSS (VmHWM), and for comparison from RAM (device tier; the binned
patterns fit). Then the resume start-up on that file: the input check a
rerun does now (size, mtime, sampled blocks) against hashing the raw file whole (what every start
and resume did before).

The fits case: --fit-patterns 64x64 patterns tiled the same way (no binning), reconstructed for
3 iterations in device, host and disk tiers, and in disk mode with random, compact and sparse
batching. Before every disk-mode run the preprocessed file is dropped from the page cache
(posix_fadvise DONTNEED), so disk means disk. Seconds per iteration are medians over iterations
2..3, through ptycho_core.stages.segment.run_segment (what the Prefect task calls), in a fresh process each,
and once more through `ptyflow run` (embedded Prefect server) in the device and disk tiers.

Writes large_data.json and large_data.md to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
args = json.loads(sys.argv[1])
import torch
from ptycho_core.io.calibration import load_run_config
from ptycho_core.stages.prepare import prepare
from ptycho_core.stages.segment import run_segment

def vmhwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

started = time.perf_counter()
if args["what"] == "prepare":
    outcome = prepare(load_run_config(args["config"]), args["run_dir"])
    result = {{"seconds": time.perf_counter() - started, "input_check": outcome.input_check,
              "skipped": outcome.skipped, "n_patterns": outcome.n_patterns}}
elif args["what"] == "full_hash":
    from ptycho_core.io.preprocess import input_hash
    input_hash(load_run_config(args["config"]))
    result = {{"seconds": time.perf_counter() - started}}
else:
    before = vmhwm()
    outcome = run_segment(args["run_dir"], args["to_iteration"], info=lambda m: print(m, file=sys.stderr))
    seconds = outcome.history_tail["seconds"]
    result = {{"seconds": time.perf_counter() - started, "seconds_per_iteration": sorted(seconds[1:] or seconds)[len(seconds[1:] or seconds) // 2],
              "first_iteration_seconds": seconds[0], "rss_before_run": before}}
result["peak_rss"] = vmhwm()
print(json.dumps(result))
"""


def child(what: str, **kwargs) -> dict:
    script = CHILD.format(root=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script, json.dumps({"what": what, **kwargs})],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["log"] = [line for line in proc.stderr.splitlines() if line.startswith("measurements:")]
    return result


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def source_patterns(folder: Path) -> np.ndarray:
    """The 256 simulated 64x64 patterns of the small preset, as counts (float32)."""
    from ptycho_core.simulate import simulate

    config = simulate("small", folder / "source", seed=0)
    with h5py.File(config.parent / "data.h5", "r") as f:
        return np.asarray(f["meas"][()], dtype=np.float32).reshape(-1, 64, 64)


def write_raw(path: Path, tiles: np.ndarray, scan: tuple[int, int], upsample: int) -> int:
    """A 4D (scan_y, scan_x, det, det) uint16 HDF5 file, one scan row per chunk."""
    det = 64 * upsample
    row = np.empty((scan[1], det, det), dtype=np.uint16)
    counts = np.round(tiles).astype(np.uint16)
    if upsample > 1:
        counts = np.kron(counts, np.ones((1, upsample, upsample), dtype=np.uint16))
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("patterns", shape=(*scan, det, det), dtype=np.uint16, chunks=(1, scan[1], det, det))
        for y in range(scan[0]):
            index = (y * scan[1] + np.arange(scan[1])) % len(counts)
            row[...] = counts[index]
            ds[y] = row
    return path.stat().st_size


def config_for(path: Path, raw: Path, scan: tuple[int, int], bin_px: int, threads: int, batching="random",
               measurements="disk", batch_size=256) -> Path:
    config = {
        "data": {"path": str(raw), "meas_key": "/patterns"},
        "experiment": {"energy_kev": 300.0, "conv_angle_mrad": 25.0, "dx_ang": 0.25, "defocus_ang": 40.0,
                       "scan": {"shape": list(scan), "step_ang": 0.8}},
        "preprocess": {"bin": bin_px},
        "init": {"object": {"pad_px": 8}},
        "recon_params": {"iterations": 3, "segment_iterations": 3, "batch_size": batch_size, "threads": threads,
                         "batching": batching, "measurements": measurements, "segment_figures": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def large_case(folder: Path, tiles: np.ndarray, raw_gb: float, threads: int) -> dict:
    pattern_bytes = 256 * 256 * 2
    side = int(np.sqrt(raw_gb * 1e9 / pattern_bytes))
    scan = (side, side)
    raw = folder / "large_raw.h5"
    t = time.perf_counter()
    raw_bytes = write_raw(raw, tiles, scan, upsample=4)
    print(f"large: wrote {gb(raw_bytes)} of raw patterns ({side}x{side} scan) in {time.perf_counter() - t:.0f} s",
          flush=True)
    config = config_for(folder / "large.yaml", raw, scan, 4, threads)
    run_dir = folder / "large_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    result = {"raw_bytes": raw_bytes, "scan": list(scan), "n_patterns": side * side, "ram_bytes": ram_bytes()}
    drop_from_page_cache(raw)  # just written: read it from the disk, as a detector's file would be
    result["preprocess"] = child("prepare", config=str(config), run_dir=str(run_dir))
    result["preprocessed_bytes"] = (run_dir / "preprocessed.h5").stat().st_size
    print(f"large: preprocessed in {result['preprocess']['seconds']:.0f} s", flush=True)
    drop_from_page_cache(run_dir / "preprocessed.h5")
    result["reconstruct"] = child("segment", run_dir=str(run_dir), to_iteration=2)
    print(f"large: 2 iterations in {result['reconstruct']['seconds']:.0f} s", flush=True)
    # the same 2 iterations from RAM (the preprocessed patterns fit): what disk mode costs here
    shutil.rmtree(run_dir / "checkpoints")
    from_ram = config_for(folder / "large_device.yaml", raw, scan, 4, threads, measurements="device")
    child("prepare", config=str(from_ram), run_dir=str(run_dir))  # the run directory's config.yaml now says device
    result["reconstruct_device"] = child("segment", run_dir=str(run_dir), to_iteration=2)
    print(f"large: 2 iterations from RAM in {result['reconstruct_device']['seconds']:.0f} s", flush=True)
    result["resume_check"] = child("prepare", config=str(config), run_dir=str(run_dir))
    drop_from_page_cache(raw)
    result["full_hash"] = child("full_hash", config=str(config))
    return result


def fits_case(folder: Path, tiles: np.ndarray, n_patterns: int, threads: int, repeats: int) -> dict:
    side = int(np.sqrt(n_patterns))
    scan = (side, n_patterns // side)
    raw = folder / "fits_raw.h5"
    write_raw(raw, tiles, scan, upsample=1)
    runs = [("device", "random"), ("host", "random"), ("disk", "random"), ("disk", "compact"), ("disk", "sparse")]
    measured: dict[str, list] = {f"{m}/{b}": [] for m, b in runs}
    for _ in range(repeats):  # interleaved, so a slow spell of a shared machine hits every run alike
        for measurements, batching in runs:
            config = config_for(folder / "fits.yaml", raw, scan, 1, threads, batching, measurements)
            run_dir = folder / "fits_run"
            shutil.rmtree(run_dir, ignore_errors=True)
            child("prepare", config=str(config), run_dir=str(run_dir))
            if measurements == "disk":
                drop_from_page_cache(run_dir / "preprocessed.h5")
            row = child("segment", run_dir=str(run_dir), to_iteration=3)
            measured[f"{measurements}/{batching}"].append(row)
            print(f"fits: {measurements}/{batching}: {row['seconds_per_iteration']:.2f} s/iteration", flush=True)
    rows = {name: sorted(rows, key=lambda r: r["seconds_per_iteration"])[len(rows) // 2]
            for name, rows in measured.items()}
    preprocessed = (folder / "fits_run" / "preprocessed.h5").stat().st_size
    return {"n_patterns": scan[0] * scan[1], "preprocessed_bytes": preprocessed, "repeats": repeats, "runs": rows,
            "all_seconds_per_iteration": {k: [r["seconds_per_iteration"] for r in v] for k, v in measured.items()}}


def cli_runs(folder: Path, n_patterns: int, threads: int) -> dict:
    """`ptyflow run` (embedded Prefect server) of the fits data in the device and disk tiers: wall
    time of the whole command and the median seconds per iteration it recorded."""
    from ptycho_core.checkpoint import read_checkpoint

    side = int(np.sqrt(n_patterns))
    scan = (side, n_patterns // side)
    rows = {}
    for measurements in ("device", "disk"):
        config = config_for(folder / "cli.yaml", folder / "fits_raw.h5", scan, 1, threads, measurements=measurements)
        run_dir = folder / "cli_run"
        shutil.rmtree(run_dir, ignore_errors=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config), "--run-dir", str(run_dir)],
                              capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"ptyflow run failed:\n{proc.stderr[-3000:]}")
        seconds = read_checkpoint(run_dir / "model.hdf5").history["seconds"]
        rows[measurements] = {"wall_seconds": time.perf_counter() - started,
                              "seconds_per_iteration": sorted(seconds[1:])[len(seconds[1:]) // 2]}
        print(f"ptyflow run, {measurements}: {rows[measurements]}", flush=True)
    return rows


def ram_bytes() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def markdown(results: dict) -> str:
    lines = [f"# Large data ({results['date']}, {results['machine']})", ""]
    large = results.get("large")
    if large:
        pre, rec, dev = large["preprocess"], large["reconstruct"], large["reconstruct_device"]
        lines += [
            f"Raw file {gb(large['raw_bytes'])} (uint16, {large['scan'][0]}x{large['scan'][1]} scan, 256x256 "
            f"detector; RAM {gb(large['ram_bytes'])}), preprocessed to {gb(large['preprocessed_bytes'])} (bin 4, "
            f"64x64 float32).", "",
            "| step | wall time | peak RSS |", "|---|---|---|",
            f"| preprocess (stream, hash alongside) | {pre['seconds']:.0f} s | {gb(pre['peak_rss'])} |",
            f"| reconstruct 2 iterations, disk | {rec['seconds']:.0f} s ({rec['seconds_per_iteration']:.0f} "
            f"s/iteration) | {gb(rec['peak_rss'])} |",
            f"| the same from RAM (device tier), for comparison | {dev['seconds']:.0f} s "
            f"({dev['seconds_per_iteration']:.0f} s/iteration) | {gb(dev['peak_rss'])} |",
            f"| resume start-up: input check now | {large['resume_check']['seconds']:.2f} s | |",
            f"| resume start-up before: hashing the raw file whole | {large['full_hash']['seconds']:.0f} s | |",
            "",
        ]
    fits = results.get("fits")
    if fits:
        device = fits["runs"]["device/random"]["seconds_per_iteration"]
        lines += [f"{fits['n_patterns']} patterns of 64x64 ({gb(fits['preprocessed_bytes'])}), batch 256, "
                  f"3 iterations per run, median of {fits['repeats']} interleaved runs; disk runs start with the "
                  "file out of the page cache.", "",
                  "| tier/batching | s/iteration | vs device | peak RSS |", "|---|---|---|---|"]
        for name, row in fits["runs"].items():
            lines.append(f"| {name} | {row['seconds_per_iteration']:.2f} | {row['seconds_per_iteration'] / device:.2f} "
                         f"| {gb(row['peak_rss'])} |")
        for name, row in fits.get("ptyflow_run", {}).items():
            lines.append(f"| `ptyflow run`, {name}/random | {row['seconds_per_iteration']:.2f} | "
                         f"{row['seconds_per_iteration'] / device:.2f} | (whole command {row['wall_seconds']:.0f} s) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="scratch folder with room for the raw file")
    parser.add_argument("--raw-gb", type=float, default=26.0)
    parser.add_argument("--fit-patterns", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per fits-case setting (median kept)")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the raw and preprocessed files")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    tiles = source_patterns(args.dir)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()}, {os.cpu_count()} cores",
               "threads": args.threads}
    results["fits"] = fits_case(args.dir, tiles, args.fit_patterns, args.threads, args.repeats)
    results["fits"]["ptyflow_run"] = cli_runs(args.dir, args.fit_patterns, args.threads)
    if not args.skip_large:
        results["large"] = large_case(args.dir, tiles, args.raw_gb, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "large_data.json").write_text(json.dumps(results, indent=1))
    (args.out / "large_data.md").write_text(markdown(results))
    print(markdown(results))
    if not args.keep:
        for name in ("large_raw.h5", "fits_raw.h5"):
            (args.dir / name).unlink(missing_ok=True)
        for name in ("large_run", "fits_run", "cli_run"):
            shutil.rmtree(args.dir / name, ignore_errors=True)


if __name__ == "__main__":
    main()
