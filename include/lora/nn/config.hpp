// lora.hpp: LoraInjectConfig, which layers of a model get LoRA and with what (PEFT's LoraConfig at the
// level of a model). The one place where PEFT's rules for choosing modules and per-module ranks live:
// inject_lora, from_pretrained and the adapter loader all ask this struct.
#pragma once

#include <lora/common.hpp>
#include <lora/config.hpp>
#include <lora/detail/pattern.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lora {
namespace detail {

// PEFT's rule for a list entry (target_modules, exclude_modules, modules_to_save): the path equals the
// name or ends with "." + name.
inline bool name_matches(const std::string& path, const std::string& name) {
  if (path == name) return true;
  return path.size() > name.size() && path.compare(path.size() - name.size(), name.size(), name) == 0 &&
         path[path.size() - name.size() - 1] == '.';
}

// One reading of a layer index: the all-digit component `index` (as written) after `after`.
struct LayerIndexReading {
  std::string after, index;
};

// The layer indices PEFT can read from `path` with re.match(r".*\.{P}\.(\d+)\.", path): an all-digit
// component preceded by a run of components (not the first one) that P matches and followed by another
// component. P is each of `patterns` in turn until one reads something; with no pattern, any single
// component ("[^.]*", PEFT's default). PEFT's `.*` in front was greedy (the last reading) before it
// became lazy (the first one); `first` and `last` are the readings each takes, equal when only one exists.
struct LayerIndexReadings {
  std::vector<LayerIndexReading> first, last;
};

inline LayerIndexReadings layer_index_readings(const std::string& path, const std::vector<std::string>& patterns) {
  std::vector<std::string> parts;
  for (std::size_t begin = 0;;) {
    const std::size_t dot = path.find('.', begin);
    parts.push_back(path.substr(begin, dot == std::string::npos ? std::string::npos : dot - begin));
    if (dot == std::string::npos) break;
    begin = dot + 1;
  }
  auto digits = [](const std::string& s) {
    if (s.empty()) return false;
    for (char c : s)
      if (c < '0' || c > '9') return false;
    return true;
  };
  auto join = [&](std::size_t j, std::size_t i) {  // parts[j .. i) with '.'
    std::string s = parts[j];
    for (std::size_t k = j + 1; k < i; ++k) s += "." + parts[k];
    return s;
  };
  const std::vector<std::string> any_component{"[^.]*"};
  for (const std::string& p : patterns.empty() ? any_component : patterns) {
    const Pattern compiled = Pattern::full(p);
    // Readings by where the run before the index starts: the lowest start is the lazy choice, the highest
    // the greedy one.
    std::size_t low = parts.size(), high = 0;
    std::vector<std::pair<std::size_t, LayerIndexReading>> found;
    for (std::size_t i = 2; i + 1 < parts.size(); ++i) {
      if (!digits(parts[i])) continue;
      for (std::size_t j = 1; j < i; ++j) {
        const std::string run = join(j, i);
        if (!compiled.matches(run)) continue;
        found.push_back({j, {run, parts[i]}});
        low = std::min(low, j);
        high = std::max(high, j);
      }
    }
    if (found.empty()) continue;
    LayerIndexReadings out;
    for (const auto& [start, reading] : found) {
      if (start == low) out.first.push_back(reading);
      if (start == high) out.last.push_back(reading);
    }
    return out;
  }
  return {};
}

// Whether the all-digit string `index` is one of `layers` (compared as numbers, as Python's int() does).
inline bool layer_index_in(const std::string& index, const std::vector<int>& layers) {
  std::size_t k = 0;
  while (k + 1 < index.size() && index[k] == '0') ++k;
  if (index.size() - k > 9) return false;  // beyond any int
  const long value = std::stol(index.substr(k));
  for (int layer : layers)
    if (layer == value) return true;
  return false;
}

// PEFT's get_pattern_key: the value of the first key whose regex matches a trailing run of the path's
// components (re.match(rf"(.*\.)?({key})$", path)), else `fallback`.
template <class T>
T pattern_lookup(const std::vector<std::pair<std::string, T>>& patterns, const std::string& path, T fallback) {
  for (const auto& [key, value] : patterns)
    if (Pattern::peft_key(key).matches(path)) return value;
  return fallback;
}

}  // namespace detail

