// lora.hpp: LayerNorm and RMSNorm over the last dimension (each row of an [n x dim] input), with affine
// weight (and, for LayerNorm, bias) named "weight" and "bias" as in PyTorch / Hugging Face.
#pragma once

#include <lora/common.hpp>
#include <lora/nn/inference.hpp>
#include <lora/nn/module.hpp>
#include <lora/parameter.hpp>

#include <cmath>
#include <memory>
#include <string>

namespace lora::nn::detail_norm {

// One normalisation layer; Centered = true is LayerNorm, false is RMSNorm.
//   LayerNorm: xhat = (x - mean(x)) / sqrt(var(x) + eps) (biased variance), y = xhat * weight + bias.
//   RMSNorm:   xhat = x / sqrt(mean(x^2) + eps),                             y = xhat * weight.
// backward (per row, g = dY * weight, m1 = mean(g), m2 = mean(g * xhat)):
//   LayerNorm: dX = rstd (g - m1 - xhat m2);  RMSNorm: dX = rstd (g - xhat m2);
//   grad_weight += column sums of dY * xhat, grad_bias += column sums of dY.
// backward writes dX over the kept xhat (no buffer of its own), so it runs once per forward().
template <class Scalar, bool Centered>
class Norm final : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::VectorType;
  using typename Module<Scalar>::Input;

  // requires: dim >= 1, eps > 0 and finite. ensures: weight = 1, bias = 0 (PyTorch's init), trainable.
  explicit Norm(Index dim, double eps = Centered ? 1e-5 : 1e-6) : eps_(eps) {
    const char* where = Centered ? "LayerNorm::LayerNorm" : "RMSNorm::RMSNorm";
    if (dim < 1) lora::detail::fail(where, "dim must be >= 1, got ", dim);
    if (!(eps > 0) || !std::isfinite(eps)) lora::detail::fail(where, "eps must be positive and finite, got ", eps);
    weight_ = VectorType::Ones(dim);
    if (Centered) bias_ = VectorType::Zero(dim);
    set_trainable(true);
  }
  Norm(const Norm& other)
      : Module<Scalar>(other),
        weight_(other.weight_),
        bias_(other.bias_),
        grad_weight_(other.grad_weight_),
        grad_bias_(other.grad_bias_),
        eps_(other.eps_),
        trainable_(other.trainable_) {}
  Norm& operator=(const Norm&) = delete;
  ~Norm() override = default;

  const MatrixType& forward(const Input& X) override {
    const char* where = Centered ? "LayerNorm::forward" : "RMSNorm::forward";
    require_input(where, X);
    const Input x = lora::detail::unaliased<Scalar>(X, output_buffer(), staging_buffer());
    lora::detail::resize_workspace(xhat_, x.rows(), x.cols());
    lora::detail::resize_workspace(output_buffer(), x.rows(), x.cols());
    rstd_.resize(x.rows());
    compute(x, xhat_, rstd_, output_buffer());
    cached_rows_ = this->training_ ? x.rows() : -1;
    return output_buffer();
  }
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override {
    const char* where = Centered ? "LayerNorm::infer" : "RMSNorm::infer";
    require_input(where, X);
    ModuleWorkspace<Scalar>& ws = ctx.next_workspace();
    const Input x = lora::detail::unaliased<Scalar>(X, ws.output, ws.staging);
    lora::detail::resize_workspace(ws.output, x.rows(), x.cols());
    for (Index i = 0; i < x.rows(); ++i) {
      normalize_row(x.row(i), ws.output.row(i));
      affine_row(ws.output.row(i), ws.output.row(i));
    }
    return ws.output;
  }
  const MatrixType& backward(const Input& dY) override {
    const char* where = Centered ? "LayerNorm::backward" : "RMSNorm::backward";
    if (cached_rows_ < 0) this->fail_no_cached_forward(where);
    lora::detail::require_shape(where, "grad_output", dY, cached_rows_, dim());
    const Index n = dY.rows();
    if (trainable_) {
      grad_weight_.noalias() += (dY.array() * xhat_.array()).colwise().sum().matrix().transpose();
      if (Centered) grad_bias_.noalias() += dY.colwise().sum().transpose();
    }
    g_.resize(dim());
    for (Index i = 0; i < n; ++i) {
      // g = dY * weight; dX replaces the row of xhat it was computed from (dY is never xhat_: that buffer
      // leaves only as dX, after this).
      g_ = (dY.row(i).array() * weight_.transpose().array()).matrix();
      const Scalar m2 = (g_.array() * xhat_.row(i).array()).mean();
      const Scalar m1 = Centered ? g_.mean() : Scalar(0);
      xhat_.row(i) = ((g_.array() - m1 - xhat_.row(i).array() * m2) * rstd_(i)).matrix();
    }
    cached_rows_ = -1;  // xhat is gone
    return xhat_;
  }
  void zero_grad() override {
    grad_weight_.setZero();
    grad_bias_.setZero();
  }

