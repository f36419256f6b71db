#!/usr/bin/python3
"""Writes the PyTorch reference values that tests/test_optim_reference.cpp compares against.

Run with Debian's python3 (torch 1.13 CPU):  /usr/bin/python3 tests/data/make_optim_fixtures.py
Everything runs in float64. Outputs (small JSON files, committed):
  tests/data/optim/steps.json      several steps of torch.optim.SGD / AdamW on small tensors with given
                                   gradients, with clip_grad_norm_, LambdaLR schedules and LoRA+ groups
  tests/data/optim/schedules.json  lr multipliers of transformers' schedules, stepped through LambdaLR
"""
import json
import math
import os

import torch

torch.set_default_dtype(torch.float64)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "optim")


# The formulas of transformers.optimization (get_constant_schedule, get_constant_schedule_with_warmup,
# get_linear_schedule_with_warmup, get_cosine_schedule_with_warmup), written out: transformers is not a
# Debian package.
def hf_lambda(kind, warmup, total, num_cycles=0.5):
    def constant(step):
        return 1.0

    def constant_with_warmup(step):
        if step < warmup:
            return float(step) / float(max(1.0, warmup))
        return 1.0

    def linear(step):
        if step < warmup:
            return float(step) / float(max(1, warmup))
        return max(0.0, float(total - step) / float(max(1, total - warmup)))

    def cosine(step):
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))

    return {"constant": constant, "constant_with_warmup": constant_with_warmup, "linear": linear,
            "cosine": cosine}[kind]


# Parameters of a small LoRA model: (name, role, shape). The bias is 1-D, as in torch.
PARAMS = [
    ("layer.lora_A.default.weight", "lora_A", (3, 5)),
    ("layer.lora_B.default.weight", "lora_B", (4, 3)),
    ("layer.bias", "bias", (4,)),
    ("head.weight", "weight", (2, 4)),
]


def rows_cols(shape):
    return (shape[0], 1) if len(shape) == 1 else shape


def flat(t):
    return [float(x) for x in t.detach().reshape(-1).tolist()]


def groups_by_role(params, opts):
    """One group per parameter, with the lr factor and weight decay that the library's options give it."""
    ratio = opts.get("loraplus_lr_ratio", 1.0)
    groups = []
    for (name, role, _), p in zip(PARAMS, params):
        fast = role == "lora_B" or (opts.get("loraplus_include_biases", False) and role == "bias")
        decays = opts.get("decay_biases", True) or role != "bias"
        groups.append({"params": [p], "lr": opts["lr"] * (ratio if fast else 1.0),
                       "weight_decay": opts["weight_decay"] if decays else 0.0})
    return groups


def groups_like_peft(params, opts):
    """The grouping of peft.optimizers.create_loraplus_optimizer (without embeddings): lora_B and every 1-D
    parameter get lr * ratio; names containing "bias" get no weight decay."""
    ratio = opts["loraplus_lr_ratio"]
    group_a, group_b, group_b_no_decay = [], [], []
    for (name, _, _), p in zip(PARAMS, params):
        if "lora_B" in name or p.ndim == 1:
            (group_b if "bias" not in name else group_b_no_decay).append(p)
        else:
            group_a.append(p)
    return [
        {"params": group_a, "weight_decay": opts["weight_decay"], "lr": opts["lr"]},
        {"params": group_b, "weight_decay": opts["weight_decay"], "lr": opts["lr"] * ratio},
        {"params": group_b_no_decay, "weight_decay": 0.0, "lr": opts["lr"] * ratio},
    ]


