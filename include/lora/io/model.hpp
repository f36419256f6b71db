// lora.hpp: adapter directories and base-weight files for an nn::Sequential model.
//
// The model-level face of io/adapter_dir.hpp and io/base_weights.hpp: the same files, with the model's
// LoRA layers, modules_to_save and base tensors found by path. from_pretrained() is PEFT's
// PeftModel.from_pretrained: inject LoRA as the adapter's config says, then load its weights.
#pragma once

#include <lora/io/adapter_dir.hpp>
#include <lora/io/base_weights.hpp>
#include <lora/nn/inject.hpp>
#include <lora/nn/sequential.hpp>

#include <set>
#include <string>

namespace lora {

// The view the adapter-file functions work on: the model's LoRA layers and modules_to_save by path.
// Valid while the model is alive and its modules are not replaced.
template <class Scalar>
LoraModelView<Scalar> model_view(nn::Sequential<Scalar>& model) {
  LoraModelView<Scalar> view;
  for (const auto& [path, layer] : model.lora_layers()) view.lora_modules.push_back({path, layer});
  for (const auto& [path, linear] : model.saved_modules())
    view.saved_modules.push_back({path, linear->weight(),
                                  linear->has_bias() ? std::optional<ParamRef<Scalar>>(linear->bias()) : std::nullopt});
  return view;
}

template <class Scalar>
void save_adapter(const std::string& dir, nn::Sequential<Scalar>& model, const std::string& adapter = "default",
                  const AdapterSaveOptions& options = {}) {
  save_adapter(dir, model_view(model), adapter, options);
}

template <class Scalar>
PeftLoraConfig load_adapter(const std::string& dir, nn::Sequential<Scalar>& model, const std::string& name,
                            AdapterLoadMode mode = AdapterLoadMode::add) {
  return load_adapter(dir, model_view(model), name, mode);
}

// The LoRA injection a PEFT config describes (targets, rank and alpha with their patterns, dropout,
// rsLoRA, bias mode, modules_to_save). A fresh adapter: its weights come from the file afterwards.
inline nn::LoraInjectConfig inject_config_from(const PeftLoraConfig& peft) {
  constexpr const char* where = "inject_config_from";
  nn::LoraInjectConfig c;
  if (peft.target_modules) c.target_modules = *peft.target_modules;
  if (peft.target_modules_regex) c.target_regex = *peft.target_modules_regex;
  if (c.target_modules.empty() && c.target_regex.empty()) detail::fail(where, "the config names no target_modules");
  c.rank = peft.r;
  c.alpha = peft.lora_alpha;
  c.dropout = peft.lora_dropout;
  c.use_rslora = peft.use_rslora;
  for (const auto& [key, rank] : peft.rank_pattern) c.rank_pattern.emplace(key, rank);
  for (const auto& [key, alpha] : peft.alpha_pattern) c.alpha_pattern.emplace(key, alpha);
  c.bias = peft.bias == "all" ? BiasMode::all : peft.bias == "lora_only" ? BiasMode::lora_only : BiasMode::none;
  if (peft.modules_to_save) c.modules_to_save = *peft.modules_to_save;
  return c;
}

// PEFT's PeftModel.from_pretrained on a base model without LoRA: injects LoRA as dir's
// adapter_config.json says and loads adapter_model.safetensors as adapter "default" (and the
// modules_to_save weights). Validation errors leave the weights unloaded; the model is injected first.
template <class Scalar>
PeftLoraConfig from_pretrained(nn::Sequential<Scalar>& model, const std::string& dir) {
  const PeftLoraConfig config = read_adapter_config(dir);
  nn::inject_lora(model, inject_config_from(config));
  return load_adapter(dir, model_view(model), "default", AdapterLoadMode::replace);
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
