// LoraLinear: forward against a dense reference, gradients against central differences, bad input, init.
#include <lora/lora.hpp>

#include "instances.hpp"
#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <string>

using lora::Index;
using lora::LoraConfig;
using lora::LoraLinear;
using lora::Matrix;
using lora::Vector;
using lora::testing::numerical_gradient;
using lora::testing::relative_error;
using lora::testing::tolerance;
using lora::testing::contains;
using lora::testing::message_of;
using lora::testing::random_matrix;

namespace {

LoraConfig small_config(int rank = 3) {
  LoraConfig c;
  c.rank = rank;
  c.alpha = 6;
  c.seed = 7;
  return c;
}

// Y = X (W0 + s B A)^T + b, formed densely.
template <class Scalar>
Matrix<Scalar> dense_reference(const LoraLinear<Scalar>& layer, const Matrix<Scalar>& X) {
  Matrix<Scalar> W = layer.base_weight();
  W += static_cast<Scalar>(layer.scaling()) * layer.B() * layer.A();
  Matrix<Scalar> Y = X * W.transpose();
  if (layer.has_bias()) Y.rowwise() += layer.bias().transpose();
  return Y;
}

}  // namespace

TEMPLATE_TEST_CASE("a fresh layer is the frozen layer", "[linear]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> W0 = random_matrix<Scalar>(7, 5, 1);
  const Vector<Scalar> b = Vector<Scalar>::Random(7);
  const Matrix<Scalar> X = random_matrix<Scalar>(4, 5, 2);
  LoraLinear<Scalar> layer(W0, b, small_config());
  CHECK(layer.B().isZero(0));
  CHECK(layer.A().norm() > 0);
  Matrix<Scalar> expected = X * W0.transpose();
  expected.rowwise() += b.transpose();
  CHECK(relative_error(layer.forward(X), expected) < tolerance<Scalar>());
}

TEMPLATE_TEST_CASE("forward equals the dense reference", "[linear]", float, double) {
  using Scalar = TestType;
  const bool rslora = GENERATE(false, true);
  LoraConfig config = small_config(3);
  config.use_rslora = rslora;
  config.init = lora::InitMethod::random;  // B != 0
  const Matrix<Scalar> W0 = random_matrix<Scalar>(9, 6, 3);
  const Vector<Scalar> b = Vector<Scalar>::Random(9);
  LoraLinear<Scalar> layer(W0, b, config);
  CHECK(layer.scaling() == Approx(rslora ? 6 / std::sqrt(3.0) : 2.0));
  const Matrix<Scalar> X = random_matrix<Scalar>(5, 6, 4);
  CHECK(layer.B().norm() > 0);
  CHECK(relative_error(layer.forward(X), dense_reference(layer, X)) < tolerance<Scalar>());
  layer.eval();
  CHECK(relative_error(layer.forward(X), dense_reference(layer, X)) < tolerance<Scalar>());
  // Inputs of either storage order are accepted.
  const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor> Xc = X;
  CHECK(relative_error(layer.forward(Xc), dense_reference(layer, X)) < tolerance<Scalar>());
}

TEST_CASE("gradients match central differences", "[linear][gradient]") {
  const bool with_dropout = GENERATE(false, true);
  const bool rslora = GENERATE(false, true);
  LoraConfig config = small_config(3);
  config.init = lora::InitMethod::random;
  config.bias = lora::BiasMode::all;
  config.use_rslora = rslora;
  config.dropout = with_dropout ? 0.3 : 0.0;
  const Matrix<double> W0 = random_matrix<double>(8, 6, 5);
  const Vector<double> b = Vector<double>::Random(8);
  LoraLinear<double> layer(W0, b, config);
  Matrix<double> X = random_matrix<double>(4, 6, 6);
  const Matrix<double> R = random_matrix<double>(4, 8, 7);  // f = <Y, R>, so dL/dY = R

  // Each evaluation replays the same dropout mask.
  auto loss = [&] {
    layer.reset_dropout_rng();
    return layer.forward(X).cwiseProduct(R).sum();
  };
  layer.zero_grad();
  layer.reset_dropout_rng();
  layer.forward(X);
  const Matrix<double> dX = layer.backward(R);
  const Matrix<double> dA = layer.grad_A(), dB = layer.grad_B();
  const Vector<double> dbias = layer.grad_bias();

  auto A = layer.A();
  CHECK(relative_error(dA, numerical_gradient(A, loss)) < 1e-7);
  CHECK(relative_error(dB, numerical_gradient(layer.B(), loss)) < 1e-7);
  CHECK(relative_error(dX, numerical_gradient(X, loss)) < 1e-7);
  CHECK(relative_error(dbias, numerical_gradient(layer.bias_mut(), loss)) < 1e-7);
  if (with_dropout) {  // the mask did something: some entries of the adapter's input were dropped
    layer.reset_dropout_rng();
    LoraConfig no_dropout = config;
    no_dropout.dropout = 0;
    LoraLinear<double> plain(W0, b, no_dropout);
    CHECK(relative_error(layer.forward(X), plain.forward(X)) > 1e-3);
  }
}

