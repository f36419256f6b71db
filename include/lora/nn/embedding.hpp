// lora.hpp: Embedding (token ids -> rows of a table, PyTorch's nn.Embedding), with an optional LoRA
// adapter as PEFT applies it to embeddings.
//
// LoRA on an embedding (PEFT's lora.Embedding): lora_embedding_A [r x num_embeddings] starts at zero,
// lora_embedding_B [dim x r] is drawn from N(0, 1), so the adapted table starts equal to the base one;
//   Y[i] = E[ids[i]] + s * A[:, ids[i]]^T B^T,   s = alpha / r (alpha / sqrt(r) with rsLoRA),
// i.e. the rows of s * (B A)^T selected by the ids. merge() adds s * (B A)^T to E; unmerge() removes it.
// Parameter names (in memory, PEFT's): "weight", "lora_embedding_A.<adapter>", "lora_embedding_B.<adapter>";
// in an adapter file "base_model.model.<path>.lora_embedding_A" / ".lora_embedding_B" (io/adapter_dir.hpp).
//
// What PEFT's Embedding does differently from its Linear, and this class follows: init_lora_weights =
// true and "gaussian" both give A = 0, B ~ N(0, 1) (init_std concerns a Linear's A only); false
// (InitMethod::random) leaves both at torch.randn, N(0, 1); lora_dropout is never applied (so a dropout
// > 0 is refused here rather than silently ignored). One adapter per Embedding, always active: several
// adapters, adapter switching and DoRA are not implemented for embeddings.
//
// As a Module (a child of a Sequential, Hugging Face's embeddings.word_embeddings), forward(X) reads the
// ids from the entries of X, as PyTorch's nn.Embedding reads an id tensor: X [n x m] of integral values
// gives Y [n*m x dim], row i*m + j the embedding of X(i, j) (the token-row layout of TokenBatch, where
// m = seq_len). backward(dY) returns an empty matrix: ids have no gradient.
#pragma once

#include <lora/common.hpp>
#include <lora/detail/random.hpp>
#include <lora/config.hpp>
#include <lora/init.hpp>
#include <lora/nn/inference.hpp>
#include <lora/nn/module.hpp>
#include <lora/parameter.hpp>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <memory>
#include <string>
#include <vector>

