// lora.hpp: basic types, the error helper and LORA_ASSERT.
#pragma once

#include <Eigen/Core>

#include <cassert>
#include <functional>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

// Internal invariants. Define LORA_ASSERT before including any lora header to override it
// (for example to throw in a test harness). User mistakes never reach LORA_ASSERT: they throw.
#ifndef LORA_ASSERT
#define LORA_ASSERT(x) assert(x)
#endif

namespace lora {

// Row-major dynamic matrix: one sample a row, weights [out x in] as in PyTorch / PEFT.
template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Column vector (biases, per-feature statistics).
template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

using Index = Eigen::Index;

template <class Scalar>
inline constexpr bool is_supported_scalar_v = std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>;

namespace detail {

template <class... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}

// Throws std::invalid_argument("<where>: <message parts>").
template <class... Parts>
[[noreturn]] void fail(const char* where, Parts&&... parts) {
  throw std::invalid_argument(concat(where, ": ", std::forward<Parts>(parts)...));
}

template <class Derived>
std::string shape_of(const Eigen::EigenBase<Derived>& m) {
  return concat(m.rows(), " x ", m.cols());
}

// Checks a matrix argument's shape; `what` names it in the message ("input", "grad_output", ...).
template <class Derived>
void require_shape(const char* where, const char* what, const Eigen::EigenBase<Derived>& m, Index rows,
                   Index cols) {
  if (m.rows() != rows || m.cols() != cols)
    fail(where, what, " has shape ", shape_of(m), ", expected ", rows, " x ", cols);
}

template <class Derived>
void require_cols(const char* where, const char* what, const Eigen::EigenBase<Derived>& m, Index cols,
                  const char* cols_name) {
  if (m.cols() != cols)
    fail(where, what, " has ", m.cols(), " columns, expected ", cols_name, " = ", cols);
}

// Resizes a workspace without Eigen's resize(), which frees the old storage before it allocates the new
// one and leaves a dangling pointer behind if the allocation throws. Keeps the storage when the size
// is unchanged.
template <class Derived>
void resize_workspace(Eigen::PlainObjectBase<Derived>& m, Index rows, Index cols) {
  if (m.rows() == rows && m.cols() == cols) return;
  if (m.size() == rows * cols) {
    m.resize(rows, cols);  // same size: Eigen keeps the storage
    return;
  }
  Derived fresh(rows, cols);
  m.swap(fresh);
}

// The data pointer of a matrix with direct access, else nullptr (an expression has no storage of its own).
template <class Derived>
const typename Derived::Scalar* data_or_null(const Eigen::MatrixBase<Derived>& m) {
  if constexpr (bool(Derived::Flags & Eigen::DirectAccessBit))
    return m.derived().data();
  else
    return nullptr;
}

// Whether [a, a + na) and [b, b + nb) share memory.
template <class Scalar>
bool overlaps(const Scalar* a, Index na, const Scalar* b, Index nb) {
  if (!a || !b || na <= 0 || nb <= 0) return false;
  return std::less<const Scalar*>()(a, b + nb) && std::less<const Scalar*>()(b, a + na);
}

// Every entry is finite. One vectorised pass: the largest |x| with NaN propagated, compared with the
// largest finite value. Eigen's allFinite() tests x - x == x - x entry by entry, without SIMD, and
// costed more than the whole AdamW update of a large parameter.
template <class Derived>
bool all_finite(const Eigen::DenseBase<Derived>& m) {
  using S = typename Derived::Scalar;
  if (m.size() == 0) return true;
  const S largest = m.derived().array().abs().template maxCoeff<Eigen::PropagateNaN>();
  return largest <= std::numeric_limits<S>::max();
}

template <class Derived>
void require_finite(const char* where, const char* what, const Eigen::DenseBase<Derived>& m) {
  if (!all_finite(m)) fail(where, what, " contains NaN or Inf");
}

}  // namespace detail
}  // namespace lora
