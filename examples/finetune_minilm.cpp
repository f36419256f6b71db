// finetune_minilm: finetune_transformer's task B (tell the language of a word: it pt nl da no ca, from
// Debian's word lists) on a real pretrained model, sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers,
// hidden 384, 12 heads, intermediate 1536, WordPiece vocabulary of 30,522), instead of a small base
// pretrained on task A. Every method starts from a fresh copy of the pretrained weights with a new 6-way
// head on the pooler (Hugging Face's BertForSequenceClassification): frozen base (untrained head), head
// only, LoRA on {q}, {v}, {q, v}, {q, k, v, o}, all linear layers, full fine-tuning. One table with the
// columns of finetune_transformer's main table, so the two can be read side by side: does a real
// pretrained model make LoRA's job easier?
//
// The held-out and training words are finetune_transformer's (the same make_split call, seed 4048); --words N
// keeps the first N of each language's training words (default: all of them, as finetune_transformer).
// The LoRA {q, v} adapter is saved into --out/adapter (a PEFT directory) and reloaded onto a freshly
// loaded MiniLM (load_bert + from_pretrained), which must give the same held-out accuracy.
//
// Options: --model DIR (required: the model's directory, config.json + model.safetensors + vocab.txt;
// scripts/finetune_minilm.sh installs it), --out DIR (default finetune_minilm_out), --threads N (default 2,
// or the number of cores if fewer), --words N (training words per language), --epochs N, --quick (a smoke run).
#include "transformer_common.hpp"

#include <lora/quant/model.hpp>
#include <lora/text/wordpiece.hpp>

#include <filesystem>
#include <functional>
#include <thread>

