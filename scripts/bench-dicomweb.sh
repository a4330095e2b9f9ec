#!/usr/bin/env bash
# Throughput of DICOMweb screening next to file screening, on the same instances.
#
#   scripts/bench-dicomweb.sh MODEL_ARTIFACT DICOM_DIR [DICOM_DIR ...]
#
# 1. Finds the DICOM Part-10 files under the folders (by content: "DICM" at byte 128;
#    PNG masks, CSVs and other files are left out).
# 2. Starts a throwaway Orthanc (Debian's `orthanc` + `orthanc-dicomweb`) in a temporary
#    directory, HTTP and DICOM on free ports on 127.0.0.1, remote access off, and uploads
#    the files through its REST API (POST /instances). Files Orthanc refuses, and files
#    whose SOP Instance UID an earlier file already had, are left out of both runs, so
#    both screen the same instances.
# 3. Runs `cxr-ray screen` twice with the same model and settings into fresh output
#    folders: once from the local files (a manifest of the uploaded paths), once from
#    dicomweb://127.0.0.1:PORT/dicom-web (QIDO-RS listing + WADO-RS retrieval).
# 4. Prints one JSON line: per run the wall time of the whole command (Ray start-up
#    included), the screen summary's own `seconds` and `images_per_s`, its row and ok
#    counts; then the ratios dicomweb / file.
#
# Environment (all optional):
#   CXR_RAY       the cxr-ray command (default: cxr-ray; e.g. ".venv/bin/cxr-ray")
#   SCREEN_ARGS   extra `cxr-ray screen` flags for both runs (e.g. "--actors 2,2 --batch-size 16")
#   ORTHANC       Orthanc binary (default: Orthanc)
#   ORTHANC_DICOMWEB  DICOMweb plugin (default: /usr/share/orthanc/plugins/libOrthancDicomWeb.so)
#   PYTHON        a python3 for free ports and the JSON (default: python3)
#   KEEP=1        keep the temporary directory (Orthanc log, both outputs) and print its path
#
# Needs: bash, curl, python3, Orthanc with the DICOMweb plugin, cxr-ray.
set -euo pipefail

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 2 ]] || usage
model=$1; shift
for dir in "$@"; do [[ -d $dir ]] || { echo "not a folder: $dir" >&2; exit 2; }; done