def run_case(name, optimizer, opts, steps, seed, schedule=None, max_norm=None, grad_scales=None, peft=False):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(shape, generator=gen).requires_grad_() for _, _, shape in PARAMS]
    record = {
        "name": name, "optimizer": optimizer, "options": opts, "schedule": schedule, "max_norm": max_norm,
        "params": [{"name": n, "role": r, "rows": rows_cols(s)[0], "cols": rows_cols(s)[1], "value": flat(p)}
                   for (n, r, s), p in zip(PARAMS, params)],
        "steps": [],
    }
    groups = groups_like_peft(params, opts) if peft else groups_by_role(params, opts)
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=opts["lr"], momentum=opts.get("momentum", 0.0),
                              dampening=opts.get("dampening", 0.0), nesterov=opts.get("nesterov", False))
    else:
        opt = torch.optim.AdamW(groups, lr=opts["lr"], betas=(opts["beta1"], opts["beta2"]), eps=opts["eps"],
                                amsgrad=opts.get("amsgrad", False))
    sched = None
    if schedule is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, hf_lambda(schedule["kind"], schedule["warmup"], schedule["total"], schedule.get("num_cycles", 0.5)))
    for k in range(steps):
        scale = grad_scales[k] if grad_scales else 1.0
        grads = [torch.randn(p.shape, generator=gen) * scale for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        step = {"grads": {n: flat(g) for (n, _, _), g in zip(PARAMS, grads)},
                "base_lr": opts["lr"] * (sched.lr_lambdas[0](k) if sched else 1.0)}
        if max_norm is not None:
            step["total_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        opt.step()
        if sched is not None:
            sched.step()
        step["values"] = {n: flat(p) for (n, _, _), p in zip(PARAMS, params)}
        record["steps"].append(step)
    return record


def main():
    os.makedirs(OUT, exist_ok=True)
    big = [1.0, 6.0, 0.2, 3.0, 1.0, 8.0, 0.5, 2.0]  # some steps above max_norm, some below
    cases = [
        run_case("sgd plain", "sgd", {"lr": 0.1, "weight_decay": 0.0}, 3, seed=1),
        run_case("sgd momentum, dampening, weight decay", "sgd",
                 {"lr": 0.05, "momentum": 0.9, "dampening": 0.25, "weight_decay": 0.01}, 5, seed=2),
        run_case("sgd nesterov, weight decay without biases", "sgd",
                 {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.02, "decay_biases": False},
                 5, seed=3),
        run_case("sgd LoRA+ cosine clip", "sgd",
                 {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "loraplus_lr_ratio": 4.0}, 8, seed=4,
                 schedule={"kind": "cosine", "warmup": 2, "total": 8}, max_norm=1.0, grad_scales=big),
        run_case("adamw", "adamw",
                 {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01}, 5, seed=5),
        run_case("adamw amsgrad", "adamw",
                 {"lr": 1e-2, "beta1": 0.8, "beta2": 0.95, "eps": 1e-6, "weight_decay": 0.1, "amsgrad": True},
                 6, seed=6, grad_scales=[3.0, 0.1, 0.1, 2.0, 0.01, 1.0]),
        run_case("adamw LoRA+ linear warmup clip", "adamw",
                 {"lr": 2e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.05,
                  "loraplus_lr_ratio": 16.0}, 7, seed=7,
                 schedule={"kind": "linear", "warmup": 2, "total": 7}, max_norm=0.5, grad_scales=big),
        run_case("adamw LoRA+ grouped as PEFT", "adamw",
                 {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1,
                  "loraplus_lr_ratio": 8.0, "loraplus_include_biases": True, "decay_biases": False}, 5, seed=8,
                 schedule={"kind": "constant_with_warmup", "warmup": 3, "total": 5}, peft=True),
    ]
    with open(os.path.join(OUT, "steps.json"), "w") as f:
        json.dump({"generator": "tests/data/make_optim_fixtures.py", "torch": torch.__version__, "cases": cases},
                  f, indent=1)
        f.write("\n")

    schedules = []
    for kind, warmup, total, cycles in [
            ("constant", 0, 5, 0.5), ("constant_with_warmup", 3, 8, 0.5), ("linear", 0, 5, 0.5),
            ("linear", 3, 10, 0.5), ("linear", 10, 10, 0.5), ("cosine", 0, 5, 0.5), ("cosine", 4, 12, 0.5),
            ("cosine", 2, 9, 1.0), ("cosine", 3, 3, 0.5)]:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, hf_lambda(kind, warmup, total, cycles))
        multipliers = []
        for _ in range(total + 5):
            multipliers.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        schedules.append({"kind": kind, "warmup": warmup, "total": total, "num_cycles": cycles,
                          "multipliers": multipliers})
    with open(os.path.join(OUT, "schedules.json"), "w") as f:
        json.dump({"generator": "tests/data/make_optim_fixtures.py", "torch": torch.__version__,
                   "schedules": schedules}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
