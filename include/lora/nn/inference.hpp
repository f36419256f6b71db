// lora.hpp: InferenceContext, what one thread needs to run a model's const inference path (Module::infer):
// a workspace per module and the choice of adapters. A model is only read by infer(): N threads, each with
// its own context, serve one model at once with no lock, and a context reused with the same batch shape
// allocates nothing.
#pragma once

#include <lora/base.hpp>
#include <lora/common.hpp>
#include <lora/linear.hpp>
#include <lora/mixed_batch.hpp>
#include <lora/nn/module.hpp>

#include <deque>
#include <string>
#include <utility>
#include <vector>

namespace lora::nn {

// The buffers of one module's infer().
template <class Scalar>
struct ModuleWorkspace {
  Matrix<Scalar> output, staging;
  BaseWorkspace<Scalar> base;
  InferenceWorkspace<Scalar> lora;
  MixedBatchForward<Scalar> mixed;
};

template <class Scalar>
class InferenceContext {
 public:
  enum class Adapters {
    active,  // each LoRA layer applies its active adapters (merged layers: their merged weight)
    named,   // exactly the names given (a layer without one of them leaves it out), whatever is active
    per_row  // a mixed batch: row i with the plan's adapter for it (layers without it use the base there)
  };

  InferenceContext() = default;
  // Copies get their own buffers.
  InferenceContext(const InferenceContext& other) : mode_(other.mode_), names_(other.names_), plan_(other.plan_) {}
  InferenceContext& operator=(const InferenceContext& other) {
    mode_ = other.mode_;
    names_ = other.names_;
    plan_ = other.plan_;
    return *this;
  }

  void use_active_adapters() { mode_ = Adapters::active; }
  void use_adapters(std::vector<std::string> names) {
    names_ = std::move(names);
    mode_ = Adapters::named;
  }
  void use_plan(MixedBatchPlan plan) {
    plan_ = std::move(plan);
    mode_ = Adapters::per_row;
  }
  Adapters mode() const { return mode_; }
  const std::vector<std::string>& adapter_names() const { return names_; }
  const MixedBatchPlan& plan() const { return plan_; }

  // The workspace of the next module in this run (modules take them in the order they run).
  ModuleWorkspace<Scalar>& next_workspace() {
    if (cursor_ == slots_.size()) slots_.emplace_back();
    return slots_[cursor_++];
  }
  // Starts a run: infer() below calls it.
  void rewind() { cursor_ = 0; }

 private:
  Adapters mode_ = Adapters::active;
  std::vector<std::string> names_;
  MixedBatchPlan plan_;
  std::deque<ModuleWorkspace<Scalar>> slots_;  // a deque: a workspace never moves once made
  std::size_t cursor_ = 0;
};

// The eval-mode output of `model` for X, computed with `ctx`'s buffers and adapter choice; the model is
// not changed. The result is valid until ctx's next use.
template <class Scalar>
const Matrix<Scalar>& infer(const Module<Scalar>& model, const typename Module<Scalar>::Input& X,
                            InferenceContext<Scalar>& ctx) {
  ctx.rewind();
  return model.infer(X, ctx);
}

}  // namespace lora::nn

namespace lora::detail {
// X unless it overlaps `out` (which the caller is about to write) or, with packed_rows (for a reader of
// packed rows such as a FrozenBase), its rows are not packed; else a copy of it in `staging`.
template <class Scalar>
Eigen::Ref<const Matrix<Scalar>> unaliased(const Eigen::Ref<const Matrix<Scalar>>& X, const Matrix<Scalar>& out,
                                           Matrix<Scalar>& staging, bool packed_rows = false) {
  const Index span = X.rows() == 0 ? 0 : (X.rows() - 1) * X.outerStride() + X.cols();
  const bool packed = X.outerStride() == X.cols() || X.rows() == 1;
  if (!overlaps(X.data(), span, out.data(), out.size()) && (packed || !packed_rows)) return X;
  resize_workspace(staging, X.rows(), X.cols());
  staging = X;
  return staging;
}
}  // namespace lora::detail