read -r -a cxr_ray <<< "${CXR_RAY:-cxr-ray}"
read -r -a screen_args <<< "${SCREEN_ARGS:-}"
orthanc_bin=${ORTHANC:-Orthanc}
plugin=${ORTHANC_DICOMWEB:-/usr/share/orthanc/plugins/libOrthancDicomWeb.so}
python=${PYTHON:-python3}
command -v "$orthanc_bin" > /dev/null || { echo "Orthanc not found ($orthanc_bin; Debian: apt-get install orthanc orthanc-dicomweb)" >&2; exit 2; }
[[ -f $plugin ]] || { echo "DICOMweb plugin not found: $plugin (Debian: apt-get install orthanc-dicomweb)" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/bench-dicomweb.XXXXXX")
orthanc_pid=
cleanup() {
    if [[ -n $orthanc_pid ]] && kill -0 "$orthanc_pid" 2> /dev/null; then
        kill "$orthanc_pid"; wait "$orthanc_pid" 2> /dev/null || true
    fi
    if [[ ${KEEP:-0} == 1 ]]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
http_port=$(free_port)
dicom_port=$(free_port)
while [[ $dicom_port == "$http_port" ]]; do dicom_port=$(free_port); done

mkdir -p "$work/storage"
cat > "$work/orthanc.json" << EOF
{
  "Name": "bench-dicomweb",
  "StorageDirectory": "$work/storage",
  "IndexDirectory": "$work/storage",
  "HttpPort": $http_port,
  "DicomPort": $dicom_port,
  "DicomAet": "ORTHANC",
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "HttpThreadsCount": 8,
  "Plugins": ["$plugin"],
  "DicomWeb": { "Enable": true, "Root": "/dicom-web/" }
}
EOF
"$orthanc_bin" "$work/orthanc.json" > "$work/orthanc.log" 2>&1 &
orthanc_pid=$!
base=http://127.0.0.1:$http_port
for _ in $(seq 1 150); do
    curl -sf -o /dev/null "$base/dicom-web/studies" && break
    kill -0 "$orthanc_pid" 2> /dev/null || { tail -20 "$work/orthanc.log" >&2; exit 1; }
    sleep 0.2
done
curl -sf -o /dev/null "$base/dicom-web/studies" || { echo "Orthanc did not answer" >&2; tail -20 "$work/orthanc.log" >&2; exit 1; }

# Upload every DICOM Part-10 file; the manifest lists those Orthanc stored.
echo path > "$work/files.csv"
found=0 uploaded=0
while IFS= read -r -d '' file; do
    [[ $(dd if="$file" bs=1 skip=128 count=4 2> /dev/null | tr -d '\0') == DICM ]] || continue
    found=$((found + 1))
    if ! curl -sf -o "$work/upload.json" -X POST -H 'Expect:' --data-binary @"$file" "$base/instances"; then
        echo "Orthanc refused $file (left out of both runs)" >&2
    elif grep -q AlreadyStored "$work/upload.json"; then
        echo "$file has the SOP Instance UID of an earlier file (left out of both runs)" >&2
    else
        uploaded=$((uploaded + 1))
        path=$(realpath "$file")
        printf '"%s"\n' "${path//\"/\"\"}" >> "$work/files.csv"  # a CSV field, quotes doubled
    fi
done < <(find "$@" -type f -print0 | sort -z)
[[ $uploaded -gt 0 ]] || { echo "no DICOM file was stored (found $found)" >&2; exit 1; }
instances=$(curl -sf "$base/statistics" | "$python" -c 'import json, sys; print(json.load(sys.stdin)["CountInstances"])')
echo "uploaded $uploaded of $found DICOM files; Orthanc holds $instances instances" >&2

# One screening run: wall time of the whole command, its summary JSON kept.
run() {  # NAME INPUT
    local start end
    start=$(date +%s.%N)
    "${cxr_ray[@]}" screen --model "$model" --input "$2" --output "$work/out-$1" "${screen_args[@]}" \
        > "$work/$1.json" 2> "$work/$1.log" || { echo "screen ($1) failed:" >&2; tail -20 "$work/$1.log" >&2; exit 1; }
    end=$(date +%s.%N)
    echo "$start $end" > "$work/$1.wall"
}
echo "screening $uploaded files from the local folder ..." >&2
run file "$work/files.csv"
echo "screening $instances instances from dicomweb://127.0.0.1:$http_port/dicom-web ..." >&2
run dicomweb "dicomweb://127.0.0.1:$http_port/dicom-web"

"$python" - "$work" "$uploaded" "$instances" << 'EOF'
import json, sys
work, uploaded, instances = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
out = {"instances": instances, "files": uploaded}
for name in ("file", "dicomweb"):
    summary = json.load(open(f"{work}/{name}.json"))
    start, end = (float(x) for x in open(f"{work}/{name}.wall").read().split())
    out[name] = {"wall_s": round(end - start, 2), "seconds": summary.get("seconds"),
                 "images_per_s": summary.get("images_per_s"),
                 "steady_images_per_s": summary.get("steady_images_per_s"),
                 "rows": summary.get("rows"), "ok": summary.get("status", {}).get("ok"),
                 "backend": summary.get("backend")}
f, d = out["file"], out["dicomweb"]
out["ratio_images_per_s"] = round(d["images_per_s"] / f["images_per_s"], 3) if f["images_per_s"] and d["images_per_s"] else None
out["ratio_wall"] = round(d["wall_s"] / f["wall_s"], 3) if f["wall_s"] else None
out["same_rows"] = f["rows"] == d["rows"]
print(json.dumps(out))
EOF
