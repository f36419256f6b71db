#!/usr/bin/env python3
"""Adapters in both directions between Hugging Face PEFT and lora.hpp (run by scripts/interop.sh).

    peft_interop.py DRIVER WORKDIR

DRIVER is tests/interop/interop_driver (built from interop_driver.cpp); WORKDIR is emptied and filled
with one folder per case. Every case builds a small MLP in PyTorch whose module paths are those of the
library's nn::Sequential ("layers.0", "layers.2", ...), writes its base weights to a safetensors file that
both sides load, and compares float32 outputs with the error max|y_lib - y_peft| / max|y_peft|:

  peft->lora  PEFT's get_peft_model + save_pretrained write the adapter directory (adapters other than
              "default" in subfolders of it); the library's from_pretrained / load_adapter read it and its outputs
              (unmerged, and merged) must match PEFT's after PEFT's own from_pretrained of the same files
              (unmerged, and merge_and_unload).
  lora->peft  the library injects LoRA, sets adapter weights (and trained biases and modules_to_save),
              save_adapter writes the directory; PEFT's PeftModel.from_pretrained / load_adapter read it
              and must match the library's outputs, merge_and_unload the library's merged outputs.

Each comparison also requires the adapter to change PEFT's output by at least MIN_EFFECT (relative to
the base model), so that a case cannot pass by comparing two base models. A case marked `known`
(reason, expected) is a documented gap: it must still fail the expected way (a refusal whose message
contains `expected`, or "mismatch"); anything else, passing included, fails the run so that the mark
is revisited. Exits 1 on any unexpected result.
"""
import copy
import json
import os
import shutil
import subprocess
import sys
from collections import OrderedDict

import torch

TOLERANCE = 1e-5  # float32 on both sides, different summation orders
MIN_EFFECT = 1e-2  # the smallest change of the output by the adapter that makes a case a test

MLP = {"name": "layers", "modules": [
    {"type": "linear", "in": 12, "out": 16}, {"type": "relu"},
    {"type": "linear", "in": 16, "out": 16}, {"type": "relu"},
    {"type": "linear", "in": 16, "out": 5},
]}  # the examples' MLP, small: layers.0, layers.2, layers.4
NAMED = {"name": "", "modules": [
    {"type": "sequential", "name": "encoder", "modules": [
        {"type": "linear", "name": "fc1", "in": 12, "out": 16}, {"type": "gelu", "name": "act1"},
        {"type": "linear", "name": "fc2", "in": 16, "out": 16, "bias": False}, {"type": "tanh", "name": "act2"}]},
    {"type": "linear", "name": "classifier", "in": 16, "out": 5},
]}  # encoder.fc1, encoder.fc2 (no bias), classifier
BLOCKS = {"name": "model", "modules": [
    {"type": "sequential", "name": "blocks", "modules": [
        {"type": "sequential", "modules": [{"type": "linear", "name": "fc", "in": 12, "out": 12},
                                           {"type": "relu", "name": "act"}]} for _ in range(4)]},
    {"type": "linear", "name": "out", "in": 12, "out": 5},
]}  # model.blocks.{0..3}.fc, model.out: a transformer's layer layout


class Root(torch.nn.Module):
    """A model whose only child is the named Sequential: its paths start with "<name>."."""

    def __init__(self, name, body):
        super().__init__()
        self.child_name = name
        self.add_module(name, body)

    def forward(self, x):
        return getattr(self, self.child_name)(x)


def torch_modules(modules):
    out = OrderedDict()
    for i, m in enumerate(modules):
        kind = m["type"]
        if kind == "linear":
            module = torch.nn.Linear(m["in"], m["out"], bias=m.get("bias", True))
        elif kind == "sequential":
            module = torch.nn.Sequential(torch_modules(m["modules"]))
        else:
            module = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh}[kind]()
        out[m.get("name", str(i))] = module
    return out


def torch_model(spec):
    body = torch.nn.Sequential(torch_modules(spec["modules"]))
    return Root(spec["name"], body) if spec["name"] else body


def base_model(spec, base_file):
    from safetensors.torch import load_file
    model = torch_model(spec)
    model.load_state_dict(load_file(base_file))
    return model.eval()


def max_relative_error(y, reference):
    return float((y.double() - reference.double()).abs().max() / reference.double().abs().max())


class Case:
    def __init__(self, name, model=MLP, configs=(), inject=None, adapters=(), dtype="F32", evaluate=None,
                 known=None):
        self.name, self.model, self.dtype, self.known = name, model, dtype, known
        self.configs = list(configs)            # peft->lora: [(adapter name, LoraConfig fields)]
        self.inject, self.adapters = inject, list(adapters)  # lora->peft: config fields, extra adapters
        names = [n for n, _ in self.configs] or ["default"] + [a["name"] for a in self.adapters]
        self.evaluate = evaluate or [[n] for n in names]


