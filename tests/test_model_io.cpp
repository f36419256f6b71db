// Adapter and base-weight files for an nn::Sequential model: round trips and from_pretrained.
#include <lora/io.hpp>

#include "instances.hpp"

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

using lora::Index;

namespace {

lora::nn::Sequential<double> small_mlp(std::uint64_t seed) {
  lora::nn::Sequential<double> m;
  m.add(lora::nn::Linear<double>(6, 8, true, seed));
  m.add(lora::nn::ReLU<double>());
  m.add(lora::nn::Linear<double>(8, 3, true, seed + 1));
  return m;
}

lora::nn::LoraInjectConfig inject_config() {
  lora::nn::LoraInjectConfig c;
  c.target_modules = {"layers.0"};
  c.modules_to_save = {"layers.2"};
  c.rank = 2;
  c.alpha = 3;
  c.init = lora::InitMethod::random;  // B != 0: the adapter changes the output
  return c;
}

}  // namespace

TEST_CASE("a model's base and adapter reload to the same outputs", "[io][model]") {
  const auto dir = std::filesystem::temp_directory_path() / "lora_test_model_io";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  auto trained = small_mlp(1);
  lora::nn::inject_lora(trained, inject_config());
  trained.saved_modules().front().second->copy("default").weight().set(0, 0, 0.75);  // a trained head
  lora::save_base_weights((dir / "base.safetensors").string(), trained, lora::Dtype::F64);
  lora::AdapterSaveOptions f64;
  f64.dtype = lora::Dtype::F64;
  lora::save_adapter((dir / "adapter").string(), trained, "default", f64);

  auto reloaded = small_mlp(99);  // different weights until loaded
  lora::load_base_weights((dir / "base.safetensors").string(), reloaded);
  const lora::PeftLoraConfig config = lora::from_pretrained(reloaded, (dir / "adapter").string());
  CHECK(config.r == 2);
  CHECK(config.lora_alpha == 3);
  const lora::Matrix<double> X = lora::Matrix<double>::Random(5, 6);
  trained.eval();
  reloaded.eval();
  const lora::Matrix<double> expected = trained.forward(X);
  CHECK(reloaded.forward(X) == expected);  // F64 files: bit-exact

  // A base file whose tensors do not fit the model is refused before anything is written.
  auto other = lora::nn::Sequential<double>();
  other.add(lora::nn::Linear<double>(6, 4, true, 5));
  const lora::Matrix<double> before = other.base_tensor("layers.0.weight");
  try {
    lora::load_base_weights((dir / "base.safetensors").string(), other);
    FAIL("no exception");
  } catch (const std::exception& e) {
    CHECK(std::string(e.what()).find("layers.0.weight") != std::string::npos);
  }
  CHECK(other.base_tensor("layers.0.weight") == before);
  std::filesystem::remove_all(dir);
}

TEST_CASE("a failed from_pretrained leaves the model exactly as it was; a retry works", "[io][model][errors]") {
  const auto dir = std::filesystem::temp_directory_path() / "lora_test_from_pretrained_rollback";
  std::filesystem::remove_all(dir);
  auto trained = small_mlp(1);
  lora::nn::inject_lora(trained, inject_config());
  lora::AdapterSaveOptions f64;
  f64.dtype = lora::Dtype::F64;
  lora::save_adapter((dir / "good").string(), trained, "default", f64);
  // Faults found only while loading the weights, after the config has been applied: a head weight of
  // the wrong shape, and a head bias missing.
  const auto good = lora::SafetensorsReader::open((dir / "good" / "adapter_model.safetensors").string());
  for (const char* kind : {"bad_shape", "no_bias"}) {
    std::filesystem::create_directories(dir / kind);
    std::filesystem::copy_file(dir / "good" / "adapter_config.json", dir / kind / "adapter_config.json");
    lora::SafetensorsWriter w;
    for (const lora::TensorInfo& t : good.tensors()) {
      if (std::string(kind) == "no_bias" && t.name == "base_model.model.layers.2.bias") continue;
      if (t.shape.size() == 1) {
        w.add_vector(t.name, good.vector<double>(t.name, static_cast<Index>(t.shape[0]), "test"), lora::Dtype::F64);
        continue;
      }
      lora::Matrix<double> m = good.matrix<double>(t.name, "test");
      if (std::string(kind) == "bad_shape" && t.name == "base_model.model.layers.2.weight") m.conservativeResize(2, 8);
      w.add(t.name, m, lora::Dtype::F64);
    }
    w.save((dir / kind / "adapter_model.safetensors").string());
  }

  auto model = small_mlp(1);
  lora::optim::AdamWOptions no_decay;
  no_decay.weight_decay = 0;  // with zero gradients, a step leaves the weights as they are
  lora::optim::AdamWd adam{no_decay};
  auto params = model.parameters();  // made before: must stay valid after a failed load
  const std::string before = model.describe();
  for (const char* kind : {"bad_shape", "no_bias"}) {
    INFO(kind);
    CHECK_THROWS(lora::from_pretrained(model, (dir / kind).string()));
    CHECK(model.lora_layers().empty());
    CHECK(model.saved_modules().empty());
    CHECK(model.lora_config() == nullptr);
    CHECK(model.describe() == before);
    CHECK(model.parameters().size() == params.size());
  }
  adam.step(params);  // the list made before the failed loads still matches the model
  lora::from_pretrained(model, (dir / "good").string());
  const lora::Matrix<double> X = lora::Matrix<double>::Random(4, 6);
  trained.eval();
  model.eval();
  CHECK(model.forward(X) == trained.forward(X));
  std::filesystem::remove_all(dir);
}

