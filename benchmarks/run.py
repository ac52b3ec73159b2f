"""Speed and memory of ptyflow per iteration and per pattern, side by side with PtyRAD and the FFT
floor, measured in one run. Not run by CI.

    python benchmarks/run.py [--iterations 6] [--cases small,medium,multislice] [--ptyrad-python PATH]
                             [--device cpu|cuda] [--threads 2] [--no-scaling] [--out benchmarks/results]
                             [--repeats 3] [--user-path] [--compile]
    python benchmarks/run.py --devices 2 [--cases medium,multislice] [--batch 128]

Every measurement runs in its own subprocess so that peak memory (the process's own peak RSS,
VmHWM, on CPU; max_memory_allocated on CUDA) belongs to that case alone. Times are medians over
iterations 2..N. After the side-by-side cases, a scaling table (ptyflow and the floor only) changes
one factor at a time from the small case: patterns, batch size, slices, probe modes
(--no-scaling skips it). Writes results.json and results.md to --out.

--user-path also measures what users run, in the same run and interleaved with the other codes:
`ptyflow run` end to end per case, with a fresh Prefect home, again with that home warm, and
against a Prefect server started (and healthy) before anything is measured, on the same data and
settings as the in-process core. It splits the wall time by the run's own timing line
(start-up and imports; waiting for the server; preprocessing; iterations; the rest of the
segments: set-up, checkpoints, figures; export and figures; Prefect; server stop; what remains
is process start and exit) and samples the summed memory of the whole process tree (ptyflow and
its embedded server) every 50 ms: a second table in results.md.

--devices N measures one reconstruction on 1, 2, 4 ... N processes instead (recon_params.devices:
'cpu:k' on the CPU, k GPUs on CUDA), through the segment the pipeline runs (stages.segment.run_segment,
helper ranks included), and reports speed-up and efficiency per case; on the CPU the machine's
cores are shared out among the processes, so a 2-core machine has 1 core per process at 2.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name: (scan shape, detector px, slices, probe modes, batch size)
CASES = {
    "small": ((16, 16), 64, 1, 1, 32),
    "medium": ((32, 32), 64, 1, 1, 32),
    "multislice": ((32, 32), 64, 8, 4, 32),
}

# How ptyflow's time grows: one factor at a time from the small case (ptyflow and the floor only).
SCALING = {
    "patterns": [("scan", (8, 8)), ("scan", (16, 16)), ("scan", (32, 32))],
    "batch size": [("batch", 8), ("batch", 16), ("batch", 32), ("batch", 64), ("batch", 128)],
    "slices": [("slices", 1), ("slices", 2), ("slices", 4), ("slices", 8)],
    "probe modes": [("modes", 1), ("modes", 2), ("modes", 4), ("modes", 8)],
}


def make_dataset(name: str, folder: Path, scan=None, det=None, slices=None) -> Path:
    """Simulated data for a case (ptycho_core.simulate), optionally with the scan shape, detector
    size or slice count replaced; returns its config.yaml."""
    from ptycho_core.simulate import PRESETS, simulate

    case_scan, case_det, case_slices, _, _ = CASES[name]
    scan, det, slices = scan or case_scan, det or case_det, slices or case_slices
    preset = PRESETS["small"]
    folder = folder / f"{name}-{scan[0]}x{scan[1]}-{det}px-{slices}z"
    if (folder / "config.yaml").exists():
        return folder / "config.yaml"
    config = simulate(preset, folder, seed=0, n_slices=slices, scan_shape=scan, window_px=det,
                      slice_thickness_ang=10.0 if slices > 1 else preset.slice_thickness_ang)
    return config


def equivalent_overrides(iterations: int, device: str, modes: int, batch: int) -> dict:
    """ptyflow settings that do the work PtyRAD 1.0.0 does by default per iteration: Adam with the
    reference learning rates, object, probe and positions optimized from iteration 1, and its
    default constraints (probe-mode orthogonalization, fixed probe intensity, lateral object blur
    0.4 px, depth blur 1 slice, position recentring)."""
    return {
        "recon_params.iterations": iterations,
        "recon_params.segment_iterations": iterations,
        "recon_params.batch_size": batch,
        "recon_params.device": device,
        "recon_params.segment_figures": False,
        "init.probe.n_modes": modes,
        "model_params.update_params.obja": {"start_iter": 1, "lr": 5e-4},
        "model_params.update_params.objp": {"start_iter": 1, "lr": 5e-4},
        "model_params.update_params.probe": {"start_iter": 1, "lr": 1e-4},
        "model_params.update_params.probe_pos_shifts": {"start_iter": 1, "lr": 1e-4},
        "constraint_params.obj_blur": {"start_iter": 1, "std_px": 0.4},
        "constraint_params.depth_blur": {"start_iter": 1, "std_slices": 1.0},
    }


def equivalent_raw(config, iterations: int, device: str, modes: int, batch: int, **dotted) -> dict:
    """A case's config.yaml as a dict, with equivalent_overrides and any further dotted keys set."""
    import yaml

    from ptycho_core.config import set_dotted

    raw = yaml.safe_load(Path(config).read_text())
    for key, value in {**equivalent_overrides(iterations, device, modes, batch), **dotted}.items():
        set_dotted(raw, key, value)
    return raw


