// lora.hpp: LoraLinear, a frozen linear layer plus low-rank adapters.
//
//   y = x W0^T + b + sum over active adapters i of  s_i (drop_i(x) A_i^T) B_i^T
//
// W0 [out x in] and b [out] are frozen (b trainable on request); each adapter has A_i [r_i x in]
// and B_i [out x r_i], and s_i = alpha_i / r_i (alpha_i / sqrt(r_i) with rsLoRA) times a runtime
// scale. W0 and every A_i live in one (out + sum r_i) x in row-major block, so views of W0 and of each
// A_i are rows of the same storage. The product B A is never formed, except by merge().
#pragma once

#include <lora/common.hpp>
#include <lora/config.hpp>
#include <lora/detail/gemm.hpp>
#include <lora/detail/kernels.hpp>
#include <lora/detail/random.hpp>
#include <lora/init.hpp>
#include <lora/parameter.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace lora {

template <class Scalar>
class LoraLinear {
  static_assert(is_supported_scalar_v<Scalar>,
                "LoraLinear<Scalar> supports float and double only; convert other types at the boundary.");

 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  // Rows of a row-major matrix: the views returned for W0 and A.
  using RowsView = Eigen::Block<MatrixType, Eigen::Dynamic, Eigen::Dynamic, true>;
  using ConstRowsView = Eigen::Block<const MatrixType, Eigen::Dynamic, Eigen::Dynamic, true>;

  static constexpr const char* default_adapter = "default";

  // W0 is [out x in]. The config's adapter is added under the name "default" and made active;
  // the config's per-layer fields (bias, keep_original_weight) apply to the whole layer.
  template <class DerivedW>
  explicit LoraLinear(const Eigen::MatrixBase<DerivedW>& W0, const LoraConfig& config = {})
      : LoraLinear(W0, VectorType(), false, config) {}

  // With a bias [out] (a row or column vector); it is trainable iff config.bias != BiasMode::none.
  template <class DerivedW, class DerivedB>
  LoraLinear(const Eigen::MatrixBase<DerivedW>& W0, const Eigen::MatrixBase<DerivedB>& bias,
             const LoraConfig& config = {})
      : LoraLinear(W0, check_bias(bias, W0.rows()), true, config) {}

  // ---- forward / backward ------------------------------------------------------------------------
  //
  // forward(X)
  //   requires: X is [n x in], n >= 1.
  //   ensures:  returns Y = X W0^T + b + sum_i s_i (drop_i(X) A_i^T) B_i^T, [n x out]. The reference
  //             stays valid until the next forward() on this layer. In training mode (the default),
  //             the input and the dropout masks are kept for backward(); in eval mode dropout is off
  //             and nothing is kept. When merged, Y = X W0'^T + b with W0' = W0 + sum s_i B_i A_i.
  //
  // backward(dY)
  //   requires: dY = dL/dY is [n x out] for the n of the most recent forward(), which ran in training
  //             mode on an unmerged layer.
  //   ensures:  returns dX = dL/dX [n x in] (assigned; valid until the next backward()). Accumulates
  //             (+=) into grad_A(i) and grad_B(i) for every active adapter i, and into grad_bias()
  //             when the bias is trainable. zero_grad() clears the accumulators.
  template <class Derived>
  const MatrixType& forward(const Eigen::MatrixBase<Derived>& X);

  template <class Derived>
  const MatrixType& backward(const Eigen::MatrixBase<Derived>& dY);

  void zero_grad();

  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool training() const { return training_; }

  // ---- merge --------------------------------------------------------------------------------------
  // merge(): W0 += sum over active adapters of s_i B_i A_i, in place; afterwards forward is one product.
  //   Throws if already merged, if no adapter is active, or if the result would contain NaN/Inf;
  //   on a throw W0 is exactly as before.
  // unmerge(): takes the merged deltas out again: bit-exact with keep_original_weight, otherwise by
  //   subtraction (a rounding drift of a few ulps per cycle; see the README).
  // While merged, backward() and changes to the adapter set throw: unmerge first.
  void merge();
  void unmerge();
  bool merged() const { return merged_; }

