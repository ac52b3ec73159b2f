"""What the detector blur costs (model_params.detector_blur_std), side by side in one run. Not run by CI.

    python benchmarks/blur.py [--data DIR] [--iterations 10] [--repeats 2] [--threads 1]
                              [--no-user-path] [--out benchmarks/measured --name blur]

forward.gaussian_blur blurs images up to DENSE_BLUR_MAX_PX on a side (diffraction patterns) as two
products with dense (n, n) matrices, larger ones by a separable convolution. Timed, interleaved:
- the blur alone, forward and backward, on 32 patterns of 64² (a default batch): dense against the
  convolution (DENSE_BLUR_MAX_PX set to 0 for it);
- Reconstruction.run on the realistic abTEM dataset (tests/abtem_data.py, cached in --data): no
  blur, blur 0.6 px dense, blur 0.6 px by convolution;
- the path users run, `ptyflow run` end to end: no blur against blur 0.6 px.
Ratios are against no blur. Writes NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

BLUR_PX = 0.6
SETTINGS = {"no blur": {}, "blur": {"model_params.detector_blur_std": BLUR_PX}}


def blur_alone(dense: bool, repeats: int = 200) -> float:
    """ms per forward and backward of the blur on (32, 64, 64) float32."""
    import torch

    from ptycho_core import forward as fw

    saved = fw.DENSE_BLUR_MAX_PX
    fw.DENSE_BLUR_MAX_PX = saved if dense else 0
    try:
        images = torch.rand(32, 64, 64, requires_grad=True)
        for _ in range(5):
            fw.gaussian_blur(images, BLUR_PX).sum().backward()
        started = time.perf_counter()
        for _ in range(repeats):
            fw.gaussian_blur(images, BLUR_PX).sum().backward()
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "ptyflow-abtem")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-user-path", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "measured")
    parser.add_argument("--name", default="blur")
    args = parser.parse_args()

    import torch

    from abtem_data import realistic_dataset
    from scan_cost import user_path

    torch.set_num_threads(args.threads)
    args.data.mkdir(parents=True, exist_ok=True)
    data = realistic_dataset(args.data)
    alone = {"dense": [], "convolution": []}
    rows = []
    for _ in range(args.repeats):
        alone["dense"].append(blur_alone(True))
        alone["convolution"].append(blur_alone(False))
        for name, dense in (("no blur", True), ("blur", True), ("blur", False)):
            rows.append(run_in_process(data, name, args.iterations, dense))
            print(json.dumps(rows[-1]), flush=True)
    if not args.no_user_path:
        for name in SETTINGS:
            rows.append(user_path(data, name, args.iterations, args.threads, SETTINGS[name]))
            print(json.dumps(rows[-1]), flush=True)

    def mean(name, path, key="seconds"):
        values = [r[key] for r in rows if r["setting"] == name and r["path"] == path]
        return float(np.mean(values)) if values else None

    dense_ms, conv_ms = np.mean(alone["dense"]), np.mean(alone["convolution"])
    lines = [f"# The detector blur: cost ({BLUR_PX} px; {args.iterations} iterations, realistic abTEM data, "
             f"{args.threads} thread(s), {args.repeats} interleaved repeats in process)", "",
             f"The blur alone, forward and backward, 32 patterns of 64²: dense {dense_ms:.2f} ms, convolution "
             f"{conv_ms:.2f} ms ({conv_ms / dense_ms:.1f}x).", "",
             "| setting | path | seconds (mean) | vs no blur |", "|---|---|---|---|"]
    for path in ("in-process", "ptyflow run"):
        base = mean("no blur", path)
        for name in ("no blur", "blur", "blur (convolution)"):
            value = mean(name, path)
            if value is not None:
                lines.append(f"| {name} | {path} | {value:.1f} | {value / base:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps({"rows": rows, "blur_alone_ms": alone}, indent=1))
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
