#!/usr/bin/python3
"""PEFT-compatible adapter fixtures and the reference forward computed the way PEFT computes it.

Uses Debian's python3-torch (1.13) and numpy; the files are written by the independent safetensors
writer of make_io_fixtures.py. Run from anywhere:

    /usr/bin/python3 tests/data/make_peft_reference.py

The toy model: encoder.fc1 (6 -> 8) -> ReLU -> encoder.fc2 (8 -> 7) -> ReLU -> classifier (7 -> 3).
PEFT's LoRA Linear forward, as in peft/tuners/lora/layer.py (eval mode, dropout off):

    result = base_layer(x)
    for each active adapter:  result = result + lora_B(lora_A(dropout(x))) * scaling[adapter]
    scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern
    override r and lora_alpha per module.

Outputs, under tests/data/io/peft/:
  base_model.safetensors          the pretrained toy model, plain names (F32)
  adapter_a/                      r=4, lora_alpha=8, use_rslora, rank_pattern {"fc2": 2},
                                  alpha_pattern {"fc2": 3}, modules_to_save ["classifier"], F32
  adapter_b/                      r=2, lora_alpha=4, target_modules as a regex string, stored as F16
  reference.safetensors           F64: X [5, 6]; Y_a, Y_b [5, 3] (model outputs with a, with b);
                                  H_base, H_ab, H_mixed [5, 7] (encoder outputs: base, a + b active,
                                  rows using a, b, base, a, b)
"""
import json
import math
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from make_io_fixtures import tensor_bytes, write_safetensors  # noqa: E402

OUT = os.path.join(HERE, "io", "peft")
PREFIX = "base_model.model."


def peft_config(**fields):
    config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "toy-mlp", "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": 8, "lora_dropout": 0.0, "modules_to_save": None,
        "peft_type": "LORA", "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None,
        "task_type": None, "use_rslora": False,
    }
    config.update(fields)
    return config


def write_adapter(name, config, tensors, dtype):
    path = os.path.join(OUT, name)
    os.makedirs(path, exist_ok=True)
    entries = [(k, dtype, tuple(v.shape), tensor_bytes(v.numpy(), dtype)) for k, v in tensors.items()]
    write_safetensors(os.path.join(path, "adapter_model.safetensors"), entries, metadata={"format": "pt"})
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def scaling(alpha, r, rslora):
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_linear(x, weight, bias, adapters):
    """PEFT's Linear.forward in eval mode; adapters: list of (A, B, scaling)."""
    result = torch.nn.functional.linear(x, weight, bias)
    for A, B, s in adapters:
        result = result + torch.nn.functional.linear(torch.nn.functional.linear(x, A), B) * s
    return result


def main():
    torch.manual_seed(20240611)
    fc1, fc2, head = torch.nn.Linear(6, 8), torch.nn.Linear(8, 7), torch.nn.Linear(7, 3)
    base = {
        "encoder.fc1.weight": fc1.weight.detach(), "encoder.fc1.bias": fc1.bias.detach(),
        "encoder.fc2.weight": fc2.weight.detach(), "encoder.fc2.bias": fc2.bias.detach(),
        "classifier.weight": head.weight.detach(), "classifier.bias": head.bias.detach(),
    }
    write_safetensors(os.path.join(OUT, "base_model.safetensors"),
                      [(k, "F32", tuple(v.shape), tensor_bytes(v.numpy(), "F32")) for k, v in base.items()],
                      metadata={"format": "pt"})

    # Adapter a: trained-looking (B != 0) weights, per-module rank and alpha, rsLoRA, a trained head.
    ga = {
        "encoder.fc1.lora_A.weight": torch.randn(4, 6) * 0.4, "encoder.fc1.lora_B.weight": torch.randn(8, 4) * 0.3,
        "encoder.fc2.lora_A.weight": torch.randn(2, 8) * 0.4, "encoder.fc2.lora_B.weight": torch.randn(7, 2) * 0.3,
        "classifier.weight": base["classifier.weight"] + torch.randn(3, 7) * 0.1,
        "classifier.bias": base["classifier.bias"] + torch.randn(3) * 0.1,
    }
    config_a = peft_config(r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.1, rank_pattern={"fc2": 2},
                           alpha_pattern={"fc2": 3}, target_modules=["fc1", "fc2"], modules_to_save=["classifier"],
                           task_type="SEQ_CLS")
    write_adapter("adapter_a", config_a, {PREFIX + k: v for k, v in ga.items()}, "F32")

    # Adapter b: stored as F16, so the reference uses the F16-rounded values.
    gb = {
        "encoder.fc1.lora_A.weight": torch.randn(2, 6) * 0.5, "encoder.fc1.lora_B.weight": torch.randn(8, 2) * 0.5,
        "encoder.fc2.lora_A.weight": torch.randn(2, 8) * 0.5, "encoder.fc2.lora_B.weight": torch.randn(7, 2) * 0.5,
    }
    gb = {k: v.half().float() for k, v in gb.items()}
    config_b = peft_config(r=2, lora_alpha=4, target_modules=r"encoder\.fc[12]")
    write_adapter("adapter_b", config_b, {PREFIX + k: v for k, v in gb.items()}, "F16")

    d = lambda t: t.double()
    s_a1, s_a2 = scaling(8, 4, True), scaling(3, 2, True)
    s_b = scaling(4, 2, False)
    lora = {
        "a": ([(d(ga["encoder.fc1.lora_A.weight"]), d(ga["encoder.fc1.lora_B.weight"]), s_a1)],
              [(d(ga["encoder.fc2.lora_A.weight"]), d(ga["encoder.fc2.lora_B.weight"]), s_a2)]),
        "b": ([(d(gb["encoder.fc1.lora_A.weight"]), d(gb["encoder.fc1.lora_B.weight"]), s_b)],
              [(d(gb["encoder.fc2.lora_A.weight"]), d(gb["encoder.fc2.lora_B.weight"]), s_b)]),
    }

    def encoder(x, names):
        a1 = [t for n in names for t in lora[n][0]]
        a2 = [t for n in names for t in lora[n][1]]
        h = torch.relu(lora_linear(x, d(base["encoder.fc1.weight"]), d(base["encoder.fc1.bias"]), a1))
        return torch.relu(lora_linear(h, d(base["encoder.fc2.weight"]), d(base["encoder.fc2.bias"]), a2))

    X = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        Y_a = torch.nn.functional.linear(encoder(X, ["a"]), d(ga["classifier.weight"]), d(ga["classifier.bias"]))
        Y_b = torch.nn.functional.linear(encoder(X, ["b"]), d(base["classifier.weight"]), d(base["classifier.bias"]))
        H_base = encoder(X, [])
        H_ab = encoder(X, ["a", "b"])
        rows = ["a", "b", "__base__", "a", "b"]
        H_mixed = torch.stack([encoder(X[i:i + 1], [] if n == "__base__" else [n])[0] for i, n in enumerate(rows)])
    ref = {"X": X, "Y_a": Y_a, "Y_b": Y_b, "H_base": H_base, "H_ab": H_ab, "H_mixed": H_mixed}
    write_safetensors(os.path.join(OUT, "reference.safetensors"),
                      [(k, "F64", tuple(v.shape), tensor_bytes(v.numpy(), "F64")) for k, v in ref.items()],
                      metadata={"format": "pt", "rows": ",".join(rows), "torch": torch.__version__})


if __name__ == "__main__":
    main()
