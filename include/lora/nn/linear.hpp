// lora.hpp: Linear, a plain dense layer y = x W^T + b whose weight and bias can each be trained or frozen,
// or a frozen layer over a FrozenBase (dense or quantized) that other layers and models may share.
#pragma once

#include <lora/base.hpp>
#include <lora/common.hpp>
#include <lora/detail/gemm.hpp>
#include <lora/detail/kernels.hpp>
#include <lora/detail/random.hpp>
#include <lora/init.hpp>
#include <lora/nn/inference.hpp>
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

  // Over a frozen base (make_base, borrow_base, quant::make_quantized_base), shared: nothing is copied but
  // the bias, which the layer keeps as its own (frozen; set_trainable(false, true) trains it). The weight
  // stays in the base and never trains: set_requires_grad(true) unfreezes the bias alone, and
  // set_trainable(true, ...) throws. Throws for a null base.
  explicit Linear(std::shared_ptr<const FrozenBase<Scalar>> base);

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
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override;
  void zero_grad() override;

  // Trainability (PyTorch's requires_grad), for the weight and the bias separately.
  void set_trainable(bool on) { set_trainable(on, on); }
  void set_trainable(bool weight, bool bias);
  void set_requires_grad(bool on) override { set_trainable(on && !base_, on); }
  bool weight_trainable() const { return weight_trainable_; }
  bool bias_trainable() const { return bias_trainable_; }

  // Fixed-shape checked views (ParamRef) of a non-const layer; read-only maps of a const one. Over a frozen
  // base the writable view throws (the base is shared and read-only), and so does the read-only one
  // when the base is not stored as dense values (a quantized base): weight_values() reads any kind.
  ParamRef<Scalar> weight() {
    if (base_) detail::fail("Linear::weight", "the weight is the frozen base ", base_->describe(), ", which is read-only");
    return ParamRef<Scalar>(weight_.data(), weight_.rows(), weight_.cols(), weight_lease_.guard());
  }
  Eigen::Map<const MatrixType> weight() const;
  // W as dense values (a quantized base's dequantized ones), a copy.
  MatrixType weight_values() const;
  // The frozen base the layer reads its weight from; nullptr when the layer holds its weight itself.
  const std::shared_ptr<const FrozenBase<Scalar>>& frozen_base() const { return base_; }
  bool has_bias() const { return has_bias_; }
  // [out x 1] (0 x 1 without a bias).
  ParamRef<Scalar> bias() { return ParamRef<Scalar>(bias_.data(), bias_.size(), 1, bias_lease_.guard()); }
  Eigen::Map<const VectorType> bias() const { return Eigen::Map<const VectorType>(bias_.data(), bias_.size()); }
  const MatrixType& grad_weight() const { return grad_weight_; }
  const VectorType& grad_bias() const { return grad_bias_; }

  // Replaces the values (shapes must match; checked; NaN/Inf rejected). set_weight throws over a frozen
  // base (build a layer from the values instead).
  template <class Derived>
  void set_weight(const Eigen::MatrixBase<Derived>& W);
  template <class Derived>
  void set_bias(const Eigen::MatrixBase<Derived>& b);

  // "weight" and "bias" (when trainable), after the prefix.
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) override;
  Index num_parameters() const override { return out_features() * in_features() + bias_.size(); }
  Index num_trainable_parameters() const override {
    return (weight_trainable_ ? weight_.size() : 0) + (bias_trainable_ ? bias_.size() : 0);
  }
  Index in_features() const override { return base_ ? base_->in_features() : weight_.cols(); }
  Index out_features() const override { return base_ ? base_->out_features() : weight_.rows(); }
  std::string type_name() const override { return "Linear"; }
  std::string describe() const override {
    return detail::concat("Linear(", in_features(), " -> ", out_features(), has_bias_ ? ", bias" : ", no bias",
                          base_ ? "; frozen base " + base_->describe() : std::string(), ")");
  }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<Linear>(*this); }

  Linear(const Linear& other)
      : Module<Scalar>(other),
        base_(other.base_),
        weight_(other.weight_),
        grad_weight_(other.grad_weight_),
        bias_(other.bias_),
        grad_bias_(other.grad_bias_),
        has_bias_(other.has_bias_),
        weight_trainable_(other.weight_trainable_),
        bias_trainable_(other.bias_trainable_) {}
  Linear& operator=(const Linear& other) {
    if (this != &other) {
      Linear copy(other);
      *this = std::move(copy);
    }
    return *this;
  }
  Linear(Linear&&) = default;
  Linear& operator=(Linear&&) = default;
  ~Linear() override = default;

 private:
  template <class DerivedW>
  Linear(const Eigen::MatrixBase<DerivedW>& W, VectorType b, bool has_bias);

  using ColMajorMap = Eigen::Map<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>>;

  template <class DerivedB>
  static VectorType to_bias(const char* where, const Eigen::MatrixBase<DerivedB>& b, Index out);
  // Y = X W^T (+ b), into Y (resized), by the layer's own weight or its base.
  void product(const Input& x, MatrixType& Y, BaseWorkspace<Scalar>& work) const;

  std::shared_ptr<const FrozenBase<Scalar>> base_;  // set: W lives there, weight_ is empty
  MatrixType weight_, grad_weight_;
  VectorType bias_, grad_bias_;
  bool has_bias_ = false, weight_trainable_ = true, bias_trainable_ = false;
  // Owner record and per-tensor guards of the views and parameter entries (see lora/parameter.hpp).
  detail::GuardHandle guard_;
  detail::TensorLease weight_lease_{guard_, "weight"}, bias_lease_{guard_, "bias"};
  MatrixType input_;  // X of the last training forward (trainable weight); dX after backward()
  // The output, the input gradient (frozen weight) and the staging copy: shareable (see Module).
  TransientBuffers<Scalar, 3> transient_;
  MatrixType& output_buffer() { return transient_[0]; }
  MatrixType& grad_input_buffer() { return transient_[1]; }
  MatrixType& staging_buffer() { return transient_[2]; }
  bool share_own_buffers(Module<Scalar>* other) override {
    transient_.share(other ? &static_cast<Linear*>(other)->transient_ : nullptr);
    return true;
  }
  // The products' packing buffers (kept: a steady-state step allocates nothing). The products run through
  // the library's kernels, which thread only above threads_for's work threshold; Eigen's own threaded
  // product forks a team for any product above about 10^5 multiply-adds.
  BaseWorkspace<Scalar> gemm_;
  lora::detail::PackBuffer<Scalar> pack_;
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
Linear<Scalar>::Linear(std::shared_ptr<const FrozenBase<Scalar>> base) : base_(std::move(base)) {
  if (!base_) detail::fail("Linear::Linear", "the base is a null pointer");
  has_bias_ = base_->has_bias();
  if (has_bias_) bias_ = base_->bias();
  weight_trainable_ = bias_trainable_ = false;
}

