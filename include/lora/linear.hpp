// lora.hpp: LoraLinear, a frozen base layer plus named low-rank adapters.
//
//   y = x W0^T + b + sum over active adapters i of  s_i (drop_i(x) A_i^T) B_i^T
//
// The frozen base (W0 [out x in]) is a FrozenBase held by shared pointer: one base can serve several layers
// and models. Each adapter keeps its own A_i [r_i x in] and B_i [out x r_i]; adding or deleting one never
// touches W0 or the other adapters. s_i = alpha_i / r_i (alpha_i / sqrt(r_i) with rsLoRA) times a runtime
// scale. The bias b is the layer's own copy (trainable on request). The formulas are in lora/math.hpp.
//
// Threads: the training API (forward, backward, merge, every setter) changes the layer and needs exclusive
// access. infer() is const and uses only a workspace the caller owns: any number of threads may call it on
// one layer at once, while nothing changes the layer.
#pragma once

#include <lora/base.hpp>
#include <lora/common.hpp>
#include <lora/config.hpp>
#include <lora/detail/kernels.hpp>
#include <lora/detail/random.hpp>
#include <lora/init.hpp>
#include <lora/math.hpp>
#include <lora/parameter.hpp>
#include <lora/transient.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lora {

// The buffers of one inference call sequence: one per thread, reused across calls and across layers of
// the same shape (a call resizes what it needs; a steady state allocates nothing).
template <class Scalar>
struct InferenceWorkspace {
  Matrix<Scalar> output;   // the result of infer()
  Matrix<Scalar> staging;  // the input, when it cannot be read in place
  ForwardWorkspace<Scalar> forward;
  std::vector<AdapterTerm<Scalar>> terms;
  // mixed batches
  Matrix<Scalar> group_input, group_T, group_update;
};

template <class Scalar>
class LoraLinear {
  static_assert(is_supported_scalar_v<Scalar>,
                "LoraLinear<Scalar> supports float and double only; convert other types at the boundary.");

 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  using BasePtr = std::shared_ptr<const FrozenBase<Scalar>>;
  using ConstMap = Eigen::Map<const MatrixType>;
  using ConstVectorMap = Eigen::Map<const VectorType>;

  static constexpr const char* default_adapter = "default";

  // Over a copy of W0 [out x in] (and a bias [out], a row or column vector), owned by this layer. The
  // config's adapter is added under the name "default" and made active; its per-layer fields (bias,
  // keep_original_weight) apply to the whole layer.
  template <class DerivedW>
  explicit LoraLinear(const Eigen::MatrixBase<DerivedW>& W0, const LoraConfig& config = {})
      : LoraLinear(own_base("LoraLinear::LoraLinear", W0), config, true) {}
  template <class DerivedW, class DerivedB>
  LoraLinear(const Eigen::MatrixBase<DerivedW>& W0, const Eigen::MatrixBase<DerivedB>& bias, const LoraConfig& config = {})
      : LoraLinear(own_base("LoraLinear::LoraLinear", W0, bias), config, true) {}
  // Over a base that others may share (make_base, borrow_base, a quantized base): nothing is copied.
  explicit LoraLinear(BasePtr base, const LoraConfig& config = {}) : LoraLinear(std::move(base), config, false) {}

  // Copies share the base and copy the adapters; views of the original do not reach the copy.
  LoraLinear(const LoraLinear& other);
  LoraLinear& operator=(const LoraLinear& other);
  LoraLinear(LoraLinear&&) = default;
  LoraLinear& operator=(LoraLinear&&) = default;
  ~LoraLinear() = default;

  // ---- training API --------------------------------------------------------------------------------
  //
  // forward(X)
  //   requires: X is [n x in], n >= 1 (any Eigen expression of this Scalar, either storage order; it may
  //             alias the layer's own output).
  //   ensures:  returns Y = X W0^T + b + sum_i s_i (drop_i(X) A_i^T) B_i^T, [n x out], valid until the next
  //             forward(). In training mode (the default) the input and dropout masks are kept for
  //             backward(); in eval mode dropout is off and nothing is kept. Merged: Y = X W0'^T + b,
  //             W0' = W0 + sum s_i B_i A_i. On a throw, nothing is cached (backward() throws).
  //
  // backward(dY)
  //   requires: dY = dL/dY [n x out] for the n of the most recent forward(), which ran in training mode on
  //             an unmerged layer, with nothing changed since (adapters, their values, scales, bias, base).
  //   ensures:  returns dX = dL/dX [n x in] (assigned; valid until the next backward()). Accumulates (+=)
  //             into grad_A(i) and grad_B(i) of every active adapter i, and into grad_bias() when the bias
  //             is trainable. zero_grad() clears the accumulators.
  template <class Derived>
  const MatrixType& forward(const Eigen::MatrixBase<Derived>& X);
  template <class Derived>
  const MatrixType& backward(const Eigen::MatrixBase<Derived>& dY);
  void zero_grad();

  // share_transient_buffers(other): this layer uses other's output, dX and dY staging buffers (not the
  // input and masks forward keeps for backward); nullptr gives it buffers of its own again. Afterwards
  // a result of either layer is valid only until the next forward() (backward()) of either: for layers
  // that run in turn and whose results are read before the other one runs (see TransientBuffers).
  void share_transient_buffers(LoraLinear* other) {
    transient_.share(other ? &other->transient_ : nullptr);
  }

  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool training() const { return training_; }

  // ---- inference API (const, thread-safe) -----------------------------------------------------------
  // infer(X, work): Y = X W0^T + b + the active adapters' terms (no dropout; merged: the merged weight),
  // in work.output. infer(X, work, adapters): the same with exactly the named adapters (each with its
  // runtime scale; an empty list gives the base), whatever the active set is; unmerged layers only.
  // infer(X, work, plan): a mixed batch, each row with the adapter plan names for it (mixed_batch.hpp).
  template <class Derived>
  const MatrixType& infer(const Eigen::MatrixBase<Derived>& X, InferenceWorkspace<Scalar>& work) const;
  // With skip_missing, names this layer does not have are left out instead of throwing (in a model,
  // layers an adapter does not target).
  template <class Derived>
  const MatrixType& infer(const Eigen::MatrixBase<Derived>& X, InferenceWorkspace<Scalar>& work,
                          const std::vector<std::string>& adapters, bool skip_missing = false) const;

