"""Runs an ONNX file with onnxruntime (CPU), an independent runtime.

  ort_run.py MODEL.onnx [--check] --input X.npy [--input Y.npy ...]
      prints {"X.npy": {"output name": [values...], ...}, ...} as JSON;
      --check first runs onnx.checker.check_model(full_check=True).
"""
import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--input", action="append", default=[])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if args.check:
        onnx.checker.check_model(onnx.load(args.model), full_check=True)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    shape = sess.get_inputs()[0].shape
    outs = [o.name for o in sess.get_outputs()]
    result = {}
    for path in args.input:
        x = np.load(path).astype(np.float32).reshape(shape)
        values = sess.run(outs, {name: x})
        result[path] = {n: v.reshape(-1).tolist() for n, v in zip(outs, values)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