  // ---- adapters -----------------------------------------------------------------------------------
  // Adds an inactive adapter (its per-layer config fields are ignored). Names are non-empty, unique,
  // without '.'.
  void add_adapter(const std::string& name, const LoraConfig& config);
  void delete_adapter(const std::string& name);
  // Makes exactly these adapters active (an empty list leaves only the base).
  void set_active_adapters(const std::vector<std::string>& names);
  void set_active_adapter(const std::string& name) { set_active_adapters({name}); }
  std::vector<std::string> active_adapters() const;
  std::vector<std::string> adapter_names() const;
  bool has_adapter(const std::string& name) const { return find(name) >= 0; }
  // A runtime multiplier on top of alpha/r (PEFT's set_scale); 1 by default, any finite value.
  void set_adapter_scale(const std::string& name, double scale);
  double adapter_scale(const std::string& name) const { return adapter_at("adapter_scale", name).scale; }
  const LoraConfig& adapter_config(const std::string& name) const {
    return adapter_at("adapter_config", name).config;
  }

  // ---- accessors ----------------------------------------------------------------------------------
  // Without a name these refer to the single active adapter (they throw if none or several are active).
  RowsView A() { return A(only_active("LoraLinear::A")); }
  ConstRowsView A() const { return A(only_active("LoraLinear::A")); }
  MatrixType& B() { return B(only_active("LoraLinear::B")); }
  const MatrixType& B() const { return B(only_active("LoraLinear::B")); }
  const MatrixType& grad_A() const { return grad_A(only_active("LoraLinear::grad_A")); }
  const MatrixType& grad_B() const { return grad_B(only_active("LoraLinear::grad_B")); }
  double scaling() const { return scaling(only_active("LoraLinear::scaling")); }
  int rank() const { return rank(only_active("LoraLinear::rank")); }

  RowsView A(const std::string& name) {
    const Adapter& a = adapter_at("A", name);
    return weight_.middleRows(a.offset, a.config.rank);
  }
  ConstRowsView A(const std::string& name) const {
    const Adapter& a = adapter_at("A", name);
    return weight_.middleRows(a.offset, a.config.rank);
  }
  MatrixType& B(const std::string& name) { return adapter_at("B", name).B; }
  const MatrixType& B(const std::string& name) const { return adapter_at("B", name).B; }
  const MatrixType& grad_A(const std::string& name) const { return adapter_at("grad_A", name).grad_A; }
  const MatrixType& grad_B(const std::string& name) const { return adapter_at("grad_B", name).grad_B; }
  // alpha / r (or alpha / sqrt(r)), without the runtime scale.
  double scaling(const std::string& name) const { return adapter_at("scaling", name).config.scaling(); }
  int rank(const std::string& name) const { return adapter_at("rank", name).config.rank; }

  ConstRowsView base_weight() const { return weight_.topRows(out_features_); }
  bool has_bias() const { return has_bias_; }
  bool bias_trainable() const { return bias_trainable_; }
  const VectorType& bias() const { return bias_; }
  VectorType& bias_mut() {  // for optimizers, when the bias is trainable
    if (!bias_trainable_) detail::fail("LoraLinear::bias_mut", "the bias is frozen (config.bias == none or no bias)");
    return bias_;
  }
  const VectorType& grad_bias() const { return grad_bias_; }

  Index in_features() const { return in_features_; }
  Index out_features() const { return out_features_; }
  // r (in + out) for each active adapter, plus out when the bias trains.
  Index num_trainable_parameters() const;
  // out * in, plus out for a frozen bias.
  Index num_frozen_parameters() const {
    return out_features_ * in_features_ + (has_bias_ && !bias_trainable_ ? out_features_ : 0);
  }