def child(kind: str, config: str, iterations: int, device: str, modes: int, batch: int, threads: int) -> dict:
    """Runs in a fresh interpreter: one measurement, printed as JSON."""
    import time

    import numpy as np
    import torch

    torch.set_num_threads(threads)

    from memory import current_rss_bytes, peak_rss_bytes
    from ptycho_core.config import config_from_dict, resolve_paths
    from ptycho_core.io.preprocess import preprocess
    from ptycho_core.reconstruction import Reconstruction

    raw = equivalent_raw(config, iterations, device, modes, batch,
                         **{"recon_params.compile": kind == "ptyflow_compiled"})
    cfg = resolve_paths(config_from_dict(raw), Path(config).parent)
    baseline = 0 if device == "cuda" else current_rss_bytes()  # interpreter, torch and ptyflow imported
    prep = preprocess(cfg)
    rec = Reconstruction.create(cfg, prep)
    n_patterns = prep.n_patterns
    if kind == "fft_floor":
        seconds = fft_floor(rec, iterations)
    else:
        started = time.perf_counter()
        rec.run(iterations)
        first = rec.state.history["seconds"][0]
        seconds = rec.state.history["seconds"][1:]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    median = float(np.median(seconds))
    result = {"seconds_per_iteration": median, "seconds_per_pattern": median / n_patterns, "peak_bytes": int(peak),
              "baseline_bytes": int(baseline), "n_patterns": n_patterns, "iterations_timed": len(seconds)}
    if kind != "fft_floor":  # the first iteration carries the start-up (and any compiling)
        result["first_iteration_seconds"] = first
        result["run_seconds"] = time.perf_counter() - started
    return result


def fft_floor(rec, iterations: int) -> list[float]:
    """Seconds per iteration of the FFTs an iteration cannot avoid, on the same tensors: per batch,
    the inverse FFT that puts the shifted probe back in real space (the probe's own FFT is one per
    mode, not per pattern), 2 FFTs per propagation between slices and the far-field FFT, each for
    every probe x object mode, and as many again in the backward pass: 4 * slices per batch."""
    import torch

    model = rec.model
    n, (ny, nx) = model.n_positions, model.window
    p, o, z = model.probe.shape[0], model.obja.shape[0], model.obja.shape[1]
    batch = rec.problem.batch_size
    ffts_per_batch = 2 * (1 + 2 * (z - 1) + 1)  # forward and backward
    wave = torch.randn(batch, p, o, ny, nx, dtype=torch.complex64, device=model.obja.device)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        for _ in range((n + batch - 1) // batch):
            x = wave
            for _ in range(ffts_per_batch // 2):
                x = torch.fft.ifft2(torch.fft.fft2(x))
        if wave.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times[1:]


def run_child(kind, config, iterations, device, modes, batch, threads) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import run; "
            f"print('RESULT' + json.dumps(run.child({kind!r}, {str(config)!r}, {iterations}, {device!r}, {modes}, "
            f"{batch}, {threads})))")
    return result_of(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True), kind)


def run_ptyrad(python: str, config: Path, iterations: int, device: str, modes: int, batch: int, threads: int) -> dict:
    out = subprocess.run([python, str(HERE / "ptyrad_driver.py"), str(config), str(iterations), device, str(modes),
                          str(batch), str(threads)], capture_output=True, text=True)
    return result_of(out, "PtyRAD")


