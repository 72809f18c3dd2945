#!/usr/bin/env bash
# Cross-builds tern-device for aarch64-unknown-linux-gnu without Docker and
# checks it against the x86-64 build: `tern-device selftest` (the fused
# kernels against reference loops) under qemu for cortex-a72 and cortex-a76,
# then, for every bundle given (default: the
# ImageNet bundle made by scripts/setup.sh), both binaries run
# `classify --json --logits` on the sample photos, the aarch64 one under
# qemu-user, and scripts/compare-classify.py requires the same top-1 class
# for every photo and max |logit difference| <= TERN_CROSS_TOL (1e-4).
#
#   scripts/install-cross-deps.sh        # once: Debian packages, as root
#   scripts/cross-aarch64.sh [BUNDLE.onnx ...]
#
# The aarch64 build uses Debian's rustc-web (/usr/bin/cargo, /usr/bin/rustc)
# and its arm64 standard library, in its own target directory so it never
# invalidates the artefacts of the rustup toolchain in target/. The x86-64
# reference is built with whatever `cargo` is first on PATH.
#
# It is a command-line run, not `cargo test`: Debian's qemu-aarch64 (7.2)
# hangs inside Rust's test harness, while plain binaries run fine. The hang
# is in thread creation (seen with `qemu-aarch64 -strace`: the guest spins
# right after glibc's first pthread_create set-up, before any clone), so
# `tern-device run`, which captures on a second thread, cannot be checked
# under this qemu either (also with -cpu cortex-a72); `classify` runs on one
# thread and is what is compared here.
#
# Environment:
#   TERN_SAMPLES         photos directory (default data/samples, *.png *.jpg)
#   TERN_CROSS_TARGET_DIR  aarch64 target directory (default target/cross)
#   TERN_CROSS_FEATURES  cargo features of tern-device for the aarch64 build
#                        (default: none, i.e. default features)
#   TERN_CROSS_TOL       largest allowed |logit difference| (default 1e-4)
#   TERN_CROSS_SKIP_BUILD=1  reuse both binaries as they are
#   TERN_CROSS_BUILD_ONLY=1  build and strip the aarch64 binary, then stop
#                        (bench/aarch64.sh uses it)
#   TERN_QEMU_TIMEOUT    seconds one qemu run may take (default 900)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

