"""What the detector blur costs (model_params.detector_blur_std), side by side in one run. Not run by CI.

    python benchmarks/blur.py [--data DIR] [--iterations 10] [--repeats 2] [--threads 1]
                              [--no-user-path] [--out benchmarks/measured --name blur]

forward.gaussian_blur blurs images up to DENSE_BLUR_MAX_PX on a side (diffraction patterns) as two
products with dense (n, n) matrices, larger ones by a separable convolution. Timed, interleaved:
- the blur alone, forward and backward: 32 patterns of 64² (a default batch), a 4-slice canvas of
  256² and one image of 1024² (ALONE_CASES), dense against the convolution (DENSE_BLUR_MAX_PX set
  to 0 for it);
- Reconstruction.run on the realistic abTEM dataset (tests/abtem_data.py, cached in --data): no
  blur, blur 0.6 px dense, blur 0.6 px by convolution;
- the path users run, `ptyflow run` end to end: no blur against blur 0.6 px, --repeats times in
  alternating order, after one uncounted run (the first start of Prefect and the imports is slower).
Ratios are against no blur. Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

BLUR_PX = 0.6
SETTINGS = {"no blur": {}, "blur": {"model_params.detector_blur_std": BLUR_PX}}
# (shape, std px, repeats): a batch of patterns, an object canvas (obj_preblur_std), a large image
ALONE_CASES = (((32, 64, 64), BLUR_PX, 200), ((4, 256, 256), 0.5, 40), ((1, 1024, 1024), 2.5, 5))


def blur_alone(dense: bool, shape: tuple[int, ...], std_px: float, repeats: int) -> float:
    """ms per forward and backward of the blur on a float32 tensor of ``shape``."""
    import torch

    from ptycho_core import forward as fw

    saved = fw.DENSE_BLUR_MAX_PX
    fw.DENSE_BLUR_MAX_PX = max(saved, max(shape[-2:])) if dense else 0
    try:
        images = torch.rand(*shape, requires_grad=True)
        for _ in range(3):
            fw.gaussian_blur(images, std_px).sum().backward()
        started = time.perf_counter()
        for _ in range(repeats):
            fw.gaussian_blur(images, std_px).sum().backward()
        return (time.perf_counter() - started) / repeats * 1e3
    finally:
        fw.DENSE_BLUR_MAX_PX = saved


def run_in_process(data: Path, name: str, iterations: int, dense: bool = True) -> dict:
    from scan_cost import in_process

    from ptycho_core import forward as fw

    saved = fw.DENSE_BLUR_MAX_PX
    fw.DENSE_BLUR_MAX_PX = saved if dense else 0
    try:
        row = in_process(data, name, iterations, SETTINGS[name])
    finally:
        fw.DENSE_BLUR_MAX_PX = saved
    row["setting"] = name if dense or name == "no blur" else f"{name} (convolution)"
    return row


def main() -> None:
    from scan_cost import cost_setup, user_path, write_measured

    args, data = cost_setup(__doc__, 10, "blur")
    alone = {str(shape): {"dense": [], "convolution": []} for shape, _, _ in ALONE_CASES}
    rows = []
    for _ in range(args.repeats):
        for shape, std, repeats in ALONE_CASES:
            alone[str(shape)]["dense"].append(blur_alone(True, shape, std, repeats))
            alone[str(shape)]["convolution"].append(blur_alone(False, shape, std, repeats))
        for name, dense in (("no blur", True), ("blur", True), ("blur", False)):
            rows.append(run_in_process(data, name, args.iterations, dense))
            print(json.dumps(rows[-1]), flush=True)
    if not args.no_user_path:
        user_path(data, "no blur", args.iterations, args.threads, {})  # not counted: the first start is slower
        for repeat in range(args.repeats):
            for name in list(SETTINGS)[:: 1 if repeat % 2 == 0 else -1]:  # the order alternates
                rows.append(user_path(data, name, args.iterations, args.threads, SETTINGS[name]))
                print(json.dumps(rows[-1]), flush=True)

    def mean(name, path, key="seconds"):
        values = [r[key] for r in rows if r["setting"] == name and r["path"] == path]
        return float(np.mean(values)) if values else None

    lines = [f"# The detector blur: cost ({BLUR_PX} px; {args.iterations} iterations, realistic abTEM data, "
             f"{args.threads} thread(s), {args.repeats} interleaved repeats in process)", "",
             "The blur alone, forward and backward (ms, mean):", "",
             "| shape | std px | dense | convolution | convolution / dense |", "|---|---|---|---|---|"]
    for shape, std, _ in ALONE_CASES:
        dense_ms, conv_ms = (np.mean(alone[str(shape)][k]) for k in ("dense", "convolution"))
        lines.append(f"| {shape} | {std} | {dense_ms:.2f} | {conv_ms:.2f} | {conv_ms / dense_ms:.1f}x |")
    lines += ["", "| setting | path | seconds (mean) | vs no blur |", "|---|---|---|---|"]
    for path in ("in-process", "ptyflow run"):
        base = mean("no blur", path)
        for name in ("no blur", "blur", "blur (convolution)"):
            value = mean(name, path)
            if value is not None:
                lines.append(f"| {name} | {path} | {value:.1f} | {value / base:.2f}x |")
    write_measured(args, {"rows": rows, "blur_alone_ms": alone}, lines)


if __name__ == "__main__":
    main()
