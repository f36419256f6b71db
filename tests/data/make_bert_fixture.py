#!/usr/bin/python3
"""A tiny BERT for sequence classification, with its Hugging Face checkpoint, a PEFT LoRA adapter and the
float64 forward and backward of both, computed in plain PyTorch (no transformers, no peft, no safetensors
package). Uses Debian's python3-torch (1.13) and numpy; the files are written by the independent
safetensors writer of make_io_fixtures.py. Run from anywhere:

    /usr/bin/python3 tests/data/make_bert_fixture.py

The forward is transformers' BertForSequenceClassification in eval mode (dropout off), written out:
  embeddings   E = LayerNorm(word[ids] + token_type[0] + position[t])   (transformers' order of the sums)
  each layer   Q, K, V = Linear(h); per head: softmax(Q_h K_h^T / sqrt(d) + mask) V_h, where mask is 0 for
               a real key and torch.finfo(float64).min for a padding key (transformers' extended attention
               mask: the sum stays finite and its exp is exactly 0, so padding keys get weight 0 exactly);
               a1 = LayerNorm(attention.output.dense(context) + h)
               h' = LayerNorm(output.dense(gelu(intermediate.dense(a1))) + a1)   (exact, erf GELU)
  head         pooled = tanh(pooler.dense(h[:, 0])); logits = classifier(pooled);
               loss = mean cross-entropy over the batch
The LoRA model is PEFT's: on query and value, y = x W^T + b + (lora_alpha / r) (x A^T) B^T, and the
classifier replaced by its trained copy (modules_to_save). The script checks its forward and gradients
against a second implementation built from torch.nn modules (Embedding, LayerNorm, TransformerEncoderLayer,
Linear; the LoRA model through merged weights) and against torch.autograd.gradcheck.

Outputs, under tests/data/bert_fixture/ (README.md there lists every file and tensor).
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

OUT = os.path.join(HERE, "bert_fixture")
PREFIX = "base_model.model."

CONFIG = {
    "architectures": ["BertForSequenceClassification"],
    "attention_probs_dropout_prob": 0.1,
    "classifier_dropout": None,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 8,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"},
    "initializer_range": 0.02,
    "intermediate_size": 12,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2},
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 16,
    "model_type": "bert",
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "problem_type": "single_label_classification",
    "torch_dtype": "float64",
    "type_vocab_size": 2,
    "use_cache": True,
    "vocab_size": 50,
}
H = CONFIG["hidden_size"]
L = CONFIG["num_hidden_layers"]
NH = CONFIG["num_attention_heads"]
I = CONFIG["intermediate_size"]
V = CONFIG["vocab_size"]
P = CONFIG["max_position_embeddings"]
NL = len(CONFIG["id2label"])
EPS = CONFIG["layer_norm_eps"]

R, ALPHA = 2, 4
SCALING = ALPHA / R
TARGETS = ("query", "value")

IDS = [[7, 23, 41, 5, 12], [33, 2, 48], [19]]  # lengths 5, 3, 1; ids in [1, 50)
LABELS = [2, 0, 1]
PAD = CONFIG["pad_token_id"]
T = max(len(s) for s in IDS)
B = len(IDS)


def layer_names(n):
    p = f"bert.encoder.layer.{n}."
    return {
        "query": p + "attention.self.query", "key": p + "attention.self.key", "value": p + "attention.self.value",
        "attn_out": p + "attention.output.dense", "attn_ln": p + "attention.output.LayerNorm",
        "inter": p + "intermediate.dense", "out": p + "output.dense", "out_ln": p + "output.LayerNorm",
    }


def make_parameters(gen):
    """Every parameter of BertForSequenceClassification, random and non-trivial, in state-dict order."""
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    def ln_weight(n):
        return 1 + (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * 0.3

    p = {}
    p["bert.embeddings.word_embeddings.weight"] = randn(V, H, scale=0.8)
    p["bert.embeddings.position_embeddings.weight"] = randn(P, H, scale=0.5)
    p["bert.embeddings.token_type_embeddings.weight"] = randn(CONFIG["type_vocab_size"], H, scale=0.5)
    p["bert.embeddings.LayerNorm.weight"] = ln_weight(H)
    p["bert.embeddings.LayerNorm.bias"] = randn(H, scale=0.1)
    for n in range(L):
        m = layer_names(n)
        for key in ("query", "key", "value", "attn_out"):
            p[m[key] + ".weight"] = randn(H, H, scale=0.5)
            p[m[key] + ".bias"] = randn(H, scale=0.1)
        p[m["attn_ln"] + ".weight"] = ln_weight(H)
        p[m["attn_ln"] + ".bias"] = randn(H, scale=0.1)
        p[m["inter"] + ".weight"] = randn(I, H, scale=0.5)
        p[m["inter"] + ".bias"] = randn(I, scale=0.1)
        p[m["out"] + ".weight"] = randn(H, I, scale=0.4)
        p[m["out"] + ".bias"] = randn(H, scale=0.1)
        p[m["out_ln"] + ".weight"] = ln_weight(H)
        p[m["out_ln"] + ".bias"] = randn(H, scale=0.1)
    p["bert.pooler.dense.weight"] = randn(H, H, scale=0.5)
    p["bert.pooler.dense.bias"] = randn(H, scale=0.1)
    p["classifier.weight"] = randn(NL, H, scale=0.8)
    p["classifier.bias"] = randn(NL, scale=0.1)
    return p


def make_adapter(gen, base):
    """PEFT's trainable tensors, under the adapter file's names without "base_model.model."."""
    a = {}
    for n in range(L):
        m = layer_names(n)
        for t in TARGETS:
            # init_lora_weights = false: both A and B random (B = 0 would hide B's gradient path).
            a[m[t] + ".lora_A.weight"] = torch.randn(R, H, generator=gen, dtype=torch.float64) * 0.4
            a[m[t] + ".lora_B.weight"] = torch.randn(H, R, generator=gen, dtype=torch.float64) * 0.4
    # modules_to_save: a trained copy of the classifier.
    a["classifier.weight"] = base["classifier.weight"] + torch.randn(NL, H, generator=gen, dtype=torch.float64) * 0.3
    a["classifier.bias"] = base["classifier.bias"] + torch.randn(NL, generator=gen, dtype=torch.float64) * 0.2
    return a


def padded_inputs():
    ids = torch.full((B, T), PAD, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.float64)
    for b, seq in enumerate(IDS):
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
    return ids, mask, torch.tensor(LABELS)


def layer_norm(x, w, b):
    return torch.nn.functional.layer_norm(x, (H,), w, b, EPS)


def bert_forward(p, ids, mask, labels, adapter=None):
    """transformers' BertForSequenceClassification.forward, eval mode; adapter: PEFT's LoRA + saved head."""
    F = torch.nn.functional

    def linear(x, name):
        y = F.linear(x, p[name + ".weight"], p[name + ".bias"])
        if adapter is not None and name + ".lora_A.weight" in adapter:
            A, Bm = adapter[name + ".lora_A.weight"], adapter[name + ".lora_B.weight"]
            y = y + F.linear(F.linear(x, A), Bm) * SCALING  # PEFT: lora_B(lora_A(dropout(x))) * scaling
        return y

    # Embeddings (token_type_ids all 0, position_ids 0 .. T-1).
    emb = p["bert.embeddings.word_embeddings.weight"][ids]
    emb = emb + p["bert.embeddings.token_type_embeddings.weight"][torch.zeros_like(ids)]
    emb = emb + p["bert.embeddings.position_embeddings.weight"][torch.arange(T)].unsqueeze(0)
    h = layer_norm(emb, p["bert.embeddings.LayerNorm.weight"], p["bert.embeddings.LayerNorm.bias"])

    # transformers' get_extended_attention_mask: (1 - mask) * finfo.min, broadcast over heads and queries.
    extended = ((1.0 - mask) * torch.finfo(torch.float64).min)[:, None, None, :]
    d = H // NH

    def heads(x):  # [B, T, H] -> [B, NH, T, d]
        return x.view(B, T, NH, d).permute(0, 2, 1, 3)

    for n in range(L):
        m = layer_names(n)
        q, k, v = heads(linear(h, m["query"])), heads(linear(h, m["key"])), heads(linear(h, m["value"]))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d) + extended
        probs = torch.softmax(scores, dim=-1)
        context = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(B, T, H)
        a1 = layer_norm(linear(context, m["attn_out"]) + h, p[m["attn_ln"] + ".weight"], p[m["attn_ln"] + ".bias"])
        inter = F.gelu(linear(a1, m["inter"]))
        h = layer_norm(linear(inter, m["out"]) + a1, p[m["out_ln"] + ".weight"], p[m["out_ln"] + ".bias"])

    pooled = torch.tanh(linear(h[:, 0], "bert.pooler.dense"))
    head = adapter if adapter is not None else p
    logits = F.linear(pooled, head["classifier.weight"], head["classifier.bias"])
    loss = F.cross_entropy(logits.view(-1, NL), labels.view(-1))
    return {"logits": logits, "loss": loss, "last_hidden_state": h.reshape(B * T, H), "pooled": pooled}


def modules_forward(p, ids, mask, labels, adapter=None):
    """The same model from torch.nn modules (a second implementation): nn.TransformerEncoderLayer is BERT's
    post-norm layer with the projections fused (in_proj = [query; key; value]). The LoRA model runs with
    merged weights W + scaling B A and the classifier copy. Returns the outputs and the modules."""
    nn = torch.nn
    f64 = dict(dtype=torch.float64)
    word, pos, tt = nn.Embedding(V, H, **f64), nn.Embedding(P, H, **f64), nn.Embedding(2, H, **f64)
    emb_ln = nn.LayerNorm(H, eps=EPS, **f64)
    layers = [nn.TransformerEncoderLayer(H, NH, I, dropout=0.0, activation="gelu", layer_norm_eps=EPS,
                                         batch_first=True, norm_first=False, **f64) for _ in range(L)]
    pooler, classifier = nn.Linear(H, H, **f64), nn.Linear(H, NL, **f64)

    def merged(name):
        w = p[name + ".weight"]
        if adapter is not None and name + ".lora_A.weight" in adapter:
            w = w + SCALING * adapter[name + ".lora_B.weight"] @ adapter[name + ".lora_A.weight"]
        return w

    with torch.no_grad():
        word.weight.copy_(p["bert.embeddings.word_embeddings.weight"])
        pos.weight.copy_(p["bert.embeddings.position_embeddings.weight"])
        tt.weight.copy_(p["bert.embeddings.token_type_embeddings.weight"])
        emb_ln.weight.copy_(p["bert.embeddings.LayerNorm.weight"])
        emb_ln.bias.copy_(p["bert.embeddings.LayerNorm.bias"])
        for n, layer in enumerate(layers):
            m = layer_names(n)
            layer.self_attn.in_proj_weight.copy_(torch.cat([merged(m[k]) for k in ("query", "key", "value")]))
            layer.self_attn.in_proj_bias.copy_(torch.cat([p[m[k] + ".bias"] for k in ("query", "key", "value")]))
            layer.self_attn.out_proj.weight.copy_(p[m["attn_out"] + ".weight"])
            layer.self_attn.out_proj.bias.copy_(p[m["attn_out"] + ".bias"])
            layer.norm1.weight.copy_(p[m["attn_ln"] + ".weight"])
            layer.norm1.bias.copy_(p[m["attn_ln"] + ".bias"])
            layer.linear1.weight.copy_(p[m["inter"] + ".weight"])
            layer.linear1.bias.copy_(p[m["inter"] + ".bias"])
            layer.linear2.weight.copy_(p[m["out"] + ".weight"])
            layer.linear2.bias.copy_(p[m["out"] + ".bias"])
            layer.norm2.weight.copy_(p[m["out_ln"] + ".weight"])
            layer.norm2.bias.copy_(p[m["out_ln"] + ".bias"])
        pooler.weight.copy_(p["bert.pooler.dense.weight"])
        pooler.bias.copy_(p["bert.pooler.dense.bias"])
        head = adapter if adapter is not None else p
        classifier.weight.copy_(head["classifier.weight"])
        classifier.bias.copy_(head["classifier.bias"])
    for layer in layers:
        layer.train()  # dropout is 0; training mode keeps torch off its fused inference path
    x = emb_ln(word(ids) + tt(torch.zeros_like(ids)) + pos(torch.arange(T)).unsqueeze(0))
    padding = mask == 0
    for layer in layers:
        x = layer(x, src_key_padding_mask=padding)
    pooled = torch.tanh(pooler(x[:, 0]))
    logits = classifier(pooled)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    out = {"logits": logits, "loss": loss, "last_hidden_state": x.reshape(B * T, H), "pooled": pooled}
    return out, dict(word=word, pos=pos, tt=tt, emb_ln=emb_ln, layers=layers, pooler=pooler, classifier=classifier)


def module_grads(mods):
    """The second implementation's gradients under the checkpoint's names."""
    g = {
        "bert.embeddings.word_embeddings.weight": mods["word"].weight.grad,
        "bert.embeddings.position_embeddings.weight": mods["pos"].weight.grad,
        "bert.embeddings.token_type_embeddings.weight": mods["tt"].weight.grad,
        "bert.embeddings.LayerNorm.weight": mods["emb_ln"].weight.grad,
        "bert.embeddings.LayerNorm.bias": mods["emb_ln"].bias.grad,
        "bert.pooler.dense.weight": mods["pooler"].weight.grad, "bert.pooler.dense.bias": mods["pooler"].bias.grad,
        "classifier.weight": mods["classifier"].weight.grad, "classifier.bias": mods["classifier"].bias.grad,
    }
    for n, layer in enumerate(mods["layers"]):
        m = layer_names(n)
        wq, wk, wv = layer.self_attn.in_proj_weight.grad.split(H)
        bq, bk, bv = layer.self_attn.in_proj_bias.grad.split(H)
        g.update({m["query"] + ".weight": wq, m["key"] + ".weight": wk, m["value"] + ".weight": wv,
                  m["query"] + ".bias": bq, m["key"] + ".bias": bk, m["value"] + ".bias": bv,
                  m["attn_out"] + ".weight": layer.self_attn.out_proj.weight.grad,
                  m["attn_out"] + ".bias": layer.self_attn.out_proj.bias.grad,
                  m["attn_ln"] + ".weight": layer.norm1.weight.grad, m["attn_ln"] + ".bias": layer.norm1.bias.grad,
                  m["inter"] + ".weight": layer.linear1.weight.grad, m["inter"] + ".bias": layer.linear1.bias.grad,
                  m["out"] + ".weight": layer.linear2.weight.grad, m["out"] + ".bias": layer.linear2.bias.grad,
                  m["out_ln"] + ".weight": layer.norm2.weight.grad, m["out_ln"] + ".bias": layer.norm2.bias.grad})
    return g


def max_rel(a, b):
    # Relative to the tensor's largest entry, floored at 1e-3: the key biases' gradients are 0 in exact
    # arithmetic (softmax ignores a shift shared by all keys), so both sides hold only rounding noise.
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-3)).item()


def check(label, got, want, tol=1e-12):
    err = max_rel(got, want)
    if not err <= tol:
        raise SystemExit(f"check failed: {label}: relative error {err:.3e} > {tol:.0e}")
    return err


def verify(base, adapter, ids, mask, labels, ref, lora_ref):
    """The two implementations agree; autograd agrees with finite differences; the mask does what it says."""
    worst = 0.0
    # Base model: outputs and every gradient.
    out, mods = modules_forward(base, ids, mask, labels)
    out["loss"].backward()
    for k in ("logits", "loss", "last_hidden_state", "pooled"):
        worst = max(worst, check(k, out[k].detach(), ref[k]))
    for name, g in module_grads(mods).items():
        worst = max(worst, check("grad." + name, g, ref["grad." + name]))
    # LoRA model through merged weights: d/dA = s B^T G and d/dB = s G A^T for G = dL/dW of the merged weight.
    out, mods = modules_forward(base, ids, mask, labels, adapter)
    out["loss"].backward()
    for k in ("logits", "loss", "last_hidden_state"):
        worst = max(worst, check("lora." + k, out[k].detach(), lora_ref[k]))
    g = module_grads(mods)
    for n in range(L):
        m = layer_names(n)
        for t in TARGETS:
            G, A, Bm = g[m[t] + ".weight"], adapter[m[t] + ".lora_A.weight"], adapter[m[t] + ".lora_B.weight"]
            worst = max(worst, check("lora.grad A " + m[t], SCALING * Bm.t() @ G, lora_ref["grad." + m[t] + ".lora_A.weight"]))
            worst = max(worst, check("lora.grad B " + m[t], SCALING * G @ A.t(), lora_ref["grad." + m[t] + ".lora_B.weight"]))
    worst = max(worst, check("lora.grad classifier.weight", g["classifier.weight"], lora_ref["grad.classifier.weight"]))
    worst = max(worst, check("lora.grad classifier.bias", g["classifier.bias"], lora_ref["grad.classifier.bias"]))

    # Finite differences (torch.autograd.gradcheck, float64) on a few parameters of the plain implementation.
    for name in ("bert.embeddings.LayerNorm.weight", "bert.encoder.layer.0.attention.self.key.weight",
                 "bert.encoder.layer.1.intermediate.dense.bias", "bert.pooler.dense.weight"):
        def f(x, name=name):
            q = dict(base)
            q[name] = x
            return bert_forward(q, ids, mask, labels)["loss"]
        if not torch.autograd.gradcheck(f, (base[name].clone().requires_grad_(True),), eps=1e-6, atol=1e-8):
            raise SystemExit(f"gradcheck failed for {name}")

    # The mask: a padding token's id changes nothing of the real positions, the logits or the loss.
    other = ids.clone()
    other[mask == 0] = 17
    with torch.no_grad():
        a, b = bert_forward(base, ids, mask, labels), bert_forward(base, other, mask, labels)
    real = (mask.reshape(-1) == 1)
    if not (torch.equal(a["logits"], b["logits"]) and
            torch.equal(a["last_hidden_state"][real], b["last_hidden_state"][real])):
        raise SystemExit("padding ids leak into the real positions")
    # Nothing is trivial: gradients of both the embeddings and the head are non-zero, padding rows differ.
    for k in ("grad.bert.embeddings.LayerNorm.bias", "grad.bert.encoder.layer.0.attention.self.key.weight",
              "grad.classifier.bias"):
        if ref[k].abs().max() < 1e-6:
            raise SystemExit(f"{k} is (nearly) zero")
    return worst


def main():
    gen = torch.Generator().manual_seed(20240917)
    base = make_parameters(gen)
    adapter = make_adapter(gen, base)
    ids, mask, labels = padded_inputs()

    # Base model: forward and every parameter's gradient.
    leaves = {k: v.clone().requires_grad_(True) for k, v in base.items()}
    out = bert_forward(leaves, ids, mask, labels)
    out["loss"].backward()
    ref = {k: v.detach() for k, v in out.items()}
    ref["loss"] = ref["loss"].reshape(1)
    for k, v in leaves.items():
        ref["grad." + k] = v.grad.detach()

    # LoRA model: the base frozen, the adapter's tensors trainable.
    lora_leaves = {k: v.clone().requires_grad_(True) for k, v in adapter.items()}
    out = bert_forward(base, ids, mask, labels, lora_leaves)
    out["loss"].backward()
    lora_ref = {k: v.detach() for k, v in out.items() if k != "pooled"}
    lora_ref["loss"] = lora_ref["loss"].reshape(1)
    for k, v in lora_leaves.items():
        lora_ref["grad." + k] = v.grad.detach()

    worst = verify(base, adapter, ids, mask, labels, ref, lora_ref)

    os.makedirs(os.path.join(OUT, "adapter"), exist_ok=True)
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2, sort_keys=True)
        f.write("\n")

    def entries(tensors):
        # The reference writer's layout: by decreasing element size, then by name.
        items = [(k, dt, tuple(v.shape), tensor_bytes(v.numpy(), dt)) for k, (dt, v) in tensors.items()]
        return sorted(items, key=lambda e: (-len(e[3]) // max(1, int(np.prod(e[2]))), e[0]))

    model = {k: ("F64", v) for k, v in base.items()}
    model["bert.embeddings.position_ids"] = ("I64", torch.arange(P).reshape(1, P))  # as older transformers save it
    write_safetensors(os.path.join(OUT, "model.safetensors"), entries(model), metadata={"format": "pt"})

    saved = {PREFIX + k: ("F64", v) for k, v in adapter.items()}
    write_safetensors(os.path.join(OUT, "adapter", "adapter_model.safetensors"), entries(saved),
                      metadata={"format": "pt"})
    adapter_config = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": None, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": False, "layers_pattern": None,
        "layers_to_transform": None, "lora_alpha": ALPHA, "lora_dropout": 0.0, "modules_to_save": ["classifier"],
        "peft_type": "LORA", "r": R, "rank_pattern": {}, "revision": None, "target_modules": list(TARGETS),
        "task_type": "SEQ_CLS", "use_rslora": False,
    }
    with open(os.path.join(OUT, "adapter", "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
        f.write("\n")

    with open(os.path.join(OUT, "inputs.json"), "w") as f:
        f.write('{\n  "ids": %s,\n  "labels": %s,\n  "pad_id": %d\n}\n' % (json.dumps(IDS), json.dumps(LABELS), PAD))

    reference = {k: ("F64", v) for k, v in ref.items()}
    reference.update({"lora." + k: ("F64", v) for k, v in lora_ref.items()})
    write_safetensors(os.path.join(OUT, "reference.safetensors"), entries(reference),
                      metadata={"format": "pt", "torch": torch.__version__,
                                "mask": "torch.finfo(float64).min added to the scores of padding keys"})
    print(f"wrote {OUT}: loss {ref['loss'].item():.12f}, lora.loss {lora_ref['loss'].item():.12f}; "
          f"second implementation agrees to {worst:.1e} (relative, max over all tensors)")


if __name__ == "__main__":
    main()