TEST_CASE("gradients accumulate until zero_grad", "[linear][gradient]") {
  LoraConfig config = small_config(2);
  config.init = lora::InitMethod::random;
  LoraLinear<double> layer(random_matrix<double>(5, 4, 8), config);
  const Matrix<double> X = random_matrix<double>(3, 4, 9), R = random_matrix<double>(3, 5, 10);
  layer.forward(X);
  layer.backward(R);
  const Matrix<double> once = layer.grad_A();
  layer.forward(X);
  layer.backward(R);
  CHECK(relative_error(layer.grad_A(), 2 * once) < 1e-14);
  layer.zero_grad();
  CHECK(layer.grad_A().isZero(0));
  CHECK(layer.grad_B().isZero(0));
}

TEST_CASE("several active adapters sum their deltas, each with its own gradient", "[linear][adapters]") {
  LoraConfig c1 = small_config(2), c2 = small_config(3);
  c1.init = c2.init = lora::InitMethod::random;
  c2.seed = 99;
  c2.alpha = 1.5;
  const Matrix<double> W0 = random_matrix<double>(7, 6, 11);
  LoraLinear<double> layer(W0, c1);
  layer.add_adapter("second", c2);
  CHECK(layer.active_adapters() == std::vector<std::string>{"default"});
  layer.set_active_adapters({"default", "second"});
  layer.set_adapter_scale("second", -0.5);
  Matrix<double> X = random_matrix<double>(4, 6, 12);
  const Matrix<double> R = random_matrix<double>(4, 7, 13);

  Matrix<double> W = W0;
  W += layer.scaling("default") * layer.B("default") * layer.A("default");
  W += -0.5 * layer.scaling("second") * layer.B("second") * layer.A("second");
  CHECK(relative_error(layer.forward(X), X * W.transpose()) < 1e-14);

  auto loss = [&] { return layer.forward(X).cwiseProduct(R).sum(); };
  layer.forward(X);
  const Matrix<double> dX = layer.backward(R);
  const Matrix<double> dA2 = layer.grad_A("second");
  auto A2 = layer.A("second");
  CHECK(relative_error(dA2, numerical_gradient(A2, loss)) < 1e-7);
  CHECK(relative_error(dX, numerical_gradient(X, loss)) < 1e-7);
  CHECK(layer.num_trainable_parameters() == (2 + 3) * (6 + 7));

  layer.set_active_adapters({});  // base only
  CHECK(relative_error(layer.forward(X), X * W0.transpose()) < 1e-14);
  layer.delete_adapter("default");
  CHECK(layer.adapter_names() == std::vector<std::string>{"second"});
  layer.set_active_adapter("second");
  W = W0 - 0.5 * layer.scaling() * layer.B() * layer.A();
  CHECK(relative_error(layer.forward(X), X * W.transpose()) < 1e-14);
}

TEMPLATE_TEST_CASE("the same seed gives bit-identical init and masks", "[linear][init]", float, double) {
  using Scalar = TestType;
  LoraConfig config = small_config(4);
  config.dropout = 0.5;
  const Matrix<Scalar> W0 = random_matrix<Scalar>(10, 8, 14);
  const Matrix<Scalar> X = random_matrix<Scalar>(6, 8, 15);
  LoraLinear<Scalar> a(W0, config), b(W0, config);
  a.B().setOnes();
  b.B().setOnes();
  CHECK(a.A() == b.A());
  CHECK(a.forward(X) == b.forward(X));
  CHECK(a.forward(X) == b.forward(X));  // the second masks agree too
  config.seed = 8;
  LoraLinear<Scalar> c(W0, config);
  CHECK(a.A() != c.A());
}

