#!/usr/bin/env bash
# Installs tern-device as a systemd service on the device (Raspberry Pi,
# Jetson, any systemd Linux). Run as root from a copy of deploy/:
#
#   sudo deploy/install.sh BINARY BUNDLE.onnx [ENV_FILE]
#
# It puts
#   BINARY       -> /usr/local/bin/tern-device
#   BUNDLE.onnx  -> /var/lib/tern/model.onnx
#   ENV_FILE     -> /etc/tern/tern.env (default deploy/tern.env, written only
#                   when /etc/tern/tern.env is absent unless ENV_FILE is given)
#   tern-device.service -> /etc/systemd/system/, enabled and (re)started
#   99-tern-gpio.rules  -> /etc/udev/rules.d/
# and creates the system user `tern` (groups video, gpio). Idempotent: run it
# again with a new binary or bundle to upgrade; the service restarts on the
# new files. The bundle is checked with `tern-device info` before it replaces
# the running one, against the TERN_TRUST keys of the environment file the
# service will use (signed bundles: see README.md).
#
# Options (before the arguments):
#   --no-start   install and enable, but do not (re)start the service
#   --root DIR   install the files under DIR only (an image being built, a
#                test): no user, udev or systemctl changes, no checks that
#                run the binary
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
start=1
root=
while (($#)); do
  case $1 in
    --no-start) start=0; shift ;;
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
if (($# < 2 || $# > 3)); then
  echo "usage: sudo $0 [--no-start] [--root DIR] BINARY BUNDLE.onnx [ENV_FILE]" >&2
  exit 2
fi
binary=$1
bundle=$2
env_file=${3:-}
for f in "$binary" "$bundle" ${env_file:+"$env_file"}; do
  [[ -f $f ]] || { echo "error: $f not found" >&2; exit 1; }
done
if [[ -z $root && $(id -u) -ne 0 ]]; then
  echo "error: run as root (sudo $0 ...)" >&2
  exit 1
fi

bin_dst=$root/usr/local/bin/tern-device
state=$root/var/lib/tern
etc=$root/etc/tern
unit_dst=$root/etc/systemd/system/tern-device.service
rules_dst=$root/etc/udev/rules.d/99-tern-gpio.rules
doc_dst=$root/usr/local/share/doc/tern

if [[ -z $root ]]; then
  # The binary must run here before it replaces a working one.
  if ! version=$("$binary" --version 2>&1); then
    echo "error: $binary does not run on this machine ($(uname -m)): $version" >&2
    exit 1
  fi
  echo "binary: $version"
  # The keys the service will trust: those of the environment file it will read.
  env_src=${env_file:-$etc/tern.env}
  [[ -f $env_src ]] || env_src=$here/tern.env
  trust=$(sed -n 's/^TERN_TRUST=//p' "$env_src" | tail -n 1)
  if ! TERN_TRUST=$trust "$binary" info "$bundle" >/dev/null; then
    echo "error: $binary cannot load $bundle (see above)" >&2
    exit 1
  fi
  getent group gpio >/dev/null || groupadd --system gpio
  getent group video >/dev/null || groupadd --system video
  if ! id -u tern >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/tern --no-create-home \
      --shell /usr/sbin/nologin --comment "Tern classifier" tern
    echo "created user tern"
  fi
  usermod --append --groups video,gpio tern
  owner=(-o root -g tern)
else
  owner=()
fi

# New files land beside their destination and are renamed over it, so a
# running service never sees half a binary or half a bundle.
put() { # mode src dst
  local tmp
  tmp=$(dirname "$3")/.$(basename "$3").new
  install -m "$1" "${owner[@]}" "$2" "$tmp"
  mv -f "$tmp" "$3"
}

install -d -m 0755 "$root/usr/local/bin" "$etc" "$doc_dst" \
  "$root/etc/systemd/system" "$root/etc/udev/rules.d"
install -d -m 0750 "${owner[@]}" "$state"
put 0755 "$binary" "$bin_dst"
put 0640 "$bundle" "$state/model.onnx"
if [[ -n $env_file ]]; then
  put 0640 "$env_file" "$etc/tern.env"
elif [[ ! -f $etc/tern.env ]]; then
  put 0640 "$here/tern.env" "$etc/tern.env"
else
  echo "keeping $etc/tern.env"
fi
install -m 0644 "$here/tern-device.service" "$unit_dst"
install -m 0644 "$here/99-tern-gpio.rules" "$rules_dst"
install -m 0644 "$here/README.md" "$doc_dst/README.md"
echo "installed $bin_dst, $state/model.onnx, $etc/tern.env, $unit_dst, $rules_dst"

if [[ -n $root ]]; then
  exit 0
fi
if command -v udevadm >/dev/null; then
  udevadm control --reload
  udevadm trigger --subsystem-match=gpio --action=add || true
fi
systemctl daemon-reload
systemctl enable tern-device.service
if ((start)); then
  # reset-failed: a unit stopped by its start limit would refuse to start.
  systemctl reset-failed tern-device.service 2>/dev/null || true
  systemctl restart tern-device.service
  sleep 2
  systemctl --no-pager --lines=5 status tern-device.service || {
    echo "error: tern-device.service is not running; see: journalctl -u tern-device -e" >&2
    exit 1
  }
fi