template <class Scalar>
Eigen::Map<const typename Linear<Scalar>::MatrixType> Linear<Scalar>::weight() const {
  if (!base_) return Eigen::Map<const MatrixType>(weight_.data(), weight_.rows(), weight_.cols());
  const Scalar* w = base_->dense_weight();
  if (!w)
    detail::fail("Linear::weight", "the frozen base ", base_->describe(),
                 " is not stored as dense values; weight_values() dequantizes it");
  return Eigen::Map<const MatrixType>(w, out_features(), in_features());
}

template <class Scalar>
typename Linear<Scalar>::MatrixType Linear<Scalar>::weight_values() const {
  if (!base_) return weight_;
  MatrixType W(out_features(), in_features());
  base_->dense_rows(0, out_features(), W.data());
  return W;
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
  if (weight && base_)
    detail::fail("Linear::set_trainable", "the weight is the frozen base ", base_->describe(),
                 " and cannot train; set_trainable(false, true) trains the bias alone");
  // Parameter lists made before this call must not write a tensor whose trainability changed.
  if (weight != weight_trainable_) weight_lease_.retire();
  if ((bias && has_bias_) != bias_trainable_) bias_lease_.retire();
  ++guard_->version;
  if (weight != weight_trainable_ || (bias && has_bias_) != bias_trainable_) ++guard_->layout;
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
  if (base_)
    detail::fail(where, "the weight is the frozen base ", base_->describe(),
                 ", which is read-only; build a Linear from the new values instead");
  detail::require_shape(where, "weight", W, weight_.rows(), weight_.cols());
  MatrixType w = W.template cast<Scalar>();
  detail::require_finite(where, "weight", w);
  weight_ = w;  // in place: views stay valid
  ++guard_->version;
}

