// lora.hpp: Linear, a plain dense layer y = x W^T + b whose weight and bias can each be trained or frozen.
#pragma once

#include <lora/common.hpp>
#include <lora/detail/random.hpp>
#include <lora/init.hpp>
#include <lora/nn/module.hpp>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>

namespace lora::nn {

template <class Scalar>
class Linear final : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::VectorType;
  using typename Module<Scalar>::Input;

  // A fresh layer initialised as PyTorch's nn.Linear: W and b ~ U(-1/sqrt(in), 1/sqrt(in)), drawn from
  // a seeded, platform-independent stream. Trainable.
  Linear(Index in_features, Index out_features, bool bias = true, std::uint64_t seed = 0);

  // From given values: W [out x in], b [out] (any vector orientation).
  template <class DerivedW>
  explicit Linear(const Eigen::MatrixBase<DerivedW>& W) : Linear(W, VectorType(), false) {}
  template <class DerivedW, class DerivedB>
  Linear(const Eigen::MatrixBase<DerivedW>& W, const Eigen::MatrixBase<DerivedB>& b)
      : Linear(W, to_bias("Linear::Linear", b, W.rows()), true) {}

  // forward / backward: see Module. backward assigns dX = dY W and accumulates
  // grad_weight() += dY^T X (when the weight trains) and grad_bias() += column sums of dY (when the bias
  // trains). A frozen layer keeps nothing of its input: dX does not need it.
  const MatrixType& forward(const Input& X) override;
  const MatrixType& backward(const Input& dY) override;
  void zero_grad() override;

  // Trainability (PyTorch's requires_grad), for the weight and the bias separately.
  void set_trainable(bool on) { set_trainable(on, on); }
  void set_trainable(bool weight, bool bias);
  bool weight_trainable() const { return weight_trainable_; }
  bool bias_trainable() const { return bias_trainable_; }

  MatrixType& weight() { return weight_; }
  const MatrixType& weight() const { return weight_; }
  bool has_bias() const { return has_bias_; }
  VectorType& bias() { return bias_; }  // empty without a bias
  const VectorType& bias() const { return bias_; }
  const MatrixType& grad_weight() const { return grad_weight_; }
  const VectorType& grad_bias() const { return grad_bias_; }

  // Replaces the values (shapes must match; checked; NaN/Inf rejected).
  template <class Derived>
  void set_weight(const Eigen::MatrixBase<Derived>& W);
  template <class Derived>
  void set_bias(const Eigen::MatrixBase<Derived>& b);

  // "weight" and "bias" (when trainable), after the prefix.
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) override;
  Index num_parameters() const override { return weight_.size() + bias_.size(); }
  Index num_trainable_parameters() const override {
    return (weight_trainable_ ? weight_.size() : 0) + (bias_trainable_ ? bias_.size() : 0);
  }
  Index in_features() const override { return weight_.cols(); }
  Index out_features() const override { return weight_.rows(); }
  std::string type_name() const override { return "Linear"; }
  std::string describe() const override {
    return detail::concat("Linear(", in_features(), " -> ", out_features(), has_bias_ ? ", bias" : ", no bias", ")");
  }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<Linear>(*this); }

 private:
  template <class DerivedW>
  Linear(const Eigen::MatrixBase<DerivedW>& W, VectorType b, bool has_bias);

  template <class DerivedB>
  static VectorType to_bias(const char* where, const Eigen::MatrixBase<DerivedB>& b, Index out);

  MatrixType weight_, grad_weight_;
  VectorType bias_, grad_bias_;
  bool has_bias_ = false, weight_trainable_ = true, bias_trainable_ = false;
  MatrixType input_, output_, grad_input_;
  Index cached_rows_ = -1;  // n of the last training forward, -1 when backward is not possible
};

using Linearf = Linear<float>;
using Lineard = Linear<double>;

// ===================================================================================================
// Implementation

template <class Scalar>
template <class DerivedB>
typename Linear<Scalar>::VectorType Linear<Scalar>::to_bias(const char* where, const Eigen::MatrixBase<DerivedB>& b,
                                                            Index out) {
  if (b.rows() != 1 && b.cols() != 1) detail::fail(where, "bias must be a vector, got shape ", detail::shape_of(b));
  if (b.size() != out) detail::fail(where, "bias has ", b.size(), " entries, expected out_features = ", out);
  VectorType v(b.size());
  for (Index i = 0; i < b.size(); ++i) v(i) = static_cast<Scalar>(b.derived().reshaped()(i));
  detail::require_finite(where, "bias", v);
  return v;
}

