// lora.hpp: adapter_config.json, the LoRA fields of a PEFT config.
#pragma once

#include <lora/config.hpp>
#include <lora/detail/pattern.hpp>
#include <lora/io/error.hpp>
#include <lora/io/file.hpp>
#include <lora/nn/config.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lora {

// The fields of PEFT's LoraConfig this library reads and writes (PEFT's defaults), as the file spells
// them. What they mean is nn::LoraInjectConfig's business: to_inject_config() / from_inject_config() are
// the one conversion, and the lookups below go through it. Unknown fields are ignored on load. Loading
// rejects what it cannot honour: peft_type other than LORA, use_dora, lora_bias, combinations PEFT
// refuses, and regular expressions outside the supported subset (see detail/pattern.hpp).
struct PeftLoraConfig {
  std::string peft_type = "LORA";
  int r = 8;
  double lora_alpha = 8;
  double lora_dropout = 0;
  bool use_rslora = false;
  std::string bias = "none";  // none | all | lora_only
  // true: the adapted base layers are GPT-2 style Conv1D, weight stored [in, out]. The adapter tensors keep
  // nn.Linear's shapes (lora_A [r, in], lora_B [out, r]), and this library holds every base as a Linear
  // W [out x in] (a Conv1D's weight transposed when the base is loaded), so it only describes the base:
  // read, kept in the model's record (LoraInjectConfig::fan_in_fan_out) and written back by save_adapter.
  bool fan_in_fan_out = false;
  bool inference_mode = true;
  // PEFT accepts a list of module-name suffixes or one regular expression (re.fullmatch); the string
  // "all-linear" is PEFT's shorthand for every Linear but the output layer.
  std::optional<std::vector<std::string>> target_modules;
  std::optional<std::string> target_modules_regex;
  // The same two forms for the modules never adapted.
  std::optional<std::vector<std::string>> exclude_modules;
  std::optional<std::string> exclude_modules_regex;
  // Only these layer indices (an int or a list in the file; empty: every layer), read after a component
  // matching one of layers_pattern (a string or a list in the file; empty: any component).
  std::vector<int> layers_to_transform;
  std::vector<std::string> layers_pattern;
  std::optional<std::vector<std::string>> modules_to_save;
  // Per-module overrides, in file order (the first matching key wins, as in PEFT).
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::optional<std::string> base_model_name_or_path, task_type;

  // The model-level LoRA settings this file describes: targets, exclusions, layers, rank and alpha with
  // their patterns, dropout, rsLoRA, bias mode, modules_to_save, fan_in_fan_out. The adapter's initialisation fields keep
  // LoraConfig's defaults: its weights come from the file.
  nn::LoraInjectConfig to_inject_config() const {
    nn::LoraInjectConfig c;
    if (target_modules) c.target_modules = *target_modules;
    if (target_modules_regex) {
      if (is_all_linear(*target_modules_regex)) c.target_modules = {"all-linear"};
      else c.target_regex = *target_modules_regex;
    }
    if (exclude_modules) c.exclude_modules = *exclude_modules;
    if (exclude_modules_regex) c.exclude_regex = *exclude_modules_regex;
    c.layers_to_transform = layers_to_transform;
    if (!layers_to_transform.empty()) c.layers_pattern = layers_pattern;  // PEFT ignores it alone
    c.rank = r;
    c.alpha = lora_alpha;
    c.dropout = lora_dropout;
    c.use_rslora = use_rslora;
    c.fan_in_fan_out = fan_in_fan_out;
    c.bias = bias == "all" ? BiasMode::all : bias == "lora_only" ? BiasMode::lora_only : BiasMode::none;
    c.rank_pattern = rank_pattern;
    c.alpha_pattern = alpha_pattern;
    if (modules_to_save) c.modules_to_save = *modules_to_save;
    return c;
  }