  // ---- merge ----------------------------------------------------------------------------------------
  // merge(): W0' = W0 + sum over active adapters of s_i B_i A_i; afterwards forward is one product. When
  //   this layer is the only holder of a base it owns, W0 is updated in place; a shared or borrowed base
  //   is never written: the merged weight is then a private copy (its memory is freed by unmerge()).
  //   Throws if already merged, if no adapter is active, or if the result would contain NaN/Inf; on a
  //   throw nothing has changed.
  // unmerge(): the base weight again: exact for a private copy and with keep_original_weight, otherwise
  //   by subtraction of the same deltas (a rounding drift of a few ulps; see the README).
  // While merged, backward(), writes through A(), B() and parameter lists, and changes to the adapters
  // throw: unmerge first.
  void merge();
  void unmerge();
  bool merged() const { return merged_; }

  // Two-phase merge for a set of layers that must merge all or none (merge_adapters):
  // prepare_merge() checks and allocates everything the merge needs and returns false when there is
  // nothing to merge (no active adapter); commit_merge() then cannot fail; cancel_merge() drops a prepared
  // merge. The layer is unchanged until commit_merge().
  bool prepare_merge(const char* where);
  void commit_merge() noexcept;
  void cancel_merge() noexcept;

  // ---- adapters -------------------------------------------------------------------------------------
  // Adds an inactive adapter (its per-layer config fields are ignored). Names are non-empty, unique,
  // without '.'. Any rank >= 1 (as PEFT, also above min(in, out)).
  void add_adapter(const std::string& name, const LoraConfig& config);
  void delete_adapter(const std::string& name);
  // Makes exactly these adapters active (an empty list leaves only the base).
  void set_active_adapters(const std::vector<std::string>& names);
  void set_active_adapter(const std::string& name) { set_active_adapters({name}); }
  std::vector<std::string> active_adapters() const;
  std::vector<std::string> adapter_names() const;
  bool has_adapter(const std::string& name) const { return find(name) != nullptr; }
  // A runtime multiplier on top of alpha/r (PEFT's set_scale); 1 by default, any finite value.
  void set_adapter_scale(const std::string& name, double scale);
  double adapter_scale(const std::string& name) const { return at("LoraLinear::adapter_scale", name).scale; }
  const LoraConfig& adapter_config(const std::string& name) const { return at("LoraLinear::adapter_config", name).config; }
  // Replaces an adapter's A [r x in] and B [out x r] at once (checked: shapes, finite values), keeping its
  // config, active flag and runtime scale. Unmerged layers only.
  template <class DerivedA, class DerivedB>
  void set_adapter_weights(const std::string& name, const Eigen::MatrixBase<DerivedA>& A,
                           const Eigen::MatrixBase<DerivedB>& B);

  // Replaces adapter `name` by a new one with this config (its per-layer fields ignored) and these weights,
  // keeping its active flag and runtime scale; views of the old one stop working. On a throw the layer is
  // unchanged.
  template <class DerivedA, class DerivedB>
  void replace_adapter(const std::string& name, const LoraConfig& config, const Eigen::MatrixBase<DerivedA>& A,
                       const Eigen::MatrixBase<DerivedB>& B);

  // ---- accessors ------------------------------------------------------------------------------------
  // Without a name these refer to the single active adapter (they throw if none or several are active).
  // A() and B() of a non-const layer are fixed-shape checked views (ParamRef): they read like matrices;
  // assigning another shape, or writing while merged, throws.
  ParamRef<Scalar> A() { return A(only_active("LoraLinear::A")); }
  ConstMap A() const { return A(only_active("LoraLinear::A")); }
  ParamRef<Scalar> B() { return B(only_active("LoraLinear::B")); }
  ConstMap B() const { return B(only_active("LoraLinear::B")); }
  ConstMap grad_A() const { return grad_A(only_active("LoraLinear::grad_A")); }
  ConstMap grad_B() const { return grad_B(only_active("LoraLinear::grad_B")); }
  double scaling() const { return scaling(only_active("LoraLinear::scaling")); }
  int rank() const { return rank(only_active("LoraLinear::rank")); }

  ParamRef<Scalar> A(const std::string& name) { return view(at("LoraLinear::A", name).A, at("LoraLinear::A", name).lease_A); }
  ConstMap A(const std::string& name) const { return cview(at("LoraLinear::A", name).A); }
  ParamRef<Scalar> B(const std::string& name) { return view(at("LoraLinear::B", name).B, at("LoraLinear::B", name).lease_B); }
  ConstMap B(const std::string& name) const { return cview(at("LoraLinear::B", name).B); }
  ConstMap grad_A(const std::string& name) const { return cview(at("LoraLinear::grad_A", name).grad_A); }
  ConstMap grad_B(const std::string& name) const { return cview(at("LoraLinear::grad_B", name).grad_B); }
  // alpha / r (or alpha / sqrt(r)), without the runtime scale.
  double scaling(const std::string& name) const { return at("LoraLinear::scaling", name).config.scaling(); }
  int rank(const std::string& name) const { return at("LoraLinear::rank", name).config.rank; }

  // The frozen base (while merged in place, it holds the merged weight).
  const FrozenBase<Scalar>& base() const { return *base_; }
  // The base as a shared pointer, to build other layers over it. Throws while merged in place.
  BasePtr shared_base() const;
  // Replaces the base (same shape; unmerged layers only); the adapters and the layer's bias are kept.
  void set_base(BasePtr base);
  // The weight forward uses, dense [out x in]: W0, or W0' while merged. Throws for a non-dense base.
  ConstMap base_weight() const;

