// lora.hpp: learning-rate schedules, the formulas of Hugging Face transformers' get_*_schedule*, and
// LrScheduler, which applies one to an optimiser the way torch.optim.lr_scheduler.LambdaLR does.
#pragma once

#include <lora/common.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace lora::optim {

// The learning-rate multiplier at each optimiser step (step 0 is the first update):
//   constant               1
//   constant_with_warmup   step / warmup during warmup, then 1
//   linear                 step / warmup during warmup, then (total - step) / (total - warmup), at least 0
//   cosine                 step / warmup during warmup, then 0.5 (1 + cos(2 pi num_cycles progress)), at
//                          least 0, with progress = (step - warmup) / (total - warmup)
// Every division is by max(1, divisor), as in transformers. With num_cycles = 0.5 (the default) the
// cosine falls from 1 to 0 at step = total; past total, linear stays at 0 while cosine, like
// transformers', follows the cosine back up.
class LrSchedule {
 public:
  enum class Kind { constant, constant_with_warmup, linear, cosine };

  LrSchedule() = default;  // constant

  static LrSchedule constant() { return LrSchedule(); }

  static LrSchedule constant_with_warmup(std::int64_t warmup_steps) {
    require_warmup("LrSchedule::constant_with_warmup", warmup_steps);
    return LrSchedule(Kind::constant_with_warmup, warmup_steps, 0, 0.5);
  }

  static LrSchedule linear(std::int64_t warmup_steps, std::int64_t total_steps) {
    require_steps("LrSchedule::linear", warmup_steps, total_steps);
    return LrSchedule(Kind::linear, warmup_steps, total_steps, 0.5);
  }

  static LrSchedule cosine(std::int64_t warmup_steps, std::int64_t total_steps, double num_cycles = 0.5) {
    constexpr const char* where = "LrSchedule::cosine";
    require_steps(where, warmup_steps, total_steps);
    if (!std::isfinite(num_cycles) || num_cycles <= 0)
      lora::detail::fail(where, "num_cycles must be finite and > 0, got ", num_cycles);
    return LrSchedule(Kind::cosine, warmup_steps, total_steps, num_cycles);
  }

  // By transformers' SchedulerType name: "constant", "constant_with_warmup", "linear" or "cosine".
  // Arguments a schedule does not use are ignored (total_steps by the constant ones, warmup by constant).
  static LrSchedule from_name(const std::string& name, std::int64_t warmup_steps, std::int64_t total_steps) {
    if (name == "constant") return constant();
    if (name == "constant_with_warmup") return constant_with_warmup(warmup_steps);
    if (name == "linear") return linear(warmup_steps, total_steps);
    if (name == "cosine") return cosine(warmup_steps, total_steps);
    lora::detail::fail("LrSchedule::from_name", "unknown schedule '", name,
                       "', expected constant, constant_with_warmup, linear or cosine");
  }

  double multiplier(std::int64_t step) const {
    if (step < 0) lora::detail::fail("LrSchedule::multiplier", "step must be >= 0, got ", step);
    if (kind_ == Kind::constant) return 1.0;
    if (step < warmup_) return static_cast<double>(step) / static_cast<double>(std::max<std::int64_t>(1, warmup_));
    const auto decay_steps = static_cast<double>(std::max<std::int64_t>(1, total_ - warmup_));
    switch (kind_) {
      case Kind::constant:
      case Kind::constant_with_warmup: return 1.0;
      case Kind::linear: return std::max(0.0, static_cast<double>(total_ - step) / decay_steps);
      case Kind::cosine: {
        const double progress = static_cast<double>(step - warmup_) / decay_steps;
        const double pi = 3.14159265358979323846;
        return std::max(0.0, 0.5 * (1.0 + std::cos(pi * num_cycles_ * 2.0 * progress)));
      }
    }
    return 1.0;
  }

  // base_lr * multiplier(step).
  double lr(double base_lr, std::int64_t step) const { return base_lr * multiplier(step); }

  Kind kind() const { return kind_; }
  std::int64_t warmup_steps() const { return warmup_; }
  std::int64_t total_steps() const { return total_; }
  double num_cycles() const { return num_cycles_; }

 private:
  LrSchedule(Kind kind, std::int64_t warmup, std::int64_t total, double num_cycles)
      : kind_(kind), warmup_(warmup), total_(total), num_cycles_(num_cycles) {}

  static void require_warmup(const char* where, std::int64_t warmup_steps) {
    if (warmup_steps < 0) lora::detail::fail(where, "warmup_steps must be >= 0, got ", warmup_steps);
  }
  static void require_steps(const char* where, std::int64_t warmup_steps, std::int64_t total_steps) {
    require_warmup(where, warmup_steps);
    if (total_steps <= 0) lora::detail::fail(where, "total_steps must be > 0, got ", total_steps);
    if (warmup_steps > total_steps)
      lora::detail::fail(where, "warmup_steps (", warmup_steps, ") must be <= total_steps (", total_steps, ")");
  }

  Kind kind_ = Kind::constant;
  std::int64_t warmup_ = 0;
  std::int64_t total_ = 0;
  double num_cycles_ = 0.5;
};

inline const char* to_string(LrSchedule::Kind k) {
  switch (k) {
    case LrSchedule::Kind::constant: return "constant";
    case LrSchedule::Kind::constant_with_warmup: return "constant_with_warmup";
    case LrSchedule::Kind::linear: return "linear";
    case LrSchedule::Kind::cosine: return "cosine";
  }
  return "?";
}

// Drives an optimiser's learning rate through a schedule. The optimiser's lr at construction is the base;
// the constructor sets lr = base * multiplier(0), and each step() (call it after optimizer.step()) moves to
// the next step: the pattern of torch's LambdaLR. LoRA+ keeps working: lora_B uses ratio times this lr.
// Holds a reference: the optimiser must outlive the scheduler.
template <class Optimizer>
class LrScheduler {
 public:
  LrScheduler(Optimizer& optimizer, const LrSchedule& schedule)
      : optimizer_(&optimizer), schedule_(schedule), base_lr_(optimizer.lr()) {
    optimizer_->set_lr(schedule_.lr(base_lr_, 0));
  }

  void step() {
    ++step_;
    optimizer_->set_lr(schedule_.lr(base_lr_, step_));
  }

  std::int64_t current_step() const { return step_; }  // the step whose lr is set now
  double base_lr() const { return base_lr_; }
  double current_lr() const { return optimizer_->lr(); }
  const LrSchedule& schedule() const { return schedule_; }

 private:
  Optimizer* optimizer_;
  LrSchedule schedule_;
  double base_lr_;
  std::int64_t step_ = 0;
};

}  // namespace lora::optim