  // Appends the trainable parameters, named PEFT style after `prefix` (e.g. "layers.2."):
  // "<prefix>lora_A.<adapter>.weight" and "<prefix>lora_B.<adapter>.weight" for each active adapter,
  // and "<prefix>bias" when the bias trains. Views: see Parameter.
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix = "");

  // Resets the dropout random streams of every adapter: the next masks are those drawn after
  // construction with the same seeds. Used to replay a forward with identical masks.
  void reset_dropout_rng();

 private:
  struct Adapter {
    std::string name;
    LoraConfig config;
    Index offset = 0;  // first row of A inside weight_
    MatrixType B, grad_A, grad_B;
    MatrixType dropout_mask;   // 0 or 1 / (1 - p) per input entry, of the last training forward
    MatrixType dropped_input;  // X * mask, the adapter's input
    MatrixType dropped_grad;   // workspace for the gradient through the mask
    detail::Random dropout_rng;
    double scale = 1;          // runtime multiplier
    double merged_scaling = 0; // the s used by the last merge, so unmerge subtracts the same
    bool active = false;
    bool merged = false;
    bool uses_dropout = false; // in the last forward
  };

  template <class DerivedW>
  LoraLinear(const Eigen::MatrixBase<DerivedW>& W0, VectorType bias, bool has_bias, const LoraConfig& config);

  template <class DerivedB>
  static VectorType check_bias(const Eigen::MatrixBase<DerivedB>& bias, Index out);

  void add_adapter_checked(const char* where, const std::string& name, const LoraConfig& config);
  void validate_adapter(const char* where, const std::string& name, const LoraConfig& config) const;
  void require_unmerged(const char* where) const {
    if (merged_) detail::fail(where, "the layer is merged; call unmerge() first");
  }
  std::ptrdiff_t find(const std::string& name) const;
  Adapter& adapter_at(const char* where, const std::string& name);
  const Adapter& adapter_at(const char* where, const std::string& name) const;
  std::string only_active(const char* where) const;
  Scalar effective_scaling(const Adapter& a) const { return static_cast<Scalar>(a.config.scaling() * a.scale); }

  // W0 += sign * sum over `which` adapters of s_i B_i A_i, checked: throws with W0 untouched if
  // the result would not be finite.
  template <class Select, class ScaleOf>
  void add_deltas(const char* where, Select which, ScaleOf scale_of, Scalar sign);

  Index in_features_ = 0, out_features_ = 0;
  MatrixType weight_;  // [W0; A_0; A_1; ...]: (out + sum r) x in
  VectorType bias_, grad_bias_;
  bool has_bias_ = false, bias_trainable_ = false, keep_original_ = false;
  std::vector<Adapter> adapters_;
  bool training_ = true, merged_ = false;
  Scalar base_max_abs_ = 0;  // max |W0|, kept current so merge can bound the result cheaply
  MatrixType original_;      // W0 before merge, with keep_original_weight

  // Below this batch size the products with W0 are matrix-vector-like: a row-parallel kernel reads W0
  // once on all threads instead of Eigen's single-threaded matrix-vector product.
  static constexpr Index small_batch = 8;
  // W^T for rows of weight_: the same storage read column-major.
  using ColMajorMap = Eigen::Map<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>>;

  // Rows [offset - out, offset - out + r) of scaled_Bt_ = s B^T for active adapters, 0 otherwise.
  void update_scaled_Bt();
  template <class Derived>
  const Scalar* plain_rows(const Eigen::MatrixBase<Derived>& M, MatrixType& copy) const;

  // Workspaces, reused across calls (resized only when n changes).
  MatrixType input_;  // X of the last training forward
  // T = [X A_0^T | X A_1^T | ...] (n x sum r) of the last forward, kept for backward.
  MatrixType lora_input_;
  MatrixType output_, scaled_Bt_, dT_, dBt_, grad_output_, grad_input_, merge_chunk_, merge_A_, merge_U_;
  detail::PackBuffer<Scalar> pack_;  // the rank-r kernels' packed panels
  detail::GemmBlocking<Scalar> forward_gemm_, backward_gemm_;  // the big products' packing buffers
  Index cached_rows_ = -1;  // n of the last training forward, -1 when nothing is cached
};

using LoraLinearf = LoraLinear<float>;
using LoraLineard = LoraLinear<double>;

// ===================================================================================================
// Implementation

template <class Scalar>
template <class DerivedB>
typename LoraLinear<Scalar>::VectorType LoraLinear<Scalar>::check_bias(const Eigen::MatrixBase<DerivedB>& bias,
                                                                        Index out) {
  constexpr const char* where = "LoraLinear::LoraLinear";
  if (bias.rows() != 1 && bias.cols() != 1)
    detail::fail(where, "bias must be a vector, got shape ", detail::shape_of(bias));
  if (bias.size() != out) detail::fail(where, "bias has ", bias.size(), " entries, expected out_features = ", out);
  VectorType b(bias.size());
  for (Index i = 0; i < bias.size(); ++i) b(i) = static_cast<Scalar>(bias.derived().reshaped()(i));
  detail::require_finite(where, "bias", b);  // checked after evaluation: the argument may be an expression
  return b;
}

