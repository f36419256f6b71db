// Model building blocks: every layer's gradient, the loss, Sequential, LoRA injection (target matching,
// freezing, bias modes, modules_to_save, errors), parameter counts, merge, base weights by name.
#include <lora/lora.hpp>

#include "instances.hpp"
#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

using lora::Index;
using lora::Matrix;
using lora::Vector;
using lora::nn::GELU;
using lora::nn::inject_lora;
using lora::nn::Linear;
using lora::nn::LoraInjectConfig;
using lora::nn::ReLU;
using lora::nn::Sequential;
using lora::nn::SoftmaxCrossEntropy;
using lora::nn::Tanh;
using lora::testing::check_module_gradients;
using lora::testing::numerical_gradient;
using lora::testing::relative_error;
using lora::testing::tolerance;
using lora::testing::contains;
using lora::testing::message_of;
using lora::testing::random_matrix;

namespace {

// A small MLP: 6 -> 10 -> 8 -> 4 with the three activations in turn.
template <class Scalar>
Sequential<Scalar> small_mlp(bool bias = true) {
  Sequential<Scalar> model;
  model.add(Linear<Scalar>(6, 10, bias, 1));
  model.add(Tanh<Scalar>());
  model.add(Linear<Scalar>(10, 8, bias, 2));
  model.add(GELU<Scalar>());
  model.add(Linear<Scalar>(8, 8, bias, 3));
  model.add(ReLU<Scalar>());
  model.add(Linear<Scalar>(8, 4, bias, 4));
  return model;
}

// A transformer's block layout: model.layers.{0,1,2}.{q,v}, and model.layers.1.experts.0.w (an index
// inside a layer).
Sequential<double> blocks_model() {
  Sequential<double> layers;
  for (int i = 0; i < 3; ++i) {
    Sequential<double> block;
    block.add("q", Linear<double>(4, 4, true, static_cast<std::uint64_t>(i)));
    block.add("v", Linear<double>(4, 4, true, static_cast<std::uint64_t>(i) + 10));
    if (i == 1) {
      Sequential<double> expert, experts;
      expert.add("w", Linear<double>(4, 4, true, 20));
      experts.add("0", std::move(expert));
      block.add("experts", std::move(experts));
    }
    layers.add(std::to_string(i), std::move(block));
  }
  Sequential<double> model("model");
  model.add("layers", std::move(layers));
  return model;
}

std::vector<std::string> lora_paths(const Sequential<double>& model) {
  std::vector<std::string> paths;
  for (const auto& entry : model.lora_layers()) paths.push_back(entry.first);
  return paths;
}

std::vector<std::string> names_of(const lora::ParameterList<double>& params) {
  std::vector<std::string> names;
  for (const auto& p : params) names.push_back(p.name);
  return names;
}

}  // namespace

// ---- layers -----------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("Linear forward equals x W^T + b", "[nn][linear]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> W = random_matrix<Scalar>(5, 3, 1);
  const Vector<Scalar> b = Vector<Scalar>::Random(5);
  const Matrix<Scalar> X = random_matrix<Scalar>(4, 3, 2);
  Linear<Scalar> layer(W, b);
  Matrix<Scalar> expected = X * W.transpose();
  expected.rowwise() += b.transpose();
  CHECK(relative_error(layer.forward(X), expected) < tolerance<Scalar>());
  CHECK(layer.num_parameters() == 20);
  CHECK(layer.num_trainable_parameters() == 20);
  // PyTorch's default init: U(-1/sqrt(in), 1/sqrt(in)), the same for the same seed.
  Linear<Scalar> fresh(400, 30, true, 9), again(400, 30, true, 9), other(400, 30, true, 10);
  CHECK(fresh.weight().cwiseAbs().maxCoeff() <= Scalar(0.05));
  CHECK(fresh.weight().cwiseAbs().maxCoeff() > Scalar(0.049));
  CHECK(fresh.weight() == again.weight());
  CHECK(fresh.weight() != other.weight());
}

TEST_CASE("Linear gradients match central differences, trainable or frozen", "[nn][linear][gradient]") {
  Linear<double> layer(random_matrix<double>(5, 3, 3), Vector<double>::Random(5));
  check_module_gradients(layer, random_matrix<double>(4, 3, 4), 5);

  // Frozen: no parameter gradients, dX still exact, and the input is not needed.
  layer.set_trainable(false);
  CHECK(layer.num_trainable_parameters() == 0);
  lora::ParameterList<double> params;
  layer.collect_parameters(params, "x.");
  CHECK(params.empty());
  check_module_gradients(layer, random_matrix<double>(4, 3, 6), 7);

  // Bias only.
  layer.set_trainable(false, true);
  params.clear();
  layer.collect_parameters(params, "head.");
  REQUIRE(params.size() == 1);
  CHECK(params[0].name == "head.bias");
  CHECK(params[0].role == lora::ParameterRole::bias);
  check_module_gradients(layer, random_matrix<double>(4, 3, 8), 9);
}

TEST_CASE("Linear gradients accumulate until zero_grad", "[nn][linear][gradient]") {
  Linear<double> layer(4, 3, true, 1);
  const Matrix<double> X = random_matrix<double>(5, 4, 1), R = random_matrix<double>(5, 3, 2);
  layer.forward(X);
  layer.backward(R);
  const Matrix<double> once = layer.grad_weight();
  layer.forward(X);
  layer.backward(R);
  CHECK(relative_error(layer.grad_weight(), 2 * once) < 1e-15);
  layer.zero_grad();
  CHECK(layer.grad_weight().isZero(0));
  CHECK(layer.grad_bias().isZero(0));
}