  void set_trainable(bool on) {
    if (on != trainable_) {
      weight_lease_.retire();
      bias_lease_.retire();
      ++guard_->layout;
    }
    ++guard_->version;
    trainable_ = on;
    if (on) {
      grad_weight_ = VectorType::Zero(weight_.size());
      grad_bias_ = VectorType::Zero(bias_.size());
    } else {
      grad_weight_.resize(0);
      grad_bias_.resize(0);
    }
    cached_rows_ = -1;
  }
  void set_requires_grad(bool on) override { set_trainable(on); }
  bool trainable() const { return trainable_; }

  Index dim() const { return weight_.size(); }
  double eps() const { return eps_; }
  // [dim x 1] checked views of a non-const layer; read-only maps of a const one. RMSNorm has no bias.
  ParamRef<Scalar> weight() { return ParamRef<Scalar>(weight_.data(), weight_.size(), 1, weight_lease_.guard()); }
  Eigen::Map<const VectorType> weight() const { return Eigen::Map<const VectorType>(weight_.data(), weight_.size()); }
  bool has_bias() const { return Centered; }
  ParamRef<Scalar> bias() { return ParamRef<Scalar>(bias_.data(), bias_.size(), 1, bias_lease_.guard()); }
  Eigen::Map<const VectorType> bias() const { return Eigen::Map<const VectorType>(bias_.data(), bias_.size()); }
  const VectorType& grad_weight() const { return grad_weight_; }
  const VectorType& grad_bias() const { return grad_bias_; }

  // "weight" (and "bias" for LayerNorm) when trainable.
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) override {
    if (!trainable_) return;
    out.push_back(lora::detail::guarded_parameter<Scalar>(prefix + "weight", ParameterRole::weight,
                                                          lora::detail::parameter_view(weight_),
                                                          lora::detail::parameter_view(grad_weight_),
                                                          weight_lease_.guard()));
    if (Centered)
      out.push_back(lora::detail::guarded_parameter<Scalar>(prefix + "bias", ParameterRole::bias,
                                                            lora::detail::parameter_view(bias_),
                                                            lora::detail::parameter_view(grad_bias_), bias_lease_.guard()));
  }
  Index num_parameters() const override { return weight_.size() + bias_.size(); }
  Index num_trainable_parameters() const override { return trainable_ ? num_parameters() : 0; }
  Index in_features() const override { return dim(); }
  Index out_features() const override { return dim(); }
  std::string type_name() const override { return Centered ? "LayerNorm" : "RMSNorm"; }
  std::string describe() const override { return lora::detail::concat(type_name(), "(", dim(), ", eps=", eps_, ")"); }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<Norm>(*this); }

 private:
  void require_input(const char* where, const Input& X) const {
    lora::detail::require_cols(where, "input", X, dim(), "dim");
    if (X.rows() == 0) lora::detail::fail(where, "input has 0 rows");
  }
  // xhat = (x - mean) * rstd (no mean for RMSNorm); returns rstd.
  template <class Row, class Out>
  Scalar normalize_row(const Row& x, Out&& xhat) const {
    const Scalar mu = Centered ? x.mean() : Scalar(0);
    const Scalar ms = (x.array() - mu).square().mean();
    const Scalar rstd = Scalar(1) / std::sqrt(ms + static_cast<Scalar>(eps_));
    xhat = ((x.array() - mu) * rstd).matrix();
    return rstd;
  }
  // y = xhat * weight (+ bias); y may be xhat itself.
  template <class Row, class Out>
  void affine_row(const Row& xhat, Out&& y) const {
    y = (xhat.array() * weight_.transpose().array()).matrix();
    if (Centered) y += bias_.transpose();
  }
  void compute(const Input& x, MatrixType& xhat, VectorType& rstd, MatrixType& out) const {
    for (Index i = 0; i < x.rows(); ++i) {
      rstd(i) = normalize_row(x.row(i), xhat.row(i));
      affine_row(xhat.row(i), out.row(i));
    }
  }

  VectorType weight_, bias_, grad_weight_, grad_bias_;
  double eps_;
  bool trainable_ = false;
  lora::detail::GuardHandle guard_;
  lora::detail::TensorLease weight_lease_{guard_, "weight"}, bias_lease_{guard_, "bias"};
  MatrixType xhat_;  // holds dX after backward()
  // The output and the staging copy: shareable (see Module::share_transient_buffers).
  TransientBuffers<Scalar, 2> transient_;
  MatrixType& output_buffer() { return transient_[0]; }
  MatrixType& staging_buffer() { return transient_[1]; }
  bool share_own_buffers(Module<Scalar>* other) override {
    transient_.share(other ? &static_cast<Norm*>(other)->transient_ : nullptr);
    return true;
  }
  VectorType rstd_;
  Eigen::Matrix<Scalar, 1, Eigen::Dynamic> g_;  // one row of dY * weight
  Index cached_rows_ = -1;  // -1: nothing to differentiate
};

}  // namespace lora::nn::detail_norm

namespace lora::nn {

template <class Scalar>
using LayerNorm = detail_norm::Norm<Scalar, true>;
template <class Scalar>
using RMSNorm = detail_norm::Norm<Scalar, false>;

}  // namespace lora::nn
