#!/usr/bin/python3
"""The same LoRA layer in PyTorch, written as PEFT writes it, timed on the benchmark cases.

    y = base(x) + lora_B(lora_A(dropout(x))) * scaling      (dropout = Identity, PEFT's p = 0)

Ops (medians in ms, one JSON object a line on stdout):
  dense_fwd   base(x) under no_grad
  lora_fwd    the PEFT expression under no_grad
  train_step  forward + backward for A, B and x (base frozen), via torch.autograd.grad
The thread settings and allocator come from the environment and --threads (torch.set_num_threads);
bench/run.py sets them for the "best" and "default" configurations. Run with Debian's /usr/bin/python3.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch


def parse_case(text):
    # "n,in,out,r"
    n, fin, fout, r = (int(v) for v in text.split(","))
    return n, fin, fout, r


def timed(fn, budget_s, min_reps, max_reps):
    fn()  # warm-up (first-touch, allocator, thread pool)
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run_case(n, fin, fout, r, dtype, budget_s, min_reps, max_reps):
    torch.manual_seed(0)
    base = torch.nn.Linear(fin, fout, bias=False).to(dtype)
    base.weight.requires_grad_(False)
    lora_A = torch.nn.Linear(fin, r, bias=False).to(dtype)
    lora_B = torch.nn.Linear(r, fout, bias=False).to(dtype)
    torch.nn.init.normal_(lora_B.weight, std=0.02)  # a trained-looking adapter, as in the C++ benchmark
    dropout = torch.nn.Identity()
    scaling = 2.0  # alpha = 2 r
    x = torch.randn(n, fin, dtype=dtype)
    dy = torch.randn(n, fout, dtype=dtype)

    def lora(inp):
        return base(inp) + lora_B(lora_A(dropout(inp))) * scaling

    def dense_fwd():
        with torch.no_grad():
            base(x)

    def lora_fwd():
        with torch.no_grad():
            lora(x)

    xg = x.clone().requires_grad_(True)
    params = [xg, lora_A.weight, lora_B.weight]

    def train_step():
        y = lora(xg)
        torch.autograd.grad(y, params, dy)

    out = {}
    for name, fn in (("dense_fwd", dense_fwd), ("lora_fwd", lora_fwd), ("train_step", train_step)):
        t = timed(fn, budget_s, min_reps, max_reps)
        out[name] = t
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", required=True, help="n,in,out,r (repeatable)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    ap.add_argument("--config", default="best", help="a label for the output")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per op (at least --min-reps)")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--max-reps", type=int, default=50)
    ap.add_argument("--show-config", action="store_true", help="print torch.__config__.show() as JSON first")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.show_config:
        env = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "OPENBLAS_", "MALLOC_", "MKL_"))}
        print(json.dumps({"torch_config": torch.__config__.show(), "torch_version": torch.__version__,
                          "torch_threads": torch.get_num_threads(), "env": env, "config": args.config}))
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    for text in args.case:
        n, fin, fout, r = parse_case(text)
        res = run_case(n, fin, fout, r, dtype, args.budget, args.min_reps, args.max_reps)
        for op, times in res.items():
            ms = [t * 1e3 for t in times]
            print(json.dumps({"config": args.config, "threads": torch.get_num_threads(), "dtype": args.dtype,
                              "n": n, "in": fin, "out": fout, "r": r, "op": op, "median_ms": statistics.median(ms),
                              "min_ms": min(ms), "max_ms": max(ms), "reps": len(ms)}))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
