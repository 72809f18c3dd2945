"""Runs an ONNX file with onnxruntime (CPU), an independent runtime.

  ort_run.py MODEL.onnx [--check] --input X.npy [--input Y.npy ...]
      prints {"X.npy": {"output name": [values...], ...}, ...} as JSON on
      stdout (every output flattened), one key per input, in order.
  ort_run.py MODEL.onnx --stack XS.npy
      XS.npy holds N inputs along its first axis ([N, C, H, W] for a model
      of input [1, C, H, W]); runs each and prints {"XS.npy": [{"output
      name": [values...], ...}, ...]} (one object per row, in order).
  ort_run.py MODEL.onnx --check
      runs onnx.checker.check_model(full_check=True) first and reports on
      stderr; a model the checker refuses exits 1 without running.

Inputs are float32 .npy tensors of the model input's shape; a missing
leading batch axis of 1 is added. One intra-op thread, so runs repeat
exactly.
"""
import argparse
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def check(path):
    try:
        model = onnx.load(path)
    except Exception as e:  # noqa: BLE001 - unreadable or not protobuf
        sys.exit(f"ort_run.py: {path}: not a readable ONNX file: {e}")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:  # noqa: BLE001 - ValidationError or InferenceError
        sys.exit(f"ort_run.py: {path}: the ONNX checker refuses the model: {e}")
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in model.opset_import)
    ops = sorted({n.op_type for n in model.graph.node})
    print(
        f"ort_run.py: {path}: onnx.checker (full_check) OK: IR {model.ir_version}, opset {opsets}, "
        f"{len(model.graph.node)} nodes ({', '.join(ops)}), {len(model.metadata_props)} metadata_props",
        file=sys.stderr,
    )


def fit(x, shape, path):
    """x reshaped to the input's declared shape (symbolic dims match anything)."""
    if x.ndim == len(shape) - 1:
        x = x[None]
    ok = x.ndim == len(shape) and all(not isinstance(d, int) or d == n for d, n in zip(shape, x.shape))
    if not ok:
        sys.exit(f"ort_run.py: {path}: shape {list(x.shape)} does not fit the model input {shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--input", action="append", default=[], help="an input tensor (.npy); repeatable")
    ap.add_argument("--stack", action="append", default=[], help="N inputs along axis 0 (.npy); repeatable")
    ap.add_argument("--check", action="store_true", help="run the ONNX checker first (full_check)")
    args = ap.parse_args()
    if args.check:
        check(args.model)
    if not args.input and not args.stack:
        if not args.check:
            ap.error("nothing to do: give --input X.npy, --stack XS.npy and/or --check")
        return
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        sys.exit(f"ort_run.py: {args.model} has {len(inputs)} inputs; one is supported")
    name, shape = inputs[0].name, inputs[0].shape
    outs = [o.name for o in sess.get_outputs()]
    result = {}
    for path in args.input:
        x = fit(np.load(path, allow_pickle=False), shape, path)
        values = sess.run(outs, {name: x})
        result[path] = {n: np.asarray(v).reshape(-1).tolist() for n, v in zip(outs, values)}
    for path in args.stack:
        xs = np.load(path, allow_pickle=False)
        if xs.ndim != len(shape):
            sys.exit(f"ort_run.py: {path}: shape {list(xs.shape)} is not a stack of inputs {shape}")
        rows = []
        for i in range(xs.shape[0]):
            values = sess.run(outs, {name: fit(xs[i : i + 1], shape, path)})
            rows.append({n: np.asarray(v).reshape(-1).tolist() for n, v in zip(outs, values)})
        result[path] = rows
    print(json.dumps(result))


if __name__ == "__main__":
    main()