template <class Scalar>
template <class DerivedW>
LoraLinear<Scalar>::LoraLinear(const Eigen::MatrixBase<DerivedW>& W0, VectorType bias, bool has_bias,
                               const LoraConfig& config)
    : in_features_(W0.cols()),
      out_features_(W0.rows()),
      bias_(std::move(bias)),
      has_bias_(has_bias),
      keep_original_(config.keep_original_weight) {
  constexpr const char* where = "LoraLinear::LoraLinear";
  if (W0.rows() == 0 || W0.cols() == 0) detail::fail(where, "W0 is empty (", detail::shape_of(W0), ")");
  weight_ = W0.template cast<Scalar>();
  detail::require_finite(where, "W0", weight_);  // checked after evaluation: W0 may be an expression
  bias_trainable_ = has_bias_ && config.bias != BiasMode::none;
  if (bias_trainable_) grad_bias_ = VectorType::Zero(out_features_);
  base_max_abs_ = weight_.cwiseAbs().maxCoeff();
  add_adapter_checked(where, default_adapter, config);
  adapters_.front().active = true;
}

template <class Scalar>
void LoraLinear<Scalar>::validate_adapter(const char* where, const std::string& name,
                                          const LoraConfig& config) const {
  if (name.empty()) detail::fail(where, "adapter name is empty");
  if (name.find('.') != std::string::npos)
    detail::fail(where, "adapter name '", name, "' contains '.', which separates parameter names");
  if (find(name) >= 0) detail::fail(where, "an adapter named '", name, "' already exists");
  config.validate(where);
  const Index max_rank = std::min(in_features_, out_features_);
  if (config.rank > max_rank)
    detail::fail(where, "rank must be <= min(in_features, out_features) = ", max_rank, ", got ", config.rank);
}

template <class Scalar>
void LoraLinear<Scalar>::add_adapter(const std::string& name, const LoraConfig& config) {
  add_adapter_checked("LoraLinear::add_adapter", name, config);
}

template <class Scalar>
void LoraLinear<Scalar>::add_adapter_checked(const char* where, const std::string& name, const LoraConfig& config) {
  require_unmerged(where);
  validate_adapter(where, name, config);
  const Index r = config.rank;
  Adapter a;
  a.name = name;
  a.config = config;
  a.offset = weight_.rows();
  a.B.resize(out_features_, r);
  a.grad_A = MatrixType::Zero(r, in_features_);
  a.grad_B = MatrixType::Zero(out_features_, r);
  a.dropout_rng.seed(config.seed ^ 0x9e3779b97f4a7c15ULL);  // a stream apart from the init draws
  MatrixType A(r, in_features_);
  init_adapter(A, a.B, config);
  weight_.conservativeResize(weight_.rows() + r, Eigen::NoChange);
  weight_.bottomRows(r) = A;
  adapters_.push_back(std::move(a));
  cached_rows_ = -1;
}

template <class Scalar>
void LoraLinear<Scalar>::delete_adapter(const std::string& name) {
  constexpr const char* where = "LoraLinear::delete_adapter";
  require_unmerged(where);
  const std::ptrdiff_t k = find(name);
  if (k < 0) adapter_at(where, name);  // throws with the list of names
  const Adapter& gone = adapters_[static_cast<std::size_t>(k)];
  const Index r = gone.config.rank, offset = gone.offset, tail = weight_.rows() - offset - r;
  // Shift the rows after the deleted A up, then shrink (row-major: rows are contiguous).
  for (Index i = 0; i < tail; ++i) weight_.row(offset + i) = weight_.row(offset + r + i);
  weight_.conservativeResize(weight_.rows() - r, Eigen::NoChange);
  adapters_.erase(adapters_.begin() + k);
  for (Adapter& a : adapters_)
    if (a.offset > offset) a.offset -= r;
  cached_rows_ = -1;
}

template <class Scalar>
void LoraLinear<Scalar>::set_active_adapters(const std::vector<std::string>& names) {
  constexpr const char* where = "LoraLinear::set_active_adapters";
  require_unmerged(where);
  for (const std::string& n : names) adapter_at(where, n);  // validate all before changing anything
  for (Adapter& a : adapters_) a.active = std::find(names.begin(), names.end(), a.name) != names.end();
  cached_rows_ = -1;
}

template <class Scalar>
std::vector<std::string> LoraLinear<Scalar>::active_adapters() const {
  std::vector<std::string> names;
  for (const Adapter& a : adapters_)
    if (a.active) names.push_back(a.name);
  return names;
}

