#!/usr/bin/env bash
# The GPU checks of the merge engine in one prepared call, for a session that is lent a device machine (one H100 or
# H200; see the `device` tool). It runs the CUDA tests (CPU/CUDA parity of every method and calibration), a smoke
# test of the diagnostics, compression and evaluation on CUDA (tools/device_smoke.py), the benchmark on CUDA:
# 8 ViT-B/32 experts (every row) and 8 ViT-L/14 experts (TSV-M and Iso-CTS, the slowest rows), and last the probe of
# eigensolver and transfer speeds (tools/device_probe.py). Each step has its own time limit (8.5 minutes in all)
# and writes its log under $OUT; the steps run in order of importance, so a call cut short keeps the first ones. On
# an H200 on 2026-12-04 the whole took 3.7 minutes (the README's CUDA rows and docs/PERFORMANCE.md, "CUDA").
#
# The device image has PyTorch, NumPy, SciPy, pytest, safetensors, timm, huggingface_hub and PyYAML, but not
# open_clip (the benchmark takes the real tower shapes from its configs) or ftfy / wcwidth, which it imports.
# Fetch those once here, as pure-Python wheels (`.whl/` is git-ignored and travels with `carry`):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4
#
# then call the device tool's run with command="bash tools/device_check.sh", carry=[".whl"], timeout_s=600.
# Off a device (no CUDA) the steps run their CPU parts only; the CUDA tests skip and the CUDA rows are absent.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

step() {   # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.txt, report its exit status
  local name=$1 limit=$2
  shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi   # STEPS="env bench_b32": only those
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}

step env 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1;
  python3 -c "import torch, numpy, scipy; print(torch.__version__, torch.cuda.is_available(), numpy.__version__, scipy.__version__)"'
step tests 120 python3 -m pytest -q -p no:cacheprovider -k "cuda or batch" tests/test_engine.py tests/test_lapack.py
step smoke 45 python3 tools/device_smoke.py
step bench_b32 150 python3 -m studio.bench --device cuda
step bench_b32_host 75 python3 -m studio.bench --device cuda --batched-eigh-max 0 \
  --methods tsv_m iso_cts ortho_merge align_merge_o
step bench_l14 100 python3 -m studio.bench --device cuda --model ViT-L-14 --methods tsv_m iso_cts
step bench_b32_threads32 45 python3 -m studio.bench --device cuda --threads 32 \
  --methods tsv_m iso_cts ortho_merge align_merge_o
step probe 75 python3 tools/device_probe.py
step probe_batched 90 python3 tools/device_probe_batched.py
