// lora.hpp: inject_lora (PEFT's get_peft_model on a Sequential), target matching, parameter counts and
// the one-line summary users look at first.
#pragma once

#include <lora/adapters.hpp>
#include <lora/common.hpp>
#include <lora/nn/config.hpp>
#include <lora/nn/embedding.hpp>
#include <lora/nn/linear.hpp>
#include <lora/nn/lora_layer.hpp>
#include <lora/nn/modules_to_save.hpp>
#include <lora/nn/sequential.hpp>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lora::nn {

// PEFT's rule for a name in target_modules / modules_to_save: the path equals it or ends with "." + it.
inline bool matches_target(const std::string& path, const std::string& target) {
  return lora::detail::name_matches(path, target);
}

// Trainable parameters r (in + out) of one adapter on an [out x in] weight: the analytic count.
inline Index lora_parameter_count(Index in_features, Index out_features, Index rank) {
  return rank * (in_features + out_features);
}

}  // namespace lora::nn

namespace lora::detail {

// How strictly a module selection is checked. every_name: every target_modules and modules_to_save entry
// and every rank_pattern / alpha_pattern key must match something, which catches the typos of a config
// written in code. peft: PEFT's leniency, for configs read from adapter files: only the targets as a
// whole must be non-empty.
enum class SelectionCheck { every_name, peft };

template <class Scalar>
std::string describe_modules(const nn::Sequential<Scalar>& model) {
  std::string known;
  for (const auto& [path, m] : model.named_modules())
    known += concat(known.empty() ? "" : ", ", path, " (", m->type_name(), ")");
  return known.empty() ? std::string("none") : known;
}

inline std::string join_names(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "'" : ", '") + n + "'";
  return out;
}

// The paths matched by a list of names, in model order.
template <class Scalar>
std::vector<std::string> select_by_name(const char* where, const char* what, const nn::Sequential<Scalar>& model,
                                        const std::vector<std::string>& names, SelectionCheck check) {
  const auto modules = model.named_modules();
  std::vector<bool> chosen(modules.size(), false);
  for (const std::string& name : names) {
    bool found = false;
    for (std::size_t i = 0; i < modules.size(); ++i)
      if (name_matches(modules[i].first, name)) chosen[i] = found = true;
    if (!found && check == SelectionCheck::every_name)
      fail(where, what, " '", name, "' matches no module; the model has: ", describe_modules(model));
  }
  std::vector<std::string> out;
  for (std::size_t i = 0; i < modules.size(); ++i)
    if (chosen[i]) out.push_back(modules[i].first);
  return out;
}