TEST_CASE("two adapters, each with its own head, save and reload apart", "[io][model][adapters]") {
  const auto dir = std::filesystem::temp_directory_path() / "lora_test_two_heads";
  std::filesystem::remove_all(dir);
  auto model = small_mlp(1);
  lora::nn::inject_lora(model, inject_config());
  lora::add_adapter(model, "second", inject_config());
  model.saved_modules().front().second->copy("default").weight().set(0, 0, 0.5);
  model.saved_modules().front().second->copy("second").weight().set(0, 0, -0.5);
  lora::set_active_adapters(model, {"second"});
  for (auto& [path, layer] : model.lora_layers()) layer->B("second").setRandom();
  const lora::Matrix<double> X = lora::Matrix<double>::Random(4, 6);
  model.eval();
  const lora::Matrix<double> y_second = model.forward(X);
  lora::set_active_adapters(model, {"default"});
  const lora::Matrix<double> y_default = model.forward(X);
  lora::disable_adapters(model);
  const lora::Matrix<double> y_base = model.forward(X);
  lora::AdapterSaveOptions f64;
  f64.dtype = lora::Dtype::F64;
  lora::save_adapter((dir / "default").string(), model, "default", f64);
  lora::save_adapter((dir / "second").string(), model, "second", f64);

  auto reloaded = small_mlp(1);
  lora::from_pretrained(reloaded, (dir / "default").string());
  lora::load_adapter((dir / "second").string(), reloaded, "second");
  reloaded.eval();
  CHECK(reloaded.forward(X) == y_default);
  lora::set_active_adapters(reloaded, {"second"});
  CHECK(reloaded.forward(X) == y_second);
  lora::disable_adapters(reloaded);
  CHECK(reloaded.forward(X) == y_base);
  // A hot swap replaces the adapter's weights and its head copy.
  lora::hot_swap_adapter((dir / "default").string(), reloaded, "second");
  lora::set_active_adapters(reloaded, {"second"});
  CHECK(reloaded.forward(X) == y_default);
  // A load that fails leaves no copy behind.
  CHECK_THROWS(lora::load_adapter((dir / "second").string(), reloaded, "second"));  // exists already
  std::filesystem::remove(dir / "second" / "adapter_model.safetensors");
  CHECK_THROWS(lora::load_adapter((dir / "second").string(), reloaded, "third"));
  CHECK(reloaded.saved_modules().front().second->adapter_names() == std::vector<std::string>{"default", "second"});
  std::filesystem::remove_all(dir);
}

// ---- PEFT's selection rules, read from files ---------------------------------------------------------

namespace {

void write_text(const std::filesystem::path& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
}

// Writes an adapter for small_mlp: layers.0 at rank r0, layers.2 at rank r2, and `config`.
void write_mlp_adapter(const std::filesystem::path& dir, Index r0, Index r2, const std::string& config) {
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  lora::SafetensorsWriter w;
  w.add("base_model.model.layers.0.lora_A.weight", lora::Matrix<double>::Random(r0, 6), lora::Dtype::F64);
  w.add("base_model.model.layers.0.lora_B.weight", lora::Matrix<double>::Random(8, r0), lora::Dtype::F64);
  w.add("base_model.model.layers.2.lora_A.weight", lora::Matrix<double>::Random(r2, 8), lora::Dtype::F64);
  w.add("base_model.model.layers.2.lora_B.weight", lora::Matrix<double>::Random(3, r2), lora::Dtype::F64);
  w.save((dir / "adapter_model.safetensors").string());
  write_text(dir / "adapter_config.json", config);
}

// A transformer's block layout: model.layers.{0,1,2}.{q,v} (4 -> 4) and model.layers.1.experts.0.w.
lora::nn::Sequential<double> blocks_model() {
  lora::nn::Sequential<double> layers;
  for (int i = 0; i < 3; ++i) {
    lora::nn::Sequential<double> block;
    block.add("q", lora::nn::Linear<double>(4, 4, true, static_cast<std::uint64_t>(i)));
    block.add("v", lora::nn::Linear<double>(4, 4, true, static_cast<std::uint64_t>(i) + 10));
    if (i == 1) {
      lora::nn::Sequential<double> expert, experts;
      expert.add("w", lora::nn::Linear<double>(4, 4, true, 20));
      experts.add("0", std::move(expert));
      block.add("experts", std::move(experts));
    }
    layers.add(std::to_string(i), std::move(block));
  }
  lora::nn::Sequential<double> model("model");
  model.add("layers", std::move(layers));
  return model;
}

// An adapter for blocks_model: rank-r weights for each listed module, and `config`.
void write_blocks_adapter(const std::filesystem::path& dir, const std::vector<std::pair<std::string, Index>>& modules,
                          const std::string& config) {
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  lora::SafetensorsWriter w;
  for (const auto& [path, r] : modules) {
    w.add("base_model.model." + path + ".lora_A.weight", lora::Matrix<double>::Random(r, 4), lora::Dtype::F64);
    w.add("base_model.model." + path + ".lora_B.weight", lora::Matrix<double>::Random(4, r), lora::Dtype::F64);
  }
  w.save((dir / "adapter_model.safetensors").string());
  write_text(dir / "adapter_config.json", config);
}

std::vector<std::string> lora_paths(const lora::nn::Sequential<double>& model) {
  std::vector<std::string> paths;
  for (const auto& entry : model.lora_layers()) paths.push_back(entry.first);
  return paths;
}

}  // namespace

