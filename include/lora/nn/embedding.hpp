// lora.hpp: Embedding (token ids -> rows of a table, PyTorch's nn.Embedding), with an optional LoRA
// adapter as PEFT applies it to embeddings.
//
// LoRA on an embedding (PEFT's lora.Embedding): lora_embedding_A [r x num_embeddings] starts at zero,
// lora_embedding_B [dim x r] is drawn from N(0, 1), so the adapted table starts equal to the base one;
//   Y[i] = E[ids[i]] + s * A[:, ids[i]]^T B^T,   s = alpha / r,
// i.e. the rows of s * (B A)^T selected by the ids. merge() adds s * (B A)^T to E; unmerge() removes it.
// Parameter names (in memory, PEFT's): "weight", "lora_embedding_A.<adapter>", "lora_embedding_B.<adapter>".
#pragma once

#include <lora/common.hpp>
#include <lora/detail/random.hpp>
#include <lora/init.hpp>
#include <lora/parameter.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace lora::nn {

template <class Scalar>
class Embedding {
  static_assert(is_supported_scalar_v<Scalar>, "lora::nn modules support float and double only.");

 public:
  using MatrixType = Matrix<Scalar>;
  using Input = Eigen::Ref<const MatrixType>;

  // A fresh table E [num_embeddings x dim] ~ N(0, 1) (PyTorch's init), seeded; trainable.
  Embedding(Index num_embeddings, Index dim, std::uint64_t seed = 0) {
    constexpr const char* where = "Embedding::Embedding";
    if (num_embeddings < 1 || dim < 1)
      detail::fail(where, "num_embeddings and dim must be >= 1, got ", num_embeddings, " and ", dim);
    weight_.resize(num_embeddings, dim);
    detail::Random rng(seed);
    init_gaussian(weight_, 1.0, rng);
    set_trainable(true);
  }
  // From a given table [num_embeddings x dim] (checked: non-empty, finite).
  template <class Derived>
  explicit Embedding(const Eigen::MatrixBase<Derived>& E) {
    constexpr const char* where = "Embedding::Embedding";
    if (E.rows() == 0 || E.cols() == 0) detail::fail(where, "the table is empty (", detail::shape_of(E), ")");
    weight_ = E.template cast<Scalar>();
    detail::require_finite(where, "table", weight_);
    set_trainable(true);
  }
  Embedding(const Embedding&) = delete;
  Embedding& operator=(const Embedding&) = delete;

  Index num_embeddings() const { return weight_.rows(); }
  Index dim() const { return weight_.cols(); }

  // forward(ids)
  //   requires: ids non-empty, each in [0, num_embeddings) (an error names the position and the size).
  //   ensures:  returns Y [ids.size() x dim] (own buffer, valid until the next forward); keeps the ids.
  const MatrixType& forward(const std::vector<Index>& ids) {
    constexpr const char* where = "Embedding::forward";
    if (ids.empty()) detail::fail(where, "no ids");
    for (std::size_t i = 0; i < ids.size(); ++i)
      if (ids[i] < 0 || ids[i] >= num_embeddings())
        detail::fail(where, "position ", i, ": id ", ids[i], " is outside [0, num_embeddings = ", num_embeddings(), ")");
    const Index n = static_cast<Index>(ids.size());
    ids_.assign(ids.begin(), ids.end());
    detail::resize_workspace(output_, n, dim());
    for (Index i = 0; i < n; ++i) output_.row(i) = weight_.row(ids_[static_cast<std::size_t>(i)]);
    if (has_lora() && !merged_) {
      detail::resize_workspace(z_, n, rank());
      for (Index i = 0; i < n; ++i) z_.row(i) = A_.col(ids_[static_cast<std::size_t>(i)]).transpose();
      output_.noalias() += scaling_ * z_ * B_.transpose();
    }
    cached_ = true;
    return output_;
  }

  // backward(dY)
  //   requires: dY [n x dim] for the last forward's n ids; not merged.
  //   ensures:  grad_weight rows += dY rows (when the table trains); with LoRA, dB += s dY^T Z and
  //             dA[:, id] += s (dY B)[i] (Z = A^T[ids]). Nothing is returned: ids have no gradient.
  void backward(const Input& dY) {
    constexpr const char* where = "Embedding::backward";
    if (!cached_) detail::fail(where, "no cached forward: call forward() first");
    if (merged_) detail::fail(where, "the adapter is merged: unmerge() before training");
    detail::require_shape(where, "grad_output", dY, static_cast<Index>(ids_.size()), dim());
    const Index n = dY.rows();
    if (trainable_)
      for (Index i = 0; i < n; ++i) grad_weight_.row(ids_[static_cast<std::size_t>(i)]) += dY.row(i);
    if (has_lora()) {
      grad_B_.noalias() += scaling_ * dY.transpose() * z_;
      detail::resize_workspace(dz_, n, rank());
      dz_.noalias() = scaling_ * dY * B_;
      for (Index i = 0; i < n; ++i) grad_A_.col(ids_[static_cast<std::size_t>(i)]) += dz_.row(i).transpose();
    }
  }
  void zero_grad() {
    grad_weight_.setZero();
    grad_A_.setZero();
    grad_B_.setZero();
  }

