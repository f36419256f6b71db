// finetune_transformer: LoRA where the paper puts it, on the query and value projections of a
// transformer encoder, on real words. A small character-level BERT is pretrained to tell the language of
// a word among six (task A: en de fr es sv pl), then adapted to six others (task B: it pt nl da no ca) in
// several ways, each from a copy of the same pretrained base with a new classification head:
// frozen base (untrained head), head only, LoRA on {q}, {v}, {q, v}, {q, k, v, o}, all linear layers,
// full fine-tuning, and LoRA {q, v} over an NF4 and an int8 base (QLoRA). One table compares trainable
// parameters, accuracy on held-out words (never seen in training), time, optimiser memory and peak RSS;
// a second one is the paper's Table 6 in miniature (one parameter budget, spent on Wq, Wv, Wq + Wv or all
// four); then the analysis of the adapters (subspace similarity, amplification) beside the paper's.
//
// Files (in --out DIR, default finetune_transformer_out): base/ (the pretrained task-A model in Hugging
// Face's layout: config.json + model.safetensors), adapter/ (the LoRA {q, v} adapter for task B, a PEFT
// directory), chars.txt (the character vocabulary), b_test.txt (the held-out words with their labels), subspace_grid.csv (phi of the value
// adapters, r = 8 against r = 64, for bench/plot_subspace.sh). evaluate_transformer reloads base and
// adapter and must print the same accuracy.
//
// Options: --out DIR, --threads N (default 1), --quick (fewer words and epochs: a smoke run).
#include "transformer_common.hpp"

#include <lora/analysis.hpp>
#include <lora/quant/model.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>

namespace {

using example::Model;
using example::Row;
using example::lora_on;

}  // namespace

