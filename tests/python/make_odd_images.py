"""Writes one photo in the awkward encodings a camera roll contains.

Usage: make_odd_images.py SOURCE_IMAGE OUT_DIR

Files written (all of the same scene, 300x200 after orientation):
  upright.jpg      baseline JPEG, no EXIF
  rotated-exif.jpg pixels stored rotated 90 degrees, EXIF Orientation=6 (display: upright)
  gray.png         8-bit grayscale
  rgba.png         RGBA with a non-trivial alpha channel
  rgb16.png        16-bit per channel RGB
  cmyk.jpg         CMYK JPEG (as written by print workflows)
  palette.gif      256-colour palette
Pinned by scripts/requirements.txt (Pillow and numpy come with scikit-image).
"""
import sys
from pathlib import Path

import struct
import zlib

import numpy as np
from PIL import Image

src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
img = Image.open(src).convert("RGB").resize((300, 200), Image.BILINEAR)
img.save(out / "upright.jpg", quality=95)

# Stored rotated so that a viewer applying Orientation=6 (rotate 90 CW)
# shows the upright scene.
stored = img.transpose(Image.Transpose.ROTATE_90)
exif = Image.Exif()
exif[0x0112] = 6
stored.save(out / "rotated-exif.jpg", quality=95, exif=exif.tobytes())

img.convert("L").save(out / "gray.png")
rgba = img.copy()
rgba.putalpha(Image.linear_gradient("L").resize(img.size))
rgba.save(out / "rgba.png")


def write_png_rgb16(path, arr):
    """Pillow cannot write 16-bit RGB, so the PNG chunks are written here."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


write_png_rgb16(out / "rgb16.png", np.asarray(img, dtype=np.uint16) * 257)
img.convert("CMYK").save(out / "cmyk.jpg", quality=95)
img.convert("P", palette=Image.Palette.ADAPTIVE).save(out / "palette.gif")
