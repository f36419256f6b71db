// lora.hpp: LoraInjectConfig, which layers of a model get LoRA and with what (PEFT's LoraConfig at the
// level of a model).
#pragma once

#include <lora/common.hpp>
#include <lora/config.hpp>

#include <cmath>
#include <cstdint>
#include <map>
#include <optional>
#include <regex>
#include <string>
#include <vector>

namespace lora::nn {

struct LoraInjectConfig {
  // Which Linear modules get an adapter: either names or one regex, not both.
  //  - target_modules: an entry matches a module whose path equals it or ends with "." + entry
  //    ("layers.0" or "0" match "layers.0"; "q_proj" matches "blocks.3.q_proj"). Every entry must match at
  //    least one module. The single entry "all-linear" targets every Linear except the last one (the
  //    output layer), as PEFT does.
  //  - target_regex: must match a module's whole path (std::regex_match, ECMAScript); modules that match
  //    but are not Linear are skipped; at least one Linear must match.
  std::vector<std::string> target_modules;
  std::string target_regex;

  // The adapter, as LoraConfig. Each targeted layer gets its own seed derived from `seed` and its
  // position among the targets, so no two layers share an initial A.
  int rank = 8;
  double alpha = 8.0;
  double dropout = 0.0;
  bool use_rslora = false;
  InitMethod init = InitMethod::gaussian;
  std::optional<double> init_std;
  std::uint64_t seed = 0;
  bool keep_original_weight = false;

  // Per-module overrides of rank and alpha (PEFT's rank_pattern / alpha_pattern). A key matches a module
  // path as a target name does (equal, or a suffix after a '.'); the first matching key in map order wins.
  std::map<std::string, int> rank_pattern;
  std::map<std::string, double> alpha_pattern;

  // Which biases train: none; all (every bias of the model); lora_only (the biases of the adapted layers).
  BiasMode bias = BiasMode::none;

  // Modules kept fully trainable (weight and bias), matched like target_modules: the classifier head.
  std::vector<std::string> modules_to_save;

  // The LoraConfig of the index-th targeted layer, at `path`.
  LoraConfig layer_config(const std::string& path, std::size_t index) const {
    LoraConfig c;
    c.rank = rank;
    c.alpha = alpha;
    for (const auto& [key, r] : rank_pattern)
      if (path_matches(path, key)) {
        c.rank = r;
        break;
      }
    for (const auto& [key, a] : alpha_pattern)
      if (path_matches(path, key)) {
        c.alpha = a;
        break;
      }
    c.dropout = dropout;
    c.use_rslora = use_rslora;
    c.init = init;
    c.init_std = init_std;
    c.seed = mix_seed(seed, index);
    c.bias = bias == BiasMode::none ? BiasMode::none : BiasMode::all;  // this layer's bias trains
    c.keep_original_weight = keep_original_weight;
    return c;
  }

  // Throws std::invalid_argument naming `where` for out-of-range values or an empty target selection.
  void validate(const char* where) const {
    if (target_modules.empty() && target_regex.empty())
      detail::fail(where, "no target: set target_modules (names) or target_regex");
    if (!target_modules.empty() && !target_regex.empty())
      detail::fail(where, "set either target_modules or target_regex, not both");
    for (const std::string& t : target_modules)
      if (t.empty()) detail::fail(where, "target_modules contains an empty name");
    for (const std::string& t : modules_to_save)
      if (t.empty()) detail::fail(where, "modules_to_save contains an empty name");
    if (!target_regex.empty()) {
      try {
        std::regex check(target_regex);
      } catch (const std::regex_error& e) {
        detail::fail(where, "target_regex '", target_regex, "' is not a valid regular expression: ", e.what());
      }
    }
    layer_config("", 0).validate(where);
    for (const auto& [key, r] : rank_pattern)
      if (key.empty() || r < 1) detail::fail(where, "rank_pattern['", key, "'] must name a module and be >= 1, got ", r);
    for (const auto& [key, a] : alpha_pattern)
      if (key.empty() || !std::isfinite(a) || a <= 0)
        detail::fail(where, "alpha_pattern['", key, "'] must name a module and be finite and > 0, got ", a);
  }

  // PEFT's rule for a name in target_modules, modules_to_save and the patterns: the path equals it or
  // ends with "." + it.
  static bool path_matches(const std::string& path, const std::string& name) {
    if (path == name) return true;
    return path.size() > name.size() && path.compare(path.size() - name.size(), name.size(), name) == 0 &&
           path[path.size() - name.size() - 1] == '.';
  }

  // splitmix64 of seed + index: well-spread per-layer seeds from one user seed.
  static std::uint64_t mix_seed(std::uint64_t seed, std::size_t index) {
    std::uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (static_cast<std::uint64_t>(index) + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
};

}  // namespace lora::nn
