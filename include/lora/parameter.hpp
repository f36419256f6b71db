// lora.hpp: views of trainable tensors that cannot break their owner: ParamRef (a fixed-shape, checked,
// writable view, what A(), B() and nn::Linear::weight() return) and Parameter (a named view of a tensor and
// its gradient, for optimisers).
//
// Every tensor a view can reach has a guard shared with its owner (a layer). A write through a view or an
// optimiser step first checks the guard: the tensor must still exist (its adapter not deleted, its layer
// not destroyed or replaced, its trainability unchanged since the list was made) and its owner must accept
// writes (a merged layer refuses them: unmerge would otherwise subtract a delta it never added). Each write
// advances the owner's version, which is how a layer notices that the tensors its cached forward used have
// changed before backward.
#pragma once

#include <lora/common.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace lora {

namespace detail {

// The state of a tensor owner (a layer) that views and parameter lists check.
struct GuardOwner {
  bool alive = true;          // false once the owner is destroyed
  const char* locked = nullptr;  // why writes are refused now (nullptr: they are accepted)
  std::uint64_t version = 0;  // advanced by every change of the owner's tensors or settings
  std::uint64_t layout = 0;   // advanced when the set of trainable tensors changes (parameter lists are stale)
};

// One tensor's guard, shared by the views and parameter entries that reach it.
struct TensorGuard {
  std::shared_ptr<GuardOwner> owner;
  std::string name;   // "lora_A.default", "weight", ...
  bool alive = true;  // false once the tensor's storage is gone or its parameter entry is retired

  // Throws std::invalid_argument naming `where` (and `full_name`, a parameter's dotted name, if given)
  // when the tensor (or its gradient) is gone.
  void require_alive(const char* where, const std::string* full_name = nullptr) const {
    if (!alive || !owner->alive)
      fail(where, "'", full_name ? *full_name : name, "' no longer exists as it was when this view or parameter list was made ",
           "(its adapter was deleted, its layer replaced, destroyed or copied over, or its trainability changed); ",
           "take a fresh view or parameter list");
  }
  // Throws when the tensor may not be written now.
  void require_writable(const char* where, const std::string* full_name = nullptr) const {
    require_alive(where, full_name);
    if (owner->locked) fail(where, "'", full_name ? *full_name : name, "' cannot be written: ", owner->locked);
  }
  void touch() const { ++owner->version; }
};

// The owner record of a layer, kept in the layer. A copy of the layer gets a fresh record (its tensors are
// new storage), a move takes the record along (the storage moves with it), destruction marks it dead.
class GuardHandle {
 public:
  GuardHandle() : owner_(std::make_shared<GuardOwner>()) {}
  GuardHandle(const GuardHandle&) : GuardHandle() {}
  GuardHandle(GuardHandle&& other) : owner_(std::move(other.owner_)) { other.owner_ = std::make_shared<GuardOwner>(); }
  GuardHandle& operator=(const GuardHandle&) {
    ++owner_->version;  // the owner's tensors were assigned new values
    return *this;
  }
  GuardHandle& operator=(GuardHandle&& other) {
    if (this != &other) {
      owner_->alive = false;
      owner_ = std::move(other.owner_);
      other.owner_ = std::make_shared<GuardOwner>();
    }
    return *this;
  }
  ~GuardHandle() {
    if (owner_) owner_->alive = false;
  }

  GuardOwner& operator*() const { return *owner_; }
  GuardOwner* operator->() const { return owner_.get(); }
  const std::shared_ptr<GuardOwner>& owner() const { return owner_; }

 private:
  std::shared_ptr<GuardOwner> owner_;
};

// A tensor's hold on its guard: the guard dies with the holder (or on retire()).
class TensorLease {
 public:
  TensorLease(const GuardHandle& owner, std::string name)
      : guard_(std::make_shared<TensorGuard>(TensorGuard{owner.owner(), std::move(name), true})) {}
  TensorLease(const TensorLease&) = delete;
  TensorLease& operator=(const TensorLease&) = delete;
  ~TensorLease() { guard_->alive = false; }

  // Views and parameter entries made so far stop working; later ones use a new guard.
  void retire() {
    auto fresh = std::make_shared<TensorGuard>(TensorGuard{guard_->owner, guard_->name, true});
    guard_->alive = false;
    guard_ = std::move(fresh);
  }
  const std::shared_ptr<TensorGuard>& guard() const { return guard_; }