target=aarch64-unknown-linux-gnu
target_dir=${TERN_CROSS_TARGET_DIR:-target/cross}
# Relative to the repository root: the runs below name "$root/..."
case $target_dir in /*) target_dir=$(realpath --relative-to="$root" "$target_dir") ;; esac
samples=${TERN_SAMPLES:-data/samples}
tol=${TERN_CROSS_TOL:-1e-4}
sysroot=/usr/aarch64-linux-gnu

for tool in /usr/bin/cargo /usr/bin/rustc aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ aarch64-linux-gnu-strip qemu-aarch64 python3; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: $tool not found: run scripts/install-cross-deps.sh (as root)" >&2
    exit 1
  fi
done

bundles=("$@")
if ((${#bundles[@]} == 0)); then
  bundles=(models/imagenet-efficientnet-lite0.onnx)
  if [[ ! -f ${bundles[0]} ]]; then
    # Not made by scripts/setup.sh yet: export it with the format crate
    # alone (no libtorch), from the weights and labels setup-python.sh got.
    bundles=("$target_dir/check/imagenet-efficientnet-lite0.onnx")
    mkdir -p "$target_dir/check"
    echo "== exporting ${bundles[0]}"
    cargo run --locked --release -q -p tern-device --example export_imagenet -- --out "${bundles[0]}"
  fi
fi
for b in "${bundles[@]}"; do
  if [[ ! -f $b ]]; then
    echo "error: bundle $b is missing: run scripts/setup.sh, or without libtorch:" >&2
    echo "  cargo run --release -p tern-device --example export_imagenet -- --out $b" >&2
    exit 1
  fi
done
shopt -s nullglob
photos=("$samples"/*.png "$samples"/*.jpg "$samples"/*.jpeg)
shopt -u nullglob
if ((${#photos[@]} == 0)); then
  echo "error: no photos in $samples: run scripts/setup.sh" >&2
  exit 1
fi

features=()
if [[ -n ${TERN_CROSS_FEATURES:-} ]]; then
  features=(--features "$TERN_CROSS_FEATURES")
fi

aarch64_bin=$target_dir/$target/release/tern-device
host_bin=target/release/tern-device

if [[ ${TERN_CROSS_SKIP_BUILD:-0} != 1 ]]; then
  echo "== aarch64 build: $(/usr/bin/rustc --version), features: ${TERN_CROSS_FEATURES:-default}"
  start=$SECONDS
  # RUSTC/RUSTDOC: /usr/bin/cargo would otherwise run the rustup `rustc`
  # first on PATH, which has no aarch64 standard library.
  env RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc \
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
    CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
    CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++ \
    AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
    BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--sysroot=$sysroot" \
    /usr/bin/cargo build --locked --release -p tern-device --target "$target" \
    --target-dir "$target_dir" "${features[@]}"
  echo "aarch64 build took $((SECONDS - start)) s"
  if [[ ${TERN_CROSS_BUILD_ONLY:-0} != 1 ]]; then
    echo "== x86-64 build: $(rustc --version)"
    start=$SECONDS
    cargo build --locked --release -p tern-device
    echo "x86-64 build took $((SECONDS - start)) s"
  fi
fi

stripped=$aarch64_bin.stripped
aarch64-linux-gnu-strip -o "$stripped" "$aarch64_bin"
echo "== $aarch64_bin: $(stat -c %s "$aarch64_bin") bytes; stripped: $(stat -c %s "$stripped") bytes" \
  "($(awk -v b="$(stat -c %s "$stripped")" 'BEGIN { printf "%.1f", b / 1048576 }') MiB)"
if ! aarch64-linux-gnu-readelf -h "$stripped" | grep -q 'Machine:.*AArch64'; then
  echo "error: $stripped is not an AArch64 executable" >&2
  exit 1
fi
if [[ ${TERN_CROSS_BUILD_ONLY:-0} == 1 ]]; then
  exit 0
fi

# A hang under qemu fails the check instead of blocking CI.
run_aarch64() { timeout "${TERN_QEMU_TIMEOUT:-900}" qemu-aarch64 -L "$sysroot" "$root/$stripped" "$@"; }
echo "== qemu: $(run_aarch64 --version)"

out=$target_dir/check
mkdir -p "$out"
status=0
# Tern's NEON kernels against plain reference loops, on the CPU models of a
# Raspberry Pi 4 (no dot product, no fp16) and a Pi 5.
for cpu in cortex-a72 cortex-a76; do
  echo "== selftest on -cpu $cpu"
  if ! timeout "${TERN_QEMU_TIMEOUT:-900}" qemu-aarch64 -cpu "$cpu" -L "$sysroot" "$root/$stripped" selftest; then
    echo "FAIL: the fused kernels differ from the reference loops on $cpu" >&2
    status=1
  fi
done
for b in "${bundles[@]}"; do
  name=$(basename "$b" .onnx)
  echo "== $b on ${#photos[@]} photos"
  "$host_bin" classify --json --logits "$b" "${photos[@]}" >"$out/$name.x86_64.jsonl"
  start=$SECONDS
  run_aarch64 classify --json --logits "$b" "${photos[@]}" >"$out/$name.aarch64.jsonl"
  echo "aarch64 under qemu: $((SECONDS - start)) s"
  if ! python3 scripts/compare-classify.py --tol "$tol" "$out/$name.x86_64.jsonl" "$out/$name.aarch64.jsonl"; then
    echo "FAIL: $b differs between x86-64 and aarch64 (outputs in $out)" >&2
    status=1
  fi
done

if ((status == 0)); then
  echo "OK: aarch64 matches x86-64 on ${#bundles[@]} bundle(s) x ${#photos[@]} photos"
fi
exit $status
