// Synthetic data and mini-batches; end-to-end training of a small classifier, full and with LoRA.
#include <lora/data.hpp>
#include <lora/lora.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <Eigen/Eigenvalues>

#include <algorithm>
#include <cmath>
#include <set>
#include <string>
#include <vector>

using lora::Index;
using lora::Matrix;
using lora::data::ClusterTask;
using lora::data::ClusterTaskConfig;
using lora::data::Dataset;
using lora::data::MiniBatches;
using lora::data::TaskShift;
using lora::testing::contains;
using lora::testing::message_of;
using lora::testing::random_matrix;

// ---- data -------------------------------------------------------------------------------------------

TEST_CASE("cluster tasks are seeded and well-formed", "[data]") {
  ClusterTaskConfig config;
  config.seed = 5;
  const ClusterTask task = ClusterTask::make(config);
  const Dataset<float> a = task.sample<float>(3000, 1), again = task.sample<float>(3000, 1);
  const Dataset<float> other = task.sample<float>(3000, 2);
  CHECK(a.X == again.X);
  CHECK(a.y == again.y);
  CHECK(a.X != other.X);
  CHECK(a.size() == 3000);
  CHECK(a.dim() == 32);
  CHECK(a.num_classes == 10);
  a.validate("test");
  std::vector<int> per_class(10, 0);
  for (int label : a.y) ++per_class[static_cast<std::size_t>(label)];
  CHECK(*std::min_element(per_class.begin(), per_class.end()) > 200);  // about 300 each
  // The centres span latent_dim = 8 dimensions of the 32: the Gram matrix of 30 centres has rank 8.
  const Matrix<double> gram = task.centres().transpose() * task.centres();
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(gram);
  const auto values = eig.eigenvalues();
  CHECK(values(32 - 9) < 1e-10 * values(31));
  CHECK(values(32 - 8) > 1e-3 * values(31));
}

TEST_CASE("task B is a rigid motion of task A with some labels changed", "[data]") {
  const ClusterTask a = ClusterTask::make({});
  TaskShift shift;
  const ClusterTask b = a.shifted(shift);
  const Matrix<double>& ca = a.centres();
  const Matrix<double>& cb = b.centres();
  REQUIRE(ca.rows() == 30);
  double moved = 0, scale = 0;
  for (Index i = 0; i < ca.rows(); ++i) {
    moved += (ca.row(i) - cb.row(i)).norm();
    for (Index j = 0; j < i; ++j) {
      const double da = (ca.row(i) - ca.row(j)).norm(), db = (cb.row(i) - cb.row(j)).norm();
      CHECK(std::abs(da - db) < 1e-12 * da);  // distances preserved: B is as separable as A
      scale += da;
    }
  }
  CHECK(moved / 30 > 0.5 * scale / (30 * 29 / 2));  // the blobs moved by a sizeable fraction of their spacing
  // Classes 0..3 cycle; blob 0 of every class goes to another class.
  int changed = 0;
  for (std::size_t i = 0; i < 30; ++i) changed += a.cluster_labels()[i] != b.cluster_labels()[i] ? 1 : 0;
  CHECK(changed == 4 * 3 + 6);
  CHECK(b.cluster_labels()[3] == 3);   // class 1, blob 0: cycled to 2, then given to 2 + 1
  CHECK(b.cluster_labels()[4] == 2);   // class 1, blob 1: cycled to 2
  CHECK(b.cluster_labels()[27] == 0);  // class 9, blob 0: reassigned to (9 + 1) mod 10
}

