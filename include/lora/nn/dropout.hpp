// lora.hpp: Dropout (PyTorch's nn.Dropout): in training mode each entry is zeroed with probability p and
// the others scaled by 1 / (1 - p); in eval mode, or with p = 0, the input passes unchanged.
#pragma once

#include <lora/common.hpp>
#include <lora/detail/random.hpp>
#include <lora/nn/inference.hpp>
#include <lora/nn/module.hpp>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>

namespace lora::nn {

// The mask of a forward in training mode is kept for backward: dX = dY * mask, written over the mask (no
// buffer of its own), so with p > 0 backward runs once per forward(). Masks come from a seeded,
// platform-independent stream (reseed() restarts it), one uniform draw per entry, row by row.
template <class Scalar>
class Dropout final : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;

  // requires: 0 <= p < 1.
  explicit Dropout(double p = 0.5, std::uint64_t seed = 0) : p_(p), rng_(seed) {
    if (!(p >= 0 && p < 1)) detail::fail("Dropout::Dropout", "p must be in [0, 1), got ", p);
  }

  double p() const { return p_; }
  void reseed(std::uint64_t seed) { rng_.seed(seed); }

  const MatrixType& forward(const Input& X) override {
    detail::resize_workspace(output_buffer(), X.rows(), X.cols());
    active_ = this->training_ && p_ > 0;
    if (active_) {
      detail::resize_workspace(mask_, X.rows(), X.cols());
      const Scalar keep = static_cast<Scalar>(1.0 / (1.0 - p_));
      for (Index i = 0; i < X.rows(); ++i)
        for (Index j = 0; j < X.cols(); ++j) mask_(i, j) = rng_.uniform() < p_ ? Scalar(0) : keep;
      output_buffer().noalias() = X.cwiseProduct(mask_);
    } else {
      output_buffer() = X;
    }
    rows_ = this->training_ ? X.rows() : -1;
    cols_ = X.cols();
    return output_buffer();
  }
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override {
    ModuleWorkspace<Scalar>& ws = ctx.next_workspace();
    detail::resize_workspace(ws.output, X.rows(), X.cols());
    ws.output = X;  // element by element: safe even if X is that buffer
    return ws.output;
  }
  const MatrixType& backward(const Input& dY) override {
    constexpr const char* where = "Dropout::backward";
    if (rows_ < 0) this->fail_no_cached_forward(where);
    detail::require_shape(where, "grad_output", dY, rows_, cols_);
    if (active_) {
      mask_.array() *= dY.array();  // dY is never mask_: that buffer leaves only as dX, after this
      rows_ = -1;  // the mask is gone
      return mask_;
    }
    detail::resize_workspace(grad_input_buffer(), dY.rows(), dY.cols());
    grad_input_buffer() = dY;
    return grad_input_buffer();
  }
  void zero_grad() override {}
  void train(bool on = true) override {
    Module<Scalar>::train(on);
    if (!on) rows_ = -1;
  }
  void collect_parameters(ParameterList<Scalar>&, const std::string&) override {}
  Index num_parameters() const override { return 0; }
  Index num_trainable_parameters() const override { return 0; }
  std::string type_name() const override { return "Dropout"; }
  std::string describe() const override { return detail::concat("Dropout(p=", p_, ")"); }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<Dropout>(*this); }

 private:
  double p_;
  detail::Random rng_;
  bool active_ = false;
  Index rows_ = -1, cols_ = 0;  // rows_ = -1: nothing to differentiate
  MatrixType mask_;  // holds dX after backward()
  // The output and, with p = 0, the input gradient: shareable (see Module::share_transient_buffers).
  TransientBuffers<Scalar, 2> transient_;
  MatrixType& output_buffer() { return transient_[0]; }
  MatrixType& grad_input_buffer() { return transient_[1]; }
  bool share_own_buffers(Module<Scalar>* other) override {
    transient_.share(other ? &static_cast<Dropout*>(other)->transient_ : nullptr);
    return true;
  }
};

}  // namespace lora::nn