  bool has_bias() const { return has_bias_; }
  bool bias_trainable() const { return bias_trainable_; }
  // Trainability (PyTorch's requires_grad) of the active adapters' A and B, and of the bias (ignored
  // without one). W0 is the frozen base and never trains. A frozen adapter still applies in forward and
  // still passes gradients to the input; its A and B are left out of parameter lists. Parameter lists
  // made before a change are stale (their use throws). Unmerged layers only.
  void set_trainable(bool adapters, bool bias);
  bool adapters_trainable() const { return adapters_trainable_; }
  // The layer's bias [out] (empty without one).
  ConstVectorMap bias() const { return ConstVectorMap(bias_.data(), bias_.size()); }
  // A checked writable view of the bias [out x 1], when it is trainable.
  ParamRef<Scalar> bias_mut();
  // Replaces the bias values (the layer must have a bias; shape and finiteness checked).
  template <class Derived>
  void set_bias(const Eigen::MatrixBase<Derived>& bias);
  ConstVectorMap grad_bias() const { return ConstVectorMap(grad_bias_.data(), grad_bias_.size()); }

  Index in_features() const { return base_->in_features(); }
  Index out_features() const { return base_->out_features(); }
  // r (in + out) for each active adapter, plus out when the bias trains.
  Index num_trainable_parameters() const;
  // out * in, plus out for a frozen bias, plus the active adapters while they are frozen.
  Index num_frozen_parameters() const {
    Index n = out_features() * in_features() + (has_bias_ && !bias_trainable_ ? out_features() : 0);
    if (!adapters_trainable_)
      for (const AdapterPtr& a : adapters_)
        if (a->active) n += a->config.rank * (in_features() + out_features());
    return n;
  }

  // Appends the trainable parameters, named PEFT style after `prefix` (e.g. "layers.2."):
  // "<prefix>lora_A.<adapter>.weight" and "<prefix>lora_B.<adapter>.weight" for each active adapter,
  // and "<prefix>bias" when the bias trains. See Parameter for what an entry guards.
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix = "");

  // Resets the dropout random streams of every adapter: the next masks are those drawn after
  // construction with the same seeds. Used to replay a forward with identical masks.
  void reset_dropout_rng();

 private:
  struct Adapter {
    Adapter(const detail::GuardHandle& guard, std::string adapter_name, const LoraConfig& c)
        : name(std::move(adapter_name)),
          config(c),
          lease_A(guard, "lora_A." + name),
          lease_B(guard, "lora_B." + name) {}
    std::string name;
    LoraConfig config;
    MatrixType A, B, grad_A, grad_B;
    detail::Random dropout_rng;
    double scale = 1;  // runtime multiplier
    bool active = false;
    // training cache of the last forward
    MatrixType dropout_mask;   // 0 or 1 / (1 - p) per input entry
    MatrixType dropped_input;  // X * mask
    detail::TensorLease lease_A, lease_B;

    Scalar effective_scaling() const { return static_cast<Scalar>(config.scaling() * scale); }
  };
  using AdapterPtr = std::unique_ptr<Adapter>;

  LoraLinear(BasePtr base, const LoraConfig& config, bool owns_base);

  template <class DerivedW>
  static BasePtr own_base(const char* where, const Eigen::MatrixBase<DerivedW>& W0);
  template <class DerivedW, class DerivedB>
  static BasePtr own_base(const char* where, const Eigen::MatrixBase<DerivedW>& W0, const Eigen::MatrixBase<DerivedB>& b);

  AdapterPtr make_adapter(const char* where, const std::string& name, const LoraConfig& config) const;
  void copy_adapters_from(const LoraLinear& other);
  void require_unmerged(const char* where) const {
    if (merged_) detail::fail(where, "the layer is merged; call unmerge() first");
  }
  const Adapter* find(const std::string& name) const;
  Adapter& at(const char* where, const std::string& name);
  const Adapter& at(const char* where, const std::string& name) const;
  std::string only_active(const char* where) const;
  ParamRef<Scalar> view(MatrixType& m, const detail::TensorLease& lease) const {
    return ParamRef<Scalar>(m.data(), m.rows(), m.cols(), lease.guard());
  }
  static ConstMap cview(const MatrixType& m) { return ConstMap(m.data(), m.rows(), m.cols()); }
  // Something the cached forward depends on changed: backward() refuses that forward from now on.
  void changed() { ++guard_->version; }
  bool merged_in_place() const { return merged_ && !merged_copy_; }
  // Whether the layer may write W0 in place (it owns the base alone).
  DenseBase<Scalar>* exclusive_dense_base() const;
  const Scalar* effective_bias() const { return has_bias_ ? bias_.data() : nullptr; }
  // Terms of the active adapters (no dropout), into `terms`.
  void active_terms(std::vector<AdapterTerm<Scalar>>& terms) const;
  template <class Derived>
  const Scalar* plain_input(const char* where, const Eigen::MatrixBase<Derived>& X, MatrixType& staging,
                            std::initializer_list<const MatrixType*> written) const;
  template <class Derived>
  const MatrixType& infer_terms(const Eigen::MatrixBase<Derived>& X, InferenceWorkspace<Scalar>& work) const;

  BasePtr base_;
  bool owns_base_ = false;  // built from W0 by this layer (not handed in)
  VectorType bias_, grad_bias_;
  bool has_bias_ = false, bias_trainable_ = false, keep_original_ = false, adapters_trainable_ = true;
  std::vector<AdapterPtr> adapters_;  // by pointer: an adapter's storage never moves while it exists
  bool training_ = true;
  detail::GuardHandle guard_;  // the owner record of every view and parameter entry of this layer
  std::unique_ptr<detail::TensorLease> lease_bias_;

  // merge state
  // While merged, the active set, the scales and every A and B are frozen (setters and views refuse), so
  // unmerge subtracts exactly the terms merge added. Merged in place <=> merged_ without a merged_copy_.
  bool merged_ = false;
  std::shared_ptr<DenseBase<Scalar>> merged_copy_;  // W0' when the base is not written in place
  MatrixType original_;                             // W0 before an in-place merge, with keep_original_weight
  struct PreparedMerge {
    bool ready = false, in_place = false;
    std::vector<AdapterTerm<Scalar>> terms;
    std::shared_ptr<DenseBase<Scalar>> copy;
    MatrixType original;
  } prepared_;

  // training workspaces, reused across calls (resized only when n changes)
  MatrixType input_;  // X of the last training forward
  MatrixType merge_U_, merge_V_, merge_chunk_;
  // The output, the staging copy of dY and dX: shareable (share_transient_buffers).
  TransientBuffers<Scalar, 3> transient_;
  MatrixType& output_buffer() { return transient_[0]; }
  MatrixType& grad_output_buffer() { return transient_[1]; }
  MatrixType& grad_input_buffer() { return transient_[2]; }
  ForwardWorkspace<Scalar> forward_work_;
  BackwardWorkspace<Scalar> backward_work_;
  std::vector<AdapterTerm<Scalar>> terms_;
  std::vector<GradientTerm<Scalar>> grads_;
  detail::PackBuffer<Scalar> merge_pack_;
  Index cached_rows_ = -1;           // n of the last training forward, -1 when nothing is cached
  std::uint64_t cached_version_ = 0;  // guard_->version at that forward
};