namespace {

using example::Model;
using example::Row;
using example::lora_on;

// The first `per_language` words of each label, in the split's order (already shuffled per language).
std::vector<example::Word> first_per_label(const std::vector<example::Word>& words, std::size_t per_language) {
  std::map<int, std::size_t> taken;
  std::vector<example::Word> out;
  for (const example::Word& w : words)
    if (taken[w.label]++ < per_language) out.push_back(w);
  return out;
}

int usage(const char* problem) {
  std::fprintf(stderr,
               "finetune_minilm: %s\n"
               "usage: finetune_minilm --model DIR [--out DIR] [--threads N] [--words N] [--epochs N] [--quick]\n"
               "  --model DIR  all-MiniLM-L6-v2's directory (config.json, model.safetensors, vocab.txt);\n"
               "               scripts/finetune_minilm.sh installs it and passes it\n",
               problem);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir, out = "finetune_minilm_out";
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  int threads = cores > 0 ? std::min(2, cores) : 2;
  int words_arg = 0, epochs_arg = 0;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--model" && i + 1 < argc) model_dir = argv[++i];
    else if (a == "--out" && i + 1 < argc) out = argv[++i];
    else if (a == "--threads" && i + 1 < argc) threads = std::max(1, std::atoi(argv[++i]));
    else if (a == "--words" && i + 1 < argc) words_arg = std::max(1, std::atoi(argv[++i]));
    else if (a == "--epochs" && i + 1 < argc) epochs_arg = std::max(1, std::atoi(argv[++i]));
    else if (a == "--quick") quick = true;
    else return usage(("unknown or incomplete option '" + a + "'").c_str());
  }
  if (model_dir.empty()) return usage("--model DIR is required");
  try {
    lora::set_num_threads(threads);
    // finetune_transformer's split (1,000 training and 500 held-out words per language asked for, seed
    // 4048): the same held-out words. Only the training words are cut.
    const std::size_t split_words = 1000, test_words = 500;
    const std::size_t train_words = words_arg > 0 ? static_cast<std::size_t>(words_arg) : quick ? 40 : split_words;
    const int epochs = epochs_arg > 0 ? epochs_arg : quick ? 1 : 2;
    const lora::Index batch = 32;

    // ---- data and model ------------------------------------------------------------------------------
    std::printf("Reading the word lists under /usr/share/dict and %s ...\n", model_dir.c_str());
    std::fflush(stdout);
    const auto t_data = std::chrono::steady_clock::now();
    const example::Split b = example::make_split(example::task_b_languages(), split_words, test_words, 4048);
    const std::vector<example::Word> b_train_words = first_per_label(b.train, train_words);
    std::vector<example::Word> b_test_words = b.test;
    if (quick) b_test_words = first_per_label(b.test, 50);
    const auto tokenizer = lora::text::WordPieceTokenizer::from_file((std::filesystem::path(model_dir) / "vocab.txt").string());
    auto encode = [&](const std::string& w) { return tokenizer.encode(w); };
    const lora::Index V = tokenizer.vocab_size();
    example::Batches b_train = example::make_batches(b_train_words, batch, V, encode, 3);
    const example::Batches b_test = example::make_batches(b_test_words, 256, V, encode, 4);
    std::size_t pieces = 0;
    for (const example::Word& w : b_test_words) pieces += tokenizer.encode(w.text).size() - 2;

    const lora::Index labels_b = static_cast<lora::Index>(example::task_b_languages().size());
    lora::BertLoadOptions options;
    options.num_labels = labels_b;
    options.seed = 7;
    lora::BertLoadReport report;
    const auto base = lora::load_bert<example::Scalar>(model_dir, options, &report);
    const lora::nn::BertConfig& config = base->config();
    const std::string train_note = b_train_words.size() == b.train.size()
                                       ? std::string("finetune_transformer's")
                                       : "at most " + std::to_string(train_words) + " per language of finetune_transformer's " +
                                             std::to_string(b.train.size());
    std::printf("Task B (it pt nl da no ca): %zu training words (%s) / %zu held-out words (finetune_transformer's%s), "
                "%.2f WordPiece tokens per held-out word; %.1f s. Threads: %d.\n",
                b_train_words.size(), train_note.c_str(), b_test_words.size(), quick ? ", cut to 50 per language" : "",
                static_cast<double>(pieces) / static_cast<double>(b_test_words.size()), example::seconds_since(t_data),
                threads);
    std::printf("Pretrained BERT (%s): %ld layers, hidden %ld, %ld heads, intermediate %ld, vocabulary %ld; %s "
                "parameters; new: ",
                model_dir.c_str(), static_cast<long>(config.num_hidden_layers), static_cast<long>(config.hidden_size),
                static_cast<long>(config.num_attention_heads), static_cast<long>(config.intermediate_size),
                static_cast<long>(config.vocab_size), lora::nn::with_thousands(base->num_parameters()).c_str());
    for (std::size_t i = 0; i < report.initialized.size(); ++i)
      std::printf("%s%s", i ? ", " : "", report.initialized[i].c_str());
    std::printf("\n\n");

    // ---- adapt to B ----------------------------------------------------------------------------------
    const lora::Index base_params = base->num_parameters() - base->classifier().num_parameters();
    std::vector<Row> rows;
    std::unique_ptr<Model> qv_model;
    auto run = [&](const std::string& method, const std::function<void(Model&)>& prepare, double lr, int run_epochs) {
      example::reset_peak_rss();
      auto model = example::for_task(*base, labels_b, 7);
      prepare(*model);
      Row r;
      r.method = method;
      r.trainable = model->num_trainable_parameters();
      r.percent = 100.0 * static_cast<double>(r.trainable) / static_cast<double>(base_params);
      r.base_bytes = lora::quant::base_bytes(*model);
      const example::TrainStats s = example::train(*model, b_train, run_epochs, lr, method);
      r.accuracy = example::evaluate(*model, b_test);
      r.seconds = s.seconds;
      r.optimizer_bytes = s.optimizer_bytes;
      r.rss_mib = example::peak_rss_mib();
      std::printf("  %-22s held-out accuracy %.3f\n", method.c_str(), r.accuracy);
      std::fflush(stdout);
      rows.push_back(r);
      return model;
    };
    const int r_main = 8;
    const double lr_lora = 2e-3, lr_full = 1e-4, lr_head = 3e-3;
    std::printf("Adapting to task B, %d epochs each, batch %ld (AdamW, lr %.0e for LoRA, %.0e for the head alone, %.0e "
                "full; LoRA r = %d, alpha = 2 r; the head trained in every method; dropout 0.1 as config.json):\n",
                epochs, static_cast<long>(batch), lr_lora, lr_head, lr_full, r_main);
    const std::string r_text = " r=" + std::to_string(r_main);
    run("frozen base", [](Model& m) { m.set_requires_grad(false); }, lr_head, 0);
    run("head only", [](Model& m) {
      m.set_requires_grad(false);
      m.classifier().set_requires_grad(true);
    }, lr_head, epochs);
    run("LoRA {q}" + r_text, [&](Model& m) { lora::nn::inject_lora(m, lora_on({"query"}, r_main)); }, lr_lora, epochs);
    run("LoRA {v}" + r_text, [&](Model& m) { lora::nn::inject_lora(m, lora_on({"value"}, r_main)); }, lr_lora, epochs);
    qv_model = run("LoRA {q,v}" + r_text, [&](Model& m) { lora::nn::inject_lora(m, lora_on({"query", "value"}, r_main)); },
                   lr_lora, epochs);
    run("LoRA {q,k,v,o}" + r_text, [&](Model& m) {
      lora::nn::inject_lora(m, lora_on({"query", "key", "value", "attention.output.dense"}, r_main));
    }, lr_lora, epochs);
    run("LoRA all linear" + r_text, [&](Model& m) {
      lora::nn::inject_lora(m, lora_on({"query", "key", "value", "dense"}, r_main));
    }, lr_lora, epochs);
    run("full fine-tuning", [](Model&) {}, lr_full, epochs);

    // ---- table ---------------------------------------------------------------------------------------
    const double chance = rows[0].accuracy, head = rows[1].accuracy, full = rows[7].accuracy;
    std::printf("\nTask B on all-MiniLM-L6-v2, held-out words (%zu), base of %s parameters (the head excluded), %zu "
                "training words, %d epochs:\n\n",
                b_test_words.size(), lora::nn::with_thousands(base_params).c_str(), b_train_words.size(), epochs);
    std::printf("| method | trainable | %% of base | accuracy on B | gain vs full (from head only) | time (s) | "
                "optimizer state | base memory | RSS high-water (MiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (const Row& r : rows) {
      const double gain = full > head ? 100.0 * (r.accuracy - head) / (full - head) : 0.0;
      std::printf("| %s | %s | %.2f%% | %.3f | %.0f%% | %.1f | %s | %s | %.1f |\n", r.method.c_str(),
                  lora::nn::with_thousands(r.trainable).c_str(), r.percent, r.accuracy, gain, r.seconds,
                  lora::nn::with_thousands(static_cast<lora::Index>(r.optimizer_bytes)).c_str(),
                  lora::nn::with_thousands(static_cast<lora::Index>(r.base_bytes)).c_str(), r.rss_mib);
    }
    const Row& qv = rows[4];
    const double recovered = full > chance ? (qv.accuracy - chance) / (full - chance) : 0.0;
    const double recovered_head = full > head ? (qv.accuracy - head) / (full - head) : 0.0;
    std::printf("\nLoRA {q, v}%s with the head: %.2f%% of the base's parameters trainable; it recovers %.0f%% of full "
                "fine-tuning's gain over chance (%.0f%% of its gain over head only). Target: >= 95%% with <= 2%%: %s.\n",
                r_text.c_str(), qv.percent, 100 * recovered, 100 * recovered_head,
                recovered >= 0.95 && qv.percent <= 2.0 ? "met" : "NOT met");

    // ---- the adapter, saved and reloaded onto a fresh MiniLM -------------------------------------------
    const std::string adapter = (std::filesystem::path(out) / "adapter").string();
    std::filesystem::create_directories(out);
    lora::save_adapter(adapter, *qv_model);
    lora::BertLoadOptions reload_options;
    reload_options.num_labels = labels_b;
    reload_options.seed = 99;  // a different fresh head: the adapter's classifier must replace it
    auto reloaded = lora::load_bert<example::Scalar>(model_dir, reload_options);
    lora::from_pretrained(*reloaded, adapter);
    const double reloaded_accuracy = example::evaluate(*reloaded, b_test);
    std::printf("\nSaved %s (PEFT). Reloaded onto a freshly loaded MiniLM (load_bert + from_pretrained): held-out "
                "accuracy %.4f, in training %.4f: %s.\n",
                adapter.c_str(), reloaded_accuracy, qv.accuracy, reloaded_accuracy == qv.accuracy ? "the same" : "DIFFERENT");
    return reloaded_accuracy == qv.accuracy ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "finetune_minilm: %s\n", e.what());
    return 1;
  }
}
