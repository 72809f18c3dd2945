"""Benchmarks an ONNX file with onnxruntime (CPU), the peer tern-device bench
is compared with.

  ort_bench.py MODEL.onnx --input X.npy [--threads N] [--iters N] [--warmup N] [--profile]

prints one JSON object: cold start (session creation + first run), latency
percentiles over --iters runs (nearest rank, like tern-device bench),
throughput, peak RSS of this process and the model size. Graph optimisation
level: ORT_ENABLE_ALL (onnxruntime's default); intra-op threads = --threads,
inter-op threads = 1, sequential execution.

--profile: afterwards, a second session with onnxruntime's profiler runs
--warmup + --iters more times; "profile" then holds the kernel time per run
of the last --iters runs, in total and per layer kind ("by_kind": [kind,
nodes, ms], slowest first) with the rule of `tern-device bench --profile`
(crates/device/src/perf.rs, LayerKinds): a node counts towards the ONNX
layer its name starts with (a convolution's layer is its weight's name
without .weight/.int8, or its node name without the last component; a
Gemm/MatMul is its node name or its weight's layer); group > 1 is depthwise,
a 1x1 kernel pointwise, any other convolution full conv, Gemm/MatMul the
head, the rest other. The profiler's JSON is written to a temporary folder
and removed.
"""
import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
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


KINDS = {"pointwise": "pointwise 1x1", "depthwise": "depthwise", "full": "full conv", "head": "head (gemm)", "other": "other"}


def layer_kinds(model_path):
    """[(prefix, kind)], longest prefix first, as LayerKinds::of_graph."""
    import onnx

    g = onnx.load(model_path, load_external_data=False).graph
    dims = {t.name: list(t.dims) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}

    def weight_dims(name):
        if name in dims:
            return dims[name]
        n = producer.get(name)
        if n is not None and n.op_type == "DequantizeLinear" and n.input:
            return dims.get(n.input[0])
        return None

    def layer(weight):
        w = weight[: -len(".int8")] if weight.endswith(".int8") else weight
        return w[: -len(".weight")] if w.endswith(".weight") else w

    prefixes = set()
    for n in g.node:
        if n.op_type in ("Conv", "ConvInteger", "Gemm", "MatMul", "MatMulInteger"):
            idx = 1
        elif n.op_type in ("QLinearConv", "QLinearMatMul"):
            idx = 3
        else:
            continue
        if len(n.input) <= idx:
            continue
        weight = n.input[idx]
        if n.op_type in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
            kind = KINDS["head"]
        else:
            attrs = {a.name: a for a in n.attribute}
            group = attrs["group"].i if "group" in attrs else 1
            if "kernel_shape" in attrs and len(attrs["kernel_shape"].ints):
                kernel = list(attrs["kernel_shape"].ints)
            else:
                kernel = (weight_dims(weight) or [])[2:]
            if group > 1:
                kind = KINDS["depthwise"]
            elif kernel and all(k == 1 for k in kernel):
                kind = KINDS["pointwise"]
            else:
                kind = KINDS["full"]
        prefixes.add((layer(weight), kind))
        if n.name:
            base = n.name if kind == KINDS["head"] else n.name.rsplit(".", 1)[0]
            prefixes.add((base, kind))
    return sorted(prefixes, key=lambda p: (-len(p[0]), p[0]))


def kind_of(prefixes, node):
    for p, k in prefixes:
        if node.startswith(p) and (len(node) == len(p) or node[len(p)] in "._/:"):
            return k
    return KINDS["other"]


def profile(args, x):
    """Kernel time per run of the last --iters runs, per node and per kind."""
    tmp = tempfile.mkdtemp(prefix="ort-profile-")
    try:
        opts = session_options(args.threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(args.model, opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        outs = [o.name for o in sess.get_outputs()]
        for _ in range(args.warmup + args.iters):
            sess.run(outs, {name: x})
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    runs = runs[-args.iters :]
    if len(runs) < args.iters:
        sys.exit(f"ort_bench.py: the profile holds {len(runs)} runs, expected {args.iters}")
    lo, hi = runs[0][0], runs[-1][1]
    per_node = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and lo <= e["ts"] <= hi:
            n = e["name"][: -len("_kernel_time")]
            op = e.get("args", {}).get("op_name", "?")
            per_node.setdefault((n, op), 0.0)
            per_node[(n, op)] += e["dur"] / 1e3 / args.iters
    prefixes = layer_kinds(args.model)
    by_kind = {}
    for (n, _), ms in per_node.items():
        k = kind_of(prefixes, n)
        c, t = by_kind.get(k, (0, 0.0))
        by_kind[k] = (c + 1, t + ms)
    nodes = sorted(({"name": n, "op": op, "mean_ms": ms} for (n, op), ms in per_node.items()), key=lambda d: -d["mean_ms"])
    return {
        "total_ms": sum(per_node.values()),
        "nodes": nodes,
        "by_kind": sorted(([k, c, t] for k, (c, t) in by_kind.items()), key=lambda r: -r[2]),
    }


def session_options(threads):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--input", required=True, help="input tensor (.npy, float32, the model's input shape)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also the kernel time per node and per layer kind")
    args = ap.parse_args()
    if args.threads < 1 or args.iters < 1:
        sys.exit("ort_bench.py: --threads and --iters must be at least 1")
    x = np.load(args.input, allow_pickle=False).astype(np.float32)

    start = time.perf_counter()
    sess = ort.InferenceSession(args.model, session_options(args.threads), providers=["CPUExecutionProvider"])
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
    # ru_maxrss is in KiB on Linux; includes the Python interpreter and numpy.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {
        "runtime": f"onnxruntime {ort.__version__}",
        "bundle": args.model,
        "model_bytes": os.path.getsize(args.model),
        "threads": args.threads,
        "load_ms": load * 1e3,
        "cold_start_ms": cold * 1e3,
        "latency": lat,
        "throughput_per_s": 1e3 / lat["mean_ms"],
        "peak_rss_bytes": rss,
        "top1": int(np.argmax(np.asarray(first[0]).reshape(-1))),
    }
    if args.profile:
        report["profile"] = profile(args, x)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