TEST_CASE("Linear writes dX over its kept input when the weight trains: once per forward", "[nn][linear]") {
  Linear<double> layer(4, 3, true, 1);
  const Matrix<double> X = random_matrix<double>(5, 4, 1), R = random_matrix<double>(5, 3, 2);
  const Matrix<double> W = layer.weight();
  const Matrix<double> Y = layer.forward(X);
  const Matrix<double> dX = layer.backward(R);
  CHECK(relative_error(dX, R * W) < 1e-15);
  const Matrix<double> gW = layer.grad_weight();
  CHECK(relative_error(gW, R.transpose() * X) < 1e-15);
  CHECK(contains(message_of([&] { layer.backward(R); }), "Linear::backward: no cached forward"));
  CHECK(contains(message_of([&] { layer.backward(R); }), "backward() already ran for the last forward()"));
  CHECK(layer.grad_weight() == gW);  // the refused call changed nothing
  CHECK(layer.forward(X) == Y);
  CHECK(layer.backward(R) == dX);
  CHECK(relative_error(layer.grad_weight(), 2 * gW) < 1e-15);
  // A frozen weight keeps no input: dX has its own buffer, and backward may run again.
  layer.set_trainable(false, true);
  layer.forward(X);
  CHECK(layer.backward(R) == dX);
  CHECK(layer.backward(R) == dX);
}

TEST_CASE("activations: values and gradients", "[nn][activation][gradient]") {
  const Matrix<double> X = 2 * random_matrix<double>(4, 5, 11);
  ReLU<double> relu;
  Tanh<double> tanh_layer;
  GELU<double> gelu;
  CHECK(relu.forward(X) == X.cwiseMax(0.0));
  CHECK(relative_error(tanh_layer.forward(X), Matrix<double>(X.array().tanh())) < 1e-15);
  // Reference values of x * Phi(x).
  Matrix<double> points(1, 4);
  points << -2.0, -0.5, 1.0, 3.0;
  Matrix<double> expected(1, 4);
  expected << -0.04550026389635842, -0.15426876936299344, 0.8413447460685429, 2.99595030590511;
  CHECK(relative_error(gelu.forward(points), expected) < 1e-14);

  check_module_gradients(relu, X, 12);
  check_module_gradients(tanh_layer, X, 13);
  check_module_gradients(gelu, X, 14);

  // GELU writes dX = dY (Phi(x) + x phi(x)) over its kept derivative: once per forward.
  const Matrix<double> dY = random_matrix<double>(4, 5, 15);
  gelu.forward(X);
  const Matrix<double> dX = gelu.backward(dY);
  const Matrix<double> expected_dX = X.binaryExpr(dY, [](double x, double dy) {
    return dy * (0.5 * (1 + std::erf(x / std::sqrt(2.0))) + x * std::exp(-x * x / 2) / std::sqrt(2 * 3.14159265358979323846));
  });
  CHECK(relative_error(dX, expected_dX) < 1e-14);
  CHECK(contains(message_of([&] { gelu.backward(dY); }), "GELU::backward: no cached forward"));
  CHECK(contains(message_of([&] { gelu.backward(dY); }), "backward() already ran for the last forward()"));
  gelu.forward(X);
  CHECK(gelu.backward(dY) == dX);
  relu.forward(X);  // the activations that keep their output allow it
  const Matrix<double> relu_dX = relu.backward(dY);
  CHECK(relu.backward(dY) == relu_dX);
}

TEMPLATE_TEST_CASE("activations in float agree with double", "[nn][activation]", float) {
  const Matrix<double> X = 3 * random_matrix<double>(6, 7, 15);
  const Matrix<float> Xf = X.cast<float>();
  GELU<float> gf;
  GELU<double> gd;
  CHECK(relative_error(gf.forward(Xf), gd.forward(X)) < 1e-6);
  const Matrix<float> R = Matrix<float>::Ones(6, 7);
  CHECK(relative_error(gf.backward(R), gd.backward(R.cast<double>())) < 1e-6);

  // Entry by entry over [-12, 12], both tails and 0: GELU and the derivative forward keeps, float against
  // double; infer() gives forward's values.
  const Index n = 2401;
  Matrix<double> grid(1, n);
  for (Index j = 0; j < n; ++j) grid(0, j) = -12.0 + 0.01 * static_cast<double>(j);
  const Matrix<float> grid_f = grid.cast<float>();
  const Matrix<double> y = gd.forward(grid), dy = gd.backward(Matrix<double>::Ones(1, n));
  const Matrix<float> yf = gf.forward(grid_f), dyf = gf.backward(Matrix<float>::Ones(1, n));
  double worst_y = 0, worst_dy = 0;
  for (Index j = 0; j < n; ++j) {
    worst_y = std::max(worst_y, std::abs(yf(0, j) - y(0, j)) / std::max(1.0, std::abs(grid(0, j))));
    worst_dy = std::max(worst_dy, std::abs(dyf(0, j) - dy(0, j)));
  }
  CHECK(worst_y < 1e-6);
  CHECK(worst_dy < 1e-6);
  lora::nn::InferenceContext<float> ctx;
  gf.eval();
  CHECK(gf.infer(grid_f, ctx) == gf.forward(grid_f));
}