TEST_CASE("init draws have the documented distribution", "[linear][init]") {
  const Matrix<double> W0 = Matrix<double>::Zero(300, 400);
  LoraConfig config;
  config.rank = 16;
  {  // Gaussian, std = 1/r by default
    LoraLinear<double> layer(W0, config);
    const auto A = layer.A();
    const double mean = A.mean();
    const double std = std::sqrt((A.array() - mean).square().sum() / (A.size() - 1));
    CHECK(std::abs(mean) < 4 * (1.0 / 16) / std::sqrt(A.size()));
    CHECK(std == Approx(1.0 / 16).epsilon(0.02));
  }
  {  // explicit std
    config.init_std = 0.02;
    LoraLinear<double> layer(W0, config);
    const auto A = layer.A();
    CHECK(std::sqrt(A.array().square().mean()) == Approx(0.02).epsilon(0.02));
  }
  {  // Kaiming uniform: U(-1/sqrt(in), 1/sqrt(in)), std = bound / sqrt(3)
    config.init = lora::InitMethod::kaiming_uniform;
    LoraLinear<double> layer(W0, config);
    const auto A = layer.A();
    const double bound = 1 / std::sqrt(400.0);
    CHECK(A.cwiseAbs().maxCoeff() <= bound);
    CHECK(A.cwiseAbs().maxCoeff() > 0.99 * bound);
    CHECK(std::sqrt(A.array().square().mean()) == Approx(bound / std::sqrt(3.0)).epsilon(0.02));
    CHECK(layer.B().isZero(0));
  }
}

TEST_CASE("parameter counts", "[linear]") {
  LoraConfig config = small_config(4);
  LoraLinear<float> frozen_bias(Matrix<float>::Zero(20, 30), Vector<float>::Zero(20), config);
  CHECK(frozen_bias.num_trainable_parameters() == 4 * (30 + 20));
  CHECK(frozen_bias.num_frozen_parameters() == 20 * 30 + 20);
  config.bias = lora::BiasMode::lora_only;
  LoraLinear<float> trained_bias(Matrix<float>::Zero(20, 30), Vector<float>::Zero(20), config);
  CHECK(trained_bias.num_trainable_parameters() == 4 * (30 + 20) + 20);
  CHECK(trained_bias.num_frozen_parameters() == 20 * 30);
  CHECK(trained_bias.in_features() == 30);
  CHECK(trained_bias.out_features() == 20);
  CHECK(trained_bias.rank() == 4);
}