namespace nn {

// The adapter's hyper-parameters are the LoraConfig this struct extends (rank, alpha, dropout,
// use_rslora, init, init_std, seed, keep_original_weight, bias); the rest says where it goes. Each
// targeted layer gets its own seed derived from `seed` and its position among the targets, so no two
// layers share an initial A. `bias` is model-wide here: none; all (every bias of the model trains);
// lora_only (the biases of the adapted layers).
struct LoraInjectConfig : LoraConfig {
  // ---- which Linear and Embedding modules get an adapter (PEFT's check_target_module_exists) ----------
  // Either names or one regex, not both:
  //  - target_modules: an entry matches a module whose path equals it or ends with "." + entry
  //    ("layers.0" or "0" match "layers.0"; "q_proj" matches "blocks.3.q_proj"). Every entry must match at
  //    least one module, and every module matched must be a Linear or an Embedding. The single entry
  //    "all-linear" targets every Linear except the last one (the output layer), never an Embedding (PEFT).
  //  - target_regex: must match a module's whole path (re.fullmatch, on the linear-time matcher of
  //    detail/pattern.hpp); modules that match but are neither Linear nor Embedding are skipped; at least
  //    one must be left.
  std::vector<std::string> target_modules;
  std::string target_regex;

  // Modules never adapted, checked before anything else: names (matched like target_modules) or one
  // regex (whole path), not both. Entries need not match anything.
  std::vector<std::string> exclude_modules;
  std::string exclude_regex;

  // Only modules in these layers (PEFT's layers_to_transform; empty: every layer). The layer index is the
  // all-digit path component after a component matched by one of layers_pattern (regexes, tried in
  // order; PEFT's layers_pattern), or after any component when layers_pattern is empty:
  // "model.layers.3.q_proj" is in layer 3. Needs target_modules names; a module named in full in
  // target_modules is taken whatever its layer, as PEFT does. A path where PEFT's readings disagree
  // ("model.layers.1.experts.0.w1" without layers_pattern) is refused: name the component in layers_pattern.
  std::vector<int> layers_to_transform;
  std::vector<std::string> layers_pattern;

  // Per-module overrides of rank and alpha (PEFT's rank_pattern / alpha_pattern), in order: the first
  // key whose regex matches a trailing run of the path's components wins (PEFT's
  // re.match(rf"(.*\.)?({key})$", path)); "layers.2" and "2" both match "layers.2".
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;

  // Modules kept fully trainable (weight and bias), matched like target_modules: the classifier head.
  std::vector<std::string> modules_to_save;

  // PEFT's fan_in_fan_out: the adapted base layers were GPT-2 Conv1D modules, whose weight PyTorch stores
  // [in, out]. Here every Linear holds W [out x in] (a Conv1D is loaded as a Linear from the transposed
  // weight), so the adapter's shapes and math are those of any Linear (lora_A [r x in], lora_B [out x r],
  // as PEFT stores them for Conv1D too) and the flag changes nothing in the computation: it is recorded,
  // so that an adapter saved from the model says what its base was (adapter_config.json).
  bool fan_in_fan_out = false;

  // Whether the module at `path` is selected by name (exclude_modules, target_modules or target_regex,
  // layers_to_transform); inject_lora also requires it to be a Linear or an Embedding. "all-linear" selects by type, so
  // here it selects every path that is not excluded and lies in layers_to_transform. Throws
  // std::invalid_argument naming `where` when PEFT's readings of the layer index disagree.
  bool targets(const std::string& path, const char* where = "LoraInjectConfig::targets") const {
    if (excludes(path)) return false;
    if (!target_regex.empty()) return detail::Pattern::full(target_regex).matches(path);
    bool by_suffix = false;
    for (const std::string& t : target_modules) {
      if (path == t) return true;  // named in full: its layer does not matter (PEFT)
      by_suffix = by_suffix || detail::name_matches(path, t) || t == "all-linear";
    }
    return by_suffix && in_layers(path, where);
  }

  bool excludes(const std::string& path) const {
    if (!exclude_regex.empty()) return detail::Pattern::full(exclude_regex).matches(path);
    for (const std::string& e : exclude_modules)
      if (detail::name_matches(path, e)) return true;
    return false;
  }

  bool saves(const std::string& path) const {
    for (const std::string& s : modules_to_save)
      if (detail::name_matches(path, s)) return true;
    return false;
  }