TEST_CASE("layers reject bad input with the function and the values", "[nn][errors]") {
  Linear<double> layer(4, 3);
  std::string m = message_of([&] { layer.forward(Matrix<double>::Zero(2, 5)); });
  CHECK(contains(m, "Linear::forward: input has 5 columns, expected in_features = 4"));
  m = message_of([&] { layer.backward(Matrix<double>::Zero(2, 3)); });
  CHECK((contains(m, "Linear::backward") && contains(m, "no cached forward")));
  layer.forward(Matrix<double>::Zero(2, 4));
  m = message_of([&] { layer.backward(Matrix<double>::Zero(3, 3)); });
  CHECK(contains(m, "Linear::backward: grad_output has shape 3 x 3, expected 2 x 3"));
  layer.eval();
  layer.forward(Matrix<double>::Zero(2, 4));
  m = message_of([&] { layer.backward(Matrix<double>::Zero(2, 3)); });
  CHECK(contains(m, "no cached forward"));
  m = message_of([&] { Linear<double>(0, 3); });
  CHECK(contains(m, "Linear::Linear: in_features and out_features must be >= 1, got 0 and 3"));
  m = message_of([&] { Linear<double>(Matrix<double>::Zero(3, 2), Vector<double>::Zero(2)); });
  CHECK(contains(m, "bias has 2 entries, expected out_features = 3"));
  m = message_of([&] { layer.set_weight(Matrix<double>::Zero(4, 3)); });
  CHECK(contains(m, "Linear::set_weight: weight has shape 4 x 3, expected 3 x 4"));
  Matrix<double> bad = Matrix<double>::Zero(3, 4);
  bad(0, 0) = NAN;
  m = message_of([&] { layer.set_weight(bad); });
  CHECK(contains(m, "weight contains NaN or Inf"));

  ReLU<double> relu;
  m = message_of([&] { relu.backward(Matrix<double>::Zero(2, 2)); });
  CHECK((contains(m, "ReLU::backward") && contains(m, "no cached forward")));
  relu.forward(Matrix<double>::Zero(2, 3));
  m = message_of([&] { relu.backward(Matrix<double>::Zero(2, 2)); });
  CHECK(contains(m, "ReLU::backward: grad_output has shape 2 x 2, expected 2 x 3"));
}

// ---- loss -------------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("softmax cross-entropy: value, gradient, stability", "[nn][loss]", float, double) {
  using Scalar = TestType;
  const Matrix<double> Z = 3 * random_matrix<double>(5, 4, 21);
  const std::vector<int> y = {0, 3, 1, 1, 2};
  double naive = 0;
  for (Index i = 0; i < 5; ++i) naive += -std::log(std::exp(Z(i, y[i])) / Z.row(i).array().exp().sum());
  naive /= 5;
  SoftmaxCrossEntropy<Scalar> loss;
  const Matrix<Scalar> Zs = Z.cast<Scalar>();
  CHECK(loss.forward(Zs, y) == Approx(naive).epsilon(std::is_same_v<Scalar, float> ? 1e-6 : 1e-13));
  const Matrix<Scalar> grad = loss.backward();
  CHECK(grad.rowwise().sum().cwiseAbs().maxCoeff() < 10 * std::numeric_limits<Scalar>::epsilon());
  CHECK(relative_error(loss.probabilities().rowwise().sum(), Matrix<Scalar>::Ones(5, 1)) < tolerance<Scalar>());

  // Shifting a row changes nothing; huge logits overflow a naive exp, not the log-sum-exp.
  Matrix<Scalar> shifted = Zs;
  shifted.array() += Scalar(1e4);
  shifted.row(2).array() -= Scalar(3e4);
  const double big = loss.forward(shifted, y);
  CHECK(std::isfinite(big));
  CHECK(big == Approx(naive).epsilon(std::is_same_v<Scalar, float> ? 2e-3 : 1e-9));
  CHECK(loss.backward().allFinite());
  // A confident right answer costs ~0 without underflow to NaN; a confident wrong one costs the margin.
  Matrix<Scalar> sure(1, 3);
  sure << Scalar(500), Scalar(0), Scalar(-500);
  CHECK(loss.forward(sure, {0}) == Approx(0.0).margin(1e-12));
  CHECK(loss.forward(sure, {2}) == Approx(1000.0));
}

TEST_CASE("softmax cross-entropy gradient matches central differences", "[nn][loss][gradient]") {
  Matrix<double> Z = 2 * random_matrix<double>(6, 5, 22);
  const std::vector<int> y = {4, 0, 2, 2, 1, 3};
  SoftmaxCrossEntropy<double> loss;
  loss.forward(Z, y);
  const Matrix<double> analytic = loss.backward();
  SoftmaxCrossEntropy<double> probe;
  CHECK(relative_error(analytic, numerical_gradient(Z, [&] { return probe.forward(Z, y); })) < 1e-8);
}

TEST_CASE("softmax cross-entropy rejects bad labels", "[nn][loss][errors]") {
  SoftmaxCrossEntropy<float> loss;
  const Matrix<float> Z = Matrix<float>::Zero(3, 4);
  std::string m = message_of([&] { loss.forward(Z, {0, 1}); });
  CHECK(contains(m, "SoftmaxCrossEntropy::forward: got 2 labels for 3 rows"));
  m = message_of([&] { loss.forward(Z, {0, 4, 1}); });
  CHECK(contains(m, "label 4 at index 1 is outside [0, 4)"));
  m = message_of([&] { loss.forward(Z, {0, -1, 1}); });
  CHECK(contains(m, "label -1 at index 1 is outside [0, 4)"));
  Matrix<float> nan = Z;
  nan(1, 1) = NAN;
  m = message_of([&] { loss.forward(nan, {0, 1, 2}); });
  CHECK(contains(m, "logits contains NaN or Inf"));
  SoftmaxCrossEntropy<float> fresh;
  m = message_of([&] { fresh.backward(); });
  CHECK(contains(m, "call forward() first"));
}

