// Adapter and base-weight files for an nn::Sequential model: round trips and from_pretrained.
#include <lora/io.hpp>

#include <catch2/catch.hpp>

#include <filesystem>

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
  trained.saved_modules().front().second->weight().set(0, 0, 0.75);  // a trained head
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