template <class Scalar>
template <class Derived>
void Linear<Scalar>::set_bias(const Eigen::MatrixBase<Derived>& b) {
  constexpr const char* where = "Linear::set_bias";
  if (!has_bias_) detail::fail(where, "the layer was built without a bias");
  bias_ = to_bias(where, b, out_features());
  ++guard_->version;
}

template <class Scalar>
void Linear<Scalar>::zero_grad() {
  grad_weight_.setZero();
  grad_bias_.setZero();
}

template <class Scalar>
void Linear<Scalar>::product(const Input& x, MatrixType& Y, BaseWorkspace<Scalar>& work) const {
  detail::resize_workspace(Y, x.rows(), out_features());
  if (base_)
    base_->forward(x.data(), x.rows(), Y.data(), work, false);
  else
    lora::detail::gemm_parallel(work.forward, x, ColMajorMap(weight_.data(), in_features(), out_features()), Y);
  if (has_bias_) Y.rowwise() += bias_.transpose();
}

template <class Scalar>
const typename Linear<Scalar>::MatrixType& Linear<Scalar>::forward(const Input& X) {
  constexpr const char* where = "Linear::forward";
  detail::require_cols(where, "input", X, in_features(), "in_features");
  if (X.rows() == 0) detail::fail(where, "input has 0 rows");
  // X may be a view of this layer's own output (forward(forward(X)) on a square layer): read it from a copy.
  const Input x = lora::detail::unaliased<Scalar>(X, output_buffer(), staging_buffer(), base_ != nullptr);
  if (this->training_ && weight_trainable_) {  // dW needs X; dX and db do not
    detail::resize_workspace(input_, x.rows(), x.cols());
    input_ = x;
  }
  product(x, output_buffer(), gemm_);
  cached_rows_ = this->training_ ? X.rows() : -1;
  return output_buffer();
}

template <class Scalar>
const typename Linear<Scalar>::MatrixType& Linear<Scalar>::backward(const Input& dY) {
  constexpr const char* where = "Linear::backward";
  if (cached_rows_ < 0) this->fail_no_cached_forward(where);
  detail::require_shape(where, "grad_output", dY, cached_rows_, out_features());
  // dX goes over the kept input X once grad_W has read it (a trainable weight), else into the transient
  // dX buffer.
  const bool over_input = weight_trainable_;
  MatrixType& dx = over_input ? input_ : grad_input_buffer();
  const Input dy = lora::detail::unaliased<Scalar>(dY, dx, staging_buffer(), base_ != nullptr);
  const Index n = dy.rows(), in = in_features(), out = out_features();
  if (weight_trainable_)  // grad_W += dY^T X: a rank-n update, dY^T read in place
    lora::detail::rank_update(lora::detail::in_place_update(out, in, n, dy.data(), Index(1), dy.outerStride(),
                                                            input_.data(), in, grad_weight_.data(), in),
                              pack_);
  if (bias_trainable_) grad_bias_.noalias() += dy.colwise().sum().transpose();
  detail::resize_workspace(dx, n, in);
  if (base_)
    base_->backward_input(dy.data(), n, dx.data(), gemm_);
  else
    lora::detail::gemm_parallel(gemm_.backward, dy, Eigen::Map<const MatrixType>(weight_.data(), out, in), dx);
  if (over_input) cached_rows_ = -1;  // X is gone
  return dx;
}

template <class Scalar>
const typename Linear<Scalar>::MatrixType& Linear<Scalar>::infer(const Input& X, InferenceContext<Scalar>& ctx) const {
  constexpr const char* where = "Linear::infer";
  detail::require_cols(where, "input", X, in_features(), "in_features");
  if (X.rows() == 0) detail::fail(where, "input has 0 rows");
  ModuleWorkspace<Scalar>& ws = ctx.next_workspace();
  product(lora::detail::unaliased<Scalar>(X, ws.output, ws.staging, base_ != nullptr), ws.output, ws.base);
  return ws.output;
}

template <class Scalar>
void Linear<Scalar>::collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) {
  if (weight_trainable_)
    out.push_back(detail::guarded_parameter<Scalar>(prefix + "weight", ParameterRole::weight,
                                                    detail::parameter_view(weight_), detail::parameter_view(grad_weight_),
                                                    weight_lease_.guard()));
  if (bias_trainable_)
    out.push_back(detail::guarded_parameter<Scalar>(prefix + "bias", ParameterRole::bias, detail::parameter_view(bias_),
                                                    detail::parameter_view(grad_bias_), bias_lease_.guard()));
}

}  // namespace lora::nn