namespace lora::nn {

template <class Scalar>
class Embedding final : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;

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
  // A copy has its own values, gradients and guards; it keeps no cached forward.
  Embedding(const Embedding& other)
      : Module<Scalar>(other),
        weight_(other.weight_),
        grad_weight_(other.grad_weight_),
        A_(other.A_),
        B_(other.B_),
        grad_A_(other.grad_A_),
        grad_B_(other.grad_B_),
        scaling_(other.scaling_),
        config_(other.config_),
        adapter_(other.adapter_),
        original_(other.original_),
        trainable_(other.trainable_),
        merged_(other.merged_) {
    if (merged_) guard_->locked = "the embedding's adapter is merged: unmerge() first";
  }
  Embedding& operator=(const Embedding&) = delete;
  ~Embedding() override = default;

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
    ids_.assign(ids.begin(), ids.end());
    return lookup();
  }
  // forward(X): the ids are X's entries, row by row (see the top of this file); each must be an integer
  // in [0, num_embeddings) (an error names its row and column).
  const MatrixType& forward(const Input& X) override {
    read_ids("Embedding::forward", X, ids_);
    return lookup();
  }
  // infer(X, ctx): forward(X) in eval mode, into ctx's buffers, the module unchanged. The adapter applies
  // when it is active for ctx (Adapters::active; Adapters::named when its name is listed); a mixed batch
  // (Adapters::per_row) is refused.
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override {
    constexpr const char* where = "Embedding::infer";
    if (X.size() == 0) detail::fail(where, "no ids (the input is ", detail::shape_of(X), ")");
    bool with_lora = has_lora() && !merged_;
    if (with_lora && ctx.mode() == InferenceContext<Scalar>::Adapters::per_row)
      detail::fail(where, "a mixed-batch plan is not supported for an Embedding's adapter ('", adapter_, "')");
    if (with_lora && ctx.mode() == InferenceContext<Scalar>::Adapters::named) {
      const auto& names = ctx.adapter_names();
      with_lora = std::find(names.begin(), names.end(), adapter_) != names.end();
    }
    for (Index i = 0; i < X.rows(); ++i)
      for (Index j = 0; j < X.cols(); ++j) check_id(where, X(i, j), i, j);
    ModuleWorkspace<Scalar>& ws = ctx.next_workspace();
    const Input x = lora::detail::unaliased<Scalar>(X, ws.output, ws.staging);
    detail::resize_workspace(ws.output, x.size(), dim());
    for (Index i = 0, k = 0; i < x.rows(); ++i)
      for (Index j = 0; j < x.cols(); ++j, ++k) {
        const auto id = static_cast<Index>(x(i, j));
        ws.output.row(k) = weight_.row(id);
        if (with_lora) ws.output.row(k).transpose().noalias() += scaling_ * (B_ * A_.col(id));
      }
    return ws.output;
  }

 private:
  void check_id(const char* where, Scalar v, Index i, Index j) const {
    if (!(v >= 0) || !(v < static_cast<Scalar>(num_embeddings())) || v != std::floor(v))
      detail::fail(where, "row ", i, ", column ", j, ": id ", v, " is not an integer in [0, num_embeddings = ",
                   num_embeddings(), ")");
  }
  void read_ids(const char* where, const Input& X, std::vector<Index>& ids) const {
    if (X.size() == 0) detail::fail(where, "no ids (the input is ", detail::shape_of(X), ")");
    for (Index i = 0; i < X.rows(); ++i)
      for (Index j = 0; j < X.cols(); ++j) check_id(where, X(i, j), i, j);
    ids.resize(static_cast<std::size_t>(X.size()));
    for (Index i = 0; i < X.rows(); ++i)
      for (Index j = 0; j < X.cols(); ++j) ids[static_cast<std::size_t>(i * X.cols() + j)] = static_cast<Index>(X(i, j));
  }
  const MatrixType& lookup() {
    const Index n = static_cast<Index>(ids_.size());
    detail::resize_workspace(output_, n, dim());
    for (Index i = 0; i < n; ++i) output_.row(i) = weight_.row(ids_[static_cast<std::size_t>(i)]);
    if (has_lora() && !merged_) {
      detail::resize_workspace(z_, n, rank());
      for (Index i = 0; i < n; ++i) z_.row(i) = A_.col(ids_[static_cast<std::size_t>(i)]).transpose();
      output_.noalias() += scaling_ * z_ * B_.transpose();
    }
    cached_ = this->training_;
    return output_;
  }

 public:
  // backward(dY)
  //   requires: dY [n x dim] for the last forward's n ids, in training mode; not merged.
  //   ensures:  grad_weight rows += dY rows (when the table trains); with LoRA, dB += s dY^T Z and
  //             dA[:, id] += s (dY B)[i] (Z = A^T[ids]). Returns an empty matrix: ids have no gradient.
  const MatrixType& backward(const Input& dY) override {
    constexpr const char* where = "Embedding::backward";
    if (!cached_) this->fail_no_cached_forward(where);
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
    return no_gradient_;
  }
  void zero_grad() override {
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
  // The table (PyTorch's requires_grad); an adapter, when there is one, keeps training.
  void set_requires_grad(bool on) override { set_trainable(on); }

  // add_lora(config, adapter)
  //   requires: config valid (LoraConfig::validate) with dropout = 0 (PEFT never applies lora_dropout to an
  //             embedding), no adapter yet, adapter name non-empty and without '.'.
  //   ensures:  A [r x num_embeddings] = 0 and B [dim x r] ~ N(0, 1), or both ~ N(0, 1) with
  //             InitMethod::random (PEFT's init_lora_weights = false), drawn from config.seed;
  //             s = config.scaling(); the table is frozen. keep_original_weight keeps a copy of the table
  //             while merged, so that unmerge() restores it bit-exactly.
  void add_lora(const LoraConfig& config, const std::string& adapter = "default") {
    constexpr const char* where = "Embedding::add_lora";
    if (has_lora()) detail::fail(where, "the layer already has adapter '", adapter_, "'");
    check_config(where, config);
    if (adapter.empty() || adapter.find('.') != std::string::npos)
      detail::fail(where, "adapter name must be non-empty and contain no '.', got '", adapter, "'");
    const Index r = config.rank;
    MatrixType A = MatrixType::Zero(r, num_embeddings()), B(dim(), r);
    detail::Random rng(config.seed);
    init_gaussian(B, 1.0, rng);
    if (config.init == InitMethod::random) init_gaussian(A, 1.0, rng);
    grad_A_ = MatrixType::Zero(r, num_embeddings());
    grad_B_ = MatrixType::Zero(dim(), r);
    A_.swap(A);
    B_.swap(B);
    config_ = config;
    scaling_ = static_cast<Scalar>(config.scaling());
    adapter_ = adapter;
    ++guard_->layout;
    set_trainable(false);
    cached_ = false;
  }
  // add_lora(r, alpha, adapter, seed): add_lora with rank r, alpha, seed and LoraConfig's other defaults.
  void add_lora(Index r, double alpha, const std::string& adapter = "default", std::uint64_t seed = 0) {
    if (r < 1 || r > (Index(1) << 24)) detail::fail("Embedding::add_lora", "r must be >= 1 (and <= 2^24), got ", r);
    LoraConfig config;
    config.rank = static_cast<int>(r);
    config.alpha = alpha;
    config.seed = seed;
    add_lora(config, adapter);
  }
  // set_lora(config, A, B): new values and hyper-parameters (rank included) for the adapter, as an adapter
  // file gives them; the name is kept.
  //   requires: an adapter, not merged; config as for add_lora; A [config.rank x num_embeddings] and
  //             B [dim x config.rank], finite. Checked before anything changes.
  //   ensures:  the adapter holds copies of A and B with s = config.scaling(); gradients are zero. With the
  //             same rank, views and parameter lists stay valid; with another, they are stale.
  template <class DerivedA, class DerivedB>
  void set_lora(const LoraConfig& config, const Eigen::MatrixBase<DerivedA>& A, const Eigen::MatrixBase<DerivedB>& B) {
    constexpr const char* where = "Embedding::set_lora";
    if (!has_lora()) detail::fail(where, "the layer has no adapter (add_lora first)");
    if (merged_) detail::fail(where, "the adapter is merged: unmerge() first");
    check_config(where, config);
    detail::require_shape(where, "lora_embedding_A", A, config.rank, num_embeddings());
    detail::require_shape(where, "lora_embedding_B", B, dim(), config.rank);
    MatrixType a = A.template cast<Scalar>(), b = B.template cast<Scalar>();
    detail::require_finite(where, "lora_embedding_A", a);
    detail::require_finite(where, "lora_embedding_B", b);
    if (config.rank == rank()) {
      A_ = a;  // same shape: in place, views stay valid
      B_ = b;
      grad_A_.setZero();
      grad_B_.setZero();
    } else {
      MatrixType gA = MatrixType::Zero(a.rows(), a.cols()), gB = MatrixType::Zero(b.rows(), b.cols());
      A_.swap(a);
      B_.swap(b);
      grad_A_.swap(gA);
      grad_B_.swap(gB);
      a_lease_.retire();
      b_lease_.retire();
      ++guard_->layout;
    }
    config_ = config;
    scaling_ = static_cast<Scalar>(config.scaling());
    ++guard_->version;
    cached_ = false;
  }
  bool has_lora() const { return A_.rows() > 0; }
  Index rank() const { return A_.rows(); }
  Scalar scaling() const { return scaling_; }
  const std::string& adapter_name() const { return adapter_; }
  // The adapter's hyper-parameters (rank, alpha, use_rslora, init, seed, keep_original_weight).
  const LoraConfig& lora_config() const {
    if (!has_lora()) detail::fail("Embedding::lora_config", "the layer has no adapter");
    return config_;
  }

  // Checked views. A [r x num_embeddings], B [dim x r]; writes are refused while merged.
  ParamRef<Scalar> weight() { return ParamRef<Scalar>(weight_.data(), weight_.rows(), weight_.cols(), weight_lease_.guard()); }
  ParamRef<Scalar> lora_A() { return ParamRef<Scalar>(A_.data(), A_.rows(), A_.cols(), a_lease_.guard()); }
  ParamRef<Scalar> lora_B() { return ParamRef<Scalar>(B_.data(), B_.rows(), B_.cols(), b_lease_.guard()); }
  Eigen::Map<const MatrixType> weight() const { return Eigen::Map<const MatrixType>(weight_.data(), weight_.rows(), weight_.cols()); }
  Eigen::Map<const MatrixType> lora_A() const { return Eigen::Map<const MatrixType>(A_.data(), A_.rows(), A_.cols()); }
  Eigen::Map<const MatrixType> lora_B() const { return Eigen::Map<const MatrixType>(B_.data(), B_.rows(), B_.cols()); }
  // Replaces the table (same shape, finite; refused while merged).
  void set_weight(const Eigen::Ref<const MatrixType>& E) {
    constexpr const char* where = "Embedding::set_weight";
    detail::require_shape(where, "table", E, num_embeddings(), dim());
    detail::require_finite(where, "table", E);
    weight() = E;
  }
  const MatrixType& grad_weight() const { return grad_weight_; }
  const MatrixType& grad_lora_A() const { return grad_A_; }
  const MatrixType& grad_lora_B() const { return grad_B_; }

  // merge(): E += s (B A)^T, forward then reads E alone; unmerge() subtracts it (or, with
  // keep_original_weight, restores the kept table). Each requires the other state (an error otherwise)
  // and an adapter. merge() refuses, leaving E unchanged, when the merged table would hold NaN or Inf.
  void merge() {
    prepare_merge("Embedding::merge");
    commit_merge();
  }
  // prepare_merge() checks and computes everything merge() needs; commit_merge() then cannot fail;
  // cancel_merge() drops a prepared merge. The layer is unchanged until commit_merge() (how a model merges
  // all its layers or none).
  void prepare_merge(const char* where) {
    if (!has_lora()) detail::fail(where, "no adapter to merge");
    if (merged_) detail::fail(where, "already merged");
    cancel_merge();
    MatrixType delta(num_embeddings(), dim());
    delta.noalias() = scaling_ * A_.transpose() * B_.transpose();
    if (!(weight_ + delta).allFinite())
      detail::fail(where, "the merged table would contain NaN or Inf (adapter '", adapter_, "'); the table is left unchanged");
    MatrixType original;
    if (config_.keep_original_weight) original = weight_;
    delta_.swap(delta);
    prepared_original_.swap(original);
    prepared_ = true;
  }
  void commit_merge() noexcept {
    LORA_ASSERT(prepared_);
    weight_ += delta_;
    original_.swap(prepared_original_);
    merged_ = true;
    guard_->locked = "the embedding's adapter is merged: unmerge() first";
    ++guard_->version;
    cancel_merge();
  }
  void cancel_merge() noexcept {
    prepared_ = false;
    delta_.resize(0, 0);
    prepared_original_.resize(0, 0);
  }
  void unmerge() {
    if (!merged_) detail::fail("Embedding::unmerge", "not merged");
    if (original_.size() > 0) {
      weight_.swap(original_);
      original_.resize(0, 0);
    } else {
      weight_.noalias() -= scaling_ * A_.transpose() * B_.transpose();
    }
    merged_ = false;
    guard_->locked = nullptr;
    ++guard_->version;
  }
  bool merged() const { return merged_; }

  // "weight" when the table trains; "lora_embedding_A.<adapter>" / "lora_embedding_B.<adapter>" with an
  // adapter (roles lora_A / lora_B).
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) override {
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
  Index num_parameters() const override { return weight_.size() + A_.size() + B_.size(); }
  Index num_trainable_parameters() const override { return (trainable_ ? weight_.size() : 0) + A_.size() + B_.size(); }
  Index out_features() const override { return dim(); }  // in_features: -1, the ids have no width
  std::string type_name() const override { return "Embedding"; }
  std::string describe() const override {
    return detail::concat("Embedding(", num_embeddings(), ", ", dim(), has_lora() ? detail::concat(", lora r=", rank()) : "", ")");
  }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<Embedding>(*this); }

 private:
  // check_config: the adapter's hyper-parameters, as add_lora and set_lora require them.
  static void check_config(const char* where, const LoraConfig& config) {
    if (config.rank < 1) detail::fail(where, "r must be >= 1, got ", config.rank);
    if (!(config.alpha > 0) || !std::isfinite(config.alpha))
      detail::fail(where, "alpha must be positive and finite, got ", config.alpha);
    config.validate(where);
    if (config.dropout != 0)
      detail::fail(where, "lora_dropout = ", config.dropout, ": PEFT never applies dropout to an Embedding's adapter; "
                   "use 0");
  }

  MatrixType weight_, grad_weight_, A_, B_, grad_A_, grad_B_;
  Scalar scaling_ = 0;
  LoraConfig config_;
  std::string adapter_;
  MatrixType original_;                   // the table before merge(), with keep_original_weight
  MatrixType delta_, prepared_original_;  // a prepared merge
  bool prepared_ = false;
  bool trainable_ = false, merged_ = false, cached_ = false;
  detail::GuardHandle guard_;
  detail::TensorLease weight_lease_{guard_, "weight"}, a_lease_{guard_, "lora_embedding_A"}, b_lease_{guard_, "lora_embedding_B"};
  std::vector<Index> ids_;
  MatrixType output_, z_, dz_, no_gradient_;
};

using Embeddingf = Embedding<float>;
using Embeddingd = Embedding<double>;

}  // namespace lora::nn