  // The PEFT config of an injection (the fields a PEFT file has; init, seed and keep_original_weight
  // are not among them).
  static PeftLoraConfig from_inject_config(const nn::LoraInjectConfig& c) {
    PeftLoraConfig p;
    if (c.target_modules.size() == 1 && c.target_modules.front() == "all-linear")
      p.target_modules_regex = "all-linear";  // PEFT's shorthand is the string form
    else if (!c.target_regex.empty())
      p.target_modules_regex = c.target_regex;
    else if (!c.target_modules.empty())
      p.target_modules = c.target_modules;
    if (!c.exclude_regex.empty()) p.exclude_modules_regex = c.exclude_regex;
    else if (!c.exclude_modules.empty()) p.exclude_modules = c.exclude_modules;
    p.layers_to_transform = c.layers_to_transform;
    p.layers_pattern = c.layers_pattern;
    p.r = c.rank;
    p.lora_alpha = c.alpha;
    p.lora_dropout = c.dropout;
    p.use_rslora = c.use_rslora;
    p.fan_in_fan_out = c.fan_in_fan_out;
    p.bias = to_string(c.bias);
    p.rank_pattern = c.rank_pattern;
    p.alpha_pattern = c.alpha_pattern;
    if (!c.modules_to_save.empty()) p.modules_to_save = c.modules_to_save;
    return p;
  }

  // PEFT's lookup: the first rank_pattern / alpha_pattern key matching the module (the rule of
  // nn::LoraInjectConfig::rank_for, without building one).
  int rank_for(const std::string& module) const { return detail::pattern_lookup(rank_pattern, module, r); }
  double alpha_for(const std::string& module) const {
    return detail::pattern_lookup(alpha_pattern, module, lora_alpha);
  }
  // The LoraConfig of one module: rank and alpha after the patterns, dropout, rsLoRA.
  LoraConfig lora_config_for(const std::string& module) const { return to_inject_config().layer_config(module, 0); }
  // Whether PEFT would put a LoRA layer on this module (check_target_module_exists: exclude_modules,
  // target_modules, layers_to_transform). Unknown (nullopt) without target_modules, and for
  // "all-linear", which depends on the module's type. Throws std::invalid_argument where PEFT's
  // readings of the layer index disagree.
  std::optional<bool> targets(const std::string& module) const {
    if (!target_modules && !target_modules_regex) return std::nullopt;
    if (target_modules_regex && is_all_linear(*target_modules_regex)) return std::nullopt;
    return to_inject_config().targets(module, "PeftLoraConfig::targets");
  }
  bool saves_module(const std::string& module) const { return to_inject_config().saves(module); }

