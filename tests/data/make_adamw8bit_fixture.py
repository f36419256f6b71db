#!/usr/bin/python3
"""Writes tests/data/optim/adamw8bit.json, the reference that tests/test_optim.cpp checks AdamW8bit against.

Run with Debian's python3 (numpy, torch 1.13 CPU):  /usr/bin/python3 tests/data/make_adamw8bit_fixture.py
Written from bitsandbytes' description of its block-wise 8-bit Adam (float32 throughout):
  unsigned_map  create_dynamic_map(signed=False) evaluated with torch's float32 linspace
  steps         three AdamW8bit steps on a 600-value parameter (blocks of 256, so 256 + 256 + 88; 8-bit)
                and a 6-value bias (float32 moments), with given gradients: values after each step, codes
                and absmax values after the last; codes are the nearest entries, except that m keeps its sign
                (bitsandbytes' kernel) and a positive v takes the smallest positive entry rather than 0
"""
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_quant_fixture import DYN  # noqa: E402  (the signed map, bitsandbytes' float32 values)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "optim", "adamw8bit.json")
f32 = np.float32


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    # bitsandbytes.functional.create_dynamic_map, as published.
    data = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed else \
            2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        boundaries = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2 ** total_bits
    data.sort()
    return np.array(data, dtype=np.float32)


UMAP = create_dynamic_map(signed=False)


def nearest(x, table):
    # argmin |x - table|; the first (lower) index on a tie.
    return np.argmin(np.abs(x[:, None].astype(np.float64) - table[None, :].astype(np.float64)), axis=1)


class State:
    def __init__(self, n, bs, quantized):
        self.quantized = quantized
        self.bs = bs
        if quantized:
            nb = (n + bs - 1) // bs
            self.mc = np.full(n, int(np.argmin(np.abs(DYN))), dtype=np.int64)
            self.vc = np.zeros(n, dtype=np.int64)
            self.ma = np.zeros(nb, dtype=np.float32)
            self.va = np.zeros(nb, dtype=np.float32)
        else:
            self.m = np.zeros(n, dtype=np.float32)
            self.v = np.zeros(n, dtype=np.float32)


def step(p, g, st, t, lr, beta1, beta2, eps, wd):
    c1 = 1 - beta1 ** t
    c2 = math.sqrt(1 - beta2 ** t)
    step_size, c2eps = f32(-lr * c2 / c1), f32(c2 * eps)
    decay = f32(1 - lr * wd) if wd > 0 else f32(1)
    b1, b2 = f32(beta1), f32(beta2)

    def adam(p, g, m, v):
        m = m * b1 + (f32(1) - b1) * g
        v = v * b2 + (f32(1) - b2) * (g * g)
        p = (p + step_size * (m / (np.sqrt(v) + c2eps))) * decay
        return p.astype(np.float32), m.astype(np.float32), v.astype(np.float32)

    if not st.quantized:
        p, st.m, st.v = adam(p, g, st.m, st.v)
        return p
    out = p.copy()
    for b in range(len(st.ma)):
        s = slice(b * st.bs, min(len(p), (b + 1) * st.bs))
        m = DYN[st.mc[s]] * st.ma[b]
        v = UMAP[st.vc[s]] * st.va[b]
        out[s], m, v = adam(p[s], g[s], m, v)
        for x, codes, absmax, table, zero in ((m, st.mc, st.ma, DYN, int(np.argmin(np.abs(DYN)))),
                                              (v, st.vc, st.va, UMAP, 0)):
            a = f32(np.abs(x).max())
            absmax[b] = a
            codes[s] = nearest((x / a).astype(np.float32), table) if a > 0 else zero
            c = codes[s]
            if table is DYN:  # m keeps its sign (bitsandbytes' kernel)
                flip = np.signbit(DYN[c]) != np.signbit(x)
                c[flip] += np.where(x[flip] > 0, 1, -1)
            else:  # a positive v never codes to 0
                c[(x > 0) & (UMAP[c] == 0)] = int(np.argmax(UMAP > 0))
            codes[s] = c
    return out


def main():
    rng = np.random.default_rng(11)
    opts = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.01)
    shapes = {"weight": (20, 30), "bias": (1, 6)}
    bs, min_size = 256, 512
    params = {k: rng.standard_normal(s).astype(np.float32).reshape(-1) for k, s in shapes.items()}
    states = {k: State(p.size, bs, p.size >= min_size) for k, p in params.items()}
    out = {"options": {"lr": opts["lr"], "beta1": opts["beta1"], "beta2": opts["beta2"], "eps": opts["eps"],
                       "weight_decay": opts["wd"], "block_size": bs, "min_8bit_size": min_size},
           "unsigned_map": [float(x) for x in UMAP], "params": {}}
    for k, s in shapes.items():
        out["params"][k] = {"rows": s[0], "cols": s[1], "initial": [float(x) for x in params[k]], "grads": [],
                            "values": []}
    for t in range(1, 4):
        for k in shapes:
            # Gradients of mixed scales, so that the blocks' absmax values differ.
            g = (rng.standard_normal(params[k].size) * np.exp(rng.uniform(-4, 1, params[k].size))).astype(np.float32)
            params[k] = step(params[k], g, states[k], t, opts["lr"], opts["beta1"], opts["beta2"], opts["eps"],
                             opts["wd"])
            out["params"][k]["grads"].append([float(x) for x in g])
            out["params"][k]["values"].append([float(x) for x in params[k]])
    st = states["weight"]
    out["params"]["weight"].update({"m_codes": [int(c) for c in st.mc], "v_codes": [int(c) for c in st.vc],
                                    "m_absmax": [float(a) for a in st.ma], "v_absmax": [float(a) for a in st.va]})
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f)
        f.write("\n")


if __name__ == "__main__":
    main()
