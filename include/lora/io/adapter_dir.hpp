// lora.hpp: PEFT adapter directories: adapter_model.safetensors + adapter_config.json.
//
// Keys: base_model.model.<module path>.lora_A.weight [r, in] and .lora_B.weight [out, r] for each LoRA
// module (a GPT-2 Conv1D base, fan_in_fan_out = true, has the same shapes); for each LoRA embedding
// base_model.model.<path>.lora_embedding_A [r, num_embeddings] and .lora_embedding_B [dim, r], without
// ".weight" (PEFT keeps them as bare parameters); base_model.model.<path>.weight / .bias for each module of
// modules_to_save; a LoRA layer's trained bias (config bias != none) as
// base_model.model.<path>.base_layer.bias (".bias" is accepted on load); with bias = "all", the trained
// bias of every other module as base_model.model.<path>.bias. The adapter's own name is not in the keys.
// Header metadata {"format": "pt"}.
//
// Loading validates everything before it changes anything: the safetensors header (see
// io/safetensors.hpp), the config, every tensor against its module (rank from r / rank_pattern, in, out;
// num_embeddings and dim for an embedding), no tensor without a module and no targeted module without its
// tensors. Any fault is an io_error naming the file, the tensor and the problem (a shape: the expected
// and the actual), with the model unchanged. An Embedding holds one adapter: loading a second one beside
// it is refused (std::invalid_argument, naming the module). lora_dropout does not apply to embeddings
// (PEFT ignores it there).
//
// Saving replaces the two files as a pair (detail::replace_files_together in io/file.hpp): both are
// written into a new sibling directory with hard links to every other entry of the directory (a README,
// tokenizer files, other adapters in subdirectories), which is swapped in by one renameat2
// RENAME_EXCHANGE. A crash at any point leaves the old pair or the new pair, never new weights with the
// old config, and every other entry unchanged. Where the exchange is missing (NFS, CIFS) the directory is
// renamed aside, then the new one in (a crash between the two leaves it absent, restored by the next
// save); where no sibling can be used (read-only parent, a mount point) the files are renamed one by one.
#pragma once

#include <lora/adapters.hpp>
#include <lora/io/file.hpp>
#include <lora/io/peft_config.hpp>
#include <lora/io/safetensors.hpp>

#include <algorithm>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace lora {

inline constexpr const char* adapter_weights_file = "adapter_model.safetensors";
inline constexpr const char* adapter_config_file = "adapter_config.json";
inline constexpr const char* peft_key_prefix = "base_model.model.";

struct AdapterSaveOptions {
  Dtype dtype = Dtype::F32;  // F32 (default), F64, F16 or BF16
  std::optional<std::string> base_model_name_or_path;
  std::optional<std::string> task_type;  // e.g. "SEQ_CLS"
};

enum class AdapterLoadMode {
  add,      // a new adapter: no layer may already have this name
  replace,  // add, or replace an adapter of this name (its active flag and runtime scale are kept)
};

// The trainable bias of a module that has no LoRA and is not in modules_to_save: PEFT's bias = "all"
// trains and saves every bias of the model (base_model.model.<path>.bias). A model class lists them
// (io/model.hpp does for nn::Sequential); the functions over a bare LoraModelView have none.
template <class Scalar>
struct TrainedBiasRef {
  std::string path;
  ParamRef<Scalar> bias;  // [out x 1]
};

