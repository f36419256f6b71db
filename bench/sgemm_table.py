#!/usr/bin/env python3
"""Runs bench_sgemm and the BLAS executables beside it alternately, ROUNDS times, and prints two markdown
tables of medians (min-max over the rounds in brackets):
  1. the dense product Y = X W^T in GFLOP/s per shape and thread count: the library's packed GEMM, Eigen,
     OpenBLAS, BLIS, oneDNN, the library's / the best BLAS, and the best's fraction of the FMA peak
     measured in the same run;
  2. the LoRA layer against the best dense product of the same shape: forward time / dense time (theory
     1 + r (in + out) / (in out)), training step time / dense time (theory about 2), and their GFLOP/s as a
     fraction of the FMA peak.
Usage: sgemm_table.py BUILD_BENCH_DIR [ROUNDS] [--json FILE]"""
import json
import os
import statistics
import subprocess
import sys

args = [a for a in sys.argv[1:]]
json_out = None
if "--json" in args:
    i = args.index("--json")
    json_out = args[i + 1]
    del args[i:i + 2]
build = args[0]
rounds = int(args[1]) if len(args) > 1 else 3
exes = [e for e in ["bench_sgemm", "bench_sgemm_openblas", "bench_sgemm_blis", "bench_sgemm_onednn"]
        if os.path.exists(os.path.join(build, e))]
if "bench_sgemm" not in exes:
    sys.exit("sgemm_table.py: no bench_sgemm in %s (build the bench_sgemm target)" % build)
env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
runs = {}  # (lib, shape, threads) -> [GFLOP/s]
peak = {}  # threads -> [GFLOP/s]
for rnd in range(rounds):
    for exe in exes:
        print("sgemm_table.py: round %d of %d: %s" % (rnd + 1, rounds, exe), file=sys.stderr, flush=True)
        out = subprocess.run([os.path.join(build, exe), "--benchmark_format=json", "--benchmark_min_time=0.5"],
                             check=True, capture_output=True, text=True, env=env).stdout
        report = json.loads(out[out.index("{"):])
        for b in report["benchmarks"]:
            parts = b["name"].split("/")
            if parts[0] == "peak":
                peak.setdefault(parts[1].split(":")[1], []).append(b["GFLOP/s"])
                continue
            lib, m, k, n, t = parts[:5]
            shape = "%s x %s x %s" % (m[2:], k[2:], n[2:])
            runs.setdefault((lib, shape, t.split(":")[1]), []).append(b["GFLOP/s"])

RANK = {"512 x 768 x 768": 8, "512 x 4096 x 11008": 64}


def med(key):
    return statistics.median(runs[key]) if key in runs else None


def cell(key):
    if key not in runs:
        return "-"
    v = runs[key]
    return "%.1f (%.0f-%.0f)" % (statistics.median(v), min(v), max(v))


libs = ["lora", "eigen", "openblas", "blis", "onednn"]
blas = ("openblas", "blis", "onednn")
keys = sorted({(s, t) for (_, s, t) in runs}, key=lambda x: (int(x[1]), [int(v) for v in x[0].split(" x ")]))
peak_med = {t: statistics.median(v) for t, v in peak.items()}
print("FMA peak measured in this run (GFLOP/s): " +
      ", ".join("%s thread%s %.0f (%.0f-%.0f)" % (t, "" if t == "1" else "s", peak_med[t], min(peak[t]), max(peak[t]))
                for t in sorted(peak)))
print()
print("| m x k x n | threads | " + " | ".join(libs) + " | lora / best BLAS | best / FMA peak |")
print("|---|---|" + "---|" * (len(libs) + 2))
rows = []
for s, t in keys:
    best = max((med((l, s, t)) for l in blas if (l, s, t) in runs), default=None)
    ours = med(("lora", s, t))
    ratio = "%.2f" % (ours / best) if best and ours else "-"
    frac = "%.2f" % (best / peak_med[t]) if best and t in peak_med else "-"
    print("| %s | %s | %s | %s | %s |" % (s, t, " | ".join(cell((l, s, t)) for l in libs), ratio, frac))
    rows.append({"shape": s, "threads": int(t), **{l: med((l, s, t)) for l in libs + ["lora_fwd", "lora_step"]},
                 "best_blas": best})
print()
print("| m x k x n, r | threads | LoRA fwd GFLOP/s | fwd / best dense (theory) | fwd / FMA peak | "
      "train step GFLOP/s | step / best dense | step / FMA peak |")
print("|---|---|---|---|---|---|---|---|")
for s, t in keys:
    best_dense = max((med((l, s, t)) for l in ("lora",) + blas if (l, s, t) in runs), default=None)
    fwd, step = med(("lora_fwd", s, t)), med(("lora_step", s, t))
    if not best_dense or not fwd:
        continue
    m, k, n = [int(v) for v in s.split(" x ")]
    r = RANK.get(s, 16)
    theory = 1 + r * (k + n) / (k * n)
    p = peak_med.get(t)
    print("| %s, r %d | %s | %s | %.3f (%.3f) | %s | %s | %s | %s |" % (
        s, r, t, cell(("lora_fwd", s, t)), best_dense / fwd, theory, "%.2f" % (fwd / p) if p else "-",
        cell(("lora_step", s, t)), "%.3f" % (2 * best_dense / step) if step else "-",
        "%.2f" % (step / p) if p and step else "-"))
if json_out:
    with open(json_out, "w") as f:
        json.dump({"peak": peak_med, "rows": rows, "runs": {"|".join(k): v for k, v in runs.items()}}, f, indent=1)