TEST_CASE("accuracy and argmax", "[nn][loss]") {
  Matrix<double> Z(3, 3);
  Z << 1, 2, 3, 5, 0, 0, 0, 7, 7;
  std::vector<int> predicted;
  lora::nn::argmax_rows(Z, predicted);
  CHECK(predicted == std::vector<int>{2, 0, 1});  // ties go to the first
  CHECK(lora::nn::accuracy(Z, {2, 1, 1}) == Approx(2.0 / 3));
}

// ---- Sequential -------------------------------------------------------------------------------------

TEST_CASE("Sequential: paths, forward, and gradients through every layer", "[nn][sequential][gradient]") {
  Sequential<double> model = small_mlp<double>();
  CHECK(model.module_names() ==
        std::vector<std::string>{"layers.0", "layers.1", "layers.2", "layers.3", "layers.4", "layers.5", "layers.6"});
  CHECK(model.in_features() == 6);
  CHECK(model.out_features() == 4);
  CHECK(model.num_parameters() == (6 * 10 + 10) + (10 * 8 + 8) + (8 * 8 + 8) + (8 * 4 + 4));
  CHECK(names_of(model.parameters()) ==
        std::vector<std::string>{"layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias",
                                 "layers.4.weight", "layers.4.bias", "layers.6.weight", "layers.6.bias"});
  const Matrix<double> X = random_matrix<double>(5, 6, 31);
  Matrix<double> h = X;
  for (std::size_t i = 0; i < model.size(); ++i) h = model[i].forward(h);
  CHECK(relative_error(model.forward(X), h) < 1e-15);
  check_module_gradients(model, X, 32);
}

TEST_CASE("Sequential: backward_parameters gives the same parameter gradients", "[nn][sequential]") {
  Sequential<double> model = small_mlp<double>();
  dynamic_cast<Linear<double>&>(model[0]).set_trainable(false);
  const Matrix<double> X = random_matrix<double>(5, 6, 33), R = random_matrix<double>(5, 4, 34);
  model.forward(X);
  model.backward(R);
  std::vector<Matrix<double>> full;
  for (auto& p : model.parameters()) full.push_back(p.grad);
  model.zero_grad();
  model.forward(X);
  model.backward_parameters(R);
  const auto params = model.parameters();
  REQUIRE(params.size() == full.size());
  for (std::size_t i = 0; i < params.size(); ++i) CHECK(relative_error(params[i].grad, full[i]) < 1e-15);
}

TEST_CASE("Sequential: named children, nesting, copies, errors", "[nn][sequential]") {
  Sequential<double> block("");
  block.add("q_proj", Linear<double>(4, 4, true, 1));
  block.add("act", ReLU<double>());
  block.add("v_proj", Linear<double>(4, 4, true, 2));
  Sequential<double> model("");
  model.add("encoder", block);
  model.add("classifier", Linear<double>(4, 2, true, 3));
  CHECK(model.module_names() ==
        std::vector<std::string>{"encoder.q_proj", "encoder.act", "encoder.v_proj", "classifier"});
  CHECK(names_of(model.parameters()).front() == "encoder.q_proj.weight");

  // A copy is deep.
  Sequential<double> copy = model;
  dynamic_cast<Linear<double>&>(copy.module("classifier")).weight().setZero();
  CHECK(dynamic_cast<Linear<double>&>(model.module("classifier")).weight().norm() > 0);

  std::string m = message_of([&] { model.add("x", Linear<double>(3, 2)); });
  CHECK(contains(m, "Sequential::add: 'x' (Linear(3 -> 2, bias)) expects in_features = 3, but the model so far "
                    "produces 2 features"));
  m = message_of([&] { model.add("classifier", ReLU<double>()); });
  CHECK(contains(m, "a child named 'classifier' already exists"));
  m = message_of([&] { model.add("a.b", ReLU<double>()); });
  CHECK(contains(m, "must not contain '.'"));
  m = message_of([&] { model.forward(Matrix<double>::Zero(2, 5)); });
  CHECK(contains(m, "Sequential::forward: input has 5 columns, expected in_features = 4"));
  m = message_of([&] { model.module("decoder"); });
  CHECK(contains(m, "no module named 'decoder'; the model has: encoder.q_proj (Linear), encoder.act (ReLU)"));
  m = message_of([&] { Sequential<double>().forward(Matrix<double>::Zero(1, 1)); });
  CHECK(contains(m, "the model has no modules"));
}

// ---- target matching and injection ------------------------------------------------------------------

TEST_CASE("target names match PEFT's rule", "[nn][inject]") {
  using lora::nn::matches_target;
  CHECK(matches_target("layers.0", "layers.0"));
  CHECK(matches_target("layers.0", "0"));
  CHECK(matches_target("model.blocks.3.q_proj", "q_proj"));
  CHECK(matches_target("model.blocks.3.q_proj", "3.q_proj"));
  CHECK_FALSE(matches_target("layers.10", "0"));  // a suffix, but not after a '.'
  CHECK_FALSE(matches_target("model.xq_proj", "q_proj"));
  CHECK_FALSE(matches_target("layers.0", "layers"));
  CHECK_FALSE(matches_target("q", "model.q"));
}

