// lora.hpp: LoraConfig, the hyper-parameters of one adapter (PEFT's LoraConfig at the level of one layer).
#pragma once

#include <lora/common.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

namespace lora {

// How A is initialised. B always starts at zero, so a fresh adapter is a no-op,
// except with InitMethod::random, which draws B too (PEFT's init_lora_weights=False, for tests).
enum class InitMethod {
  gaussian,        // A ~ N(0, init_std^2); init_std defaults to 1/r (PEFT's "gaussian")
  kaiming_uniform, // A ~ U(-1/sqrt(in), 1/sqrt(in)): kaiming_uniform_(a = sqrt(5)), PEFT's default
  random,          // A and B both Kaiming-uniform: the adapter starts as a non-zero change
};

// Which biases train (PEFT's `bias`). For one layer, `all` and `lora_only` both make its bias trainable
// (if it has one); the difference only matters in a model, where `all` also trains the other layers' biases.
enum class BiasMode { none, all, lora_only };

inline const char* to_string(InitMethod m) {
  switch (m) {
    case InitMethod::gaussian: return "gaussian";
    case InitMethod::kaiming_uniform: return "kaiming_uniform";
    case InitMethod::random: return "random";
  }
  return "?";
}

inline const char* to_string(BiasMode m) {
  switch (m) {
    case BiasMode::none: return "none";
    case BiasMode::all: return "all";
    case BiasMode::lora_only: return "lora_only";
  }
  return "?";
}

struct LoraConfig {
  // Per adapter.
  int rank = 8;              // r >= 1 and r <= min(in_features, out_features)
  double alpha = 8.0;        // lora_alpha > 0; scaling = alpha / r (or alpha / sqrt(r) with use_rslora)
  double dropout = 0.0;      // lora_dropout in [0, 1), applied to the input of the adapter path only
  bool use_rslora = false;   // rank-stabilised scaling alpha / sqrt(r)
  InitMethod init = InitMethod::gaussian;
  std::optional<double> init_std;  // std of the Gaussian init; unset means 1 / r
  std::uint64_t seed = 0;          // the same seed gives bit-identical init and dropout masks

  // Per layer: read from the config given to the LoraLinear constructor, ignored by add_adapter().
  BiasMode bias = BiasMode::none;
  bool keep_original_weight = false;  // keep a copy of W0 so that unmerge() restores it bit-exactly

  double scaling() const {
    return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
  }

  // Throws std::invalid_argument naming `where` for any value out of range. The rank bound that
  // depends on the layer's shape is checked by the layer.
  void validate(const char* where) const {
    if (rank < 1) detail::fail(where, "rank must be >= 1, got ", rank);
    if (!std::isfinite(alpha) || alpha <= 0) detail::fail(where, "alpha must be finite and > 0, got ", alpha);
    if (!std::isfinite(dropout) || dropout < 0 || dropout >= 1)
      detail::fail(where, "dropout must be in [0, 1), got ", dropout);
    if (init_std && (!std::isfinite(*init_std) || *init_std <= 0))
      detail::fail(where, "init_std must be finite and > 0, got ", *init_std);
  }
};

}  // namespace lora