def result_of(out: subprocess.CompletedProcess, what: str) -> dict:
    """The JSON a measuring subprocess printed after RESULT; its stderr tail if it printed none."""
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT")), None)
    if line is None:
        raise RuntimeError(f"{what} failed: {out.stderr[-3000:]}")
    return json.loads(line[len("RESULT"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--ptyrad-python", default=None, help="python of a venv with ptyrad 1.0.0")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--no-scaling", action="store_true", help="skip the one-factor-at-a-time scaling table")
    parser.add_argument("--compile", action="store_true",
                        help="also measure ptyflow with recon_params.compile (torch.compile) in each case "
                             "(once, not --repeats times)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every code this many times, interleaved, and keep each one's median run "
                             "(on a shared machine a single run can be off by 2x)")
    parser.add_argument("--devices", type=int, default=None,
                        help="measure 1, 2, 4 ... N processes per reconstruction instead (recon_params.devices)")
    parser.add_argument("--batch", type=int, default=None, help="with --devices: the batch size of every case")
    parser.add_argument("--user-path", action="store_true",
                        help="time `ptyflow run` end to end (fresh/warm Prefect home, a running server)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.devices:
        import os

        with tempfile.TemporaryDirectory() as tmp:
            rows = measure_devices(Path(tmp), args)
        meta = {"device": args.device, "cores": os.cpu_count(), "iterations": args.iterations,
                "date": time.strftime("%Y-%m-%d %H:%M")}
        (out / "devices.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        text = devices_markdown(rows, meta)
        (out / "devices.md").write_text(text)
        print(text)
        return
    with tempfile.TemporaryDirectory() as tmp:
        user_path = UserPath(Path(tmp), args) if args.user_path else None
        try:
            rows = measure_cases(Path(tmp), args, user_path)
        finally:
            if user_path:
                user_path.close()
        scaling = [] if args.no_scaling else measure_scaling(Path(tmp), args)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "device": args.device,
            "threads": args.threads, "iterations": args.iterations, "repeats": args.repeats,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "scaling": scaling}, indent=1))
    text = (markdown(rows, meta) + (user_path_markdown(rows) if args.user_path else "") + compile_markdown(rows)
            + (scaling_markdown(scaling) if scaling else ""))
    (out / "results.md").write_text(text)
    print(text)


def measure_cases(tmp: Path, args, user_path: "UserPath | None") -> list[dict]:
    """Every code on every case, each run in a fresh process, interleaved over the repeats."""
    rows = []
    for name in args.cases.split(","):
        scan, det, slices, modes, batch = CASES[name]
        config = make_dataset(name, tmp)
        row = {"case": name, "patterns": scan[0] * scan[1], "detector": det, "slices": slices,
               "probe_modes": modes, "batch": batch}
        kinds = ["ptyflow", "fft_floor"] + (["ptyflow_compiled"] if args.compile else [])
        kinds += ["ptyrad"] if args.ptyrad_python else []
        kinds += ["ptyflow_run"] if user_path else []
        measured: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for repeat in range(args.repeats):  # interleaved, so a slow spell of the machine hits every code
            # compiling takes 10-60 s a case: compiled runs are measured in the first round only
            for kind in (k for k in kinds if repeat == 0 or k != "ptyflow_compiled"):
                try:
                    if kind == "ptyflow_run":
                        result = user_path.measure(user_path.config_for(name, config))
                    elif kind == "ptyrad":
                        result = run_ptyrad(args.ptyrad_python, config, args.iterations, args.device, modes,
                                            batch, args.threads)
                    else:
                        result = run_child(kind, config, args.iterations, args.device, modes, batch,
                                           args.threads)
                except RuntimeError as exc:
                    if kind != "ptyrad":
                        raise
                    row["ptyrad_error"] = str(exc)[-500:]
                    continue
                measured[kind].append(result)
        for kind, results in measured.items():
            if kind == "ptyflow_run":
                row[kind] = summarize_user_runs(results)
            elif results:
                results.sort(key=lambda r: r["seconds_per_iteration"])
                row[kind] = {**results[len(results) // 2],
                             "repeats_seconds_per_iteration": [r["seconds_per_iteration"] for r in results]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def summarize_user_runs(results: list[dict[str, dict]]) -> dict[str, dict]:
    """Per mode over the repeats: the median seconds per iteration, and the fixed cost, its split
    and the peak memory of the run whose fixed cost is the median."""
    import numpy as np

    summary = {}
    for mode in USER_MODES:
        runs = sorted((r[mode] for r in results), key=lambda r: r["fixed_seconds"])
        per_iteration = [r["seconds_per_iteration"] for r in runs]
        summary[mode] = {**runs[len(runs) // 2], "seconds_per_iteration": float(np.median(per_iteration)),
                         "repeats_fixed_seconds": [r["fixed_seconds"] for r in runs],
                         "repeats_seconds_per_iteration": per_iteration}
    return summary


def measure_scaling(tmp: Path, args) -> list[dict]:
    """ptyflow and the FFT floor with one factor changed at a time from the small case."""
    base_scan, det, base_slices, base_modes, base_batch = CASES["small"]
    rows = []
    for factor, variants in SCALING.items():
        for key, value in variants:
            scan, slices, modes, batch = base_scan, base_slices, base_modes, base_batch
            scan = value if key == "scan" else scan
            slices = value if key == "slices" else slices
            modes = value if key == "modes" else modes
            batch = value if key == "batch" else batch
            config = make_dataset("small", tmp, scan=scan, slices=slices)
            row = {"factor": factor, "value": f"{value[0]}x{value[1]}" if key == "scan" else value,
                   "patterns": scan[0] * scan[1], "slices": slices, "probe_modes": modes, "batch": batch}
            row["ptyflow"] = run_child("ptyflow", config, args.iterations, args.device, modes, batch, args.threads)
            row["fft_floor"] = run_child("fft_floor", config, args.iterations, args.device, modes, batch, args.threads)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def devices_child(config: str, iterations: int, device: str, processes: int, batch: int, modes: int) -> dict:
    """Runs in a fresh interpreter: one segment of ``iterations`` on ``processes`` processes."""
    import shutil

    import numpy as np

    from ptycho_core.config import config_from_dict, resolve_paths
    from ptycho_core.stages.prepare import prepare
    from ptycho_core.stages.segment import run_segment

    devices = None if processes == 1 else (f"cpu:{processes}" if device == "cpu" else processes)
    raw = equivalent_raw(config, iterations, device, modes, batch, **{"recon_params.devices": devices})
    cfg = resolve_paths(config_from_dict(raw), Path(config).parent)
    run_dir = Path(config).parent / f"run-{processes}"
    shutil.rmtree(run_dir, ignore_errors=True)
    prepare(cfg, run_dir)
    started = time.perf_counter()
    outcome = run_segment(run_dir, iterations)
    seconds = outcome.history_tail["seconds"][1:]
    return {"seconds_per_iteration": float(np.median(seconds)), "segment_seconds": time.perf_counter() - started,
            "iterations_timed": len(seconds)}


def measure_devices(tmp: Path, args) -> list[dict]:
    """Seconds per iteration on 1, 2, 4 ... args.devices processes, per case."""
    counts = [1]
    while counts[-1] * 2 <= args.devices:
        counts.append(counts[-1] * 2)
    if counts[-1] != args.devices:
        counts.append(args.devices)
    rows = []
    for name in args.cases.split(","):
        scan, det, slices, modes, batch = CASES[name]
        batch = args.batch or batch
        config = make_dataset(name, tmp)
        for processes in counts:
            code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import run; "
                    f"print('RESULT' + json.dumps(run.devices_child({str(config)!r}, {args.iterations}, "
                    f"{args.device!r}, {processes}, {batch}, {modes})))")
            result = result_of(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True),
                               f"{name} on {processes} processes")
            row = {"case": name, "patterns": scan[0] * scan[1], "slices": slices, "probe_modes": modes, "batch": batch,
                   "processes": processes, **result}
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        one = next(r for r in rows if r["case"] == row["case"] and r["processes"] == 1)
        row["speed_up"] = one["seconds_per_iteration"] / row["seconds_per_iteration"]
        row["efficiency"] = row["speed_up"] / row["processes"]
    return rows


def devices_markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"One reconstruction on several processes (recon_params.devices), device {meta['device']}, "
             f"{meta['cores']} cores, median of iterations 2..{meta['iterations']}, {meta['date']}:", "",
             "| case | patterns | slices | modes | batch | processes | s/it | speed-up | efficiency |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['patterns']} | {r['slices']} | {r['probe_modes']} | {r['batch']} "
                     f"| {r['processes']} | {r['seconds_per_iteration']:.3f} | {r['speed_up']:.2f} "
                     f"| {r['efficiency']:.2f} |")
    return "\n".join(lines) + "\n"


def compile_markdown(rows: list[dict]) -> str:
    """recon_params.compile against eager, per case, with what compiling costs up front."""
    rows = [r for r in rows if "ptyflow_compiled" in r]
    if not rows:
        return ""
    lines = ["", "torch.compile (recon_params.compile) against eager, same run:", "",
             "| case | eager s/it | compiled s/it | eager / compiled | first iteration eager s | "
             "first iteration compiled s | iterations to repay the compiling |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        eager, comp = r["ptyflow"], r["ptyflow_compiled"]
        gain = eager["seconds_per_iteration"] - comp["seconds_per_iteration"]
        cost = comp["first_iteration_seconds"] - eager["first_iteration_seconds"]
        repay = f"{cost / gain:.0f}" if gain > 0 else "never"
        lines.append(f"| {r['case']} | {eager['seconds_per_iteration']:.3f} | {comp['seconds_per_iteration']:.3f} "
                     f"| {eager['seconds_per_iteration'] / comp['seconds_per_iteration']:.2f} "
                     f"| {eager['first_iteration_seconds']:.1f} | {comp['first_iteration_seconds']:.1f} | {repay} |")
    return "\n".join(lines) + "\n"


def scaling_markdown(rows: list[dict]) -> str:
    lines = ["", "How ptyflow's time grows, one factor at a time from the small case (same run):", "",
             "| factor | value | patterns | batch | slices | modes | s/it | ms/pattern | FFT floor s/it "
             "| ptyflow / floor | peak MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, floor = r["ptyflow"], r["fft_floor"]
        lines.append(f"| {r['factor']} | {r['value']} | {r['patterns']} | {r['batch']} | {r['slices']} "
                     f"| {r['probe_modes']} | {ours['seconds_per_iteration']:.3f} "
                     f"| {1e3 * ours['seconds_per_pattern']:.3f} | {floor['seconds_per_iteration']:.3f} "
                     f"| {ours['seconds_per_iteration'] / floor['seconds_per_iteration']:.2f} "
                     f"| {ours['peak_bytes'] / 1e6:.0f} |")
    return "\n".join(lines) + "\n"


def per_pattern_kb(result: dict) -> float:
    """Peak memory above the start-up baseline (imports, runtime), per diffraction pattern."""
    return (result["peak_bytes"] - result.get("baseline_bytes", 0)) / result["n_patterns"] / 1e3


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Device {meta['device']}, {meta['threads']} threads, median of iterations 2..{meta['iterations']}, "
             f"median of {meta.get('repeats', 1)} interleaved run(s) per code, {meta['date']}. "
             "Peak kB/pattern: peak memory above the start-up baseline, per pattern.", "",
             "| case | patterns | slices | modes | ptyflow s/it | ms/pattern | PtyRAD s/it | PtyRAD / ptyflow "
             "| FFT floor s/it | ptyflow / floor | ptyflow peak MB | PtyRAD peak MB | ptyflow peak kB/pattern "
             "| PtyRAD peak kB/pattern |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours, floor, peer = r["ptyflow"], r["fft_floor"], r.get("ptyrad")
        cells = [r["case"], r["patterns"], r["slices"], r["probe_modes"], f"{ours['seconds_per_iteration']:.3f}",
                 f"{1e3 * ours['seconds_per_pattern']:.3f}",
                 f"{peer['seconds_per_iteration']:.3f}" if peer else "-",
                 f"{peer['seconds_per_iteration'] / ours['seconds_per_iteration']:.2f}" if peer else "-",
                 f"{floor['seconds_per_iteration']:.3f}",
                 f"{ours['seconds_per_iteration'] / floor['seconds_per_iteration']:.2f}",
                 f"{ours['peak_bytes'] / 1e6:.0f}", f"{peer['peak_bytes'] / 1e6:.0f}" if peer else "-",
                 f"{per_pattern_kb(ours):.0f}", f"{per_pattern_kb(peer):.0f}" if peer else "-"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"



# --------------------------------------------------------------------------- the user's path
def tree_rss_bytes(root_pid: int) -> int:
    """Summed resident memory of a process and all its descendants (Linux /proc)."""
    import os

    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, pending = 0, [root_pid]
    while pending:
        pid = pending.pop()
        total += rss.get(pid, 0)
        pending += children.get(pid, [])
    return total


def timed_cli_run(config: Path, run_dir: Path, env: dict) -> dict:
    """`ptyflow run` as a user starts it; wall time, the run's timing line and the peak memory of
    its process tree."""
    import re
    import threading

    import numpy as np

    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(config), "--run-dir", str(run_dir)],
                            env=env, cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"ptyflow run failed ({proc.returncode}): {stderr[-2000:]}")
    line = next(x for x in stdout.splitlines() if x.startswith("timing: "))
    parts = {name: float(value) for name, value in re.findall(r"([A-Za-z][A-Za-z ,-]*?) ([0-9.]+) s", line[8:])}
    parts = {name.strip(", "): value for name, value in parts.items()}
    parts["process start and exit"] = wall - sum(parts.values())
    from ptycho_core.rundir import newest_checkpoint

    seconds = newest_checkpoint(run_dir, warn=lambda m: None).history["seconds"]
    return {"wall_seconds": wall, "parts": parts, "fixed_seconds": wall - parts["iterations"],
            "peak_tree_bytes": peak[0], "seconds_per_iteration": float(np.median(seconds[1:])),
            "first_iteration_seconds": seconds[0]}


USER_MODES = ("fresh home", "warm home", "running server")


class UserPath:
    """`ptyflow run` as users start it, per case: with a fresh Prefect home (the embedded server
    creates its database), the same home warm, and against a Prefect server that is already
    running (started once, and healthy before anything is measured, so its own start does not
    slow the other codes)."""

    def __init__(self, tmp: Path, args):
        import os
        import socket

        import httpx

        self.tmp, self.args = tmp, args
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.server_env = {**os.environ, "PREFECT_HOME": str(tmp / "server-home"),
                           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        self.server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                        "--port", str(port)], env=self.server_env, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        _wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200)
        time.sleep(5)  # let its services finish their first rounds
        self.count = 0

    def config_for(self, name: str, dataset_config: Path) -> Path:
        """The case's dataset config with the settings the in-process core measures."""
        import yaml

        _, _, _, modes, batch = CASES[name]
        raw = equivalent_raw(dataset_config, self.args.iterations, self.args.device, modes, batch,
                             **{"recon_params.threads": self.args.threads})
        raw["data"]["path"] = str(dataset_config.parent / raw["data"]["path"])
        config = self.tmp / f"{name}-user.yaml"
        config.write_text(yaml.safe_dump(raw))
        return config

    def measure(self, config: Path) -> dict[str, dict]:
        """One `ptyflow run` per mode; the fresh home is new each call and then reused warm."""
        import os

        self.count += 1
        home = self.tmp / f"home-{self.count}"
        embedded = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        embedded.pop("PREFECT_API_URL", None)
        results = {}
        for mode, env in zip(USER_MODES, (embedded, embedded, self.server_env)):
            result = timed_cli_run(config, self.tmp / f"run-{self.count}-{mode.replace(' ', '-')}", env)
            results[mode] = result
            print(json.dumps({"mode": mode, **result}), flush=True)
        return results

    def close(self) -> None:
        self.server.terminate()
        self.server.wait(timeout=30)


def _wait_for(predicate, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise RuntimeError("the Prefect server did not come up")


def user_path_markdown(rows: list[dict]) -> str:
    """`ptyflow run` beside the in-process core: per iteration, fixed cost and the whole process
    tree's peak memory, and where each mode's fixed cost goes (the run's own timing line)."""
    lines = ["", "`ptyflow run` end to end (Prefect included) beside the in-process core, same data and settings. "
             "s/it: median of iterations 2..N from the run's own history (median over the repeats); fixed s: wall time "
             "minus the iterations (the run of median fixed cost, whose split is below); "
             "peak MB: resident memory of ptyflow and every process it started (the embedded server included), "
             "sampled every 50 ms.", "",
             "| case | in-process s/it | " + " | ".join(f"{m}: s/it, fixed s, peak MB" for m in USER_MODES) + " |",
             "|---|---|" + "---|" * len(USER_MODES)]
    for row in rows:
        runs = row["ptyflow_run"]
        cells = [f"{runs[m]['seconds_per_iteration']:.3f}, {runs[m]['fixed_seconds']:.1f}, "
                 f"{runs[m]['peak_tree_bytes'] / 1e6:.0f}" for m in USER_MODES]
        lines.append(f"| {row['case']} | {row['ptyflow']['seconds_per_iteration']:.3f} | " + " | ".join(cells) + " |")
    names = [n for n in rows[0]["ptyflow_run"]["warm home"]["parts"] if n != "iterations"]
    lines += ["", "Where the fixed cost goes (s):", "",
              "| case, mode | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        for m in USER_MODES:
            parts = row["ptyflow_run"][m]["parts"]
            lines.append(f"| {row['case']}, {m} | " + " | ".join(f"{parts.get(n, 0.0):.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
