#!/usr/bin/env bash
# Inference frames per second of `tern-device run` with the web view on,
# with 0 and then with 2 viewers pulling the MJPEG stream (curl), on an
# unpaced source (a folder of photos, looped, no --fps: every frame is
# classified, so inference is the bottleneck). Same bundle, source and run
# length for both; the figure is the frame-weighted mean of the loop's own
# `stats` events after the first (warm-up) one.
#
#   bench/web-viewers.sh [--seconds N] [--folder DIR] [--http-fps F] [BUNDLE.onnx]
#
# Defaults: 20 s per run, data/samples, the stream's default 10 frames/s,
# models/imagenet-efficientnet-lite0.onnx. Builds tern-device (release)
# unless TERN_NO_BUILD is set.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=20
folder=data/samples
http_fps=10
bundle=models/imagenet-efficientnet-lite0.onnx
while (($#)); do
  case $1 in
    --seconds) seconds=$2; shift 2 ;;
    --folder) folder=$2; shift 2 ;;
    --http-fps) http_fps=$2; shift 2 ;;
    -h|--help) sed -n 2,13p "$0"; exit 0 ;;
    *) bundle=$1; shift ;;
  esac
done
[[ -f $bundle ]] || { echo "error: no bundle $bundle (scripts/setup.sh makes it)" >&2; exit 1; }
command -v curl >/dev/null || { echo "error: curl is needed" >&2; exit 1; }

[[ -n ${TERN_NO_BUILD:-} ]] || cargo build --release -q -p tern-device
bin=target/release/tern-device
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# One run: $1 viewers; prints the frames per second.
run() {
  local viewers=$1 out=$work/run-$1
  "$bin" run "$bundle" --folder "$folder" --loop --report-every 2 --no-reload \
    --http 127.0.0.1:0 --http-fps "$http_fps" >"$out.jsonl" 2>"$out.err" &
  local dev=$!
  pids+=("$dev")
  local url=
  for _ in $(seq 100); do
    url=$(sed -n 's|^tern-device: web view on \(http://[^ ]*/\).*|\1|p' "$out.err")
    [[ -n $url ]] && break
    sleep 0.1
  done
  [[ -n $url ]] || { cat "$out.err" >&2; echo "error: no web view address" >&2; exit 1; }
  for _ in $(seq "$viewers"); do
    curl -s -o /dev/null "${url}stream.mjpg" &
    pids+=("$!")
  done
  sleep "$seconds"
  kill "$dev"
  wait "$dev" 2>/dev/null || true
  python3 - "$out.jsonl" <<'PY'
import json, sys
stats = [e for e in map(json.loads, open(sys.argv[1])) if e.get("event") == "stats"][1:]
frames = sum(e["frames"] for e in stats)
secs = sum(e["frames"] / e["fps"] for e in stats if e["fps"] > 0)
print(f"{frames / secs:.2f}" if secs else "nan")
PY
}

zero=$(run 0)
two=$(run 2)
echo "bundle $bundle, folder $folder, ${seconds} s per run, stream capped at ${http_fps} frames/s"
echo "inference frames/s with 0 viewers: $zero"
echo "inference frames/s with 2 viewers: $two"
python3 -c "import sys; z, t = map(float, sys.argv[1:]); print(f'ratio 2 viewers / 0 viewers: {t / z:.3f} ({100 * (t / z - 1):+.1f}%)')" "$zero" "$two"