using LoraLinearf = LoraLinear<float>;
using LoraLineard = LoraLinear<double>;

// ===================================================================================================
// Implementation

template <class Scalar>
template <class DerivedW>
typename LoraLinear<Scalar>::BasePtr LoraLinear<Scalar>::own_base(const char* where, const Eigen::MatrixBase<DerivedW>& W0) {
  try {
    return make_base<Scalar>(W0);
  } catch (const std::invalid_argument& e) {
    detail::fail(where, e.what());
  }
}

template <class Scalar>
template <class DerivedW, class DerivedB>
typename LoraLinear<Scalar>::BasePtr LoraLinear<Scalar>::own_base(const char* where, const Eigen::MatrixBase<DerivedW>& W0,
                                                                  const Eigen::MatrixBase<DerivedB>& b) {
  try {
    return make_base<Scalar>(W0, b);
  } catch (const std::invalid_argument& e) {
    detail::fail(where, e.what());
  }
}

template <class Scalar>
LoraLinear<Scalar>::LoraLinear(BasePtr base, const LoraConfig& config, bool owns_base)
    : base_(std::move(base)), owns_base_(owns_base), keep_original_(config.keep_original_weight) {
  constexpr const char* where = "LoraLinear::LoraLinear";
  if (!base_) detail::fail(where, "the base is a null pointer");
  has_bias_ = base_->has_bias();
  if (has_bias_) bias_ = base_->bias();
  bias_trainable_ = has_bias_ && config.bias != BiasMode::none;
  if (bias_trainable_) {
    grad_bias_ = VectorType::Zero(out_features());
    lease_bias_ = std::make_unique<detail::TensorLease>(guard_, "bias");
  }
  AdapterPtr a = make_adapter(where, default_adapter, config);
  a->active = true;
  adapters_.push_back(std::move(a));
}

template <class Scalar>
LoraLinear<Scalar>::LoraLinear(const LoraLinear& other)
    : base_(other.base_),
      owns_base_(false),  // the base is now shared by two layers
      bias_(other.bias_),
      grad_bias_(other.grad_bias_),
      has_bias_(other.has_bias_),
      bias_trainable_(other.bias_trainable_),
      keep_original_(other.keep_original_),
      adapters_trainable_(other.adapters_trainable_),
      training_(other.training_),
      merged_(other.merged_),
      original_(other.original_) {
  if (other.merged_in_place()) {
    // The merged values live in the other layer's own base: this copy gets a base of its own.
    if (other.base_->has_bias())
      base_ = make_base<Scalar>(other.base_weight(), other.base_->bias());
    else
      base_ = make_base<Scalar>(other.base_weight());
    owns_base_ = true;
  }
  if (other.merged_copy_)
    merged_copy_ = std::make_shared<DenseBase<Scalar>>(MatrixType(other.merged_copy_->weight()), VectorType());
  if (bias_trainable_) lease_bias_ = std::make_unique<detail::TensorLease>(guard_, "bias");
  copy_adapters_from(other);
}

template <class Scalar>
LoraLinear<Scalar>& LoraLinear<Scalar>::operator=(const LoraLinear& other) {
  if (this != &other) {
    LoraLinear copy(other);
    *this = std::move(copy);
  }
  return *this;
}

template <class Scalar>
void LoraLinear<Scalar>::copy_adapters_from(const LoraLinear& other) {
  for (const AdapterPtr& src : other.adapters_) {
    auto a = std::make_unique<Adapter>(guard_, src->name, src->config);
    a->A = src->A;
    a->B = src->B;
    a->grad_A = src->grad_A;
    a->grad_B = src->grad_B;
    a->dropout_rng = src->dropout_rng;
    a->scale = src->scale;
    a->active = src->active;
    adapters_.push_back(std::move(a));
  }
}

template <class Scalar>
typename LoraLinear<Scalar>::AdapterPtr LoraLinear<Scalar>::make_adapter(const char* where, const std::string& name,
                                                                         const LoraConfig& config) const {
  if (name.empty()) detail::fail(where, "adapter name is empty");
  if (name.find('.') != std::string::npos)
    detail::fail(where, "adapter name '", name, "' contains '.', which separates parameter names");
  if (find(name)) detail::fail(where, "an adapter named '", name, "' already exists");
  config.validate(where);
  const Index r = config.rank, in = in_features(), out = out_features();
  auto a = std::make_unique<Adapter>(guard_, name, config);
  a->A.resize(r, in);
  a->B.resize(out, r);
  init_adapter(a->A, a->B, config);
  a->grad_A = MatrixType::Zero(r, in);
  a->grad_B = MatrixType::Zero(out, r);
  a->dropout_rng.seed(config.seed ^ 0x9e3779b97f4a7c15ULL);  // a stream apart from the init draws
  return a;
}

template <class Scalar>
void LoraLinear<Scalar>::add_adapter(const std::string& name, const LoraConfig& config) {
  constexpr const char* where = "LoraLinear::add_adapter";
  require_unmerged(where);
  AdapterPtr a = make_adapter(where, name, config);  // everything that can throw happens before the layer changes
  adapters_.reserve(adapters_.size() + 1);
  adapters_.push_back(std::move(a));
  changed();
}