template <class Scalar>
std::vector<std::string> resolve_targets(const char* where, const nn::Sequential<Scalar>& model,
                                         const nn::LoraInjectConfig& config, SelectionCheck check) {
  config.validate(where);
  std::vector<std::string> targets;
  const auto modules = model.named_modules();
  auto is_linear = [](const nn::Module<Scalar>* m) { return dynamic_cast<const nn::Linear<Scalar>*>(m) != nullptr; };
  // What LoRA can adapt: a Linear, or an Embedding (PEFT's lora.Embedding); "all-linear" takes Linear only.
  auto is_target_kind = [&](const nn::Module<Scalar>* m) {
    return is_linear(m) || dynamic_cast<const nn::Embedding<Scalar>*>(m) != nullptr;
  };
  const bool filtered = !config.exclude_modules.empty() || !config.exclude_regex.empty() ||
                        !config.layers_to_transform.empty();
  const char* filters = " that exclude_modules and layers_to_transform leave in";
  if (!config.target_regex.empty()) {
    const Pattern pattern = Pattern::full(config.target_regex);
    bool matched = false;
    for (const auto& [path, m] : modules) {
      if (!is_target_kind(m) || !pattern.matches(path)) continue;
      matched = true;
      if (config.targets(path, where)) targets.push_back(path);
    }
    if (targets.empty())
      fail(where, "target_regex '", config.target_regex, "' matches no Linear or Embedding module",
           matched ? filters : "", "; the model has: ", describe_modules(model));
    return targets;
  }
  if (config.target_modules.size() == 1 && config.target_modules.front() == "all-linear") {
    for (const auto& [path, m] : modules)
      if (is_linear(m)) targets.push_back(path);
    if (targets.size() < 2)
      fail(where, "'all-linear' leaves out the output layer, and the model has ", targets.size(),
           " Linear module(s); name the targets instead");
    targets.pop_back();
    targets.erase(std::remove_if(targets.begin(), targets.end(),
                                 [&](const std::string& path) { return !config.targets(path, where); }),
                  targets.end());
    if (targets.empty()) fail(where, "'all-linear' selects no module", filters);
    return targets;
  }
  const std::vector<std::string> named = select_by_name(where, "target", model, config.target_modules, check);
  for (const std::string& path : named) {
    if (!config.targets(path, where)) continue;
    const nn::Module<Scalar>& m = model.module(path);
    const auto* embedding = dynamic_cast<const nn::Embedding<Scalar>*>(&m);
    if (dynamic_cast<const nn::LoraLayer<Scalar>*>(&m) || (embedding && embedding->has_lora()))
      fail(where, "'", path, "' already has LoRA; a model is injected once");
    if (!is_target_kind(&m))
      fail(where, "target '", path, "' is ", m.describe(), "; LoRA adapts Linear and Embedding modules only");
    targets.push_back(path);
  }
  if (targets.empty())
    fail(where, "target_modules ", join_names(config.target_modules), " match no module",
         !named.empty() && filtered ? filters : "", "; the model has: ", describe_modules(model));
  return targets;
}

// Everything inject_lora builds, made before the model changes: the LoRA layers of the Linear targets,
// copies of the Embedding targets with their adapter, and the modules_to_save wrappers (each with its
// "default" copy). A caller may load adapter weights into view() before commit_injection() puts the
// modules into the model.
template <class Scalar>
struct Injection {
  nn::LoraInjectConfig config;
  std::vector<std::string> targets;  // the Linear targets
  std::vector<std::unique_ptr<nn::LoraLayer<Scalar>>> layers;  // one per Linear target
  std::vector<std::string> embedding_targets;
  std::vector<std::unique_ptr<nn::Embedding<Scalar>>> embeddings;  // one per Embedding target
  std::vector<std::string> saved;
  std::vector<std::unique_ptr<nn::ModulesToSave<Scalar>>> wrappers;  // one per saved path

  // The layers, the embeddings and the "default" copies of the modules to save, under their future paths.
  LoraModelView<Scalar> view() {
    LoraModelView<Scalar> v;
    for (std::size_t k = 0; k < targets.size(); ++k) v.lora_modules.push_back({targets[k], &layers[k]->lora()});
    for (std::size_t k = 0; k < embedding_targets.size(); ++k)
      v.embedding_modules.push_back({embedding_targets[k], embeddings[k].get()});
    for (std::size_t k = 0; k < saved.size(); ++k) {
      nn::Linear<Scalar>& copy = wrappers[k]->copy(LoraLinear<Scalar>::default_adapter);
      v.saved_modules.push_back(
          {saved[k], copy.weight(), copy.has_bias() ? std::optional<ParamRef<Scalar>>(copy.bias()) : std::nullopt});
    }
    return v;
  }
};

