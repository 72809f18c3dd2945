#!/usr/bin/env bash
# The whole test suite, from nothing: installs what the tests need (venv,
# libtorch, weights, sample photos, the labelled training sets; each reused
# when already there), then runs every crate's tests, the libtorch host
# included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-python.sh
scripts/setup-data.sh
source scripts/env.sh
cargo test --release --workspace --locked "$@"