template <class Scalar>
void LoraLinear<Scalar>::delete_adapter(const std::string& name) {
  constexpr const char* where = "LoraLinear::delete_adapter";
  require_unmerged(where);
  at(where, name);  // throws with the list of names
  if (at(where, name).active) ++guard_->layout;
  adapters_.erase(std::find_if(adapters_.begin(), adapters_.end(), [&](const AdapterPtr& a) { return a->name == name; }));
  changed();
}

template <class Scalar>
void LoraLinear<Scalar>::set_active_adapters(const std::vector<std::string>& names) {
  constexpr const char* where = "LoraLinear::set_active_adapters";
  require_unmerged(where);
  for (const std::string& n : names) at(where, n);  // validate all before changing anything
  for (AdapterPtr& a : adapters_) {
    const bool active = std::find(names.begin(), names.end(), a->name) != names.end();
    if (active != a->active) ++guard_->layout;
    a->active = active;
  }
  changed();
}

template <class Scalar>
std::vector<std::string> LoraLinear<Scalar>::active_adapters() const {
  std::vector<std::string> names;
  for (const AdapterPtr& a : adapters_)
    if (a->active) names.push_back(a->name);
  return names;
}

template <class Scalar>
std::vector<std::string> LoraLinear<Scalar>::adapter_names() const {
  std::vector<std::string> names;
  for (const AdapterPtr& a : adapters_) names.push_back(a->name);
  return names;
}

template <class Scalar>
void LoraLinear<Scalar>::set_adapter_scale(const std::string& name, double scale) {
  constexpr const char* where = "LoraLinear::set_adapter_scale";
  require_unmerged(where);
  if (!std::isfinite(scale)) detail::fail(where, "scale must be finite, got ", scale);
  at(where, name).scale = scale;
  changed();
}

template <class Scalar>
template <class DerivedA, class DerivedB>
void LoraLinear<Scalar>::set_adapter_weights(const std::string& name, const Eigen::MatrixBase<DerivedA>& A,
                                             const Eigen::MatrixBase<DerivedB>& B) {
  constexpr const char* where = "LoraLinear::set_adapter_weights";
  require_unmerged(where);
  Adapter& a = at(where, name);
  detail::require_shape(where, "A", A, a.config.rank, in_features());
  detail::require_shape(where, "B", B, out_features(), a.config.rank);
  MatrixType new_A = A.template cast<Scalar>(), new_B = B.template cast<Scalar>();  // evaluate before changing anything
  detail::require_finite(where, "A", new_A);
  detail::require_finite(where, "B", new_B);
  a.A = new_A;  // same shape: assigned in place, so views of A and B stay valid
  a.B = new_B;
  changed();
}

template <class Scalar>
template <class DerivedA, class DerivedB>
void LoraLinear<Scalar>::replace_adapter(const std::string& name, const LoraConfig& config,
                                         const Eigen::MatrixBase<DerivedA>& A, const Eigen::MatrixBase<DerivedB>& B) {
  constexpr const char* where = "LoraLinear::replace_adapter";
  require_unmerged(where);
  auto it = std::find_if(adapters_.begin(), adapters_.end(), [&](const AdapterPtr& a) { return a->name == name; });
  if (it == adapters_.end()) at(where, name);  // throws with the list of names
  config.validate(where);
  detail::require_shape(where, "A", A, config.rank, in_features());
  detail::require_shape(where, "B", B, out_features(), config.rank);
  auto fresh = std::make_unique<Adapter>(guard_, name, config);
  fresh->A = A.template cast<Scalar>();
  fresh->B = B.template cast<Scalar>();
  detail::require_finite(where, "A", fresh->A);
  detail::require_finite(where, "B", fresh->B);
  fresh->grad_A = MatrixType::Zero(config.rank, in_features());
  fresh->grad_B = MatrixType::Zero(out_features(), config.rank);
  fresh->dropout_rng.seed(config.seed ^ 0x9e3779b97f4a7c15ULL);
  fresh->scale = (*it)->scale;
  fresh->active = (*it)->active;
  it->swap(fresh);  // the old record (and its views' guards) dies with `fresh`
  changed();
}

template <class Scalar>
const typename LoraLinear<Scalar>::Adapter* LoraLinear<Scalar>::find(const std::string& name) const {
  for (const AdapterPtr& a : adapters_)
    if (a->name == name) return a.get();
  return nullptr;
}

template <class Scalar>
const typename LoraLinear<Scalar>::Adapter& LoraLinear<Scalar>::at(const char* where, const std::string& name) const {
  const Adapter* a = find(name);
  if (!a) {
    std::string known;
    for (const AdapterPtr& p : adapters_) known += (known.empty() ? "'" : ", '") + p->name + "'";
    detail::fail(where, "no adapter named '", name, "'; the layer has ", known.empty() ? "none" : known);
  }
  return *a;
}

