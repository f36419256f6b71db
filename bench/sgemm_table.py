#!/usr/bin/env python3
"""Runs bench_sgemm and the BLAS executables beside it alternately, ROUNDS times, and prints a markdown
table of the median GFLOP/s per shape and thread count, with the ratio of the library's packed GEMM to
the best BLAS library. Usage: sgemm_table.py BUILD_BENCH_DIR [ROUNDS]"""
import json
import os
import statistics
import subprocess
import sys

build = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
exes = [e for e in ["bench_sgemm", "bench_sgemm_openblas", "bench_sgemm_blis", "bench_sgemm_onednn"]
        if os.path.exists(os.path.join(build, e))]
runs = {}  # (lib, shape, threads) -> [GFLOP/s]
for _ in range(rounds):
    for exe in exes:
        out = subprocess.run([os.path.join(build, exe), "--benchmark_format=json", "--benchmark_min_time=0.5"],
                             check=True, capture_output=True, text=True).stdout
        report = json.loads(out[out.index("{"):])
        for b in report["benchmarks"]:
            lib, m, k, n, t = b["name"].split("/")[:5]
            shape = "%s x %s x %s" % (m[2:], k[2:], n[2:])
            runs.setdefault((lib, shape, t.split(":")[1]), []).append(b["GFLOP/s"])

libs = ["lora", "eigen", "openblas", "blis", "onednn"]
keys = sorted({(s, t) for (_, s, t) in runs}, key=lambda x: (int(x[1]), [int(v) for v in x[0].split(" x ")]))
print("| m x k x n | threads | " + " | ".join(l for l in libs) + " | lora / best BLAS |")
print("|---|---|" + "---|" * (len(libs) + 1))
for s, t in keys:
    med = {l: statistics.median(runs[(l, s, t)]) for l in libs if (l, s, t) in runs}
    spread = {l: (min(runs[(l, s, t)]), max(runs[(l, s, t)])) for l in med}
    best = max((med[l] for l in ("openblas", "blis", "onednn") if l in med), default=None)
    cells = ["%.1f (%.0f-%.0f)" % (med[l], *spread[l]) if l in med else "-" for l in libs]
    ratio = "%.2f" % (med["lora"] / best) if best and "lora" in med else "-"
    print("| %s | %s | %s | %s |" % (s, t, " | ".join(cells), ratio))
