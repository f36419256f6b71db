// lora.hpp: AdamW (Loshchilov and Hutter), decoupled weight decay exactly as torch.optim.AdamW.
//
// Per parameter p with gradient g, effective learning rate lr_p and weight decay wd_p, at its step t >= 1:
//   p *= 1 - lr_p wd_p
//   m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2      (m, v start at zero)
//   v_max = max(v_max, v) and v_max replaces v below                  (amsgrad only)
//   p -= (lr_p / (1 - beta1^t)) m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
#pragma once

#include <lora/common.hpp>
#include <lora/detail/kernels.hpp>
#include <lora/optim/state.hpp>
#include <lora/parameter.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

namespace lora::optim {

struct AdamWOptions {
  double lr = 1e-3;            // > 0
  double beta1 = 0.9;          // in [0, 1)
  double beta2 = 0.999;        // in [0, 1)
  double eps = 1e-8;           // > 0
  double weight_decay = 1e-2;  // >= 0, decoupled: p *= 1 - lr * weight_decay before the Adam update
  bool amsgrad = false;        // keep the running maximum of v (one more buffer)
  double loraplus_lr_ratio = 1;          // LoRA+: lora_B parameters learn with lr * ratio (> 0)
  bool loraplus_include_biases = false;  // biases join lora_B's lr * ratio (PEFT's grouping)
  bool decay_biases = true;              // false: no weight decay on biases

  void validate(const char* where) const {
    detail::require_lr(where, lr);
    if (!std::isfinite(beta1) || beta1 < 0 || beta1 >= 1)
      lora::detail::fail(where, "beta1 must be in [0, 1), got ", beta1);
    if (!std::isfinite(beta2) || beta2 < 0 || beta2 >= 1)
      lora::detail::fail(where, "beta2 must be in [0, 1), got ", beta2);
    if (!std::isfinite(eps) || eps <= 0) lora::detail::fail(where, "eps must be finite and > 0, got ", eps);
    detail::require_non_negative(where, "weight_decay", weight_decay);
    detail::require_loraplus_ratio(where, loraplus_lr_ratio);
  }
};

template <class Scalar>
class AdamW {
  static_assert(is_supported_scalar_v<Scalar>, "AdamW<Scalar> supports float and double only.");

 public:
  using Options = AdamWOptions;

  explicit AdamW(const AdamWOptions& options = AdamWOptions()) : options_(options) {
    options_.validate("AdamW::AdamW");
  }

  // step(params)
  //   requires: every parameter's grad has its value's shape and is finite; names are unique; a name seen
  //             before has the same shape as then (state is kept by name).
  //   ensures:  one update of every value in `params`; each parameter counts its own steps t (a
  //             parameter first seen later starts at t = 1). Gradients are read, never changed. On a throw
  //             no value and no state has changed.
  void step(ParameterList<Scalar>& params) {
    const auto& entries = state_.resolve("AdamW::step", params);
    const detail::GroupRules rules = group_rules();
    for (std::size_t i = 0; i < params.size(); ++i) update(params[i], *entries[i], rules);
    lora::detail::touch_parameters(params);
  }

  // Accepts 0 (schedules reach it at the start of warmup and the end of decay); the constructor does not.
  void set_lr(double lr) {
    if (!std::isfinite(lr) || lr < 0) lora::detail::fail("AdamW::set_lr", "lr must be finite and >= 0, got ", lr);
    options_.lr = lr;
  }
  double lr() const { return options_.lr; }
  const AdamWOptions& options() const { return options_; }

  // Bytes of the moment buffers: 2 (3 with amsgrad) x sizeof(Scalar) per trained value.
  std::size_t state_bytes() const { return state_.bytes(); }
  // Updates applied to the named parameter so far (0 for an unknown name).
  std::int64_t step_count(const std::string& name) const {
    const auto* e = state_.find(name);
    return e ? e->steps : 0;
  }
  // First and second moments (m, v) of a parameter, or nullptr before its first step.
  const Matrix<Scalar>* exp_avg(const std::string& name) const { return buffer(name, 0); }
  const Matrix<Scalar>* exp_avg_sq(const std::string& name) const { return buffer(name, 1); }
  std::size_t num_states() const { return state_.size(); }
  void reset_state() { state_.clear(); }
  bool erase_state(const std::string& name) { return state_.erase(name); }

