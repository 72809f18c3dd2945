#!/usr/bin/env bash
# Tern (tract) next to onnxruntime on the very same bundle files, the same
# input tensor and the same thread counts, in one run; prints a table with
# the ratios.
#
#   scripts/bench-compare.sh [--iters N] [--threads "1 2"] [--image PNG] [--profile] [--results FILE] BUNDLE.onnx...
#
# e.g. scripts/bench-compare.sh models/imagenet-efficientnet-lite0.onnx models/imagenet-int8.onnx
# --profile: also per layer kind (pointwise 1x1, depthwise, full conv, head,
# other), tract's per-node times next to onnxruntime's profiler, per bundle
# and thread count: kind | tract ms | onnxruntime ms | ratio | share of the gap.
# --results FILE: keep every measurement (JSON lines, per-node times included).
# Needs the venv (scripts/setup-python.sh) and builds tern-device (release).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

iters=100
threads="1 2"
image=data/samples/chelsea.png
profile=()
keep=
bundles=()
while [ $# -gt 0 ]; do
  case "$1" in
    --iters) iters="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --profile) profile=(--profile); shift ;;
    --results) keep="$2"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) bundles+=("$1"); shift ;;
  esac
done
[ ${#bundles[@]} -gt 0 ] || { echo "usage: $0 [--iters N] [--threads \"1 2\"] [--image PNG] [--profile] [--results FILE] BUNDLE.onnx..." >&2; exit 2; }
for b in "${bundles[@]}"; do [ -f "$b" ] || { echo "$b: no such bundle" >&2; exit 2; }; done

cargo build --release -p tern-device --quiet
tern=target/release/tern-device
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
results="$tmp/results.jsonl"

for b in "${bundles[@]}"; do
  input="$tmp/input-$(basename "$b").npy"
  for t in $threads; do
    echo "bench: $b, $t thread(s)" >&2
    "$tern" bench "$b" --threads "$t" --iters "$iters" --image "$image" --dump-input "$input" --json \
      ${profile[@]:+--profile 0} \
      | python -c 'import json,sys; d=json.load(sys.stdin); d["runtime"]="tern (tract)"; print(json.dumps(d))' >>"$results"
    python tests/python/ort_bench.py "$b" --input "$input" --threads "$t" --iters "$iters" "${profile[@]}" >>"$results"
  done
done

[ -z "$keep" ] || cp "$results" "$keep"

python - "$results" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\n{'bundle':<34} {'MB':>6} {'thr':>3} {'runtime':<22} {'cold ms':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'inf/s':>6} {'RSS MB':>7} {'top1':>5}")
for r in rows:
    l = r["latency"]
    print(f"{r['bundle'][-34:]:<34} {r['model_bytes']/1e6:6.2f} {r['threads']:3d} {r['runtime']:<22} {r['cold_start_ms']:8.1f} "
          f"{l['p50_ms']:7.2f} {l['p90_ms']:7.2f} {l['p99_ms']:7.2f} {r['throughput_per_s']:6.1f} {r['peak_rss_bytes']/1e6:7.1f} {r['top1']:5d}")
print("\nratios (p50 latency):")
tern = {(r["bundle"], r["threads"]): r for r in rows if r["runtime"].startswith("tern")}
ort = {(r["bundle"], r["threads"]): r for r in rows if not r["runtime"].startswith("tern")}
for (b, t), r in tern.items():
    o = ort.get((b, t))
    if o:
        print(f"  {b} @ {t} thread(s): tern / onnxruntime = {r['latency']['p50_ms'] / o['latency']['p50_ms']:.2f}")
bundles = list(dict.fromkeys(r["bundle"] for r in rows))
if len(bundles) > 1:
    base = bundles[0]
    for b in bundles[1:]:
        for (bb, t), r in tern.items():
            if bb == b and (base, t) in tern:
                f = tern[(base, t)]
                print(f"  tern {b} / {base} @ {t} thread(s): latency {r['latency']['p50_ms'] / f['latency']['p50_ms']:.2f}, "
                      f"size {r['model_bytes'] / f['model_bytes']:.3f} (÷{f['model_bytes'] / r['model_bytes']:.2f})")

# Per layer kind: tract's per-node times (tern-device bench --profile) and
# onnxruntime's kernel times (its profiler), each node counted in the ONNX
# layer its name starts with (the same rule on both sides).
order = ["pointwise 1x1", "depthwise", "full conv", "head (gemm)", "other"]
for (b, t), r in tern.items():
    o = ort.get((b, t))
    if not (o and "profile" in r and "profile" in o):
        continue
    tk = {k: ms for k, _, ms in r["profile"]["by_kind"]}
    ok = {k: ms for k, _, ms in o["profile"]["by_kind"]}
    tt, ot = r["profile"]["total_ms"], o["profile"]["total_ms"]
    gap = tt - ot
    print(f"\nper layer kind, {b} @ {t} thread(s) (ms per run; node sums: tract {tt:.2f}, onnxruntime {ot:.2f}; "
          f"p50 {r['latency']['p50_ms']:.2f} vs {o['latency']['p50_ms']:.2f}):")
    print(f"  {'kind':<14} {'tract ms':>9} {'ort ms':>9} {'ratio':>7} {'share of gap':>13}")
    for k in order + sorted((set(tk) | set(ok)) - set(order)):
        a, c = tk.get(k, 0.0), ok.get(k, 0.0)
        if a == 0.0 and c == 0.0:
            continue
        ratio = f"{a / c:7.2f}" if c > 0 else f"{'-':>7}"
        share = f"{100 * (a - c) / gap:12.1f}%" if gap > 0 else f"{'-':>13}"
        print(f"  {k:<14} {a:9.3f} {c:9.3f} {ratio} {share}")
    print(f"  {'total':<14} {tt:9.3f} {ot:9.3f} {tt / ot:7.2f} {'100.0%' if gap > 0 else '-':>13}")
EOF
