"""Compares two sets of logits and prints max |difference| per input.

  compare.py A B [--tol 1e-4] [--output logits]

A and B may each be:
  - .npy: one vector [C], or [N, C] (rows are inputs), or [N, 1, C];
  - JSON from reference.py --input: {"X.npy": [C floats], ...};
  - JSON from ort_run.py: {"X.npy": {"logits": [...], ...}, ...} (--output
    picks the output, default "logits");
  - JSON lines from `tern-device classify --json --logits` (one per image).
Rows are paired by key when both sides have the same keys, otherwise by
position. Prints one line per pair (max |Δ|, top-1 of each side) and exits 1
when the counts or top-1 differ or a max |Δ| exceeds --tol. numpy only.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np


def rows_from_json(obj, output, path):
    if isinstance(obj, list):
        if obj and isinstance(obj[0], (int, float)):
            return [(None, obj)]
        if obj and isinstance(obj[0], list):
            return [(None, r) for r in obj]
    if isinstance(obj, dict):
        if "logits" in obj and "image" in obj:  # one tern-device JSON line
            return [(Path(obj["image"]).stem, obj["logits"])]
        rows = []
        for key, value in obj.items():
            if isinstance(value, dict):
                if output not in value:
                    sys.exit(f"compare.py: {path}: {key} has no output {output!r} (has {list(value)})")
                value = value[output]
            rows.append((key, value))
        return rows
    sys.exit(f"compare.py: {path}: unrecognized JSON layout")


def load(path, output):
    p = Path(path)
    if p.suffix == ".npy":
        a = np.load(p, allow_pickle=False)
        a = a.reshape(1, -1) if a.ndim == 1 else a.reshape(a.shape[0], -1)
        return [(None, r) for r in a]
    text = p.read_text()
    try:
        return rows_from_json(json.loads(text), output, path)
    except json.JSONDecodeError:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows += rows_from_json(json.loads(line), output, path)
                except json.JSONDecodeError as e:
                    sys.exit(f"compare.py: {path}:{n}: not JSON: {e}")
        return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed max |Δ| (default 1e-4)")
    ap.add_argument("--output", default="logits", help="which ort_run.py output to read (default logits)")
    args = ap.parse_args()
    a, b = load(args.a, args.output), load(args.b, args.output)
    failures = []
    if len(a) != len(b):
        failures.append(f"{len(a)} rows in {args.a}, {len(b)} in {args.b}")
    keys_a, keys_b = [k for k, _ in a], [k for k, _ in b]
    if None not in keys_a and set(keys_a) == set(keys_b):
        bd = dict(b)
        pairs = [(k, va, bd[k]) for k, va in a]
    else:
        pairs = [(ka if ka is not None else kb if kb is not None else str(i), va, vb) for i, ((ka, va), (kb, vb)) in enumerate(zip(a, b))]
    worst = 0.0
    for key, va, vb in pairs:
        va, vb = np.asarray(va, dtype=np.float64).ravel(), np.asarray(vb, dtype=np.float64).ravel()
        if va.shape != vb.shape:
            failures.append(f"{key}: {va.size} values vs {vb.size}")
            continue
        if not (np.isfinite(va).all() and np.isfinite(vb).all()):
            failures.append(f"{key}: non-finite values")
            continue
        d = float(np.abs(va - vb).max())
        worst = max(worst, d)
        ta, tb = int(va.argmax()), int(vb.argmax())
        print(f"{key}: max |Δ| {d:.3e}  top-1 {ta} vs {tb}")
        if ta != tb:
            failures.append(f"{key}: top-1 {ta} vs {tb}")
        if d > args.tol:
            failures.append(f"{key}: max |Δ| {d:.3e} > {args.tol:g}")
    print(f"{len(pairs)} pairs, max |Δ| {worst:.3e} (tolerance {args.tol:g})")
    for f in failures:
        print(f"MISMATCH: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