TEST_CASE("from_pretrained and load_adapter read rank_pattern in file order, keys as regexes", "[io][model]") {
  const auto dir = std::filesystem::temp_directory_path() / "lora_test_pattern_order";
  struct Case {
    const char* name;
    Index r0, r2;
    double scaling0, scaling2;
    std::string config;
  };
  const std::vector<Case> cases = {
      // In file order "layers.2" (rank 2) comes first for layers.2 and "layers.0" (alpha 1) for layers.0;
      // in alphabetical order "2" (rank 5, more than layers.2's min(in, out) = 3) and "0" would.
      {"file order", 3, 2, 1.0 / 3.0, 3.0,
       R"({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["layers.0", "layers.2"],
           "rank_pattern": {"layers.2": 2, "2": 5}, "alpha_pattern": {"layers.0": 1, "0": 5}})"},
      // Keys are regular expressions matched against a trailing run of the path's components.
      {"regex keys", 3, 2, 2.0, 3.0,
       R"({"peft_type": "LORA", "r": 3, "lora_alpha": 6, "target_modules": ["layers.0", "layers.2"],
           "rank_pattern": {"layers\\.[2-9]": 2}})"},
  };
  for (const Case& k : cases) DYNAMIC_SECTION(k.name) {
    write_mlp_adapter(dir, k.r0, k.r2, k.config);
    auto injected = small_mlp(1);
    lora::nn::LoraInjectConfig c;
    c.target_modules = {"layers.0", "layers.2"};
    c.rank = 1;
    lora::nn::inject_lora(injected, c);
    lora::load_adapter(dir.string(), injected, "default", lora::AdapterLoadMode::replace);
    auto pretrained = small_mlp(1);
    REQUIRE_NOTHROW(lora::from_pretrained(pretrained, dir.string()));
    for (auto* model : {&injected, &pretrained}) {
      const auto layers = model->lora_layers();
      REQUIRE(layers.size() == 2);
      CHECK(layers[0].second->rank() == k.r0);
      CHECK(layers[0].second->scaling() == Approx(k.scaling0));
      CHECK(layers[1].second->rank() == k.r2);
      CHECK(layers[1].second->scaling() == Approx(k.scaling2));
    }
    // The configuration the model records resolves as the file does.
    REQUIRE(pretrained.lora_config() != nullptr);
    CHECK(pretrained.lora_config()->layer_config("layers.0", 0).scaling() == Approx(k.scaling0));
    CHECK(pretrained.lora_config()->layer_config("layers.2", 1).rank == k.r2);
    const lora::Matrix<double> X = lora::Matrix<double>::Random(4, 6);
    injected.eval();
    pretrained.eval();
    CHECK(pretrained.forward(X) == injected.forward(X));
  }
  std::filesystem::remove_all(dir);
}