// Checks the config against the model and builds every module; the model is not changed.
template <class Scalar>
Injection<Scalar> prepare_injection(const char* where, const nn::Sequential<Scalar>& model,
                                    const nn::LoraInjectConfig& config, SelectionCheck check) {
  if (model.has_lora()) fail(where, "the model already has LoRA layers; a model is injected once");
  Injection<Scalar> plan;
  plan.config = config;
  const std::vector<std::string> all_targets = resolve_targets(where, model, config, check);
  for (const std::string& path : all_targets)
    (dynamic_cast<const nn::Embedding<Scalar>*>(&model.module(path)) ? plan.embedding_targets : plan.targets)
        .push_back(path);
  plan.saved = select_by_name(where, "modules_to_save entry", model, config.modules_to_save, check);
  for (const std::string& path : plan.saved) {
    const nn::Module<Scalar>& m = model.module(path);
    if (std::find(all_targets.begin(), all_targets.end(), path) != all_targets.end())
      fail(where, "'", path, "' is both a LoRA target and in modules_to_save; choose one");
    const auto* linear = dynamic_cast<const nn::Linear<Scalar>*>(&m);
    if (!linear) fail(where, "modules_to_save: '", path, "' is ", m.describe(), "; only Linear modules can be saved");
    if (linear->frozen_base())
      fail(where, "modules_to_save: '", path, "' reads its weight from the frozen base ",
           linear->frozen_base()->describe(), ", which cannot train; keep the module in float (skip_modules of "
           "quant::quantize_model)");
  }

  auto require_key_matches = [&](const char* what, const std::string& key) {
    const Pattern pattern = Pattern::peft_key(key);
    for (const std::string& path : all_targets)
      if (pattern.matches(path)) return;
    std::string known;
    for (const std::string& path : all_targets) known += (known.empty() ? "" : ", ") + path;
    fail(where, what, " key '", key, "' matches no targeted module; the targets are: ", known);
  };
  if (check == SelectionCheck::every_name) {
    for (const auto& entry : config.rank_pattern) require_key_matches("rank_pattern", entry.first);
    for (const auto& entry : config.alpha_pattern) require_key_matches("alpha_pattern", entry.first);
  }

  // Seeds by position among all targets, in model order.
  auto target_index = [&](const std::string& path) {
    return static_cast<std::size_t>(std::find(all_targets.begin(), all_targets.end(), path) - all_targets.begin());
  };
  for (std::size_t k = 0; k < plan.targets.size(); ++k) {
    const auto& base = dynamic_cast<const nn::Linear<Scalar>&>(model.module(plan.targets[k]));
    const LoraConfig layer_config = config.layer_config(plan.targets[k], target_index(plan.targets[k]));
    try {
      if (base.frozen_base()) {  // shared, not copied; the Linear's bias (its own) replaces the base's
        plan.layers.push_back(std::make_unique<nn::LoraLayer<Scalar>>(base.frozen_base(), layer_config));
        if (base.has_bias()) plan.layers.back()->set_base_bias(base.bias());
      } else if (base.has_bias()) {
        plan.layers.push_back(std::make_unique<nn::LoraLayer<Scalar>>(base.weight(), base.bias(), layer_config));
      } else {
        plan.layers.push_back(std::make_unique<nn::LoraLayer<Scalar>>(base.weight(), layer_config));
      }
    } catch (const std::invalid_argument& e) {
      fail(where, plan.targets[k], ": ", e.what());
    }
  }
  // An Embedding target: a copy of the module with PEFT's embedding adapter (nn/embedding.hpp). PEFT
  // ignores lora_dropout there: a config written in code that asks for it is refused, naming the module;
  // one read from an adapter file (SelectionCheck::peft) loads, without dropout on the embedding.
  for (const std::string& path : plan.embedding_targets) {
    LoraConfig layer_config = config.layer_config(path, target_index(path));
    if (layer_config.dropout != 0) {
      if (check == SelectionCheck::every_name)
        fail(where, "target '", path, "' is an Embedding, and lora_dropout = ", layer_config.dropout,
             " is not applied to embeddings (PEFT ignores it there); set dropout = 0 or leave the module out of "
             "the targets");
      layer_config.dropout = 0;
    }
    auto embedding = std::make_unique<nn::Embedding<Scalar>>(dynamic_cast<const nn::Embedding<Scalar>&>(model.module(path)));
    try {
      embedding->add_lora(layer_config, LoraLinear<Scalar>::default_adapter);
    } catch (const std::invalid_argument& e) {
      fail(where, path, ": ", e.what());
    }
    plan.embeddings.push_back(std::move(embedding));
  }
  for (const std::string& path : plan.saved) {
    const auto& original = dynamic_cast<const nn::Linear<Scalar>&>(model.module(path));
    auto wrapper = std::make_unique<nn::ModulesToSave<Scalar>>(std::make_unique<nn::Linear<Scalar>>(original));
    wrapper->add_copy(LoraLinear<Scalar>::default_adapter);
    wrapper->set_active_adapter(LoraLinear<Scalar>::default_adapter);
    plan.wrappers.push_back(std::move(wrapper));
  }
  return plan;
}

