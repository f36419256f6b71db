// lora.hpp: element-wise activations ReLU, GELU (exact, erf-based as PyTorch's default) and Tanh, and
// LogSoftmax over each row (PyTorch's nn.LogSoftmax(dim = -1)).
#pragma once

#include <lora/common.hpp>
#include <lora/nn/inference.hpp>
#include <lora/nn/module.hpp>

#include <cmath>
#include <memory>
#include <string>

namespace lora::detail {

// The shared bookkeeping: the output buffer, the gradient buffer, the shape a backward() must match.
// The input gradient and staging copy are transient buffers (see nn::Module::share_transient_buffers),
// and so is the output unless backward() reads it (backward_reads_output).
template <class Scalar>
class Elementwise : public nn::Module<Scalar> {
 public:
  using typename nn::Module<Scalar>::MatrixType;
  using typename nn::Module<Scalar>::Input;

 protected:
  explicit Elementwise(bool backward_reads_output) : output_kept_(backward_reads_output) {}

  MatrixType& output_buffer() { return output_kept_ ? kept_output_ : transient_[0]; }
  MatrixType& grad_input_buffer() { return transient_[1]; }
  MatrixType& staging_buffer() { return transient_[2]; }
  bool share_own_buffers(nn::Module<Scalar>* other) override {
    transient_.share(other ? &static_cast<Elementwise*>(other)->transient_ : nullptr);
    return true;
  }

  // Returns X, or a copy of it when it overlaps the output buffer about to be resized and written.
  Input begin_forward(const char* where, const Input& X) {
    if (X.rows() == 0 || X.cols() == 0) detail::fail(where, "input is empty (", detail::shape_of(X), ")");
    const Input x = lora::detail::unaliased<Scalar>(X, output_buffer(), staging_buffer());
    lora::detail::resize_workspace(output_buffer(), x.rows(), x.cols());
    cached_rows_ = this->training() ? x.rows() : -1;
    cached_cols_ = x.cols();
    return x;
  }
  // The same for infer(): the output goes to the context's next workspace.
  static std::pair<Input, MatrixType*> begin_infer(const char* where, const Input& X, nn::InferenceContext<Scalar>& ctx) {
    if (X.rows() == 0 || X.cols() == 0) detail::fail(where, "input is empty (", detail::shape_of(X), ")");
    nn::ModuleWorkspace<Scalar>& ws = ctx.next_workspace();
    Input x = lora::detail::unaliased<Scalar>(X, ws.output, ws.staging);
    lora::detail::resize_workspace(ws.output, x.rows(), x.cols());
    return {x, &ws.output};
  }
  // Checks dY against the last training forward; allocate = false for a module that writes dX over its
  // cache (and calls consume()).
  void begin_backward(const char* where, const Input& dY, bool allocate = true) {
    if (cached_rows_ < 0) this->fail_no_cached_forward(where);
    detail::require_shape(where, "grad_output", dY, cached_rows_, cached_cols_);
    if (allocate) grad_input_buffer().resize(dY.rows(), dY.cols());
  }
  // The cache now holds dX: dropped, so a second backward() for the same forward() throws.
  void consume() { cached_rows_ = -1; }

  bool output_kept_;
  MatrixType kept_output_;
  TransientBuffers<Scalar, 3> transient_;
  Index cached_rows_ = -1, cached_cols_ = 0;  // cached_rows_ = -1: nothing to differentiate
};

}  // namespace lora::detail

namespace lora::nn {

// max(x, 0); the derivative at 0 is taken as 0 (as PyTorch does).
template <class Scalar>
class ReLU final : public lora::detail::Elementwise<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;

  ReLU() : lora::detail::Elementwise<Scalar>(true) {}

  const MatrixType& forward(const Input& X) override {
    const Input x = this->begin_forward("ReLU::forward", X);
    this->output_buffer() = x.cwiseMax(Scalar(0));
    return this->output_buffer();
  }
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override {
    auto [x, out] = this->begin_infer("ReLU::infer", X, ctx);
    *out = x.cwiseMax(Scalar(0));
    return *out;
  }
  // dX = dY where the output is positive, 0 elsewhere (read from the kept output).
  const MatrixType& backward(const Input& dY) override {
    this->begin_backward("ReLU::backward", dY);
    this->grad_input_buffer() = (this->output_buffer().array() > Scalar(0)).select(dY, Scalar(0));
    return this->grad_input_buffer();
  }
  std::string type_name() const override { return "ReLU"; }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<ReLU>(*this); }
};

