#!/usr/bin/env python3
"""Runs bench/digits_mlp builds at 1 and 2 threads, without and with `stress-ng --cpu N` beside them,
interleaved round by round, and prints the medians (docs/threads.md).

  bench/threads_table.py --bin after=build/bench-eigen/bench/digits_mlp [--bin before=...] [--rounds 5]
                         [--epochs 20] [--stress-cpus 1] [--env OMP_WAIT_POLICY=passive] [--args '--hidden 512']

Needs stress-ng (scripts/ensure-packages.sh stress-ng). "busy" is the share of both CPUs used by other processes in the second before each run (from /proc/stat,
with no run of ours going), so a quiet machine can be told from a busy one.
"""
import argparse
import os
import re
import statistics
import subprocess
import time


def cpu_times():
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total


def busy_share(seconds=1.0):
    i0, t0 = cpu_times()
    time.sleep(seconds)
    i1, t1 = cpu_times()
    return 100.0 * (1 - (i1 - i0) / max(1, t1 - t0))


def run(binary, threads, epochs, env, extra):
    out = subprocess.run([binary, "--threads", str(threads), "--repeat", "1", "--epochs", str(epochs)] + extra,
                         capture_output=True, text=True, check=True, env=env).stdout
    m = re.search(r"MLP ([0-9.]+) s, LoRA ([0-9.]+) s \(medians", out)
    return float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", action="append", required=True, help="label=path of a digits_mlp build")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--stress-cpus", type=int, default=1)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for the runs")
    ap.add_argument("--loads", default="idle,loaded")  # idle: no stress-ng (other jobs may run)
    ap.add_argument("--args", default="", help="more arguments for digits_mlp, e.g. '--hidden 1024 --batch 128'")
    args = ap.parse_args()
    bins = [b.split("=", 1) for b in args.bin]
    env = dict(os.environ)
    for e in args.env:
        k, v = e.split("=", 1)
        env[k] = v
    loads = args.loads.split(",")
    results = {}  # (label, load, threads) -> [(mlp, lora, busy)]
    for r in range(args.rounds):
        for load in loads:
            stress = None
            if load == "loaded":
                stress = subprocess.Popen(["stress-ng", "--cpu", str(args.stress_cpus), "--quiet"])
                time.sleep(1)
            try:
                for label, path in bins:
                    for threads in (1, 2):
                        busy = busy_share()
                        mlp, lora = run(path, threads, args.epochs, env, args.args.split())
                        results.setdefault((label, load, threads), []).append((mlp, lora, busy))
                        print(f"round {r + 1} {label:8s} {load:6s} {threads} threads: MLP {mlp:7.3f} s  "
                              f"LoRA {lora:7.3f} s  (busy before {busy:3.0f} %)", flush=True)
            finally:
                if stress:
                    stress.terminate()
                    stress.wait()
    print(f"\nmedians of {args.rounds} rounds, {args.epochs} epochs each; busy = CPU share of other processes "
          f"before the run (median, min-max); loaded = stress-ng --cpu {args.stress_cpus} beside it")
    print("| build | load | threads | MLP training s | LoRA training s | busy % |")
    print("|---|---|---|---:|---:|---|")
    for (label, load, threads), rows in results.items():
        mlp = statistics.median(x[0] for x in rows)
        lora = statistics.median(x[1] for x in rows)
        busy = [x[2] for x in rows]
        print(f"| {label} | {load} | {threads} | {mlp:.2f} ({min(x[0] for x in rows):.2f}-{max(x[0] for x in rows):.2f}) "
              f"| {lora:.2f} ({min(x[1] for x in rows):.2f}-{max(x[1] for x in rows):.2f}) "
              f"| {statistics.median(busy):.0f} ({min(busy):.0f}-{max(busy):.0f}) |")


if __name__ == "__main__":
    main()