// Puts a prepared injection into the model: the Linear targets become its LoRA layers, the Embedding
// targets their copies with an adapter (table frozen), the modules to save its wrappers (the model's own
// modules there are dropped: parameter lists that reach them are stale), every other Linear is frozen
// except the biases config.bias = all keeps trainable, and every other module with parameters
// (LayerNorm, an Embedding that is not a target, ...) is frozen whole.
template <class Scalar>
void commit_injection(nn::Sequential<Scalar>& model, Injection<Scalar>&& plan) {
  for (std::size_t k = 0; k < plan.targets.size(); ++k) model.replace_module(plan.targets[k], std::move(plan.layers[k]));
  for (std::size_t k = 0; k < plan.embedding_targets.size(); ++k)
    model.replace_module(plan.embedding_targets[k], std::move(plan.embeddings[k]));
  for (std::size_t k = 0; k < plan.saved.size(); ++k) model.replace_module(plan.saved[k], std::move(plan.wrappers[k]));
  for (const auto& [path, m] : model.named_modules()) {
    if (auto* linear = dynamic_cast<nn::Linear<Scalar>*>(m))
      linear->set_trainable(false, plan.config.bias == BiasMode::all);
    else if (!dynamic_cast<nn::LoraLayer<Scalar>*>(m) && !dynamic_cast<nn::ModulesToSave<Scalar>*>(m))
      m->set_requires_grad(false);  // LayerNorm and the like: PEFT trains only the adapters and what it is told
  }
  model.set_lora_record(std::move(plan.config));
}

template <class Scalar>
void inject_lora(const char* where, nn::Sequential<Scalar>& model, const nn::LoraInjectConfig& config,
                 SelectionCheck check) {
  commit_injection(model, prepare_injection(where, model, config, check));
}

}  // namespace lora::detail

