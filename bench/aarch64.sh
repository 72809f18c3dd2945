#!/usr/bin/env bash
# aarch64 instructions per inference, counted under qemu-user, for each
# bundle, CPU model and kernel choice: the project's benchmark of work on
# the target ISA without a board. Deterministic: the same build, bundle,
# image and CPU model give the same count whatever else the machine does.
#
#   bench/aarch64.sh [--cpus "cortex-a72 cortex-a76"] [--ops "tern tract"] [--image FILE] BUNDLE.onnx...
#
# For every bundle: its multiply-accumulates (bench/aarch64/macs.py), then
# for each CPU model (`qemu-aarch64 -cpu`; cortex-a72 is a Raspberry Pi 4,
# cortex-a76 a Pi 5 with dot product and fp16) and each kernel choice (Tern's
# fused ops, tract's own with --tract-kernels; `--ops "int8 tract"` for a QDQ
# bundle: int8 is Tern's integer ops, --int8-ops) the instructions of one
# inference: `tern-device classify` of the image once and three times, the
# difference halved (it includes decoding and preprocessing the image). The
# floor is MACs / 4, one 4-lane fp32 FMLA per 4 multiply-accumulates.
#
# Needs scripts/install-cross-deps.sh (once, as root), gcc and the venv's
# python with onnx (scripts/setup-python.sh). Builds the aarch64 binary with
# scripts/cross-aarch64.sh unless TERN_CROSS_SKIP_BUILD=1.
set -euo pipefail
cd "$(dirname "$0")/.."

cpus="cortex-a72 cortex-a76"
opses="tern tract"
image=data/samples/chelsea.png
bundles=()
while (($#)); do
  case $1 in
    --cpus) cpus=$2; shift 2 ;;
    --ops) opses=$2; shift 2 ;;
    --image) image=$2; shift 2 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $1" >&2; exit 2 ;;
    *) bundles+=("$1"); shift ;;
  esac
done
((${#bundles[@]})) || { echo "usage: bench/aarch64.sh [--cpus LIST] [--ops LIST] [--image FILE] BUNDLE.onnx..." >&2; exit 2; }
python=${TERN_VENV:-$PWD/.venv}/bin/python
[[ -x $python ]] || python=python3

target_dir=${TERN_CROSS_TARGET_DIR:-target/cross}
if [[ ${TERN_CROSS_SKIP_BUILD:-0} != 1 ]]; then
  TERN_CROSS_BUILD_ONLY=1 scripts/cross-aarch64.sh "${bundles[@]}" >&2
fi
bin=$target_dir/aarch64-unknown-linux-gnu/release/tern-device.stripped
[[ -x $bin ]] || { echo "error: $bin missing: run without TERN_CROSS_SKIP_BUILD" >&2; exit 1; }
plugin=$target_dir/libinsn.so
gcc -O2 -Wall -shared -fPIC -o "$plugin" bench/aarch64/insn.c

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Instructions of one run of `tern-device ARGS...` on CPU model $1.
count() {
  local cpu=$1
  shift
  timeout "${TERN_QEMU_TIMEOUT:-900}" qemu-aarch64 -cpu "$cpu" -L /usr/aarch64-linux-gnu \
    -plugin "$plugin,out=$work/count" "$bin" "$@" >/dev/null
  cat "$work/count"
}

printf '%-44s %-11s %-6s %12s %10s %10s %8s\n' bundle cpu ops "insns/inf" "MACs" "floor" "x floor"
for b in "${bundles[@]}"; do
  macs=$("$python" bench/aarch64/macs.py "$b")
  for cpu in $cpus; do
    for ops in $opses; do
      case $ops in
        tern) flags=() ;;
        tract) flags=(--tract-kernels) ;;
        int8) flags=(--int8-ops) ;;
        *) echo "error: --ops takes tern, tract and int8, not $ops" >&2; exit 2 ;;
      esac
      one=$(count "$cpu" classify "${flags[@]}" "$b" "$image")
      three=$(count "$cpu" classify "${flags[@]}" "$b" "$image" "$image" "$image")
      awk -v b="$(basename "$b")" -v cpu="$cpu" -v ops="$ops" -v one="$one" -v three="$three" -v macs="$macs" \
        'BEGIN { per = (three - one) / 2; floor = macs / 4;
                 printf "%-44s %-11s %-6s %11.1fM %9.1fM %9.1fM %8.2f\n", b, cpu, ops, per / 1e6, macs / 1e6, floor / 1e6, per / floor }'
    done
  done
done
