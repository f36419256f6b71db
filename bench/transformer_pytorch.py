#!/usr/bin/python3
"""The model of bench/bench_transformer.cpp in plain PyTorch, one training step timed step by step.

    transformer_pytorch.py --shape char|minilm --mode lora|full [--threads T] [--budget S] ...

BERT as Hugging Face writes it (BertForSequenceClassification): word + position + token type 0
embeddings, LayerNorm (eps 1e-12), dropout; post-norm layers (self-attention with the additive padding
mask, exact erf GELU); pooler tanh(dense(first token)); dropout; classifier. LoRA the PEFT way on query
and value (base frozen, lora_A kaiming-uniform, lora_B nonzero for timing, scaling alpha / r, lora_dropout
0 = Identity), the classifier trained (modules_to_save); full mode trains everything. A step: zero_grad
(set_to_none), training forward, F.cross_entropy, backward, torch.optim.AdamW (lr 1e-3, weight decay 1e-2)
over the requires_grad parameters. Same shapes, lengths and token ids as the C++ side (the same LCG).

Prints one JSON line like bench_transformer's. Thread settings and the allocator come from the
environment and --threads (torch.set_num_threads); bench/transformer_step.py sets them. Debian's
/usr/bin/python3 with python3-torch.
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from compare_pytorch import timed  # noqa: E402  (two warm-up calls, then min_reps..max_reps within a budget)

SHAPES = {
    "char": dict(vocab=100, hidden=96, layers=2, heads=4, intermediate=384, positions=16, batch=64,
                 min_len=5, max_len=15),
    "minilm": dict(vocab=30522, hidden=384, layers=6, heads=12, intermediate=1536, positions=512, batch=32,
                   min_len=4, max_len=12),
}
LABELS = 6
DROPOUT = 0.1
EPS = 1e-12


def lcg(seed):
    """The 64-bit LCG of bench_transformer.cpp."""
    state = seed
    while True:
        state = (state * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        yield state >> 33


def make_batch(s):
    rng = lcg(12345)
    seqs = []
    for _ in range(s["batch"]):
        n = s["min_len"] + next(rng) % (s["max_len"] - s["min_len"] + 1)
        seqs.append([1 + next(rng) % (s["vocab"] - 1) for _ in range(n)])
    T = max(len(q) for q in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T)
    for b, q in enumerate(seqs):
        ids[b, :len(q)] = torch.tensor(q)
        mask[b, :len(q)] = 1
    labels = torch.tensor([i % LABELS for i in range(len(seqs))])
    return ids, mask, labels


class LoraLinear(torch.nn.Module):
    """PEFT's lora.Linear: base(x) + lora_B(lora_A(dropout(x))) * scaling, base frozen."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = torch.nn.Linear(base.in_features, r, bias=False)
        self.lora_B = torch.nn.Linear(r, base.out_features, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        torch.nn.init.normal_(self.lora_B.weight, std=0.02)  # PEFT: zeros; nonzero costs the same
        self.lora_dropout = torch.nn.Identity()
        self.scaling = alpha / r

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class SelfAttention(torch.nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = torch.nn.Linear(hidden, hidden)
        self.key = torch.nn.Linear(hidden, hidden)
        self.value = torch.nn.Linear(hidden, hidden)
        self.dropout = torch.nn.Dropout(DROPOUT)

    def split(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x, ext_mask):
        q, k, v = self.split(self.query(x)), self.split(self.key(x)), self.split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + ext_mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
        return ctx.view(x.shape)


class Layer(torch.nn.Module):
    def __init__(self, hidden, heads, intermediate):
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.attention_dense = torch.nn.Linear(hidden, hidden)
        self.attention_norm = torch.nn.LayerNorm(hidden, eps=EPS)
        self.intermediate = torch.nn.Linear(hidden, intermediate)
        self.output = torch.nn.Linear(intermediate, hidden)
        self.output_norm = torch.nn.LayerNorm(hidden, eps=EPS)
        self.dropout = torch.nn.Dropout(DROPOUT)

    def forward(self, x, ext_mask):
        h = self.attention_norm(self.dropout(self.attention_dense(self.attention(x, ext_mask))) + x)
        return self.output_norm(self.dropout(self.output(F.gelu(self.intermediate(h)))) + h)


class Bert(torch.nn.Module):
    def __init__(self, s):
        super().__init__()
        H = s["hidden"]
        self.word = torch.nn.Embedding(s["vocab"], H)
        self.position = torch.nn.Embedding(s["positions"], H)
        self.token_type = torch.nn.Embedding(2, H)
        self.norm = torch.nn.LayerNorm(H, eps=EPS)
        self.dropout = torch.nn.Dropout(DROPOUT)
        self.layers = torch.nn.ModuleList(Layer(H, s["heads"], s["intermediate"]) for _ in range(s["layers"]))
        self.pooler = torch.nn.Linear(H, H)
        self.classifier = torch.nn.Linear(H, LABELS)
        for m in self.modules():  # Hugging Face's _init_weights
            if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.word.weight[0].zero_()

    def forward(self, ids, ext_mask, positions, types):
        x = self.dropout(self.norm(self.word(ids) + self.position(positions) + self.token_type(types)))
        for layer in self.layers:
            x = layer(x, ext_mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(self.dropout(pooled))


def inject_lora(model, r=4, alpha=8):
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        layer.attention.query = LoraLinear(layer.attention.query, r, alpha)
        layer.attention.value = LoraLinear(layer.attention.value, r, alpha)
    for p in model.classifier.parameters():
        p.requires_grad_(True)


def current_rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="char")
    ap.add_argument("--mode", choices=["lora", "full"], default="lora")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave the default)")
    ap.add_argument("--config", default="", help="a label for the output")
    ap.add_argument("--foreach", action="store_true", help="AdamW(foreach=True), the multi-tensor implementation")
    ap.add_argument("--jit", choices=["none", "trace", "script"], default="none",
                    help="run the forward through torch.jit.trace / torch.jit.script (same parameters)")
    ap.add_argument("--warmup", type=int, default=1, help="steps before timed()'s own two warm-up steps")
    ap.add_argument("--budget", type=float, default=3.0, help="seconds of timed steps (at least --min-steps)")
    ap.add_argument("--min-steps", type=int, default=10)
    ap.add_argument("--max-steps", type=int, default=500)
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rss_before = current_rss_kib()  # after `import torch`; ru_maxrss would start at the parent's mark
    torch.manual_seed(0)
    s = SHAPES[args.shape]
    ids, mask, labels = make_batch(s)
    B, T = ids.shape
    ext_mask = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]
    positions = torch.arange(T).expand(B, T)
    types = torch.zeros_like(ids)
    model = Bert(s)
    total = sum(p.numel() for p in model.parameters())
    if args.mode == "lora":
        inject_lora(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    forward = model
    if args.jit == "trace":
        forward = torch.jit.trace(model, (ids, ext_mask, positions, types), check_trace=False)
    elif args.jit == "script":
        forward = torch.jit.script(model)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, foreach=args.foreach or None)
    rss_model = current_rss_kib()
    phases = {"fwd": [], "bwd": [], "opt": []}
    last = {}

    def step():
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(forward(ids, ext_mask, positions, types), labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        last.update(fwd=t1 - t0, bwd=t2 - t1, opt=t3 - t2, loss=loss.item())

    for _ in range(args.warmup):
        step()
    rss_warm = current_rss_kib()

    def recorded_step():
        step()
        for k in phases:
            phases[k].append(last[k] * 1e3)

    times = [t * 1e3 for t in timed(recorded_step, args.budget, args.min_steps, args.max_steps)]
    for k in phases:
        del phases[k][:2]  # timed()'s two warm-up calls
    state = sum(v.numel() * v.element_size() for st in optimizer.state.values() for v in st.values()
                if torch.is_tensor(v) and v.numel() > 1)
    env = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "OPENBLAS_", "MALLOC_", "MKL_"))}
    print(json.dumps({
        "impl": "pytorch", "config": args.config, "shape": args.shape, "mode": args.mode,
        "threads": torch.get_num_threads(), "openblas_threads": env.get("OPENBLAS_NUM_THREADS", ""),
        "foreach": args.foreach, "jit": args.jit, "parameters": total, "trainable": sum(p.numel() for p in params),
        "tensors": len(params), "rows": B * T, "optimizer_state_bytes": state,
        "median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
        "fwd_ms": statistics.median(phases["fwd"]), "bwd_ms": statistics.median(phases["bwd"]),
        "opt_ms": statistics.median(phases["opt"]), "steps": len(times), "warmup": args.warmup + 2,
        "loss": last["loss"], "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "rss_before_kib": rss_before, "rss_model_kib": rss_model, "rss_warm_kib": rss_warm,
        "rss_now_kib": current_rss_kib(), "torch_version": torch.__version__, "env": env}))


if __name__ == "__main__":
    main()
