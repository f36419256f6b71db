#!/usr/bin/python3
"""Runs the LoRA benchmark suite and the PyTorch comparison, alternating case by case, and prints
medians and ratios. Used by scripts/bench.sh; see the README's Performance section.

  bench/run.py --eigen BUILD/bench/bench_lora --blas BUILD-BLAS/bench/bench_lora [--quick] [--out DIR]
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

MAIN = [(1, 4096, 4096, 16), (8, 4096, 4096, 16), (512, 768, 768, 8), (1024, 1024, 1024, 16),
        (2048, 4096, 4096, 16), (512, 4096, 11008, 64)]
NAMES = {MAIN[0]: "decode n=1", MAIN[1]: "decode n=8", MAIN[2]: "bert-base", MAIN[3]: "bert-large",
         MAIN[4]: "llama-attn", MAIN[5]: "llama-mlp"}
SWEEP = [(256, 4096, 4096, r) for r in (1, 2, 4, 8, 16, 32, 64)] + \
        [(n, 4096, 4096, 16) for n in (2, 4, 16, 32, 64, 128, 256, 1024)]
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "4000000000",
          "MALLOC_TOP_PAD_": "100000000"}
OMP_WAIT = "PASSIVE"  # idle OpenMP threads sleep instead of spinning: see the README (shared machines)
HERE = os.path.dirname(os.path.abspath(__file__))


def has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "OPENBLAS_", "MALLOC_", "GOMP_"))}
    if has_avx512():  # Debian's OpenBLAS picks its AVX2 kernels on AVX-512 CPUs it does not know
        env["OPENBLAS_CORETYPE"] = "SkylakeX"
    return env


def case_key(c):
    return "n:%d/in:%d/out:%d/r:%d" % c


def run_lib(binary, backend, c, threads, scalars, reps, log):
    pattern = "/(%s)/%s/threads:%d/" % ("|".join(scalars), case_key(c), threads)
    cmd = [binary, "--benchmark_filter=" + pattern, "--benchmark_repetitions=%d" % reps,
           "--benchmark_enable_random_interleaving=true", "--benchmark_report_aggregates_only=true",
           "--benchmark_min_time=0.05", "--benchmark_format=json"]
    env = clean_env()
    if OMP_WAIT:
        env["OMP_WAIT_POLICY"] = OMP_WAIT
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    rows = []
    for b in data["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        op, scalar = b["run_name"].split("/")[:2]
        rows.append({"src": "lib-" + backend, "op": op, "scalar": scalar, "case": c, "threads": threads,
                     "ms": b["real_time"] if b["time_unit"] == "ms" else b["real_time"] / 1e6,
                     "cv": None})
    log.append({"lib": backend, "context": data.get("context")})
    return rows


def run_torch(config, c, threads, budget):
    env = clean_env()
    args = [sys.executable if sys.executable else "/usr/bin/python3", os.path.join(HERE, "compare_pytorch.py"),
            "--case", "%d,%d,%d,%d" % c, "--config", config, "--budget", str(budget)]
    if config == "best":
        env.update(MALLOC)
        env["OPENBLAS_NUM_THREADS"] = str(threads)
        args += ["--threads", "1"]  # its elementwise ops are slow with 2; its products use OpenBLAS's threads
    res = subprocess.run(args + ["--show-config"], env=env, capture_output=True, text=True, check=True).stdout
    rows, info = [], None
    for line in res.splitlines():
        d = json.loads(line)
        if "torch_config" in d:
            info = d
            continue
        rows.append({"src": "torch-" + config, "op": d["op"], "scalar": "f32", "case": c, "threads": threads,
                     "ms": d["median_ms"], "cv": None})
    return rows, info


def get(rows, src, op, c, threads, scalar="f32"):
    for r in rows:
        if r["src"] == src and r["op"] == op and r["case"] == c and r["threads"] == threads and r["scalar"] == scalar:
            return r["ms"]
    return None


def fmt(x, nd=2):
    return "-" if x is None else ("%.*f" % (nd, x))


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def gflops(c, ms, factor=2.0):
    n, fin, fout, _ = c
    return None if ms is None else factor * n * fin * fout / (ms * 1e-3) / 1e9


def print_lib_table(rows, backends, thread_list, scalars, cases, out):
    out.append("\n## Library: medians (ms) and ratios to the dense forward of the same run\n")
    out.append("| case | backend | scalar | threads | dense fwd ms | dense GFLOP/s | lora fwd / dense | merged / dense | "
               "backward / dense | train step / dense | merge / rmw | unmerge / rmw | lora fwd GFLOP/s | "
               "train GFLOP/s |")
    out.append("|" + "---|" * 14)
    for c in cases:
        for be in backends:
            for s in scalars:
                for t in thread_list:
                    src = "lib-" + be
                    d = get(rows, src, "dense_fwd", c, t, s)
                    if d is None:
                        continue
                    rmw = get(rows, src, "rmw", c, t, s)
                    lf = get(rows, src, "lora_fwd", c, t, s)
                    tr = get(rows, src, "train_step", c, t, s)
                    out.append("| %s | %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                        NAMES.get(c, "%dx%dx%d r%d" % c), be, s, t, fmt(d, 3), fmt(gflops(c, d), 0),
                        fmt(ratio(lf, d), 3), fmt(ratio(get(rows, src, "merged_fwd", c, t, s), d), 3),
                        fmt(ratio(get(rows, src, "backward", c, t, s), d), 3), fmt(ratio(tr, d), 3),
                        fmt(ratio(get(rows, src, "merge", c, t, s), rmw)),
                        fmt(ratio(get(rows, src, "unmerge", c, t, s), rmw)), fmt(gflops(c, lf), 0),
                        fmt(gflops(c, tr, 4.0), 0)))


def best_lib(rows, op, c, t):
    vals = [v for v in (get(rows, "lib-eigen", op, c, t), get(rows, "lib-blas", op, c, t)) if v is not None]
    return min(vals) if vals else None


def print_torch_table(rows, thread_list, cases, out):
    out.append("\n## Side by side with PyTorch (f32, medians in ms; speed-up = PyTorch time / library time)\n")
    out.append("| case | threads | op | lib Eigen | lib BLAS | PyTorch best | PyTorch default | "
               "PyTorch best / lib | PyTorch default / lib | PyTorch op / its dense fwd |")
    out.append("|" + "---|" * 10)
    for c in cases:
        for t in thread_list:
            for op in ("dense_fwd", "lora_fwd", "train_step"):
                tb = get(rows, "torch-best", op, c, t)
                if tb is None:
                    continue
                lib = best_lib(rows, op, c, t)
                td = get(rows, "torch-default", op, c, t)
                out.append("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    NAMES.get(c, "%dx%dx%d r%d" % c), t, op, fmt(get(rows, "lib-eigen", op, c, t), 3),
                    fmt(get(rows, "lib-blas", op, c, t), 3), fmt(tb, 3), fmt(td, 3), fmt(ratio(tb, lib)),
                    fmt(ratio(td, lib)), fmt(ratio(tb, get(rows, "torch-best", "dense_fwd", c, t)))))


def targets(rows, out):
    """Every target of the issue, with the measured ratio (2 threads, f32 unless said)."""
    out.append("\n## Targets (2 threads, f32; best of the Eigen and BLAS builds unless a backend is named)\n")
    out.append("| target | case | measured | met |")
    out.append("|---|---|---|---|")

    def line(name, c, value, ok_fn, label=None):
        ok = None if value is None else ok_fn(value)
        out.append("| %s | %s | %s | %s |" % (name, label or NAMES.get(c, "%dx%dx%d r%d" % c), fmt(value, 3),
                                             "-" if ok is None else ("yes" if ok else "no")))

    def per_backend(op, c, t=2, s="f32"):
        best = None
        for be in ("eigen", "blas"):
            d, v = get(rows, "lib-" + be, "dense_fwd", c, t, s), get(rows, "lib-" + be, op, c, t, s)
            r = ratio(v, d)
            if r is not None and (best is None or r < best):
                best = r
        return best

    for c in MAIN + SWEEP:
        n, fin, fout, r = c
        if r <= 16 and n >= 128 and fin >= 1024 and fout >= 1024:
            line("unmerged fwd <= 1.03 x dense (theory %.4f)" % (1 + r * (fin + fout) / (fin * fout)), c,
                 per_backend("lora_fwd", c), lambda v: v <= 1.03)
    for c in MAIN:
        line("merged fwd <= 1.01 x dense", c, per_backend("merged_fwd", c), lambda v: v <= 1.01)
    for c in MAIN:
        line("train step <= 2.1 x dense fwd", c, per_backend("train_step", c), lambda v: v <= 2.1)
    for c in MAIN:
        for op in ("merge", "unmerge"):
            vals = [ratio(get(rows, "lib-" + be, op, c, 2), get(rows, "lib-" + be, "rmw", c, 2)) for be in ("eigen", "blas")]
            vals = [v for v in vals if v is not None]
            line("%s <= 1.5 x one RMW pass over W0" % op, c, min(vals) if vals else None, lambda v: v <= 1.5)
    c = MAIN[0]
    for be in ("eigen", "blas"):
        line("n = 1 uses both cores: t1 / t2 >= 1.6 (%s)" % be, c,
             ratio(get(rows, "lib-" + be, "lora_fwd", c, 1), get(rows, "lib-" + be, "lora_fwd", c, 2)), lambda v: v >= 1.6)
    for c in (MAIN[4], MAIN[5]):
        for op in ("lora_fwd", "train_step"):
            for be in ("eigen", "blas"):
                line("2 threads >= 1.7 x 1 thread, %s (%s)" % (op, be), c,
                     ratio(get(rows, "lib-" + be, op, c, 1), get(rows, "lib-" + be, op, c, 2)), lambda v: v >= 1.7)
    for c in MAIN + SWEEP:
        if c[0] < 128:
            continue
        for op in ("lora_fwd", "train_step"):
            line("as fast as PyTorch best: %s (PyTorch / lib >= 1)" % op, c,
                 ratio(get(rows, "torch-best", op, c, 2), best_lib(rows, op, c, 2)), lambda v: v >= 1.0)
    for c in (MAIN[2], MAIN[3]):
        line("train step >= 1.3 x faster than PyTorch best", c,
             ratio(get(rows, "torch-best", "train_step", c, 2), best_lib(rows, "train_step", c, 2)), lambda v: v >= 1.3)
    for c in MAIN:
        for op in ("lora_fwd", "train_step"):
            line(">= 2 x faster than PyTorch default: %s" % op, c,
                 ratio(get(rows, "torch-default", op, c, 2), best_lib(rows, op, c, 2)), lambda v: v >= 2.0)
    # Dense-equivalent throughput against the best dense sgemm measured in this run.
    sgemm = max([gflops(c, get(rows, "lib-" + be, "dense_fwd", c, 2)) or 0 for c in MAIN for be in ("eigen", "blas")] +
                [gflops(c, get(rows, "torch-best", "dense_fwd", c, 2)) or 0 for c in MAIN])
    out.append("| best dense sgemm in this run (GFLOP/s) | all | %.0f | |" % sgemm)
    for c in (MAIN[3], MAIN[4], MAIN[5]):
        for be in ("eigen", "blas"):
            lf = gflops(c, get(rows, "lib-" + be, "lora_fwd", c, 2))
            tr = gflops(c, get(rows, "lib-" + be, "train_step", c, 2), 4.0)
            line("LoRA fwd GFLOP/s / best sgemm >= 0.9 (%s)" % be, c, ratio(lf, sgemm), lambda v: v >= 0.9)
            line("train step GFLOP/s / best sgemm >= 0.9 (%s)" % be, c, ratio(tr, sgemm), lambda v: v >= 0.9)


def svg_plot(rows, path):
    """Grouped bars: dense-equivalent GFLOP/s of the forward and the training step, 2 threads, f32."""
    series = [("lib Eigen fwd", "lib-eigen", "lora_fwd", 2.0, "#4878d0"), ("lib BLAS fwd", "lib-blas", "lora_fwd", 2.0, "#1f3d7a"),
              ("PyTorch best fwd", "torch-best", "lora_fwd", 2.0, "#ee854a"),
              ("lib Eigen train", "lib-eigen", "train_step", 4.0, "#6acc64"), ("lib BLAS train", "lib-blas", "train_step", 4.0, "#2e7d32"),
              ("PyTorch best train", "torch-best", "train_step", 4.0, "#d65f5f")]
    cases = MAIN
    vals = [[gflops(c, get(rows, src, op, c, 2), f) or 0 for (_, src, op, f, _) in series] for c in cases]
    vmax = max([max(v) for v in vals] + [1])
    W, H, left, bottom, top = 920, 380, 60, 60, 30
    gw = (W - left - 20) / len(cases)
    bw = gw * 0.8 / len(series)
    parts = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">' % (W, H),
             '<rect width="100%" height="100%" fill="white"/>',
             '<text x="%d" y="18" font-size="13">Dense-equivalent GFLOP/s, f32, 2 threads (higher is better)</text>' % left]
    ph = H - bottom - top
    for k in range(5):
        v = vmax * k / 4
        y = H - bottom - ph * k / 4
        parts.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#ddd"/>' % (left, W - 20, y, y))
        parts.append('<text x="%d" y="%.1f" text-anchor="end">%.0f</text>' % (left - 5, y + 4, v))
    for i, c in enumerate(cases):
        x0 = left + i * gw + gw * 0.1
        for j, s in enumerate(series):
            h = ph * vals[i][j] / vmax
            parts.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>' % (
                x0 + j * bw, H - bottom - h, bw - 1, h, s[4]))
        parts.append('<text x="%.1f" y="%d" text-anchor="middle">%s</text>' % (left + i * gw + gw / 2, H - bottom + 15, NAMES[c]))
        parts.append('<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%dx%dx%d r%d</text>' % (
            left + i * gw + gw / 2, H - bottom + 28, *c))
    for j, s in enumerate(series):
        x = left + (j % 3) * 200
        y = H - 14 + (j // 3) * 0 - (12 if j < 3 else 0)
        parts.append('<rect x="%d" y="%d" width="10" height="10" fill="%s"/><text x="%d" y="%d">%s</text>' % (
            x, y - 9, s[4], x + 14, y, s[0]))
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eigen", help="bench_lora of the default (Eigen-only) build")
    ap.add_argument("--report", help="print the tables of an earlier results.json instead of running")
    ap.add_argument("--blas", help="bench_lora of the LORA_USE_BLAS build")
    ap.add_argument("--memory", help="bench_memory binary")
    ap.add_argument("--quick", action="store_true", help="f32 main cases only, fewer repetitions")
    ap.add_argument("--no-sweeps", action="store_true")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for the library runs ('' leaves the OpenMP default)")
    ap.add_argument("--only", help="run only the main cases whose name contains this (e.g. bert)")
    ap.add_argument("--out", default="build/bench-results")
    ap.add_argument("--plot", help="write the SVG plot here")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    global OMP_WAIT
    OMP_WAIT = args.omp_wait_policy
    if not args.report and not args.eigen:
        ap.error("--eigen is required unless --report is given")
    reps = 3 if args.quick else args.reps
    scalars = ["f32"] if args.quick else ["f32", "f64"]
    backends = [("eigen", args.eigen)] + ([("blas", args.blas)] if args.blas or args.report else [])
    rows, log, torch_info = [], [], {}
    t_start = time.time()
    loads = [load_average()]
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        rows, torch_info, loads = saved["rows"], saved["torch"], saved.get("loads", [float("nan")])
        t_start = time.time() - saved.get("elapsed_s", 0)
        for r in rows:
            r["case"] = tuple(r["case"])
        plan = []
    else:
        plan = [(c, t) for t in (2, 1) for c in MAIN]
    if not args.quick and not args.no_sweeps and not args.only and not args.report:
        plan += [(c, 2) for c in SWEEP]
    if args.only:
        plan = [(c, t) for c, t in plan if args.only in NAMES[c]]
    for c, t in plan:
        sc = scalars if c in MAIN else ["f32"]
        for be, binary in backends:
            rows += run_lib(binary, be, c, t, sc, reps, log)
        if not args.no_torch:
            budget = 0.5 if args.quick else 1.0
            r, info = run_torch("best", c, t, budget)
            rows += r
            torch_info["best"] = info
            if t == 2 and c in MAIN:
                r, info = run_torch("default", c, t, budget)
                rows += r
                torch_info["default"] = info
        loads.append(load_average())
        print("[%4.0fs] %s threads=%d done" % (time.time() - t_start, NAMES.get(c, case_key(c)), t), file=sys.stderr)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"rows": rows, "torch": torch_info, "lib": log[:2], "loads": loads,
                       "elapsed_s": time.time() - t_start}, f, indent=1)

    out = []
    out.append("# LoRA benchmark results")
    out.append("machine: %s, %d logical CPUs, %s; AVX-512: %s" % (
        platform.processor() or platform.machine(), os.cpu_count(), cpu_model(), "yes" if has_avx512() else "no"))
    out.append("library threads set per benchmark (omp_set_num_threads, Eigen::setNbThreads, openblas_set_num_threads), "
               "OMP_WAIT_POLICY=%s; " % (OMP_WAIT or "default") +
               "PyTorch best = torch.set_num_threads(1), OPENBLAS_NUM_THREADS=<threads>, malloc thresholds; "
               "default = no settings")
    if "best" in torch_info and torch_info["best"]:
        out.append("PyTorch %s; torch.__config__.show() saved in results.json" % torch_info["best"]["torch_version"])
    out.append("load average (1 min) during the run, other work included: %.1f .. %.1f (median %.1f); "
               "elapsed %.0f min" % (min(loads), max(loads), statistics.median(loads), (time.time() - t_start) / 60))
    thread_list = [2, 1]
    print_lib_table(rows, [b for b, _ in backends], thread_list, scalars, MAIN, out)
    if any(r["case"] in SWEEP and r["case"] not in MAIN for r in rows):
        out.append("\n### Sweeps (f32, 2 threads)")
        print_lib_table(rows, [b for b, _ in backends], [2], ["f32"], SWEEP, out)
    if not args.no_torch:
        print_torch_table(rows, thread_list, MAIN + SWEEP, out)
    targets(rows, out)
    if args.memory:
        out.append("\n## Memory: one 4096 x 4096 layer, batch 512, Adam (f32)\n")
        out.append("| mode | trainable | optimizer state | peak RSS |")
        out.append("|---|---|---|---|")
        for mode in ("lora", "full"):
            d = json.loads(subprocess.run([args.memory, mode], capture_output=True, text=True, check=True).stdout)
            out.append("| %s | %d | %.2f MiB | %.1f MiB |" % (mode, d["trainable"], d["optimizer_state_bytes"] / 2**20,
                                                           d["peak_rss_kib"] / 1024))
        out.append("\n## Memory: the toy classifier (examples/finetune_classifier), AdamW, batch 128, 2 epochs (f32)\n")
        out.append("| mode | trainable | base | optimizer state | peak RSS, training | peak RSS, with the 4,000-row evaluation |")
        out.append("|---|---|---|---|---|---|")
        for mode in ("classifier-lora", "classifier-lora-nf4", "classifier-lora-int8", "classifier-full"):
            d = json.loads(subprocess.run([args.memory, mode], capture_output=True, text=True, check=True).stdout)
            out.append("| %s | %d | %.2f MiB | %.2f MiB | %.1f MiB | %.1f MiB |" % (
                mode, d["trainable"], d["base_bytes"] / 2**20, d["optimizer_state_bytes"] / 2**20,
                d["peak_rss_kib"] / 1024, d["peak_rss_with_eval_kib"] / 1024))
    text = "\n".join(out)
    print(text)
    with open(os.path.join(args.out, "report.md" if args.report else "results.md"), "w") as f:
        f.write(text + "\n")
    if args.plot:
        svg_plot(rows, args.plot)


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return float("nan")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    main()
