// lora.hpp: a classifier's training epoch and evaluation, for any optimiser (the update is a callable).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <lora/common.hpp>
#include <lora/data.hpp>
#include <lora/nn/loss.hpp>
#include <lora/nn/sequential.hpp>
#include <utility>
#include <vector>

namespace lora::nn {

// Throws std::invalid_argument naming `where` unless the dataset is valid and fits the model: as many
// columns as the model's in_features, at most as many classes as its out_features (a head may be wider
// than the classes a data set uses: its labels are still indices of output columns).
template <class Scalar>
void check_dataset(const char* where, const Sequential<Scalar>& model, const data::Dataset<Scalar>& data) {
  data.validate(where);
  if (model.in_features() >= 0 && data.dim() != model.in_features())
    detail::fail(where, "the dataset has ", data.dim(),
                 " features per row, the model expects in_features = ", model.in_features());
  if (model.out_features() >= 0 && data.num_classes > model.out_features())
    detail::fail(where, "the dataset has ", data.num_classes,
                 " classes, more than the model's out_features = ", model.out_features());
}

struct EpochStats {
  double loss = 0;      // mean loss over the epoch's samples (as seen while training)
  double accuracy = 0;  // fraction of the epoch's samples whose largest output is at their label
  double seconds = 0;
  Index samples = 0;
};

// A loss for train_epoch and evaluate: any callable
//   double loss(const Matrix<Scalar>& output, const data::MiniBatches<Scalar>::Batch& batch, Matrix<Scalar>& grad)
// returning the batch's mean loss and assigning grad = dL/d(output) (the shape of output).
// softmax_cross_entropy<Scalar>() is the default one.
template <class Scalar>
auto softmax_cross_entropy() {
  return [loss = SoftmaxCrossEntropy<Scalar>()](const Matrix<Scalar>& output, const auto& batch,
                                                Matrix<Scalar>& grad) mutable {
    const double value = loss.forward(output, batch.y);
    grad = loss.backward();
    return value;
  };
}

}  // namespace lora::nn

namespace lora::detail {
template <class Scalar>
void require_finite_outputs(const char* where, const Matrix<Scalar>& out, Index first_row) {
  if (all_finite(out)) return;
  for (Index i = 0; i < out.rows(); ++i)
    if (!out.row(i).allFinite())
      fail(where, "the model's output for row ", first_row + i,
           " is not finite (NaN or Inf): the input row or the model holds NaN/Inf, or it overflowed; "
           "no prediction is made from it");
}
}  // namespace lora::detail