TEST_CASE("mini-batches visit every row once per epoch, in a new order each time", "[data]") {
  const Dataset<double> data = ClusterTask::make({}).sample<double>(103, 3);
  MiniBatches<double> batches(data, 10, 7);
  CHECK(batches.size() == 11);
  std::vector<std::vector<int>> orders;
  for (int epoch = 0; epoch < 2; ++epoch) {
    batches.shuffle();
    std::multiset<std::vector<double>> rows;
    std::vector<int> labels;
    for (Index b = 0; b < batches.size(); ++b) {
      const auto& batch = batches.load(b);
      CHECK(batch.X.rows() == (b + 1 < batches.size() ? 10 : 3));
      for (Index i = 0; i < batch.X.rows(); ++i) {
        rows.insert(std::vector<double>(batch.X.row(i).data(), batch.X.row(i).data() + batch.X.cols()));
        labels.push_back(batch.y[static_cast<std::size_t>(i)]);
      }
    }
    std::multiset<std::vector<double>> expected;
    for (Index i = 0; i < data.size(); ++i)
      expected.insert(std::vector<double>(data.X.row(i).data(), data.X.row(i).data() + data.X.cols()));
    CHECK(rows == expected);
    orders.push_back(labels);
  }
  CHECK(orders[0] != orders[1]);
  MiniBatches<double> dropped(data, 10, 7, true);
  CHECK(dropped.size() == 10);
  MiniBatches<double> replay(data, 10, 7);
  replay.shuffle();
  batches = MiniBatches<double>(data, 10, 7);
  batches.shuffle();
  CHECK(replay.load(4).X == batches.load(4).X);
}

TEST_CASE("bad data gives clear errors", "[data][errors]") {
  Dataset<float> data = ClusterTask::make({}).sample<float>(20, 1);
  std::string m = message_of([&] { MiniBatches<float>(data, 0); });
  CHECK(contains(m, "MiniBatches::MiniBatches: batch_size must be >= 1, got 0"));
  m = message_of([&] { MiniBatches<float>(data, 50, 0, true); });
  CHECK(contains(m, "drop_last with batch_size 50 > dataset size 20 leaves no batch"));
  Dataset<float> short_labels = data;
  short_labels.y.pop_back();
  m = message_of([&] { MiniBatches<float>(short_labels, 4); });
  CHECK(contains(m, "the dataset has 20 rows but 19 labels"));
  Dataset<float> bad_label = data;
  bad_label.y[3] = 10;
  m = message_of([&] { bad_label.validate("check"); });
  CHECK(contains(m, "check: label 10 at row 3 is outside [0, 10)"));

  lora::nn::Sequential<float> model;
  model.add(lora::nn::Linear<float>(16, 8));
  model.add(lora::nn::ReLU<float>());
  model.add(lora::nn::Linear<float>(8, 10));
  m = message_of([&] { lora::nn::evaluate_accuracy(model, data); });
  CHECK(contains(m, "evaluate_accuracy: the dataset has 32 features per row, the model expects in_features = 16"));
  MiniBatches<float> batches(data, 4);
  m = message_of([&] { lora::nn::train_epoch(model, batches, [] {}); });
  CHECK(contains(m, "train_epoch: the dataset has 32 features per row, the model expects in_features = 16"));
  lora::nn::Sequential<float> narrow;
  narrow.add(lora::nn::Linear<float>(32, 4));
  m = message_of([&] { lora::nn::evaluate_accuracy(narrow, data); });
  CHECK(contains(m, "the dataset has 10 classes, the model has out_features = 4"));

  ClusterTaskConfig config;
  config.latent_dim = 40;
  m = message_of([&] { ClusterTask::make(config); });
  CHECK(contains(m, "ClusterTask::make: latent_dim must be in [1, dim = 32], got 40"));
  TaskShift shift;
  shift.rotated_planes = 9;
  m = message_of([&] { ClusterTask::make({}).shifted(shift); });
  CHECK(contains(m, "rotated_planes must be in [0, min(latent_dim, dim - latent_dim) = 8], got 9"));
  shift = TaskShift();
  shift.reassigned_clusters = 3;
  m = message_of([&] { ClusterTask::make({}).shifted(shift); });
  CHECK(contains(m, "reassigned_clusters must be in [0, clusters_per_class = 3), got 3"));
}

// ---- end-to-end -------------------------------------------------------------------------------------

namespace {

lora::nn::Sequential<float> small_classifier() {
  lora::nn::Sequential<float> model;
  model.add(lora::nn::Linear<float>(32, 64, true, 1));
  model.add(lora::nn::ReLU<float>());
  model.add(lora::nn::Linear<float>(64, 64, true, 2));
  model.add(lora::nn::ReLU<float>());
  model.add(lora::nn::Linear<float>(64, 10, true, 3));
  return model;
}

// Trains every trainable parameter for `epochs`; returns the mean loss of each epoch.
std::vector<double> fit(lora::nn::Sequential<float>& model, const Dataset<float>& train, int epochs, double lr) {
  lora::optim::AdamWOptions options;
  options.lr = lr;
  lora::optim::AdamWf optimizer(options);
  auto params = model.parameters();
  MiniBatches<float> batches(train, 64, 3);
  std::vector<double> losses;
  for (int epoch = 0; epoch < epochs; ++epoch) {
    batches.shuffle();
    losses.push_back(lora::nn::train_epoch(model, batches, [&] { optimizer.step(params); }).loss);
  }
  return losses;
}

}  // namespace

