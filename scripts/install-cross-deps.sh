#!/usr/bin/env bash
# Installs what scripts/cross-aarch64.sh needs to cross-build tern-device for
# aarch64-unknown-linux-gnu without Docker, from Debian 12 (bookworm)
# packages only:
#
#   rustc-web, cargo-web        Rust 1.96 from bookworm-security, as
#                               /usr/bin/rustc and /usr/bin/cargo (tract 0.23
#                               needs >= 1.91; bookworm's plain `rustc` is
#                               1.63). A rustup toolchain in ~/.cargo/bin
#                               stays the default on PATH.
#   libstd-rust-web-dev:arm64   the aarch64 standard library for that rustc
#   gcc-aarch64-linux-gnu       the linker (a C compiler driver), and the C
#                               compiler of ring
#   g++-aarch64-linux-gnu       the C++ compiler of OpenH264 (the `openh264`
#                               crate's bundled source, feature `rtsp`)
#   libc6-dev-arm64-cross       aarch64 glibc to link against, and to run
#                               under qemu, in /usr/aarch64-linux-gnu (only a
#                               Recommends of the compiler, so named here)
#   binutils-aarch64-linux-gnu  aarch64-linux-gnu-strip
#   qemu-user                   qemu-aarch64, to run the result on x86-64
#
# Idempotent: when every package is already installed it returns without
# touching apt. Must run as root (or with sudo available).
#
#   scripts/install-cross-deps.sh
set -euo pipefail

PACKAGES=(
  rustc-web
  cargo-web
  libstd-rust-web-dev:arm64
  gcc-aarch64-linux-gnu
  g++-aarch64-linux-gnu
  libc6-dev-arm64-cross
  binutils-aarch64-linux-gnu
  qemu-user
)
# The oldest rustc the workspace accepts (workspace.package.rust-version).
MIN_RUST=1.91

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "error: run as root or install sudo" >&2; exit 1; }
  SUDO=(sudo)
fi

installed() {
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

missing=()
for p in "${PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    "${SUDO[@]}" dpkg --add-architecture arm64
  fi
  "${SUDO[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "cross dependencies already installed"
fi

# rustc-web and libstd-rust-web-dev:arm64 must be the same upstream version,
# or rustc rejects the aarch64 std ("found crate `std` compiled by an
# incompatible version of rustc").
host_v=$(dpkg-query -W -f='${Version}' rustc-web)
std_v=$(dpkg-query -W -f='${Version}' libstd-rust-web-dev:arm64)
if [[ $host_v != "$std_v" ]]; then
  echo "error: rustc-web $host_v but libstd-rust-web-dev:arm64 $std_v; run apt-get install rustc-web libstd-rust-web-dev:arm64" >&2
  exit 1
fi
v=$(/usr/bin/rustc --version | awk '{print $2}')
if [[ $(printf '%s\n%s\n' "$MIN_RUST" "$v" | sort -V | head -n1) != "$MIN_RUST" ]]; then
  echo "error: /usr/bin/rustc is $v, tract needs >= $MIN_RUST (rustc-web from bookworm-security)" >&2
  exit 1
fi
echo "/usr/bin/rustc $v, $(/usr/bin/cargo --version), $(qemu-aarch64 --version | head -n1)"
