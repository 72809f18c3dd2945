#!/usr/bin/python3
"""An RTSP server for crates/device/tests/netcam.rs: GStreamer's RTSP server
(Debian: python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-base,
-good, and -ugly for x264enc) serving solid-colour test patterns as H.264.

    /usr/bin/python3 tests/python/rtsp_server.py [PORT [COLOUR]]

Mounts /red, /green and /live (COLOUR: red or green, default red), 64x48,
10 frames per second, a key frame every 10 frames, open to anyone; and
/private (red), which wants basic
authentication as user `admin` with the password in the environment
variable TERN_TEST_RTSP_PASSWORD (no /private without it). Listens on
127.0.0.1:PORT (default 0: a free port), prints `port N` once listening,
then serves until killed. Needs the system Python (`gi` is a Debian
package).
"""
import os
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

COLOURS = {"red": 0xFFDC1E1E, "green": 0xFF1EC828}
ROLE = "{}, media.factory.access=(boolean)true, media.factory.construct=(boolean){}"


def factory(argb, encoder, role):
    f = GstRtspServer.RTSPMediaFactory()
    f.set_launch(
        f"( videotestsrc pattern=solid-color foreground-color={argb} is-live=true "
        "! video/x-raw,width=64,height=48,framerate=10/1 ! videoconvert ! video/x-raw,format=I420 "
        f"! {encoder} ! video/x-h264,profile=baseline ! rtph264pay name=pay0 pt=96 config-interval=1 )"
    )
    f.set_shared(True)
    f.add_role_from_structure(Gst.Structure.from_string(ROLE.format(role, "true"))[0])
    if role != "anonymous":
        # Seen but not played by anyone else: 401 (a factory they may not
        # access at all is a 404).
        f.add_role_from_structure(Gst.Structure.from_string(ROLE.format("anonymous", "false"))[0])
    return f


def token(role):
    t = GstRtspServer.RTSPToken()
    t.set_string("media.factory.role", role)
    return t


def main():
    Gst.init(None)
    port = sys.argv[1] if len(sys.argv) > 1 else "0"
    live = sys.argv[2] if len(sys.argv) > 2 else "red"
    encoder = "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 bframes=0"
    if Gst.ElementFactory.find("x264enc") is None:
        encoder = "openh264enc gop-size=10"
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    auth = GstRtspServer.RTSPAuth()
    auth.set_default_token(token("anonymous"))
    mounts = server.get_mount_points()
    for name, argb in COLOURS.items():
        mounts.add_factory(f"/{name}", factory(argb, encoder, "anonymous"))
    mounts.add_factory("/live", factory(COLOURS[live], encoder, "anonymous"))
    password = os.environ.get("TERN_TEST_RTSP_PASSWORD")
    if password:
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic("admin", password), token("admin"))
        mounts.add_factory("/private", factory(COLOURS["red"], encoder, "admin"))
    server.set_auth(auth)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    print(f"port {server.get_bound_port()}", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