TEST_CASE("a small MLP learns task A, then LoRA adapts it to task B with the base frozen", "[training]") {
  // Products of 64 x 64 are too small to gain from threads; Eigen would still split them over OpenMP, and
  // on a busy machine each fork-join waits for a descheduled thread (measured: 20 s instead of 0.3 s).
  const int threads = Eigen::nbThreads();
  Eigen::setNbThreads(1);
  struct Restore {
    int n;
    ~Restore() { Eigen::setNbThreads(n); }
  } restore{threads};
  const ClusterTask task_a = ClusterTask::make({});
  const ClusterTask task_b = task_a.shifted({});
  const Dataset<float> a_train = task_a.sample<float>(3000, 1), a_test = task_a.sample<float>(2000, 2);
  const Dataset<float> b_train = task_b.sample<float>(2000, 3), b_test = task_b.sample<float>(2000, 4);

  lora::nn::Sequential<float> model = small_classifier();
  const double chance = lora::nn::evaluate_accuracy(model, a_test);
  const std::vector<double> losses = fit(model, a_train, 8, 3e-3);
  INFO("losses: first " << losses.front() << ", last " << losses.back());
  CHECK(losses.back() < 0.5 * losses.front());
  for (std::size_t i = 1; i < 4; ++i) CHECK(losses[i] < losses[i - 1]);  // falls steadily at first
  const double accuracy_a = lora::nn::evaluate_accuracy(model, a_test);
  INFO("accuracy on A: untrained " << chance << ", trained " << accuracy_a);
  CHECK(accuracy_a >= 0.88);
  const double frozen_b = lora::nn::evaluate_accuracy(model, b_test);
  CHECK(frozen_b < 0.4);  // B's blobs moved and were relabelled: the base does poorly

  lora::nn::LoraInjectConfig config;
  config.target_modules = {"layers.0", "layers.2"};
  config.modules_to_save = {"layers.4"};
  config.rank = 4;
  config.alpha = 8;
  config.init = lora::InitMethod::kaiming_uniform;
  lora::nn::inject_lora(model, config);
  std::vector<Matrix<float>> base_before;
  for (const char* name : {"layers.0.weight", "layers.2.weight", "layers.2.bias"})
    base_before.push_back(model.base_tensor(name));
  const std::vector<double> lora_losses = fit(model, b_train, 12, 3e-3);
  CHECK(lora_losses.back() < 0.3 * lora_losses.front());
  const double lora_b = lora::nn::evaluate_accuracy(model, b_test);
  INFO("accuracy on B: frozen base " << frozen_b << ", LoRA " << lora_b);
  CHECK(lora_b >= 0.80);
  // Only the adapters and the head trained: the base weights are bit-identical.
  std::size_t k = 0;
  for (const char* name : {"layers.0.weight", "layers.2.weight", "layers.2.bias"})
    CHECK(model.base_tensor(name) == base_before[k++]);

  // Merged, the model predicts the same classes.
  std::vector<int> unmerged, merged;
  lora::nn::predict(model, b_test.X, unmerged);
  model.merge();
  lora::nn::predict(model, b_test.X, merged);
  CHECK(unmerged == merged);
}

TEST_CASE("a non-positive learning rate is refused", "[training][errors]") {
  lora::optim::AdamWOptions adam;
  adam.lr = 0;
  std::string m = message_of([&] { lora::optim::AdamWf optimizer(adam); });
  CHECK(contains(m, "AdamW::AdamW: lr must be finite and > 0, got 0"));
  lora::optim::SGDOptions sgd;
  sgd.lr = -0.1;
  m = message_of([&] { lora::optim::SGDf optimizer(sgd); });
  CHECK(contains(m, "SGD::SGD: lr must be finite and > 0, got -0.1"));
}
