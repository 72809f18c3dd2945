"""Reference forward pass of EfficientNet-Lite0, independent of Tern's graph.

Written with torch.nn.functional straight from the published architecture
(TensorFlow SAME padding, batch norm eps 1e-3, ReLU6, inverted residuals),
reading the weights from the safetensors file. Tern's tests feed it the very
input tensor that tern-device computed (`classify --dump-input`) and compare
logits.

  reference.py --weights W.safetensors --input X.npy [--input Y.npy ...]
      prints {"X.npy": [logits...], ...} as JSON
  reference.py --weights W.safetensors --image PHOTO
      its own preprocessing (224x224 bilinear, (x/255-0.5)/0.5), prints top-5
"""
import argparse
import json
import math

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

# (expand ratio, kernel, stride, output channels, repeats)
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
          (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
EPS = 1e-3


def same_pad(x, k, s):
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
    x = conv_bn(sd, x, "_conv_stem", "_bn0", stride=2)
    i = 0
    for expand, k, stride, cout, repeats in STAGES:
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--input", action="append", default=[])
    ap.add_argument("--image")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    sd = load_file(args.weights)
    if args.image:
        from PIL import Image
        img = Image.open(args.image).convert("RGB").resize((224, 224), Image.BILINEAR)
        x = torch.from_numpy((np.asarray(img, dtype=np.float32) / 255 - 0.5) / 0.5).permute(2, 0, 1)[None]
        p = forward(sd, x).softmax(1)[0]
        v, ix = p.topk(5)
        print(json.dumps([[int(i), float(q)] for i, q in zip(ix, v)]))
        return
    out = {}
    for path in args.input:
        x = torch.from_numpy(np.load(path).astype(np.float32)).reshape(1, 3, 224, 224)
        out[path] = forward(sd, x)[0].tolist()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