  // The table trains unless frozen; add_lora freezes it (PEFT trains only the adapter).
  void set_trainable(bool on) {
    if (on != trainable_) {
      weight_lease_.retire();
      ++guard_->layout;
    }
    ++guard_->version;
    trainable_ = on;
    if (on)
      grad_weight_ = MatrixType::Zero(weight_.rows(), weight_.cols());
    else
      grad_weight_.resize(0, 0);
  }
  bool trainable() const { return trainable_; }

  // add_lora(r, alpha, adapter, seed)
  //   requires: r >= 1, alpha finite and > 0, no adapter yet, adapter name non-empty and without '.'.
  //   ensures:  A = 0 [r x num_embeddings], B ~ N(0, 1) [dim x r], s = alpha / r; the table is frozen.
  void add_lora(Index r, double alpha, const std::string& adapter = "default", std::uint64_t seed = 0) {
    constexpr const char* where = "Embedding::add_lora";
    if (has_lora()) detail::fail(where, "the layer already has adapter '", adapter_, "'");
    if (r < 1) detail::fail(where, "r must be >= 1, got ", r);
    if (!(alpha > 0) || !std::isfinite(alpha)) detail::fail(where, "alpha must be positive and finite, got ", alpha);
    if (adapter.empty() || adapter.find('.') != std::string::npos)
      detail::fail(where, "adapter name must be non-empty and contain no '.', got '", adapter, "'");
    A_ = MatrixType::Zero(r, num_embeddings());
    B_.resize(dim(), r);
    detail::Random rng(seed);
    init_gaussian(B_, 1.0, rng);
    grad_A_ = MatrixType::Zero(r, num_embeddings());
    grad_B_ = MatrixType::Zero(dim(), r);
    scaling_ = static_cast<Scalar>(alpha / static_cast<double>(r));
    adapter_ = adapter;
    ++guard_->layout;
    set_trainable(false);
    cached_ = false;
  }
  bool has_lora() const { return A_.rows() > 0; }
  Index rank() const { return A_.rows(); }
  Scalar scaling() const { return scaling_; }
  const std::string& adapter_name() const { return adapter_; }

  // Checked views. A [r x num_embeddings], B [dim x r]; writes are refused while merged.
  ParamRef<Scalar> weight() { return ParamRef<Scalar>(weight_.data(), weight_.rows(), weight_.cols(), weight_lease_.guard()); }
  ParamRef<Scalar> lora_A() { return ParamRef<Scalar>(A_.data(), A_.rows(), A_.cols(), a_lease_.guard()); }
  ParamRef<Scalar> lora_B() { return ParamRef<Scalar>(B_.data(), B_.rows(), B_.cols(), b_lease_.guard()); }
  Eigen::Map<const MatrixType> weight() const { return Eigen::Map<const MatrixType>(weight_.data(), weight_.rows(), weight_.cols()); }
  const MatrixType& grad_weight() const { return grad_weight_; }
  const MatrixType& grad_lora_A() const { return grad_A_; }
  const MatrixType& grad_lora_B() const { return grad_B_; }

  // merge(): E += s (B A)^T, forward then reads E alone; unmerge() subtracts it. Each requires the other
  // state (an error otherwise) and an adapter.
  void merge() {
    if (!has_lora()) detail::fail("Embedding::merge", "no adapter to merge");
    if (merged_) detail::fail("Embedding::merge", "already merged");
    weight_.noalias() += scaling_ * A_.transpose() * B_.transpose();
    merged_ = true;
    guard_->locked = "the embedding's adapter is merged: unmerge() first";
    ++guard_->version;
  }
  void unmerge() {
    if (!merged_) detail::fail("Embedding::unmerge", "not merged");
    weight_.noalias() -= scaling_ * A_.transpose() * B_.transpose();
    merged_ = false;
    guard_->locked = nullptr;
    ++guard_->version;
  }
  bool merged() const { return merged_; }

  // "weight" when the table trains; "lora_embedding_A.<adapter>" / "lora_embedding_B.<adapter>" with an
  // adapter (roles lora_A / lora_B).
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) {
    if (trainable_)
      out.push_back(detail::guarded_parameter<Scalar>(prefix + "weight", ParameterRole::weight, detail::parameter_view(weight_),
                                                      detail::parameter_view(grad_weight_), weight_lease_.guard()));
    if (has_lora()) {
      out.push_back(detail::guarded_parameter<Scalar>(prefix + "lora_embedding_A." + adapter_, ParameterRole::lora_A,
                                                      detail::parameter_view(A_), detail::parameter_view(grad_A_),
                                                      a_lease_.guard()));
      out.push_back(detail::guarded_parameter<Scalar>(prefix + "lora_embedding_B." + adapter_, ParameterRole::lora_B,
                                                      detail::parameter_view(B_), detail::parameter_view(grad_B_),
                                                      b_lease_.guard()));
    }
  }
  std::string describe() const {
    return detail::concat("Embedding(", num_embeddings(), ", ", dim(), has_lora() ? detail::concat(", lora r=", rank()) : "", ")");
  }

 private:
  MatrixType weight_, grad_weight_, A_, B_, grad_A_, grad_B_;
  Scalar scaling_ = 0;
  std::string adapter_;
  bool trainable_ = false, merged_ = false, cached_ = false;
  detail::GuardHandle guard_;
  detail::TensorLease weight_lease_{guard_, "weight"}, a_lease_{guard_, "lora_embedding_A"}, b_lease_{guard_, "lora_embedding_B"};
  std::vector<Index> ids_;
  MatrixType output_, z_, dz_;
};

}  // namespace lora::nn