TEST_CASE("from_pretrained and load_adapter honour exclude_modules and layers_to_transform", "[io][model]") {
  using Paths = std::vector<std::string>;
  const auto dir = std::filesystem::temp_directory_path() / "lora_test_layer_selection";
  const std::string config =
      R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "v"],
          "layers_to_transform": [0, 2], "layers_pattern": "layers", "exclude_modules": ["2.v"]})";
  write_blocks_adapter(dir, {{"model.layers.0.q", 2}, {"model.layers.0.v", 2}, {"model.layers.2.q", 2}}, config);

  // Injection takes exactly the modules PEFT would have adapted, and the weights fit.
  auto pretrained = blocks_model();
  lora::from_pretrained(pretrained, dir.string());
  CHECK(lora_paths(pretrained) == Paths{"model.layers.0.q", "model.layers.0.v", "model.layers.2.q"});
  // The same weights through load_adapter, on a model with LoRA everywhere.
  auto everywhere = blocks_model();
  lora::nn::LoraInjectConfig c;
  c.target_modules = {"q", "v", "w"};
  c.rank = 1;
  lora::nn::inject_lora(everywhere, c);
  lora::load_adapter(dir.string(), everywhere, "file");
  lora::set_active_adapters(lora::model_view(everywhere), {"file"});
  const lora::Matrix<double> X = lora::Matrix<double>::Random(3, 4);
  pretrained.eval();
  everywhere.eval();
  CHECK(pretrained.forward(X) == everywhere.forward(X));

  // A module the config targets whose weights are missing is the file's fault, now that the loader
  // knows which modules PEFT targeted.
  write_blocks_adapter(dir, {{"model.layers.0.q", 2}, {"model.layers.2.q", 2}}, config);
  auto model = blocks_model();
  lora::nn::inject_lora(model, c);
  try {
    lora::load_adapter(dir.string(), model, "file");
    FAIL("no exception");
  } catch (const lora::io_error& e) {
    CHECK(e.tensor() == "base_model.model.model.layers.0.v.lora_A.weight");
    CHECK_THAT(e.what(), Catch::Contains("matched by target_modules but the file has no LoRA weights"));
  }

  // model.layers.1.experts.0.w is in layer 1 or 0 depending on PEFT's version: refused, naming the field.
  write_blocks_adapter(dir, {{"model.layers.0.q", 2}},
                       R"({"peft_type": "LORA", "r": 2, "target_modules": ["q", "w"], "layers_to_transform": 0})");
  auto ambiguous = blocks_model();
  try {
    lora::from_pretrained(ambiguous, dir.string());
    FAIL("no exception");
  } catch (const lora::io_error& e) {
    CHECK(e.file() == (dir / "adapter_config.json").string());
    CHECK_THAT(e.what(), Catch::Contains("layers_to_transform: the layer index of 'model.layers.1.experts.0.w' is "
                                         "ambiguous"));
  }
  CHECK(ambiguous.lora_layers().empty());
  model = blocks_model();
  lora::nn::inject_lora(model, c);
  try {
    lora::load_adapter(dir.string(), model, "file");
    FAIL("no exception");
  } catch (const lora::io_error& e) {
    CHECK_THAT(e.what(), Catch::Contains("layers_to_transform: the layer index of 'model.layers.1.experts.0.w'"));
  }
  std::filesystem::remove_all(dir);
}

// ---- PEFT's own regression cases -------------------------------------------------------------------

namespace {

const std::string interop_dir = LORA_INTEROP_DIR;

// PEFT's regression MLP: lin0 = Linear(10, 20), ReLU, lin1 = Linear(20, 2); LogSoftmax is applied by the caller.
lora::nn::Sequential<double> peft_mlp() {
  lora::nn::Sequential<double> m("");
  m.add("lin0", lora::nn::Linear<double>(10, 20));
  m.add(lora::nn::ReLU<double>());
  m.add("lin1", lora::nn::Linear<double>(20, 2));
  return m;
}

double relative_error_of(const lora::Matrix<double>& a, const lora::Matrix<double>& b) {
  return (a - b).norm() / std::max(b.norm(), 1e-300);
}

lora::Matrix<double> log_softmax(const lora::Matrix<double>& Z) {
  lora::Matrix<double> out(Z.rows(), Z.cols());
  for (Index i = 0; i < Z.rows(); ++i) {
    const double m = Z.row(i).maxCoeff();
    const double lse = m + std::log((Z.row(i).array() - m).exp().sum());
    out.row(i) = Z.row(i).array() - lse;
  }
  return out;
}

}  // namespace

