// lora.hpp: adapter_config.json, the LoRA fields of a PEFT config.
#pragma once

#include <lora/config.hpp>
#include <lora/detail/pattern.hpp>
#include <lora/io/error.hpp>
#include <lora/io/file.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace lora {

// The fields of PEFT's LoraConfig this library reads and writes (PEFT's defaults). Unknown fields are
// ignored on load. Loading rejects what it cannot honour: peft_type other than LORA, use_dora,
// lora_bias, and regular expressions outside the supported subset (see detail/pattern.hpp).
struct PeftLoraConfig {
  std::string peft_type = "LORA";
  int r = 8;
  double lora_alpha = 8;
  double lora_dropout = 0;
  bool use_rslora = false;
  std::string bias = "none";  // none | all | lora_only
  bool fan_in_fan_out = false;
  bool inference_mode = true;
  // PEFT accepts a list of module-name suffixes or one regular expression (re.fullmatch).
  std::optional<std::vector<std::string>> target_modules;
  std::optional<std::string> target_modules_regex;
  std::optional<std::vector<std::string>> modules_to_save;
  // Per-module overrides, in file order (the first matching key wins, as in PEFT).
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::optional<std::string> base_model_name_or_path, task_type;
  bool restricts_layers = false;  // layers_to_transform or exclude_modules present: targeting is not checked

  // PEFT's lookup: the first rank_pattern / alpha_pattern key matching the module (see Pattern::peft_key).
  int rank_for(const std::string& module) const {
    for (const auto& kv : rank_pattern)
      if (detail::Pattern::peft_key(kv.first).matches(module)) return kv.second;
    return r;
  }
  double alpha_for(const std::string& module) const {
    for (const auto& kv : alpha_pattern)
      if (detail::Pattern::peft_key(kv.first).matches(module)) return kv.second;
    return lora_alpha;
  }
  // The LoraConfig of one module: rank and alpha after the patterns, dropout, rsLoRA.
  LoraConfig lora_config_for(const std::string& module) const {
    LoraConfig c;
    c.rank = rank_for(module);
    c.alpha = alpha_for(module);
    c.dropout = lora_dropout;
    c.use_rslora = use_rslora;
    c.bias = bias == "all" ? BiasMode::all : bias == "lora_only" ? BiasMode::lora_only : BiasMode::none;
    return c;
  }
  // Whether PEFT would put a LoRA layer on this module: name == t or name ends with "." + t for a list,
  // re.fullmatch for a string. Unknown (nullopt) without target_modules.
  std::optional<bool> targets(const std::string& module) const {
    if (target_modules_regex) return detail::Pattern::full(*target_modules_regex).matches(module);
    if (!target_modules) return std::nullopt;
    for (const std::string& t : *target_modules)
      if (module == t || (module.size() > t.size() && module.compare(module.size() - t.size(), t.size(), t) == 0 &&
                          module[module.size() - t.size() - 1] == '.'))
        return true;
    return false;
  }
  bool saves_module(const std::string& module) const {
    if (!modules_to_save) return false;
    for (const std::string& t : *modules_to_save)
      if (module == t || (module.size() > t.size() && module.compare(module.size() - t.size(), t.size(), t) == 0 &&
                          module[module.size() - t.size() - 1] == '.'))
        return true;
    return false;
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
    c.restricts_layers = has("layers_to_transform") || has("exclude_modules");
    return c;
  }

  static PeftLoraConfig load(const std::string& path) {
    return parse(detail::read_small_file(path, 16u << 20, "read_adapter_config"), path);
  }
};

}  // namespace lora
