"""Reference forward pass of EfficientNet-Lite0, independent of Tern's graph.

Written with torch.nn.functional straight from the published architecture
(TensorFlow "SAME" padding, batch norm eps 1e-3, ReLU6, inverted residuals,
no squeeze-excitation), reading the weights from the safetensors file made by
scripts/prepare_models.py; no ONNX is read. Tern's tests feed it the very
input tensor that tern-device computed (`classify --dump-input`) and compare
logits.

  reference.py --weights W.safetensors --input X.npy [--input Y.npy ...]
      X.npy: float32 NCHW, shape [1, 3, H, W] or [3, H, W] (224x224 for
      the ImageNet head; the network itself takes any size).
      Prints {"X.npy": [1000 logits], ...} as JSON on stdout, or with
      --out LOGITS.npy saves them as one float32 array [inputs, 1000].
  reference.py --weights W.safetensors --image PHOTO [--image ...]
      its own preprocessing (EXIF orientation, RGB, 224x224 PIL bilinear,
      (x/255 - 0.5)/0.5) and a top-5 table; --json prints JSON lines
      instead; --save-input DIR also writes DIR/<stem>.npy, the tensor used.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

# (expand ratio, kernel, stride, input channels, output channels, repeats)
STAGES = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]
EPS = 1e-3
MEAN = STD = 0.5
SIZE = 224


def expected_shapes():
    """Every tensor the forward pass reads, with its shape."""
    shapes = {}

    def bn(name, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{p}"] = (c,)

    shapes["_conv_stem.weight"] = (32, 3, 3, 3)
    bn("_bn0", 32)
    i = 0
    for expand, k, _, cin, cout, repeats in STAGES:
        for r in range(repeats):
            c_in = cin if r == 0 else cout
            mid = c_in * expand
            p = f"_blocks.{i}."
            if expand != 1:
                shapes[p + "_expand_conv.weight"] = (mid, c_in, 1, 1)
                bn(p + "_bn0", mid)
            shapes[p + "_depthwise_conv.weight"] = (mid, 1, k, k)
            bn(p + "_bn1", mid)
            shapes[p + "_project_conv.weight"] = (cout, mid, 1, 1)
            bn(p + "_bn2", cout)
            i += 1
    shapes["_conv_head.weight"] = (1280, 320, 1, 1)
    bn("_bn1", 1280)
    shapes["_fc.weight"] = (1000, 1280)
    shapes["_fc.bias"] = (1000,)
    return shapes


def load_weights(path):
    try:
        sd = load_file(path)
    except Exception as e:  # noqa: BLE001 - any reason, one message
        sys.exit(f"reference.py: error: cannot read weights {path}: {e}")
    want = expected_shapes()
    missing = [k for k in want if k not in sd]
    wrong = [f"{k} {tuple(sd[k].shape)} (want {want[k]})" for k in want if k in sd and tuple(sd[k].shape) != want[k]]
    if missing or wrong:
        sys.exit(f"reference.py: error: {path} is not EfficientNet-Lite0: missing {missing[:5]}, wrong shape {wrong[:5]}")
    return {k: v.to(torch.float32) for k, v in sd.items()}


def same_pad(x, k, s):
    """TensorFlow "SAME": output ceil(in/s); the odd pixel of padding goes after."""
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


def conv_bn(sd, x, conv, bn, stride=1, groups=1, act=True):
    w = sd[conv + ".weight"]
    x = F.conv2d(same_pad(x, w.shape[-1], stride), w, None, stride, 0, 1, groups)
    x = F.batch_norm(x, sd[bn + ".running_mean"], sd[bn + ".running_var"], sd[bn + ".weight"], sd[bn + ".bias"], False, 0.0, EPS)
    return F.relu6(x) if act else x


def forward(sd, x):
    """Logits [N, 1000] of a normalized NCHW float32 batch."""
    x = conv_bn(sd, x, "_conv_stem", "_bn0", stride=2)
    i = 0
    for expand, _, stride, _, _, repeats in STAGES:
        for r in range(repeats):
            s = stride if r == 0 else 1
            p = f"_blocks.{i}."
            inp = x
            if expand != 1:
                x = conv_bn(sd, x, p + "_expand_conv", p + "_bn0")
            x = conv_bn(sd, x, p + "_depthwise_conv", p + "_bn1", stride=s, groups=x.shape[1])
            x = conv_bn(sd, x, p + "_project_conv", p + "_bn2", act=False)
            if s == 1 and inp.shape == x.shape:
                x = x + inp
            i += 1
    x = conv_bn(sd, x, "_conv_head", "_bn1")
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def load_input(path):
    try:
        a = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        sys.exit(f"reference.py: error: cannot read {path}: {e}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[0] != 1 or a.shape[1] != 3 or not np.issubdtype(a.dtype, np.floating):
        sys.exit(f"reference.py: error: {path}: {a.dtype} {list(a.shape)}; want float NCHW [1, 3, H, W] or [3, H, W]")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def preprocess(path):
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    x = (np.asarray(img, dtype=np.float32) / 255 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


def read_labels(path):
    if path and Path(path).is_file():
        return Path(path).read_text().splitlines()
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--weights", required=True, help="models/efficientnet-lite0.safetensors")
    ap.add_argument("--input", action="append", default=[], help="a normalized input tensor (.npy); repeatable")
    ap.add_argument("--out", help="with --input: save the logits as one .npy [inputs, 1000] instead of printing JSON")
    ap.add_argument("--image", action="append", default=[], help="a photo, preprocessed here; repeatable")
    ap.add_argument("--labels", help="class names, one a line (default: imagenet-labels.txt beside the weights)")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="with --image: JSON lines instead of a table")
    ap.add_argument("--save-input", metavar="DIR", help="with --image: also write DIR/<stem>.npy, the input tensor")
    args = ap.parse_args()
    if not args.input and not args.image:
        ap.error("give --input X.npy or --image PHOTO")
    torch.set_grad_enabled(False)
    sd = load_weights(args.weights)

    if args.input:
        logits = [forward(sd, load_input(p))[0] for p in args.input]
        if args.out:
            np.save(args.out, torch.stack(logits).numpy())
        else:
            print(json.dumps({p: v.tolist() for p, v in zip(args.input, logits)}))

    labels = read_labels(args.labels or Path(args.weights).with_name("imagenet-labels.txt"))
    for path in args.image:
        x = preprocess(path)
        if args.save_input:
            Path(args.save_input).mkdir(parents=True, exist_ok=True)
            np.save(Path(args.save_input) / (Path(path).stem + ".npy"), x.numpy())
        p = forward(sd, x).softmax(1)[0]
        v, ix = p.topk(args.top_k)
        top = [{"index": int(i), "label": labels[i] if labels else None, "probability": float(q)} for i, q in zip(ix, v)]
        if args.json:
            print(json.dumps({"image": path, "top": top}))
        else:
            print(path)
            for t in top:
                print(f"  {t['probability'] * 100:6.2f}%  {t['index']:>4}  {t['label'] or ''}")


if __name__ == "__main__":
    main()
