#!/usr/bin/env bash
# The GPU check, in one go on a bare GPU machine (no network, no Ray): install the carried wheels,
# run `python -m cxr_ray.bench.gpu` (one JSON document) and the tests marked gpu, print a summary.
# Prepare here first: scripts/build-device-wheels.sh (writes .device-check/, git-ignored).
#
# With the device tool, from the repository root of the checkout it sends:
#   run(command="bash scripts/device-check.sh", carry=[".device-check"], timeout_s=600)
# It stops itself within about 560 s (install ~20 s, bench <= BENCH_TIMEOUT, tests <= TESTS_TIMEOUT).
# Files under $OUT come back: device-check.json (the report), bench-stderr.log, gpu-tests.log,
# install.log, nvidia-smi.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/cxr-device-check}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/cxr-site}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-390}
TESTS_TIMEOUT=${TESTS_TIMEOUT:-120}
# CHECK_DEVICE=cpu BENCH_ARGS="--arch resnet18 ..." runs the same steps as a dry run (tests/test_device_scripts.py).
CHECK_DEVICE=${CHECK_DEVICE:-cuda}
read -r -a BENCH_ARGS <<< "${BENCH_ARGS:-}"
mkdir -p "$OUT"
started=$(date +%s)
[ -d .device-check/wheels ] || { echo "no .device-check/wheels: run scripts/build-device-wheels.sh and carry .device-check"; exit 2; }

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  .device-check/wheels/*.whl > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 3; }
# nvjpeg2k's wheel makes `nvidia` a regular package here, which would hide the image's own nvidia.*:
# as a namespace portion it joins them (cxr_ray.io.gpu.mode.join_nvidia_namespace covers the reverse).
rm -f "$SITE/nvidia/__init__.py"
# The repository's own code first (what was sent), then the carried packages; the image's torch stays.
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CXR_RAY_REAL_DATA="$PWD/.device-check/data"
# nvImageCodec's extensions load libnvjpeg / libnvjpeg2k, which their wheels put under nvidia/*/lib.
for lib in "$SITE"/nvidia/*/lib; do export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; done
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
echo "installed in $(( $(date +%s) - started )) s; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1)"

# One decode round (a dedicated machine); the report is rewritten after each section, so a run
# stopped by the time limit still brings back what it measured ("complete": false).
timeout "$BENCH_TIMEOUT" "$PY" -m cxr_ray.bench.gpu --device "$CHECK_DEVICE" --input .device-check/data --rounds 1 \
  --output "$OUT/device-check.json" "${BENCH_ARGS[@]}" > /dev/null 2> "$OUT/bench-stderr.log"
bench_rc=$?
echo "bench rc=$bench_rc after $(( $(date +%s) - started )) s"

timeout "$TESTS_TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_gpu_decode.py tests/test_gpu_engines.py tests/test_backends.py > "$OUT/gpu-tests.log" 2>&1
tests_rc=$?
echo "gpu tests rc=$tests_rc after $(( $(date +%s) - started )) s: $(tail -1 "$OUT/gpu-tests.log")"

"$PY" -m cxr_ray.bench.gpu_summary "$OUT/device-check.json" || tail -40 "$OUT/bench-stderr.log"
[ "$bench_rc" -eq 0 ] && [ "$tests_rc" -eq 0 ]
