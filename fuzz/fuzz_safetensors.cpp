// libFuzzer target for the file parsers. Each input is read four ways:
//   1. as a safetensors file: header validation, then every convertible tensor (F8 included) to float;
//   2. as an adapter's weights, loaded against a fixed toy model (shape and key checks);
//   3. as a quantized base (load_quantized), each weight then dequantized and written back;
//   4. as adapter_config.json, with its patterns evaluated.
// Only lora::io_error may leave the library on bad input; anything else (another exception type, a
// crash, a sanitizer report, a hang, an oversized allocation) is a finding.
// Build and run: scripts/fuzz.sh [seconds]
#include <lora/io.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace {

void as_safetensors(const std::uint8_t* data, std::size_t size) {
  const auto file = lora::SafetensorsReader::from_memory(data, size, "fuzz-input");
  for (const auto& t : file.tensors())
    if (lora::SafetensorsReader::can_convert(t.dtype)) (void)file.values<float>(t.name);

  // A toy model: two LoRA layers (6 -> 8 -> 7) and a head in modules_to_save.
  lora::LoraConfig c;
  c.rank = 1;
  lora::LoraLinearf fc1(lora::Matrix<float>::Zero(8, 6), c), fc2(lora::Matrix<float>::Zero(7, 8), c);
  lora::Matrix<float> head = lora::Matrix<float>::Zero(3, 7);
  lora::Vector<float> head_bias = lora::Vector<float>::Zero(3);
  const lora::LoraModelView<float> model{{{"encoder.fc1", &fc1}, {"encoder.fc2", &fc2}},
                                         {{"classifier", lora::param_ref(head), lora::param_ref(head_bias)}}};
  lora::PeftLoraConfig config;
  config.r = 4;
  config.rank_pattern = {{"fc2", 2}};
  config.target_modules = std::vector<std::string>{"fc1", "fc2"};
  config.modules_to_save = std::vector<std::string>{"classifier"};
  lora::load_adapter(file, config, model, "fuzz");
}

void as_quantized(const std::uint8_t* data, std::size_t size) {
  const auto file = lora::SafetensorsReader::from_memory(data, size, "fuzz-input");
  const lora::QuantizedWeights weights = lora::load_quantized(file);
  std::vector<float> row;
  for (const auto& kv : weights) {
    const lora::quant::QuantizedWeight& q = kv.second;
    row.resize(static_cast<std::size_t>(q.in));
    for (lora::Index r = 0; r < q.out; ++r) q.dequantize_rows(r, 1, row.data());
  }
  // What was accepted writes and reads back to the same bytes.
  const std::string bytes = lora::detail::quantized_writer(weights).to_bytes();
  const auto again = lora::SafetensorsReader::from_memory(bytes.data(), bytes.size(), "fuzz-roundtrip");
  if (lora::detail::quantized_writer(lora::load_quantized(again)).to_bytes() != bytes) __builtin_trap();
}

void as_config(const std::uint8_t* data, std::size_t size) {
  const auto config = lora::PeftLoraConfig::parse(std::string(reinterpret_cast<const char*>(data), size), "fuzz-input");
  for (const char* module : {"encoder.fc1", "model.layers.0.self_attn.q_proj", "classifier"}) {
    (void)config.lora_config_for(module);
    (void)config.targets(module);
    (void)config.saves_module(module);
  }
  (void)lora::PeftLoraConfig::parse(config.dump(), "fuzz-roundtrip");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    as_safetensors(data, size);
  } catch (const lora::io_error&) {
  }
  try {
    as_quantized(data, size);
  } catch (const lora::io_error&) {
  }
  try {
    as_config(data, size);
  } catch (const lora::io_error&) {
  }
  return 0;
}
