"""Where an iteration on the GPU makes the host wait (benchmarks/gpu.sh runs it).

Each host sync inside an iteration (a .item(), a copy from pageable memory, a data-dependent
shape) stops the host from queueing kernels ahead of the GPU. torch's sync debug mode warns at
each one; this counts them per iteration by the line of ptyflow that caused them.

    python benchmarks/gpu_syncs.py [--case medium] [--iterations 2]
"""

import argparse
import collections
import sys
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="medium")
    parser.add_argument("--iterations", type=int, default=2)
    args = parser.parse_args()
    import tempfile

    import torch

    import run
    from ptycho_core.config import config_from_dict, resolve_paths
    from ptycho_core.io.preprocess import preprocess
    from ptycho_core.reconstruction import Reconstruction

    if not torch.cuda.is_available():
        print("gpu_syncs: no CUDA device, nothing to count")
        return
    with tempfile.TemporaryDirectory() as tmp:
        config = run.make_dataset(args.case, Path(tmp))
        _, _, _, modes, batch = run.CASES[args.case]
        raw = run.equivalent_raw(config, 1 + args.iterations, "cuda", modes, batch)
        cfg = resolve_paths(config_from_dict(raw), config.parent)
        rec = Reconstruction.create(cfg, preprocess(cfg))
        rec.run(1)  # the first iteration allocates and tunes; not counted
        sites: collections.Counter = collections.Counter()

        def record(message, category, filename, lineno, file=None, line=None):
            # the innermost frame in ptyflow's own code says which line asked for the sync
            ours = [f for f in traceback.extract_stack() if "ptycho_core" in f.filename]
            where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].line}" if ours else f"{filename}:{lineno}"
            sites[where] += 1

        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            rec.run(1 + args.iterations)
        torch.cuda.set_sync_debug_mode(0)
    batches = -(-rec.model.n_positions // batch)
    print(f"host syncs per iteration ({args.case}, {batches} batches an iteration, {args.iterations} iterations):")
    for where, count in sites.most_common():
        print(f"  {count / args.iterations:7.1f}  {where}")
    if not sites:
        print("  none")


if __name__ == "__main__":
    main()
