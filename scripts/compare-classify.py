#!/usr/bin/env python3
"""Compares two `tern-device classify --json --logits` outputs image by image.

Passes when both list the same images in the same order, every image has the
same top-1 class on both sides, and the largest |logit difference| over all
classes is at most --tol. Prints one line per image and exits 1 on any
mismatch. Standard library only, so it runs without the project's venv.

    scripts/compare-classify.py --tol 1e-4 x86_64.jsonl aarch64.jsonl
"""

import argparse
import json
import math
import sys
from pathlib import Path


def load(path):
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            sys.exit(f"error: {path}:{n}: not JSON: {e}")
        if "logits" not in row or not row.get("top"):
            sys.exit(f"error: {path}:{n}: no logits or no top (run classify with --json --logits)")
        rows.append(row)
    if not rows:
        sys.exit(f"error: {path}: no results")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", help="JSON lines from the reference build (x86-64)")
    ap.add_argument("candidate", help="JSON lines from the build under test (aarch64 under qemu)")
    ap.add_argument("--tol", type=float, default=1e-4, help="largest allowed |logit difference| (default 1e-4)")
    ap.add_argument("--names", default="x86_64,aarch64", help="labels of the two sides in the report")
    a = ap.parse_args()
    ref_name, cand_name = a.names.split(",", 1)
    ref, cand = load(a.reference), load(a.candidate)
    failures = []
    if len(ref) != len(cand):
        failures.append(f"{len(ref)} results from {ref_name}, {len(cand)} from {cand_name}")
    worst = 0.0
    for r, c in zip(ref, cand):
        image = Path(r["image"]).name
        if Path(c["image"]).name != image:
            failures.append(f"image order differs: {r['image']} vs {c['image']}")
            continue
        rl, cl = r["logits"], c["logits"]
        if len(rl) != len(cl):
            failures.append(f"{image}: {len(rl)} logits from {ref_name}, {len(cl)} from {cand_name}")
            continue
        if not all(math.isfinite(x) for x in rl + cl):
            failures.append(f"{image}: non-finite logits")
            continue
        delta = max(abs(x - y) for x, y in zip(rl, cl))
        worst = max(worst, delta)
        rt, ct = r["top"][0], c["top"][0]
        same = rt["index"] == ct["index"]
        print(
            f"{image:<24} top-1 {ref_name} {rt['index']:>4} {rt['label']!r} {rt['probability']:.4f}"
            f" | {cand_name} {ct['index']:>4} {ct['label']!r} {ct['probability']:.4f}"
            f" | max|dlogit| {delta:.3e}"
        )
        if not same:
            failures.append(f"{image}: top-1 {rt['index']} ({ref_name}) vs {ct['index']} ({cand_name})")
        if delta > a.tol:
            failures.append(f"{image}: max |dlogit| {delta:.3e} > {a.tol:g}")
    print(f"{len(ref)} images, max |dlogit| {worst:.3e} (tolerance {a.tol:g})")
    for f in failures:
        print(f"MISMATCH: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
