// Synthetic data and mini-batches; end-to-end training of a small classifier, full and with LoRA.
#include <lora/data.hpp>
#include <lora/lora.hpp>

#include "instances.hpp"
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
using lora::testing::relative_error;

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
  CHECK(contains(m, "evaluate_accuracy: the dataset has 10 classes, more than the model's out_features = 4"));

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

// ---- the model API: stale lists, freezing, predictions, losses, modules_to_save --------------------

namespace {

using lora::nn::Sequential;

Sequential<double> mlp() {
  Sequential<double> m;
  m.add(lora::nn::Linear<double>(6, 8, true, 11));
  m.add(lora::nn::ReLU<double>());
  m.add(lora::nn::Linear<double>(8, 8, true, 12));
  m.add(lora::nn::ReLU<double>());
  m.add(lora::nn::Linear<double>(8, 4, true, 13));
  return m;
}

lora::nn::LoraInjectConfig qv_config() {
  lora::nn::LoraInjectConfig c;
  c.target_modules = {"layers.0", "layers.2"};
  c.modules_to_save = {"layers.4"};
  c.rank = 2;
  c.init = lora::InitMethod::random;
  return c;
}

std::vector<std::string> names(const lora::ParameterList<double>& params) {
  std::vector<std::string> out;
  for (const auto& p : params) out.push_back(p.name);
  return out;
}

// One forward/backward so that every gradient is set, then an optimiser step over `params`.
void step(Sequential<double>& model, lora::optim::AdamWd& adam, lora::ParameterList<double>& params) {
  const Matrix<double> X = random_matrix<double>(3, 6, 5);
  model.zero_grad();
  model.backward(Matrix<double>::Ones(3, model.forward(X).cols()));
  adam.step(params);
}

}  // namespace

TEST_CASE("a parameter list made before the model changed throws on use, naming the parameter", "[nn][state][errors]") {
  lora::optim::AdamWd adam{lora::optim::AdamWOptions{}};
  Sequential<double> model = mlp();
  SECTION("inject_lora") {
    auto params = model.parameters();
    lora::nn::inject_lora(model, qv_config());
    CHECK(contains(message_of([&] { step(model, adam, params); }), "AdamW::step: 'layers.0.weight' no longer exists"));
  }
  SECTION("set_trainable and set_requires_grad") {
    auto params = model.parameters();
    dynamic_cast<lora::nn::Linear<double>&>(model[2]).set_trainable(false);
    CHECK(contains(message_of([&] { step(model, adam, params); }), "'layers.2.weight' no longer exists"));
    params = model.parameters();
    model.set_requires_grad("layers.4", false);
    CHECK(contains(message_of([&] { step(model, adam, params); }), "'layers.4.weight' no longer exists"));
    params = model.parameters();
    step(model, adam, params);  // a fresh list works
  }
  SECTION("replace_module") {
    auto params = model.parameters();
    model.replace_module("layers.4", std::make_unique<lora::nn::Linear<double>>(8, 4, true, 99));
    CHECK(contains(message_of([&] { step(model, adam, params); }), "'layers.4.weight' no longer exists"));
  }
  SECTION("adapters: activate, delete, merge") {
    lora::nn::LoraInjectConfig c = qv_config();
    c.modules_to_save.clear();  // two active adapters may not both have a copy of a saved module
    lora::nn::inject_lora(model, c);
    auto params = model.parameters();
    step(model, adam, params);
    lora::add_adapter(model, "other", c);
    step(model, adam, params);  // an inactive adapter changes no trainable set
    lora::set_active_adapters(model, {"default", "other"});
    std::string m = message_of([&] { step(model, adam, params); });
    CHECK(contains(m, "AdamW::step: parameter 'layers.0.lora_A.default.weight': the trainable parameters of its layer "
                      "changed after this list was made"));
    lora::set_active_adapters(model, {"default"});
    params = model.parameters();
    lora::set_active_adapters(model, {"other"});
    lora::delete_adapter(model, "default");
    CHECK(contains(message_of([&] { step(model, adam, params); }), "'layers.0.lora_A.default.weight' no longer exists"));
    params = model.parameters();
    model.merge();
    CHECK(contains(message_of([&] { adam.step(params); }), "cannot be written: "));
    model.unmerge();
    step(model, adam, params);
    lora::disable_adapters(model);
    CHECK_THROWS(step(model, adam, params));
  }
}