namespace detail {

inline std::string escape_regex(const std::string& s) {
  std::string out;
  for (char c : s) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (!((u >= '0' && u <= '9') || (u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z') || c == '_' || u >= 0x80))
      out += '\\';
    out += c;
  }
  return out;
}

// The most frequent value (ties: the first seen).
template <class T>
T most_common(const std::vector<T>& values) {
  T best = values.front();
  std::size_t best_count = 0;
  for (const T& v : values) {
    const auto count = static_cast<std::size_t>(std::count(values.begin(), values.end(), v));
    if (count > best_count) best = v, best_count = count;
  }
  return best;
}

// Builds the PEFT config describing `adapter` on these modules (LoRA layers and embeddings), with
// rank_pattern / alpha_pattern for the modules that differ from the most common values, checked to resolve
// back to every module's value.
template <class Scalar>
PeftLoraConfig describe_adapter(const char* where, const LoraModelView<Scalar>& model,
                                const std::vector<const LoraModuleRef<Scalar>*>& mods,
                                const std::vector<const LoraEmbeddingRef<Scalar>*>& embeddings,
                                const std::string& adapter, bool other_biases) {
  struct Entry {
    std::string path;
    LoraConfig config;
    bool embedding;
  };
  std::vector<Entry> entries;
  for (const auto* m : mods) entries.push_back({m->path, m->layer->adapter_config(adapter), false});
  for (const auto* e : embeddings) entries.push_back({e->path, e->layer->lora_config(), true});
  PeftLoraConfig c;
  std::vector<int> ranks;
  std::vector<double> alphas;
  const Entry& first = entries.front();
  const Entry* first_linear = nullptr;
  for (const Entry& e : entries) {
    if (e.config.use_rslora != first.config.use_rslora)
      fail(where, "adapter '", adapter, "' uses rsLoRA on some modules and not on others (module '", e.path,
           "'); a PEFT config has one use_rslora flag");
    if (!e.embedding) {  // an embedding has no dropout (PEFT ignores lora_dropout there)
      if (!first_linear) first_linear = &e;
      if (e.config.dropout != first_linear->config.dropout)
        fail(where, "adapter '", adapter, "' has different dropout rates on different modules (module '", e.path,
             "'); a PEFT config has one lora_dropout");
    }
    ranks.push_back(e.config.rank);
    alphas.push_back(e.config.alpha);
  }
  c.r = most_common(ranks);
  c.lora_alpha = most_common(alphas);
  c.use_rslora = first.config.use_rslora;
  c.lora_dropout = first_linear ? first_linear->config.dropout : 0.0;
  // Patterns: one key per differing module, the longest paths first, so that a key that is a dotted
  // suffix of another module's path never shadows that module's own key.
  std::vector<std::size_t> order(entries.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return entries[a].path.size() > entries[b].path.size(); });
  std::vector<bool> explicit_rank(entries.size()), explicit_alpha(entries.size());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    explicit_rank[i] = ranks[i] != c.r;
    explicit_alpha[i] = alphas[i] != c.lora_alpha;
  }
  for (int pass = 0; pass < 2; ++pass) {
    c.rank_pattern.clear();
    c.alpha_pattern.clear();
    for (std::size_t i : order) {
      if (explicit_rank[i]) c.rank_pattern.emplace_back(entries[i].path, ranks[i]);
      if (explicit_alpha[i]) c.alpha_pattern.emplace_back(entries[i].path, alphas[i]);
    }
    bool consistent = true;
    for (std::size_t i = 0; i < entries.size(); ++i) {
      if (c.rank_for(entries[i].path) != ranks[i]) explicit_rank[i] = true, consistent = false;
      if (c.alpha_for(entries[i].path) != alphas[i]) explicit_alpha[i] = true, consistent = false;
    }
    if (consistent) break;
    if (pass == 1)
      fail(where, "cannot express the per-module ranks and alphas of adapter '", adapter,
           "' as PEFT rank_pattern / alpha_pattern keys");
  }
  // target_modules: the module paths; if that list would also match a module without the adapter, a
  // regular expression that matches exactly these paths.
  std::vector<std::string> paths;
  for (const Entry& e : entries) paths.push_back(e.path);
  c.target_modules = paths;
  bool ambiguous = false;
  for (const auto& m : model.lora_modules)
    if (!m.layer->has_adapter(adapter) && c.targets(m.path).value_or(false)) ambiguous = true;
  for (const auto& e : model.embedding_modules)
    if (e.layer->adapter_name() != adapter && c.targets(e.path).value_or(false)) ambiguous = true;
  if (ambiguous) {
    std::string re = "(?:";
    for (std::size_t i = 0; i < paths.size(); ++i) re += (i ? "|" : "") + escape_regex(paths[i]);
    c.target_modules.reset();
    c.target_modules_regex = re + ")";
  }
  if (!model.saved_modules.empty()) {
    std::vector<std::string> saved;
    for (const auto& s : model.saved_modules) saved.push_back(s.path);
    c.modules_to_save = saved;
  }
  for (const auto* m : mods)
    if (m->layer->bias_trainable()) c.bias = "lora_only";
  if (other_biases) c.bias = "all";
  return c;
}

template <class Scalar>
struct PlannedLora {
  const LoraModuleRef<Scalar>* module;
  LoraConfig config;
  Matrix<Scalar> A, B;
  std::optional<Vector<Scalar>> bias;
};

template <class Scalar>
struct PlannedEmbedding {
  const LoraEmbeddingRef<Scalar>* module;
  LoraConfig config;
  Matrix<Scalar> A, B;
};

template <class Scalar>
struct PlannedSaved {
  const SavedModuleRef<Scalar>* module;
  Matrix<Scalar> weight;
  std::optional<Vector<Scalar>> bias;
};

template <class Scalar>
struct PlannedBias {
  const TrainedBiasRef<Scalar>* module;
  Vector<Scalar> bias;
};

enum class LoadKind { add, replace, hot_swap };

// Refuses the tensors of LoRA variants this library does not implement, naming the first one.
inline void require_supported_tensors(const char* where, const SafetensorsReader& weights) {
  for (const TensorInfo& t : weights.tensors())
    if (t.name.find(".lora_magnitude_vector") != std::string::npos)
      io_fail(where, weights.path(), t.name, "a DoRA magnitude vector: DoRA adapters are not supported");
}

// Reads and checks everything, then applies. `file` names the weights in messages.
template <class Scalar>
void apply_adapter(const char* where, const SafetensorsReader& weights, const PeftLoraConfig& config,
                   const LoraModelView<Scalar>& model, const std::string& name, LoadKind kind,
                   const std::vector<TrainedBiasRef<Scalar>>& other_biases = {}) {
  const std::string& file = weights.path();
  model.validate(where);
  if (name.empty() || name.find('.') != std::string::npos)
    fail(where, "adapter name '", name, "' must be non-empty and contain no '.'");
  const std::string prefix = peft_key_prefix;
  std::set<std::string> used;
  std::vector<PlannedLora<Scalar>> lora;
  std::vector<PlannedEmbedding<Scalar>> embeddings;
  std::vector<PlannedSaved<Scalar>> saved;
  std::vector<PlannedBias<Scalar>> biases;
  require_supported_tensors(where, weights);
  const nn::LoraInjectConfig rules = config.to_inject_config();  // rank and alpha per module
  // exclude_modules and layers_to_transform included; a layer index PEFT versions read differently is
  // the file's fault.
  auto targeted = [&](const std::string& path) {
    try {
      return config.targets(path).value_or(false);
    } catch (const std::invalid_argument& e) {
      io_fail(where, file, "", e.what());
    }
  };

  for (const auto& m : model.lora_modules) {
    const std::string kA = prefix + m.path + ".lora_A.weight", kB = prefix + m.path + ".lora_B.weight";
    const TensorInfo* tA = weights.find(kA);
    const TensorInfo* tB = weights.find(kB);
    if (!tA && !tB) {
      if (kind != LoadKind::hot_swap && targeted(m.path))
        io_fail(where, file, kA, "missing: module '", m.path,
                "' is matched by target_modules but the file has no LoRA weights for it");
      if (kind == LoadKind::hot_swap && m.layer->has_adapter(name))
        io_fail(where, file, kA, "missing: module '", m.path, "' has adapter '", name,
                "', and a hot swap must replace the adapter on the same modules");
      continue;
    }
    if (!tA) io_fail(where, file, kA, "missing, while ", kB, " is present");
    if (!tB) io_fail(where, file, kB, "missing, while ", kA, " is present");
    const LoraLinear<Scalar>& layer = *m.layer;
    LoraConfig lc = rules.layer_config(m.path, 0);
    const auto r = static_cast<std::uint64_t>(lc.rank);
    const auto in = static_cast<std::uint64_t>(layer.in_features());
    const auto out = static_cast<std::uint64_t>(layer.out_features());
    if (tA->shape.size() != 2 || tA->shape[1] != in || tA->shape[0] != r)
      io_fail(where, file, kA, "shape ", shape_string(tA->shape), " does not match module '", m.path, "': expected [",
              r, ", ", in, "] (rank ", r, " from the config's ", lc.rank != config.r ? "rank_pattern" : "r",
              ", in_features ", in, ")");
    if (tB->shape.size() != 2 || tB->shape[0] != out || tB->shape[1] != r)
      io_fail(where, file, kB, "shape ", shape_string(tB->shape), " does not match module '", m.path, "': expected [",
              out, ", ", r, "] (out_features ", out, ", rank ", r, ")");
    const bool exists = layer.has_adapter(name);
    if (kind == LoadKind::add && exists)
      fail(where, "module '", m.path, "' already has an adapter named '", name,
           "'; delete it first, or load with AdapterLoadMode::replace");
    if (kind == LoadKind::hot_swap && !exists)
      io_fail(where, file, kA, "module '", m.path, "' has no adapter '", name, "' to swap");
    PlannedLora<Scalar> p{&m, lc, weights.matrix<Scalar>(kA, where), weights.matrix<Scalar>(kB, where), std::nullopt};
    used.insert(kA);
    used.insert(kB);
    for (const std::string& kb : {prefix + m.path + ".base_layer.bias", prefix + m.path + ".bias"}) {
      if (!weights.contains(kb)) continue;
      if (p.bias) io_fail(where, file, kb, "a second bias for module '", m.path, "'");
      if (!layer.bias_trainable())
        io_fail(where, file, kb, "module '", m.path,
                "' has no trainable bias (build the layer with a bias and config.bias = all or lora_only)");
      p.bias = weights.vector<Scalar>(kb, layer.out_features(), where);
      used.insert(kb);
    }
    lora.push_back(std::move(p));
  }

  for (const auto& m : model.embedding_modules) {
    const std::string kA = prefix + m.path + ".lora_embedding_A", kB = prefix + m.path + ".lora_embedding_B";
    const TensorInfo* tA = weights.find(kA);
    const TensorInfo* tB = weights.find(kB);
    const nn::Embedding<Scalar>& layer = *m.layer;
    const bool exists = layer.adapter_name() == name;
    if (!tA && !tB) {
      if (kind != LoadKind::hot_swap && targeted(m.path))
        io_fail(where, file, kA, "missing: module '", m.path,
                "' (Embedding) is matched by target_modules but the file has no LoRA weights for it");
      if (kind == LoadKind::hot_swap && exists)
        io_fail(where, file, kA, "missing: module '", m.path, "' has adapter '", name,
                "', and a hot swap must replace the adapter on the same modules");
      continue;
    }
    if (!tA) io_fail(where, file, kA, "missing, while ", kB, " is present");
    if (!tB) io_fail(where, file, kB, "missing, while ", kA, " is present");
    if (!exists) {
      if (kind == LoadKind::hot_swap)
        io_fail(where, file, kA, "module '", m.path, "' has no adapter '", name, "' to swap (its adapter is '",
                layer.adapter_name(), "')");
      fail(where, "module '", m.path, "' is an Embedding with LoRA adapter '", layer.adapter_name(),
           "'; an Embedding holds one adapter, so a second one ('", name, "') cannot be loaded beside it");
    }
    if (kind == LoadKind::add)
      fail(where, "module '", m.path, "' already has an adapter named '", name,
           "'; delete it first, or load with AdapterLoadMode::replace");
    LoraConfig lc = rules.layer_config(m.path, 0);
    lc.dropout = 0;  // PEFT never applies lora_dropout to an embedding
    lc.keep_original_weight = layer.lora_config().keep_original_weight;
    const auto r = static_cast<std::uint64_t>(lc.rank);
    const auto n = static_cast<std::uint64_t>(layer.num_embeddings());
    const auto d = static_cast<std::uint64_t>(layer.dim());
    if (tA->shape.size() != 2 || tA->shape[0] != r || tA->shape[1] != n)
      io_fail(where, file, kA, "shape ", shape_string(tA->shape), " does not match module '", m.path,
              "' (Embedding): expected [", r, ", ", n, "] (rank ", r, " from the config's ",
              lc.rank != config.r ? "rank_pattern" : "r", ", num_embeddings ", n, ")");
    if (tB->shape.size() != 2 || tB->shape[0] != d || tB->shape[1] != r)
      io_fail(where, file, kB, "shape ", shape_string(tB->shape), " does not match module '", m.path,
              "' (Embedding): expected [", d, ", ", r, "] (embedding dim ", d, ", rank ", r, ")");
    embeddings.push_back({&m, lc, weights.matrix<Scalar>(kA, where), weights.matrix<Scalar>(kB, where)});
    used.insert(kA);
    used.insert(kB);
  }
  if (lora.empty() && embeddings.empty())
    io_fail(where, file, "", "no LoRA weights for any of the model's ",
            model.lora_modules.size() + model.embedding_modules.size(), " LoRA modules");

  for (const auto& s : model.saved_modules) {
    const std::string kw = prefix + s.path + ".weight", kb = prefix + s.path + ".bias";
    const bool has_w = weights.contains(kw), has_b = weights.contains(kb);
    if (!has_w) {
      if (config.saves_module(s.path)) io_fail(where, file, kw, "missing: module '", s.path, "' is in modules_to_save");
      if (has_b) io_fail(where, file, kw, "missing, while ", kb, " is present");
      continue;
    }
    PlannedSaved<Scalar> p{&s, weights.matrix<Scalar>(kw, s.weight.rows(), s.weight.cols(), where), std::nullopt};
    used.insert(kw);
    if (s.bias) {
      if (!has_b) io_fail(where, file, kb, "missing: module '", s.path, "' has a bias");
      p.bias = weights.vector<Scalar>(kb, s.bias->size(), where);
      used.insert(kb);
    } else if (has_b) {
      io_fail(where, file, kb, "module '", s.path, "' has no bias");
    }
    saved.push_back(std::move(p));
  }

  for (const auto& b : other_biases) {
    const std::string kb = prefix + b.path + ".bias";
    if (!weights.contains(kb)) {
      if (config.bias == "all")
        io_fail(where, file, kb, "missing: the config's bias is \"all\" and module '", b.path,
                "' has a trainable bias");
      continue;
    }
    biases.push_back({&b, weights.vector<Scalar>(kb, b.bias.rows(), where)});
    used.insert(kb);
  }

  for (const TensorInfo& t : weights.tensors()) {
    if (used.count(t.name)) continue;
    if (t.name.compare(0, prefix.size(), prefix) != 0)
      io_fail(where, file, t.name, "unexpected tensor: names in an adapter file start with '", prefix, "'");
    io_fail(where, file, t.name, "unexpected tensor: no LoRA module or module to save of the model takes it");
  }

  for (const auto& p : lora)
    if (p.module->layer->merged()) fail(where, "module '", p.module->path, "' is merged; unmerge first");
  for (const auto& p : embeddings)
    if (p.module->layer->merged()) fail(where, "module '", p.module->path, "' is merged; unmerge first");
  for (const auto& p : embeddings)  // the values are read; only a non-finite one can still be refused
    if (!p.A.allFinite() || !p.B.allFinite())
      io_fail(where, file, prefix + p.module->path + (p.A.allFinite() ? ".lora_embedding_B" : ".lora_embedding_A"),
              "contains NaN or Inf");

  // Apply. Every check is done; what remains cannot fail on valid input except for lack of memory.
  for (auto& p : embeddings) p.module->layer->set_lora(p.config, p.A, p.B);
  std::vector<LoraLinear<Scalar>*> added;
  try {
    for (auto& p : lora) {
      LoraLinear<Scalar>& layer = *p.module->layer;
      if (layer.has_adapter(name)) {
        hot_swap_adapter(layer, name, p.A, p.B, p.config);
      } else {
        layer.add_adapter(name, p.config);
        added.push_back(&layer);
        layer.set_adapter_weights(name, p.A, p.B);
      }
      if (p.bias) layer.set_bias(*p.bias);
    }
  } catch (...) {
    for (LoraLinear<Scalar>* l : added) l->delete_adapter(name);
    throw;
  }
  for (auto& p : saved) {
    ParamRef<Scalar> weight = p.module->weight;
    weight = p.weight;
    if (p.bias) {
      ParamRef<Scalar> bias = *p.module->bias;
      bias = *p.bias;
    }
  }
  for (auto& p : biases) {
    ParamRef<Scalar> bias = p.module->bias;
    bias = p.bias;
  }
}

}  // namespace detail