template <class Scalar>
typename LoraLinear<Scalar>::Adapter& LoraLinear<Scalar>::at(const char* where, const std::string& name) {
  return const_cast<Adapter&>(std::as_const(*this).at(where, name));
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
typename LoraLinear<Scalar>::BasePtr LoraLinear<Scalar>::shared_base() const {
  if (merged_in_place())
    detail::fail("LoraLinear::shared_base", "the base holds the merged weight; call unmerge() first");
  return base_;
}

template <class Scalar>
void LoraLinear<Scalar>::set_base(BasePtr base) {
  constexpr const char* where = "LoraLinear::set_base";
  require_unmerged(where);
  if (!base) detail::fail(where, "the base is a null pointer");
  if (base->out_features() != out_features() || base->in_features() != in_features())
    detail::fail(where, "the new base is ", base->out_features(), " x ", base->in_features(), ", the layer is ",
                 out_features(), " x ", in_features());
  if (base->has_bias() != has_bias_)
    detail::fail(where, has_bias_ ? "the layer has a bias and the new base has none"
                                  : "the new base has a bias and the layer has none");
  if (has_bias_ && !bias_trainable_) bias_ = base->bias();  // a frozen bias comes with its base
  base_ = std::move(base);
  owns_base_ = false;
  changed();
}

template <class Scalar>
typename LoraLinear<Scalar>::ConstMap LoraLinear<Scalar>::base_weight() const {
  const FrozenBase<Scalar>& b = merged_copy_ ? *merged_copy_ : *base_;
  const Scalar* w = b.dense_weight();
  if (!w) detail::fail("LoraLinear::base_weight", "the base (", b.describe(), ") is not stored as dense values");
  return ConstMap(w, out_features(), in_features());
}

template <class Scalar>
ParamRef<Scalar> LoraLinear<Scalar>::bias_mut() {
  if (!bias_trainable_) detail::fail("LoraLinear::bias_mut", "the bias is frozen (config.bias == none or no bias)");
  return ParamRef<Scalar>(bias_.data(), bias_.size(), 1, lease_bias_->guard());
}

template <class Scalar>
template <class Derived>
void LoraLinear<Scalar>::set_bias(const Eigen::MatrixBase<Derived>& bias) {
  constexpr const char* where = "LoraLinear::set_bias";
  if (!has_bias_) detail::fail(where, "the layer has no bias");
  require_unmerged(where);
  if (bias.rows() != 1 && bias.cols() != 1) detail::fail(where, "bias must be a vector, got shape ", detail::shape_of(bias));
  if (bias.size() != out_features())
    detail::fail(where, "bias has ", bias.size(), " entries, expected out_features = ", out_features());
  VectorType b(bias.size());
  for (Index i = 0; i < bias.size(); ++i) b(i) = static_cast<Scalar>(bias.derived().reshaped()(i));
  detail::require_finite(where, "bias", b);
  bias_ = b;
  changed();
}

template <class Scalar>
Index LoraLinear<Scalar>::num_trainable_parameters() const {
  Index n = bias_trainable_ ? out_features() : 0;
  if (adapters_trainable_)
    for (const AdapterPtr& a : adapters_)
      if (a->active) n += a->config.rank * (in_features() + out_features());
  return n;
}

template <class Scalar>
void LoraLinear<Scalar>::set_trainable(bool adapters, bool bias) {
  require_unmerged("LoraLinear::set_trainable");
  bias = bias && has_bias_;
  if (adapters == adapters_trainable_ && bias == bias_trainable_) return;
  if (bias != bias_trainable_) {
    if (bias) {
      grad_bias_ = VectorType::Zero(out_features());
      lease_bias_ = std::make_unique<detail::TensorLease>(guard_, "bias");
    } else {
      grad_bias_.resize(0);
      lease_bias_.reset();  // views and list entries of the bias stop working
    }
    bias_trainable_ = bias;
  }
  adapters_trainable_ = adapters;
  ++guard_->layout;
  changed();
}

template <class Scalar>
void LoraLinear<Scalar>::collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) {
  for (AdapterPtr& a : adapters_) {
    if (!a->active || !adapters_trainable_) continue;
    out.push_back(detail::guarded_parameter<Scalar>(prefix + "lora_A." + a->name + ".weight", ParameterRole::lora_A,
                                                    detail::parameter_view(a->A), detail::parameter_view(a->grad_A),
                                                    a->lease_A.guard()));
    out.push_back(detail::guarded_parameter<Scalar>(prefix + "lora_B." + a->name + ".weight", ParameterRole::lora_B,
                                                    detail::parameter_view(a->B), detail::parameter_view(a->grad_B),
                                                    a->lease_B.guard()));
  }
  if (bias_trainable_)
    out.push_back(detail::guarded_parameter<Scalar>(prefix + "bias", ParameterRole::bias, detail::parameter_view(bias_),
                                                    detail::parameter_view(grad_bias_), lease_bias_->guard()));
}

template <class Scalar>
void LoraLinear<Scalar>::reset_dropout_rng() {
  for (AdapterPtr& a : adapters_) a->dropout_rng.seed(a->config.seed ^ 0x9e3779b97f4a7c15ULL);
}

template <class Scalar>
void LoraLinear<Scalar>::zero_grad() {
  for (AdapterPtr& a : adapters_) {
    a->grad_A.setZero();
    a->grad_B.setZero();
  }
  if (bias_trainable_) grad_bias_.setZero();
}

template <class Scalar>
template <class Derived>
const Scalar* LoraLinear<Scalar>::plain_input(const char* where, const Eigen::MatrixBase<Derived>& X,
                                              MatrixType& staging,
                                              std::initializer_list<const MatrixType*> written) const {
  // The kernels read packed rows: a row-major matrix, Map or Ref with packed rows is read in place unless
  // it overlaps a buffer this call writes (forward(forward(X)), forward(Y.topRows(k))); anything else is
  // copied into `staging` first.
  static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                "LoraLinear: the input's Scalar must match the layer's; cast it first.");
  (void)where;
  if constexpr (bool(Derived::Flags & Eigen::DirectAccessBit) && bool(Derived::Flags & Eigen::RowMajorBit)) {
    const Derived& d = X.derived();
    if (d.innerStride() == 1 && (d.outerStride() == d.cols() || d.rows() == 1)) {
      bool alias = false;
      for (const MatrixType* m : written) alias = alias || detail::overlaps(d.data(), d.size(), m->data(), m->size());
      if (!alias) return d.data();
      if (detail::overlaps(d.data(), d.size(), staging.data(), staging.size())) {
        MatrixType copy = X;  // rare: the input is the staging buffer itself
        staging.swap(copy);
        return staging.data();
      }
    }
  }
  detail::resize_workspace(staging, X.rows(), X.cols());
  staging = X;
  return staging.data();
}

template <class Scalar>
void LoraLinear<Scalar>::active_terms(std::vector<AdapterTerm<Scalar>>& terms) const {
  terms.clear();
  for (const AdapterPtr& a : adapters_)
    if (a->active) terms.push_back({a->A.data(), a->B.data(), a->config.rank, a->effective_scaling(), nullptr, nullptr});
}

