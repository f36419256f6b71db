// lora.hpp: adapter directories and base-weight files for an nn::Sequential model.
//
// The model-level face of io/adapter_dir.hpp and io/base_weights.hpp: the same files, with the model's
// LoRA layers, LoRA embeddings, modules_to_save and base tensors found by path. from_pretrained() is PEFT's
// PeftModel.from_pretrained: inject LoRA as the adapter's config says, then load its weights.
#pragma once

#include <lora/io/adapter_dir.hpp>
#include <lora/io/base_weights.hpp>
#include <lora/nn/adapters.hpp>
#include <lora/nn/inject.hpp>
#include <lora/nn/sequential.hpp>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace lora {

// The trainable biases outside the LoRA layers and modules_to_save: those of the plain Linear modules
// when LoRA was injected with bias = all (PEFT saves them all under that setting).
template <class Scalar>
std::vector<TrainedBiasRef<Scalar>> trained_biases(nn::Sequential<Scalar>& model) {
  std::vector<TrainedBiasRef<Scalar>> out;
  for (const auto& [path, m] : model.named_modules())
    if (auto* linear = dynamic_cast<nn::Linear<Scalar>*>(m); linear && linear->bias_trainable())
      out.push_back({path, linear->bias()});
  return out;
}

namespace detail {
// model_view() (nn/adapters.hpp) with the model's LoRA embeddings: what the adapter files work on.
template <class Scalar>
LoraModelView<Scalar> file_view(nn::Sequential<Scalar>& model, const std::string& adapter) {
  LoraModelView<Scalar> view = model_view(model, adapter);
  for (const auto& [path, embedding] : model.lora_embeddings()) view.embedding_modules.push_back({path, embedding});
  return view;
}
}  // namespace detail

// As for a LoraModelView, with the model's LoRA embeddings (base_model.model.<path>.lora_embedding_A / _B),
// the copies of `adapter` of the modules_to_save and the model's other trained biases (bias = all):
// written as base_model.model.<path>.bias, and the config's bias is then "all". The config's
// fan_in_fan_out is the model's record of it (LoraInjectConfig::fan_in_fan_out, as from_pretrained read it).
template <class Scalar>
void save_adapter(const std::string& dir, nn::Sequential<Scalar>& model, const std::string& adapter = "default",
                  const AdapterSaveOptions& options = {}) {
  const bool fan_in_fan_out = model.lora_config() && model.lora_config()->fan_in_fan_out;
  detail::write_adapter(dir, detail::file_view(model, adapter), trained_biases(model), adapter, options,
                        fan_in_fan_out);
}

// Loads dir's adapter as `name` (see load_adapter on a view), with the modules_to_save weights into the
// copies of `name`: a saved module that dir's config lists gets a new copy (of its original) for an
// adapter that has none. A LoRA embedding takes the file's lora_embedding_A / _B only for the adapter it
// has (AdapterLoadMode::replace); a second adapter on it is refused. The file's base_model.model.<path>.bias of a module whose bias trains without
// LoRA (bias = all) is loaded into it, and required when the config's bias is "all". On a throw the
// model is as it was.
template <class Scalar>
PeftLoraConfig load_adapter(const std::string& dir, nn::Sequential<Scalar>& model, const std::string& name,
                            AdapterLoadMode mode = AdapterLoadMode::add) {
  const PeftLoraConfig config = read_adapter_config(dir);
  const SafetensorsReader weights =
      SafetensorsReader::open((std::filesystem::path(dir) / adapter_weights_file).string());
  std::vector<nn::ModulesToSave<Scalar>*> created;
  try {
    for (const auto& [path, wrapper] : model.saved_modules())
      if (config.saves_module(path) && !wrapper->has_copy(name)) {
        wrapper->add_copy(name);
        created.push_back(wrapper);
      }
    detail::apply_adapter("load_adapter", weights, config, detail::file_view(model, name), name,
                          mode == AdapterLoadMode::add ? detail::LoadKind::add : detail::LoadKind::replace,
                          trained_biases(model));
  } catch (...) {
    for (nn::ModulesToSave<Scalar>* wrapper : created) wrapper->delete_copy(name);
    throw;
  }
  return config;
}

// New weights for the existing adapter `name` (see hot_swap_adapter on a view), its modules_to_save copies
// and the other trained biases included.
template <class Scalar>
PeftLoraConfig hot_swap_adapter(const std::string& dir, nn::Sequential<Scalar>& model, const std::string& name) {
  const PeftLoraConfig config = read_adapter_config(dir);
  const SafetensorsReader weights =
      SafetensorsReader::open((std::filesystem::path(dir) / adapter_weights_file).string());
  detail::apply_adapter("hot_swap_adapter", weights, config, detail::file_view(model, name), name, detail::LoadKind::hot_swap,
                        trained_biases(model));
  return config;
}