template <class Scalar>
std::vector<std::string> LoraLinear<Scalar>::adapter_names() const {
  std::vector<std::string> names;
  for (const Adapter& a : adapters_) names.push_back(a.name);
  return names;
}

template <class Scalar>
void LoraLinear<Scalar>::set_adapter_scale(const std::string& name, double scale) {
  constexpr const char* where = "LoraLinear::set_adapter_scale";
  require_unmerged(where);
  if (!std::isfinite(scale)) detail::fail(where, "scale must be finite, got ", scale);
  adapter_at(where, name).scale = scale;
}

template <class Scalar>
std::ptrdiff_t LoraLinear<Scalar>::find(const std::string& name) const {
  for (std::size_t i = 0; i < adapters_.size(); ++i)
    if (adapters_[i].name == name) return static_cast<std::ptrdiff_t>(i);
  return -1;
}

template <class Scalar>
const typename LoraLinear<Scalar>::Adapter& LoraLinear<Scalar>::adapter_at(const char* where,
                                                                          const std::string& name) const {
  const std::ptrdiff_t k = find(name);
  if (k < 0) {
    std::string known;
    for (const Adapter& a : adapters_) known += (known.empty() ? "'" : ", '") + a.name + "'";
    detail::fail(where, "no adapter named '", name, "'; the layer has ", known.empty() ? "none" : known);
  }
  return adapters_[static_cast<std::size_t>(k)];
}

template <class Scalar>
typename LoraLinear<Scalar>::Adapter& LoraLinear<Scalar>::adapter_at(const char* where, const std::string& name) {
  return const_cast<Adapter&>(std::as_const(*this).adapter_at(where, name));
}

template <class Scalar>
std::string LoraLinear<Scalar>::only_active(const char* where) const {
  const std::vector<std::string> names = active_adapters();
  if (names.size() != 1)
    detail::fail(where, "without an adapter name this needs exactly one active adapter, but ", names.size(),
                 " are active; pass the adapter's name");
  return names.front();
}

template <class Scalar>
Index LoraLinear<Scalar>::num_trainable_parameters() const {
  Index n = bias_trainable_ ? out_features_ : 0;
  for (const Adapter& a : adapters_)
    if (a.active) n += a.config.rank * (in_features_ + out_features_);
  return n;
}

template <class Scalar>
void LoraLinear<Scalar>::collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) {
  for (Adapter& a : adapters_) {
    if (!a.active) continue;
    out.push_back({prefix + "lora_A." + a.name + ".weight", ParameterRole::lora_A,
                   detail::parameter_view(weight_.middleRows(a.offset, a.config.rank)),
                   detail::parameter_view(a.grad_A)});
    out.push_back({prefix + "lora_B." + a.name + ".weight", ParameterRole::lora_B, detail::parameter_view(a.B),
                   detail::parameter_view(a.grad_B)});
  }
  if (bias_trainable_)
    out.push_back({prefix + "bias", ParameterRole::bias, detail::parameter_view(bias_),
                   detail::parameter_view(grad_bias_)});
}

template <class Scalar>
void LoraLinear<Scalar>::reset_dropout_rng() {
  for (Adapter& a : adapters_) a.dropout_rng.seed(a.config.seed ^ 0x9e3779b97f4a7c15ULL);
}

template <class Scalar>
void LoraLinear<Scalar>::zero_grad() {
  for (Adapter& a : adapters_) {
    a.grad_A.setZero();
    a.grad_B.setZero();
  }
  if (bias_trainable_) grad_bias_.setZero();
}

template <class Scalar>
template <class Derived>
const Scalar* LoraLinear<Scalar>::plain_rows(const Eigen::MatrixBase<Derived>& M, MatrixType& copy) const {
  // The kernels read contiguous rows: a row-major matrix, Map or Ref with packed rows is read in place;
  // any other layout or expression is evaluated into a workspace.
  if constexpr (bool(Derived::Flags & Eigen::DirectAccessBit) && bool(Derived::Flags & Eigen::RowMajorBit)) {
    const Derived& d = M.derived();
    if (d.innerStride() == 1 && (d.outerStride() == d.cols() || d.rows() == 1)) return d.data();
  }
  copy = M;
  return copy.data();
}

