#!/usr/bin/env bash
# The GPU checks of the merge engine in one prepared call, for a session that is lent a device machine (one H100 or
# H200; see the `device` tool). Its steps, in order of importance (so a call cut short keeps the first ones), each
# with its own time limit and its log under $OUT:
#   env, tests (CPU/CUDA parity of every method and calibration on every eigensolver route, worker threads bit for
#   bit, the batched solver), smoke (diagnostics, compression and evaluation on CUDA: tools/device_smoke.py),
#   bench_b32 (8 ViT-B/32 experts, every row), bench_b32_host (the spectral rows with --batched-eigh-max 0),
#   bench_l14 (8 ViT-L/14 experts, TSV-M and Iso-CTS), bench_b32_20 and bench_l14_20 (20 experts: never run on a
#   GPU yet; 20 ViT-L/14 take 24 GB of host memory in float32), profile (tools/device_profile.py: where a cold TSV-M
#   merge's time goes), probe and probe_batched (eigensolver and transfer speeds, the batched solver's bits:
#   tools/device_probe.py, tools/device_probe_batched.py).
# STEPS="env tests bench_b32" runs only those. The limits add up to more than one call's 600 s, so a call of every
# step may lose the last ones. On the H200 on 2026-12-04 env, tests, smoke, bench_b32, bench_l14 and a 30 s bench
# with --threads 32 took 3.1 minutes in all (the README's CUDA table; docs/PERFORMANCE.md, "CUDA").
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
step bench_b32_20 150 python3 -m studio.bench --device cuda --tasks 20
step bench_l14_20 300 python3 -m studio.bench --device cuda --model ViT-L-14 --tasks 20 \
  --methods task_arithmetic ties tsv_m iso_c iso_cts
step profile 60 python3 tools/device_profile.py
step probe 75 python3 tools/device_probe.py
step probe_batched 90 python3 tools/device_probe_batched.py
