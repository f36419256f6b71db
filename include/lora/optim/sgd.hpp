// lora.hpp: SGD with momentum, dampening, Nesterov and coupled L2 weight decay (torch.optim.SGD).
//
// Per parameter p with gradient g, effective learning rate lr_p and weight decay wd_p:
//   d = g + wd_p p
//   momentum > 0:  buf = d on the first step, then buf = momentum buf + (1 - dampening) d
//                  d = d + momentum buf (nesterov) or d = buf
//   p -= lr_p d
#pragma once

#include <lora/common.hpp>
#include <lora/optim/state.hpp>
#include <lora/parameter.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>

namespace lora::optim {

struct SGDOptions {
  double lr = 1e-2;           // > 0
  double momentum = 0;        // >= 0; 0 keeps no state
  double dampening = 0;       // in [0, 1]
  bool nesterov = false;      // needs momentum > 0 and dampening = 0
  double weight_decay = 0;    // >= 0, coupled L2: added to the gradient as weight_decay * p
  double loraplus_lr_ratio = 1;          // LoRA+: lora_B parameters learn with lr * ratio (> 0)
  bool loraplus_include_biases = false;  // biases join lora_B's lr * ratio (PEFT's grouping)
  bool decay_biases = true;              // false: no weight decay on biases

  void validate(const char* where) const {
    detail::require_lr(where, lr);
    detail::require_non_negative(where, "momentum", momentum);
    if (!std::isfinite(dampening) || dampening < 0 || dampening > 1)
      lora::detail::fail(where, "dampening must be in [0, 1], got ", dampening);
    if (nesterov && (momentum <= 0 || dampening != 0))
      lora::detail::fail(where, "nesterov needs momentum > 0 and dampening = 0, got momentum = ", momentum,
                         ", dampening = ", dampening);
    detail::require_non_negative(where, "weight_decay", weight_decay);
    detail::require_loraplus_ratio(where, loraplus_lr_ratio);
  }
};

template <class Scalar>
class SGD {
  static_assert(is_supported_scalar_v<Scalar>, "SGD<Scalar> supports float and double only.");

 public:
  using Options = SGDOptions;

  explicit SGD(const SGDOptions& options = SGDOptions()) : options_(options) { options_.validate("SGD::SGD"); }

  // step(params)
  //   requires: every parameter's grad has its value's shape and is finite; names are unique; a name seen
  //             before has the same shape as then (state is kept by name).
  //   ensures:  one update of every value in `params`; gradients are read, never changed. On a throw no
  //             value and no state has changed.
  void step(ParameterList<Scalar>& params) {
    const auto& entries = state_.resolve("SGD::step", params);
    const detail::GroupRules rules = group_rules();
    for (std::size_t i = 0; i < params.size(); ++i) update(params[i], *entries[i], rules);
    lora::detail::touch_parameters(params);
  }

  // Accepts 0 (schedules reach it at the start of warmup and the end of decay); the constructor does not.
  void set_lr(double lr) {
    if (!std::isfinite(lr) || lr < 0) lora::detail::fail("SGD::set_lr", "lr must be finite and >= 0, got ", lr);
    options_.lr = lr;
  }
  double lr() const { return options_.lr; }
  const SGDOptions& options() const { return options_; }

  // Bytes of the momentum buffers (0 without momentum).
  std::size_t state_bytes() const { return state_.bytes(); }
  // Updates applied to the named parameter so far (0 for an unknown name).
  std::int64_t step_count(const std::string& name) const {
    const auto* e = state_.find(name);
    return e ? e->steps : 0;
  }
  // The momentum buffer of a parameter, or nullptr before its first step or without momentum.
  const Matrix<Scalar>* momentum_buffer(const std::string& name) const {
    const auto* e = state_.find(name);
    return e && e->buffers[0].size() > 0 ? &e->buffers[0] : nullptr;
  }
  std::size_t num_states() const { return state_.size(); }
  void reset_state() { state_.clear(); }
  bool erase_state(const std::string& name) { return state_.erase(name); }

 private:
  using Entry = typename detail::StateStore<Scalar, 1>::Entry;

  detail::GroupRules group_rules() const {
    return {options_.loraplus_lr_ratio, options_.loraplus_include_biases, options_.decay_biases};
  }

  void update(Parameter<Scalar>& p, Entry& e, const detail::GroupRules& rules) const {
    const auto lr = static_cast<Scalar>(options_.lr * rules.lr_factor(p.role));
    const double wd_double = rules.decays(p.role) ? options_.weight_decay : 0.0;
    const auto wd = static_cast<Scalar>(wd_double);
    auto P = p.value.array();
    const auto G = p.grad.array();
    ++e.steps;
    if (options_.momentum == 0) {
      if (wd_double != 0)
        P -= lr * (G + wd * P);
      else
        P -= lr * G;
      return;
    }
    const auto mu = static_cast<Scalar>(options_.momentum);
    const auto keep = static_cast<Scalar>(1 - options_.dampening);
    Matrix<Scalar>& buffer = e.buffers[0];
    if (buffer.size() == 0) {  // first sight: buf = d
      buffer.resize(p.value.rows(), p.value.cols());
      if (wd_double != 0)
        buffer.array() = G + wd * P;
      else
        buffer.array() = G;
    } else if (wd_double != 0) {
      buffer.array() = mu * buffer.array() + keep * (G + wd * P);
    } else {
      buffer.array() = mu * buffer.array() + keep * G;
    }
    const auto B = buffer.array();
    if (!options_.nesterov)
      P -= lr * B;
    else if (wd_double != 0)
      P -= lr * ((G + wd * P) + mu * B);
    else
      P -= lr * (G + mu * B);
  }

  SGDOptions options_;
  detail::StateStore<Scalar, 1> state_;
};

using SGDf = SGD<float>;
using SGDd = SGD<double>;

}  // namespace lora::optim