TEST_CASE("PEFT 0.6.1's own regression cases give PEFT's outputs", "[io][model][interop]") {
  const std::filesystem::path root = std::filesystem::path(interop_dir) / "peft_regression";
  if (!std::filesystem::is_directory(root)) {
    WARN("skipped: " << root.string() << " is absent (the shared interop files are not beside this checkout)");
    return;
  }
  lora::Matrix<double> X(9, 10);
  for (Index i = 0; i < X.size(); ++i) X.data()[i] = static_cast<double>(i);  // torch.arange(90).reshape(9, 10)
  for (const char* name : {"lora_mlp", "lora_mlp_modules_to_save"}) {
    INFO(name);
    const std::filesystem::path dir = root / name;
    auto model = peft_mlp();
    lora::load_base_weights((dir / "base.safetensors").string(), model);
    const lora::PeftLoraConfig config = lora::from_pretrained(model, dir.string());
    CHECK(config.r == 8);
    REQUIRE(model.lora_layers().size() == 1);
    CHECK(model.lora_layers().front().first == "lin0");
    CHECK(model.saved_modules().size() == (std::string(name) == "lora_mlp" ? 0u : 1u));
    std::ifstream f(dir / "output.json");
    const nlohmann::json expected_json = nlohmann::json::parse(f);
    const auto rows = expected_json.at("output").get<std::vector<std::vector<double>>>();
    REQUIRE(rows.size() == 9);
    model.eval();
    const lora::Matrix<double> Y = log_softmax(model.forward(X));
    double max_error = 0;
    for (Index i = 0; i < 9; ++i)
      for (Index j = 0; j < 2; ++j) {
        const double want = rows[static_cast<std::size_t>(i)].at(static_cast<std::size_t>(j));
        const double err = std::abs(Y(i, j) - want);
        CHECK(err <= 1e-4 + 1e-4 * std::abs(want));  // torch.allclose(atol = rtol = 1e-4), PEFT's check
        max_error = std::max(max_error, err);
      }
    CHECK(max_error < 1e-4);
  }

  // PEFT's ModelEmbConv1D: emb = Embedding(100, 5), conv1d = GPT-2's Conv1D (weight stored [in, out] =
  // [5, 1], fan_in_fan_out = true), ReLU, Flatten, lin0 = Linear(10, 2), LogSoftmax; LoRA on emb and conv1d.
  // The Conv1D is a Linear here, from its weight transposed; the adapter's lora_A / lora_B keep their shapes.
  const std::filesystem::path emb_dir = root / "lora_emb_conv1d";
  const auto base = lora::SafetensorsReader::open((emb_dir / "base.safetensors").string());
  std::vector<std::string> base_names;
  for (const lora::TensorInfo& t : base.tensors()) base_names.push_back(t.name);
  CHECK(base_names == std::vector<std::string>{"emb.weight", "conv1d.weight", "conv1d.bias", "lin0.weight", "lin0.bias"});
  auto emb_conv1d = [&] {
    lora::nn::Sequential<double> m("");
    m.add("emb", lora::nn::Embedding<double>(base.matrix<double>("emb.weight", 100, 5, "test")));
    const lora::Matrix<double> conv_weight = base.matrix<double>("conv1d.weight", 5, 1, "test");  // [in, out]
    m.add("conv1d", lora::nn::Linear<double>(lora::Matrix<double>(conv_weight.transpose()),
                                             base.vector<double>("conv1d.bias", 1, "test")));
    m.add("relu", lora::nn::ReLU<double>());
    m.add("flat", lora::nn::Flatten<double>(10, 1));  // [90 x 1] token rows -> [9 x 10], nn.Flatten on [9, 10, 1]
    m.add("lin0", lora::nn::Linear<double>(base.matrix<double>("lin0.weight", 2, 10, "test"),
                                           base.vector<double>("lin0.bias", 2, "test")));
    m.add("sm", lora::nn::LogSoftmax<double>());
    return m;
  };
  std::ifstream f(emb_dir / "output.json");
  const auto rows = nlohmann::json::parse(f).at("output").get<std::vector<std::vector<double>>>();
  REQUIRE(rows.size() == 9);
  auto max_error_of = [&](const lora::Matrix<double>& Y) {
    REQUIRE(Y.rows() == 9);
    REQUIRE(Y.cols() == 2);
    double max_error = 0;
    for (Index i = 0; i < 9; ++i)
      for (Index j = 0; j < 2; ++j) {
        const double want = rows[static_cast<std::size_t>(i)].at(static_cast<std::size_t>(j));
        const double err = std::abs(Y(i, j) - want);
        CHECK(err <= 1e-4 + 1e-4 * std::abs(want));  // PEFT's allclose
        max_error = std::max(max_error, err);
      }
    return max_error;
  };
  auto model = emb_conv1d();
  model.eval();
  const lora::Matrix<double> base_output = model.forward(X);  // X: torch.arange(90).reshape(9, 10), as ids
  const lora::PeftLoraConfig config = lora::from_pretrained(model, emb_dir.string());
  CHECK(config.fan_in_fan_out);
  REQUIRE(model.lora_config());
  CHECK(model.lora_config()->fan_in_fan_out);
  REQUIRE(model.lora_layers().size() == 1);
  CHECK(model.lora_layers().front().first == "conv1d");
  REQUIRE(model.lora_embeddings().size() == 1);
  CHECK(model.lora_embeddings().front().first == "emb");
  const auto& emb = *model.lora_embeddings().front().second;
  CHECK(emb.rank() == 8);
  CHECK(emb.scaling() == 1.0);
  const auto adapter = lora::SafetensorsReader::open((emb_dir / "adapter_model.safetensors").string());
  CHECK(emb.lora_A() == adapter.matrix<double>("base_model.model.emb.lora_embedding_A", 8, 100, "test"));
  CHECK(emb.lora_B() == adapter.matrix<double>("base_model.model.emb.lora_embedding_B", 5, 8, "test"));
  const lora::Matrix<double> Y = model.forward(X);
  CHECK(relative_error_of(Y, base_output) > 1e-3);  // the adapter changes the output
  const double max_error = max_error_of(Y);
  WARN("lora_emb_conv1d: max |error| against PEFT's output = " << max_error);
  CHECK(max_error < 1e-4);
  lora::nn::InferenceContext<double> ctx;
  CHECK(relative_error_of(lora::nn::infer(model, X, ctx), Y) < 1e-14);  // the const path agrees
  model.merge();
  CHECK(model.merged());
  CHECK(max_error_of(model.forward(X)) < 1e-4);
  model.unmerge();
  CHECK(model.forward(X) == Y);

  // Saved again, the adapter has PEFT's keys and the same values (F32 as read), and says fan_in_fan_out.
  const auto resaved = std::filesystem::temp_directory_path() / "lora_test_emb_conv1d_resave";
  std::filesystem::remove_all(resaved);
  lora::save_adapter(resaved.string(), model);
  const auto again = lora::SafetensorsReader::open((resaved / "adapter_model.safetensors").string());
  std::vector<std::string> keys, peft_keys;
  for (const lora::TensorInfo& t : again.tensors()) keys.push_back(t.name);
  for (const lora::TensorInfo& t : adapter.tensors()) peft_keys.push_back(t.name);
  std::sort(keys.begin(), keys.end());
  std::sort(peft_keys.begin(), peft_keys.end());
  CHECK(keys == peft_keys);
  for (const std::string& k : peft_keys) {
    INFO(k);
    CHECK(again.matrix<double>(k, "test") == adapter.matrix<double>(k, "test"));
  }
  const lora::PeftLoraConfig written = lora::read_adapter_config(resaved.string());
  CHECK(written.fan_in_fan_out);
  CHECK(written.r == 8);
  CHECK(written.lora_alpha == 8);
  std::filesystem::remove_all(resaved);

  // merge_and_unload: a plain Embedding with the merged table, a plain Linear; the same outputs.
  lora::nn::merge_and_unload(model);
  CHECK(!model.has_lora());
  const auto* plain = dynamic_cast<const lora::nn::Embedding<double>*>(&model.module("emb"));
  REQUIRE(plain);
  CHECK(!plain->has_lora());
  CHECK(!plain->trainable());
  CHECK(dynamic_cast<const lora::nn::Linear<double>*>(&model.module("conv1d")));
  CHECK(max_error_of(model.forward(X)) < 1e-4);
}

