"""Benchmarks an ONNX file with onnxruntime (CPU), the peer tern-device bench
is compared with.

  ort_bench.py MODEL.onnx --input X.npy [--threads N] [--iters N] [--warmup N]

prints one JSON object: cold start (session creation + first run), latency
percentiles over --iters runs (nearest rank, like tern-device bench),
throughput, peak RSS of this process and the model size. Graph optimisation
level: ORT_ENABLE_ALL (onnxruntime's default); intra-op threads = --threads,
inter-op threads = 1, sequential execution.
"""
import argparse
import json
import math
import os
import resource
import sys
import time

import numpy as np
import onnxruntime as ort


def stats(samples):
    ms = sorted(s * 1e3 for s in samples)

    def rank(p):
        return ms[min(max(math.ceil(p * len(ms)), 1), len(ms)) - 1]

    return {
        "n": len(ms),
        "mean_ms": sum(ms) / len(ms),
        "min_ms": ms[0],
        "p50_ms": rank(0.50),
        "p90_ms": rank(0.90),
        "p99_ms": rank(0.99),
        "max_ms": ms[-1],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--input", required=True, help="input tensor (.npy, float32, the model's input shape)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    if args.threads < 1 or args.iters < 1:
        sys.exit("ort_bench.py: --threads and --iters must be at least 1")
    x = np.load(args.input, allow_pickle=False).astype(np.float32)

    start = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
    load = time.perf_counter() - start
    name = sess.get_inputs()[0].name
    outs = [o.name for o in sess.get_outputs()]
    first = sess.run(outs, {name: x})
    cold = time.perf_counter() - start

    for _ in range(args.warmup):
        sess.run(outs, {name: x})
    samples = []
    for _ in range(args.iters):
        t = time.perf_counter()
        sess.run(outs, {name: x})
        samples.append(time.perf_counter() - t)
    lat = stats(samples)
    print(
        json.dumps(
            {
                "runtime": f"onnxruntime {ort.__version__}",
                "bundle": args.model,
                "model_bytes": os.path.getsize(args.model),
                "threads": args.threads,
                "load_ms": load * 1e3,
                "cold_start_ms": cold * 1e3,
                "latency": lat,
                "throughput_per_s": 1e3 / lat["mean_ms"],
                # ru_maxrss is in KiB on Linux; includes the Python interpreter and numpy.
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "top1": int(np.argmax(np.asarray(first[0]).reshape(-1))),
            }
        )
    )


if __name__ == "__main__":
    main()
