// The tests' gradient checker: central differences of a scalar loss against an analytic gradient.
#pragma once

#include <lora/common.hpp>

#include <Eigen/Core>

#include <cmath>

namespace lora::testing {

// d loss / d param by central differences; `loss` must read `param` (a matrix or a writable view).
// Every entry is perturbed by +-h and restored exactly.
template <class Derived, class Loss>
Matrix<double> numerical_gradient(Eigen::MatrixBase<Derived>& param, Loss&& loss, double h = 1e-6) {
  Matrix<double> g(param.rows(), param.cols());
  for (Index i = 0; i < param.rows(); ++i)
    for (Index j = 0; j < param.cols(); ++j) {
      const double saved = param(i, j);
      param(i, j) = saved + h;
      const double up = loss();
      param(i, j) = saved - h;
      const double down = loss();
      param(i, j) = saved;
      g(i, j) = (up - down) / (2 * h);
    }
  return g;
}

// |a - b| / (|a| + |b|) in the Frobenius norm; 0 when both are zero.
template <class DA, class DB>
double relative_error(const Eigen::MatrixBase<DA>& a, const Eigen::MatrixBase<DB>& b) {
  const double denom = a.template cast<double>().norm() + b.template cast<double>().norm();
  const double diff = (a.template cast<double>() - b.template cast<double>()).norm();
  return denom == 0 ? 0.0 : diff / denom;
}

// Per-type tolerance for comparing a float/double computation with a double reference.
template <class Scalar>
constexpr double tolerance() {
  return std::is_same_v<Scalar, float> ? 1e-4 : 1e-11;
}

}  // namespace lora::testing