namespace {

// ids -> Embedding(12, 4) -> Linear(4, 3) -> ReLU -> Linear(3, 2), PEFT-style names.
lora::nn::Sequential<double> embedding_model(std::uint64_t seed) {
  lora::nn::Sequential<double> m("");
  m.add("emb", lora::nn::Embedding<double>(12, 4, seed));
  m.add("proj", lora::nn::Linear<double>(4, 3, true, seed + 1));
  m.add("act", lora::nn::ReLU<double>());
  m.add("head", lora::nn::Linear<double>(3, 2, true, seed + 2));
  return m;
}

lora::nn::LoraInjectConfig embedding_config() {
  lora::nn::LoraInjectConfig c;
  c.target_modules = {"emb", "proj"};
  c.rank = 2;
  c.alpha = 4;
  c.rank_pattern = {{"emb", 3}};
  c.init = lora::InitMethod::random;  // lora_embedding_A != 0 and lora_B != 0: the adapters matter
  return c;
}

template <class F>
std::string message_of_call(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no exception)";
}

lora::Matrix<double> embedding_ids() {
  lora::Matrix<double> X(2, 3);
  X << 3, 11, 0, 7, 3, 5;
  return X;
}

}  // namespace

TEST_CASE("an Embedding adapter saves under PEFT's keys and reloads exactly; errors name the key and the module",
          "[io][model][embedding]") {
  const auto dir = std::filesystem::temp_directory_path() / "lora_test_embedding_adapter";
  std::filesystem::remove_all(dir);
  auto trained = embedding_model(1);
  lora::nn::inject_lora(trained, embedding_config());
  REQUIRE(trained.lora_embeddings().size() == 1);
  auto& emb = *trained.lora_embeddings().front().second;
  CHECK(emb.rank() == 3);
  lora::AdapterSaveOptions f64;
  f64.dtype = lora::Dtype::F64;
  lora::save_adapter(dir.string(), trained, "default", f64);

  // PEFT's keys: no ".weight" and no adapter name for the embedding; its values exactly.
  const auto file = lora::SafetensorsReader::open((dir / "adapter_model.safetensors").string());
  std::vector<std::string> keys;
  for (const lora::TensorInfo& t : file.tensors()) keys.push_back(t.name);
  std::sort(keys.begin(), keys.end());
  CHECK(keys == std::vector<std::string>{"base_model.model.emb.lora_embedding_A", "base_model.model.emb.lora_embedding_B",
                                         "base_model.model.proj.lora_A.weight", "base_model.model.proj.lora_B.weight"});
  CHECK(file.find("base_model.model.emb.lora_embedding_A")->shape == std::vector<std::uint64_t>{3, 12});
  CHECK(file.find("base_model.model.emb.lora_embedding_B")->shape == std::vector<std::uint64_t>{4, 3});
  CHECK(file.matrix<double>("base_model.model.emb.lora_embedding_A", "test") == emb.lora_A());
  CHECK(file.matrix<double>("base_model.model.emb.lora_embedding_B", "test") == emb.lora_B());
  const lora::PeftLoraConfig written = lora::read_adapter_config(dir.string());
  CHECK(written.r == 2);
  CHECK(written.rank_pattern == std::vector<std::pair<std::string, int>>{{"emb", 3}});
  CHECK(!written.fan_in_fan_out);
  REQUIRE(written.target_modules);
  CHECK(*written.target_modules == std::vector<std::string>{"proj", "emb"});

  // from_pretrained on the same base: the same outputs, bit-exact (F64).
  const lora::Matrix<double> X = embedding_ids();
  trained.eval();
  const lora::Matrix<double> expected = trained.forward(X);
  auto reloaded = embedding_model(1);
  lora::from_pretrained(reloaded, dir.string());
  reloaded.eval();
  CHECK(reloaded.forward(X) == expected);
  REQUIRE(reloaded.lora_embeddings().size() == 1);
  CHECK(reloaded.lora_embeddings().front().second->lora_config().rank == 3);

  // load_adapter in replace mode on a model injected with another rank: the file's rank and values.
  auto replaced = embedding_model(1);
  lora::nn::LoraInjectConfig other = embedding_config();
  other.rank_pattern.clear();
  lora::nn::inject_lora(replaced, other);
  CHECK(replaced.lora_embeddings().front().second->rank() == 2);
  lora::load_adapter(dir.string(), replaced, "default", lora::AdapterLoadMode::replace);
  CHECK(replaced.lora_embeddings().front().second->rank() == 3);
  replaced.eval();
  CHECK(replaced.forward(X) == expected);

  // A second adapter on an Embedding is refused, naming the module; the model is unchanged.
  const std::string second = message_of_call([&] { lora::load_adapter(dir.string(), replaced, "second"); });
  CHECK_THAT(second, Catch::Contains("'emb' is an Embedding with LoRA adapter 'default'") &&
                         Catch::Contains("holds one adapter"));
  CHECK(replaced.forward(X) == expected);
  CHECK(lora::nn::count_parameters(replaced).adapter == 3 * (12 + 4) + 2 * (4 + 3));

  // hot_swap_adapter takes new embedding values in place.
  lora::hot_swap_adapter(dir.string(), replaced, "default");
  CHECK(replaced.forward(X) == expected);

  // A lora_embedding_B of the wrong shape names the key, the expected and the actual shape.
  lora::SafetensorsWriter w;
  for (const lora::TensorInfo& t : file.tensors())
    if (t.name == "base_model.model.emb.lora_embedding_B")
      w.add(t.name, lora::Matrix<double>::Ones(5, 3), lora::Dtype::F64);
    else
      w.add(t.name, file.matrix<double>(t.name, "test"), lora::Dtype::F64);
  w.save((dir / "adapter_model.safetensors").string());
  auto fresh = embedding_model(1);
  try {
    lora::from_pretrained(fresh, dir.string());
    FAIL("no exception");
  } catch (const lora::io_error& e) {
    CHECK(e.tensor() == "base_model.model.emb.lora_embedding_B");
    CHECK_THAT(e.what(), Catch::Contains("shape [5, 3]") && Catch::Contains("expected [4, 3]") &&
                             Catch::Contains("'emb' (Embedding)"));
  }
  CHECK(!fresh.has_lora());
  CHECK(fresh.num_trainable_parameters() == fresh.num_parameters());

  // One of the pair alone is refused too.
  lora::SafetensorsWriter half;
  for (const lora::TensorInfo& t : file.tensors())
    if (t.name != "base_model.model.emb.lora_embedding_A") half.add(t.name, file.matrix<double>(t.name, "test"), lora::Dtype::F64);
  half.save((dir / "adapter_model.safetensors").string());
  try {
    lora::from_pretrained(fresh, dir.string());
    FAIL("no exception");
  } catch (const lora::io_error& e) {
    CHECK(e.tensor() == "base_model.model.emb.lora_embedding_A");
    CHECK_THAT(e.what(), Catch::Contains("missing, while base_model.model.emb.lora_embedding_B is present"));
  }
  CHECK(!fresh.has_lora());
  std::filesystem::remove_all(dir);
}