TEST_CASE("bad input throws invalid_argument naming the function and the values", "[linear][errors]") {
  const Matrix<double> W0 = random_matrix<double>(6, 4, 16);
  auto with = [](auto change) {
    LoraConfig c;
    c.rank = 2;
    change(c);
    return c;
  };
  const std::string ctor = "LoraLinear::LoraLinear";

  std::string m = message_of([&] { LoraLinear<double>(W0, with([](LoraConfig& c) { c.rank = 0; })); });
  CHECK((contains(m, ctor) && contains(m, "rank must be >= 1, got 0")));
  // PEFT accepts a rank above min(in, out) (a 2-class head with r = 8), and so does the layer.
  CHECK(LoraLinear<double>(W0, with([](LoraConfig& c) { c.rank = 5; })).rank() == 5);
  m = message_of([&] { LoraLinear<double>(W0, with([](LoraConfig& c) { c.alpha = 0; })); });
  CHECK(contains(m, "alpha must be finite and > 0, got 0"));
  m = message_of([&] { LoraLinear<double>(W0, with([](LoraConfig& c) { c.alpha = NAN; })); });
  CHECK(contains(m, "alpha must be finite and > 0, got nan"));
  m = message_of([&] { LoraLinear<double>(W0, with([](LoraConfig& c) { c.dropout = 1; })); });
  CHECK(contains(m, "dropout must be in [0, 1), got 1"));
  m = message_of([&] { LoraLinear<double>(W0, with([](LoraConfig& c) { c.dropout = -0.1; })); });
  CHECK(contains(m, "dropout must be in [0, 1), got -0.1"));
  m = message_of([&] { LoraLinear<double>(W0, with([](LoraConfig& c) { c.init_std = 0.0; })); });
  CHECK(contains(m, "init_std must be finite and > 0, got 0"));
  m = message_of([&] { LoraLinear<double>(Matrix<double>(0, 4), with([](LoraConfig&) {})); });
  CHECK((contains(m, ctor) && contains(m, "W0 is empty (0 x 4)")));
  Matrix<double> bad_w = W0;
  bad_w(1, 1) = INFINITY;
  m = message_of([&] { LoraLinear<double>(bad_w, with([](LoraConfig&) {})); });
  CHECK(contains(m, "W0 contains NaN or Inf"));
  m = message_of([&] { LoraLinear<double>(W0, Vector<double>::Zero(5), with([](LoraConfig&) {})); });
  CHECK(contains(m, "bias has 5 entries, expected out_features = 6"));

  LoraLinear<double> layer(W0, with([](LoraConfig&) {}));
  m = message_of([&] { layer.forward(Matrix<double>::Zero(3, 5)); });
  CHECK(contains(m, "LoraLinear::forward: input has 5 columns, expected in_features = 4"));
  m = message_of([&] { layer.backward(Matrix<double>::Zero(3, 6)); });
  CHECK((contains(m, "LoraLinear::backward") && contains(m, "no cached input")));
  layer.forward(Matrix<double>::Zero(3, 4));
  m = message_of([&] { layer.backward(Matrix<double>::Zero(2, 6)); });
  CHECK(contains(m, "LoraLinear::backward: grad_output has shape 2 x 6, expected 3 x 6"));
  layer.eval();
  layer.forward(Matrix<double>::Zero(3, 4));
  m = message_of([&] { layer.backward(Matrix<double>::Zero(3, 6)); });
  CHECK(contains(m, "no cached input"));

  m = message_of([&] { layer.add_adapter("default", with([](LoraConfig&) {})); });
  CHECK(contains(m, "LoraLinear::add_adapter: an adapter named 'default' already exists"));
  m = message_of([&] { layer.add_adapter("a.b", with([](LoraConfig&) {})); });
  CHECK(contains(m, "contains '.'"));
  m = message_of([&] { layer.set_active_adapter("nope"); });
  CHECK(contains(m, "LoraLinear::set_active_adapters: no adapter named 'nope'; the layer has 'default'"));
  m = message_of([&] { layer.set_adapter_scale("default", INFINITY); });
  CHECK(contains(m, "scale must be finite, got inf"));
  layer.add_adapter("other", with([](LoraConfig&) {}));
  layer.set_active_adapters({"default", "other"});
  m = message_of([&] { (void)layer.A(); });
  CHECK(contains(m, "LoraLinear::A: without an adapter name this needs exactly one active adapter, but 2 are active"));
  m = message_of([&] { layer.bias_mut(); });
  CHECK(contains(m, "the bias is frozen"));
}

TEST_CASE("collect_parameters lists views of the trainable tensors", "[linear]") {
  LoraConfig config;
  config.rank = 2;
  config.bias = lora::BiasMode::all;
  LoraLinear<double> layer(Matrix<double>::Random(5, 4), Vector<double>::Zero(5), config);
  layer.add_adapter("idle", config);
  lora::ParameterList<double> params;
  layer.collect_parameters(params, "layers.1.");
  REQUIRE(params.size() == 3);
  CHECK(params[0].name == "layers.1.lora_A.default.weight");
  CHECK(params[0].role == lora::ParameterRole::lora_A);
  CHECK(params[1].name == "layers.1.lora_B.default.weight");
  CHECK(params[2].name == "layers.1.bias");
  CHECK(params[2].value.rows() == 5);
  CHECK(params[2].value.cols() == 1);
  params[0].value(1, 2) = 42;  // writes through to the layer
  CHECK(layer.A()(1, 2) == 42);
  layer.forward(Matrix<double>::Ones(3, 4));
  layer.backward(Matrix<double>::Ones(3, 5));
  CHECK(params[2].grad(0, 0) == 3);  // dbias = column sums of dY
  CHECK(params[0].grad == layer.grad_A());
}