namespace detail {

// fan_in_fan_out: written into the config (the model's record of PEFT's flag; see LoraInjectConfig).
template <class Scalar>
void write_adapter(const std::string& dir, const LoraModelView<Scalar>& model,
                   const std::vector<TrainedBiasRef<Scalar>>& other_biases, const std::string& adapter,
                   const AdapterSaveOptions& options, bool fan_in_fan_out = false) {
  constexpr const char* where = "save_adapter";
  model.validate(where);
  if (!is_convertible(options.dtype)) detail::fail(where, "dtype ", to_string(options.dtype), " cannot hold weights");
  std::vector<const LoraModuleRef<Scalar>*> mods;
  for (const auto& m : model.lora_modules)
    if (m.layer->has_adapter(adapter)) mods.push_back(&m);
  std::vector<const LoraEmbeddingRef<Scalar>*> embeddings;
  for (const auto& e : model.embedding_modules)
    if (e.layer->adapter_name() == adapter) embeddings.push_back(&e);
  if (mods.empty() && embeddings.empty()) detail::require_known_adapter(where, model, adapter);

  PeftLoraConfig config = detail::describe_adapter(where, model, mods, embeddings, adapter, !other_biases.empty());
  config.base_model_name_or_path = options.base_model_name_or_path;
  config.task_type = options.task_type;
  config.fan_in_fan_out = fan_in_fan_out;

  SafetensorsWriter writer;
  const std::string prefix = peft_key_prefix;
  for (const auto* m : mods) {
    const LoraLinear<Scalar>& layer = *m->layer;
    writer.add(prefix + m->path + ".lora_A.weight", Matrix<Scalar>(layer.A(adapter)), options.dtype);
    writer.add(prefix + m->path + ".lora_B.weight", Matrix<Scalar>(layer.B(adapter)), options.dtype);
    if (layer.bias_trainable())
      writer.add_vector(prefix + m->path + ".base_layer.bias", Vector<Scalar>(layer.bias()), options.dtype);
  }
  for (const auto* e : embeddings) {
    const nn::Embedding<Scalar>& layer = *e->layer;
    writer.add(prefix + e->path + ".lora_embedding_A", Matrix<Scalar>(layer.lora_A()), options.dtype);
    writer.add(prefix + e->path + ".lora_embedding_B", Matrix<Scalar>(layer.lora_B()), options.dtype);
  }
  for (const auto& s : model.saved_modules) {
    writer.add(prefix + s.path + ".weight", Matrix<Scalar>(s.weight), options.dtype);
    if (s.bias) writer.add_vector(prefix + s.path + ".bias", Vector<Scalar>(s.bias->col(0)), options.dtype);
  }
  for (const auto& b : other_biases)
    writer.add_vector(prefix + b.path + ".bias", Vector<Scalar>(b.bias.col(0)), options.dtype);
  const std::string text = config.dump();

  detail::replace_files_together(
      dir,
      {{adapter_weights_file, [&](detail::AtomicFileWriter& file) { writer.write_to(file); }},
       {adapter_config_file, [&](detail::AtomicFileWriter& file) { file.write(text.data(), text.size()); }}},
      where);
}

}  // namespace detail

