// LoraLinear::merge / unmerge: equivalence, exact restore, drift, and the all-or-nothing guarantee.
#include <lora/lora.hpp>

#include "instances.hpp"
#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <functional>
#include <limits>
#include <string>

using lora::Index;
using lora::LoraConfig;
using lora::LoraLinear;
using lora::Matrix;
using lora::Vector;
using lora::testing::relative_error;
using lora::testing::tolerance;
using lora::testing::contains;
using lora::testing::message_of;
using lora::testing::random_matrix;

namespace {

LoraConfig random_adapter(int rank, bool keep_original = false) {
  LoraConfig c;
  c.rank = rank;
  c.alpha = 2.0 * rank;
  c.init = lora::InitMethod::random;
  c.keep_original_weight = keep_original;
  c.seed = 3;
  return c;
}

template <class Scalar>
Matrix<Scalar> base(Index out, Index in) {
  std::srand(21);
  return Matrix<Scalar>::Random(out, in);
}

}  // namespace

TEMPLATE_TEST_CASE("merged forward equals unmerged forward", "[merge]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> W0 = base<Scalar>(33, 40);  // several merge chunks at small in
  const Vector<Scalar> b = Vector<Scalar>::Random(33);
  LoraLinear<Scalar> layer(W0, b, random_adapter(5));
  const Matrix<Scalar> X = Matrix<Scalar>::Random(6, 40);
  layer.eval();
  const Matrix<Scalar> unmerged = layer.forward(X);
  layer.merge();
  CHECK(layer.merged());
  CHECK(relative_error(layer.forward(X), unmerged) < 10 * tolerance<Scalar>());
  Matrix<Scalar> expected = W0;
  expected += static_cast<Scalar>(layer.scaling()) * layer.B() * layer.A();
  CHECK(relative_error(layer.base_weight(), expected) < tolerance<Scalar>());
  layer.unmerge();
  CHECK_FALSE(layer.merged());
  CHECK(relative_error(layer.base_weight(), W0) < tolerance<Scalar>());
}

TEMPLATE_TEST_CASE("merging several active adapters merges their sum", "[merge]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> W0 = base<Scalar>(12, 10);
  LoraLinear<Scalar> layer(W0, random_adapter(2));
  LoraConfig second = random_adapter(3);
  second.seed = 11;
  layer.add_adapter("second", second);
  layer.add_adapter("idle", random_adapter(1));
  layer.set_active_adapters({"default", "second"});
  layer.set_adapter_scale("second", 0.25);
  const Matrix<Scalar> X = Matrix<Scalar>::Random(4, 10);
  const Matrix<Scalar> unmerged = layer.forward(X);
  layer.merge();
  CHECK(relative_error(layer.forward(X), unmerged) < 10 * tolerance<Scalar>());
  layer.unmerge();
  CHECK(relative_error(layer.base_weight(), W0) < tolerance<Scalar>());
}

TEMPLATE_TEST_CASE("keep_original_weight makes unmerge bit-exact", "[merge]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> W0 = base<Scalar>(24, 18);
  LoraLinear<Scalar> layer(W0, random_adapter(4, true));
  for (int cycle = 0; cycle < 10; ++cycle) {
    layer.merge();
    layer.unmerge();
  }
  CHECK(layer.base_weight() == W0);
}

TEMPLATE_TEST_CASE("unmerge by subtraction drifts within a stated bound over 1000 cycles", "[merge]", float, double) {
  using Scalar = TestType;
  // (W0 + d) - d rounds to W0 or a neighbour, and the same d is added and taken out each cycle, so the
  // error does not grow like a random walk: measured 0.5 eps (max |W0| = 1) after 1000 cycles. The
  // README quotes this; the bound below leaves a factor of 4.
  const Matrix<Scalar> W0 = base<Scalar>(64, 48);
  LoraLinear<Scalar> layer(W0, random_adapter(8));
  for (int cycle = 0; cycle < 1000; ++cycle) {
    layer.merge();
    layer.unmerge();
  }
  const double drift = (layer.base_weight() - W0).cwiseAbs().maxCoeff();
  const double eps = std::numeric_limits<Scalar>::epsilon();
  INFO("max drift after 1000 cycles: " << drift << " = " << drift / eps << " eps");
  CHECK(drift > 0);  // subtraction is not exact: the option above exists for a reason
  CHECK(drift <= 2 * eps);
}

TEMPLATE_TEST_CASE("merge refuses NaN/Inf and leaves W0 untouched", "[merge][errors]", float, double) {
  using Scalar = TestType;
  const Matrix<Scalar> W0 = base<Scalar>(20, 16);
  LoraLinear<Scalar> layer(W0, random_adapter(2));
  layer.A().set(1, 3, std::numeric_limits<Scalar>::quiet_NaN());
  std::string m = message_of([&] { layer.merge(); });
  CHECK(m.find("LoraLinear::merge: adapter 'default': A contains NaN or Inf; W0 left unchanged") != std::string::npos);
  CHECK(layer.base_weight() == W0);
  CHECK_FALSE(layer.merged());

  // Finite factors whose product overflows: caught by the checked pass, W0 untouched.
  layer.A().setConstant(std::numeric_limits<Scalar>::max() / 4);
  layer.B().setZero();
  layer.B().set(17, 0, std::numeric_limits<Scalar>::max() / 4);
  layer.B().set(17, 1, std::numeric_limits<Scalar>::max() / 4);
  m = message_of([&] { layer.merge(); });
  CHECK(m.find("the merged weight would contain NaN or Inf (first in rows") != std::string::npos);
  CHECK(layer.base_weight() == W0);
  CHECK_FALSE(layer.merged());
}

TEST_CASE("merge state errors", "[merge][errors]") {
  LoraLinear<double> layer(base<double>(8, 6), random_adapter(2));
  const Matrix<double> X = Matrix<double>::Random(2, 6);
  CHECK(message_of([&] { layer.unmerge(); }) == "LoraLinear::unmerge: the layer is not merged");
  layer.merge();
  CHECK(message_of([&] { layer.merge(); }) == "LoraLinear::merge: the layer is already merged");
  layer.forward(X);
  CHECK(message_of([&] { layer.backward(Matrix<double>::Zero(2, 8)); }) ==
        "LoraLinear::backward: the layer is merged; call unmerge() first");
  CHECK(message_of([&] { layer.set_active_adapters({}); }) ==
        "LoraLinear::set_active_adapters: the layer is merged; call unmerge() first");
  layer.unmerge();
  layer.set_active_adapters({});
  CHECK(message_of([&] { layer.merge(); }) == "LoraLinear::merge: no active adapter to merge");
}