def adapter_dirs(root, names):
    return [{"name": n, "dir": root if n == "default" else os.path.join(root, n)} for n in names]


def peft_outputs(case, base_file, root, names, x):
    """PEFT's from_pretrained (+ load_adapter) of the files: outputs and merged outputs per adapter set."""
    from peft import PeftModel
    model = PeftModel.from_pretrained(base_model(case.model, base_file), root)
    for entry in adapter_dirs(root, names)[1:]:
        model.load_adapter(entry["dir"], adapter_name=entry["name"])
    model.eval()
    outputs, merged = [], []
    with torch.no_grad():
        for active in case.evaluate:
            model.base_model.set_adapter(active if len(active) > 1 else active[0])
            outputs.append(model(x))
            merged.append(copy.deepcopy(model).merge_and_unload(adapter_names=active)(x))
    return outputs, merged


def x_file(folder):
    return os.path.join(folder, "..", "x.safetensors")


def run_driver(driver, folder, spec):
    path = os.path.join(folder, "spec.json")
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)
    done = subprocess.run([driver, path], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or "interop_driver exited with %d" % done.returncode)
    from safetensors.torch import load_file
    out = load_file(spec["outputs"])
    n = len(spec["evaluate"])
    return [out["y.%d" % k] for k in range(n)], [out["merged.%d" % k] for k in range(n)]


