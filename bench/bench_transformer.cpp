// One training step of examples/finetune_transformer's model, timed step by step, for the comparison with
// the same model in PyTorch (bench/transformer_pytorch.py; bench/transformer_step.py runs both, alternating).
//
//   bench_transformer --shape char|minilm --mode lora|full [--threads T] [--warmup W] [--budget S]
//                     [--min-steps N] [--max-steps N]
//
// Shapes: char = finetune_transformer's character-level BERT (vocab 100, hidden 96, 2 layers, 4 heads,
// intermediate 384, 16 positions; batch 64, lengths 5..15); minilm = all-MiniLM-L6-v2's shape (vocab
// 30522, hidden 384, 6 layers, 12 heads, intermediate 1536, 512 positions; batch 32, lengths 4..12).
// Dropout 0.1 (hidden and attention), 6 labels. Modes: lora = LoRA r 4, alpha 8 on query and value, the
// classifier trained (inject_lora); full = every parameter trained. A step: zero_grad, training forward,
// softmax cross-entropy, backward, AdamW over the trainable parameters.
//
// Prints one JSON line: parameter counts, the median / min / max step time and the medians of its phases
// (forward with the loss, backward, optimizer), peak RSS (getrusage) and the resident set before the model
// was built, after it (and the LoRA injection), after the warm-up and at the end. A plain main rather than Google Benchmark: both implementations report
// the same statistic (the median of per-step times after the same warm-up), one mode per process.
#include <lora/lora.hpp>
#include <lora/nn/bert_model.hpp>
#include <lora/optim.hpp>

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using lora::Index;
using Model = lora::nn::BertForSequenceClassification<float>;

long peak_rss_kib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;  // KiB on Linux
}