 private:
  std::shared_ptr<TensorGuard> guard_;
};

}  // namespace detail

// A view of a trainable tensor with a fixed shape. It reads like an Eigen matrix (it is an Eigen::Map of
// const values: use it in any expression); writes go through the members below, which check the shape and
// the guard (see the top of this file) and throw std::invalid_argument rather than break the owner.
// Valid while its tensor exists; a view of a deleted adapter must not be read.
template <class Scalar>
class ParamRef : public Eigen::Map<const Matrix<Scalar>, 0, Eigen::OuterStride<>> {
  using Base = Eigen::Map<const Matrix<Scalar>, 0, Eigen::OuterStride<>>;
  using MutableMap = Eigen::Map<Matrix<Scalar>, 0, Eigen::OuterStride<>>;

 public:
  ParamRef(Scalar* data, Index rows, Index cols, std::shared_ptr<detail::TensorGuard> guard)
      : Base(data, rows, cols, Eigen::OuterStride<>(cols)), data_(data), guard_(std::move(guard)) {}
  ParamRef(const ParamRef&) = default;

  // Assigns values (never rebinds): the shapes must match.
  ParamRef& operator=(const ParamRef& other) { return assign(other); }
  template <class Derived>
  ParamRef& operator=(const Eigen::DenseBase<Derived>& value) {
    return assign(value);
  }
  template <class Derived>
  ParamRef& operator+=(const Eigen::DenseBase<Derived>& value) {
    require(where_update, value);
    mutable_map() += value;
    return *this;
  }
  template <class Derived>
  ParamRef& operator-=(const Eigen::DenseBase<Derived>& value) {
    require(where_update, value);
    mutable_map() -= value;
    return *this;
  }
  ParamRef& operator*=(Scalar s) {
    begin_write(where_update);
    mutable_map() *= s;
    return *this;
  }
  ParamRef& setZero() { return setConstant(Scalar(0)); }
  ParamRef& setOnes() { return setConstant(Scalar(1)); }
  ParamRef& setRandom() {
    begin_write(where_update);
    mutable_map().setRandom();
    return *this;
  }
  ParamRef& setConstant(Scalar value) {
    begin_write(where_update);
    mutable_map().setConstant(value);
    return *this;
  }
  // Calls f(values) with a writable map of the values (fixed shape), after the checks of any write: for
  // filling a large tensor in place (an initialisation) without a temporary of its size.
  template <class F>
  ParamRef& modify(F&& f) {
    begin_write(where_update);
    MutableMap values = mutable_map();
    f(values);
    return *this;
  }
  // A writable reference to one entry, checked when it is taken.
  Scalar& coeffRef(Index i, Index j) {
    begin_write("ParamRef::coeffRef");
    if (i < 0 || i >= this->rows() || j < 0 || j >= this->cols())
      detail::fail("ParamRef::coeffRef", "index (", i, ", ", j, ") is outside ", this->rows(), " x ", this->cols());
    return data_[i * this->cols() + j];
  }
  void set(Index i, Index j, Scalar value) { coeffRef(i, j) = value; }

  const std::string& name() const { return guard_->name; }
  bool writable() const { return guard_->alive && guard_->owner->alive && !guard_->owner->locked; }

 private:
  static constexpr const char* where_assign = "ParamRef::operator=";
  static constexpr const char* where_update = "ParamRef: in-place update";

  template <class Derived>
  ParamRef& assign(const Eigen::DenseBase<Derived>& value) {
    require(where_assign, value);
    // Values in memory that does not overlap the tensor are copied directly. Anything else goes through
    // a temporary: an expression may read this very tensor (A = A * 2 is fine; A = A.transpose() of a
    // square A must not alias).
    if constexpr (bool(Derived::Flags & Eigen::DirectAccessBit)) {
      const Derived& d = value.derived();
      const Index span = d.size() == 0 ? 0 : (d.rows() - 1) * d.rowStride() + (d.cols() - 1) * d.colStride() + 1;
      if (!detail::overlaps(d.data(), span, data_, this->size())) {
        mutable_map() = value;
        return *this;
      }
    }
    const Matrix<Scalar> copy = value;
    mutable_map() = copy;
    return *this;
  }
  template <class Derived>
  void require(const char* where, const Eigen::DenseBase<Derived>& value) {
    if (value.rows() != this->rows() || value.cols() != this->cols())
      detail::fail(where, "'", guard_->name, "' has shape ", this->rows(), " x ", this->cols(),
                   "; a view has a fixed shape and cannot take a ", value.rows(), " x ", value.cols(), " value");
    begin_write(where);
  }
  void begin_write(const char* where) {
    guard_->require_writable(where);
    guard_->touch();
  }
  MutableMap mutable_map() { return MutableMap(data_, this->rows(), this->cols(), Eigen::OuterStride<>(this->cols())); }

