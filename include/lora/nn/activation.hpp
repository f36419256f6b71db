// lora.hpp: element-wise activations ReLU, GELU (exact, erf-based as PyTorch's default) and Tanh.
#pragma once

#include <lora/common.hpp>
#include <lora/nn/module.hpp>

#include <cmath>
#include <memory>
#include <string>

namespace lora::nn {
namespace detail_activation {

// The shared bookkeeping: the output buffer, the gradient buffer, the shape a backward() must match.
template <class Scalar>
class Elementwise : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;

 protected:
  void begin_forward(const char* where, const Input& X) {
    if (X.rows() == 0 || X.cols() == 0) detail::fail(where, "input is empty (", detail::shape_of(X), ")");
    output_.resize(X.rows(), X.cols());
    cached_rows_ = this->training_ ? X.rows() : -1;
    cached_cols_ = X.cols();
  }
  void begin_backward(const char* where, const Input& dY) {
    if (cached_rows_ < 0) detail::fail(where, "no cached forward: call forward() in training mode (train()) first");
    detail::require_shape(where, "grad_output", dY, cached_rows_, cached_cols_);
    grad_input_.resize(dY.rows(), dY.cols());
  }

  MatrixType output_, grad_input_;
  Index cached_rows_ = -1, cached_cols_ = 0;
};

}  // namespace detail_activation

// max(x, 0); the derivative at 0 is taken as 0 (as PyTorch does).
template <class Scalar>
class ReLU final : public detail_activation::Elementwise<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;

  const MatrixType& forward(const Input& X) override {
    this->begin_forward("ReLU::forward", X);
    this->output_ = X.cwiseMax(Scalar(0));
    return this->output_;
  }
  // dX = dY where the output is positive, 0 elsewhere (read from the kept output).
  const MatrixType& backward(const Input& dY) override {
    this->begin_backward("ReLU::backward", dY);
    this->grad_input_ = (this->output_.array() > Scalar(0)).select(dY, Scalar(0));
    return this->grad_input_;
  }
  std::string type_name() const override { return "ReLU"; }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<ReLU>(*this); }
};

// tanh(x); dX = dY (1 - y^2) from the kept output.
template <class Scalar>
class Tanh final : public detail_activation::Elementwise<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;

  const MatrixType& forward(const Input& X) override {
    this->begin_forward("Tanh::forward", X);
    this->output_ = X.array().tanh();
    return this->output_;
  }
  const MatrixType& backward(const Input& dY) override {
    this->begin_backward("Tanh::backward", dY);
    this->grad_input_ = dY.array() * (Scalar(1) - this->output_.array().square());
    return this->grad_input_;
  }
  std::string type_name() const override { return "Tanh"; }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<Tanh>(*this); }
};

// GELU(x) = x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, PyTorch's default (approximate = "none").
// dX = dY (Phi(x) + x phi(x)), phi the standard normal density; the input is kept in training mode.
template <class Scalar>
class GELU final : public detail_activation::Elementwise<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;

  const MatrixType& forward(const Input& X) override {
    this->begin_forward("GELU::forward", X);
    if (this->training_) input_ = X;
    this->output_ = X.unaryExpr([](Scalar x) { return x * cdf(x); });
    return this->output_;
  }
  const MatrixType& backward(const Input& dY) override {
    this->begin_backward("GELU::backward", dY);
    this->grad_input_ = input_.binaryExpr(dY, [](Scalar x, Scalar g) { return g * (cdf(x) + x * pdf(x)); });
    return this->grad_input_;
  }
  std::string type_name() const override { return "GELU"; }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<GELU>(*this); }

 private:
  static Scalar cdf(Scalar x) {
    return static_cast<Scalar>(0.5) * (Scalar(1) + std::erf(x * static_cast<Scalar>(0.70710678118654752440)));
  }
  static Scalar pdf(Scalar x) { return static_cast<Scalar>(0.39894228040143267794) * std::exp(-x * x / Scalar(2)); }

  MatrixType input_;
};

}  // namespace lora::nn