// The resident set now (Linux: /proc/self/statm). ru_maxrss survives exec (a child starts at its parent's
// high-water mark), so the baseline before the model is read here instead.
long current_rss_kib() {
  long pages = 0, resident = 0;
  if (std::FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

struct Shape {
  lora::nn::BertConfig config;
  Index batch = 0, min_len = 0, max_len = 0;
};

Shape make_shape(const std::string& name) {
  Shape s;
  lora::nn::BertConfig& c = s.config;
  if (name == "char") {
    c.vocab_size = 100;
    c.hidden_size = 96;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.intermediate_size = 384;
    c.max_position_embeddings = 16;
    s.batch = 64;
    s.min_len = 5;
    s.max_len = 15;
  } else if (name == "minilm") {
    c.vocab_size = 30522;
    c.hidden_size = 384;
    c.num_hidden_layers = 6;
    c.num_attention_heads = 12;
    c.intermediate_size = 1536;
    c.max_position_embeddings = 512;
    s.batch = 32;
    s.min_len = 4;
    s.max_len = 12;
  } else {
    lora::detail::fail("bench_transformer", "unknown shape '", name, "' (char or minilm)");
  }
  c.hidden_dropout_prob = 0.1;
  c.attention_probs_dropout_prob = 0.1;
  c.num_labels = 6;
  return s;
}

// The same 64-bit LCG as bench/transformer_pytorch.py, so both draw the same lengths and token ids.
struct Lcg {
  std::uint64_t state;
  std::uint64_t next() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return state >> 33;
  }
};

std::vector<std::vector<Index>> make_sequences(const Shape& s) {
  Lcg rng{12345};
  std::vector<std::vector<Index>> seqs(static_cast<std::size_t>(s.batch));
  const auto span = static_cast<std::uint64_t>(s.max_len - s.min_len + 1);
  const auto ids = static_cast<std::uint64_t>(s.config.vocab_size - 1);
  for (auto& seq : seqs) {
    seq.resize(static_cast<std::size_t>(s.min_len + static_cast<Index>(rng.next() % span)));
    for (Index& id : seq) id = 1 + static_cast<Index>(rng.next() % ids);  // never the padding id 0
  }
  return seqs;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n == 0 ? 0.0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

int usage(const char* argv0) {
  std::fprintf(stderr,
               "usage: %s --shape char|minilm --mode lora|full [--threads T] [--warmup W] [--budget S] "
               "[--min-steps N] [--max-steps N]\n",
               argv0);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  const long rss_before = current_rss_kib();
  std::string shape_name = "char", mode = "lora";
  int threads = 1, warmup = 3, min_steps = 10, max_steps = 500;
  double budget_s = 3.0;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) return usage(argv[0]);
    const char* v = argv[++i];
    if (a == "--shape") shape_name = v;
    else if (a == "--mode") mode = v;
    else if (a == "--threads") threads = std::max(1, std::atoi(v));
    else if (a == "--warmup") warmup = std::max(0, std::atoi(v));
    else if (a == "--budget") budget_s = std::atof(v);
    else if (a == "--min-steps") min_steps = std::max(1, std::atoi(v));
    else if (a == "--max-steps") max_steps = std::max(1, std::atoi(v));
    else return usage(argv[0]);
  }
  if (mode != "lora" && mode != "full") return usage(argv[0]);
  lora::set_num_threads(threads);

  const Shape shape = make_shape(shape_name);
  const lora::nn::TokenBatch batch(make_sequences(shape), shape.config.vocab_size);
  std::vector<int> labels(static_cast<std::size_t>(shape.batch));
  for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int>(i % 6);

  Model model(shape.config, /*seed=*/1);
  const Index total = model.num_parameters();
  if (mode == "lora") {
    lora::nn::LoraInjectConfig c;
    c.target_modules = {"query", "value"};
    c.modules_to_save = {"classifier"};
    c.rank = 4;
    c.alpha = 8;
    c.init = lora::InitMethod::random;  // B != 0: a trained-looking adapter (B = 0 costs the same)
    c.seed = 5;
    lora::nn::inject_lora(model, c);
  }
  model.train(true);
  auto params = model.parameters();
  lora::optim::AdamWOptions options;  // lr 1e-3, weight decay 1e-2: torch.optim.AdamW's defaults
  lora::optim::AdamW<float> optimizer(options);
  lora::nn::SoftmaxCrossEntropy<float> loss;
  const long rss_model = current_rss_kib();  // the model, injected, and the (still empty) optimizer

  double last_loss = 0, fwd_ms = 0, bwd_ms = 0, opt_ms = 0;
  auto step = [&] {
    auto t0 = std::chrono::steady_clock::now();
    model.zero_grad();
    last_loss = loss.forward(model.forward(batch), labels);
    fwd_ms = ms_since(t0);
    t0 = std::chrono::steady_clock::now();
    model.backward(loss.backward());
    bwd_ms = ms_since(t0);
    t0 = std::chrono::steady_clock::now();
    optimizer.step(params);
    opt_ms = ms_since(t0);
  };
  for (int i = 0; i < warmup; ++i) step();
  const long rss_warm = current_rss_kib();
  std::vector<double> total_ms, fwd, bwd, opt;
  const auto start = std::chrono::steady_clock::now();
  while (static_cast<int>(total_ms.size()) < max_steps &&
         (static_cast<int>(total_ms.size()) < min_steps || ms_since(start) < 1e3 * budget_s)) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    total_ms.push_back(ms_since(t0));
    fwd.push_back(fwd_ms);
    bwd.push_back(bwd_ms);
    opt.push_back(opt_ms);
  }
  std::printf("{\"impl\": \"lora.hpp\", \"shape\": \"%s\", \"mode\": \"%s\", \"threads\": %d, \"parameters\": %ld, "
              "\"trainable\": %ld, \"tensors\": %zu, \"rows\": %ld, \"optimizer_state_bytes\": %zu, \"median_ms\": %.4f, "
              "\"min_ms\": %.4f, \"max_ms\": %.4f, \"fwd_ms\": %.4f, \"bwd_ms\": %.4f, \"opt_ms\": %.4f, \"steps\": %zu, "
              "\"warmup\": %d, \"loss\": %.6f, \"peak_rss_kib\": %ld, \"rss_before_kib\": %ld, \"rss_model_kib\": %ld, "
              "\"rss_warm_kib\": %ld, \"rss_now_kib\": %ld}\n",
              shape_name.c_str(), mode.c_str(), threads, static_cast<long>(total),
              static_cast<long>(model.num_trainable_parameters()), params.size(), static_cast<long>(batch.num_rows()),
              optimizer.state_bytes(), median(total_ms), *std::min_element(total_ms.begin(), total_ms.end()),
              *std::max_element(total_ms.begin(), total_ms.end()), median(fwd), median(bwd), median(opt),
              total_ms.size(), warmup, last_loss, peak_rss_kib(), rss_before, rss_model, rss_warm, current_rss_kib());
  return 0;
}