template <class Scalar>
void LoraLinear<Scalar>::update_scaled_Bt() {
  scaled_Bt_.resize(weight_.rows() - out_features_, out_features_);
  for (const Adapter& a : adapters_) {
    auto rows = scaled_Bt_.middleRows(a.offset - out_features_, a.config.rank);
    if (a.active)
      rows.noalias() = effective_scaling(a) * a.B.transpose();
    else
      rows.setZero();
  }
}

template <class Scalar>
template <class Derived>
const typename LoraLinear<Scalar>::MatrixType& LoraLinear<Scalar>::forward(const Eigen::MatrixBase<Derived>& X) {
  static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                "LoraLinear::forward: the input's Scalar must match the layer's; cast it first.");
  constexpr const char* where = "LoraLinear::forward";
  detail::require_cols(where, "input", X, in_features_, "in_features");
  if (X.rows() == 0) detail::fail(where, "input has 0 rows");
  const Index n = X.rows(), in = in_features_, out = out_features_, R = weight_.rows() - out_features_;
  const bool keep = training_ && !merged_;

  // backward needs X: keep a copy (no allocation when n is unchanged)
  const Scalar* x = keep ? (input_ = X, input_.data()) : plain_rows(X, input_);
  const Eigen::Map<const MatrixType> Xm(x, n, in);
  output_.resize(n, out);

  if (merged_) {
    if (n <= small_batch)
      detail::row_dots(n, out, in, x, in, weight_.data(), in, output_.data(), out);
    else
      detail::gemm(forward_gemm_, Xm, ColMajorMap(weight_.data(), in, out), output_);
    if (has_bias_) output_.rowwise() += bias_.transpose();
    cached_rows_ = -1;
    return output_;
  }

  // Y0 = X W0^T straight into the output (the big product), T = X A^T by the rank-r kernel. One product
  // over [W0; A] into an n x (out + R) buffer reads X once but costs a second n x out buffer per layer.
  lora_input_.resize(n, R);
  if (n <= small_batch)
    detail::row_dots(n, out, in, x, in, weight_.data(), in, output_.data(), out);
  else
    detail::gemm(forward_gemm_, Xm, ColMajorMap(weight_.data(), in, out), output_);
  detail::row_dots(n, R, in, x, in, weight_.data() + out * in, in, lora_input_.data(), R);

  for (Adapter& a : adapters_) {
    a.uses_dropout = false;
    if (!a.active || !training_ || a.config.dropout <= 0) continue;
    // Inverted dropout on the adapter's input: keep with probability 1 - p, scale by 1 / (1 - p).
    a.uses_dropout = true;
    const double p = a.config.dropout;
    const Scalar keep_scale = static_cast<Scalar>(1.0 / (1.0 - p));
    a.dropout_mask.resize(n, in);
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < in; ++j) a.dropout_mask(i, j) = a.dropout_rng.uniform() < p ? Scalar(0) : keep_scale;
    a.dropped_input.resize(n, in);
    a.dropped_input = input_.cwiseProduct(a.dropout_mask);
    lora_input_.middleCols(a.offset - out, a.config.rank).noalias() =
        a.dropped_input * weight_.middleRows(a.offset, a.config.rank).transpose();
  }

  // Y = Y0 + b + T (s B^T) in one pass over the output; inactive adapters have zero rows in s B^T.
  update_scaled_Bt();
  auto epilogue = detail::in_place_update(n, out, R, lora_input_.data(), R, Index(1), scaled_Bt_.data(), out,
                                          output_.data(), out);
  epilogue.col_add = has_bias_ ? bias_.data() : nullptr;
  detail::rank_update(epilogue, pack_);
  cached_rows_ = keep ? n : -1;
  return output_;
}

