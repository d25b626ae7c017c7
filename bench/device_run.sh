#!/usr/bin/env bash
# One GPU lease, several stages: bash bench/device_run.sh [env] [ops] [unet-sdxl] [check] [unet-sd15] [full-check]
# Carry .whl (entmax, diffusers, importlib_metadata wheels) when the machine lacks them. Logs go to $OUT.
# check and unet-sd15 limits raised after an H100 lease (2026-11-28) where the quick check stopped at 31
# of 60 cases after 170 s (52 with a warm Triton cache) and SD1.5's UNet was still compiling at 90 s.
# env + check + ops + unet-sdxl can now reach 10 minutes: split it over two calls on the warm machine.
set -u
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
OUT=${OUT:-/tmp/pladis-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
stage() {  # name, seconds, command...
  local name=$1 secs=$2
  shift 2
  echo "=== $name (limit ${secs}s) $(date +%T)"
  local t0=$SECONDS
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "=== $name: rc=${PIPESTATUS[0]} in $((SECONDS - t0))s"
}
[ $# -gt 0 ] || set -- env ops unet-sdxl check
for s in "$@"; do
  case $s in
    env) stage env 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv; python3 -c "import torch, triton, entmax, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)"' ;;
    ops) stage ops 170 python3 bench/gpu_bench.py --ops-only --shapes "SDXL L1" "SDXL L1 K=154" "SD1.5 L1" "SDXL L2" ;;
    unet-sdxl) stage unet-sdxl 170 python3 bench/gpu_bench.py --unet-only --unets "SDXL 1024²" --unet-torch-path ;;
    unet-sd15) stage unet-sd15 150 python3 bench/gpu_bench.py --unet-only --unets "SD1.5 512²" --unet-torch-path ;;
    check) stage check 300 env PLADIS_TRITON_AUTOTUNE=0 python3 bench/gpu_bench.py --check --quick ;;
    probe) stage probe 220 env PLADIS_TRITON_AUTOTUNE=0 python3 bench/gpu_probe.py ;;
    unet-sd15-heuristic) stage unet-sd15-heuristic 120 env PLADIS_TRITON_AUTOTUNE=0 python3 bench/gpu_bench.py --unet-only --unets "SD1.5 512²" --unet-torch-path ;;
    full-check) stage full-check 400 env PLADIS_TRITON_AUTOTUNE=0 python3 bench/gpu_bench.py --check ;;
    *) echo "unknown stage $s" ;;
  esac
done
