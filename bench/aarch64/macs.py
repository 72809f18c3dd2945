"""Multiply-accumulates of one inference of an ONNX model, from its graph
with shapes inferred: Conv and QLinearConv (output positions × output
channels × input channels per group × kernel taps), Gemm and MatMul.

    python macs.py MODEL.onnx   # prints the count, e.g. 385096000
"""

import sys

import onnx
from onnx import shape_inference


def dims(value_info):
    return [d.dim_value for d in value_info.type.tensor_type.shape.dim]


def main(path):
    model = shape_inference.infer_shapes(onnx.load(path))
    g = model.graph
    shapes = {v.name: dims(v) for v in list(g.value_info) + list(g.input) + list(g.output)}
    shapes.update({t.name: list(t.dims) for t in g.initializer})
    total = 0
    for n in g.node:
        if n.op_type in ("Conv", "QLinearConv"):
            w = shapes[n.input[3] if n.op_type == "QLinearConv" else n.input[1]]
            y = shapes[n.output[0]]
            total += y[1] * w[1] * (y[2] * y[3]) * (w[2] * w[3]) * y[0]
        elif n.op_type in ("Gemm", "MatMul"):
            a, y = shapes[n.input[0]], shapes[n.output[0]]
            k = a[-1]
            if n.op_type == "Gemm" and any(at.name == "transA" and at.i for at in n.attribute):
                k = a[0]
            count = 1
            for d in y:
                count *= d
            total += count * k
    if total == 0:
        sys.exit(f"{path}: no convolution or matrix product with known shapes")
    print(total)


if __name__ == "__main__":
    main(sys.argv[1])