template <class Scalar>
template <class Derived>
const typename LoraLinear<Scalar>::MatrixType& LoraLinear<Scalar>::backward(const Eigen::MatrixBase<Derived>& dY) {
  static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                "LoraLinear::backward: the gradient's Scalar must match the layer's; cast it first.");
  constexpr const char* where = "LoraLinear::backward";
  require_unmerged(where);
  if (cached_rows_ < 0)
    detail::fail(where, "no cached input: call forward() in training mode (train()) before backward(), "
                        "and again after changing the adapter set");
  detail::require_shape(where, "grad_output", dY, cached_rows_, out_features_);
  const Index n = cached_rows_, in = in_features_, out = out_features_, R = weight_.rows() - out_features_;
  const Scalar* dy = plain_rows(dY, grad_output_);
  const Eigen::Map<const MatrixType> dYm(dy, n, out);

  if (bias_trainable_) grad_bias_.noalias() += dYm.colwise().sum().transpose();
  update_scaled_Bt();
  dT_.resize(n, R);
  dBt_.resize(R, out);
  grad_input_.resize(n, in);
  // the one big product: dY W0
  detail::gemm(backward_gemm_, dYm, Eigen::Map<const MatrixType>(weight_.data(), out, in), grad_input_);
  for (Adapter& a : adapters_) {
    if (!a.active) continue;
    const Index r = a.config.rank, col = a.offset - out;
    const Scalar s = effective_scaling(a);
    const Scalar* A = weight_.data() + a.offset * in;
    // The four rank-r products in one parallel region with one barrier:
    //   phase 1, rows of dY:    dT = s dY B (= dY (s B^T)^T), then dX += dT A on the same rows;
    //            columns of dY: dB^T = s T^T dY (wide rows; added transposed below);
    //   phase 2, columns of X:  dA += dT^T X (needs every row of dT).
    // dB^T = s T^T dY (assigned: base 0), T(i, k) = lora_input_(i, col + k); dA += dT^T X; dX += dT A
    auto db = detail::in_place_update(r, out, n, lora_input_.data() + col, Index(1), R, dy, out,
                                      dBt_.data() + col * out, out, s);
    db.base = nullptr;
    const auto da = detail::in_place_update(r, in, n, dT_.data() + col, Index(1), R,
                                            a.uses_dropout ? a.dropped_input.data() : input_.data(), in,
                                            a.grad_A.data(), in);
    const auto dx = detail::in_place_update(n, in, r, dT_.data() + col, R, Index(1), A, in, grad_input_.data(), in);

    const bool fused_dx = !a.uses_dropout;
    constexpr Index nr = detail::kernel::nr<Scalar>;
    const int threads = detail::threads_for(static_cast<double>(n * r * (2 * in + 2 * out)));
    // pack_: A's panels for dX (shared), then one block per thread for dB and dA
    const Index a_panels = detail::kernel::panel_size<Scalar>(r, in);
    const Index per_thread = detail::kernel::columns_pack_size<Scalar>();
    if (pack_.size() < a_panels + threads * per_thread) pack_.resize(a_panels + threads * per_thread);
    if (fused_dx) detail::kernel::pack_panels(A, in, Index(r), Index(0), in, pack_.data());
    detail::parallel_region(threads, [&](int t, int nt) {
      Scalar* pack = pack_.data() + a_panels + t * per_thread;
      const auto rows = detail::split(n, detail::kernel::MR, t, nt);
      detail::kernel::row_dots_block(out, dy, out, scaled_Bt_.data() + col * out, out, dT_.data() + col, R, Scalar(1),
                                     rows.first, rows.second, Index(0), r);
      if (fused_dx && rows.first < rows.second)
        detail::kernel::rank_update_panels<false>(dx, pack_.data(), 0, 0, r, true, rows.first, rows.second, 0, in);
      const auto out_cols = detail::split(out, nr, t, nt);
      if (out_cols.first < out_cols.second)
        detail::kernel::rank_update_columns<false>(db, pack, out_cols.first, out_cols.second);
      detail::barrier();
      const auto in_cols = detail::split(in, nr, t, nt);
      if (in_cols.first < in_cols.second)
        detail::kernel::rank_update_columns<false>(da, pack, in_cols.first, in_cols.second);
    });
    a.grad_B.noalias() += dBt_.middleRows(col, r).transpose();
    if (a.uses_dropout) {
      const auto dT = dT_.middleCols(col, r);
      a.dropped_grad.resize(n, in);
      a.dropped_grad.noalias() = dT * weight_.middleRows(a.offset, r);
      grad_input_ += a.dropped_grad.cwiseProduct(a.dropout_mask);  // through the mask
    }
  }
  return grad_input_;
}