  static bool is_all_linear(const std::string& s) {
    std::string lower;
    for (char ch : s) lower += static_cast<char>(ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch);
    return lower == "all-linear";
  }

  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json j;
    j["peft_type"] = peft_type;
    j["r"] = r;
    if (lora_alpha == std::floor(lora_alpha) && std::fabs(lora_alpha) < 1e15)
      j["lora_alpha"] = static_cast<long long>(lora_alpha);  // PEFT writes integers; keep them integers
    else
      j["lora_alpha"] = lora_alpha;
    j["lora_dropout"] = lora_dropout;
    j["use_rslora"] = use_rslora;
    j["bias"] = bias;
    j["fan_in_fan_out"] = fan_in_fan_out;
    j["use_dora"] = false;
    j["init_lora_weights"] = true;
    j["inference_mode"] = inference_mode;
    if (target_modules_regex) j["target_modules"] = *target_modules_regex;
    else if (target_modules) j["target_modules"] = *target_modules;
    else j["target_modules"] = nullptr;
    j["modules_to_save"] = modules_to_save ? nlohmann::ordered_json(*modules_to_save) : nlohmann::ordered_json();
    // The layer selection fields only when set, so that files without them stay as they were.
    if (exclude_modules_regex) j["exclude_modules"] = *exclude_modules_regex;
    else if (exclude_modules) j["exclude_modules"] = *exclude_modules;
    if (!layers_to_transform.empty()) j["layers_to_transform"] = layers_to_transform;
    if (!layers_pattern.empty()) j["layers_pattern"] = layers_pattern;
    j["rank_pattern"] = nlohmann::ordered_json::object();
    for (const auto& kv : rank_pattern) j["rank_pattern"][kv.first] = kv.second;
    j["alpha_pattern"] = nlohmann::ordered_json::object();
    for (const auto& kv : alpha_pattern) j["alpha_pattern"][kv.first] = kv.second;
    j["base_model_name_or_path"] = base_model_name_or_path ? nlohmann::ordered_json(*base_model_name_or_path)
                                                           : nlohmann::ordered_json();
    j["task_type"] = task_type ? nlohmann::ordered_json(*task_type) : nlohmann::ordered_json();
    return j;
  }

  std::string dump() const { return to_json().dump(2) + "\n"; }

  // Parses and validates; `file` names the source in messages. Throws io_error.
  static PeftLoraConfig parse(const std::string& text, const std::string& file = "<memory>") {
    constexpr const char* where = "read_adapter_config";
    nlohmann::ordered_json j;
    try {
      j = nlohmann::ordered_json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      detail::io_fail(where, file, "", "not valid JSON: ", e.what());
    }
    if (!j.is_object()) detail::io_fail(where, file, "", "the config is not a JSON object");
    auto bad = [&](const char* field, const char* expected) {
      detail::io_fail(where, file, "", "field '", field, "' must be ", expected, ", found ", j.at(field).dump());
    };
    PeftLoraConfig c;
    auto has = [&](const char* field) { return j.contains(field) && !j.at(field).is_null(); };
    if (has("peft_type")) {
      if (!j["peft_type"].is_string()) bad("peft_type", "a string");
      c.peft_type = j["peft_type"].get<std::string>();
    }
    if (c.peft_type != "LORA")
      detail::io_fail(where, file, "", "peft_type is '", c.peft_type, "'; only LORA adapters are supported");
    if (has("r")) {
      if (!j["r"].is_number_integer() || j["r"].get<long long>() < 1 || j["r"].get<long long>() > (1 << 24))
        bad("r", "an integer in [1, 2^24]");
      c.r = j["r"].get<int>();
    }
    auto positive_number = [&](const nlohmann::ordered_json& v) {
      return v.is_number() && std::isfinite(v.get<double>()) && v.get<double>() > 0;
    };
    if (has("lora_alpha")) {
      if (!positive_number(j["lora_alpha"])) bad("lora_alpha", "a finite number > 0");
      c.lora_alpha = j["lora_alpha"].get<double>();
    }
    if (has("lora_dropout")) {
      const auto& v = j["lora_dropout"];
      if (!v.is_number() || !(v.get<double>() >= 0 && v.get<double>() < 1)) bad("lora_dropout", "a number in [0, 1)");
      c.lora_dropout = v.get<double>();
    }
    auto flag = [&](const char* field, bool& out) {
      if (!has(field)) return;
      if (!j[field].is_boolean()) bad(field, "true or false");
      out = j[field].get<bool>();
    };
    flag("use_rslora", c.use_rslora);
    flag("fan_in_fan_out", c.fan_in_fan_out);
    flag("inference_mode", c.inference_mode);
    bool use_dora = false, lora_bias = false;
    flag("use_dora", use_dora);
    flag("lora_bias", lora_bias);
    if (use_dora) detail::io_fail(where, file, "", "use_dora is true; DoRA adapters are not supported");
    if (lora_bias) detail::io_fail(where, file, "", "lora_bias is true; LoRA-B biases are not supported");
    if (has("bias")) {
      if (!j["bias"].is_string()) bad("bias", "\"none\", \"all\" or \"lora_only\"");
      c.bias = j["bias"].get<std::string>();
      if (c.bias != "none" && c.bias != "all" && c.bias != "lora_only") bad("bias", "\"none\", \"all\" or \"lora_only\"");
    }
    auto string_list = [&](const char* field) {
      std::vector<std::string> out;
      if (!j[field].is_array()) bad(field, "a list of strings");
      for (const auto& v : j[field]) {
        if (!v.is_string()) bad(field, "a list of strings");
        out.push_back(v.get<std::string>());
      }
      return out;
    };
    auto check_pattern = [&](const char* field, const std::string& p, bool peft_key) {
      try {
        if (peft_key) detail::Pattern::peft_key(p);
        else detail::Pattern::full(p);
      } catch (const std::invalid_argument& e) {
        detail::io_fail(where, file, "", "field '", field, "': ", e.what());
      }
    };
    if (has("target_modules")) {
      if (j["target_modules"].is_string()) {
        c.target_modules_regex = j["target_modules"].get<std::string>();
        check_pattern("target_modules", *c.target_modules_regex, false);
      } else {
        c.target_modules = string_list("target_modules");
      }
    }
    if (has("modules_to_save")) c.modules_to_save = string_list("modules_to_save");
    if (has("exclude_modules")) {
      if (j["exclude_modules"].is_string()) {
        c.exclude_modules_regex = j["exclude_modules"].get<std::string>();
        check_pattern("exclude_modules", *c.exclude_modules_regex, false);
      } else {
        if (!j["exclude_modules"].is_array()) bad("exclude_modules", "a string or a list of strings");
        c.exclude_modules = string_list("exclude_modules");
      }
    }
    if (has("layers_to_transform")) {
      const auto& v = j["layers_to_transform"];
      auto layer = [&](const nlohmann::ordered_json& x) {
        if (!x.is_number_integer() || x.get<long long>() < 0 || x.get<long long>() > (1 << 30))
          bad("layers_to_transform", "a layer index (an integer >= 0) or a list of them");
        return x.get<int>();
      };
      if (v.is_array()) {
        for (const auto& x : v) c.layers_to_transform.push_back(layer(x));
      } else {
        c.layers_to_transform.push_back(layer(v));
      }
    }
    if (has("layers_pattern")) {
      const auto& v = j["layers_pattern"];
      if (v.is_string()) {
        if (!v.get<std::string>().empty()) c.layers_pattern.push_back(v.get<std::string>());
      } else {
        if (!v.is_array()) bad("layers_pattern", "a string or a list of strings");
        c.layers_pattern = string_list("layers_pattern");
      }
      for (const std::string& p : c.layers_pattern) check_pattern("layers_pattern", p, false);
    }
    // PEFT's LoraConfig refuses these combinations: layer indices apply to module names only.
    if (c.target_modules_regex && !c.layers_to_transform.empty())
      detail::io_fail(where, file, "", "layers_to_transform cannot be used with a string (regular expression) "
                      "target_modules, as in PEFT");
    if (c.target_modules_regex && !c.layers_pattern.empty())
      detail::io_fail(where, file, "", "layers_pattern cannot be used with a string (regular expression) "
                      "target_modules, as in PEFT");
    if (has("rank_pattern")) {
      if (!j["rank_pattern"].is_object()) bad("rank_pattern", "an object");
      for (const auto& kv : j["rank_pattern"].items()) {
        const auto& v = kv.value();
        if (!v.is_number_integer() || v.get<long long>() < 1 || v.get<long long>() > (1 << 24))
          detail::io_fail(where, file, "", "rank_pattern['", kv.key(), "'] must be an integer in [1, 2^24], found ",
                          v.dump());
        check_pattern("rank_pattern", kv.key(), true);
        c.rank_pattern.emplace_back(kv.key(), v.get<int>());
      }
    }
    if (has("alpha_pattern")) {
      if (!j["alpha_pattern"].is_object()) bad("alpha_pattern", "an object");
      for (const auto& kv : j["alpha_pattern"].items()) {
        if (!positive_number(kv.value()))
          detail::io_fail(where, file, "", "alpha_pattern['", kv.key(), "'] must be a finite number > 0, found ",
                          kv.value().dump());
        check_pattern("alpha_pattern", kv.key(), true);
        c.alpha_pattern.emplace_back(kv.key(), kv.value().get<double>());
      }
    }
    auto opt_string = [&](const char* field, std::optional<std::string>& out) {
      if (!has(field)) return;
      if (!j[field].is_string()) bad(field, "a string or null");
      out = j[field].get<std::string>();
    };
    opt_string("base_model_name_or_path", c.base_model_name_or_path);
    opt_string("task_type", c.task_type);
    return c;
  }

  static PeftLoraConfig load(const std::string& path) {
    return parse(detail::read_small_file(path, 16u << 20, "read_adapter_config"), path);
  }
};

}  // namespace lora
