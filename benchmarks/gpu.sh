#!/usr/bin/env bash
# The GPU session's script: run it first when a session is lent a GPU (the `device` tool), from a
# clone of the repository. In about 5 minutes once the wheels are cached (the first install
# downloads CUDA torch, several GB) it:
#   1. names the card (nvidia-smi) and checks that torch sees it;
#   2. runs the CUDA tests (tests/test_cuda.py: GPU vs CPU, the tiers, a resume; with two GPUs or
#      more, NCCL: every process on its own GPU only, a killed rank named at once);
#   3. runs the benchmark cases with ptyflow, torch.compile, PtyRAD 1.0.0 and the FFT floor on
#      the same GPU, interleaved (benchmarks/run.py --device cuda);
#   4. counts the host syncs inside an iteration (benchmarks/gpu_syncs.py);
#   5. writes benchmarks/measured/gpu.md (the card, the versions, the tables) and gpu.json.
#
#   bash benchmarks/gpu.sh              on the GPU machine
#   bash benchmarks/gpu.sh --dry-run    here, on the CPU: the same steps with the CPU standing in
#                                       for the GPU and fewer iterations, to check the script
#
# Settings (environment): GPU_VENV (.venv-gpu), PTYRAD_VENV (.venv-ptyrad), REPEATS (3),
# ITERATIONS (10), CASES (small,medium,multislice), COMPILE (1: also torch.compile), WHEELS (unset: a folder of wheels to install
# from, for a GPU machine with no package index; the system's CUDA torch is used).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
dry_run=0
[ "${1:-}" = "--dry-run" ] && dry_run=1

GPU_VENV=${GPU_VENV:-$root/.venv-gpu}
PTYRAD_VENV=${PTYRAD_VENV:-$root/.venv-ptyrad}
REPEATS=${REPEATS:-3}
ITERATIONS=${ITERATIONS:-10}
CASES=${CASES:-small,medium,multislice}
out=$root/benchmarks/results/gpu
mkdir -p "$out"
log=$out/gpu.log
: > "$log"
step() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$log"; }
elapsed() { echo $(( $(date +%s) - started )); }
started=$(date +%s)

if [ $dry_run = 1 ]; then
  device=cpu
  card="none (dry run on $(nproc) CPU cores)"
  ITERATIONS=4; REPEATS=1; CASES=small
  GPU_VENV=${GPU_VENV_DRY:-$root/.venv}
  export PTYFLOW_GPU_TEST_DEVICE=cpu
else
  device=cuda
  card=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)
fi
step "card: $card"