  Scalar* data_;
  std::shared_ptr<detail::TensorGuard> guard_;
};

// A checked view of a caller's own matrix or vector (for a model built by hand, as in LoraModelView's
// saved modules): the shape is fixed; nothing owns or locks the storage, which the caller keeps alive.
template <class Derived>
ParamRef<typename Derived::Scalar> param_ref(Eigen::PlainObjectBase<Derived>& m, std::string name = "tensor") {
  auto guard = std::make_shared<detail::TensorGuard>(
      detail::TensorGuard{std::make_shared<detail::GuardOwner>(), std::move(name), true});
  return ParamRef<typename Derived::Scalar>(m.data(), m.rows(), m.cols(), std::move(guard));
}

// What a parameter is; optimisers use it for per-group settings (LoRA+ scales the learning rate of
// lora_B, weight decay usually skips biases).
enum class ParameterRole { weight, bias, lora_A, lora_B };

inline const char* to_string(ParameterRole r) {
  switch (r) {
    case ParameterRole::weight: return "weight";
    case ParameterRole::bias: return "bias";
    case ParameterRole::lora_A: return "lora_A";
    case ParameterRole::lora_B: return "lora_B";
  }
  return "?";
}

// A view, not an owner. Optimisers check `guard` before they write (a list made before the model changed,
// or a merged layer, makes step() throw instead of writing freed or frozen memory) and touch it after.
// Vectors (biases) appear as [n x 1].
template <class Scalar>
struct Parameter {
  using View = Eigen::Map<Matrix<Scalar>, 0, Eigen::OuterStride<>>;

  std::string name;  // dotted path, PEFT style: "layers.2.lora_A.default.weight"
  ParameterRole role;
  View value;
  View grad;  // writable, so that gradient clipping can rescale it in place
  std::shared_ptr<detail::TensorGuard> guard = nullptr;  // nullptr: unguarded (a caller's own tensor)
  std::uint64_t layout = 0;  // the owner's trainable-set generation when the entry was made
};

template <class Scalar>
using ParameterList = std::vector<Parameter<Scalar>>;

namespace detail {
// Every entry's tensor still exists (and, with `write`, accepts writes); throws naming `where` otherwise.
// An entry made before its owner's trainable set changed (an adapter activated, deactivated, deleted or
// replaced, trainability switched, a module frozen) is stale even when its own tensor still exists: the
// list no longer matches the model.
template <class Scalar>
void require_live_parameters(const char* where, const ParameterList<Scalar>& params, bool write) {
  for (const Parameter<Scalar>& p : params)
    if (p.guard) {
      if (write)
        p.guard->require_writable(where, &p.name);
      else
        p.guard->require_alive(where, &p.name);
      if (p.layout != p.guard->owner->layout)
        fail(where, "parameter '", p.name, "': the trainable parameters of its layer changed after this list was ",
             "made (an adapter activated, deactivated or deleted, or a trainability change); the list no longer ",
             "matches the model: take a fresh one with parameters()");
    }
}

// A parameter entry over a guarded tensor, stamped with its owner's current layout.
template <class Scalar>
Parameter<Scalar> guarded_parameter(std::string name, ParameterRole role, typename Parameter<Scalar>::View value,
                                    typename Parameter<Scalar>::View grad, std::shared_ptr<TensorGuard> guard) {
  const std::uint64_t layout = guard->owner->layout;
  return Parameter<Scalar>{std::move(name), role, value, grad, std::move(guard), layout};
}
// After an update: the owners' cached forwards are stale.
template <class Scalar>
void touch_parameters(const ParameterList<Scalar>& params) {
  for (const Parameter<Scalar>& p : params)
    if (p.guard) p.guard->touch();
}
}  // namespace detail

namespace detail {

// Views of a row-major matrix or a column vector.
template <class Derived>
auto parameter_view(Eigen::PlainObjectBase<Derived>& m) {
  using Scalar = typename Derived::Scalar;
  return typename Parameter<Scalar>::View(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols()));
}

}  // namespace detail
}  // namespace lora