// Writes adapter `adapter` of every LoRA module and LoRA embedding that has it, and the model's
// modules_to_save, as a PEFT adapter directory (created if missing), replacing adapter_model.safetensors
// and adapter_config.json as a pair and keeping every other entry of the directory (see the top of this
// file). Throws
// std::invalid_argument for what cannot be written (no module has the adapter, NaN/Inf, values beyond an
// F16/BF16 range, mixed rsLoRA or dropout) and io_error for file-system failures; in both cases the
// directory is left as it was.
template <class Scalar>
void save_adapter(const std::string& dir, const LoraModelView<Scalar>& model, const std::string& adapter = "default",
                  const AdapterSaveOptions& options = {}) {
  detail::write_adapter(dir, model, {}, adapter, options);
}

// Reads an adapter directory's config (adapter_config.json). Throws io_error.
inline PeftLoraConfig read_adapter_config(const std::string& dir) {
  return PeftLoraConfig::load((std::filesystem::path(dir) / adapter_config_file).string());
}

// Loads the adapter of `dir` as adapter `name` on every LoRA module that has weights in the file (it is
// added inactive; set_active_adapters() turns it on), and the weights of the model's modules_to_save
// found in the file. Scaling follows the config: lora_alpha / r, or / sqrt(r) with use_rslora, with
// rank_pattern and alpha_pattern applied per module. Returns the config.
template <class Scalar>
PeftLoraConfig load_adapter(const std::string& dir, const LoraModelView<Scalar>& model, const std::string& name,
                            AdapterLoadMode mode = AdapterLoadMode::add) {
  const PeftLoraConfig config = read_adapter_config(dir);
  const SafetensorsReader weights =
      SafetensorsReader::open((std::filesystem::path(dir) / adapter_weights_file).string());
  detail::apply_adapter("load_adapter", weights, config, model, name,
                        mode == AdapterLoadMode::add ? detail::LoadKind::add : detail::LoadKind::replace);
  return config;
}

// The same from an opened weights file and a parsed config (no directory).
template <class Scalar>
void load_adapter(const SafetensorsReader& weights, const PeftLoraConfig& config, const LoraModelView<Scalar>& model,
                  const std::string& name, AdapterLoadMode mode = AdapterLoadMode::add) {
  detail::apply_adapter("load_adapter", weights, config, model, name,
                        mode == AdapterLoadMode::add ? detail::LoadKind::add : detail::LoadKind::replace);
}

// Replaces the weights of the existing adapter `name` with those of `dir`, on exactly the modules that
// have it, without touching any base weight: in place when rank, alpha, rsLoRA and dropout are
// unchanged. Active flags and runtime scales are kept. modules_to_save in the file are loaded too.
template <class Scalar>
PeftLoraConfig hot_swap_adapter(const std::string& dir, const LoraModelView<Scalar>& model, const std::string& name) {
  const PeftLoraConfig config = read_adapter_config(dir);
  const SafetensorsReader weights =
      SafetensorsReader::open((std::filesystem::path(dir) / adapter_weights_file).string());
  detail::apply_adapter("hot_swap_adapter", weights, config, model, name, detail::LoadKind::hot_swap);
  return config;
}

}  // namespace lora
