"""ptyflow's first batch beside PtyRAD 1.0.0's, from PtyRAD's own initial tensors and data.

    python benchmarks/first_step.py --ptyrad-python /path/to/ptyrad-venv/bin/python [--case thin] [--modes 1]

PtyRAD builds its model (positions without its random jitter) and stores its initial object, probe,
positions, normalized measurements, first batch, and that batch's loss and gradients. ptyflow's
forward model is then built from the same tensors and scores the same batch: the loss it would have
under PtyRAD's definition must equal PtyRAD's, and every gradient must point the same way; their
ratio is the ratio of the two loss normalizations. Prints one line per tensor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from abtem_data import quality_dataset  # noqa: E402
from ptycho_core.losses import BatchStats, amplitude_loss  # noqa: E402
from ptycho_core.model import TENSOR_NAMES, PtychoAD, UpdateRule  # noqa: E402
from ptycho_core.physics import wavelength_ang  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptyrad-python", required=True)
    parser.add_argument("--case", default="thin", help="thin or thick (noisy)")
    parser.add_argument("--modes", type=int, default=1, help="probe modes")
    parser.add_argument("--data", default=str(HERE / "results" / "abtem"))
    args = parser.parse_args()
    slices = {"thin": 1, "thick": 8}[args.case]
    data = quality_dataset(Path(args.data), args.case)
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "settings.json", Path(tmp) / "first.npz"
        spec.write_text(json.dumps({"iterations": 1, "threads": 2, "slices": slices, "first_batch": True, "params": {
            "init_params": {"pos_scan_rand_std": None, "probe_pmode_max": args.modes}}}))
        subprocess.run([args.ptyrad_python, str(HERE / "ptyrad_quality_driver.py"), str(data), str(spec), str(out)],
                       check=True, capture_output=True, cwd=HERE)
        theirs = dict(np.load(out))
    with h5py.File(data, "r") as f:
        attrs = dict(f.attrs)

    def real(name):
        return torch.from_numpy(np.ascontiguousarray(theirs[name])).to(torch.float64)

    tensors = {"obja": real("init_obja"), "objp": real("init_objp"), "obj_tilts": torch.zeros(1, 2, dtype=torch.float64),
               "slice_thickness": torch.tensor(float(attrs["thickness_ang"]) / slices, dtype=torch.float64),
               "probe": torch.from_numpy(theirs["init_probe"]).to(torch.complex128), "probe_pos_shifts": real("init_shifts")}
    rules = {n: UpdateRule(1, 1e-4) if n in ("obja", "objp", "probe", "probe_pos_shifts") else UpdateRule(None, 0.0)
             for n in TENSOR_NAMES}
    model = PtychoAD(tensors, torch.from_numpy(theirs["crop_pos"].astype(np.int64)), torch.ones(1, dtype=torch.float64),
                     float(attrs["dx_ang"]), wavelength_ang(float(attrs["energy_kev"])), rules)
    model.set_iteration(1)
    indices = torch.from_numpy(theirs["batch0"])
    meas = real("meas_normalized")[indices]
    pred = model(indices)
    # PtyRAD's loss_single: root mean squared amplitude error over the mean measured amplitude
    theirs_way = torch.sqrt(((torch.sqrt(pred + 1e-10) - torch.sqrt(meas)) ** 2).mean()) / torch.sqrt(meas).mean()
    ours = amplitude_loss(pred, meas, BatchStats.of(meas))
    ours.backward()
    theirs_way, ours = theirs_way.detach(), ours.detach()
    print(f"first batch loss: PtyRAD {float(theirs['batch0_loss']):.7g}, ptyflow's prediction scored PtyRAD's way "
          f"{float(theirs_way):.7g}; ptyflow's own loss {float(ours):.7g}")
    expected = float(2 * theirs_way * torch.sqrt(meas).mean() ** 2 / meas.mean())
    print(f"expected gradient ratio ptyflow / PtyRAD (the loss normalizations): {expected:.4f}")
    for name in ("obja", "objp", "probe", "probe_pos_shifts"):
        a = getattr(model, name).grad.numpy().ravel()
        b = theirs[f"batch0_grad_{name}"].astype(np.float64).ravel()
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))
        print(f"{name:17s} |grad| ptyflow {np.linalg.norm(a):.3e}  PtyRAD {np.linalg.norm(b):.3e}  "
              f"ratio {np.linalg.norm(a) / max(np.linalg.norm(b), 1e-300):.4f}  cosine {cosine:.6f}")


if __name__ == "__main__":
    main()
