// The tests' gradient checker (central differences of a scalar loss against an analytic gradient), and
// the small helpers every test file uses.
#pragma once

#include <lora/common.hpp>
#include <lora/parameter.hpp>
#include <lora/detail/kernels.hpp>

#include <Eigen/Core>

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace lora::testing {

// d loss / d param by central differences; `loss` must read `param` (a matrix, or a writable view such
// as lora::ParamRef: anything with coeffRef). Every entry is perturbed by +-h and restored exactly.
template <class Param, class Loss>
Matrix<double> numerical_gradient(Param&& param, Loss&& loss, double h = 1e-6) {
  Matrix<double> g(param.rows(), param.cols());
  for (Index i = 0; i < param.rows(); ++i)
    for (Index j = 0; j < param.cols(); ++j) {
      const double saved = param.coeffRef(i, j);
      param.coeffRef(i, j) = static_cast<typename std::decay_t<Param>::Scalar>(saved + h);
      const double up = loss();
      param.coeffRef(i, j) = static_cast<typename std::decay_t<Param>::Scalar>(saved - h);
      const double down = loss();
      param.coeffRef(i, j) = static_cast<typename std::decay_t<Param>::Scalar>(saved);
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

// A reproducible uniform [-1, 1] matrix.
template <class Scalar>
Matrix<Scalar> random_matrix(Index rows, Index cols, unsigned seed) {
  std::srand(seed);
  return Matrix<Scalar>::Random(rows, cols);
}

inline bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// The message of the std::invalid_argument that call() throws, or "(no exception)".
template <class Call>
std::string message_of(Call&& call) {
  try {
    call();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "(no exception)";
}

// Checks every trainable parameter's gradient of f = <forward(X), R> against central differences, and
// dL/dX too unless the input is token ids (with_input = false: an Embedding at the bottom has no dX).
template <class M>
void check_module_gradients(M& module, Matrix<double> X, unsigned seed, bool with_input = true) {
  module.train();
  const Matrix<double> Y = module.forward(X);
  const Matrix<double> R = random_matrix<double>(Y.rows(), Y.cols(), seed);
  auto loss = [&] { return module.forward(X).cwiseProduct(R).sum(); };
  module.zero_grad();
  module.forward(X);
  const Matrix<double> dX = module.backward(R);
  INFO(module.describe());
  if (with_input) CHECK(relative_error(dX, numerical_gradient(X, loss)) < 1e-7);
  lora::ParameterList<double> params;
  module.collect_parameters(params, "");
  for (auto& p : params) {
    INFO(p.name);
    const Matrix<double> analytic = p.grad;
    CHECK(analytic.norm() > 0);
    CHECK(relative_error(analytic, numerical_gradient(p.value, loss)) < 1e-7);
  }
}

// For its lifetime, the kernels thread any product of more than `work` multiply-adds per thread, so that
// the small shapes of a test run the threaded splits (the library's threshold keeps them on one thread).
struct ThreadSmallWork {
  double saved = lora::detail::work_per_thread;
  explicit ThreadSmallWork(double work = 256) { lora::detail::work_per_thread = work; }
  ~ThreadSmallWork() { lora::detail::work_per_thread = saved; }
  ThreadSmallWork(const ThreadSmallWork&) = delete;
  ThreadSmallWork& operator=(const ThreadSmallWork&) = delete;
};

}  // namespace lora::testing
