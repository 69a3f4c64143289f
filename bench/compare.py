#!/usr/bin/env python3
"""Per-benchmark time ratios between two Google Benchmark runs, for checking a change for regressions.

usage: compare.py BASE NEW [THRESHOLD]

BASE and NEW are JSON files written with --benchmark_out, or directories of them (bench_*.json, as `make bench`
writes into build/bench-results). Benchmarks are matched by name (grouped by NEW's file); each line shows both times and NEW / BASE. Lines
whose ratio is beyond THRESHOLD (default 1.10: 10% slower, or faster) are marked, and the summary gives the geometric
mean of the ratios per binary. The machines these run on are shared and noisy: repeat a run before trusting a ratio
within 10%.
"""
import glob
import json
import math
import os
import sys


def load(path):
    files = sorted(glob.glob(os.path.join(path, "bench_*.json"))) if os.path.isdir(path) else [path]
    if not files:
        sys.exit(f"no benchmark JSON in {path}")
    times = {}
    for name in files:
        with open(name) as f:
            data = json.load(f)
        binary = os.path.basename(name).removesuffix(".json")
        for b in data.get("benchmarks", []):
            if b.get("run_type") == "aggregate" or b.get("error_occurred"):
                continue
            scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[b.get("time_unit", "ns")]
            times[b["name"]] = (binary, b["real_time"] * scale)
    return times


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    base, new = load(sys.argv[1]), load(sys.argv[2])
    threshold = float(sys.argv[3]) if len(sys.argv) == 4 else 1.10
    common = sorted(set(base) & set(new))
    if not common:
        sys.exit("the two runs have no benchmark in common")
    width = max(len(name) for name in common)
    logs = {}
    print(f"{'benchmark':<{width}}  {'base (ms)':>11}  {'new (ms)':>11}  {'new/base':>8}")
    for name in common:
        (_, b), (binary, n) = base[name], new[name]
        ratio = n / b if b > 0 else float("inf")
        mark = "  slower" if ratio > threshold else "  faster" if ratio < 1 / threshold else ""
        print(f"{name:<{width}}  {b:>11.4f}  {n:>11.4f}  {ratio:>8.3f}{mark}")
        if b > 0 and n > 0:
            logs.setdefault(binary, []).append(math.log(ratio))
    print()
    for binary, values in sorted(logs.items()):
        print(f"{binary}: geometric mean new/base {math.exp(sum(values) / len(values)):.3f} over {len(values)} benchmarks")
    only = len(set(base) ^ set(new))
    if only:
        print(f"{only} benchmark(s) ran in only one of the two runs and are not compared")


if __name__ == "__main__":
    main()