  // Whether `path` lies in layers_to_transform (always, when it is empty).
  bool in_layers(const std::string& path, const char* where = "LoraInjectConfig::in_layers") const {
    if (layers_to_transform.empty()) return true;
    const detail::LayerIndexReadings readings = detail::layer_index_readings(path, layers_pattern);
    if (readings.first.empty()) return false;
    const bool in = detail::layer_index_in(readings.first.front().index, layers_to_transform);
    for (const auto* list : {&readings.first, &readings.last})
      for (const detail::LayerIndexReading& r : *list)
        if (detail::layer_index_in(r.index, layers_to_transform) != in)
          detail::fail(where, "layers_to_transform: the layer index of '", path, "' is ambiguous: ",
                       readings.first.front().index, " after '", readings.first.front().after, "' or ", r.index,
                       " after '", r.after, "' (PEFT versions read it differently); set layers_pattern to the "
                       "component that precedes the layer index");
    return in;
  }

  // PEFT's get_pattern_key: the first matching key's value, else the default.
  int rank_for(const std::string& path) const { return detail::pattern_lookup(rank_pattern, path, rank); }
  double alpha_for(const std::string& path) const { return detail::pattern_lookup(alpha_pattern, path, alpha); }

  // The LoraConfig of the index-th targeted layer, at `path`.
  LoraConfig layer_config(const std::string& path, std::size_t index) const {
    LoraConfig c = *this;
    c.rank = rank_for(path);
    c.alpha = alpha_for(path);
    c.seed = mix_seed(seed, index);
    c.bias = bias == BiasMode::none ? BiasMode::none : BiasMode::all;  // this layer's bias trains
    return c;
  }

  // Throws std::invalid_argument naming `where` for out-of-range values, an empty target selection,
  // fields that PEFT does not combine, and regular expressions outside detail/pattern.hpp's subset.
  void validate(const char* where) const {
    if (target_modules.empty() && target_regex.empty())
      detail::fail(where, "no target: set target_modules (names) or target_regex");
    if (!target_modules.empty() && !target_regex.empty())
      detail::fail(where, "set either target_modules or target_regex, not both");
    if (!exclude_modules.empty() && !exclude_regex.empty())
      detail::fail(where, "set either exclude_modules or exclude_regex, not both");
    auto no_empty_name = [&](const char* field, const std::vector<std::string>& names) {
      for (const std::string& t : names)
        if (t.empty()) detail::fail(where, field, " contains an empty name");
    };
    no_empty_name("target_modules", target_modules);
    no_empty_name("exclude_modules", exclude_modules);
    no_empty_name("modules_to_save", modules_to_save);
    auto check_regex = [&](const char* field, const std::string& regex, bool key) {
      try {
        if (key) detail::Pattern::peft_key(regex);
        else detail::Pattern::full(regex);
      } catch (const std::invalid_argument& e) {
        detail::fail(where, field, " '", regex, "' is not a valid regular expression: ", e.what());
      }
    };
    if (!target_regex.empty()) check_regex("target_regex", target_regex, false);
    if (!exclude_regex.empty()) check_regex("exclude_regex", exclude_regex, false);
    if (!layers_to_transform.empty() && !target_regex.empty())
      detail::fail(where, "layers_to_transform applies to target_modules names, not to target_regex "
                          "(put the layers in the regex)");
    if (!layers_pattern.empty() && layers_to_transform.empty())
      detail::fail(where, "layers_pattern is set but layers_to_transform is empty");
    for (const std::string& p : layers_pattern) check_regex("layers_pattern", p, false);
    LoraConfig::validate(where);
    for (const auto& [key, r] : rank_pattern) {
      if (key.empty() || r < 1)
        detail::fail(where, "rank_pattern['", key, "'] must name a module and be >= 1, got ", r);
      check_regex("rank_pattern key", key, true);
    }
    for (const auto& [key, a] : alpha_pattern) {
      if (key.empty() || !std::isfinite(a) || a <= 0)
        detail::fail(where, "alpha_pattern['", key, "'] must name a module and be finite and > 0, got ", a);
      check_regex("alpha_pattern key", key, true);
    }
  }

  // PEFT's rule for a name in target_modules and modules_to_save (detail::name_matches).
  static bool path_matches(const std::string& path, const std::string& name) {
    return detail::name_matches(path, name);
  }

  // splitmix64 of seed + index: well-spread per-layer seeds from one user seed.
  static std::uint64_t mix_seed(std::uint64_t seed, std::size_t index) {
    std::uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (static_cast<std::uint64_t>(index) + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
};

}  // namespace nn
}  // namespace lora
