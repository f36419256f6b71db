// Compiled with -Wall -Wextra -Wpedantic -Werror -Wshadow -Wconversion: the public headers must stay clean.
#include <lora/analysis.hpp>
#include <lora/io.hpp>
#include <lora/lora.hpp>

int main() {
  lora::Matrix<float> W = lora::Matrix<float>::Random(8, 6);
  lora::LoraConfig config;
  config.rank = 2;
  lora::LoraLinearf layer(W, config);
  lora::Matrix<float> X = lora::Matrix<float>::Random(3, 6);
  const lora::Matrix<float>& Y = layer.forward(X);
  layer.backward(Y);
  layer.eval();
  layer.merge();
  layer.forward(X);
  layer.unmerge();
  lora::LoraLineard layer_d(W.cast<double>(), config);
  // A LoRA layer over an NF4 base, and the merge helpers.
  lora::LoraLinearf quantized(lora::quant::make_quantized_base<float>(lora::quant::quantize_nf4(W)), config);
  quantized.backward(quantized.forward(X));
  const auto exported = lora::quant::merge_and_dequantize(quantized);
  const auto requantized = lora::quant::merge_and_requantize(quantized, X);
  lora::LoraLineard quantized_d(lora::quant::make_quantized_base<double>(lora::quant::quantize_int8(W)), config);
  quantized_d.forward(X.cast<double>());
  // The transformer building blocks, instantiated in float so that narrowing shows.
  lora::nn::LayerNorm<float> norm(6);
  lora::nn::RMSNorm<float> rms(6);
  norm.backward(rms.backward(rms.forward(norm.forward(X))));
  lora::nn::TokenBatch batch({{1, 2, 3}, {4}}, 10);
  lora::nn::Embedding<float> embedding(10, 6);
  embedding.add_lora(2, 4.0);
  embedding.backward(embedding.forward(batch.ids()));
  lora::nn::MultiHeadSelfAttention<float> attention(6, 2, true);
  attention.set_layout(batch);
  const lora::Matrix<float> tokens = lora::Matrix<float>::Random(batch.num_rows(), 6);
  attention.backward(attention.forward(tokens));
  // Quantized base files, in memory.
  lora::NamedTensors<double> named;
  named.matrices["w"] = W.cast<double>();
  const std::string file = lora::detail::quantized_writer(lora::quantize_matrices(named, lora::quant::Format::nf4)).to_bytes();
  const lora::QuantizedWeights loaded = lora::load_quantized(lora::SafetensorsReader::from_memory(file.data(), file.size()));
  if (loaded.size() != 1 || lora::quantize_matrices(lora::NamedTensors<float>(), lora::quant::Format::int8).size() != 0) return 1;
  // AdamW with 8-bit states, float and double, under a schedule.
  lora::ParameterList<float> params;
  layer.collect_parameters(params, "layer.");
  lora::optim::AdamW8bitOptions adam8_options;
  adam8_options.min_8bit_size = 1;
  lora::optim::AdamW8bit<float> adam8(adam8_options);
  lora::optim::LrScheduler<lora::optim::AdamW8bit<float>> scheduler(adam8, lora::optim::LrSchedule::linear(1, 4));
  adam8.step(params);
  scheduler.step();
  const bool states_ok = adam8.exp_avg("layer.lora_A.default.weight").allFinite() && adam8.state_bytes() > 0;
  lora::ParameterList<double> params_d;
  layer_d.collect_parameters(params_d, "layer.");
  lora::optim::AdamW8bit<double> adam8_d;
  adam8_d.step(params_d);
  if (!states_ok || adam8_d.exp_avg_sq("layer.lora_B.default.weight").size() == 0) return 1;
  return layer_d.forward(X.cast<double>()).allFinite() ? 0 : 1;
}