template <class Scalar>
template <class Derived>
const typename LoraLinear<Scalar>::MatrixType& LoraLinear<Scalar>::forward(const Eigen::MatrixBase<Derived>& X) {
  constexpr const char* where = "LoraLinear::forward";
  detail::require_cols(where, "input", X, in_features(), "in_features");
  if (X.rows() == 0) detail::fail(where, "input has 0 rows");
  cached_rows_ = -1;  // from here on, a throw leaves nothing cached
  const Index n = X.rows(), in = in_features(), out = out_features();
  const bool keep = training_ && !merged_;

  const Scalar* x;
  if (keep) {  // backward needs X: keep a copy (no allocation when n is unchanged)
    if (detail::overlaps(detail::data_or_null(X), X.size(), input_.data(), input_.size())) {
      MatrixType copy = X;
      input_.swap(copy);
    } else {
      detail::resize_workspace(input_, n, in);
      input_ = X;
    }
    x = input_.data();
  } else {
    x = plain_input(where, X, input_, {&output_buffer()});
  }
  detail::resize_workspace(output_buffer(), n, out);

  if (merged_) {
    const FrozenBase<Scalar>& w = merged_copy_ ? *merged_copy_ : *base_;
    lora_forward(w, {}, effective_bias(), x, n, output_buffer().data(), forward_work_);
    return output_buffer();
  }
  terms_.clear();
  for (AdapterPtr& a : adapters_) {
    if (!a->active) continue;
    AdapterTerm<Scalar> t{a->A.data(), a->B.data(), a->config.rank, a->effective_scaling(), nullptr, nullptr};
    if (training_ && a->config.dropout > 0) {
      // Inverted dropout on the adapter's input: keep with probability 1 - p, scale by 1 / (1 - p).
      const double p = a->config.dropout;
      const Scalar keep_scale = static_cast<Scalar>(1.0 / (1.0 - p));
      detail::resize_workspace(a->dropout_mask, n, in);
      detail::resize_workspace(a->dropped_input, n, in);
      for (Index i = 0; i < n; ++i)
        for (Index j = 0; j < in; ++j) a->dropout_mask(i, j) = a->dropout_rng.uniform() < p ? Scalar(0) : keep_scale;
      a->dropped_input = input_.cwiseProduct(a->dropout_mask);
      t.input = a->dropped_input.data();
      t.mask = a->dropout_mask.data();
    }
    terms_.push_back(t);
  }
  lora_forward(*base_, terms_, effective_bias(), x, n, output_buffer().data(), forward_work_);
  if (keep) {
    cached_rows_ = n;
    cached_version_ = guard_->version;
  }
  return output_buffer();
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
  if (cached_version_ != guard_->version)
    detail::fail(where, "the layer changed after the forward (adapter values, scales, active set, bias or base); "
                        "run forward() again before backward()");
  detail::require_shape(where, "grad_output", dY, cached_rows_, out_features());
  const Index n = cached_rows_, in = in_features(), out = out_features();
  const MatrixType* written[] = {&grad_input_buffer(), &backward_work_.dT, &backward_work_.dBt, &backward_work_.masked_grad};
  const Scalar* dy = plain_input(where, dY, grad_output_buffer(), {written[0], written[1], written[2], written[3]});
  const Eigen::Map<const MatrixType> dYm(dy, n, out);

  if (bias_trainable_) grad_bias_.noalias() += dYm.colwise().sum().transpose();
  detail::resize_workspace(grad_input_buffer(), n, in);
  grads_.clear();
  for (AdapterPtr& a : adapters_)
    if (a->active) grads_.push_back({a->grad_A.data(), a->grad_B.data()});
  lora_backward(*base_, terms_, grads_, input_.data(), forward_work_.T, dy, n, grad_input_buffer().data(), backward_work_);
  return grad_input_buffer();
}

// ---- inference ------------------------------------------------------------------------------------

template <class Scalar>
template <class Derived>
const typename LoraLinear<Scalar>::MatrixType& LoraLinear<Scalar>::infer_terms(const Eigen::MatrixBase<Derived>& X,
                                                                               InferenceWorkspace<Scalar>& work) const {
  constexpr const char* where = "LoraLinear::infer";
  const Index n = X.rows();
  const Scalar* x = plain_input(where, X, work.staging, {&work.output, &work.forward.T});
  detail::resize_workspace(work.output, n, out_features());
  const FrozenBase<Scalar>& w = merged_copy_ ? *merged_copy_ : *base_;
  lora_forward(w, work.terms, effective_bias(), x, n, work.output.data(), work.forward);
  return work.output;
}

template <class Scalar>
template <class Derived>
const typename LoraLinear<Scalar>::MatrixType& LoraLinear<Scalar>::infer(const Eigen::MatrixBase<Derived>& X,
                                                                         InferenceWorkspace<Scalar>& work) const {
  constexpr const char* where = "LoraLinear::infer";
  detail::require_cols(where, "input", X, in_features(), "in_features");
  if (X.rows() == 0) detail::fail(where, "input has 0 rows");
  if (merged_)
    work.terms.clear();
  else
    active_terms(work.terms);
  return infer_terms(X, work);
}

template <class Scalar>
template <class Derived>
const typename LoraLinear<Scalar>::MatrixType& LoraLinear<Scalar>::infer(const Eigen::MatrixBase<Derived>& X,
                                                                         InferenceWorkspace<Scalar>& work,
                                                                         const std::vector<std::string>& adapters,
                                                                         bool skip_missing) const {
  constexpr const char* where = "LoraLinear::infer";
  detail::require_cols(where, "input", X, in_features(), "in_features");
  if (X.rows() == 0) detail::fail(where, "input has 0 rows");
  if (merged_) detail::fail(where, "the layer is merged; unmerge it to choose adapters per call");
  work.terms.clear();
  for (const std::string& name : adapters) {
    if (skip_missing && !find(name)) continue;
    const Adapter& a = at(where, name);
    work.terms.push_back({a.A.data(), a.B.data(), a.config.rank, a.effective_scaling(), nullptr, nullptr});
  }
  return infer_terms(X, work);
}

// ---- merge ----------------------------------------------------------------------------------------