template <class Scalar>
Linear<Scalar>::Linear(Index in_features, Index out_features, bool bias, std::uint64_t seed) {
  constexpr const char* where = "Linear::Linear";
  if (in_features < 1 || out_features < 1)
    detail::fail(where, "in_features and out_features must be >= 1, got ", in_features, " and ", out_features);
  weight_.resize(out_features, in_features);
  detail::Random rng(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
  init_uniform(weight_, bound, rng);
  has_bias_ = bias;
  if (bias) {
    bias_.resize(out_features);
    init_uniform(bias_, bound, rng);
  }
  set_trainable(true, true);
}

template <class Scalar>
template <class DerivedW>
Linear<Scalar>::Linear(const Eigen::MatrixBase<DerivedW>& W, VectorType b, bool has_bias)
    : bias_(std::move(b)), has_bias_(has_bias) {
  constexpr const char* where = "Linear::Linear";
  if (W.rows() == 0 || W.cols() == 0) detail::fail(where, "W is empty (", detail::shape_of(W), ")");
  weight_ = W.template cast<Scalar>();
  detail::require_finite(where, "W", weight_);
  set_trainable(true, true);
}

template <class Scalar>
void Linear<Scalar>::set_trainable(bool weight, bool bias) {
  weight_trainable_ = weight;
  bias_trainable_ = bias && has_bias_;
  if (weight_trainable_)
    grad_weight_ = MatrixType::Zero(weight_.rows(), weight_.cols());
  else
    grad_weight_.resize(0, 0);
  if (bias_trainable_)
    grad_bias_ = VectorType::Zero(bias_.size());
  else
    grad_bias_.resize(0);
  cached_rows_ = -1;
}

template <class Scalar>
template <class Derived>
void Linear<Scalar>::set_weight(const Eigen::MatrixBase<Derived>& W) {
  constexpr const char* where = "Linear::set_weight";
  detail::require_shape(where, "weight", W, weight_.rows(), weight_.cols());
  MatrixType w = W.template cast<Scalar>();
  detail::require_finite(where, "weight", w);
  weight_ = std::move(w);
}

template <class Scalar>
template <class Derived>
void Linear<Scalar>::set_bias(const Eigen::MatrixBase<Derived>& b) {
  constexpr const char* where = "Linear::set_bias";
  if (!has_bias_) detail::fail(where, "the layer was built without a bias");
  bias_ = to_bias(where, b, weight_.rows());
}

template <class Scalar>
void Linear<Scalar>::zero_grad() {
  grad_weight_.setZero();
  grad_bias_.setZero();
}

template <class Scalar>
const typename Linear<Scalar>::MatrixType& Linear<Scalar>::forward(const Input& X) {
  constexpr const char* where = "Linear::forward";
  detail::require_cols(where, "input", X, in_features(), "in_features");
  if (X.rows() == 0) detail::fail(where, "input has 0 rows");
  output_.resize(X.rows(), out_features());
  output_.noalias() = X * weight_.transpose();
  if (has_bias_) output_.rowwise() += bias_.transpose();
  if (this->training_ && weight_trainable_) input_ = X;  // dW needs X; dX and db do not
  cached_rows_ = this->training_ ? X.rows() : -1;
  return output_;
}

template <class Scalar>
const typename Linear<Scalar>::MatrixType& Linear<Scalar>::backward(const Input& dY) {
  constexpr const char* where = "Linear::backward";
  if (cached_rows_ < 0) detail::fail(where, "no cached forward: call forward() in training mode (train()) first");
  detail::require_shape(where, "grad_output", dY, cached_rows_, out_features());
  if (weight_trainable_) grad_weight_.noalias() += dY.transpose() * input_;
  if (bias_trainable_) grad_bias_.noalias() += dY.colwise().sum().transpose();
  grad_input_.resize(dY.rows(), in_features());
  grad_input_.noalias() = dY * weight_;
  return grad_input_;
}

template <class Scalar>
void Linear<Scalar>::collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) {
  if (weight_trainable_)
    out.push_back({prefix + "weight", ParameterRole::weight, detail::parameter_view(weight_),
                   detail::parameter_view(grad_weight_)});
  if (bias_trainable_)
    out.push_back({prefix + "bias", ParameterRole::bias, detail::parameter_view(bias_),
                   detail::parameter_view(grad_bias_)});
}

}  // namespace lora::nn
