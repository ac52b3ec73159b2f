"""Run PtyRAD 1.0.0 on an abTEM dataset of benchmarks/abtem_sto.py; write its result to an .npz.

Runs inside PtyRAD's own virtual environment (see benchmarks/README.md):
    python ptyrad_quality_driver.py DATA_H5 SETTINGS_JSON OUT_NPZ

SETTINGS_JSON: {"iterations": N, "threads": T, "slices": Z, "params": {...}, "score_at": [...]} where
"params" is merged into PtyRAD's own parameter groups (e.g. {"model_params": {"update_params": ...}});
what it leaves out keeps PtyRAD's defaults. With "score_at" the object phase and positions at those
iterations are kept too (objp_iterN, positions_px_iterN). With "first_batch": true the driver also stores the initial
tensors, the normalized measurements, the batches and the loss and gradients of the first batch,
so ptyflow can be compared with it step by step (benchmarks/quality.py --compare-first-step).
"""

import json
import math
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
import yaml
from ptyrad_driver import load_ptyrad


def merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def main():
    data_path, settings_path, out_path = sys.argv[1:4]
    settings = json.loads(Path(settings_path).read_text())
    torch.set_num_threads(int(settings.get("threads", 2)))
    with h5py.File(data_path, "r") as f:
        scan_y, scan_x, ny, nx = f["meas"].shape
        attrs = dict(f.attrs)
    work = Path(tempfile.mkdtemp(prefix="ptyrad-quality-"))
    params = {
        "init_params": {
            "random_seed": 0,
            "probe_kv": float(attrs["energy_kev"]), "probe_conv_angle": float(attrs["conv_angle_mrad"]),
            "probe_aberrations": {"C10": -float(attrs["defocus_ang"])},
            "meas_Npix": ny, "pos_N_scan_slow": scan_y, "pos_N_scan_fast": scan_x,
            "pos_scan_step_size": float(attrs["step_ang"]),
            "obj_Nlayer": int(settings["slices"]),
            "obj_slice_thickness": float(attrs["thickness_ang"]) / int(settings["slices"]),
            "meas_reshape": [scan_y * scan_x, ny, nx],
            "meas_calibration": {"mode": "dx", "value": float(attrs["dx_ang"])},
            "meas_params": {"path": str(data_path), "key": "meas"},
        },
        "recon_params": {"NITER": int(settings["iterations"]), "SAVE_ITERS": None, "output_dir": str(work / "output")},
    }
    merge(params, settings.get("params", {}))
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    load_params, solver_cls = load_ptyrad()
    score_at = sorted(int(i) for i in settings.get("score_at", []) if int(i) < int(settings["iterations"]))
    out = {}
    if score_at:
        params["recon_params"]["SAVE_ITERS"] = math.gcd(*score_at)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        capture_at(score_at, out)
    loaded = load_params(str(work / "params.yaml"), validate=True)
    if settings.get("data.pos_key"):
        # positions from the file (the realistic case's truth/): PtyRAD's own raster (as its 'simu'
        # source makes it) moved by the file's positions less its nominal ones, through the 'custom'
        # source; with the nominal positions this is the 'simu' raster exactly
        with h5py.File(data_path, "r") as f:
            given = f[settings["data.pos_key"]][()]
            nominal = f["truth/nominal_positions_yx_ang"][()]
        dx, step = float(attrs["dx_ang"]), float(attrs["step_ang"])
        raster = step / dx * np.array([(y, x) for y in range(scan_y) for x in range(scan_x)], dtype=np.float64)
        raster = raster - raster.mean(0)
        extent = (1.2 * np.ceil(raster.max(0) - raster.min(0) + np.array([ny, nx]))).astype(int)
        raster = raster + (extent // 2 - np.array([ny, nx]) // 2)
        loaded["init_params"]["pos_source"] = "custom"
        loaded["init_params"]["pos_params"] = raster + (given - nominal) / dx
        loaded["init_params"]["pos_N_scans"] = scan_y * scan_x
    solver = solver_cls(loaded, device="cpu", seed=0)
    if settings.get("first_batch"):
        out.update(first_batch(solver, loaded))
    solver.run()
    model = solver.reconstruct_results
    window = np.array(model.get_complex_probe_view().shape[-2:])
    out.update({
        "objp": model.opt_objp.detach().numpy(),
        "obja": model.opt_obja.detach().numpy(),
        "probe": model.get_complex_probe_view().detach().numpy(),
        "positions_px": (model.crop_pos.numpy() + model.opt_probe_pos_shifts.detach().numpy() + window // 2),
        "loss": np.array([entry[1] for entry in model.loss_iters], dtype=np.float64),
        "seconds": np.array(model.iter_times, dtype=np.float64),
    })
    np.savez(out_path, **out)
    print("RESULT" + json.dumps({"iterations": len(model.iter_times), "out": str(out_path)}))


def capture_at(iterations: list[int], out: dict) -> None:
    """Keep the object phase and the positions at these iterations, in ``out`` as objp_iterN and
    positions_px_iterN: PtyRAD's saving of intermediate results (called every SAVE_ITERS) is replaced
    by a copy in memory, and its summary figures are not drawn."""
    from ptyrad.solver import reconstruction

    def keep(output_path, model, params, optimizer, scheduler, niter, *args, **kwargs):
        if niter in iterations:
            window = np.array(model.get_complex_probe_view().shape[-2:])
            out[f"objp_iter{niter}"] = model.opt_objp.detach().numpy().copy()
            out[f"positions_px_iter{niter}"] = (model.crop_pos.numpy() + model.opt_probe_pos_shifts.detach().numpy()
                                                + window // 2)

    reconstruction.save_results = keep
    reconstruction.plot_summary = lambda *args, **kwargs: None


def first_batch(solver, params) -> dict:
    """Initial tensors, batches and the first batch's loss and gradients, from a model built the
    way PtyRAD's reconstruct() builds it."""
    from ptyrad.core.models.ptycho import PtychoModel
    from ptyrad.solver.reconstruction import compute_loss, prepare_recon

    model = PtychoModel(solver.init.init_variables, params["model_params"], device="cpu")
    _, batches, _ = prepare_recon(model, solver.init, params)
    initial = {
        "init_obja": model.opt_obja.detach().numpy().copy(),
        "init_objp": model.opt_objp.detach().numpy().copy(),
        "init_probe": model.get_complex_probe_view().detach().numpy().copy(),
        "init_shifts": model.opt_probe_pos_shifts.detach().numpy().copy(),
        "crop_pos": model.crop_pos.numpy().copy(),
        "meas_normalized": np.asarray(model.get_measurements(), dtype=np.float32),
        "batch0": np.asarray(batches[0]),
        "n_batches": np.array(len(batches)),
    }
    batch = torch.as_tensor(batches[0])
    loss, _ = compute_loss(batch, model, model, model.get_measurements(batch), solver.loss_fn)
    loss.backward()
    initial["batch0_loss"] = np.array(float(loss))
    for name, tensor in model.optimizable_tensors.items():
        if tensor.grad is not None:
            initial[f"batch0_grad_{name}"] = tensor.grad.detach().numpy().copy()
    return initial


if __name__ == "__main__":
    main()
