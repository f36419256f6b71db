// lora.hpp: softmax cross-entropy (computed by log-sum-exp, so large logits neither overflow nor lose
// the small probabilities), and accuracy.
#pragma once

#include <lora/common.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace lora::nn {

// Labels are class indices in [0, number of classes), one per row of the logits.
template <class Scalar>
class SoftmaxCrossEntropy {
  static_assert(is_supported_scalar_v<Scalar>, "SoftmaxCrossEntropy<Scalar> supports float and double only.");

 public:
  using MatrixType = Matrix<Scalar>;

  // forward(Z, y)
  //   requires: Z [n x k] finite, n >= 1, k >= 1; y has n entries in [0, k).
  //   ensures:  returns the mean over rows of  log sum_j exp(Z_ij) - Z_i,y_i  (accumulated in double);
  //             keeps softmax(Z) for backward().
  // backward()
  //   ensures:  returns dL/dZ = (softmax(Z) - onehot(y)) / n for the last forward().
  double forward(const Eigen::Ref<const MatrixType>& logits, const std::vector<int>& labels);
  const MatrixType& backward();

  // softmax(Z) of the last forward.
  const MatrixType& probabilities() const { return probabilities_; }

 private:
  MatrixType probabilities_, grad_;
  std::vector<int> labels_;
};

// Checks that the labels fit [0, num_classes) and match n rows; `where` names the caller.
inline void check_labels(const char* where, const std::vector<int>& labels, Index n, Index num_classes) {
  if (static_cast<Index>(labels.size()) != n)
    detail::fail(where, "got ", labels.size(), " labels for ", n, " rows");
  for (std::size_t i = 0; i < labels.size(); ++i)
    if (labels[i] < 0 || labels[i] >= num_classes)
      detail::fail(where, "label ", labels[i], " at index ", i, " is outside [0, ", num_classes, ")");
}

// Index of the largest entry of each row (the first one on ties), into `out` (resized to n).
template <class Derived>
void argmax_rows(const Eigen::MatrixBase<Derived>& logits, std::vector<int>& out) {
  out.resize(static_cast<std::size_t>(logits.rows()));
  for (Index i = 0; i < logits.rows(); ++i) {
    Index j = 0;
    logits.row(i).maxCoeff(&j);
    out[static_cast<std::size_t>(i)] = static_cast<int>(j);
  }
}

// Fraction of rows whose largest logit is at the label.
template <class Derived>
double accuracy(const Eigen::MatrixBase<Derived>& logits, const std::vector<int>& labels) {
  check_labels("accuracy", labels, logits.rows(), logits.cols());
  if (logits.rows() == 0) detail::fail("accuracy", "no rows");
  Index correct = 0;
  for (Index i = 0; i < logits.rows(); ++i) {
    Index j = 0;
    logits.row(i).maxCoeff(&j);
    correct += j == labels[static_cast<std::size_t>(i)] ? 1 : 0;
  }
  return static_cast<double>(correct) / static_cast<double>(logits.rows());
}

// ===================================================================================================
// Implementation

template <class Scalar>
double SoftmaxCrossEntropy<Scalar>::forward(const Eigen::Ref<const MatrixType>& logits, const std::vector<int>& labels) {
  constexpr const char* where = "SoftmaxCrossEntropy::forward";
  const Index n = logits.rows(), k = logits.cols();
  if (n == 0 || k == 0) detail::fail(where, "logits are empty (", detail::shape_of(logits), ")");
  check_labels(where, labels, n, k);
  detail::require_finite(where, "logits", logits);
  probabilities_.resize(n, k);
  double total = 0;
  for (Index i = 0; i < n; ++i) {
    // log sum exp z = m + log sum exp(z - m), m = max z: every exponent is <= 0 and one is exactly 0.
    const Scalar m = logits.row(i).maxCoeff();
    auto p = probabilities_.row(i);
    p = (logits.row(i).array() - m).exp().matrix();
    const Scalar sum = p.sum();
    p /= sum;
    const double log_sum_exp = static_cast<double>(m) + std::log(static_cast<double>(sum));
    total += log_sum_exp - static_cast<double>(logits(i, labels[static_cast<std::size_t>(i)]));
  }
  labels_ = labels;
  return total / static_cast<double>(n);
}

template <class Scalar>
const typename SoftmaxCrossEntropy<Scalar>::MatrixType& SoftmaxCrossEntropy<Scalar>::backward() {
  if (labels_.empty()) detail::fail("SoftmaxCrossEntropy::backward", "call forward() first");
  const Index n = probabilities_.rows();
  grad_ = probabilities_;
  for (Index i = 0; i < n; ++i) grad_(i, labels_[static_cast<std::size_t>(i)]) -= Scalar(1);
  grad_ /= static_cast<Scalar>(n);
  return grad_;
}

}  // namespace lora::nn