TEST_CASE("inject_lora selects targets by name, suffix, regex and all-linear", "[nn][inject]") {
  auto targets = [](LoraInjectConfig c) {
    Sequential<double> model = small_mlp<double>();
    c.rank = 2;
    inject_lora(model, c);
    std::vector<std::string> paths;
    for (const auto& entry : model.lora_layers()) paths.push_back(entry.first);
    return paths;
  };
  LoraInjectConfig c;
  c.target_modules = {"layers.0", "4"};
  CHECK(targets(c) == std::vector<std::string>{"layers.0", "layers.4"});
  c.target_modules = {"all-linear"};
  CHECK(targets(c) == std::vector<std::string>{"layers.0", "layers.2", "layers.4"});
  c.target_modules.clear();
  c.target_regex = R"(layers\.[0-3])";  // matches layers.0 to layers.3; the activations among them are skipped
  CHECK(targets(c) == std::vector<std::string>{"layers.0", "layers.2"});
  c.target_regex = R"(\.2)";  // must match the whole path, as PEFT's re.fullmatch
  CHECK_THROWS_WITH(targets(c), Catch::Contains("target_regex '\\.2' matches no Linear or Embedding module"));
}

TEST_CASE("target_regex is matched in linear time, as re.fullmatch", "[nn][inject]") {
  // (.|\w)* doubles a backtracking engine's work with every word character: std::regex took seconds
  // on this 27-character path. A linear-time matcher answers in microseconds.
  const std::string path = "layers_of_the_encoder_block";
  REQUIRE(path.size() == 27);
  Sequential<double> model("");
  model.add(path, Linear<double>(4, 4));
  model.add("proj_x", Linear<double>(4, 4));
  LoraInjectConfig c;
  c.target_regex = R"((.|\w)*x)";
  c.rank = 2;
  const auto start = std::chrono::steady_clock::now();
  inject_lora(model, c);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const auto layers = model.lora_layers();
  REQUIRE(layers.size() == 1);
  CHECK(layers.front().first == "proj_x");
  CHECK(seconds < 0.5);
}

TEST_CASE("exclude_modules, layers_to_transform and layers_pattern select as PEFT does", "[nn][inject]") {
  using Paths = std::vector<std::string>;
  auto targets = [](LoraInjectConfig c) {
    Sequential<double> model = blocks_model();
    c.rank = 2;
    inject_lora(model, c);
    return lora_paths(model);
  };
  REQUIRE(blocks_model().module_names() == Paths{"model.layers.0.q", "model.layers.0.v", "model.layers.1.q",
                                                 "model.layers.1.v", "model.layers.1.experts.0.w",
                                                 "model.layers.2.q", "model.layers.2.v"});
  LoraInjectConfig c;
  c.target_modules = {"q", "v"};
  c.exclude_modules = {"1.v", "model.layers.2.q"};  // the list rule: equal, or a suffix after '.'
  CHECK(targets(c) == Paths{"model.layers.0.q", "model.layers.0.v", "model.layers.1.q", "model.layers.2.v"});
  c.exclude_modules.clear();
  c.exclude_regex = R"(.*\.[01]\.v)";  // re.fullmatch
  CHECK(targets(c) == Paths{"model.layers.0.q", "model.layers.1.q", "model.layers.2.q", "model.layers.2.v"});
  c.exclude_regex = "v";  // not a full match of any path: excludes nothing
  CHECK(targets(c).size() == 6);
  c.exclude_regex.clear();

  // The layer index: the number after any component, or after a layers_pattern component.
  c.layers_to_transform = {0, 2};
  CHECK(targets(c) == Paths{"model.layers.0.q", "model.layers.0.v", "model.layers.2.q", "model.layers.2.v"});
  c.layers_pattern = {"layers"};
  CHECK(targets(c) == Paths{"model.layers.0.q", "model.layers.0.v", "model.layers.2.q", "model.layers.2.v"});
  c.layers_pattern = {"blocks", "lay.rs"};  // tried in order; a regex
  CHECK(targets(c) == Paths{"model.layers.0.q", "model.layers.0.v", "model.layers.2.q", "model.layers.2.v"});
  c.layers_pattern = {"blocks"};
  std::string m = message_of([&] { targets(c); });
  CHECK(contains(m, "inject_lora: target_modules 'q', 'v' match no module that exclude_modules and "
                    "layers_to_transform leave in; the model has: model.layers.0.q (Linear)"));
  // A module named in full is taken whatever its layer, as PEFT does.
  c.layers_pattern.clear();
  c.layers_to_transform = {1};
  c.target_modules = {"q", "model.layers.0.v"};
  CHECK(targets(c) == Paths{"model.layers.0.v", "model.layers.1.q"});
  // "all-linear" goes through the same filters.
  c.target_modules = {"all-linear"};
  c.exclude_modules = {"experts.0.w"};
  CHECK(targets(c) == Paths{"model.layers.1.q", "model.layers.1.v"});
  c.exclude_modules.clear();

  // model.layers.1.experts.0.w: PEFT's greedy reading (before) says layer 0, its lazy one (now) layer 1.
  // Where the two disagree on the outcome the selection is refused; layers_pattern settles it.
  c.target_modules = {"w"};
  m = message_of([&] { targets(c); });
  CHECK(contains(m, "inject_lora: layers_to_transform: the layer index of 'model.layers.1.experts.0.w' is "
                    "ambiguous: 1 after 'layers' or 0 after 'experts'"));
  c.layers_pattern = {"layers"};
  CHECK(targets(c) == Paths{"model.layers.1.experts.0.w"});
  c.layers_pattern = {"experts"};
  CHECK_THROWS_WITH(targets(c), Catch::Contains("match no module"));
  c.layers_pattern.clear();
  c.layers_to_transform = {0, 1};  // both readings agree: in
  CHECK(targets(c) == Paths{"model.layers.1.experts.0.w"});

  // The rules, without a model. A top-level index has no component before it, a module's own index
  // none after it: neither is a layer index (PEFT's regex needs both).
  LoraInjectConfig r;
  r.target_modules = {"q", "0"};
  r.layers_to_transform = {0};
  CHECK(r.targets("model.layers.0.q"));
  CHECK(r.targets("model.layers.00.x.q"));  // int("00") == 0
  CHECK_FALSE(r.targets("layers.0.q"));
  CHECK_FALSE(r.targets("model.layers.0"));
  CHECK(r.targets("0"));  // named in full
  r.layers_to_transform = {12};
  CHECK(r.targets("a.h.12.q"));
  CHECK_FALSE(r.targets("a.h.123.q"));
  CHECK_FALSE(r.targets("a.h.99999999999999999999.q"));

  // Combinations PEFT refuses, and regexes outside the supported subset.
  LoraInjectConfig bad;
  bad.target_regex = "model.*";
  bad.layers_to_transform = {0};
  m = message_of([&] { bad.validate("f"); });
  CHECK(contains(m, "f: layers_to_transform applies to target_modules names, not to target_regex"));
  bad.target_regex.clear();
  bad.target_modules = {"q"};
  bad.layers_to_transform.clear();
  bad.layers_pattern = {"layers"};
  CHECK_THROWS_WITH(bad.validate("f"), Catch::Contains("layers_pattern is set but layers_to_transform is empty"));
  bad.layers_pattern.clear();
  bad.exclude_regex = "(?=q)";
  CHECK_THROWS_WITH(bad.validate("f"), Catch::Contains("exclude_regex '(?=q)' is not a valid regular expression"));
  bad.exclude_modules = {"q"};
  CHECK_THROWS_WITH(bad.validate("f"), Catch::Contains("set either exclude_modules or exclude_regex, not both"));
  bad.exclude_regex.clear();
  bad.exclude_modules = {""};
  CHECK_THROWS_WITH(bad.validate("f"), Catch::Contains("exclude_modules contains an empty name"));
}