template <class Scalar>
template <class Select, class ScaleOf>
void LoraLinear<Scalar>::add_deltas(const char* where, Select which, ScaleOf scale_of, Scalar sign) {
  // A cheap bound decides whether the in-place pass can overflow: |W0 + d| <= max|W0| + sum |s| max_i
  // ||B_i||_1 max|A|. If it might, a read-only pass checks every result first, so W0 is never half-merged.
  double bound = static_cast<double>(base_max_abs_);
  for (const Adapter& a : adapters_) {
    if (!which(a)) continue;
    const auto A = weight_.middleRows(a.offset, a.config.rank);
    if (!A.allFinite()) detail::fail(where, "adapter '", a.name, "': A contains NaN or Inf; W0 left unchanged");
    if (!a.B.allFinite()) detail::fail(where, "adapter '", a.name, "': B contains NaN or Inf; W0 left unchanged");
    bound += std::abs(static_cast<double>(scale_of(a))) *
             static_cast<double>(a.B.cwiseAbs().rowwise().sum().maxCoeff()) *
             static_cast<double>(A.cwiseAbs().maxCoeff());
  }
  const bool may_overflow = !(bound < 0.25 * static_cast<double>(std::numeric_limits<Scalar>::max()));

  const Index rows_per_chunk = std::max<Index>(1, 16384 / in_features_);
  auto W0 = weight_.topRows(out_features_);
  auto apply_chunk = [&](Index r0, Index rc, auto&& dst) {
    for (const Adapter& a : adapters_) {
      if (!which(a)) continue;
      const auto A = weight_.middleRows(a.offset, a.config.rank);
      dst.noalias() += (sign * static_cast<Scalar>(scale_of(a)) * a.B.middleRows(r0, rc)) * A;
    }
  };
  if (may_overflow) {
    merge_chunk_.resize(rows_per_chunk, in_features_);
    for (Index r0 = 0; r0 < out_features_; r0 += rows_per_chunk) {
      const Index rc = std::min(rows_per_chunk, out_features_ - r0);
      auto tmp = merge_chunk_.topRows(rc);
      tmp = W0.middleRows(r0, rc);
      apply_chunk(r0, rc, tmp);
      if (!tmp.allFinite())
        detail::fail(where, "the merged weight would contain NaN or Inf (first in rows ", r0, "..", r0 + rc - 1,
                     "); W0 left unchanged");
    }
  }
  // One pass over W0: W0 += [sign s_i B_i ...] [A_i; ...] as one rank-(sum r_i) update, which also
  // returns the new max |W0|.
  Index K = 0;
  for (const Adapter& a : adapters_)
    if (which(a)) K += a.config.rank;
  merge_A_.resize(K, in_features_);
  merge_U_.resize(out_features_, K);
  K = 0;
  for (const Adapter& a : adapters_) {
    if (!which(a)) continue;
    const Index r = a.config.rank;
    merge_A_.middleRows(K, r) = weight_.middleRows(a.offset, r);
    merge_U_.middleCols(K, r) = (sign * static_cast<Scalar>(scale_of(a))) * a.B;
    K += r;
  }
  base_max_abs_ = detail::rank_update<true>(
      detail::in_place_update(out_features_, in_features_, K, merge_U_.data(), K, Index(1), merge_A_.data(),
                              in_features_, W0.data(), in_features_),
      pack_);
}

template <class Scalar>
void LoraLinear<Scalar>::merge() {
  constexpr const char* where = "LoraLinear::merge";
  if (merged_) detail::fail(where, "the layer is already merged");
  if (active_adapters().empty()) detail::fail(where, "no active adapter to merge");
  if (keep_original_) original_ = weight_.topRows(out_features_);
  add_deltas(
      where, [](const Adapter& a) { return a.active; },
      [this](const Adapter& a) { return effective_scaling(a); }, Scalar(1));
  for (Adapter& a : adapters_) {
    a.merged = a.active;
    a.merged_scaling = a.active ? static_cast<double>(effective_scaling(a)) : 0.0;
  }
  merged_ = true;
  cached_rows_ = -1;
}

template <class Scalar>
void LoraLinear<Scalar>::unmerge() {
  constexpr const char* where = "LoraLinear::unmerge";
  if (!merged_) detail::fail(where, "the layer is not merged");
  if (keep_original_) {
    weight_.topRows(out_features_) = original_;
    base_max_abs_ = original_.cwiseAbs().maxCoeff();
  } else {
    add_deltas(
        where, [](const Adapter& a) { return a.merged; }, [](const Adapter& a) { return a.merged_scaling; },
        Scalar(-1));
  }
  for (Adapter& a : adapters_) a.merged = false;
  merged_ = false;
}

}  // namespace lora