TEST_CASE("set_requires_grad freezes a model, a sub-tree or a LoRA layer", "[nn]") {
  Sequential<double> model;
  model.add("embed", lora::nn::Linear<double>(6, 8, true, 1));
  Sequential<double> block("unused");
  block.add(lora::nn::Linear<double>(8, 8, true, 2));
  block.add(lora::nn::Tanh<double>());
  block.add(lora::nn::Linear<double>(8, 8, true, 3));
  model.add("block", std::move(block));
  model.add("head", lora::nn::Linear<double>(8, 3, true, 4));
  model.set_requires_grad("layers.block", false);
  CHECK(names(model.parameters()) ==
        std::vector<std::string>{"layers.embed.weight", "layers.embed.bias", "layers.head.weight", "layers.head.bias"});
  model.set_requires_grad(false);
  CHECK(model.parameters().empty());
  CHECK(model.num_trainable_parameters() == 0);
  model.set_requires_grad("layers.block.2", true);
  CHECK(names(model.parameters()) == std::vector<std::string>{"layers.block.2.weight", "layers.block.2.bias"});
  CHECK(contains(message_of([&] { model.set_requires_grad("layers.blok", true); }),
                 "Sequential::set_requires_grad: no module or sub-tree named 'layers.blok'"));

  Sequential<double> adapted = mlp();
  lora::nn::LoraInjectConfig c = qv_config();
  c.bias = lora::BiasMode::lora_only;
  lora::nn::inject_lora(adapted, c);
  const Index total = adapted.num_parameters();
  adapted.set_requires_grad("layers.0", false);
  CHECK(names(adapted.parameters()) ==
        std::vector<std::string>{"layers.2.lora_A.default.weight", "layers.2.lora_B.default.weight", "layers.2.bias",
                                 "layers.4.modules_to_save.default.weight", "layers.4.modules_to_save.default.bias"});
  CHECK(adapted.num_parameters() == total);
  // A frozen adapter still applies and passes gradients through.
  const Matrix<double> X = random_matrix<double>(4, 6, 3);
  adapted.eval();
  const Matrix<double> y = adapted.forward(X);
  adapted.set_requires_grad(true);
  CHECK(adapted.forward(X) == y);
  CHECK(names(adapted.parameters()).size() == 8);
  adapted.train();
  for (auto& [path, layer] : adapted.lora_layers()) layer->B().setRandom();
  adapted.set_requires_grad("layers.2", false);
  lora::testing::check_module_gradients(adapted, X, 17);
}

TEST_CASE("predictions: classes, logits and probabilities; a NaN output is an error", "[nn][errors]") {
  Sequential<double> model = mlp();
  const Matrix<double> X = random_matrix<double>(9, 6, 21);
  Matrix<double> logits, probabilities;
  lora::nn::predict_logits(model, X, logits, 4);  // batches of 4, 4 and 1
  model.eval();
  CHECK(relative_error(logits, model.forward(X)) < 1e-15);
  lora::nn::predict_proba(model, X, probabilities);
  CHECK((probabilities.rowwise().sum().array() - 1).abs().maxCoeff() < 1e-15);
  CHECK((probabilities.array() > 0).all());
  std::vector<int> classes;
  lora::nn::predict(model, X, classes);
  for (Index i = 0; i < X.rows(); ++i) {
    Index best = 0;
    logits.row(i).maxCoeff(&best);
    CHECK(classes[static_cast<std::size_t>(i)] == best);
  }
  Matrix<double> bad = X;
  bad(6, 2) = std::numeric_limits<double>::quiet_NaN();
  model.train();
  const std::string m = message_of([&] { lora::nn::predict(model, bad, classes, 4); });
  CHECK(contains(m, "predict: the model's output for row 6 is not finite (NaN or Inf)"));
  CHECK(model.training());  // the mode is restored on a throw too
  CHECK_THROWS(lora::nn::predict_proba(model, bad, probabilities));
}

TEST_CASE("train_epoch takes any loss; evaluate gives the held-out loss; a head may be wider than the classes",
          "[training]") {
  ClusterTaskConfig config;
  config.num_classes = 3;
  config.dim = 6;
  config.latent_dim = 3;
  config.clusters_per_class = 2;
  config.noise = 0.3;
  config.spread = 2;
  const ClusterTask task = ClusterTask::make(config);
  const Dataset<double> train = task.sample<double>(300, 1), test = task.sample<double>(300, 2);
  Sequential<double> model = mlp();  // 4 outputs for 3 classes
  // Squared error against one-hot targets, mean over the batch.
  auto squared_error = [](const Matrix<double>& out, const MiniBatches<double>::Batch& batch, Matrix<double>& grad) {
    grad = out;
    for (Index i = 0; i < out.rows(); ++i) grad(i, batch.y[static_cast<std::size_t>(i)]) -= 1;
    const double loss = 0.5 * grad.squaredNorm() / static_cast<double>(out.rows());
    grad /= static_cast<double>(out.rows());
    return loss;
  };
  const auto before = lora::nn::evaluate(model, test, squared_error);
  lora::optim::AdamWOptions options;
  options.lr = 1e-2;
  lora::optim::AdamWd adam(options);
  auto params = model.parameters();
  MiniBatches<double> batches(train, 30, 4);
  lora::nn::EpochStats last;
  for (int epoch = 0; epoch < 30; ++epoch) {
    batches.shuffle();
    last = lora::nn::train_epoch(model, batches, squared_error, [&] { adam.step(params); });
  }
  const auto after = lora::nn::evaluate(model, test, squared_error);
  INFO("held-out squared error " << before.loss << " -> " << after.loss << ", accuracy " << after.accuracy);
  CHECK(after.loss < 0.2 * before.loss);
  CHECK(after.accuracy > 0.95);
  CHECK(after.samples == 300);
  CHECK(std::abs(last.loss - after.loss) < after.loss);  // training and held-out losses agree roughly
  const auto ce = lora::nn::evaluate(model, test);
  CHECK(ce.accuracy == after.accuracy);
  CHECK(ce.loss > 0);
  auto nan_loss = [](const Matrix<double>& out, const MiniBatches<double>::Batch&, Matrix<double>& grad) {
    grad = out;
    return std::numeric_limits<double>::quiet_NaN();
  };
  CHECK(contains(message_of([&] { lora::nn::train_epoch(model, batches, nan_loss, [] {}); }),
                 "train_epoch: the loss of batch 0 is nan"));
}