namespace lora::nn {

// The paths of the Linear and Embedding modules that `config` targets, in model order (see
// LoraInjectConfig). Throws, listing the model's modules, when a name matches nothing, when a named module
// is neither a Linear nor an Embedding, or when nothing is left to target.
template <class Scalar>
std::vector<std::string> resolve_targets(const Sequential<Scalar>& model, const LoraInjectConfig& config) {
  return lora::detail::resolve_targets("inject_lora", model, config, lora::detail::SelectionCheck::every_name);
}

// Puts LoRA into `model`, the PEFT way:
//  - every targeted Linear (see LoraInjectConfig) becomes a LoraLayer built from its weight and bias,
//    with its own seed and the rank_pattern / alpha_pattern overrides (config.layer_config(path, k));
//  - every targeted Embedding gets PEFT's embedding adapter in place (Embedding::add_lora: A = 0,
//    B ~ N(0, 1), or both N(0, 1) with InitMethod::random), its table frozen; a dropout > 0 is refused
//    for it (PEFT ignores lora_dropout on embeddings);
//  - every other parameter is frozen, except the biases that config.bias keeps trainable
//    (all: every Linear's bias; lora_only: the adapted layers' biases) and the modules_to_save (weight
//    and bias); norms are frozen whole (PEFT's bias = "all" would also train a LayerNorm's bias);
//  - the config and the saved modules are recorded in the model (lora_config(), saved_modules()).
// Every name and pattern key must match something. Everything is checked before the model changes: on
// a throw the model is as it was.
template <class Scalar>
void inject_lora(Sequential<Scalar>& model, const LoraInjectConfig& config) {
  lora::detail::inject_lora("inject_lora", model, config, lora::detail::SelectionCheck::every_name);
}

// PEFT's merge_and_unload: folds every LoRA layer's active adapters into its weight and puts a plain
// Linear in its place, puts a plain Embedding with the merged table in the place of every LoRA embedding,
// and puts the module in use of every modules_to_save wrapper (the active adapter's copy, or the
// original) in the wrapper's place; the model no longer has LoRA. The trainable set is PEFT's: the
// merged weights and tables are frozen, a bias that trained still trains, and the saved modules keep
// their trainability (the active copies train). Parameter lists made before are stale.
template <class Scalar>
void merge_and_unload(Sequential<Scalar>& model) {
  constexpr const char* where = "merge_and_unload";
  auto layers = model.lora_layers();
  const auto embeddings = model.lora_embeddings();
  if (layers.empty() && embeddings.empty()) detail::fail(where, "the model has no LoRA layer");
  const bool was_merged = model.merged();
  if (!was_merged) model.merge();
  std::vector<std::pair<std::string, std::unique_ptr<Module<Scalar>>>> plain;
  try {
    for (auto& [path, layer] : layers) {
      std::unique_ptr<Linear<Scalar>> linear = layer->has_bias()
                                                   ? std::make_unique<Linear<Scalar>>(layer->base_weight(), layer->bias())
                                                   : std::make_unique<Linear<Scalar>>(layer->base_weight());
      linear->set_trainable(false, layer->bias_trainable());
      plain.emplace_back(path, std::move(linear));
    }
    for (const auto& [path, embedding] : embeddings) {
      const Embedding<Scalar>& merged = *embedding;
      auto table = std::make_unique<Embedding<Scalar>>(merged.weight());
      table->set_trainable(false);
      plain.emplace_back(path, std::move(table));
    }
    for (auto& [path, wrapper] : model.saved_modules())
      plain.emplace_back(path, std::make_unique<Linear<Scalar>>(wrapper->current()));
  } catch (...) {
    if (!was_merged) model.unmerge();
    throw;
  }
  for (auto& [path, module] : plain) model.replace_module(path, std::move(module));
  model.set_lora_record(std::nullopt);
}

struct ParameterCount {
  Index trainable = 0;  // what an optimiser updates
  Index total = 0;      // every parameter of the model as it stands (base + adapters + saved copies)
  Index adapter = 0;    // lora_A and lora_B of the active adapters (lora_embedding_A and _B included)
  Index saved_copies = 0;  // the modules_to_save copies, one per adapter
  Index base() const { return total - adapter - saved_copies; }  // the parameters the model had before LoRA
};

template <class Scalar>
ParameterCount count_parameters(const Sequential<Scalar>& model) {
  ParameterCount c;
  c.trainable = model.num_trainable_parameters();
  c.total = model.num_parameters();
  for (const auto& [path, layer] : model.lora_layers())
    for (const std::string& name : layer->active_adapters())
      c.adapter += lora_parameter_count(layer->in_features(), layer->out_features(), layer->rank(name));
  for (const auto& [path, embedding] : model.lora_embeddings())
    c.adapter += lora_parameter_count(embedding->num_embeddings(), embedding->dim(), embedding->rank());
  for (const auto& [path, wrapper] : model.saved_modules())
    for (const std::string& name : wrapper->adapter_names()) c.saved_copies += wrapper->copy(name).num_parameters();
  return c;
}

// 1234567 -> "1,234,567".
inline std::string with_thousands(Index n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

// PEFT's print_trainable_parameters line:
// "trainable params: 8,192 || all params: 1,056,768 || trainable%: 0.7752"
template <class Scalar>
std::string summary(const Sequential<Scalar>& model) {
  const ParameterCount c = count_parameters(model);
  char percent[32];
  std::snprintf(percent, sizeof percent, "%.4f",
                c.total > 0 ? 100.0 * static_cast<double>(c.trainable) / static_cast<double>(c.total) : 0.0);
  return "trainable params: " + with_thousands(c.trainable) + " || all params: " + with_thousands(c.total) +
         " || trainable%: " + percent;
}

}  // namespace lora::nn
