// lora.hpp: the multi-adapter operations of lora/adapters.hpp on an nn::Sequential, with its
// modules_to_save: PEFT's model-level add_adapter, set_adapter, delete_adapter, disable_adapter, ...
//
// On a model these also keep the modules_to_save wrappers in step: a new adapter gets its own copy of
// each saved module, the active adapter's copy is the one that runs and trains, disabling the adapters
// runs the originals, deleting an adapter deletes its copies. The LoraModelView overloads in
// lora/adapters.hpp see only the LoRA layers.
#pragma once

#include <algorithm>
#include <lora/adapters.hpp>
#include <lora/common.hpp>
#include <lora/config.hpp>
#include <lora/nn/modules_to_save.hpp>
#include <lora/nn/sequential.hpp>
#include <optional>
#include <string>
#include <vector>

namespace lora {

// The model's LoRA layers and, for `adapter`, its copies of the modules_to_save (the wrappers that have
// one), by path: what the adapter-file functions work on. Valid while the model's modules are not
// replaced and those copies not deleted.
template <class Scalar>
LoraModelView<Scalar> model_view(nn::Sequential<Scalar>& model,
                                 const std::string& adapter = LoraLinear<Scalar>::default_adapter) {
  LoraModelView<Scalar> view;
  for (const auto& [path, layer] : model.lora_layers()) view.lora_modules.push_back({path, layer});
  for (const auto& [path, wrapper] : model.saved_modules()) {
    if (!wrapper->has_copy(adapter)) continue;
    nn::Linear<Scalar>& copy = wrapper->copy(adapter);
    view.saved_modules.push_back(
        {path, copy.weight(), copy.has_bias() ? std::optional<ParamRef<Scalar>>(copy.bias()) : std::nullopt});
  }
  return view;
}

namespace detail {
template <class Scalar>
LoraModelView<Scalar> lora_layers_of(const char* where, nn::Sequential<Scalar>& model) {
  LoraModelView<Scalar> view;
  for (const auto& [path, layer] : model.lora_layers()) view.lora_modules.push_back({path, layer});
  if (view.lora_modules.empty()) fail(where, "the model has no LoRA layer (inject_lora or from_pretrained first)");
  return view;
}

// The adapter whose copy a wrapper runs for this active set: the one name that has a copy, or, when
// none has, the first name (the original runs). PEFT refuses two active adapters with copies of one module.
template <class Scalar>
std::string saved_module_choice(const char* where, const std::string& path, const nn::ModulesToSave<Scalar>& wrapper,
                                const std::vector<std::string>& names) {
  std::string chosen;
  for (const std::string& n : names)
    if (wrapper.has_copy(n)) {
      if (!chosen.empty())
        fail(where, "adapters '", chosen, "' and '", n, "' both have their own copy of the saved module '", path,
             "'; only one of them can be active (as in PEFT)");
      chosen = n;
    }
  return chosen.empty() && !names.empty() ? names.front() : chosen;
}
}  // namespace detail

template <class Scalar>
std::vector<std::string> adapter_names(nn::Sequential<Scalar>& model) {
  return adapter_names(detail::lora_layers_of("adapter_names", model));
}

template <class Scalar>
std::vector<std::string> active_adapters(nn::Sequential<Scalar>& model) {
  return active_adapters(detail::lora_layers_of("active_adapters", model));
}

// Adds an inactive adapter to every LoRA layer and a copy of every saved module's original for it; all
// or none.
template <class Scalar>
void add_adapter(nn::Sequential<Scalar>& model, const std::string& name, const LoraConfig& config) {
  constexpr const char* where = "add_adapter";
  const LoraModelView<Scalar> view = detail::lora_layers_of(where, model);
  const auto wrappers = model.saved_modules();
  for (const auto& [path, wrapper] : wrappers)
    if (wrapper->has_copy(name))
      detail::fail(where, "the saved module '", path, "' already has a copy for '", name, "'");
  add_adapter(view, name, config);
  std::size_t done = 0;
  try {
    for (; done < wrappers.size(); ++done) wrappers[done].second->add_copy(name);
  } catch (...) {
    for (std::size_t i = 0; i < done; ++i) wrappers[i].second->delete_copy(name);
    delete_adapter(view, name);
    throw;
  }
}

// Removes the adapter from every layer that has it, and its copies of the saved modules.
template <class Scalar>
void delete_adapter(nn::Sequential<Scalar>& model, const std::string& name) {
  constexpr const char* where = "delete_adapter";
  delete_adapter(detail::lora_layers_of(where, model), name);
  for (const auto& [path, wrapper] : model.saved_modules()) {
    if (wrapper->has_copy(name)) wrapper->delete_copy(name);
    if (wrapper->active_adapter() == name) wrapper->set_active_adapter("");
  }
}

// Makes exactly these adapters active in every LoRA layer that has them (an empty list: the base model),
// and runs, in each saved module, the copy of the active adapter that has one (the original otherwise).
// Checked before anything changes.
template <class Scalar>
void set_active_adapters(nn::Sequential<Scalar>& model, const std::vector<std::string>& names) {
  constexpr const char* where = "set_active_adapters";
  const LoraModelView<Scalar> view = detail::lora_layers_of(where, model);
  std::vector<std::string> choice;
  for (const auto& [path, wrapper] : model.saved_modules())
    choice.push_back(detail::saved_module_choice(where, path, *wrapper, names));
  set_active_adapters(view, names);
  std::size_t k = 0;
  for (const auto& [path, wrapper] : model.saved_modules()) wrapper->set_active_adapter(choice[k++]);
}

template <class Scalar>
void set_adapter_scale(nn::Sequential<Scalar>& model, const std::string& name, double scale) {
  set_adapter_scale(detail::lora_layers_of("set_adapter_scale", model), name, scale);
}

// The base model (every saved module runs its original); returns what was active (the LoRA layers',
// then the saved modules') for enable_adapters().
template <class Scalar>
ActiveAdapterState disable_adapters(nn::Sequential<Scalar>& model) {
  ActiveAdapterState state = disable_adapters(detail::lora_layers_of("disable_adapters", model));
  for (const auto& [path, wrapper] : model.saved_modules()) {
    state.push_back({wrapper->active_adapter()});
    wrapper->set_active_adapter("");
  }
  return state;
}

template <class Scalar>
void enable_adapters(nn::Sequential<Scalar>& model, const ActiveAdapterState& state) {
  constexpr const char* where = "enable_adapters";
  const LoraModelView<Scalar> view = detail::lora_layers_of(where, model);
  const auto wrappers = model.saved_modules();
  const std::size_t layers = view.lora_modules.size();
  bool fits = state.size() == layers + wrappers.size();
  for (std::size_t i = layers; fits && i < state.size(); ++i) fits = state[i].size() == 1;
  if (!fits)
    detail::fail(where, "the state has ", state.size(), " entries, the model has ", layers, " LoRA layers and ",
                 wrappers.size(), " saved modules; pass what disable_adapters(model) returned");
  enable_adapters(view, ActiveAdapterState(state.begin(), state.begin() + static_cast<std::ptrdiff_t>(layers)));
  for (std::size_t i = 0; i < wrappers.size(); ++i) wrappers[i].second->set_active_adapter(state[layers + i].front());
}

// The combination of `sources` as a new inactive adapter on every LoRA layer that has one of them (see
// add_weighted_adapter on a view). The saved modules get no copy for it: PEFT does not combine them, and
// the original runs while it is active.
template <class Scalar>
void add_weighted_adapter(nn::Sequential<Scalar>& model, const std::vector<std::string>& sources,
                          const std::vector<double>& weights, const std::string& name, CombineMethod method,
                          int rank = 0) {
  add_weighted_adapter(detail::lora_layers_of("add_weighted_adapter", model), sources, weights, name, method, rank);
}

// Merges the active adapters of every LoRA layer, all or none (Sequential::merge); unmerge undoes it.
template <class Scalar>
void merge_adapters(nn::Sequential<Scalar>& model) {
  model.merge();
}

template <class Scalar>
void unmerge_adapters(nn::Sequential<Scalar>& model) {
  model.unmerge();
}

}  // namespace lora
