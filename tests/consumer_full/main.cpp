// A first program with lora.hpp, written as a new user would write it against the installed package:
// pretrain a small MLP on task A (Gaussian blobs of classes 0-4), put LoRA into it, fine-tune on task B
// (classes 5-9) with AdamW, save the adapter, reload it onto a fresh base, merge; then feed the library
// bad input and expect a clear exception for each. Exits 1 if any check fails or any bad input is
// accepted.
#include <lora/data.hpp>
#include <lora/io.hpp>
#include <lora/lora.hpp>
#include <lora/optim.hpp>

#include <cmath>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using Model = lora::nn::Sequential<float>;
using Data = lora::data::Dataset<float>;

namespace {

constexpr int kDim = 16, kClasses = 10, kHidden = 64;

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok    " : "FAILED", what.c_str());
  if (!ok) ++failures;
}

// `bad` must throw std::invalid_argument or lora::io_error whose message starts with "<function>: " and
// contains every string of `names` (the file, the tensor, ...).
void expect_error(const std::string& what, const std::string& function, const std::function<void()>& bad,
                  const std::vector<std::string>& names = {}) {
  try {
    bad();
  } catch (const std::exception& e) {
    const std::string message = e.what();
    const bool typed = dynamic_cast<const std::invalid_argument*>(&e) || dynamic_cast<const lora::io_error*>(&e);
    std::string missing = message.rfind(function + ": ", 0) == 0 ? "" : " [does not start with " + function + ": ]";
    for (const std::string& name : names)
      if (message.find(name) == std::string::npos) missing += " [does not name " + name + "]";
    check(typed && missing.empty(),
          what + " -> " + message + (typed ? "" : " [not invalid_argument or io_error]") + missing);
    return;
  }
  check(false, what + " -> accepted without an exception");
}

// Blobs: one centre per class, drawn once; `per_class` samples of each of classes [first, first + count).
std::vector<std::vector<float>> centres() {
  std::mt19937 rng(2024);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  std::vector<std::vector<float>> c(kClasses, std::vector<float>(kDim));
  for (auto& centre : c)
    for (float& x : centre) x = u(rng);
  return c;
}

Data blobs(int first, int count, int per_class, unsigned seed) {
  static const auto c = centres();
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> noise(-1.0f, 1.0f);
  Data d;
  d.num_classes = kClasses;
  d.X.resize(count * per_class, kDim);
  for (int k = 0; k < count; ++k)
    for (int i = 0; i < per_class; ++i) {
      const int row = k * per_class + i;
      for (int j = 0; j < kDim; ++j) d.X(row, j) = c[first + k][j] + noise(rng);
      d.y.push_back(first + k);
    }
  return d;
}

// 16 -> 64 -> ReLU -> 64 -> ReLU -> 10: paths layers.0, layers.2, layers.4 (the head).
Model make_base(std::uint64_t seed) {
  Model m;
  m.add(lora::nn::Linear<float>(kDim, kHidden, true, seed));
  m.add(lora::nn::ReLU<float>());
  m.add(lora::nn::Linear<float>(kHidden, kHidden, true, seed + 1));
  m.add(lora::nn::ReLU<float>());
  m.add(lora::nn::Linear<float>(kHidden, kClasses, true, seed + 2));
  return m;
}

void train(Model& model, const Data& data, int epochs, double lr) {
  lora::optim::AdamWOptions options;
  options.lr = lr;
  lora::optim::AdamW<float> optimizer(options);
  auto params = model.parameters();
  lora::data::MiniBatches<float> batches(data, 32, /*seed=*/3);
  for (int epoch = 0; epoch < epochs; ++epoch) {
    batches.shuffle();
    lora::nn::train_epoch(model, batches, [&] { optimizer.step(params); });
  }
}

lora::nn::LoraInjectConfig lora_config() {
  lora::nn::LoraInjectConfig config;
  config.target_modules = {"layers.0", "layers.2"};
  config.modules_to_save = {"layers.4"};
  config.rank = 4;
  config.alpha = 8;
  config.seed = 5;
  return config;
}

double max_abs_diff(const lora::Matrix<float>& a, const lora::Matrix<float>& b) {
  return (a - b).cwiseAbs().maxCoeff();
}

void copy_truncated(const fs::path& from, const fs::path& to, std::uintmax_t bytes) {
  fs::copy_file(from, to, fs::copy_options::overwrite_existing);
  fs::resize_file(to, bytes);
}

}  // namespace