TEST_CASE("modules_to_save: the original stays, each adapter trains its own copy, as in PEFT", "[nn][adapters]") {
  Sequential<double> model = mlp();
  const Matrix<double> X = random_matrix<double>(5, 6, 31);
  model.eval();
  const Matrix<double> base = model.forward(X);
  lora::nn::inject_lora(model, qv_config());
  const auto& wrapper = *model.saved_modules().front().second;
  CHECK(wrapper.adapter_names() == std::vector<std::string>{"default"});
  // Train the adapter and the head copy (here: set them).
  auto& head = model.saved_modules().front().second->copy("default");
  head.weight().setRandom();
  for (auto& [path, layer] : model.lora_layers()) layer->B().setRandom();
  const Matrix<double> adapted = model.forward(X);
  CHECK((adapted - base).norm() > 1e-3);
  CHECK(model.base_tensor("layers.4.weight") == mlp().base_tensor("layers.4.weight"));  // the original

  const lora::ActiveAdapterState state = lora::disable_adapters(model);
  CHECK(relative_error(model.forward(X), base) < 1e-15);  // the base model, head included
  lora::enable_adapters(model, state);
  CHECK(model.forward(X) == adapted);

  // A second adapter gets its own copy of the original head.
  lora::add_adapter(model, "second", qv_config());
  CHECK(wrapper.adapter_names() == std::vector<std::string>{"default", "second"});
  CHECK(wrapper.copy("second").weight() == wrapper.original().weight());
  lora::set_active_adapters(model, {"second"});
  CHECK(names(model.parameters()) ==
        std::vector<std::string>{"layers.0.lora_A.second.weight", "layers.0.lora_B.second.weight",
                                 "layers.2.lora_A.second.weight", "layers.2.lora_B.second.weight",
                                 "layers.4.modules_to_save.second.weight", "layers.4.modules_to_save.second.bias"});
  model.saved_modules().front().second->copy("second").bias().setConstant(0.5);
  CHECK((model.forward(X) - base).norm() > 1e-3);
  CHECK(contains(message_of([&] { lora::set_active_adapters(model, {"default", "second"}); }),
                 "set_active_adapters: adapters 'default' and 'second' both have their own copy of the saved module "
                 "'layers.4'"));
  lora::set_active_adapters(model, {"default"});
  CHECK(model.forward(X) == adapted);  // the second adapter's training did not touch the first's head
  lora::delete_adapter(model, "second");
  CHECK(wrapper.adapter_names() == std::vector<std::string>{"default"});

  // merge_and_unload: PEFT's trainable set (merged weights frozen, the head copy trains on).
  Sequential<double> copy = model;
  lora::nn::merge_and_unload(copy);
  CHECK(copy.module("layers.4").type_name() == "Linear");
  CHECK(relative_error(copy.forward(X), adapted) < 1e-14);
  CHECK(names(copy.parameters()) == std::vector<std::string>{"layers.4.weight", "layers.4.bias"});
  lora::nn::LoraInjectConfig with_bias = qv_config();
  with_bias.bias = lora::BiasMode::lora_only;
  Sequential<double> biased = mlp();
  lora::nn::inject_lora(biased, with_bias);
  lora::nn::merge_and_unload(biased);
  CHECK(names(biased.parameters()) ==
        std::vector<std::string>{"layers.0.bias", "layers.2.bias", "layers.4.weight", "layers.4.bias"});
}

TEST_CASE("a saved module's copy trains and passes the gradient check", "[nn][adapters][gradient]") {
  Sequential<double> model = mlp();
  lora::nn::inject_lora(model, qv_config());
  for (auto& [path, layer] : model.lora_layers()) layer->B().setRandom();
  lora::testing::check_module_gradients(model, random_matrix<double>(4, 6, 41), 43);
}
