#!/usr/bin/env bash
# Installs the system packages the test suite needs beyond the Rust and
# Python toolchains, from Debian 12 (bookworm) packages:
#
#   mosquitto   the MQTT broker that crates/device/tests/mqtt.rs starts on
#               loopback ports (the tests only run the binary; the packaged
#               service is not started here), and mosquitto_passwd, which
#               writes the password file of its TLS tests (their
#               certificates are made by the tests themselves, with rcgen)
#   chromium, chromium-driver
#               the headless browser and its WebDriver server that
#               crates/device/tests/web_browser.rs drives to check the live
#               web view of `tern-device run --http`
#   GStreamer's RTSP server and an H.264 encoder, for the RTSP test of
#               crates/device/tests/netcam.rs (tests/python/rtsp_server.py,
#               run by the system /usr/bin/python3): python3-gi,
#               gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-base
#               (videotestsrc, videoconvert), -good (rtph264pay), -ugly
#               (x264enc)
#
# Idempotent: when every package is already installed it returns without
# touching apt. Must run as root (or with sudo available).
#
#   scripts/install-test-deps.sh
set -euo pipefail

PACKAGES=(mosquitto chromium chromium-driver python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base
  gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly)

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
  "${SUDO[@]}" apt-get update -q
  # Where the package's own service starts, it listens on port 1883; the
  # tests start their own brokers on free ports, so either way is fine.
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "test dependencies already installed"
fi
command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || { echo "error: mosquitto missing after install" >&2; exit 1; }
command -v mosquitto_passwd >/dev/null || { echo "error: mosquitto_passwd missing after install" >&2; exit 1; }
echo "mosquitto: $(/usr/sbin/mosquitto -h 2>/dev/null | head -n1 || true)"
command -v chromium >/dev/null || { echo "error: chromium missing after install" >&2; exit 1; }
command -v chromedriver >/dev/null || { echo "error: chromedriver missing after install" >&2; exit 1; }
echo "chromium: $(chromium --version 2>/dev/null || true)"
/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer" ||
  { echo "error: GStreamer's RTSP server is not importable from /usr/bin/python3 after install" >&2; exit 1; }