// tanh(x); dX = dY (1 - y^2) from the kept output.
template <class Scalar>
class Tanh final : public lora::detail::Elementwise<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;

  Tanh() : lora::detail::Elementwise<Scalar>(true) {}

  const MatrixType& forward(const Input& X) override {
    const Input x = this->begin_forward("Tanh::forward", X);
    this->output_buffer() = x.array().tanh();
    return this->output_buffer();
  }
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override {
    auto [x, out] = this->begin_infer("Tanh::infer", X, ctx);
    *out = x.array().tanh();
    return *out;
  }
  const MatrixType& backward(const Input& dY) override {
    this->begin_backward("Tanh::backward", dY);
    this->grad_input_buffer() = dY.array() * (Scalar(1) - this->output_buffer().array().square());
    return this->grad_input_buffer();
  }
  std::string type_name() const override { return "Tanh"; }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<Tanh>(*this); }
};

// GELU(x) = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, PyTorch's default (approximate = "none").
// dX = dY (Phi(x) + x phi(x)), phi the standard normal density. In training mode forward keeps that
// derivative rather than the input, so backward is one product and evaluates no erf or exp; backward
// writes dX over the kept derivative (no buffer of its own), so it runs once per forward().
template <class Scalar>
class GELU final : public lora::detail::Elementwise<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;

  GELU() : lora::detail::Elementwise<Scalar>(false) {}

  const MatrixType& forward(const Input& X) override {
    const Input x = this->begin_forward("GELU::forward", X);
    if (!this->training_) {
      this->output_buffer() = x.unaryExpr([](Scalar v) { return v * cdf(v); });
      return this->output_buffer();
    }
    lora::detail::resize_workspace(derivative_, x.rows(), x.cols());
    for (Index i = 0; i < x.rows(); ++i)
      for (Index j = 0; j < x.cols(); ++j) {
        const Scalar v = x(i, j), phi = cdf(v);
        this->output_buffer()(i, j) = v * phi;
        derivative_(i, j) = phi + v * pdf(v);
      }
    return this->output_buffer();
  }
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override {
    auto [x, out] = this->begin_infer("GELU::infer", X, ctx);
    *out = x.unaryExpr([](Scalar v) { return v * cdf(v); });
    return *out;
  }
  const MatrixType& backward(const Input& dY) override {
    this->begin_backward("GELU::backward", dY, false);
    derivative_.array() *= dY.array();  // dY is never derivative_: that buffer leaves only as dX, after this
    this->consume();
    return derivative_;
  }
  std::string type_name() const override { return "GELU"; }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<GELU>(*this); }

 private:
  static Scalar cdf(Scalar x) {
    return static_cast<Scalar>(0.5) * (Scalar(1) + std::erf(x * static_cast<Scalar>(0.70710678118654752440)));
  }
  static Scalar pdf(Scalar x) { return static_cast<Scalar>(0.39894228040143267794) * std::exp(-x * x / Scalar(2)); }

  MatrixType derivative_;  // Phi(x) + x phi(x) of the last training-mode forward; dX after backward()
};

// log softmax of each row: y = x - max(x) - log(sum exp(x - max(x))), PyTorch's nn.LogSoftmax(dim = -1).
// dX = dY - softmax(x) * rowsum(dY), softmax read from the kept output (exp(y)).
template <class Scalar>
class LogSoftmax final : public lora::detail::Elementwise<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;

  LogSoftmax() : lora::detail::Elementwise<Scalar>(true) {}

  const MatrixType& forward(const Input& X) override {
    const Input x = this->begin_forward("LogSoftmax::forward", X);
    apply(x, this->output_buffer());
    return this->output_buffer();
  }
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override {
    auto [x, out] = this->begin_infer("LogSoftmax::infer", X, ctx);
    apply(x, *out);
    return *out;
  }
  const MatrixType& backward(const Input& dY) override {
    this->begin_backward("LogSoftmax::backward", dY);
    for (Index i = 0; i < dY.rows(); ++i)
      this->grad_input_buffer().row(i) = dY.row(i).array() - this->output_buffer().row(i).array().exp() * dY.row(i).sum();
    return this->grad_input_buffer();
  }
  std::string type_name() const override { return "LogSoftmax"; }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<LogSoftmax>(*this); }

 private:
  static void apply(const Input& x, MatrixType& out) {
    for (Index i = 0; i < x.rows(); ++i) {
      const Scalar m = x.row(i).maxCoeff();
      const Scalar lse = m + std::log((x.row(i).array() - m).exp().sum());
      out.row(i) = x.row(i).array() - lse;
    }
  }
};

}  // namespace lora::nn
