"""What the scan's measurement and fit cost (model_params.scan_fit), side by side in one run. Not run by CI.

    python benchmarks/scan_cost.py [--data DIR] [--iterations 20] [--repeats 2] [--threads 1]
                                   [--no-user-path] [--out benchmarks/measured --name scan_cost]

On the realistic abTEM dataset (tests/abtem_data.py; cached in --data) three settings are timed,
interleaved, each run in the same process (Reconstruction.run, as the benchmarks' quality runs):
- defaults: the measured map, then the fit every second iteration from 2 to 20;
- previous: the schedule before the measurement (every iteration from 2 to 10, first affine step
  0.01, no measurement, positions at 1e-4 px);
- off: no scan fit and no measurement (scan_fit.start_iter null).
The measurement alone is timed too (engine.measure_scan_map on the same problem).
Then the path users run: `ptyflow run` end to end (Prefect's embedded default, a fresh run
directory each) for defaults and off. Ratios are against `off`. Writes NAME.json and NAME.md.
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
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

SETTINGS = {
    "defaults": {},
    "previous": {"model_params.scan_fit.stop_iter": 10, "model_params.scan_fit.freq": 1,
                 "model_params.scan_fit.affine_step": 0.01, "model_params.scan_fit.measure_affine": False,
                 "model_params.update_params.probe_pos_shifts": {"start_iter": 10, "lr": 1e-4}},
    "off": {"model_params.scan_fit.start_iter": None},
}


def in_process(data: Path, name: str, iterations: int, settings: dict | None = None) -> dict:
    """One Reconstruction.run of ``iterations`` on ``data`` at SETTINGS[name] (or ``settings``)."""
    from quality import ptyflow_config

    from ptycho_core.io.preprocess import read_preprocessed
    from ptycho_core.reconstruction import Reconstruction
    from ptycho_core.stages.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        config = ptyflow_config(data, 4, iterations, SETTINGS[name] if settings is None else settings)
        prepare(config, Path(tmp) / "run")
        rec = Reconstruction.create(config, read_preprocessed(Path(tmp) / "run" / "preprocessed.h5"))
        started = time.perf_counter()
        rec.run(iterations)
        total = time.perf_counter() - started
        seconds = np.array(rec.state.history["seconds"])
    return {"setting": name, "path": "in-process", "seconds": total, "fit_iterations_s": float(seconds[1:20].mean()),
            "later_iterations_s": float(seconds[20:].mean()) if len(seconds) > 20 else None}


def measurement_alone(data: Path) -> float:
    from quality import ptyflow_config

    from ptycho_core.io.preprocess import read_preprocessed
    from ptycho_core.reconstruction import Reconstruction
    from ptycho_core.engine import measure_scan_map
    from ptycho_core.stages.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        config = ptyflow_config(data, 4, 1, {})
        prepare(config, Path(tmp) / "run")
        rec = Reconstruction.create(config, read_preprocessed(Path(tmp) / "run" / "preprocessed.h5"))
        started = time.perf_counter()
        measure_scan_map(rec.model, rec.problem)
        return time.perf_counter() - started


def user_path(data: Path, name: str, iterations: int, threads: int, settings: dict | None = None) -> dict:
    """One `ptyflow run` end to end at SETTINGS[name] (or ``settings``), a fresh run directory."""
    import yaml

    from abtem_data import quality_config
    from ptycho_core.config import set_dotted

    raw = quality_config(data, 4, iterations)
    raw["recon_params"]["threads"] = threads
    for key, value in (SETTINGS[name] if settings is None else settings).items():
        set_dotted(raw, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.yaml"
        config.write_text(yaml.safe_dump(raw))
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(config), "--run-dir", str(Path(tmp) / "run")],
                              cwd=HERE.parent, capture_output=True, text=True)
        total = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"ptyflow run ({name}) exited {done.returncode}: {done.stderr[-2000:]}")
    return {"setting": name, "path": "ptyflow run", "seconds": total}


def cost_setup(doc: str, iterations: int, name: str) -> tuple[argparse.Namespace, Path]:
    """The cost benchmarks' command line (this one's and blur.py's) parsed, torch's threads set,
    and the realistic abTEM dataset (simulated into --data on first use)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "ptyflow-abtem")
    parser.add_argument("--iterations", type=int, default=iterations)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-user-path", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "measured")
    parser.add_argument("--name", default=name)
    args = parser.parse_args()

    import torch

    from abtem_data import realistic_dataset

    torch.set_num_threads(args.threads)
    args.data.mkdir(parents=True, exist_ok=True)
    return args, realistic_dataset(args.data)


def write_measured(args: argparse.Namespace, record: dict, lines: list[str]) -> None:
    """--out/--name .json (the rows) and .md (the table ``lines``), and the table printed."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    args, data = cost_setup(__doc__, 20, "scan_cost")
    rows = []
    for _ in range(args.repeats):
        for name in SETTINGS:
            rows.append(in_process(data, name, args.iterations))
            print(json.dumps(rows[-1]), flush=True)
    alone = [measurement_alone(data) for _ in range(args.repeats)]
    print(f"measurement alone: {alone}", flush=True)
    if not args.no_user_path:
        for name in ("defaults", "off"):
            rows.append(user_path(data, name, args.iterations, args.threads))
            print(json.dumps(rows[-1]), flush=True)

    def mean(name, path, key="seconds"):
        values = [r[key] for r in rows if r["setting"] == name and r["path"] == path and r.get(key) is not None]
        return float(np.mean(values)) if values else None

    lines = [f"# The scan's measurement and fit: cost ({args.iterations} iterations, realistic abTEM data, "
             f"{args.threads} thread(s), {args.repeats} interleaved repeats in process)", "",
             "| setting | path | seconds (mean) | vs off | mean s/it, iterations 2-20 |", "|---|---|---|---|---|"]
    for path in ("in-process", "ptyflow run"):
        off = mean("off", path)
        for name in SETTINGS:
            value = mean(name, path)
            if value is None:
                continue
            per_it = mean(name, path, "fit_iterations_s")
            lines.append(f"| {name} | {path} | {value:.1f} | {value / off:.2f}x | "
                         f"{'' if per_it is None else f'{per_it:.3f}'} |")
    lines += ["", f"The measurement alone (before the first iteration): {np.mean(alone):.2f} s (mean of {len(alone)})."]
    write_measured(args, {"rows": rows, "measurement_s": alone}, lines)


if __name__ == "__main__":
    main()