# --- 1. environments (kept between sessions on the same machine; created when missing)
# WHEELS: a folder of wheels for a machine with no package index (its CUDA torch, numpy, scipy,
# matplotlib already installed): the venvs see the system's packages and take the rest from there
WHEELS=${WHEELS:-}
system_site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -x "$GPU_VENV/bin/python" ]; then
  if [ -n "$WHEELS" ]; then
    step "creating $GPU_VENV from the system's torch and the wheels in $WHEELS"
    # python3 may itself be a venv's (whose packages --system-site-packages would not see): a .pth
    python3 -m venv "$GPU_VENV"
    echo "$system_site" > "$("$GPU_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/system-site.pth"
    "$GPU_VENV/bin/pip" install -q --no-index --no-deps --no-compile $(ls "$WHEELS"/*.whl | grep -v /ptyrad-)
    "$GPU_VENV/bin/pip" install -q --no-index --no-deps --no-build-isolation -e .
  else
    step "creating $GPU_VENV (torch from PyPI: the CUDA build on Linux x86_64)"
    python3 -m venv "$GPU_VENV"
    "$GPU_VENV/bin/pip" install -q "torch>=2.4"
    "$GPU_VENV/bin/pip" install -q -e ".[test]"
  fi
fi
py=$GPU_VENV/bin/python
"$py" - "$device" <<'EOF' | tee -a "$log"
import sys, torch
device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} does not see a GPU (CUDA build: {torch.version.cuda})")
name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {name}")
EOF

if [ ! -x "$PTYRAD_VENV/bin/python" ] && [ -n "$WHEELS" ]; then
  step "creating $PTYRAD_VENV (PtyRAD 1.0.0 over the GPU venv's packages)"
  python3 -m venv "$PTYRAD_VENV"
  # the GPU venv's site-packages (optuna, pydantic, zarr...) without ptyflow itself, then the system's
  "$py" -c 'import sysconfig, sys; print(sysconfig.get_paths()["purelib"]); print(sys.argv[1])' "$system_site" \
    > "$("$PTYRAD_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/gpu-venv.pth"
  "$PTYRAD_VENV/bin/pip" install -q --no-index --no-deps --no-compile "$WHEELS"/ptyrad-*.whl
fi
if [ ! -x "$PTYRAD_VENV/bin/python" ]; then
  step "creating $PTYRAD_VENV (PtyRAD 1.0.0, same torch)"
  python3 -m venv "$PTYRAD_VENV"
  torch_version=$("$py" -c "import torch; print(torch.__version__.split('+')[0])")
  "$PTYRAD_VENV/bin/pip" install -q "torch==$torch_version" ptyrad==1.0.0 "torchvision"
  # PtyRAD 1.0.0 nests the same quote in an f-string on one line, valid only from Python 3.12
  # (benchmarks/README.md): the inner quotes become double quotes; numerics untouched
  "$PTYRAD_VENV/bin/python" - <<'EOF'
import importlib.util, pathlib, re, sys
if sys.version_info < (3, 12):
    path = pathlib.Path(importlib.util.find_spec("ptyrad").submodule_search_locations[0]) / "plotting" / "basic.py"
    lines = path.read_text().splitlines(keepends=True)
    line = lines[294]
    head, _, tail = line.partition("f'")
    if tail:
        lines[294] = head + "f'" + re.sub(r"\['([^']*)'\]", r'["\1"]', tail)
        path.write_text("".join(lines))
EOF
fi
# run.py records a PtyRAD failure in the table's row (ptyrad_error) and measures the rest
ptyrad_args=(--ptyrad-python "$PTYRAD_VENV/bin/python")
step "environments ready after $(elapsed) s"

# --- 2. the CUDA tests
step "CUDA tests"
set +e
"$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee -a "$log"
tests_status=${PIPESTATUS[0]}
set -e
step "CUDA tests exit $tests_status after $(elapsed) s"

# --- 3. the benchmark: ptyflow (eager and compiled), PtyRAD, the FFT floor, on the same device
step "benchmark: $CASES, $ITERATIONS iterations, $REPEATS repeats"
"$py" benchmarks/run.py --device "$device" --cases "$CASES" --iterations "$ITERATIONS" --repeats "$REPEATS" \
  --no-scaling $([ "${COMPILE:-1}" = 1 ] && echo --compile) --out "$out" "${ptyrad_args[@]}" 2>&1 | tee -a "$log"
step "benchmark done after $(elapsed) s"

# --- 3b. where an iteration makes the host wait for the GPU (the first thing to remove)
"$py" benchmarks/gpu_syncs.py --case medium 2>&1 | tee "$out/syncs.txt" | tee -a "$log"

# --- 4. the table, with the card and the versions
measured=$root/benchmarks/measured
mkdir -p "$measured"
{
  echo "# GPU: $card"
  echo
  echo "$(date '+%Y-%m-%d %H:%M'), $("$py" -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}')"),"
  echo "CUDA tests: exit $tests_status. Written by benchmarks/gpu.sh$([ $dry_run = 1 ] && echo ' --dry-run')."
  echo
  cat "$out/results.md"
  echo
  cat "$out/syncs.txt"
} > "$out/gpu.md"
if [ $dry_run = 0 ]; then
  cp "$out/gpu.md" "$measured/gpu.md"
  cp "$out/results.json" "$measured/gpu.json"
fi
step "wrote $out/gpu.md$([ $dry_run = 0 ] && echo " and $measured/gpu.md") in $(elapsed) s"
exit "$tests_status"