int main(int argc, char** argv) {
  const fs::path dir = argc > 1 ? fs::path(argv[1]) : fs::temp_directory_path() / "lora_consumer_full";
  fs::remove_all(dir);
  fs::create_directories(dir);

  const Data a_train = blobs(0, 5, 100, 1), a_test = blobs(0, 5, 50, 2);
  const Data b_train = blobs(5, 5, 100, 3), b_test = blobs(5, 5, 50, 4);

  // ---- pretrain on A, save the base ----------------------------------------------------------------
  Model base = make_base(1);
  train(base, a_train, 15, 1e-3);
  const double base_a = lora::nn::evaluate_accuracy(base, a_test), base_b = lora::nn::evaluate_accuracy(base, b_test);
  check(base_a > 0.9, "pretrained base: accuracy on A " + std::to_string(base_a) + " > 0.9");
  check(base_b < 0.1, "pretrained base: accuracy on B " + std::to_string(base_b) + " < 0.1 (B's classes unseen)");
  lora::save_base_weights((dir / "base.safetensors").string(), base);

  // ---- LoRA on the hidden layers, the head trained in full, fine-tune on B ---------------------------
  Model tuned = base;
  lora::nn::inject_lora(tuned, lora_config());
  const lora::Index expected_trainable = 4 * (kDim + kHidden) + 4 * (kHidden + kHidden) + kHidden * kClasses + kClasses;
  check(tuned.num_trainable_parameters() == expected_trainable,
        "inject_lora: " + lora::nn::summary(tuned) + ", expected " + std::to_string(expected_trainable) + " trainable");
  check(tuned.lora_layers().size() == 2, "inject_lora: 2 LoRA layers");
  train(tuned, b_train, 15, 3e-3);
  const double tuned_b = lora::nn::evaluate_accuracy(tuned, b_test);
  check(tuned_b > 0.9, "LoRA fine-tuning: accuracy on B " + std::to_string(tuned_b) + " > 0.9");
  lora::save_adapter((dir / "adapter").string(), tuned);
  check(fs::exists(dir / "adapter" / "adapter_config.json") && fs::exists(dir / "adapter" / "adapter_model.safetensors"),
        "save_adapter: adapter_config.json and adapter_model.safetensors written");

  // ---- reload onto a fresh base: the same outputs --------------------------------------------------
  Model reloaded = make_base(99);  // other weights until loaded
  lora::load_base_weights((dir / "base.safetensors").string(), reloaded);
  const lora::PeftLoraConfig config = lora::from_pretrained(reloaded, (dir / "adapter").string());
  check(config.r == 4 && config.lora_alpha == 8, "from_pretrained: r = 4, lora_alpha = 8 read back");
  tuned.eval();
  reloaded.eval();
  const lora::Matrix<float> expected = tuned.forward(b_test.X);
  check(reloaded.forward(b_test.X) == expected, "from_pretrained: outputs identical to the trained model's");

  // ---- merge: the same outputs up to float rounding --------------------------------------------------
  Model merged = reloaded;
  merged.merge();
  const double merge_diff = max_abs_diff(merged.forward(b_test.X), expected);
  check(merged.merged() && merge_diff < 1e-4,
        "merge: largest difference " + std::to_string(merge_diff) + " < 1e-4");
  Model plain = reloaded;
  lora::nn::merge_and_unload(plain);
  const double unload_diff = max_abs_diff(plain.forward(b_test.X), expected);
  check(plain.lora_layers().empty() && unload_diff < 1e-4,
        "merge_and_unload: no LoRA layer left, largest difference " + std::to_string(unload_diff) + " < 1e-4");

  // ---- modules_to_save: the original head stays; disabling the adapters gives the base back ------------
  {
    const lora::Matrix<float> base_out = [&] {
      base.eval();
      return lora::Matrix<float>(base.forward(a_test.X));
    }();
    const lora::ActiveAdapterState state = lora::disable_adapters(tuned);
    const double disabled_a = lora::nn::evaluate_accuracy(tuned, a_test);
    const double diff = max_abs_diff(tuned.forward(a_test.X), base_out);
    check(diff < 1e-5 && disabled_a == base_a, "disable_adapters: the base model back (accuracy on A " +
                                                   std::to_string(disabled_a) + ", largest difference " +
                                                   std::to_string(diff) + ")");
    lora::enable_adapters(tuned, state);
    check(tuned.forward(b_test.X) == expected, "enable_adapters: the tuned outputs again");
  }
  // After merge_and_unload the head copy trains on, the merged layers are frozen (PEFT's trainable set).
  {
    std::vector<std::string> names;
    for (const auto& p : plain.parameters()) names.push_back(p.name);
    check(names == std::vector<std::string>{"layers.4.weight", "layers.4.bias"},
          "merge_and_unload: trainable are layers.4.weight and layers.4.bias only");
  }
  // predict gives classes, logits and probabilities.
  {
    lora::Matrix<float> probabilities;
    lora::nn::predict_proba(reloaded, b_test.X, probabilities);
    const double sum_error = (probabilities.rowwise().sum().array() - 1.0f).abs().maxCoeff();
    check(sum_error < 1e-5, "predict_proba: rows sum to 1 (largest error " + std::to_string(sum_error) + ")");
    const lora::nn::EvalStats held_out = lora::nn::evaluate(reloaded, b_test);
    check(held_out.accuracy == tuned_b && held_out.loss > 0 && held_out.loss < 1,
          "evaluate: held-out loss " + std::to_string(held_out.loss) + ", accuracy " + std::to_string(held_out.accuracy));
  }

  // ---- bad input: each must throw, naming the function ------------------------------------------------
  std::printf("bad input:\n");
  expect_error("forward with 15 columns", "Sequential::forward",
               [&] { base.forward(lora::Matrix<float>::Zero(3, kDim - 1)); });
  expect_error("add a layer whose width does not chain", "Sequential::add", [&] {
    Model m;
    m.add(lora::nn::Linear<float>(kDim, 8));
    m.add(lora::nn::Linear<float>(9, 2));
  });
  expect_error("set_base_tensor of the wrong shape", "Sequential::set_base_tensor",
               [&] { reloaded.set_base_tensor("layers.4.weight", lora::Matrix<float>::Zero(kClasses, kHidden + 1)); });
  expect_error("assign a 3 x 3 value to an adapter's lora_A", "ParamRef::operator=",
               [&] { tuned.lora_layers().front().second->A() = lora::Matrix<float>::Zero(3, 3); });
  {
    Model m = base;
    auto bad = lora_config();
    bad.rank = 0;
    const lora::Matrix<float> before = m.forward(a_test.X);
    expect_error("inject_lora with rank 0", "inject_lora", [&] { lora::nn::inject_lora(m, bad); });
    check(m.lora_layers().empty() && m.forward(a_test.X) == before, "inject_lora with rank 0: the model is unchanged");
  }
  expect_error("inject_lora with an unknown target name", "inject_lora", [&] {
    Model m = base;
    auto bad = lora_config();
    bad.target_modules = {"layers.0", "layers.9"};
    lora::nn::inject_lora(m, bad);
  });
  expect_error("inject_lora twice", "inject_lora", [&] { lora::nn::inject_lora(tuned, lora_config()); });
  expect_error("AdamW with lr = NaN", "AdamW::AdamW", [] {
    lora::optim::AdamWOptions options;
    options.lr = std::numeric_limits<double>::quiet_NaN();
    lora::optim::AdamW<float> optimizer(options);
  });
  expect_error("AdamW::step on a parameter list taken before inject_lora", "AdamW::step", [&] {
    Model m = base;
    auto params = m.parameters();
    lora::nn::inject_lora(m, lora_config());
    lora::optim::AdamW<float> optimizer;
    optimizer.step(params);
  });
  expect_error("AdamW::step on a parameter list taken before set_trainable", "AdamW::step", [&] {
    Model m = base;
    auto params = m.parameters();
    dynamic_cast<lora::nn::Linear<float>&>(m.module("layers.0")).set_trainable(false);
    lora::optim::AdamW<float> optimizer;
    optimizer.step(params);
  });
  {
    Data d = a_test;
    d.y[7] = kClasses;
    expect_error("mini-batches of labels outside [0, 10)", "MiniBatches::MiniBatches",
                 [&] { lora::data::MiniBatches<float> batches(d, 32); }, {"label 10"});
    expect_error("evaluate_accuracy on labels outside [0, 10)", "evaluate_accuracy",
                 [&] { lora::nn::evaluate_accuracy(base, d); }, {"label 10"});
  }
  expect_error("evaluate_accuracy on data of 15 features", "evaluate_accuracy", [&] {
    Data d = a_test;
    d.X.conservativeResize(Eigen::NoChange, kDim - 1);
    lora::nn::evaluate_accuracy(base, d);
  });
  expect_error("from_pretrained on a directory that does not exist", "read_adapter_config", [&] {
    Model m = base;
    lora::from_pretrained(m, (dir / "no_such_adapter").string());
  }, {(dir / "no_such_adapter").string()});
  expect_error("from_pretrained on a model that already has LoRA", "from_pretrained",
               [&] { lora::from_pretrained(reloaded, (dir / "adapter").string()); });
  expect_error("from_pretrained onto a base of other widths", "load_adapter", [&] {
    Model m;
    m.add(lora::nn::Linear<float>(kDim, kHidden + 1));
    m.add(lora::nn::ReLU<float>());
    m.add(lora::nn::Linear<float>(kHidden + 1, kHidden));
    m.add(lora::nn::ReLU<float>());
    m.add(lora::nn::Linear<float>(kHidden, kClasses));
    lora::from_pretrained(m, (dir / "adapter").string());
  }, {"adapter_model.safetensors", "layers.0"});
  {
    const fs::path truncated = dir / "truncated_adapter";
    fs::create_directories(truncated);
    fs::copy_file(dir / "adapter" / "adapter_config.json", truncated / "adapter_config.json");
    const auto size = fs::file_size(dir / "adapter" / "adapter_model.safetensors");
    copy_truncated(dir / "adapter" / "adapter_model.safetensors", truncated / "adapter_model.safetensors", size - 16);
    expect_error("from_pretrained on a truncated adapter_model.safetensors", "read_safetensors", [&] {
      Model m = base;
      lora::from_pretrained(m, truncated.string());
    }, {(truncated / "adapter_model.safetensors").string()});
  }
  {
    const fs::path truncated = dir / "truncated_base.safetensors";
    copy_truncated(dir / "base.safetensors", truncated, 100);
    expect_error("load_base_weights on a truncated file", "read_safetensors", [&] {
      Model m = make_base(7);
      lora::load_base_weights(truncated.string(), m);
    }, {truncated.string()});
  }
  {
    // A file that fails while its weights load (a head bias missing): the model is left as it was, and a
    // retry with the good adapter works.
    const fs::path broken = dir / "broken_adapter";
    fs::create_directories(broken);
    fs::copy_file(dir / "adapter" / "adapter_config.json", broken / "adapter_config.json");
    const auto good = lora::SafetensorsReader::open((dir / "adapter" / "adapter_model.safetensors").string());
    lora::SafetensorsWriter writer;
    for (const lora::TensorInfo& t : good.tensors()) {
      if (t.name == "base_model.model.layers.4.bias") continue;
      if (t.shape.size() == 1)
        writer.add_vector(t.name, good.vector<float>(t.name, static_cast<lora::Index>(t.shape[0])));
      else
        writer.add(t.name, good.matrix<float>(t.name));
    }
    writer.save((broken / "adapter_model.safetensors").string());
    Model m = base;
    expect_error("from_pretrained on an adapter without the head's bias", "load_adapter",
                 [&] { lora::from_pretrained(m, broken.string()); }, {"layers.4.bias"});
    check(m.lora_layers().empty() && m.saved_modules().empty(), "failed from_pretrained: no LoRA left in the model");
    lora::from_pretrained(m, (dir / "adapter").string());
    m.eval();
    check(m.forward(b_test.X) == expected, "from_pretrained after a failed one: the trained outputs");
  }
  expect_error("predict on a row of NaN", "predict", [&] {
    lora::Matrix<float> X = b_test.X.topRows(4);
    X.row(2).setConstant(std::numeric_limits<float>::quiet_NaN());
    std::vector<int> classes;
    lora::nn::predict(reloaded, X, classes);
  }, {"row 2"});
  expect_error("AdamW::step on a parameter list taken before set_active_adapters", "AdamW::step", [&] {
    Model m = base;
    auto config = lora_config();
    config.modules_to_save.clear();
    lora::nn::inject_lora(m, config);
    lora::add_adapter(m, "other", config);
    auto params = m.parameters();
    lora::set_active_adapters(m, {"other"});
    lora::optim::AdamW<float> optimizer;
    optimizer.step(params);
  }, {"layers.0.lora_A.default.weight"});
  expect_error("save_base_weights of a merged model", "save_base_weights",
               [&] { lora::save_base_weights((dir / "merged.safetensors").string(), merged); });

  fs::remove_all(dir);
  std::printf("%s: %d check(s) failed\n", failures == 0 ? "consumer_full: ok" : "consumer_full: FAILED", failures);
  return failures == 0 ? 0 : 1;
}