TEST_CASE("PEFT files: lora_dropout is ignored on embeddings, fan_in_fan_out is kept and written back",
          "[io][model][embedding]") {
  const auto dir = std::filesystem::temp_directory_path() / "lora_test_embedding_dropout";
  std::filesystem::remove_all(dir);
  auto trained = embedding_model(4);
  lora::nn::LoraInjectConfig c = embedding_config();
  c.dropout = 0.25;
  // In code, dropout on an Embedding target is refused, naming the field and the module ...
  const std::string refused = message_of_call([&] { lora::nn::inject_lora(trained, c); });
  CHECK_THAT(refused, Catch::Contains("'emb' is an Embedding") && Catch::Contains("lora_dropout = 0.25"));
  CHECK(!trained.has_lora());
  // ... a file with it (PEFT ignores it there) loads, the Linear target keeping its dropout.
  c.dropout = 0;
  c.fan_in_fan_out = true;  // the record of a Conv1D base, written back by save_adapter
  lora::nn::inject_lora(trained, c);
  lora::save_adapter(dir.string(), trained);
  const auto config_path = dir / "adapter_config.json";
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(std::ifstream(config_path));
  CHECK(j.at("fan_in_fan_out") == true);
  j["lora_dropout"] = 0.25;
  std::ofstream(config_path) << j.dump(2);
  auto loaded = embedding_model(4);
  const lora::PeftLoraConfig read = lora::from_pretrained(loaded, dir.string());
  CHECK(read.lora_dropout == 0.25);
  REQUIRE(loaded.lora_config());
  CHECK(loaded.lora_config()->fan_in_fan_out);
  CHECK(loaded.lora_layers().front().second->adapter_config("default").dropout == 0.25);
  CHECK(loaded.lora_embeddings().front().second->lora_config().dropout == 0);
  const auto again = std::filesystem::temp_directory_path() / "lora_test_embedding_dropout_again";
  std::filesystem::remove_all(again);
  lora::save_adapter(again.string(), loaded);
  const lora::PeftLoraConfig rewritten = lora::read_adapter_config(again.string());
  CHECK(rewritten.lora_dropout == 0.25);
  CHECK(rewritten.fan_in_fan_out);
  std::filesystem::remove_all(again);
  std::filesystem::remove_all(dir);
}