int main(int argc, char** argv) {
  std::string out = "finetune_transformer_out";
  int threads = 1;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--out" && i + 1 < argc) out = argv[++i];
    else if (a == "--threads" && i + 1 < argc) threads = std::max(1, std::atoi(argv[++i]));
    else if (a == "--quick") quick = true;
    else {
      std::fprintf(stderr, "usage: finetune_transformer [--out DIR] [--threads N] [--quick]\n");
      return 2;
    }
  }
  lora::set_num_threads(threads);
  const std::size_t a_words = quick ? 600 : 3000, b_words = quick ? 300 : 1000, test_words = quick ? 150 : 500;
  const int pretrain_epochs = quick ? 2 : 6, epochs = quick ? 2 : 8;
  const lora::Index batch = 64;

  // ---- data ----------------------------------------------------------------------------------------
  std::printf("Reading the word lists under /usr/share/dict ...\n");
  std::fflush(stdout);
  const auto t_data = std::chrono::steady_clock::now();
  const example::Split a = example::make_split(example::task_a_languages(), a_words, test_words, 2024);
  const example::Split b = example::make_split(example::task_b_languages(), b_words, test_words, 4048);
  const example::CharTokenizer tokenizer({&a.train, &a.test, &b.train, &b.test});
  auto encode = [&](const std::string& w) { return tokenizer.encode(w); };
  const lora::Index V = tokenizer.vocab_size();
  example::Batches a_train = example::make_batches(a.train, batch, V, encode, 1);
  const example::Batches a_test = example::make_batches(a.test, 256, V, encode, 2);
  example::Batches b_train = example::make_batches(b.train, batch, V, encode, 3);
  const example::Batches b_test = example::make_batches(b.test, 256, V, encode, 4);
  std::printf("Task A (en de fr es sv pl): %zu training / %zu held-out words; task B (it pt nl da no ca): %zu / %zu; "
              "%ld characters; %.1f s. Threads: %d.\n\n",
              a.train.size(), a.test.size(), b.train.size(), b.test.size(), static_cast<long>(V), example::seconds_since(t_data),
              threads);

  // ---- pretrain on A -------------------------------------------------------------------------------
  lora::nn::BertConfig config;
  config.vocab_size = V;
  config.hidden_size = 96;
  config.num_hidden_layers = 2;
  config.num_attention_heads = 4;
  config.intermediate_size = 384;
  config.max_position_embeddings = 16;
  config.num_labels = static_cast<lora::Index>(example::task_a_languages().size());
  config.hidden_dropout_prob = 0.1;
  config.attention_probs_dropout_prob = 0.1;
  Model base(config, 1);
  std::printf("Character-level BERT: %ld layers, hidden %ld, %ld heads, intermediate %ld; %s parameters.\n",
              static_cast<long>(config.num_hidden_layers), static_cast<long>(config.hidden_size),
              static_cast<long>(config.num_attention_heads), static_cast<long>(config.intermediate_size),
              lora::nn::with_thousands(base.num_parameters()).c_str());
  std::printf("Pretraining on task A (AdamW, lr 1e-3, batch %ld, dropout 0.1):\n", static_cast<long>(batch));
  example::train(base, a_train, pretrain_epochs, 1e-3, "pretrain A");
  const double a_accuracy = example::evaluate(base, a_test);
  std::printf("Task A held-out accuracy: %.3f (chance %.3f)\n\n", a_accuracy, 1.0 / 6);
  std::filesystem::create_directories(out);
  lora::save_bert((std::filesystem::path(out) / "base").string(), base);

  // ---- adapt to B ----------------------------------------------------------------------------------
  const lora::Index labels_b = static_cast<lora::Index>(example::task_b_languages().size());
  const lora::Index base_params = base.num_parameters() - base.classifier().num_parameters();
  std::vector<Row> rows;
  std::unique_ptr<Model> qv_model, qv8_model, qv64_model;
  auto run = [&](const std::string& method, const std::function<void(Model&)>& prepare, double lr, int run_epochs) {
    example::reset_peak_rss();
    auto model = example::for_task(base, labels_b, 7);
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
    rows.push_back(r);
    return model;
  };
  const double lr_lora = 3e-3, lr_full = 1e-3, lr_head = 3e-3;
  std::printf("Adapting to task B, %d epochs each (AdamW, LoRA alpha = 2 r, the head trained in every method):\n", epochs);
  run("frozen base", [](Model& m) { m.set_requires_grad(false); }, lr_head, 0);
  run("head only", [](Model& m) {
    m.set_requires_grad(false);
    m.classifier().set_requires_grad(true);
  }, lr_head, epochs);
  const int r_main = 4;
  run("LoRA {q} r=4", [&](Model& m) { lora::nn::inject_lora(m, lora_on({"query"}, r_main)); }, lr_lora, epochs);
  run("LoRA {v} r=4", [&](Model& m) { lora::nn::inject_lora(m, lora_on({"value"}, r_main)); }, lr_lora, epochs);
  qv_model = run("LoRA {q,v} r=4", [&](Model& m) { lora::nn::inject_lora(m, lora_on({"query", "value"}, r_main)); }, lr_lora, epochs);
  run("LoRA {q,k,v,o} r=4", [&](Model& m) {
    lora::nn::inject_lora(m, lora_on({"query", "key", "value", "attention.output.dense"}, r_main));
  }, lr_lora, epochs);
  run("LoRA all linear r=4", [&](Model& m) {
    lora::nn::inject_lora(m, lora_on({"query", "key", "value", "dense"}, r_main));
  }, lr_lora, epochs);
  run("full fine-tuning", [](Model&) {}, lr_full, epochs);
  for (const auto format : {lora::quant::Format::nf4, lora::quant::Format::int8}) {
    const std::string name = format == lora::quant::Format::nf4 ? "QLoRA {q,v} r=4, NF4" : "LoRA {q,v} r=4, int8 base";
    run(name, [&](Model& m) {
      lora::quant::QuantizeModelConfig q;
      q.format = format;
      q.skip_modules = {"classifier"};
      lora::quant::quantize_model(m, q);
      lora::nn::inject_lora(m, lora_on({"query", "value"}, r_main));
    }, lr_lora, epochs);
  }
  const std::size_t main_rows = rows.size();

  // The paper's Table 6: one budget (r = 8 on one matrix type per layer), spent on Wq, Wv, Wq + Wv, all four.
  std::printf("\nTable 6 in miniature (%ld trainable adapter parameters per layer):\n", static_cast<long>(8 * 2 * config.hidden_size));
  run("Wq r=8", [&](Model& m) { lora::nn::inject_lora(m, lora_on({"query"}, 8)); }, lr_lora, epochs);
  run("Wv r=8", [&](Model& m) { lora::nn::inject_lora(m, lora_on({"value"}, 8)); }, lr_lora, epochs);
  run("Wq, Wv r=4", [&](Model& m) { lora::nn::inject_lora(m, lora_on({"query", "value"}, 4)); }, lr_lora, epochs);
  run("Wq, Wk, Wv, Wo r=2", [&](Model& m) {
    lora::nn::inject_lora(m, lora_on({"query", "key", "value", "attention.output.dense"}, 2));
  }, lr_lora, epochs);
  // For the analysis: {q, v} at r = 8 and r = 64.
  qv8_model = run("Wq, Wv r=8", [&](Model& m) { lora::nn::inject_lora(m, lora_on({"query", "value"}, 8)); }, lr_lora, epochs);
  qv64_model = run("Wq, Wv r=64", [&](Model& m) { lora::nn::inject_lora(m, lora_on({"query", "value"}, 64)); }, lr_lora, epochs);

  // ---- tables ---------------------------------------------------------------------------------------
  const double chance = rows[0].accuracy, head = rows[1].accuracy, full = rows[7].accuracy;
  auto print_rows = [&](std::size_t begin, std::size_t end) {
    std::printf("| method | trainable | %% of base | accuracy on B | gain vs full (from head only) | time (s) | "
                "optimizer state | base memory | RSS high-water (MiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (std::size_t i = begin; i < end; ++i) {
      const Row& r = rows[i];
      const double gain = full > head ? 100.0 * (r.accuracy - head) / (full - head) : 0.0;
      std::printf("| %s | %s | %.2f%% | %.3f | %.0f%% | %.1f | %s | %s | %.1f |\n", r.method.c_str(),
                  lora::nn::with_thousands(r.trainable).c_str(), r.percent, r.accuracy, gain, r.seconds,
                  lora::nn::with_thousands(static_cast<lora::Index>(r.optimizer_bytes)).c_str(),
                  lora::nn::with_thousands(static_cast<lora::Index>(r.base_bytes)).c_str(), r.rss_mib);
    }
  };
  std::printf("\nTask B, held-out words (%zu), base of %s parameters (the head excluded):\n\n", b.test.size(),
              lora::nn::with_thousands(base_params).c_str());
  print_rows(0, main_rows);
  std::printf("\nTable 6 in miniature:\n\n");
  print_rows(main_rows, rows.size());
  const Row& qv = rows[4];
  const double recovered = (qv.accuracy - chance) / (full - chance);
  const double recovered_head = full > head ? (qv.accuracy - head) / (full - head) : 0.0;
  std::printf("\nLoRA {q, v} r=4 with the head: %.2f%% of the base's parameters trainable; it recovers %.0f%% of full "
              "fine-tuning's gain over chance (%.0f%% of its gain over head only). Target: >= 95%% with <= 2%%: %s.\n",
              qv.percent, 100 * recovered, 100 * recovered_head,
              recovered >= 0.95 && qv.percent <= 2.0 ? "met" : "NOT met");

  // ---- analysis of the adapters ------------------------------------------------------------------------
  auto lora_of = [](Model& m, const std::string& path) -> const lora::LoraLinear<example::Scalar>& {
    for (const auto& [p, layer] : m.lora_layers())
      if (p == path) return *layer;
    lora::detail::fail("lora_of", "no LoRA layer at ", path);
  };
  std::printf("\nAnalysis (the paper's Section 7; its numbers are for GPT-3 175B):\n");
  for (lora::Index layer = 0; layer < config.num_hidden_layers; ++layer) {
    const std::string p = "bert.encoder.layer." + std::to_string(layer) + ".attention.self.";
    const auto& v8 = lora_of(*qv8_model, p + "value");
    const auto& v64 = lora_of(*qv64_model, p + "value");
    const auto& q8 = lora_of(*qv8_model, p + "query");
    // A random pair of subspaces of dimensions i and j in R^d has phi about max(i, j) / d.
    std::printf("  layer %ld: phi(A_v r=8, A_v r=64, i, j=8): i=1 %.2f, i=8 %.2f (random: %.2f); "
                "phi(A_q, A_v, r=8, 8, 8) = %.2f\n",
                static_cast<long>(layer), lora::analysis::subspace_similarity(v8, "default", v64, "default", 1, 8),
                lora::analysis::subspace_similarity(v8, "default", v64, "default", 8, 8),
                8.0 / static_cast<double>(config.hidden_size),
                lora::analysis::subspace_similarity(q8, "default", v8, "default", 8, 8));
    const auto amp8 = lora::analysis::amplification_factor(v8, "default");
    const auto amp64 = lora::analysis::amplification_factor(v64, "default");
    std::printf("           amplification of dW_v: %.1f at r=8, %.1f at r=64 (paper: ~21.5 at r=4, ~1.9 at r=64)\n",
                amp8.factor, amp64.factor);
  }
  {  // the grid of the paper's Figure 3, for the last layer's value adapters
    const std::string p = "bert.encoder.layer." + std::to_string(config.num_hidden_layers - 1) + ".attention.self.value";
    const auto& v8 = lora_of(*qv8_model, p);
    const auto& v64 = lora_of(*qv64_model, p);
    const lora::Matrix<double> grid = lora::analysis::subspace_similarity_grid(v8, "default", v64, "default");
    std::ofstream csv(std::filesystem::path(out) / "subspace_grid.csv");
    csv << "i,j,phi\n";
    for (lora::Index i = 0; i < grid.rows(); ++i)
      for (lora::Index j = 0; j < grid.cols(); ++j) csv << i + 1 << ',' << j + 1 << ',' << grid(i, j) << '\n';
  }

  // ---- files -------------------------------------------------------------------------------------------
  lora::save_adapter((std::filesystem::path(out) / "adapter").string(), *qv_model);
  tokenizer.save((std::filesystem::path(out) / "chars.txt").string());
  {
    std::ofstream words(std::filesystem::path(out) / "b_test.txt");
    for (const example::Word& w : b.test) words << w.label << '\t' << w.text << '\n';
  }
  std::printf("\nSaved %s/base (Hugging Face layout), %s/adapter (PEFT), %s/b_test.txt; LoRA {q,v} accuracy %.4f.\n"
              "Reload both: evaluate_transformer --out %s\n",
              out.c_str(), out.c_str(), out.c_str(), qv.accuracy, out.c_str());
  return 0;
}
