#!/usr/bin/env bash
# The whole test suite, from nothing: installs what the tests need (venv,
# libtorch, weights, sample photos, the labelled training sets, mosquitto,
# chromium, GStreamer's RTSP server; each reused when already there), runs
# every crate's tests, the libtorch host included, then cross-builds
# tern-device for aarch64 and checks it under qemu against the x86-64 build
# on the float and int8 ImageNet bundles.
#
#   TERN_SKIP_CROSS=1   skip the aarch64 part (it needs root for apt and
#                       about 10 minutes of build on two cores)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-python.sh
scripts/setup-data.sh
scripts/install-test-deps.sh
source scripts/env.sh
cargo test --release --workspace --locked "$@"
# The checked-in protobuf code is what its generator writes (pure Rust,
# no protoc; its own lock file and workspace).
cargo run --release --locked --manifest-path crates/model-format/proto-gen/Cargo.toml \
  --target-dir target/proto-gen -- --check

if [ "${TERN_SKIP_CROSS:-0}" != 1 ]; then
  float=models/imagenet-efficientnet-lite0.onnx
  int8=models/imagenet-efficientnet-lite0-int8.onnx
  target/release/tern-host export-pretrained --out "$float"
  target/release/tern-host quantize "$float" data/cats-dogs/train --calib-images 64 --out "$int8"
  scripts/install-cross-deps.sh
  TERN_CROSS_FEATURES=gpio scripts/cross-aarch64.sh "$float" "$int8"
fi
