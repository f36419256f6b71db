// lora.hpp: a whole model on a quantized base (QLoRA's load_in_4bit for a Sequential), its export as a
// float model, and the memory its base takes.
//
// quantize_model() puts every Linear and every LoRA layer's W0 into a QuantizedBase (NF4 or int8),
// except the modules named in skip_modules (bitsandbytes' llm_int8_skip_modules: typically the head,
// which then trains in float). inject_lora() on a quantized model puts LoRA over the quantized bases
// without a copy, so the QLoRA recipe is
//
//   quant::quantize_model(model, {quant::Format::nf4, {}, {"classifier"}});
//   nn::inject_lora(model, config);   // modules_to_save = {"classifier"}
//
// and merge_and_dequantize(model) folds the trained adapters into a float model for export (a quantized
// base refuses merge(): see quant/merge.hpp).
#pragma once

#include <lora/nn/inject.hpp>
#include <lora/nn/linear.hpp>
#include <lora/nn/lora_layer.hpp>
#include <lora/nn/sequential.hpp>
#include <lora/quant/merge.hpp>
#include <lora/quant/quant.hpp>

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lora::quant {

struct QuantizeModelConfig {
  Format format = Format::nf4;
  Nf4Options nf4;  // block sizes and double quantization (format nf4)
  // Modules kept in float, by PEFT's name rule (the path, or its last dotted components); a name that
  // matches a nested Sequential keeps everything under it. Every name must match a module.
  std::vector<std::string> skip_modules;
};

namespace detail {

inline bool skipped(const std::string& path, const std::vector<std::string>& skip) {
  for (const std::string& name : skip) {
    if (lora::detail::name_matches(path, name)) return true;
    for (std::size_t dot = path.find('.'); dot != std::string::npos; dot = path.find('.', dot + 1))
      if (lora::detail::name_matches(path.substr(0, dot), name)) return true;
  }
  return false;
}

template <class Scalar>
std::shared_ptr<const QuantizedBase<Scalar>> quantized_copy(const Matrix<Scalar>& W, Vector<Scalar> bias,
                                                            const QuantizeModelConfig& config) {
  QuantizedWeight q = config.format == Format::nf4 ? quantize_nf4(W, config.nf4) : quantize_int8(W);
  return make_quantized_base<Scalar>(std::move(q), std::move(bias));
}

}  // namespace detail

// Quantizes the base of every Linear (which becomes a frozen Linear over a QuantizedBase; its bias keeps
// its values and trainability) and of every LoRA layer (LoraLinear::set_base: the adapters are kept) that
// skip_modules leaves in, and returns their paths in model order. The weights trainable before are
// frozen. Modules of other kinds, and the modules_to_save wrappers, are left as they are.
// Throws, and changes nothing, when a skip name matches no module, when a module to quantize is already
// quantized or is a merged LoRA layer, or when nothing is left to quantize.
template <class Scalar>
std::vector<std::string> quantize_model(nn::Sequential<Scalar>& model, const QuantizeModelConfig& config) {
  constexpr const char* where = "quantize_model";
  if (config.format == Format::nf4 && (config.nf4.block_size < 2 || config.nf4.block_size % 2 != 0))
    lora::detail::fail(where, "nf4.block_size must be even and >= 2, got ", config.nf4.block_size);
  const auto modules = model.named_modules();
  for (const std::string& name : config.skip_modules) {
    bool found = false;
    for (const auto& entry : modules) found = found || detail::skipped(entry.first, {name});
    if (!found)
      lora::detail::fail(where, "skip_modules entry '", name, "' matches no module; the model has: ",
                         lora::detail::describe_modules(model));
  }
  struct Plan {
    std::string path;
    std::unique_ptr<nn::Linear<Scalar>> linear;  // a Linear's replacement
    nn::LoraLayer<Scalar>* lora = nullptr;       // or the LoRA layer whose base changes
    std::shared_ptr<const QuantizedBase<Scalar>> base;
  };
  std::vector<Plan> plans;
  auto already = [&](const std::string& path, const FrozenBase<Scalar>& base) {
    if (!base.dense_weight()) lora::detail::fail(where, "'", path, "' is already quantized (", base.describe(), ")");
  };
  for (const auto& [path, m] : modules) {
    if (detail::skipped(path, config.skip_modules)) continue;
    try {
      if (auto* linear = dynamic_cast<const nn::Linear<Scalar>*>(m)) {
        if (linear->frozen_base()) already(path, *linear->frozen_base());
        const Vector<Scalar> bias = linear->has_bias() ? Vector<Scalar>(linear->bias()) : Vector<Scalar>();
        Plan p;
        p.path = path;
        p.linear = std::make_unique<nn::Linear<Scalar>>(detail::quantized_copy(linear->weight_values(), bias, config));
        p.linear->set_trainable(false, linear->bias_trainable());
        plans.push_back(std::move(p));
      } else if (auto* layer = dynamic_cast<nn::LoraLayer<Scalar>*>(m)) {
        const LoraLinear<Scalar>& l = layer->lora();
        if (l.merged()) lora::detail::fail(where, "'", path, "' is merged; unmerge() first");
        already(path, l.base());
        Matrix<Scalar> W(l.out_features(), l.in_features());
        l.base().dense_rows(0, l.out_features(), W.data());
        Plan p;
        p.path = path;
        p.lora = layer;
        p.base = detail::quantized_copy(W, l.has_bias() ? Vector<Scalar>(l.bias()) : Vector<Scalar>(), config);
        plans.push_back(std::move(p));
      }
    } catch (const std::invalid_argument& e) {
      if (std::string(e.what()).rfind(where, 0) == 0) throw;
      lora::detail::fail(where, "'", path, "': ", e.what());
    }
  }
  if (plans.empty())
    lora::detail::fail(where, "no Linear or LoRA layer is left to quantize", config.skip_modules.empty() ? "" : " by skip_modules",
                       "; the model has: ", lora::detail::describe_modules(model));
  std::vector<std::string> paths;
  for (Plan& p : plans) {  // cannot fail: every replacement has the widths of what it replaces
    if (p.linear)
      model.replace_module(p.path, std::move(p.linear));
    else
      p.lora->lora().set_base(std::move(p.base));
    paths.push_back(p.path);
  }
  return paths;
}

// PEFT's merge_and_unload for a model whose bases may be quantized: every LoRA layer becomes a plain float
// Linear holding dequant(W0) + the active adapters' deltas, every quantized Linear a float Linear of its
// dequantized values, every modules_to_save wrapper the module it uses; the model no longer has LoRA or
// quantized weights and can be saved as a float checkpoint. Trainability as merge_and_unload leaves it.
// Dense LoRA layers give what merge_and_unload gives. Throws, and changes nothing, when there is
// nothing to export (no LoRA layer and no quantized Linear).
template <class Scalar>
void merge_and_dequantize(nn::Sequential<Scalar>& model) {
  constexpr const char* where = "merge_and_dequantize";
  std::vector<std::pair<std::string, std::unique_ptr<nn::Module<Scalar>>>> plain;
  auto make_linear = [](Matrix<Scalar> W, bool has_bias, const Vector<Scalar>& bias, bool bias_trainable) {
    auto linear = has_bias ? std::make_unique<nn::Linear<Scalar>>(W, bias) : std::make_unique<nn::Linear<Scalar>>(W);
    linear->set_trainable(false, bias_trainable);
    return linear;
  };
  for (const auto& [path, m] : model.named_modules()) {
    if (auto* layer = dynamic_cast<const nn::LoraLayer<Scalar>*>(m)) {
      const LoraLinear<Scalar>& l = layer->lora();
      Matrix<Scalar> W = l.merged() ? Matrix<Scalar>(l.base_weight()) : merged_dense_weight(l);
      plain.emplace_back(path, make_linear(std::move(W), l.has_bias(), l.has_bias() ? Vector<Scalar>(l.bias()) : Vector<Scalar>(),
                                           l.bias_trainable()));
    } else if (auto* linear = dynamic_cast<const nn::Linear<Scalar>*>(m)) {
      if (linear->frozen_base() && !linear->frozen_base()->dense_weight())
        plain.emplace_back(path, make_linear(linear->weight_values(), linear->has_bias(), Vector<Scalar>(linear->bias()),
                                             linear->bias_trainable()));
    } else if (auto* wrapper = dynamic_cast<const nn::ModulesToSave<Scalar>*>(m)) {
      plain.emplace_back(path, std::make_unique<nn::Linear<Scalar>>(wrapper->current()));
    }
  }
  if (plain.empty()) lora::detail::fail(where, "the model has no LoRA layer and no quantized Linear");
  for (auto& [path, module] : plain) model.replace_module(path, std::move(module));
  model.set_lora_record(std::nullopt);
}

// Bytes of the base's weights and biases as stored: dense values at sizeof(Scalar) each (shared and
// borrowed ones too), a quantized base's codes, scales and bias; for a modules_to_save wrapper, its
// original module. Adapters and the trained copies of saved modules are not counted.
template <class Scalar>
std::size_t base_bytes(const nn::Sequential<Scalar>& model) {
  auto of = [](const FrozenBase<Scalar>& b) {
    if (!b.dense_weight()) return b.owned_bytes();
    return static_cast<std::size_t>(b.out_features() * b.in_features() + (b.has_bias() ? b.out_features() : 0)) *
           sizeof(Scalar);
  };
  auto of_linear = [&](const nn::Linear<Scalar>& l) {
    if (l.frozen_base()) return of(*l.frozen_base());
    return static_cast<std::size_t>(l.num_parameters()) * sizeof(Scalar);
  };
  std::size_t bytes = 0;
  for (const auto& [path, m] : model.named_modules()) {
    if (auto* layer = dynamic_cast<const nn::LoraLayer<Scalar>*>(m))
      bytes += of(layer->lora().base());
    else if (auto* linear = dynamic_cast<const nn::Linear<Scalar>*>(m))
      bytes += of_linear(*linear);
    else if (auto* wrapper = dynamic_cast<const nn::ModulesToSave<Scalar>*>(m))
      bytes += of_linear(wrapper->original());
  }
  return bytes;
}

}  // namespace lora::quant