namespace lora::nn {

// One epoch in training mode: for each batch, forward, the loss and its gradient, zero_grad,
// backward_parameters, then step() (the optimiser's update, e.g. [&] { adam.step(params); }).
// The caller shuffles the batches. Throws when a batch's loss is not finite.
template <class Scalar, class Loss, class Step>
EpochStats train_epoch(Sequential<Scalar>& model, data::MiniBatches<Scalar>& batches, Loss&& loss, Step&& step) {
  constexpr const char* where = "train_epoch";
  const auto start = std::chrono::steady_clock::now();
  check_dataset(where, model, batches.dataset());
  model.train();
  Matrix<Scalar> grad;
  EpochStats stats;
  double loss_sum = 0, correct = 0;
  for (Index b = 0; b < batches.size(); ++b) {
    const auto& batch = batches.load(b);
    const Matrix<Scalar>& output = model.forward(batch.X);
    const double batch_loss = loss(output, batch, grad);
    if (!std::isfinite(batch_loss))
      lora::detail::fail(where, "the loss of batch ", b, " is ", batch_loss,
                         "; lower the learning rate or check the data");
    if (grad.rows() != output.rows() || grad.cols() != output.cols())
      lora::detail::fail(where, "the loss gave a gradient of shape ", lora::detail::shape_of(grad), " for outputs of ",
                         lora::detail::shape_of(output));
    const auto n = static_cast<double>(batch.X.rows());
    loss_sum += batch_loss * n;
    correct += accuracy(output, batch.y) * n;
    stats.samples += batch.X.rows();
    model.zero_grad();
    model.backward_parameters(grad);
    step();
  }
  stats.loss = loss_sum / static_cast<double>(stats.samples);
  stats.accuracy = correct / static_cast<double>(stats.samples);
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return stats;
}

// The same with softmax cross-entropy.
template <class Scalar, class Step>
EpochStats train_epoch(Sequential<Scalar>& model, data::MiniBatches<Scalar>& batches, Step&& step) {
  return train_epoch(model, batches, softmax_cross_entropy<Scalar>(), std::forward<Step>(step));
}

// The model's outputs (logits) for every row, in eval mode and in chunks of batch_size rows (the model's
// mode is restored afterwards). Throws, naming the row, when an output is NaN or Inf: a non-finite
// output never becomes a prediction.
template <class Scalar>
void predict_logits(Sequential<Scalar>& model, const typename Module<Scalar>::Input& X, Matrix<Scalar>& out,
                    Index batch_size = 4096) {
  constexpr const char* where = "predict";
  if (batch_size < 1) lora::detail::fail(where, "batch_size must be >= 1, got ", batch_size);
  if (X.rows() == 0) lora::detail::fail(where, "the input has no rows");
  const bool was_training = model.training();
  model.eval();
  try {
    for (Index begin = 0; begin < X.rows(); begin += batch_size) {
      const Index rows = std::min(batch_size, X.rows() - begin);
      const Matrix<Scalar>& part = model.forward(X.middleRows(begin, rows));
      if (begin == 0) out.resize(X.rows(), part.cols());
      detail::require_finite_outputs(where, part, begin);
      out.middleRows(begin, rows) = part;
    }
  } catch (...) {
    model.train(was_training);
    throw;
  }
  model.train(was_training);
}

// softmax of the logits: each row a probability distribution over the outputs.
template <class Scalar>
void predict_proba(Sequential<Scalar>& model, const typename Module<Scalar>::Input& X, Matrix<Scalar>& out,
                   Index batch_size = 4096) {
  predict_logits(model, X, out, batch_size);
  for (Index i = 0; i < out.rows(); ++i) {
    auto row = out.row(i);
    row = (row.array() - row.maxCoeff()).exp().matrix();
    row /= row.sum();
  }
}

// The predicted class (largest logit, the first on ties) of every row; throws on a non-finite output.
template <class Scalar>
void predict(Sequential<Scalar>& model, const typename Module<Scalar>::Input& X, std::vector<int>& out,
             Index batch_size = 4096) {
  Matrix<Scalar> logits;
  predict_logits(model, X, logits, batch_size);
  argmax_rows(logits, out);
}

struct EvalStats {
  double loss = 0;      // mean loss over the data set
  double accuracy = 0;  // fraction classified correctly
  Index samples = 0;
};

// Loss and accuracy on a (held-out) data set, in eval mode (restored afterwards), in batches.
template <class Scalar, class Loss>
EvalStats evaluate(Sequential<Scalar>& model, const data::Dataset<Scalar>& data, Loss&& loss, Index batch_size = 4096) {
  constexpr const char* where = "evaluate";
  check_dataset(where, model, data);
  if (batch_size < 1) lora::detail::fail(where, "batch_size must be >= 1, got ", batch_size);
  data::MiniBatches<Scalar> batches(data, batch_size);
  const bool was_training = model.training();
  model.eval();
  EvalStats stats;
  Matrix<Scalar> grad;
  double loss_sum = 0, correct = 0;
  try {
    for (Index b = 0; b < batches.size(); ++b) {
      const auto& batch = batches.load(b);
      const Matrix<Scalar>& output = model.forward(batch.X);
      detail::require_finite_outputs(where, output, b * batch_size);
      const auto n = static_cast<double>(batch.X.rows());
      loss_sum += loss(output, batch, grad) * n;
      correct += accuracy(output, batch.y) * n;
      stats.samples += batch.X.rows();
    }
  } catch (...) {
    model.train(was_training);
    throw;
  }
  model.train(was_training);
  stats.loss = loss_sum / static_cast<double>(stats.samples);
  stats.accuracy = correct / static_cast<double>(stats.samples);
  return stats;
}

// With softmax cross-entropy.
template <class Scalar>
EvalStats evaluate(Sequential<Scalar>& model, const data::Dataset<Scalar>& data, Index batch_size = 4096) {
  return evaluate(model, data, softmax_cross_entropy<Scalar>(), batch_size);
}

// Fraction of the dataset classified correctly (eval mode, restored afterwards).
template <class Scalar>
double evaluate_accuracy(Sequential<Scalar>& model, const data::Dataset<Scalar>& data, Index batch_size = 4096) {
  check_dataset("evaluate_accuracy", model, data);
  std::vector<int> predicted;
  predict(model, data.X, predicted, batch_size);
  Index correct = 0;
  for (std::size_t i = 0; i < predicted.size(); ++i) correct += predicted[i] == data.y[i] ? 1 : 0;
  return static_cast<double>(correct) / static_cast<double>(data.size());
}

}  // namespace lora::nn
