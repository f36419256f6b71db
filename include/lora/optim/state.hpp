// lora.hpp: what the optimisers share: per-parameter state keyed by name, LoRA+ and weight-decay groups,
// and the checks of hyper-parameters.
#pragma once

#include <lora/common.hpp>
#include <lora/parameter.hpp>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <unordered_map>
#include <vector>

namespace lora::detail {

inline void require_lr(const char* where, double lr) {
  if (!std::isfinite(lr) || lr <= 0) fail(where, "lr must be finite and > 0, got ", lr);
}

inline void require_non_negative(const char* where, const char* what, double value) {
  if (!std::isfinite(value) || value < 0) fail(where, what, " must be finite and >= 0, got ", value);
}

inline void require_loraplus_ratio(const char* where, double ratio) {
  if (!std::isfinite(ratio) || ratio <= 0)
    fail(where, "loraplus_lr_ratio must be finite and > 0, got ", ratio);
}

// How a parameter's role changes its learning rate and weight decay.
// LoRA+ (Hayou et al. 2024): lora_B learns with lr * ratio, lora_A and the rest with lr. PEFT's
// create_loraplus_optimizer also puts every 1-D parameter (biases) in the lr * ratio group without decay;
// include_biases = true and decay_biases = false reproduce that grouping.
struct GroupRules {
  double loraplus_lr_ratio = 1;
  bool loraplus_include_biases = false;
  bool decay_biases = true;

  double lr_factor(ParameterRole role) const {
    const bool fast = role == ParameterRole::lora_B || (loraplus_include_biases && role == ParameterRole::bias);
    return fast ? loraplus_lr_ratio : 1.0;
  }
  bool decays(ParameterRole role) const { return decay_biases || role != ParameterRole::bias; }
};

// No state beyond the Scalar buffers.
struct NoExtraState {
  std::size_t bytes() const { return 0; }
};

// Optimiser state of each parameter, found by name, so that the parameter list may be rebuilt every step.
// Buffers are allocated by the optimiser on a parameter's first update and reused afterwards. `Extra` is
// state of another form (8-bit codes, say); its bytes() counts in bytes().
template <class Scalar, std::size_t MaxBuffers, class Extra = NoExtraState>
class StateStore {
 public:
  struct Entry {
    Index rows = 0;
    Index cols = 0;
    std::int64_t steps = 0;        // updates applied to this parameter
    std::uint64_t last_call = 0;   // the resolve() call that last saw it: finds a name given twice
    std::array<Matrix<Scalar>, MaxBuffers> buffers;
    Extra extra;
  };

  // Checks the whole list before the optimiser changes anything: value and grad have the same shape,
  // the gradient is finite, no name appears twice, and a known name still has the shape its state was
  // made for. Returns the entries in list order (new names get an empty entry). On a throw, nothing
  // has changed.
  const std::vector<Entry*>& resolve(const char* where, const ParameterList<Scalar>& params) {
    lora::detail::require_live_parameters(where, params, true);
    ++calls_;
    resolved_.clear();
    try {
      for (const Parameter<Scalar>& p : params) {
        if (p.grad.rows() != p.value.rows() || p.grad.cols() != p.value.cols())
          fail(where, "parameter '", p.name, "' has value ", lora::detail::shape_of(p.value), " but grad ",
               lora::detail::shape_of(p.grad));
        auto it = entries_.find(p.name);
        if (it == entries_.end()) {
          it = entries_.emplace(p.name, Entry{}).first;
          it->second.rows = p.value.rows();
          it->second.cols = p.value.cols();
        }
        Entry& e = it->second;
        if (e.rows != p.value.rows() || e.cols != p.value.cols())
          fail(where, "parameter '", p.name, "' has shape ", lora::detail::shape_of(p.value),
               " but its optimiser state was made for ", e.rows, " x ", e.cols,
               "; call reset_state() or erase_state(name) after changing the model");
        if (e.last_call == calls_) fail(where, "parameter '", p.name, "' appears twice in the list");
        e.last_call = calls_;
        if (!lora::detail::all_finite(p.grad)) fail(where, "the gradient of '", p.name, "' contains NaN or Inf");
        resolved_.push_back(&e);
      }
    } catch (...) {
      for (auto it = entries_.begin(); it != entries_.end();)
        it = it->second.steps == 0 ? entries_.erase(it) : std::next(it);
      resolved_.clear();
      throw;
    }
    return resolved_;
  }

  std::size_t bytes() const {
    std::size_t total = 0;
    for (const auto& [name, e] : entries_) {
      for (const Matrix<Scalar>& b : e.buffers) total += static_cast<std::size_t>(b.size()) * sizeof(Scalar);
      total += e.extra.bytes();
    }
    return total;
  }

  const Entry* find(const std::string& name) const {
    const auto it = entries_.find(name);
    return it == entries_.end() ? nullptr : &it->second;
  }

  std::size_t size() const { return entries_.size(); }
  void clear() { entries_.clear(); }
  bool erase(const std::string& name) { return entries_.erase(name) > 0; }

 private:
  std::unordered_map<std::string, Entry> entries_;
  std::vector<Entry*> resolved_;  // reused: no allocation once it has seen the list's length
  std::uint64_t calls_ = 0;
};

}  // namespace lora::detail