def train_peft(model, dtype):
    """Stands for training: new values for every adapter's A and B and for what PEFT trains beside them
    (biases per the bias mode, modules_to_save copies), then the dtype the adapter is saved in."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.uniform_(-0.5, 0.5)
            elif p.requires_grad:
                p.add_(torch.empty_like(p).uniform_(-0.3, 0.3))
    if dtype != "F32":
        model.to({"F16": torch.float16, "BF16": torch.bfloat16}[dtype])


def peft_to_lora(case, driver, folder, x, base_file):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(7)
    (first, fields), rest = case.configs[0], case.configs[1:]
    assert first == "default"
    model = get_peft_model(base_model(case.model, base_file), LoraConfig(**fields))
    for name, more in rest:
        model.add_adapter(name, LoraConfig(**more))
    train_peft(model, case.dtype)
    root = os.path.join(folder, "adapter")
    model.save_pretrained(root)
    names = [n for n, _ in case.configs]
    reference, reference_merged = peft_outputs(case, base_file, root, names, x)
    spec = {"mode": "load", "model": case.model, "base": base_file, "inputs": x_file(folder),
            "outputs": os.path.join(folder, "out.safetensors"), "adapters": adapter_dirs(root, names),
            "evaluate": case.evaluate}
    ours, ours_merged = run_driver(driver, folder, spec)
    return ours, ours_merged, reference, reference_merged


def lora_to_peft(case, driver, folder, x, base_file):
    root = os.path.join(folder, "adapter")
    names = ["default"] + [a["name"] for a in case.adapters]
    adapters = [dict(entry, dtype=case.dtype, seed=11 + k) for k, entry in enumerate(adapter_dirs(root, names))]
    for entry, extra in zip(adapters[1:], case.adapters):
        entry.update(extra)
    spec = {"mode": "save", "model": case.model, "base": base_file, "inputs": x_file(folder),
            "outputs": os.path.join(folder, "out.safetensors"), "inject": dict(case.inject, peft_type="LORA"),
            "adapters": adapters, "evaluate": case.evaluate}
    ours, ours_merged = run_driver(driver, folder, spec)
    reference, reference_merged = peft_outputs(case, base_file, root, names, x)
    return ours, ours_merged, reference, reference_merged


def one(**fields):
    """The LoraConfig fields of a case with the adapter "default" alone."""
    return [("default", fields)]


TWO = ["layers.0", "layers.2"]
ALL = ["layers.0", "layers.2", "layers.4"]

PEFT_TO_LORA = [
    Case("target_modules list", configs=one(target_modules=TWO, r=4, lora_alpha=8)),
    Case("target_modules suffixes", configs=one(target_modules=["0", "4"], r=3, lora_alpha=5)),
    Case("target_modules regex", configs=one(target_modules=r"layers\.[024]", r=2, lora_alpha=5)),
    Case("rank_pattern, alpha_pattern (rank 6 > min(16, 5))",
         configs=one(target_modules=ALL, r=4, lora_alpha=8, rank_pattern={"layers.2": 2, "4": 6},
                     alpha_pattern={"layers.0": 3})),
    Case("use_rslora", configs=one(target_modules=TWO, r=4, lora_alpha=8, use_rslora=True)),
    Case("lora_dropout 0.1, eval", configs=one(target_modules=TWO, r=4, lora_dropout=0.1)),
    Case("modules_to_save", configs=one(target_modules=TWO, r=4, modules_to_save=["layers.4"])),
    Case("bias none, F16", dtype="F16", configs=one(target_modules=TWO, r=4, bias="none")),
    Case("bias lora_only", configs=one(target_modules=TWO, r=4, bias="lora_only")),
    Case("bias all", configs=one(target_modules=TWO, r=4, bias="all")),
    Case("bias all, modules_to_save",
         configs=one(target_modules=["layers.2"], r=4, bias="all", modules_to_save=["layers.4"]),
         known=("with bias all PEFT saves every '.bias' of its state dict, so the modules_to_save wrapper's "
                "layers.4.modules_to_save.bias (a copy of layers.4.bias) and layers.4.original_module.bias too",
                "'base_model.model.layers.4.modules_to_save.bias': unexpected tensor")),
    Case("rank_pattern, modules_to_save, lora_only, F16", dtype="F16",
         configs=one(target_modules=TWO, r=4, lora_alpha=8, rank_pattern={"2": 3}, modules_to_save=["layers.4"],
                     bias="lora_only")),
    Case("regex, rslora, modules_to_save, BF16", dtype="BF16",
         configs=one(target_modules=r"layers\.(0|2)", r=4, lora_alpha=6, use_rslora=True,
                     modules_to_save=["layers.4"])),
    Case("three adapters in one tree",
         configs=[("default", dict(target_modules=TWO, r=4, lora_alpha=8)),
                  ("second", dict(target_modules=TWO, r=2, lora_alpha=4, use_rslora=True)),
                  ("third", dict(target_modules=r"layers\.[02]", r=3, lora_alpha=2, rank_pattern={"layers.2": 1}))],
         evaluate=[["default"], ["second"], ["third"], ["default", "second"], ["default", "second", "third"]]),
    Case("two adapters, each with its own modules_to_save copy",
         configs=[("default", dict(target_modules=TWO, r=4, modules_to_save=["layers.4"])),
                  ("second", dict(target_modules=TWO, r=2, modules_to_save=["layers.4"]))],
         evaluate=[["default"], ["second"]]),
    Case("two adapters on different modules",
         configs=[("default", dict(target_modules=["layers.0"], r=4)),
                  ("other", dict(target_modules=["layers.2", "layers.4"], r=2))],
         known=("load_adapter adds an adapter only to existing LoRA layers; PEFT's load_adapter injects LoRA "
                "into the modules the new adapter targets", "no LoRA weights for any of the model's 1 LoRA modules")),
    Case("named modules, modules_to_save", model=NAMED,
         configs=one(target_modules=["fc1", "fc2"], r=4, lora_alpha=8, modules_to_save=["classifier"])),
    Case("layers_to_transform, layers_pattern, exclude_modules", model=BLOCKS,
         configs=one(target_modules=["fc"], r=2, lora_alpha=4, layers_to_transform=[0, 2, 3], layers_pattern="blocks",
                     exclude_modules=["3.fc"])),
    Case("use_dora", configs=one(target_modules=["layers.0"], r=2, use_dora=True),
         known=("DoRA is not implemented; refused by name", "DoRA adapters are not supported")),
    Case("lora_bias", configs=one(target_modules=["layers.0"], r=2, lora_bias=True),
         known=("a bias on lora_B is not implemented; refused", "LoRA-B biases are not supported")),
]

LORA_TO_PEFT = [
    Case("target_modules list", inject=dict(target_modules=TWO, r=4, lora_alpha=8)),
    Case("target_modules regex (written as a list)", inject=dict(target_modules=r"layers\.(0|4)", r=3, lora_alpha=4)),
    Case("rank_pattern, alpha_pattern",
         inject=dict(target_modules=ALL, r=4, lora_alpha=8, rank_pattern={"layers.2": 2},
                     alpha_pattern={"layers.4": 3})),
    Case("use_rslora, lora_dropout 0.1", inject=dict(target_modules=TWO, r=4, lora_alpha=8, use_rslora=True,
                                                    lora_dropout=0.1)),
    Case("modules_to_save, bias lora_only",
         inject=dict(target_modules=TWO, r=4, modules_to_save=["layers.4"], bias="lora_only")),
    Case("bias all", inject=dict(target_modules=["layers.0"], r=4, bias="all")),
    Case("bias all, modules_to_save, F16", dtype="F16",
         inject=dict(target_modules=["layers.2"], r=4, bias="all", modules_to_save=["layers.4"])),
    Case("rank_pattern, modules_to_save, F16", dtype="F16",
         inject=dict(target_modules=TWO, r=4, rank_pattern={"layers.0": 2}, modules_to_save=["layers.4"],
                     bias="lora_only")),
    Case("alpha_pattern, rslora, BF16", dtype="BF16",
         inject=dict(target_modules=ALL, r=2, lora_alpha=4, alpha_pattern={"layers.2": 1}, use_rslora=True)),
    Case("two adapters in one tree", inject=dict(target_modules=TWO, r=4, lora_alpha=8),
         adapters=[{"name": "second", "r": 2, "lora_alpha": 3}],
         evaluate=[["default"], ["second"], ["default", "second"]]),
    Case("two adapters, each with its own modules_to_save copy",
         inject=dict(target_modules=TWO, r=4, lora_alpha=8, modules_to_save=["layers.4"]),
         adapters=[{"name": "second", "r": 2, "lora_alpha": 3}], evaluate=[["default"], ["second"]]),
    Case("named modules, modules_to_save", model=NAMED,
         inject=dict(target_modules=["fc1", "fc2"], r=4, modules_to_save=["classifier"])),
    Case("layers_to_transform (written as paths)", model=BLOCKS,
         inject=dict(target_modules=["fc"], r=2, lora_alpha=4, layers_to_transform=[1, 3], layers_pattern="blocks")),
]


def main():
    driver, work = sys.argv[1], sys.argv[2]
    import peft, safetensors, transformers
    print("interop: torch %s, peft %s, transformers %s, safetensors %s" % (
        torch.__version__, peft.__version__, transformers.__version__, safetensors.__version__))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    torch.manual_seed(2024)
    x = torch.randn(9, 12)
    from safetensors.torch import save_file
    save_file({"x": x}, os.path.join(work, "x.safetensors"))
    bases = {}
    for key, spec in (("mlp", MLP), ("named", NAMED), ("blocks", BLOCKS)):
        torch.manual_seed(len(bases) + 1)
        bases[id(spec)] = os.path.join(work, "base_%s.safetensors" % key)
        save_file({k: v.contiguous() for k, v in torch_model(spec).state_dict().items()}, bases[id(spec)])

    passed = failed = known = 0
    directions = (("peft->lora", PEFT_TO_LORA, peft_to_lora), ("lora->peft", LORA_TO_PEFT, lora_to_peft))
    for direction, cases, run in directions:
        for index, case in enumerate(cases):
            folder = os.path.join(work, "%s_%02d" % (direction.replace("->", "_to_"), index))
            os.makedirs(folder)
            label = "%s  %-52s %-4s" % (direction, case.name, case.dtype)
            base = base_model(case.model, bases[id(case.model)])(x).detach()
            try:
                results = run(case, driver, folder, x, bases[id(case.model)])
                error = None
            except Exception as e:  # a refusal by either side
                message = str(e).strip().splitlines()
                results, error = None, "%s: %s" % (type(e).__name__, message[-1] if message else "")
            lines, mismatch, errors = [], False, []
            for active, y, m, ry, rm in zip(case.evaluate, *(results or ((), (), (), ()))):
                e_y, e_m = max_relative_error(y, ry), max_relative_error(m, rm)
                effect = max_relative_error(base, ry)  # the adapter must matter for the check to mean anything
                good = e_y <= TOLERANCE and e_m <= TOLERANCE and effect >= MIN_EFFECT
                mismatch = mismatch or not good
                errors.append("max rel err %.1e" % e_y)
                lines.append("%s [%s]  max rel err %.1e, merged %.1e (adapter effect %.2f)  %s" % (
                    label, "+".join(active), e_y, e_m, effect, "ok" if good else "MISMATCH"))
            if case.known:
                reason, expected = case.known
                happened = (expected == "mismatch" and mismatch) or (error is not None and expected in error)
                known += 1
                if happened:
                    lines = ["%s  known failure, %s: %s" % (label, reason, error or ", ".join(errors))]
                else:
                    failed += 1
                    lines.append("%s  UNEXPECTED: documented as failing with '%s' (%s); got %s" % (
                        label, expected, reason, error or "a match"))
            elif error or mismatch:
                failed += 1
                if error:
                    lines.append("%s  FAILED: %s" % (label, error))
            else:
                passed += 1
            print("\n".join(lines), flush=True)
    print("interop: %d known failures (documented above)" % known)
    print("interop: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