template <class Scalar>
DenseBase<Scalar>* LoraLinear<Scalar>::exclusive_dense_base() const {
  if (!owns_base_ || base_.use_count() != 1) return nullptr;
  auto* dense = dynamic_cast<const DenseBase<Scalar>*>(base_.get());
  if (!dense || dense->borrowed()) return nullptr;
  // The layer built this base itself (make_shared of a non-const object) and is its only holder.
  return const_cast<DenseBase<Scalar>*>(dense);
}

template <class Scalar>
bool LoraLinear<Scalar>::prepare_merge(const char* where) {
  if (merged_) detail::fail(where, "the layer is already merged");
  if (!base_->dense_weight())
    detail::fail(where, "the base (", base_->describe(),
                 ") is not stored as dense values: a quantized base cannot take the delta (a delta smaller than "
                 "the quantization step is lost and the merged model would silently behave like the base); "
                 "export a dense copy with quant::merge_and_dequantize instead");
  cancel_merge();
  PreparedMerge p;
  active_terms(p.terms);
  if (p.terms.empty()) return false;
  const Index out = out_features(), in = in_features();
  // A cheap bound decides whether the pass can overflow: |W0 + d| <= max|W0| + sum |s| max_i ||B_i||_1 max|A|.
  // If it might, a read-only pass checks every result first, so W0 is never half-merged.
  double bound = static_cast<double>(base_->max_abs());
  for (const AdapterPtr& a : adapters_) {
    if (!a->active) continue;
    if (!a->A.allFinite()) detail::fail(where, "adapter '", a->name, "': A contains NaN or Inf; W0 left unchanged");
    if (!a->B.allFinite()) detail::fail(where, "adapter '", a->name, "': B contains NaN or Inf; W0 left unchanged");
    bound += std::abs(static_cast<double>(a->effective_scaling())) *
             static_cast<double>(a->B.cwiseAbs().rowwise().sum().maxCoeff()) *
             static_cast<double>(a->A.cwiseAbs().maxCoeff());
  }
  if (!(bound < 0.25 * static_cast<double>(std::numeric_limits<Scalar>::max()))) {
    const Index rows_per_chunk = std::max<Index>(1, 16384 / in);
    MatrixType chunk(rows_per_chunk, in);
    for (Index r0 = 0; r0 < out; r0 += rows_per_chunk) {
      const Index rc = std::min(rows_per_chunk, out - r0);
      auto tmp = chunk.topRows(rc);
      base_->dense_rows(r0, rc, tmp.data());
      for (const AdapterTerm<Scalar>& t : p.terms)
        tmp.noalias() += (t.scaling * Eigen::Map<const MatrixType>(t.B, out, t.rank).middleRows(r0, rc)) *
                         Eigen::Map<const MatrixType>(t.A, t.rank, in);
      if (!tmp.allFinite())
        detail::fail(where, "the merged weight would contain NaN or Inf (first in rows ", r0, "..", r0 + rc - 1,
                     "); W0 left unchanged");
    }
  }
  // Allocate everything now, so commit_merge() cannot fail.
  const Index R = detail::total_rank(p.terms);
  detail::resize_workspace(merge_U_, out, R);
  detail::resize_workspace(merge_V_, R, in);
  const Index pack = std::max(detail::kernel::panel_size<Scalar>(R, in),
                              detail::kernel::columns_pack_size<Scalar>() * detail::threads_for(1e300));
  if (merge_pack_.size() < pack) merge_pack_.resize(pack);
  p.in_place = exclusive_dense_base() != nullptr;
  if (!p.in_place) {
    MatrixType W(out, in);
    base_->dense_rows(0, out, W.data());
    p.copy = std::make_shared<DenseBase<Scalar>>(std::move(W), VectorType());
  } else if (keep_original_) {
    p.original = base_weight();
  }
  p.ready = true;
  prepared_ = std::move(p);
  return true;
}

template <class Scalar>
void LoraLinear<Scalar>::commit_merge() noexcept {
  LORA_ASSERT(prepared_.ready);
  const Index out = out_features(), in = in_features();
  DenseBase<Scalar>* target = prepared_.in_place ? exclusive_dense_base() : prepared_.copy.get();
  LORA_ASSERT(target);
  const Scalar m = lora_add_delta(target->mutable_weight(), out, in, prepared_.terms, Scalar(1), merge_U_, merge_V_,
                                  merge_pack_);
  target->set_max_abs(m);
  merged_copy_ = std::move(prepared_.copy);
  original_.swap(prepared_.original);
  merged_ = true;
  guard_->locked = "the layer is merged; call unmerge() first";
  changed();
  cancel_merge();
}

template <class Scalar>
void LoraLinear<Scalar>::cancel_merge() noexcept {
  prepared_.ready = false;
  prepared_.terms.clear();
  prepared_.copy.reset();
  prepared_.original.resize(0, 0);
}

template <class Scalar>
void LoraLinear<Scalar>::merge() {
  constexpr const char* where = "LoraLinear::merge";
  if (merged_) detail::fail(where, "the layer is already merged");
  if (!prepare_merge(where)) detail::fail(where, "no active adapter to merge");
  commit_merge();
}

template <class Scalar>
void LoraLinear<Scalar>::unmerge() {
  constexpr const char* where = "LoraLinear::unmerge";
  if (!merged_) detail::fail(where, "the layer is not merged");
  if (merged_copy_) {
    merged_copy_.reset();  // exact: the base was never written
  } else {
    DenseBase<Scalar>* target = exclusive_dense_base();
    LORA_ASSERT(target);
    if (keep_original_) {
      Eigen::Map<MatrixType>(target->mutable_weight(), out_features(), in_features()) = original_;
      target->set_max_abs(original_.cwiseAbs().maxCoeff());
      original_.resize(0, 0);
    } else {
      std::vector<AdapterTerm<Scalar>> terms;
      active_terms(terms);  // the terms merge added: nothing they depend on can change while merged
      target->set_max_abs(lora_add_delta(target->mutable_weight(), out_features(), in_features(), terms, Scalar(-1),
                                         merge_U_, merge_V_, merge_pack_));
    }
  }
  merged_ = false;
  guard_->locked = nullptr;
  changed();
}

}  // namespace lora
