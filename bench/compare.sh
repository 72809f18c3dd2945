#!/usr/bin/env bash
# Tern (tract) next to onnxruntime on the very same bundle files, the same
# input tensor and the same thread counts, in one run; prints a table with
# the ratios.
#
#   bench/compare.sh [--iters N] [--rounds N] [--threads "1 2"] [--image PNG] [--profile] [--tract-kernels] [--int8-ops] [--results FILE] BUNDLE.onnx...
#
# e.g. bench/compare.sh models/imagenet-efficientnet-lite0.onnx models/imagenet-int8.onnx
# --profile: also per layer kind (pointwise 1x1, depthwise, full conv, head,
# other), tract's per-node times next to onnxruntime's profiler, per bundle
# and thread count: kind | tract ms | onnxruntime ms | ratio | share of the gap.
# --rounds N: repeat the whole comparison N times (default 1); the ratios are
# then given per round, as the median and range over the rounds: on a machine
# whose speed drifts, the runs of one round are back to back.
# --tract-kernels: also run tern-device with tract's own kernels only (no
# fused convolution op), in the same round.
# --int8-ops: also run tern-device with its integer ops (--int8-ops; QDQ
# bundles), in the same round, and compare it with Tern's float plan of the
# first bundle.
# --results FILE: keep every measurement (JSON lines, per-node times included).
# Needs the venv (scripts/setup-python.sh) and builds tern-device (release).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

iters=100
rounds=1
threads="1 2"
image=data/samples/chelsea.png
profile=()
both=0
int8=0
keep=
bundles=()
while [ $# -gt 0 ]; do
  case "$1" in
    --iters) iters="$2"; shift 2 ;;
    --rounds) rounds="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --profile) profile=(--profile); shift ;;
    --tract-kernels) both=1; shift ;;
    --int8-ops) int8=1; shift ;;
    --results) keep="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
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

tag() { python -c 'import json,sys; d=json.load(sys.stdin); d["runtime"]=sys.argv[1]; d["round"]=int(sys.argv[2]); print(json.dumps(d))' "$@"; }
for round in $(seq 1 "$rounds"); do
  for b in "${bundles[@]}"; do
    input="$tmp/input-$(basename "$b").npy"
    for t in $threads; do
      echo "bench: round $round, $b, $t thread(s)" >&2
      "$tern" bench "$b" --threads "$t" --iters "$iters" --image "$image" --dump-input "$input" --json \
        ${profile[@]:+--profile 0} | tag "tern (tract)" "$round" >>"$results"
      if [ "$both" = 1 ]; then
        "$tern" bench "$b" --threads "$t" --iters "$iters" --image "$image" --json --tract-kernels \
          ${profile[@]:+--profile 0} | tag "tract kernels only" "$round" >>"$results"
      fi
      if [ "$int8" = 1 ]; then
        "$tern" bench "$b" --threads "$t" --iters "$iters" --image "$image" --json --int8-ops \
          ${profile[@]:+--profile 0} | tag "tern int8 ops" "$round" >>"$results"
      fi
      python bench/ort_bench.py "$b" --input "$input" --threads "$t" --iters "$iters" "${profile[@]}" \
        | python -c 'import json,sys; d=json.loads(sys.stdin.read()); d["round"]=int(sys.argv[1]); print(json.dumps(d))' "$round" >>"$results"
    done
  done
done

[ -z "$keep" ] || cp "$results" "$keep"

python - "$results" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\n{'bundle':<34} {'MB':>6} {'thr':>3} {'rnd':>3} {'runtime':<22} {'cold ms':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'inf/s':>6} {'RSS MB':>7} {'top1':>5}")
for r in rows:
    l = r["latency"]
    print(f"{r['bundle'][-34:]:<34} {r['model_bytes']/1e6:6.2f} {r['threads']:3d} {r['round']:3d} {r['runtime']:<22} {r['cold_start_ms']:8.1f} "
          f"{l['p50_ms']:7.2f} {l['p90_ms']:7.2f} {l['p99_ms']:7.2f} {r['throughput_per_s']:6.1f} {r['peak_rss_bytes']/1e6:7.1f} {r['top1']:5d}")
rounds = sorted({r["round"] for r in rows})
if len(rounds) > 1:
    print(f"\nratios of p50 latency, each within one round; median [min–max] over {len(rounds)} rounds:")
    at = {(r["bundle"], r["threads"], r["runtime"].split(" ")[0] if r["runtime"].startswith("onnxruntime") else r["runtime"], r["round"]): r["latency"]["p50_ms"] for r in rows}
    pairs = [("tern (tract)", "onnxruntime"), ("tract kernels only", "onnxruntime"), ("tract kernels only", "tern (tract)"),
             ("tern int8 ops", "onnxruntime"), ("tern int8 ops", "tern (tract)")]
    for b in dict.fromkeys(r["bundle"] for r in rows):
        for t in dict.fromkeys(r["threads"] for r in rows):
            for a, c in pairs:
                v = [at[(b, t, a, k)] / at[(b, t, c, k)] for k in rounds if (b, t, a, k) in at and (b, t, c, k) in at]
                if v:
                    print(f"  {b} @ {t} thread(s): {a} / {c} = {statistics.median(v):.2f} [{min(v):.2f}–{max(v):.2f}]")
    names = list(dict.fromkeys(r["bundle"] for r in rows))
    for b in names[1:]:
        for t in dict.fromkeys(r["threads"] for r in rows):
            for a, f in (("tern (tract)", "tern (tract)"), ("tract kernels only", "tract kernels only"), ("tern int8 ops", "tern (tract)")):
                v = [at[(b, t, a, k)] / at[(names[0], t, f, k)] for k in rounds if (b, t, a, k) in at and (names[0], t, f, k) in at]
                if v:
                    print(f"  {a}: {b} / {f}: {names[0]} @ {t} thread(s) = {statistics.median(v):.2f} [{min(v):.2f}–{max(v):.2f}]")
print("\nratios (p50 latency" + (", last round" if len(rounds) > 1 else "") + "):")
tern = {(r["bundle"], r["threads"]): r for r in rows if r["runtime"] == "tern (tract)"}
own = {(r["bundle"], r["threads"]): r for r in rows if r["runtime"] == "tract kernels only"}
ort = {(r["bundle"], r["threads"]): r for r in rows if r["runtime"].startswith("onnxruntime")}
for (b, t), r in tern.items():
    o = ort.get((b, t))
    if o:
        print(f"  {b} @ {t} thread(s): tern / onnxruntime = {r['latency']['p50_ms'] / o['latency']['p50_ms']:.2f}")
    k = own.get((b, t))
    if k:
        line = f"  {b} @ {t} thread(s): tract kernels only / tern = {k['latency']['p50_ms'] / r['latency']['p50_ms']:.2f}"
        if o:
            line += f", tract kernels only / onnxruntime = {k['latency']['p50_ms'] / o['latency']['p50_ms']:.2f}"
        print(line)
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
