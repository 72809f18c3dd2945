#!/usr/bin/env bash
# Sets up everything from nothing and runs the main job on the built-in
# default: export the pretrained EfficientNet-Lite0 ImageNet bundle and
# classify the sample photos with it on the CPU through tract.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-python.sh
source scripts/env.sh
cargo build --release --locked -p tern-device -p tern-host
target/release/tern-host export-pretrained \
  --backbone efficientnet-lite0 \
  --weights models/efficientnet-lite0.safetensors \
  --labels models/imagenet-labels.txt \
  --out models/imagenet-efficientnet-lite0.onnx
target/release/tern-device classify models/imagenet-efficientnet-lite0.onnx data/samples/*.png
