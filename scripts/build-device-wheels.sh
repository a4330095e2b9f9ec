#!/usr/bin/env bash
# Build what `scripts/device-check.sh` needs on a bare GPU machine (Python 3.12, x86-64, torch with
# CUDA 13, no network): the project's wheel, the wheels it lacks there (pydicom, pylibjpeg and its
# plugins, NVIDIA nvImageCodec with nvJPEG / nvJPEG2000), and a few real sample X-rays, all under
# .device-check/ (git-ignored). Checks that .device-check/ plus the tracked tree fit the 64 MiB that travels.
#
#   scripts/build-device-wheels.sh            # then: run `bash scripts/device-check.sh`, carry [".device-check"]
#
# Environment: PYTHON (default .venv/bin/python, else python3), CXR_RAY_REAL_DATA (default
# ../shared/data/real), DEVICE_DATA_MB (real files budget, default 8), DEVICE_PYTHON_VERSION (the
# device's Python, default 3.12; another value builds a bundle to smoke-test the scripts elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
REAL=${CXR_RAY_REAL_DATA:-../shared/data/real}
DATA_BUDGET=$(( ${DEVICE_DATA_MB:-8} * 1024 * 1024 ))
LIMIT=$(( 64 * 1024 * 1024 ))
# Versions: the constraints' for what the project pins; nvImageCodec and its CUDA 13 libraries here.
pin() { grep -i "^$1==" constraints.txt | head -1; }
PACKAGES=("$(pin pydicom)" "$(pin pylibjpeg)" "$(pin pylibjpeg-libjpeg)" "$(pin pylibjpeg-openjpeg)" "$(pin pylibjpeg-rle)"
          "nvidia-nvimgcodec-cu13==0.9.0.20" "nvidia-nvjpeg==13.3.2.43" "nvidia-nvjpeg2k-cu13==0.11.0.51")
PLATFORMS=()
for tag in manylinux_2_17 manylinux2014 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done

rm -rf .device-check && mkdir -p .device-check/wheels .device-check/data
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .device-check/wheels . >&2
for package in "${PACKAGES[@]}"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "${DEVICE_PYTHON_VERSION:-3.12}" --implementation cp \
    "${PLATFORMS[@]}" -d .device-check/wheels "$package" >&2
done

# Real files, small ones first, up to the budget: every DICOM, PNG and JPEG kind the set has.
if [ -d "$REAL" ]; then
  "$PYTHON" - "$REAL" .device-check/data "$DATA_BUDGET" <<'PY'
import shutil, sys
from pathlib import Path
root, out, budget = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
files = sorted((p for p in root.rglob("*") if p.suffix.lower() in {".dcm", ".png", ".jpg", ".jpeg"}),
               key=lambda p: (p.suffix.lower() != ".dcm", p.stat().st_size))
used = 0
for path in files:  # flat, by base name (the GPU tests ask for two of them by name)
    if used + path.stat().st_size > budget or (out / path.name).exists():
        continue
    shutil.copyfile(path, out / path.name)
    used += path.stat().st_size
PY
else
  echo "no real sample X-rays at $REAL: the check runs on phantoms only" >&2
fi

# What travels besides .device-check/: tracked files and untracked ones git does not ignore.
tracked=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
device=$(du -sb .device-check | cut -f1)
total=$(( tracked + device ))
"$PYTHON" - "$tracked" "$device" "$total" "$LIMIT" <<'PY'
import json, os, sys
tracked, device, total, limit = map(int, sys.argv[1:])
wheels = {w: os.path.getsize(f".device-check/wheels/{w}") for w in sorted(os.listdir(".device-check/wheels"))}
print(json.dumps({"wheels": wheels, "wheels_bytes": sum(wheels.values()), "data_files": len(os.listdir(".device-check/data")),
                  "device_dir_bytes": device, "tracked_tree_bytes": tracked, "total_bytes": total,
                  "total_mib": round(total / 2**20, 1), "limit_mib": limit // 2**20, "fits": total <= limit}, indent=2))
sys.exit(0 if total <= limit else 1)
PY
