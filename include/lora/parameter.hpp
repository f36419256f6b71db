// lora.hpp: Parameter, a named view of one trainable tensor and its gradient, for optimisers.
#pragma once

#include <lora/common.hpp>

#include <string>
#include <vector>

namespace lora {

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

// A view, not an owner: valid while the module that produced it is alive and unchanged in shape
// (adding or deleting adapters, or merging, invalidates it). Collect a fresh list when in doubt;
// building it is cheap. Vectors (biases) appear as [n x 1].
template <class Scalar>
struct Parameter {
  using View = Eigen::Map<Matrix<Scalar>, 0, Eigen::OuterStride<>>;

  std::string name;  // dotted path, PEFT style: "layers.2.lora_A.default.weight"
  ParameterRole role;
  View value;
  View grad;  // writable, so that gradient clipping can rescale it in place
};

template <class Scalar>
using ParameterList = std::vector<Parameter<Scalar>>;

namespace detail {

// Views of a row-major matrix, a block of rows of one, or a column vector.
template <class Derived>
auto parameter_view(Eigen::PlainObjectBase<Derived>& m) {
  using Scalar = typename Derived::Scalar;
  return typename Parameter<Scalar>::View(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols()));
}

template <class XprType>
auto parameter_view(Eigen::Block<XprType, Eigen::Dynamic, Eigen::Dynamic, true> rows) {
  using Scalar = typename XprType::Scalar;
  return typename Parameter<Scalar>::View(rows.data(), rows.rows(), rows.cols(), Eigen::OuterStride<>(rows.outerStride()));
}

}  // namespace detail
}  // namespace lora
