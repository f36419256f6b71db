// lora.hpp: a classifier's training epoch and evaluation, for any optimiser (the update is a callable).
#pragma once

#include <lora/common.hpp>
#include <lora/data.hpp>
#include <lora/nn/loss.hpp>
#include <lora/nn/sequential.hpp>

#include <algorithm>
#include <chrono>
#include <vector>

namespace lora::nn {

// Throws std::invalid_argument naming `where` unless the dataset is valid and fits the model: as many
// columns as the model's in_features, as many classes as its out_features.
template <class Scalar>
void check_dataset(const char* where, const Sequential<Scalar>& model, const data::Dataset<Scalar>& data) {
  data.validate(where);
  if (model.in_features() >= 0 && data.dim() != model.in_features())
    detail::fail(where, "the dataset has ", data.dim(), " features per row, the model expects in_features = ",
                 model.in_features());
  if (model.out_features() >= 0 && data.num_classes != model.out_features())
    detail::fail(where, "the dataset has ", data.num_classes, " classes, the model has out_features = ",
                 model.out_features());
}

struct EpochStats {
  double loss = 0;      // mean cross-entropy over the epoch's samples (as seen while training)
  double accuracy = 0;  // fraction of the epoch's samples classified correctly while training
  double seconds = 0;
  Index samples = 0;
};

// One epoch in training mode: for each batch, forward, softmax cross-entropy, zero_grad,
// backward_parameters, then step() (the optimiser's update, e.g. [&] { adam.step(params); }).
// The caller shuffles the batches.
template <class Scalar, class Step>
EpochStats train_epoch(Sequential<Scalar>& model, data::MiniBatches<Scalar>& batches, Step&& step) {
  const auto start = std::chrono::steady_clock::now();
  check_dataset("train_epoch", model, batches.dataset());
  model.train();
  SoftmaxCrossEntropy<Scalar> loss;
  EpochStats stats;
  double loss_sum = 0, correct = 0;
  for (Index b = 0; b < batches.size(); ++b) {
    const auto& batch = batches.load(b);
    const Matrix<Scalar>& logits = model.forward(batch.X);
    const double batch_loss = loss.forward(logits, batch.y);
    const auto n = static_cast<double>(batch.X.rows());
    loss_sum += batch_loss * n;
    correct += accuracy(logits, batch.y) * n;
    stats.samples += batch.X.rows();
    model.zero_grad();
    model.backward_parameters(loss.backward());
    step();
  }
  stats.loss = loss_sum / static_cast<double>(stats.samples);
  stats.accuracy = correct / static_cast<double>(stats.samples);
  stats.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return stats;
}

// The predicted class of every row, in eval mode and in chunks of batch_size rows (the model's mode
// is restored afterwards).
template <class Scalar>
void predict(Sequential<Scalar>& model, const typename Module<Scalar>::Input& X, std::vector<int>& out,
             Index batch_size = 4096) {
  if (batch_size < 1) detail::fail("predict", "batch_size must be >= 1, got ", batch_size);
  const bool was_training = model.training();
  model.eval();
  out.resize(static_cast<std::size_t>(X.rows()));
  std::vector<int> part;
  for (Index begin = 0; begin < X.rows(); begin += batch_size) {
    const Index rows = std::min(batch_size, X.rows() - begin);
    argmax_rows(model.forward(X.middleRows(begin, rows)), part);
    std::copy(part.begin(), part.end(), out.begin() + begin);
  }
  model.train(was_training);
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
