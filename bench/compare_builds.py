#!/usr/bin/python3
"""Runs two bench_lora binaries (say, before and after a change) interleaved, case by case and round by
round, and prints each one's ratios to its own dense forward and the time ratio after / before.

  bench/compare_builds.py BEFORE/bench_lora AFTER/bench_lora [--rounds 3] [--threads 2] [--cases bert-base,...]
"""
import argparse
import json
import os
import statistics
import subprocess

CASES = {"decode n=1": (1, 4096, 4096, 16), "decode n=8": (8, 4096, 4096, 16), "bert-base": (512, 768, 768, 8),
         "bert-large": (1024, 1024, 1024, 16), "llama-attn": (2048, 4096, 4096, 16),
         "llama-mlp": (512, 4096, 11008, 64)}
OPS = ["dense_fwd", "lora_fwd", "merged_fwd", "backward", "train_step", "merge", "unmerge"]


def run(binary, case, threads):
    n, i, o, r = case
    pattern = "^(%s)/f32/n:%d/in:%d/out:%d/r:%d/threads:%d/" % ("|".join(OPS), n, i, o, r, threads)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "OPENBLAS_", "GOMP_"))}
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    out = subprocess.run([binary, "--benchmark_filter=" + pattern, "--benchmark_min_time=0.05",
                          "--benchmark_repetitions=3", "--benchmark_report_aggregates_only=true",
                          "--benchmark_format=json"], env=env, capture_output=True, text=True, check=True).stdout
    times = {}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") == "median":
            times[b["run_name"].split("/")[0]] = b["real_time"]
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="decode n=1,decode n=8,bert-base,bert-large,llama-attn")
    args = ap.parse_args()
    names = [c.strip() for c in args.cases.split(",")]
    samples = {(b, c): {} for b in ("before", "after") for c in names}
    for _ in range(args.rounds):
        for c in names:
            for label, binary in (("before", args.before), ("after", args.after)):
                for op, t in run(binary, CASES[c], args.threads).items():
                    samples[(label, c)].setdefault(op, []).append(t)
    print("f32, %d threads, medians of %d interleaved rounds (each a median of 3 repetitions)" %
          (args.threads, args.rounds))
    print("| case | op | before / dense | after / dense | after / before (time) |")
    print("|---|---|---|---|---|")
    for c in names:
        med = {b: {op: statistics.median(v) for op, v in samples[(b, c)].items()} for b in ("before", "after")}
        for op in OPS:
            if op not in med["before"] or op not in med["after"]:
                continue
            rb = med["before"][op] / med["before"]["dense_fwd"]
            ra = med["after"][op] / med["after"]["dense_fwd"]
            print("| %s | %s | %.3f | %.3f | %.3f |" % (c, op, rb, ra, med["after"][op] / med["before"][op]))


if __name__ == "__main__":
    main()