 private:
  using Entry = typename detail::StateStore<Scalar, 3>::Entry;

  detail::GroupRules group_rules() const {
    return {options_.loraplus_lr_ratio, options_.loraplus_include_biases, options_.decay_biases};
  }

  const Matrix<Scalar>* buffer(const std::string& name, std::size_t i) const {
    const auto* e = state_.find(name);
    return e && e->buffers[i].size() > 0 ? &e->buffers[i] : nullptr;
  }

  void update(Parameter<Scalar>& p, Entry& e, const detail::GroupRules& rules) const {
    Matrix<Scalar>& m = e.buffers[0];
    Matrix<Scalar>& v = e.buffers[1];
    Matrix<Scalar>& v_max = e.buffers[2];
    if (e.steps == 0) {  // first sight: zero moments
      m.setZero(p.value.rows(), p.value.cols());
      v.setZero(p.value.rows(), p.value.cols());
      if (options_.amsgrad) v_max.setZero(p.value.rows(), p.value.cols());
    }
    const std::int64_t t = ++e.steps;
    const double lr = options_.lr * rules.lr_factor(p.role);
    const double wd = rules.decays(p.role) ? options_.weight_decay : 0.0;
    const double beta1 = options_.beta1, beta2 = options_.beta2;
    const double step_size = lr / (1 - std::pow(beta1, static_cast<double>(t)));
    const double bias_correction2_sqrt = std::sqrt(1 - std::pow(beta2, static_cast<double>(t)));

    // One pass over the parameter in blocks of rows small enough to stay in L1 (m, v and p of a block are
    // updated while it is there), the blocks split over the threads for a large parameter. Every value
    // goes through the same operations in the same order whatever the split.
    const auto decay = static_cast<Scalar>(1 - lr * wd);
    const auto b1 = static_cast<Scalar>(beta1), b2 = static_cast<Scalar>(beta2);
    const auto c1 = static_cast<Scalar>(1 - beta1), c2 = static_cast<Scalar>(1 - beta2);
    const auto neg_step = static_cast<Scalar>(-step_size), bc2 = static_cast<Scalar>(bias_correction2_sqrt);
    const auto eps = static_cast<Scalar>(options_.eps);
    const bool amsgrad = options_.amsgrad;
    const Index rows = p.value.rows(), cols = p.value.cols();
    const Index block = std::max<Index>(1, 1024 / std::max<Index>(1, cols));
    // A value costs about what 25 multiply-adds of a product do (it moves 28 bytes: seven streams of
    // float, with a square root and a division), so a parameter of a few hundred thousand values splits.
    const int threads = lora::detail::threads_for(25.0 * static_cast<double>(p.value.size()));
    lora::detail::parallel_for(rows, block, threads, [&](Index begin, Index end) {
      for (Index r = begin; r < end; r += block) {
        const Index n = std::min(block, end - r);
        auto P = p.value.middleRows(r, n).array();
        const auto G = p.grad.middleRows(r, n).array();
        auto M = m.middleRows(r, n).array();
        auto V = v.middleRows(r, n).array();
        M = b1 * M + c1 * G;
        V = b2 * V + c2 * (G * G);
        if (amsgrad) {
          auto W = v_max.middleRows(r, n).array();
          W = W.max(V);
          // The decay (a factor of exactly 1 without it) and the Adam update in one expression, rounded
          // as PyTorch's two passes are.
          P = P * decay + neg_step * (M / (W.sqrt() / bc2 + eps));
        } else {
          P = P * decay + neg_step * (M / (V.sqrt() / bc2 + eps));
        }
      }
    });
  }

  AdamWOptions options_;
  detail::StateStore<Scalar, 3> state_;
};

using AdamWf = AdamW<float>;
using AdamWd = AdamW<double>;

}  // namespace lora::optim