// PEFT's PeftModel.from_pretrained on a base model without LoRA: injects LoRA as dir's
// adapter_config.json says (config.to_inject_config(), with PEFT's leniency: names and pattern keys
// that match nothing are allowed, as long as some module is targeted) and loads
// adapter_model.safetensors as adapter "default" (and the modules_to_save weights into their "default"
// copies). Targeted Embedding modules get their adapter from base_model.model.<path>.lora_embedding_A /
// _B; fan_in_fan_out (a GPT-2 Conv1D base, which this model holds as a Linear with the transposed weight)
// is kept in the model's record. Throws std::invalid_argument if the model already has LoRA, io_error
// for a file that does not fit the model or that holds what this library does not implement (DoRA
// tensors). The weights are loaded into the new modules before they enter the model: on any throw the
// model is exactly as it was.
template <class Scalar>
PeftLoraConfig from_pretrained(nn::Sequential<Scalar>& model, const std::string& dir) {
  constexpr const char* where = "from_pretrained";
  if (model.has_lora()) detail::fail(where, "the model already has LoRA layers; a model is injected once");
  const PeftLoraConfig config = read_adapter_config(dir);
  const SafetensorsReader weights =
      SafetensorsReader::open((std::filesystem::path(dir) / adapter_weights_file).string());
  detail::require_supported_tensors(where, weights);
  std::optional<detail::Injection<Scalar>> plan;
  try {
    plan = detail::prepare_injection("inject_lora", model, config.to_inject_config(), detail::SelectionCheck::peft);
  } catch (const std::invalid_argument& e) {
    detail::io_fail(where, (std::filesystem::path(dir) / adapter_config_file).string(), "", e.what());
  }
  // The biases that bias = all will make trainable: loaded into the model's own Linear modules, which the
  // load writes only once every check has passed.
  std::vector<TrainedBiasRef<Scalar>> biases;
  if (plan->config.bias == BiasMode::all)
    for (const auto& [path, m] : model.named_modules()) {
      auto* linear = dynamic_cast<nn::Linear<Scalar>*>(m);
      const bool replaced = std::find(plan->targets.begin(), plan->targets.end(), path) != plan->targets.end() ||
                            std::find(plan->saved.begin(), plan->saved.end(), path) != plan->saved.end();
      if (linear && linear->has_bias() && !replaced) biases.push_back({path, linear->bias()});
    }
  detail::apply_adapter("load_adapter", weights, config, plan->view(), LoraLinear<Scalar>::default_adapter,
                        detail::LoadKind::replace, biases);
  detail::commit_injection(model, std::move(*plan));
  return config;
}

// The base (pretrained) tensors under plain names, "<path>.weight" and "<path>.bias" (W0 and its bias
// for a LoRA layer), written atomically. Throws std::invalid_argument on a merged model: its W0 holds
// the adapter too.
template <class Scalar>
void save_base_weights(const std::string& path, const nn::Sequential<Scalar>& model, Dtype dtype = Dtype::F32) {
  if (model.merged()) detail::fail("save_base_weights", "the model is merged; unmerge() it to save the base");
  NamedTensors<Scalar> tensors;
  for (const std::string& name : model.base_tensor_names()) {
    Matrix<Scalar> value = model.base_tensor(name);
    if (value.cols() == 1 && name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0)
      tensors.vectors.emplace(name, Vector<Scalar>(value.col(0)));
    else
      tensors.matrices.emplace(name, std::move(value));
  }
  save_base_weights(path, tensors, dtype);
}

// Loads a base-weight file into the model: the file must hold exactly the model's base tensors, with
// their shapes. Everything is checked before anything is written.
template <class Scalar>
void load_base_weights(const std::string& path, nn::Sequential<Scalar>& model) {
  constexpr const char* where = "load_base_weights";
  const NamedTensors<Scalar> file = load_base_weights<Scalar>(path);
  const std::vector<std::string> names = model.base_tensor_names();
  const std::set<std::string> expected(names.begin(), names.end());
  auto check = [&](const std::string& name, Index rows, Index cols) {
    if (!expected.count(name))
      detail::io_fail(where, path, name, "the model has no base tensor of this name");
    const Matrix<Scalar> current = model.base_tensor(name);
    if (current.rows() != rows || current.cols() != cols)
      detail::io_fail(where, path, name, "shape ", rows, " x ", cols, ", the model expects ", current.rows(), " x ",
                      current.cols());
  };
  for (const auto& [name, m] : file.matrices) check(name, m.rows(), m.cols());
  for (const auto& [name, v] : file.vectors) check(name, v.size(), 1);
  for (const std::string& name : names)
    if (!file.matrices.count(name) && !file.vectors.count(name))
      detail::io_fail(where, path, name, "missing from the file");
  for (const auto& [name, m] : file.matrices) model.set_base_tensor(name, m);
  for (const auto& [name, v] : file.vectors) model.set_base_tensor(name, v);
}

}  // namespace lora
