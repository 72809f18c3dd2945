"""onnxruntime's own int8 quantizer on a float bundle: the reference for what
the network holds in full int8 (docs/quantization.md, "QDQ").

  ort_quantize.py FLOAT.onnx CALIB_DIR EVAL_DIR [--calib-images 64] [--seed 0]
                  [--device-bin target/release/tern-device] [--methods minmax,percentile,entropy]
                  [--activations int8,uint8] [--exclude NODE,...] [--keep DIR] [--compare INT8.onnx ...]

Draws the calibration images exactly as `tern-host quantize CALIB_DIR
--calib-images N --seed S` does (every image under CALIB_DIR, sorted,
Fisher-Yates with splitmix64), preprocesses them and every image of EVAL_DIR
with the bundle's own preprocessing (`tern-device classify --dump-input`),
runs `onnxruntime.quantization.quantize_static` (QDQ, per-channel symmetric
int8 weights, per-tensor activations, each --methods x --activations) and
prints one JSON line per quantized model: its top-1 agreement with the
float model over the EVAL_DIR images and the mean/max |Δlogit|, twice:
"onnxruntime" with all graph optimisations (its fused int8 kernels) and
"reference" with none (each QuantizeLinear/DequantizeLinear exact, float
operators between them: what tract runs and tern-host evaluates); one
thread, float run the same way. --exclude leaves those nodes float
(quantize_static's nodes_to_exclude); --compare adds other int8 files (e.g.
Tern's QDQ bundles) to the table, run the same way; --keep DIR keeps the
quantized models there.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}  # dataset.rs
MASK = (1 << 64) - 1


def images_under(root):
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXT:
                out.append(Path(dirpath) / f)
    return sorted(out, key=lambda p: p.parts)


def pick_images(root, n, seed):
    """crates/host/src/quantize/calibrate.rs `pick_images`, bit for bit."""
    files = images_under(root)
    s = seed

    def nxt():
        nonlocal s
        s = (s + 0x9E3779B97F4A7C15) & MASK
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    for i in range(len(files) - 1, 0, -1):
        j = nxt() % (i + 1)
        files[i], files[j] = files[j], files[i]
    return files[:n]


def dump_inputs(device_bin, bundle, files, out):
    """Preprocessed tensors of `files` ([N, C, H, W]), by the bundle's own preprocessing."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [device_bin, "classify", bundle, "--json", "--dump-input", str(out), *map(str, files)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    xs = [np.load(out / f"{f.stem}.npy") for f in files]
    return np.ascontiguousarray(np.stack([x.reshape(x.shape[-3:]) for x in xs]), dtype=np.float32)


class Reader(CalibrationDataReader):
    def __init__(self, name, xs):
        self.name, self.xs, self.i = name, xs, 0

    def get_next(self):
        if self.i >= len(self.xs):
            return None
        self.i += 1
        return {self.name: self.xs[self.i - 1 : self.i]}

    def rewind(self):
        self.i = 0


def session(path, optimize=True):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    if not optimize:
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])


def logits(path, xs, optimize=True):
    s = session(path, optimize)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: xs[i : i + 1]})[0].reshape(1, -1) for i in range(len(xs))])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("calib_dir")
    ap.add_argument("eval_dir")
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device-bin", default="target/release/tern-device")
    ap.add_argument("--methods", default="minmax,percentile,entropy")
    ap.add_argument("--activations", default="int8,uint8")
    ap.add_argument("--keep", help="keep the quantized models in this folder")
    ap.add_argument("--compare", action="append", default=[], help="another int8 file to judge the same way")
    ap.add_argument("--exclude", default="", help="node names quantize_static leaves float (comma-separated)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="ort-quantize-"))
    try:
        calib_files = pick_images(args.calib_dir, args.calib_images, args.seed)
        eval_files = images_under(args.eval_dir)
        calib = dump_inputs(args.device_bin, args.model, calib_files, tmp / "calib")
        evals = dump_inputs(args.device_bin, args.model, eval_files, tmp / "eval")
        print(f"calibration: {len(calib)} images of {args.calib_dir} (seed {args.seed}); "
              f"held out: {len(evals)} images of {args.eval_dir}", file=sys.stderr)
        # The bundle's metadata (the manifest) is not needed by the quantizer.
        import onnx

        m = onnx.load(args.model)
        del m.metadata_props[:]
        plain = tmp / "float.onnx"
        onnx.save(m, str(plain))
        name = m.graph.input[0].name
        ref = logits(plain, evals)
        top_ref = ref.argmax(1)

        methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                   "entropy": CalibrationMethod.Entropy}
        acts = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
        keep = Path(args.keep) if args.keep else tmp
        keep.mkdir(parents=True, exist_ok=True)
        rows = []
        for meth in args.methods.split(","):
            for act in args.activations.split(","):
                tag = "-exclude" if args.exclude else ""
                out = keep / f"ort-qdq-{meth}-{act}{tag}.onnx"
                quantize_static(str(plain), str(out), Reader(name, calib), quant_format=QuantFormat.QDQ,
                                per_channel=True, activation_type=acts[act], weight_type=QuantType.QInt8,
                                calibrate_method=methods[meth], nodes_to_exclude=[n for n in args.exclude.split(",") if n],
                                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
                excl = f", float: {args.exclude}" if args.exclude else ""
                rows.append((f"onnxruntime quantize_static {meth} {act} activations{excl}", out))
        for c in args.compare:
            rows.append((c, Path(c)))
        for label, path in rows:
            row = {"model": label, "images": len(evals)}
            for key, optimize in (("onnxruntime", True), ("reference", False)):
                q = logits(path, evals, optimize)
                d = np.abs(q - ref)
                row[key] = {"top1_agreement": round(float((q.argmax(1) == top_ref).mean() * 100), 2),
                            "mean_abs_logit_diff": round(float(d.mean()), 4), "max_abs_logit_diff": round(float(d.max()), 3)}
            print(json.dumps(row))
            sys.stdout.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