TEST_CASE("rank_pattern keys are regexes tried in order, the first match wins", "[nn][inject]") {
  Sequential<double> model = blocks_model();
  LoraInjectConfig c;
  c.target_modules = {"q", "v"};
  c.rank = 4;
  c.rank_pattern = {{"layers\\.[12]\\.q", 2}, {"q", 3}, {"1.q", 1}};  // "1.q" is shadowed
  c.alpha_pattern = {{"v", 2.0}, {"0.v", 1.0}};                         // "0.v" is shadowed
  CHECK(c.rank_for("model.layers.1.q") == 2);
  CHECK(c.rank_for("model.layers.0.q") == 3);
  CHECK(c.rank_for("model.layers.0.v") == 4);
  CHECK(c.rank_for("model.layers.0.xq") == 4);  // a key matches whole components
  CHECK(c.alpha_for("model.layers.0.v") == 2.0);
  inject_lora(model, c);
  REQUIRE(model.lora_config() != nullptr);
  CHECK(model.lora_config()->rank_pattern.front().first == "layers\\.[12]\\.q");  // recorded in order
  std::vector<Index> ranks;
  for (const auto& entry : model.lora_layers()) ranks.push_back(entry.second->rank());
  CHECK(ranks == std::vector<Index>{3, 4, 2, 4, 2, 4});
  c.rank_pattern = {{"(?<=x)q", 2}};
  CHECK_THROWS_WITH(c.validate("f"), Catch::Contains("rank_pattern key '(?<=x)q' is not a valid regular expression"));
}

TEST_CASE("rank_pattern and alpha_pattern override rank and alpha per module", "[nn][inject]") {
  Sequential<double> model = small_mlp<double>();
  LoraInjectConfig c;
  c.target_modules = {"all-linear"};
  c.rank = 4;
  c.alpha = 8;
  c.rank_pattern = {{"layers.2", 2}};
  c.alpha_pattern = {{"4", 1.0}};
  inject_lora(model, c);
  const auto layers = model.lora_layers();
  REQUIRE(layers.size() == 3);
  CHECK(layers[0].second->rank() == 4);
  CHECK(layers[0].second->scaling() == Approx(2.0));
  CHECK(layers[1].second->rank() == 2);
  CHECK(layers[1].second->scaling() == Approx(4.0));
  CHECK(layers[2].second->rank() == 4);
  CHECK(layers[2].second->scaling() == Approx(0.25));

  Sequential<double> other = small_mlp<double>();
  c.rank_pattern = {{"layers.6", 2}};
  std::string m = message_of([&] { inject_lora(other, c); });
  CHECK(contains(m, "rank_pattern key 'layers.6' matches no targeted module; the targets are: layers.0, layers.2, "
                    "layers.4"));
  c.rank_pattern = {{"layers.0", 0}};
  m = message_of([&] { inject_lora(other, c); });
  CHECK(contains(m, "rank_pattern['layers.0'] must name a module and be >= 1, got 0"));
  CHECK(other.lora_layers().empty());
}