TEST_CASE("adapters with a rank above min(in_features, out_features) load, as PEFT writes them", "[io][model]") {
  try {
    lora::LoraLinear<double> probe(lora::Matrix<double>::Zero(3, 2), lora::LoraConfig{});  // rank 8 > 2
  } catch (const std::invalid_argument&) {
    WARN("skipped: this build's LoraLinear still refuses a rank above min(in_features, out_features)");
    return;
  }
  const auto dir = std::filesystem::temp_directory_path() / "lora_test_large_rank";
  write_blocks_adapter(dir, {{"model.layers.0.q", 6}, {"model.layers.1.q", 5}},
                       R"({"peft_type": "LORA", "r": 6, "lora_alpha": 12, "target_modules": ["0.q", "1.q"],
                           "rank_pattern": {"1.q": 5}})");
  auto pretrained = blocks_model();
  lora::from_pretrained(pretrained, dir.string());
  auto loaded = blocks_model();
  lora::nn::LoraInjectConfig c;
  c.target_modules = {"0.q", "1.q"};
  c.rank = 2;
  lora::nn::inject_lora(loaded, c);
  lora::load_adapter(dir.string(), loaded, "default", lora::AdapterLoadMode::replace);
  for (auto* model : {&pretrained, &loaded}) {
    const auto layers = model->lora_layers();
    REQUIRE(layers.size() == 2);
    CHECK(layers[0].second->rank() == 6);
    CHECK(layers[1].second->rank() == 5);
    CHECK(layers[1].second->scaling() == 12.0 / 5.0);
  }
  const lora::Matrix<double> X = lora::Matrix<double>::Random(3, 4);
  pretrained.eval();
  loaded.eval();
  CHECK(pretrained.forward(X) == loaded.forward(X));
  std::filesystem::remove_all(dir);
}

TEST_CASE("bias = all: the biases of modules without LoRA are saved and loaded, as PEFT does", "[io][model]") {
  const auto dir = std::filesystem::temp_directory_path() / "lora_test_bias_all";
  std::filesystem::remove_all(dir);
  auto trained = small_mlp(1);
  lora::nn::LoraInjectConfig c;
  c.target_modules = {"layers.0"};
  c.rank = 2;
  c.init = lora::InitMethod::random;
  c.bias = lora::BiasMode::all;  // layers.2, a plain Linear, trains its bias too
  lora::nn::inject_lora(trained, c);
  auto& head = dynamic_cast<lora::nn::Linear<double>&>(trained.module("layers.2"));
  REQUIRE(head.bias_trainable());
  const lora::Vector<double> head_bias = head.bias() + lora::Vector<double>::Constant(3, 0.25);
  head.set_bias(head_bias);
  trained.lora_layers().front().second->set_bias(lora::Vector<double>::Constant(8, -0.5));
  lora::AdapterSaveOptions f64;
  f64.dtype = lora::Dtype::F64;
  lora::save_adapter(dir.string(), trained, "default", f64);

  // PEFT's layout for bias = "all": every bias of the model, the plain modules' under <path>.bias.
  CHECK(lora::read_adapter_config(dir.string()).bias == "all");
  const auto file = lora::SafetensorsReader::open((dir / "adapter_model.safetensors").string());
  CHECK(file.contains("base_model.model.layers.0.base_layer.bias"));
  REQUIRE(file.contains("base_model.model.layers.2.bias"));
  CHECK(file.vector<double>("base_model.model.layers.2.bias", 3, "test") == head_bias);

  auto reloaded = small_mlp(1);  // the same base
  lora::from_pretrained(reloaded, dir.string());
  const lora::Matrix<double> X = lora::Matrix<double>::Random(4, 6);
  trained.eval();
  reloaded.eval();
  CHECK(reloaded.forward(X) == trained.forward(X));

  // A bias = "all" file without a bias the config says it has is missing a tensor; the model is unchanged.
  lora::SafetensorsWriter w;
  for (const lora::TensorInfo& t : file.tensors())
    if (t.name != "base_model.model.layers.2.bias")
      t.shape.size() == 2 ? w.add(t.name, file.matrix<double>(t.name, "test"), lora::Dtype::F64)
                          : w.add_vector(t.name, file.vector<double>(t.name, t.shape[0], "test"), lora::Dtype::F64);
  w.save((dir / "adapter_model.safetensors").string());
  auto partial = small_mlp(1);
  lora::nn::inject_lora(partial, c);
  const lora::Matrix<double> before = partial.forward(X);
  try {
    lora::load_adapter(dir.string(), partial, "default", lora::AdapterLoadMode::replace);
    FAIL("no exception");
  } catch (const lora::io_error& e) {
    CHECK(e.tensor() == "base_model.model.layers.2.bias");
    CHECK_THAT(e.what(), Catch::Contains("missing") && Catch::Contains("bias is \"all\""));
  }
  CHECK(partial.forward(X) == before);
  std::filesystem::remove_all(dir);
}
