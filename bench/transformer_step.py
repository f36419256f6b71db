#!/usr/bin/python3
"""One training step of finetune_transformer's BERT (and the MiniLM shape), this library against PyTorch.

  bench/transformer_step.py [--bin build/bench-tf/bench/bench_transformer] [--rounds 2] [--budget 3]
                            [--out build/bench-results/transformer.md] [--quick]

Builds nothing: runs bench/bench_transformer (C++) and bench/transformer_pytorch.py, one process per
(shape, mode, threads, configuration), alternating the two implementations inside every (shape, mode)
block, --rounds times over. Each process warms up (3 steps) and reports the median of its per-step times;
a cell of the table is the median over rounds of those medians (the range over rounds beside it).
Thread settings (bench/run.py's conventions): the library with lora::set_num_threads(t) and
OMP_WAIT_POLICY=PASSIVE; PyTorch with torch.set_num_threads(1) and OPENBLAS_NUM_THREADS=t (the best
configuration of ../shared/PERFORMANCE.md), at t = 2 also with torch.set_num_threads(2), and at t = 1
also without the malloc settings (its default allocator); "PyTorch best" is the fastest of these per
cell. PyTorch's matrix products go through libblas.so.3: --openblas DIR puts OpenBLAS's libblas.so.3 first
(LD_LIBRARY_PATH), since Debian's default alternative may be the reference BLAS.
Peak memory: getrusage's ru_maxrss of the 1-thread processes (each does one mode: warm-up + the timed
steps), and the same minus the high-water mark read before the model was built (for PyTorch: after
`import torch`). Writes the tables to --out (markdown) and a JSON file beside it, and prints them.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from run import MALLOC, OMP_WAIT, clean_env, cpu_model, fmt  # noqa: E402  (the suite's thread and allocator conventions)

SHAPES = {"char": "finetune_transformer's char BERT: hidden 96, 2 layers, 4 heads, ff 384, vocab 100; batch 64, len 5..15",
          "minilm": "MiniLM-L6 shape: hidden 384, 6 layers, 12 heads, ff 1536, vocab 30522; batch 32, len 4..12"}
MODES = ("lora", "full")
OPENBLAS_DIRS = ["/usr/lib/x86_64-linux-gnu/openblas-pthread",
                 os.path.join(ROOT, "build/bench-tf/openblas/root/usr/lib/x86_64-linux-gnu/openblas-pthread")]


def torch_configs(t):
    """(label, torch.set_num_threads, OPENBLAS_NUM_THREADS, malloc settings) tried at t threads."""
    cfgs = [("torch1-ob%d" % t, 1, t, True)]
    if t == 2:
        cfgs.append(("torch2-ob2", 2, 2, True))
    if t == 1:
        cfgs.append(("torch1-ob1-glibc", 1, 1, False))
    return cfgs


def run_json(cmd, env):
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write("failed: %s\n%s\n" % (" ".join(cmd), res.stderr[-2000:]))
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_ours(binary, shape, mode, t, args):
    env = clean_env()
    env["OMP_WAIT_POLICY"] = OMP_WAIT
    cmd = [binary, "--shape", shape, "--mode", mode, "--threads", str(t), "--budget", str(args.budget),
           "--min-steps", str(args.min_steps)]
    d = run_json(cmd, env)
    if d:
        d["config"] = "lora.hpp"
    return d


def run_torch(label, torch_threads, ob_threads, malloc, shape, mode, args):
    # torch.set_num_threads(2) runs 10-20x slower here (its elementwise ops, PERFORMANCE.md): 3 steps do.
    min_steps = args.min_steps if torch_threads == 1 else min(3, args.min_steps)
    env = clean_env()
    if malloc:
        env.update(MALLOC)
    env["OPENBLAS_NUM_THREADS"] = str(ob_threads)
    if args.openblas:
        env["LD_LIBRARY_PATH"] = args.openblas + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    cmd = ["/usr/bin/python3", os.path.join(HERE, "transformer_pytorch.py"), "--shape", shape, "--mode", mode,
           "--threads", str(torch_threads), "--config", label, "--budget", str(args.budget),
           "--min-steps", str(min_steps)]
    return run_json(cmd, env)


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def mib(kib):
    return None if kib is None else kib / 1024.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "build/bench-tf/bench/bench_transformer"))
    ap.add_argument("--openblas", default=None, help="directory with OpenBLAS's libblas.so.3 (default: found)")
    ap.add_argument("--shapes", default="char,minilm")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timed steps per process")
    ap.add_argument("--min-steps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="char shape, 1 round, 1 s per process")
    ap.add_argument("--out", default=os.path.join(ROOT, "build/bench-results/transformer.md"))
    args = ap.parse_args()
    if args.quick:
        args.shapes, args.rounds, args.budget = "char", 1, 1.0
    if args.openblas is None:
        args.openblas = next((d for d in OPENBLAS_DIRS if os.path.exists(os.path.join(d, "libblas.so.3"))), "")
    shapes = args.shapes.split(",")
    thread_list = [int(t) for t in args.threads.split(",")]
    if not os.path.exists(args.bin):
        sys.exit("no %s: cmake --build build/bench-tf -j1 --target bench_transformer" % args.bin)

    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_start = loadavg()
    results = []  # every process's JSON, with "round"
    for rnd in range(args.rounds):
        for shape in shapes:
            for mode in MODES:
                for t in thread_list:
                    # Alternate: ours, PyTorch's configurations, in an order that flips every round.
                    jobs = [("ours", None)] + [("torch", c) for c in torch_configs(t)]
                    if rnd % 2:
                        jobs.reverse()
                    for kind, c in jobs:
                        d = run_ours(args.bin, shape, mode, t, args) if kind == "ours" else \
                            run_torch(c[0], c[1], c[2], c[3], shape, mode, args)
                        if d is None:
                            continue
                        d["round"], d["t"] = rnd, t
                        results.append(d)
                        sys.stderr.write("round %d %-6s %-4s t%d %-18s %9.3f ms (%d steps)  load %s\n" % (
                            rnd, shape, mode, t, d["config"], d["median_ms"], d["steps"], loadavg()))
    load_end = loadavg()

    def cell(shape, mode, t, config, key="median_ms"):
        vals = [r[key] for r in results if r["shape"] == shape and r["mode"] == mode and r["t"] == t
                and r["config"] == config]
        return (statistics.median(vals), min(vals), max(vals)) if vals else (None, None, None)

    def first(shape, mode, config, t=1):
        for r in results:
            if r["shape"] == shape and r["mode"] == mode and r["config"] == config and r["t"] == t:
                return r
        return None

    out = []
    out.append("# One training step: lora.hpp vs PyTorch (f32)\n")
    out.append("Started %s; %s; load average %s at the start, %s at the end; %d round(s), %.1f s of timed steps "
               "per process (at least %d steps), 3 warm-up steps. PyTorch %s, BLAS for PyTorch: %s.\n" % (
                   started, cpu_model(), load_start, load_end, args.rounds, args.budget, args.min_steps,
                   next((r.get("torch_version") for r in results if r["impl"] == "pytorch"), "?"),
                   (args.openblas + "/libblas.so.3 (OpenBLAS)") if args.openblas else "the system's libblas.so.3"))
    for s in shapes:
        out.append("- `%s`: %s" % (s, SHAPES[s]))
    out.append("\n## Same model on both sides: parameter counts\n")
    out.append("| shape | mode | lora.hpp parameters | trainable | tensors | PyTorch parameters | trainable | tensors "
               "| token rows | same? |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for s in shapes:
        for m in MODES:
            a = next((r for r in results if r["shape"] == s and r["mode"] == m and r["impl"] == "lora.hpp"), None)
            b = next((r for r in results if r["shape"] == s and r["mode"] == m and r["impl"] == "pytorch"), None)
            if not a or not b:
                continue
            same = all(a[k] == b[k] for k in ("parameters", "trainable", "tensors", "rows"))
            out.append("| %s | %s | {:,} | {:,} | %d | {:,} | {:,} | %d | %d | %s |".format(
                a["parameters"], a["trainable"], b["parameters"], b["trainable"]) % (
                    s, m, a["tensors"], b["tensors"], a["rows"], "yes" if same else "**no**"))

    out.append("\n## Step time (median ms; [min-max over rounds]); ratio = PyTorch / lora.hpp (> 1: lora.hpp faster)\n")
    out.append("| shape | mode | threads | lora.hpp | fwd / bwd / opt | PyTorch set_num_threads(1), OpenBLAS t "
               "| PyTorch set_num_threads(2) | PyTorch 1 thread, glibc malloc | PyTorch best | its fwd / bwd / opt "
               "| best / lora.hpp |")
    out.append("|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|")
    ratios = []
    for s in shapes:
        for m in MODES:
            for t in thread_list:
                ours, lo, hi = cell(s, m, t, "lora.hpp")
                if ours is None:
                    continue
                phases = "/".join(fmt(cell(s, m, t, "lora.hpp", k)[0], 1) for k in ("fwd_ms", "bwd_ms", "opt_ms"))
                cols, best, best_cfg = [], None, None
                for label in ("torch1-ob%d" % t, "torch2-ob2", "torch1-ob1-glibc"):
                    v, vlo, vhi = cell(s, m, t, label)
                    if v is None:
                        cols.append("-")
                        continue
                    cols.append("%s [%s-%s]" % (fmt(v), fmt(vlo), fmt(vhi)))
                    if best is None or v < best:
                        best, best_cfg = v, label
                tphases = "/".join(fmt(cell(s, m, t, best_cfg, k)[0], 1) for k in ("fwd_ms", "bwd_ms", "opt_ms"))
                ratio = best / ours if best and ours else None
                ratios.append({"shape": s, "mode": m, "threads": t, "ours_ms": ours, "torch_best_ms": best,
                               "torch_best_config": best_cfg, "ratio": ratio})
                out.append("| %s | %s | %d | %s [%s-%s] | %s | %s | %s | %s | %s (%s) | %s | **%s** |" % (
                    s, m, t, fmt(ours), fmt(lo), fmt(hi), phases, cols[0], cols[1], cols[2], fmt(best), best_cfg,
                    tphases, fmt(ratio)))

    out.append("\n## Peak memory (1-thread processes, one mode each; MiB)\n")
    out.append("| shape | implementation | mode | peak RSS | RSS before the model | peak - before | optimizer state "
               "| LoRA / full, peak | LoRA / full, peak - before |")
    out.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for s in shapes:
        for impl, config in (("lora.hpp", "lora.hpp"), ("PyTorch (malloc settings)", "torch1-ob1"),
                             ("PyTorch (glibc default)", "torch1-ob1-glibc")):
            rows = {m: first(s, m, config) for m in MODES}
            for m in MODES:
                r = rows[m]
                if r is None:
                    continue
                peak, before = r["peak_rss_kib"], r["rss_before_kib"]
                lf = rf = None
                if m == "lora" and rows["full"]:
                    f = rows["full"]
                    lf = peak / f["peak_rss_kib"]
                    rf = (peak - before) / (f["peak_rss_kib"] - f["rss_before_kib"])
                out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    s, impl, m, fmt(mib(peak), 1), fmt(mib(before), 1), fmt(mib(peak - before), 1),
                    fmt(r["optimizer_state_bytes"] / 2**20, 2), fmt(lf, 3), fmt(rf, 3)))
    text = "\n".join(out) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump({"started": started, "load": [load_start, load_end], "cpu": cpu_model(), "openblas": args.openblas,
                   "ratios": ratios, "processes": results}, f, indent=1)


if __name__ == "__main__":
    main()