TEST_CASE("inject_lora freezes the base, keeps modules_to_save, applies the bias mode", "[nn][inject]") {
  LoraInjectConfig c;
  c.target_modules = {"layers.0", "layers.2"};
  c.modules_to_save = {"layers.6"};
  c.rank = 2;
  SECTION("bias none") {
    Sequential<double> model = small_mlp<double>();
    inject_lora(model, c);
    CHECK(names_of(model.parameters()) ==
          std::vector<std::string>{"layers.0.lora_A.default.weight", "layers.0.lora_B.default.weight",
                                   "layers.2.lora_A.default.weight", "layers.2.lora_B.default.weight",
                                   "layers.6.modules_to_save.default.weight",
                                   "layers.6.modules_to_save.default.bias"});
    CHECK(model.saved_modules().size() == 1);
    CHECK(model.saved_modules().front().first == "layers.6");
    REQUIRE(model.lora_config() != nullptr);
    CHECK(model.lora_config()->modules_to_save == std::vector<std::string>{"layers.6"});
    const auto count = lora::nn::count_parameters(model);
    CHECK(count.adapter == 2 * (6 + 10) + 2 * (10 + 8));
    CHECK(count.trainable == count.adapter + 8 * 4 + 4);
    CHECK(count.base() == (6 * 10 + 10) + (10 * 8 + 8) + (8 * 8 + 8) + (8 * 4 + 4));
  }
  SECTION("bias all") {
    c.bias = lora::BiasMode::all;
    Sequential<double> model = small_mlp<double>();
    inject_lora(model, c);
    CHECK(names_of(model.parameters()) ==
          std::vector<std::string>{"layers.0.lora_A.default.weight", "layers.0.lora_B.default.weight",
                                   "layers.0.bias", "layers.2.lora_A.default.weight",
                                   "layers.2.lora_B.default.weight", "layers.2.bias", "layers.4.bias",
                                   "layers.6.modules_to_save.default.weight",
                                   "layers.6.modules_to_save.default.bias"});
  }
  SECTION("bias lora_only") {
    c.bias = lora::BiasMode::lora_only;
    Sequential<double> model = small_mlp<double>();
    inject_lora(model, c);
    CHECK(names_of(model.parameters()) ==
          std::vector<std::string>{"layers.0.lora_A.default.weight", "layers.0.lora_B.default.weight",
                                   "layers.0.bias", "layers.2.lora_A.default.weight",
                                   "layers.2.lora_B.default.weight", "layers.2.bias",
                                   "layers.6.modules_to_save.default.weight",
                                   "layers.6.modules_to_save.default.bias"});
  }
}

TEST_CASE("an injected model computes the base function, then trains through LoRA", "[nn][inject][gradient]") {
  Sequential<double> model = small_mlp<double>();
  const Matrix<double> X = random_matrix<double>(5, 6, 41);
  const Matrix<double> before = model.forward(X);
  LoraInjectConfig c;
  c.target_modules = {"layers.0", "layers.2", "layers.4"};
  c.modules_to_save = {"layers.6"};
  c.bias = lora::BiasMode::lora_only;
  c.rank = 3;
  c.alpha = 6;
  c.use_rslora = true;
  inject_lora(model, c);
  CHECK(relative_error(model.forward(X), before) < 1e-15);  // B = 0
  // Each layer got its own seed: no two A alike.
  const auto layers = model.lora_layers();
  CHECK(layers[0].second->A().row(0).head(3) != layers[2].second->A().row(0).head(3));
  for (auto& [path, layer] : model.lora_layers()) layer->B().setRandom();
  check_module_gradients(model, X, 42);
}

TEST_CASE("inject_lora errors list what exists and leave the model unchanged", "[nn][inject][errors]") {
  Sequential<double> model = small_mlp<double>();
  LoraInjectConfig c;
  c.target_modules = {"layers.0", "q_proj"};
  std::string m = message_of([&] { inject_lora(model, c); });
  CHECK(contains(m, "inject_lora: target 'q_proj' matches no module; the model has: layers.0 (Linear), "
                    "layers.1 (Tanh), layers.2 (Linear), layers.3 (GELU), layers.4 (Linear), layers.5 (ReLU), "
                    "layers.6 (Linear)"));
  c.target_modules = {"layers.1"};
  m = message_of([&] { inject_lora(model, c); });
  CHECK(contains(m, "target 'layers.1' is Tanh; LoRA adapts Linear and Embedding modules only"));
  c.target_modules = {"layers.0"};
  c.modules_to_save = {"classifier"};
  m = message_of([&] { inject_lora(model, c); });
  CHECK(contains(m, "modules_to_save entry 'classifier' matches no module; the model has: layers.0 (Linear)"));
  c.modules_to_save = {"layers.0"};
  m = message_of([&] { inject_lora(model, c); });
  CHECK(contains(m, "'layers.0' is both a LoRA target and in modules_to_save"));
  c.modules_to_save.clear();
  c.target_modules.clear();
  m = message_of([&] { inject_lora(model, c); });
  CHECK(contains(m, "no target: set target_modules (names) or target_regex"));
  c.target_modules = {"layers.0"};
  c.target_regex = "layers.*";
  m = message_of([&] { inject_lora(model, c); });
  CHECK(contains(m, "set either target_modules or target_regex, not both"));
  c.target_modules.clear();
  c.target_regex = "layers.(";
  m = message_of([&] { inject_lora(model, c); });
  CHECK(contains(m, "target_regex 'layers.(' is not a valid regular expression"));
  c.target_regex.clear();
  c.target_modules = {"layers.0"};
  c.rank = 0;
  m = message_of([&] { inject_lora(model, c); });
  CHECK(contains(m, "rank must be >= 1, got 0"));

  // A fault in the second target: checked before anything changes.
  c.rank = 2;
  c.target_modules = {"layers.0", "layers.1"};
  m = message_of([&] { inject_lora(model, c); });
  CHECK(contains(m, "inject_lora: target 'layers.1' is Tanh"));
  CHECK(model.lora_layers().empty());
  CHECK(model.num_trainable_parameters() == model.num_parameters());

  // A rank above min(in, out) of a target is accepted, as PEFT accepts it (layers.6 is 4 wide).
  c.rank = 5;
  c.target_modules = {"layers.0", "layers.6"};
  inject_lora(model, c);
  CHECK(model.lora_layers().size() == 2);
  CHECK(model.lora_layers().back().second->rank() == 5);
  m = message_of([&] { inject_lora(model, c); });
  CHECK(contains(m, "already has LoRA layers"));
}

