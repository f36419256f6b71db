// lora.hpp: TransientBuffers, a set of workspace matrices that layers which run in turn can share.
#pragma once

#include <lora/common.hpp>

#include <array>
#include <cstddef>
#include <memory>

namespace lora {

// The buffers a layer needs only during one of its calls, or until its caller has read the result: its
// output, its input gradient, staging copies; as opposed to what its forward() keeps for its backward().
// Layers that never run at the same time, and whose results are read before the next of them runs (the
// corresponding layers of identical stacked blocks), may use one set: LoraLinear::share_transient_buffers,
// nn::Module::share_transient_buffers. A copy starts with an empty set of its own: a copied layer never
// shares with the original.
template <class Scalar, std::size_t N>
class TransientBuffers {
 public:
  TransientBuffers() = default;
  TransientBuffers(const TransientBuffers&) {}
  TransientBuffers& operator=(const TransientBuffers&) { return *this; }  // keeps its own set
  TransientBuffers(TransientBuffers&&) noexcept = default;
  TransientBuffers& operator=(TransientBuffers&&) noexcept = default;
  ~TransientBuffers() = default;

  Matrix<Scalar>& operator[](std::size_t i) { return set()[i]; }
  // Uses other's set from now on (this one's is released when nothing else holds it); nullptr: a set
  // of its own again (a fresh, empty one when the current set is shared).
  void share(TransientBuffers* other) {
    if (!other) {
      if (set_.use_count() > 1) set_.reset();
    } else {
      other->set();  // created on first use
      if (set_ != other->set_) set_ = other->set_;
    }
  }

 private:
  std::array<Matrix<Scalar>, N>& set() {
    if (!set_) set_ = std::make_shared<std::array<Matrix<Scalar>, N>>();
    return *set_;
  }
  std::shared_ptr<std::array<Matrix<Scalar>, N>> set_;
};

}  // namespace lora
