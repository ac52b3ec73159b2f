"""Run PtyRAD 1.0.0 on a ptyflow-simulated dataset with equivalent settings; prints RESULT{json}.

Runs inside PtyRAD's own virtual environment (see benchmarks/README.md):
    python ptyrad_driver.py CONFIG_YAML ITERATIONS DEVICE PROBE_MODES BATCH THREADS
"""

import json
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml
from memory import current_rss_bytes, peak_rss_bytes


def load_ptyrad():
    # A CPU torch beside the registry's torchvision: declaring the two C++ ops torchvision expects
    # lets it import; PtyRAD only uses its pure-Python gaussian_blur.
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        for name in ("torchvision::nms", "torchvision::qnms"):
            try:
                torch.library.define(name, "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass
        sys.modules.pop("torchvision", None)
    from ptyrad.params.parser import load_params
    from ptyrad.solver.ptyrad_solver import PtyRADSolver

    return load_params, PtyRADSolver


def main():
    config_path, iterations, device, modes, batch, threads = sys.argv[1:7]
    torch.set_num_threads(int(threads))
    ours = yaml.safe_load(Path(config_path).read_text())
    data_path = Path(config_path).parent / ours["data"]["path"]
    with h5py.File(data_path, "r") as f:
        scan_y, scan_x, ny, nx = f["meas"].shape
        dx = float(f.attrs["dx_ang"])
        step = float(f.attrs["step_ang"])
        truth_slices = f["ground_truth/objp"].shape[1]
    exp = ours["experiment"]
    obj = ours["init"]["object"]
    work = Path(tempfile.mkdtemp(prefix="ptyrad-bench-"))
    params = {
        "init_params": {
            "probe_kv": exp["energy_kev"], "probe_conv_angle": exp["conv_angle_mrad"],
            "probe_aberrations": {"C10": -exp.get("defocus_ang", 0.0)},
            "meas_Npix": ny, "pos_N_scan_slow": scan_y, "pos_N_scan_fast": scan_x, "pos_scan_step_size": step,
            "probe_pmode_max": int(modes), "obj_Nlayer": truth_slices, "obj_slice_thickness": obj["slice_thickness_ang"],
            "meas_reshape": [scan_y * scan_x, ny, nx], "meas_flipT": [0, 0, 0],
            "meas_calibration": {"mode": "dx", "value": dx},
            "meas_params": {"path": str(data_path), "key": "meas"},
        },
        "recon_params": {"NITER": int(iterations), "BATCH_SIZE": {"size": int(batch), "grad_accumulation": 1},
                         "SAVE_ITERS": None, "output_dir": str(work / "output")},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    load_params, solver_cls = load_ptyrad()
    baseline = 0 if device == "cuda" else current_rss_bytes()  # interpreter, torch and PtyRAD imported
    loaded = load_params(str(work / "params.yaml"), validate=True)
    solver = solver_cls(loaded, device=device)
    solver.run()
    model = solver.reconstruct_results
    times = [float(t) for t in model.iter_times][1:]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss_bytes()
    median = float(np.median(times))
    n = scan_y * scan_x
    print("RESULT" + json.dumps({"seconds_per_iteration": median, "seconds_per_pattern": median / n,
                                 "peak_bytes": int(peak), "baseline_bytes": int(baseline), "n_patterns": n,
                                 "iterations_timed": len(times)}))


if __name__ == "__main__":
    main()