TEST_CASE("summary prints PEFT's line; analytic counts match the paper's figures", "[nn][inject]") {
  Sequential<float> model("");
  model.add("q_proj", Linear<float>(lora::Matrix<float>::Zero(1024, 1024)));
  LoraInjectConfig c;
  c.target_modules = {"q_proj"};
  c.rank = 4;
  inject_lora(model, c);
  CHECK(lora::nn::summary(model) == "trainable params: 8,192 || all params: 1,056,768 || trainable%: 0.7752");
  CHECK(lora::nn::lora_parameter_count(1024, 1024, 4) == 8192);
  CHECK(lora::nn::with_thousands(0) == "0");
  CHECK(lora::nn::with_thousands(999) == "999");
  CHECK(lora::nn::with_thousands(1000) == "1,000");
  CHECK(lora::nn::with_thousands(-1234567) == "-1,234,567");
}

// ---- merge and base weights -------------------------------------------------------------------------

TEST_CASE("merging the model keeps its outputs; merge_and_unload leaves plain layers", "[nn][merge]") {
  Sequential<double> model = small_mlp<double>();
  LoraInjectConfig c;
  c.target_modules = {"all-linear"};
  c.modules_to_save = {"layers.6"};
  c.rank = 2;
  inject_lora(model, c);
  for (auto& [path, layer] : model.lora_layers()) layer->B().setRandom();
  const Matrix<double> X = random_matrix<double>(7, 6, 51);
  model.eval();
  const Matrix<double> unmerged = model.forward(X);
  model.merge();
  CHECK(model.merged());
  CHECK(relative_error(model.forward(X), unmerged) < 1e-14);
  std::string m = message_of([&] { model.base_tensor("layers.0.weight"); });
  CHECK(contains(m, "'layers.0' is merged"));
  model.unmerge();
  CHECK_FALSE(model.merged());
  CHECK(relative_error(model.forward(X), unmerged) < 1e-14);

  lora::nn::merge_and_unload(model);
  CHECK(model.lora_layers().empty());
  CHECK(model.lora_config() == nullptr);
  CHECK(model.module("layers.0").type_name() == "Linear");
  CHECK(relative_error(model.forward(X), unmerged) < 1e-14);
  m = message_of([&] { model.merge(); });
  CHECK(contains(m, "Sequential::merge: the model has no LoRA layer"));
}

TEST_CASE("base tensors by name: list, read, write, also under LoRA", "[nn][state]") {
  Sequential<double> model = small_mlp<double>();
  Sequential<double> other = small_mlp<double>();
  for (const std::string& name : other.base_tensor_names()) {
    Matrix<double> value = other.base_tensor(name);
    value.array() += 1.0;
    other.set_base_tensor(name, value);
  }
  const std::vector<std::string> names = model.base_tensor_names();
  CHECK(names.size() == 8);
  CHECK(names.front() == "layers.0.weight");
  CHECK(model.base_tensor("layers.2.bias").cols() == 1);

  LoraInjectConfig c;
  c.target_modules = {"layers.0", "layers.2"};
  c.rank = 2;
  inject_lora(model, c);
  CHECK(model.base_tensor_names() == names);  // plain names, also for the LoRA layers
  auto* layer = model.lora_layers().front().second;
  layer->B().setRandom();
  const Matrix<double> A = layer->A(), B = layer->B();
  for (const std::string& name : names) model.set_base_tensor(name, other.base_tensor(name));
  for (const std::string& name : names) CHECK(model.base_tensor(name) == other.base_tensor(name));
  layer = model.lora_layers().front().second;  // rebuilt in place: the adapter is kept
  CHECK(layer->A() == A);
  CHECK(layer->B() == B);
  // A bias may come as a row.
  model.set_base_tensor("layers.2.bias", Matrix<double>::Ones(1, 8));
  CHECK(model.base_tensor("layers.2.bias") == Matrix<double>::Ones(8, 1));

  std::string m = message_of([&] { model.base_tensor("layers.1.weight"); });
  CHECK(contains(m, "no base tensor named 'layers.1.weight'; the model has: layers.0.weight, layers.0.bias"));
  m = message_of([&] { model.set_base_tensor("layers.4.weight", Matrix<double>::Zero(3, 3)); });
  CHECK(contains(m, "Sequential::set_base_tensor: layers.4.weight: Linear::set_weight: weight has shape 3 x 3, "
                    "expected 8 x 8"));
  m = message_of([&] { model.set_base_tensor("layers.0.weight", Matrix<double>::Zero(3, 3)); });
  CHECK(contains(m, "W0 has shape 3 x 3, expected 10 x 6"));
}
