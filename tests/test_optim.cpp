// Optimisers, clipping and schedules: single steps computed by hand, LoRA+, state kept by name, errors,
// no allocation in steady state, and AdamW8bit (against a numpy reference and against AdamW). PyTorch
// reference values are in test_optim_reference.cpp.
#include <lora/lora.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// Counts calls of the global operator new while `counting` is set (std containers and strings; Eigen's
// own allocations are caught by EIGEN_RUNTIME_NO_MALLOC, set for this test target). Not inlined, so that
// GCC does not pair the malloc of one with the free of the other at call sites.
namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};

__attribute__((noinline)) void* counted_malloc(std::size_t size) noexcept {
  if (counting) ++allocations;
  return std::malloc(size == 0 ? 1 : size);
}
}  // namespace

// Every non-aligned form is replaced, so that all of them pair malloc with free (AddressSanitizer checks it).
void* operator new(std::size_t size) {
  if (void* p = counted_malloc(size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) {
  if (void* p = counted_malloc(size)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept { return counted_malloc(size); }
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept { return counted_malloc(size); }
__attribute__((noinline)) void operator delete(void* p) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete[](void* p) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete(void* p, std::size_t) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
__attribute__((noinline)) void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

using lora::Index;
using lora::Matrix;
using lora::ParameterList;
using lora::ParameterRole;
using namespace lora::optim;

namespace {

// A parameter that owns its value and gradient.
template <class Scalar>
struct Owned {
  std::string name;
  ParameterRole role;
  Matrix<Scalar> value;
  Matrix<Scalar> grad;
};

template <class Scalar>
Owned<Scalar> owned(std::string name, ParameterRole role, std::initializer_list<std::initializer_list<double>> value,
                    std::initializer_list<std::initializer_list<double>> grad) {
  return {std::move(name), role, Matrix<double>(value).cast<Scalar>(), Matrix<double>(grad).cast<Scalar>()};
}

template <class Scalar>
ParameterList<Scalar> views(std::vector<Owned<Scalar>>& params) {
  ParameterList<Scalar> list;
  for (Owned<Scalar>& p : params)
    list.push_back({p.name, p.role, lora::detail::parameter_view(p.value), lora::detail::parameter_view(p.grad)});
  return list;
}

template <class Function>
std::string error_of(Function&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "no std::invalid_argument";
}

// Relative accuracy of a computation in Scalar against values worked out in double.
template <class Scalar>
constexpr double eps_of() {
  return std::is_same_v<Scalar, float> ? 1e-6 : 1e-14;
}

template <class Scalar>
void check_close(const Matrix<Scalar>& actual, const Matrix<double>& expected) {
  REQUIRE(actual.rows() == expected.rows());
  REQUIRE(actual.cols() == expected.cols());
  for (Index i = 0; i < actual.rows(); ++i)
    for (Index j = 0; j < actual.cols(); ++j) {
      INFO("entry (" << i << ", " << j << ")");
      CHECK(static_cast<double>(actual(i, j)) ==
            Approx(expected(i, j)).epsilon(10 * eps_of<Scalar>()).margin(10 * eps_of<Scalar>()));
    }
}

}  // namespace

TEMPLATE_TEST_CASE("all_finite finds one NaN or Inf anywhere, in strided views too", "[optim][finite]", float, double) {
  using Scalar = TestType;
  const Scalar bad[] = {std::numeric_limits<Scalar>::quiet_NaN(), std::numeric_limits<Scalar>::infinity(),
                        -std::numeric_limits<Scalar>::infinity()};
  CHECK(lora::detail::all_finite(Matrix<Scalar>(0, 3)));
  for (const Index rows : {Index(1), Index(7), Index(33)})
    for (const Index cols : {Index(1), Index(5), Index(17)}) {
      Matrix<Scalar> m = Matrix<Scalar>::Random(rows, cols);
      m(0, 0) = std::numeric_limits<Scalar>::max();  // the largest finite value is finite
      m(rows - 1, cols - 1) = -std::numeric_limits<Scalar>::max();
      REQUIRE(lora::detail::all_finite(m));
      // A view of all but the last column (outer stride cols): its entries, and only them, count.
      const Eigen::Map<const Matrix<Scalar>, 0, Eigen::OuterStride<>> view(m.data(), rows, cols - 1,
                                                                         Eigen::OuterStride<>(cols));
      for (const Scalar b : bad)
        for (const Index at : {Index(0), (rows * cols) / 2, rows * cols - 1}) {
          Matrix<Scalar> x = m;
          x(at / cols, at % cols) = b;
          INFO(rows << " x " << cols << ", entry " << at << " = " << b);
          CHECK_FALSE(lora::detail::all_finite(x));
          CHECK(lora::detail::all_finite(x) == x.allFinite());
          const Eigen::Map<const Matrix<Scalar>, 0, Eigen::OuterStride<>> xv(x.data(), rows, cols - 1,
                                                                           Eigen::OuterStride<>(cols));
          CHECK(lora::detail::all_finite(xv) == xv.allFinite());
        }
      CHECK(lora::detail::all_finite(view));
    }
}

TEMPLATE_TEST_CASE("SGD without momentum: p -= lr g", "[optim][sgd]", float, double) {
  using Scalar = TestType;
  std::vector<Owned<Scalar>> p = {owned<Scalar>("w", ParameterRole::weight, {{1, -2}, {0.5, 3}}, {{0.5, 0.25}, {-1, 2}})};
  auto list = views(p);
  SGDOptions o;
  o.lr = 0.1;
  SGD<Scalar> sgd(o);
  sgd.step(list);
  check_close(p[0].value, Matrix<double>{{0.95, -2.025}, {0.6, 2.8}});
  CHECK(p[0].grad == Matrix<Scalar>(Matrix<double>{{0.5, 0.25}, {-1, 2}}.cast<Scalar>()));  // gradient unchanged
  CHECK(sgd.state_bytes() == 0);
  CHECK(sgd.momentum_buffer("w") == nullptr);
  CHECK(sgd.step_count("w") == 1);
}

TEMPLATE_TEST_CASE("SGD momentum with dampening, two steps by hand", "[optim][sgd]", float, double) {
  using Scalar = TestType;
  std::vector<Owned<Scalar>> p = {owned<Scalar>("w", ParameterRole::weight, {{1, -2}}, {{0.5, 0.25}})};
  auto list = views(p);
  SGDOptions o;
  o.lr = 0.1;
  o.momentum = 0.9;
  o.dampening = 0.5;
  SGD<Scalar> sgd(o);
  sgd.step(list);  // buf = g1 = (0.5, 0.25) (no dampening on the first step), p = (0.95, -2.025)
  check_close(p[0].value, Matrix<double>{{0.95, -2.025}});
  check_close(*sgd.momentum_buffer("w"), Matrix<double>{{0.5, 0.25}});
  p[0].grad << Scalar(1), Scalar(-1);
  sgd.step(list);  // buf = 0.9 (0.5, 0.25) + 0.5 (1, -1) = (0.95, -0.275); p -= 0.1 buf
  check_close(*sgd.momentum_buffer("w"), Matrix<double>{{0.95, -0.275}});
  check_close(p[0].value, Matrix<double>{{0.855, -1.9975}});
  CHECK(sgd.state_bytes() == 2 * sizeof(Scalar));
}

TEMPLATE_TEST_CASE("SGD Nesterov with coupled weight decay, two steps by hand", "[optim][sgd]", float, double) {
  using Scalar = TestType;
  std::vector<Owned<Scalar>> p = {owned<Scalar>("w", ParameterRole::weight, {{1, -2}}, {{0.5, 0.25}})};
  auto list = views(p);
  SGDOptions o;
  o.lr = 0.1;
  o.momentum = 0.5;
  o.nesterov = true;
  o.weight_decay = 0.1;
  SGD<Scalar> sgd(o);
  // d = g + 0.1 p = (0.6, 0.05); buf = d; step = d + 0.5 buf = (0.9, 0.075); p = (0.91, -2.0075)
  sgd.step(list);
  check_close(p[0].value, Matrix<double>{{0.91, -2.0075}});
  // d = (0.5, 0.25) + 0.1 (0.91, -2.0075) = (0.591, 0.04925); buf = 0.5 (0.6, 0.05) + d = (0.891, 0.07425)
  // step = d + 0.5 buf = (1.0365, 0.086375); p = (0.80635, -2.0161375)
  sgd.step(list);
  check_close(*sgd.momentum_buffer("w"), Matrix<double>{{0.891, 0.07425}});
  check_close(p[0].value, Matrix<double>{{0.80635, -2.0161375}});
}

TEMPLATE_TEST_CASE("SGD weight decay skips biases when asked", "[optim][sgd]", float, double) {
  using Scalar = TestType;
  std::vector<Owned<Scalar>> p = {owned<Scalar>("w", ParameterRole::weight, {{2}}, {{1}}),
                                  owned<Scalar>("b", ParameterRole::bias, {{2}}, {{1}})};
  auto list = views(p);
  SGDOptions o;
  o.lr = 0.5;
  o.weight_decay = 0.1;
  o.decay_biases = false;
  SGD<Scalar>(o).step(list);
  check_close(p[0].value, Matrix<double>{{2 - 0.5 * (1 + 0.2)}});
  check_close(p[1].value, Matrix<double>{{1.5}});
}

TEMPLATE_TEST_CASE("AdamW, the first two steps by hand", "[optim][adamw]", float, double) {
  using Scalar = TestType;
  std::vector<Owned<Scalar>> p = {owned<Scalar>("w", ParameterRole::weight, {{1, -2}}, {{0.5, -0.1}})};
  auto list = views(p);
  AdamWOptions o;
  o.lr = 0.1;
  o.weight_decay = 0.01;
  AdamW<Scalar> adam(o);
  adam.step(list);
  // t = 1: p *= 1 - 0.1 * 0.01; m = 0.1 g, v = 0.001 g^2; m / (1 - 0.9) = g, sqrt(v / (1 - 0.999)) = |g|
  // p -= 0.1 g / (|g| + 1e-8): (0.999 - 0.1 * 0.5 / 0.50000001, -1.998 + 0.1 * 0.1 / 0.10000001)
  check_close(p[0].value, Matrix<double>{{0.999 - 0.05 / 0.50000001, -1.998 + 0.01 / 0.10000001}});
  check_close(*adam.exp_avg("w"), Matrix<double>{{0.05, -0.01}});
  check_close(*adam.exp_avg_sq("w"), Matrix<double>{{0.00025, 0.00001}});
  // t = 2 with g = (-0.25, 0.3):
  //   m = 0.9 (0.05, -0.01) + 0.1 (-0.25, 0.3) = (0.02, 0.021)
  //   v = 0.999 (0.00025, 0.00001) + 0.001 (0.0625, 0.09) = (0.00031225, 0.00009999)
  //   p = p (1 - 0.001) - 0.1 / (1 - 0.81) m / (sqrt(v) / sqrt(1 - 0.998001) + 1e-8)
  const double p1[2] = {0.999 - 0.05 / 0.50000001, -1.998 + 0.01 / 0.10000001};
  p[0].grad << Scalar(-0.25), Scalar(0.3);
  adam.step(list);
  const double m2[2] = {0.02, 0.021}, v2[2] = {0.00031225, 0.00009999};
  Matrix<double> expected(1, 2);
  for (int j = 0; j < 2; ++j)
    expected(0, j) = p1[j] * 0.999 - 0.1 / 0.19 * m2[j] / (std::sqrt(v2[j]) / std::sqrt(0.001999) + 1e-8);
  check_close(p[0].value, expected);
  CHECK(adam.step_count("w") == 2);
  CHECK(adam.state_bytes() == 4 * sizeof(Scalar));
}

TEMPLATE_TEST_CASE("AdamW updates a large parameter in row blocks over the threads as one pass would", "[optim][adamw]",
                   float, double) {
  using Scalar = TestType;
  // 601 x 617 values: past the threading threshold, in blocks of one row (1024 / 617 = 1), an odd row
  // count for the split; a 3 x 1900 one (row blocks of 1) and a 5000 x 1 one (blocks of 1024
  // rows, a partial last block). The reference is the update written out on whole matrices.
  const bool amsgrad = GENERATE(false, true);
  const auto [rows, cols] = GENERATE(table<Index, Index>({{601, 617}, {3, 1900}, {5000, 1}}));
  CAPTURE(amsgrad, rows, cols);
  std::vector<Owned<Scalar>> p = {{"w", ParameterRole::weight, Matrix<Scalar>::Random(rows, cols),
                                   Matrix<Scalar>::Zero(rows, cols)}};
  auto list = views(p);
  AdamWOptions o;
  o.lr = 0.01;
  o.weight_decay = 0.1;
  o.amsgrad = amsgrad;
  AdamW<Scalar> adam(o);
  Matrix<double> value = p[0].value.template cast<double>(), m = Matrix<double>::Zero(rows, cols), v = m, v_max = m;
  for (int t = 1; t <= 3; ++t) {
    p[0].grad = Matrix<Scalar>::Random(rows, cols) * Scalar(t);
    const Matrix<double> g = p[0].grad.template cast<double>();
    adam.step(list);
    m = 0.9 * m + 0.1 * g;
    v = (0.999 * v.array() + 0.001 * g.array().square()).matrix();
    v_max = v_max.cwiseMax(v);
    const Matrix<double>& second = amsgrad ? v_max : v;
    const double step_size = o.lr / (1 - std::pow(0.9, t)), bc2 = std::sqrt(1 - std::pow(0.999, t));
    value = (value.array() * (1 - o.lr * o.weight_decay) -
             step_size * m.array() / (second.array().sqrt() / bc2 + o.eps)).matrix();
    // Each entry within a few roundings of the double reference: a skipped, repeated or misplaced block
    // would be off by a whole step.
    const double tolerance = std::is_same_v<Scalar, float> ? 1e-5 : 1e-12;
    CHECK((p[0].value.template cast<double>() - value).cwiseAbs().maxCoeff() < tolerance);
    CHECK((adam.exp_avg("w")->template cast<double>() - m).cwiseAbs().maxCoeff() < tolerance);
  }
}

TEMPLATE_TEST_CASE("AdamW amsgrad keeps the largest second moment", "[optim][adamw]", float, double) {
  using Scalar = TestType;
  std::vector<Owned<Scalar>> p = {owned<Scalar>("w", ParameterRole::weight, {{0}}, {{1}})};
  auto list = views(p);
  AdamWOptions o;
  o.lr = 0.1;
  o.weight_decay = 0;
  o.amsgrad = true;
  AdamW<Scalar> adam(o);
  adam.step(list);  // m = 0.1, v = v_max = 0.001; p = -0.1 / (1 + 1e-8)
  p[0].grad << Scalar(0);
  adam.step(list);  // m = 0.09, v = 0.000999 < v_max = 0.001
  const double p1 = -0.1 / (1 + 1e-8);
  const double expected = p1 - 0.1 / 0.19 * 0.09 / (std::sqrt(0.001) / std::sqrt(0.001999) + 1e-8);
  check_close(p[0].value, Matrix<double>{{expected}});
  CHECK(adam.state_bytes() == 3 * sizeof(Scalar));
}

TEMPLATE_TEST_CASE("LoRA+ gives lora_B lr * ratio", "[optim][loraplus]", float, double) {
  using Scalar = TestType;
  auto make = [] {
    return std::vector<Owned<Scalar>>{owned<Scalar>("a", ParameterRole::lora_A, {{0}}, {{1}}),
                                      owned<Scalar>("b", ParameterRole::lora_B, {{0}}, {{1}}),
                                      owned<Scalar>("bias", ParameterRole::bias, {{0}}, {{1}}),
                                      owned<Scalar>("w", ParameterRole::weight, {{0}}, {{1}})};
  };
  SECTION("SGD") {
    auto p = make();
    auto list = views(p);
    SGDOptions o;
    o.lr = 0.1;
    o.loraplus_lr_ratio = 16;
    SGD<Scalar>(o).step(list);
    CHECK(p[0].value(0, 0) == Approx(-0.1));
    CHECK(p[1].value(0, 0) == Approx(-1.6));
    CHECK(p[2].value(0, 0) == Approx(-0.1));
    CHECK(p[3].value(0, 0) == Approx(-0.1));
  }
  SECTION("AdamW, biases grouped with lora_B and not decayed, as PEFT does") {
    auto p = make();
    for (auto& q : p) q.value(0, 0) = 1;
    auto list = views(p);
    AdamWOptions o;
    o.lr = 0.01;
    o.weight_decay = 0.5;
    o.loraplus_lr_ratio = 4;
    o.loraplus_include_biases = true;
    o.decay_biases = false;
    AdamW<Scalar>(o).step(list);  // the first Adam step moves by lr / (1 + 1e-8) against the gradient
    const double step = 1 / (1 + 1e-8);
    CHECK(p[0].value(0, 0) == Approx((1 - 0.01 * 0.5) - 0.01 * step));
    CHECK(p[1].value(0, 0) == Approx((1 - 0.04 * 0.5) - 0.04 * step));
    CHECK(p[2].value(0, 0) == Approx(1 - 0.04 * step));
    CHECK(p[3].value(0, 0) == Approx((1 - 0.01 * 0.5) - 0.01 * step));
  }
}

TEMPLATE_TEST_CASE("clip_grad_norm scales by max_norm / (total + 1e-6) only when that is < 1", "[optim][clip]", float,
                   double) {
  using Scalar = TestType;
  auto make = [] {
    return std::vector<Owned<Scalar>>{owned<Scalar>("x", ParameterRole::lora_A, {{0, 0}}, {{3, 4}}),
                                      owned<Scalar>("y", ParameterRole::bias, {{0}}, {{12}})};
  };
  auto p = make();
  auto list = views(p);
  CHECK(grad_norm(list) == Approx(13).epsilon(eps_of<Scalar>()));
  CHECK(clip_grad_norm(list, 100.0) == Approx(13).epsilon(eps_of<Scalar>()));
  CHECK(p[0].grad == make()[0].grad);  // 100 / 13 > 1: unchanged
  CHECK(clip_grad_norm(list, 13.0) == Approx(13).epsilon(eps_of<Scalar>()));  // coef = 13 / (13 + 1e-6) < 1
  check_close(p[1].grad, Matrix<double>{{12 * 13 / (13 + 1e-6)}});
  p = make();
  list = views(p);
  CHECK(clip_grad_norm(list, 1.3) == Approx(13).epsilon(eps_of<Scalar>()));
  const double coef = 1.3 / (13 + 1e-6);
  check_close(p[0].grad, Matrix<double>{{3 * coef, 4 * coef}});
  check_close(p[1].grad, Matrix<double>{{12 * coef}});
  CHECK(grad_norm(list) == Approx(13 * coef).epsilon(10 * eps_of<Scalar>()));
  CHECK(clip_grad_norm(list, std::numeric_limits<double>::infinity()) ==
        Approx(13 * coef).epsilon(10 * eps_of<Scalar>()));

  ParameterList<Scalar> empty;
  CHECK(clip_grad_norm(empty, 1.0) == 0);

  zero_grad(list);
  CHECK(p[0].grad.isZero(0));
  CHECK(p[1].grad.isZero(0));
}

TEMPLATE_TEST_CASE("clip_grad_norm with huge and non-finite gradients", "[optim][clip]", float, double) {
  using Scalar = TestType;
  const Scalar huge = std::numeric_limits<Scalar>::max() / 4;  // its square overflows double for double
  std::vector<Owned<Scalar>> p = {owned<Scalar>("x", ParameterRole::weight, {{0, 0}}, {{huge, huge}})};
  auto list = views(p);
  CHECK(grad_norm(list) == Approx(std::sqrt(2.0) * static_cast<double>(huge)).epsilon(1e-12));
  clip_grad_norm(list, 1.0);
  CHECK(p[0].grad.norm() == Approx(1.0).epsilon(10 * eps_of<Scalar>()));

  p[0].grad << Scalar(1), std::numeric_limits<Scalar>::quiet_NaN();
  CHECK(error_of([&] { clip_grad_norm(list, 1.0); }) ==
        "clip_grad_norm: the gradient of 'x' contains NaN or Inf; total norm is nan");
  CHECK(std::isnan(clip_grad_norm(list, 1.0, false)));
  CHECK(p[0].grad(0, 0) == 1);  // left as it was
  p[0].grad << Scalar(1), std::numeric_limits<Scalar>::infinity();
  CHECK(clip_grad_norm(list, 1.0, false) == std::numeric_limits<double>::infinity());
  CHECK(p[0].grad(0, 0) == 1);
}

TEST_CASE("schedules follow transformers' formulas", "[optim][schedule]") {
  const LrSchedule c = LrSchedule::constant();
  CHECK(c.multiplier(0) == 1);
  CHECK(c.multiplier(1000) == 1);

  const LrSchedule w = LrSchedule::constant_with_warmup(4);
  CHECK(w.multiplier(0) == 0);
  CHECK(w.multiplier(2) == 0.5);
  CHECK(w.multiplier(4) == 1);
  CHECK(w.multiplier(400) == 1);

  const LrSchedule lin = LrSchedule::linear(2, 6);
  const double expected_linear[] = {0, 0.5, 1, 0.75, 0.5, 0.25, 0, 0, 0};
  for (int s = 0; s < 9; ++s) CHECK(lin.multiplier(s) == Approx(expected_linear[s]).margin(1e-15));
  CHECK(lin.lr(0.01, 3) == Approx(0.0075));

  const LrSchedule cos = LrSchedule::cosine(2, 6);
  const double expected_cosine[] = {0, 0.5, 1, (1 + std::sqrt(0.5)) / 2, 0.5, (1 - std::sqrt(0.5)) / 2, 0};
  for (int s = 0; s < 7; ++s) CHECK(cos.multiplier(s) == Approx(expected_cosine[s]).margin(1e-15));
  CHECK(LrSchedule::cosine(0, 4, 1.0).multiplier(2) == Approx(0).margin(1e-15));  // one full cycle: down at half
  CHECK(LrSchedule::cosine(0, 4, 1.0).multiplier(4) == Approx(1));

  CHECK(LrSchedule::from_name("cosine", 2, 6).kind() == LrSchedule::Kind::cosine);
  CHECK(LrSchedule::from_name("linear", 2, 6).multiplier(3) == 0.75);
  CHECK(std::string(to_string(LrSchedule::from_name("constant_with_warmup", 2, 6).kind())) == "constant_with_warmup");
}

TEMPLATE_TEST_CASE("LrScheduler drives an optimiser's lr as LambdaLR does", "[optim][schedule]", float, double) {
  using Scalar = TestType;
  AdamWOptions o;
  o.lr = 0.02;
  o.loraplus_lr_ratio = 8;
  AdamW<Scalar> adam(o);
  LrScheduler<AdamW<Scalar>> scheduler(adam, LrSchedule::linear(2, 4));
  CHECK(scheduler.base_lr() == 0.02);
  CHECK(adam.lr() == 0);  // step 0 of the warmup
  const double expected[] = {0, 0.01, 0.02, 0.01, 0, 0};
  for (int s = 0; s < 6; ++s) {
    CHECK(scheduler.current_step() == s);
    CHECK(adam.lr() == Approx(expected[s]).margin(1e-18));
    scheduler.step();
  }
  SGD<Scalar> sgd;
  LrScheduler<SGD<Scalar>> constant(sgd, LrSchedule());
  constant.step();
  CHECK(sgd.lr() == 1e-2);
}

TEST_CASE("bad hyper-parameters throw std::invalid_argument naming the function and value", "[optim][errors]") {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  auto sgd = [](auto change) {
    return error_of([&] {
      SGDOptions o;
      o.momentum = 0.5;
      change(o);
      SGD<double> s(o);
    });
  };
  CHECK(sgd([](SGDOptions& o) { o.lr = 0; }) == "SGD::SGD: lr must be finite and > 0, got 0");
  CHECK(sgd([](SGDOptions& o) { o.lr = -0.1; }) == "SGD::SGD: lr must be finite and > 0, got -0.1");
  CHECK(sgd([&](SGDOptions& o) { o.lr = nan; }) == "SGD::SGD: lr must be finite and > 0, got nan");
  CHECK(sgd([&](SGDOptions& o) { o.lr = inf; }) == "SGD::SGD: lr must be finite and > 0, got inf");
  CHECK(sgd([](SGDOptions& o) { o.momentum = -0.9; }) == "SGD::SGD: momentum must be finite and >= 0, got -0.9");
  CHECK(sgd([](SGDOptions& o) { o.dampening = 1.5; }) == "SGD::SGD: dampening must be in [0, 1], got 1.5");
  CHECK(sgd([](SGDOptions& o) { o.weight_decay = -1e-4; }) ==
        "SGD::SGD: weight_decay must be finite and >= 0, got -0.0001");
  CHECK(sgd([](SGDOptions& o) {
          o.momentum = 0;
          o.nesterov = true;
        }) == "SGD::SGD: nesterov needs momentum > 0 and dampening = 0, got momentum = 0, dampening = 0");
  CHECK(sgd([](SGDOptions& o) {
          o.nesterov = true;
          o.dampening = 0.1;
        }) == "SGD::SGD: nesterov needs momentum > 0 and dampening = 0, got momentum = 0.5, dampening = 0.1");
  CHECK(sgd([](SGDOptions& o) { o.loraplus_lr_ratio = 0; }) ==
        "SGD::SGD: loraplus_lr_ratio must be finite and > 0, got 0");
  CHECK(sgd([](SGDOptions&) {}) == "no std::invalid_argument");

  auto adam = [](auto change) {
    return error_of([&] {
      AdamWOptions o;
      change(o);
      AdamW<float> a(o);
    });
  };
  CHECK(adam([](AdamWOptions& o) { o.lr = -1; }) == "AdamW::AdamW: lr must be finite and > 0, got -1");
  CHECK(adam([](AdamWOptions& o) { o.beta1 = 1; }) == "AdamW::AdamW: beta1 must be in [0, 1), got 1");
  CHECK(adam([](AdamWOptions& o) { o.beta1 = -0.1; }) == "AdamW::AdamW: beta1 must be in [0, 1), got -0.1");
  CHECK(adam([](AdamWOptions& o) { o.beta2 = 1.5; }) == "AdamW::AdamW: beta2 must be in [0, 1), got 1.5");
  CHECK(adam([&](AdamWOptions& o) { o.beta2 = nan; }) == "AdamW::AdamW: beta2 must be in [0, 1), got nan");
  CHECK(adam([](AdamWOptions& o) { o.eps = 0; }) == "AdamW::AdamW: eps must be finite and > 0, got 0");
  CHECK(adam([](AdamWOptions& o) { o.weight_decay = -0.01; }) ==
        "AdamW::AdamW: weight_decay must be finite and >= 0, got -0.01");
  CHECK(adam([](AdamWOptions& o) { o.loraplus_lr_ratio = -16; }) ==
        "AdamW::AdamW: loraplus_lr_ratio must be finite and > 0, got -16");
  CHECK(adam([](AdamWOptions& o) { o.beta1 = 0; }) == "no std::invalid_argument");

  SGD<double> s;
  CHECK(error_of([&] { s.set_lr(-1); }) == "SGD::set_lr: lr must be finite and >= 0, got -1");
  CHECK(error_of([&] { s.set_lr(0); }) == "no std::invalid_argument");  // schedules reach 0
  AdamW<double> a;
  CHECK(error_of([&] { a.set_lr(nan); }) == "AdamW::set_lr: lr must be finite and >= 0, got nan");

  ParameterList<double> none;
  CHECK(error_of([&] { clip_grad_norm(none, 0.0); }) == "clip_grad_norm: max_norm must be > 0, got 0");
  CHECK(error_of([&] { clip_grad_norm(none, nan); }) == "clip_grad_norm: max_norm must be > 0, got nan");

  CHECK(error_of([] { LrSchedule::linear(5, 4); }) == "LrSchedule::linear: warmup_steps (5) must be <= total_steps (4)");
  CHECK(error_of([] { LrSchedule::cosine(5, 4); }) == "LrSchedule::cosine: warmup_steps (5) must be <= total_steps (4)");
  CHECK(error_of([] { LrSchedule::linear(-1, 4); }) == "LrSchedule::linear: warmup_steps must be >= 0, got -1");
  CHECK(error_of([] { LrSchedule::linear(0, 0); }) == "LrSchedule::linear: total_steps must be > 0, got 0");
  CHECK(error_of([] { LrSchedule::constant_with_warmup(-2); }) ==
        "LrSchedule::constant_with_warmup: warmup_steps must be >= 0, got -2");
  CHECK(error_of([] { LrSchedule::cosine(0, 4, 0); }) == "LrSchedule::cosine: num_cycles must be finite and > 0, got 0");
  CHECK(error_of([] { LrSchedule::from_name("cosine_with_restarts", 0, 4); }) ==
        "LrSchedule::from_name: unknown schedule 'cosine_with_restarts', expected constant, constant_with_warmup, "
        "linear or cosine");
  CHECK(error_of([] { LrSchedule::constant().multiplier(-1); }) == "LrSchedule::multiplier: step must be >= 0, got -1");
}

TEMPLATE_TEST_CASE("state is kept by name: order, late parameters, shape changes, duplicates", "[optim][state]",
                   float, double) {
  using Scalar = TestType;
  auto make = [] {
    return std::vector<Owned<Scalar>>{owned<Scalar>("a", ParameterRole::lora_A, {{1, 2}}, {{0.1, -0.2}}),
                                      owned<Scalar>("b", ParameterRole::lora_B, {{3}, {4}}, {{0.3}, {0.4}})};
  };
  AdamWOptions o;
  o.lr = 0.1;
  o.loraplus_lr_ratio = 2;

  SECTION("a list rebuilt in another order each step gives the same result") {
    auto p = make(), q = make();
    AdamW<Scalar> in_order(o), shuffled(o);
    for (int s = 0; s < 4; ++s) {
      for (auto* x : {&p, &q}) {
        (*x)[0].grad *= Scalar(-1.5);
        (*x)[1].grad *= Scalar(0.5);
      }
      auto list = views(p);
      in_order.step(list);
      ParameterList<Scalar> reversed;
      for (auto it = q.rbegin(); it != q.rend(); ++it)
        reversed.push_back({it->name, it->role, lora::detail::parameter_view(it->value),
                            lora::detail::parameter_view(it->grad)});
      shuffled.step(reversed);
    }
    CHECK(p[0].value == q[0].value);
    CHECK(p[1].value == q[1].value);
    CHECK(in_order.step_count("a") == 4);
  }

  SECTION("a parameter first seen later starts its own step count") {
    auto p = make();
    std::vector<Owned<Scalar>> only_a(p.begin(), p.begin() + 1);
    AdamW<Scalar> adam(o);
    auto list_a = views(only_a);
    adam.step(list_a);
    adam.step(list_a);
    auto list = views(p);
    adam.step(list);
    CHECK(adam.step_count("a") == 3);
    CHECK(adam.step_count("b") == 1);
    CHECK(adam.step_count("c") == 0);
    CHECK(adam.num_states() == 2);
    // b's first step is a first Adam step: after the decay it moves by lr * ratio * g / (|g| + eps).
    const double first = 0.2 * 0.3 / (0.3 + 1e-8);
    CHECK(static_cast<double>(p[1].value(0, 0)) == Approx(3 * (1 - 0.2 * 0.01) - first));
    CHECK(adam.erase_state("b"));
    CHECK(adam.num_states() == 1);
    adam.reset_state();
    CHECK(adam.num_states() == 0);
    CHECK(adam.state_bytes() == 0);
  }

  SECTION("errors leave values and state untouched") {
    auto p = make();
    AdamW<Scalar> adam(o);
    auto list = views(p);
    adam.step(list);
    const Matrix<Scalar> a_after_one = p[0].value, m_after_one = *adam.exp_avg("a");
    const std::size_t bytes = adam.state_bytes();

    auto wider = make();
    wider[1].value = Matrix<Scalar>::Ones(2, 2);
    wider[1].grad = Matrix<Scalar>::Ones(2, 2);
    std::vector<Owned<Scalar>> changed = {p[0], wider[1]};
    auto changed_list = views(changed);
    CHECK(error_of([&] { adam.step(changed_list); }) ==
          "AdamW::step: parameter 'b' has shape 2 x 2 but its optimiser state was made for 2 x 1; call "
          "reset_state() or erase_state(name) after changing the model");

    std::vector<Owned<Scalar>> twice = {p[0], owned<Scalar>("new", ParameterRole::weight, {{1}}, {{1}}), p[0]};
    auto twice_list = views(twice);
    CHECK(error_of([&] { adam.step(twice_list); }) == "AdamW::step: parameter 'a' appears twice in the list");
    CHECK(adam.num_states() == 2);  // "new" was not kept

    std::vector<Owned<Scalar>> bad_grad = {p[0]};
    bad_grad[0].grad.resize(2, 1);
    bad_grad[0].grad.setZero();
    auto bad_grad_list = views(bad_grad);
    CHECK(error_of([&] { adam.step(bad_grad_list); }) == "AdamW::step: parameter 'a' has value 1 x 2 but grad 2 x 1");

    std::vector<Owned<Scalar>> nan_grad = {p[0], p[1]};
    nan_grad[1].grad(1, 0) = std::numeric_limits<Scalar>::quiet_NaN();
    auto nan_list = views(nan_grad);
    CHECK(error_of([&] { adam.step(nan_list); }) == "AdamW::step: the gradient of 'b' contains NaN or Inf");
    CHECK(nan_grad[0].value == a_after_one);  // 'a' came first but was not updated
    CHECK(*adam.exp_avg("a") == m_after_one);
    CHECK(adam.step_count("a") == 1);
    CHECK(adam.state_bytes() == bytes);

    SGDOptions so;
    so.momentum = 0.9;
    SGD<Scalar> sgd(so);
    sgd.step(list);
    CHECK(error_of([&] { sgd.step(changed_list); }) ==
          "SGD::step: parameter 'b' has shape 2 x 2 but its optimiser state was made for 2 x 1; call "
          "reset_state() or erase_state(name) after changing the model");
  }
}

TEMPLATE_TEST_CASE("state_bytes of a LoraLinear's parameters", "[optim][state]", float, double) {
  using Scalar = TestType;
  lora::LoraConfig config;
  config.rank = 2;
  config.bias = lora::BiasMode::all;
  const Matrix<Scalar> W0 = Matrix<Scalar>::Ones(8, 6);
  const lora::Vector<Scalar> b = lora::Vector<Scalar>::Ones(8);
  lora::LoraLinear<Scalar> layer(W0, b, config);
  ParameterList<Scalar> params;
  layer.collect_parameters(params, "layer.");
  REQUIRE(params.size() == 3);
  const std::size_t trained = 2 * 6 + 8 * 2 + 8;
  REQUIRE(static_cast<std::size_t>(layer.num_trainable_parameters()) == trained);

  AdamW<Scalar> adam;
  CHECK(adam.state_bytes() == 0);
  adam.step(params);
  CHECK(adam.state_bytes() == 2 * trained * sizeof(Scalar));
  AdamWOptions ams;
  ams.amsgrad = true;
  AdamW<Scalar> adam_ams(ams);
  adam_ams.step(params);
  CHECK(adam_ams.state_bytes() == 3 * trained * sizeof(Scalar));
  SGD<Scalar> plain;
  plain.step(params);
  CHECK(plain.state_bytes() == 0);
  SGDOptions mo;
  mo.momentum = 0.9;
  SGD<Scalar> momentum(mo);
  momentum.step(params);
  CHECK(momentum.state_bytes() == trained * sizeof(Scalar));
}

TEMPLATE_TEST_CASE("a steady-state training step allocates nothing", "[optim][alloc]", float, double) {
  using Scalar = TestType;
  lora::LoraConfig config;
  config.rank = 4;
  config.init = lora::InitMethod::random;
  config.bias = lora::BiasMode::all;
  std::srand(3);
  const Matrix<Scalar> W0 = Matrix<Scalar>::Random(24, 16);
  const lora::Vector<Scalar> b = lora::Vector<Scalar>::Random(24);
  lora::LoraLinear<Scalar> layer(W0, b, config);
  const Matrix<Scalar> X = Matrix<Scalar>::Random(5, 16);
  ParameterList<Scalar> params;
  layer.collect_parameters(params, "model.layer.");

  AdamWOptions ao;
  ao.amsgrad = true;
  ao.loraplus_lr_ratio = 16;
  AdamW<Scalar> adam(ao);
  SGDOptions so;
  so.momentum = 0.9;
  so.nesterov = true;
  so.weight_decay = 0.01;
  SGD<Scalar> sgd(so);
  LrScheduler<AdamW<Scalar>> scheduler(adam, LrSchedule::cosine(2, 20));
  auto train_step = [&](bool forbid) {
    layer.zero_grad();
    const Matrix<Scalar> Y = layer.forward(X);
    layer.backward(Y);
    counting = true;
    Eigen::internal::set_is_malloc_allowed(!forbid);
    clip_grad_norm(params, 0.5);
    adam.step(params);
    sgd.step(params);
    scheduler.step();
    Eigen::internal::set_is_malloc_allowed(true);
    counting = false;
  };
  allocations = 0;
  train_step(false);  // first sight: state is allocated
  CHECK(allocations > 0);
  allocations = 0;
  for (int s = 0; s < 5; ++s) train_step(true);  // Eigen aborts on an allocation
  CHECK(allocations == 0);
  CHECK(adam.step_count("model.layer.lora_B.default.weight") == 6);
}

TEST_CASE("AdamW with LoRA+ and a cosine schedule trains a LoraLinear", "[optim][integration]") {
  // Teacher: W0 + a rank-2 change; the adapter learns it from random inputs.
  std::srand(11);
  const Matrix<double> W0 = Matrix<double>::Random(12, 10);
  const Matrix<double> delta = Matrix<double>::Random(12, 2) * Matrix<double>::Random(2, 10) * 0.5;
  lora::LoraConfig config;
  config.rank = 4;
  config.alpha = 4;
  config.seed = 5;
  lora::LoraLinear<double> layer(W0, config);
  AdamWOptions o;
  o.lr = 0.02;
  o.weight_decay = 0;
  o.loraplus_lr_ratio = 4;
  AdamW<double> adam(o);
  const int steps = 300;
  LrScheduler<AdamW<double>> scheduler(adam, LrSchedule::cosine(20, steps));
  ParameterList<double> params;
  double first_loss = 0, loss = 0;
  for (int s = 0; s < steps; ++s) {
    const Matrix<double> X = Matrix<double>::Random(16, 10);
    const Matrix<double> target = X * (W0 + delta).transpose();
    const Matrix<double> diff = layer.forward(X) - target;
    loss = diff.squaredNorm() / static_cast<double>(diff.size());
    if (s == 0) first_loss = loss;
    layer.zero_grad();
    layer.backward(2 * diff / static_cast<double>(diff.size()));
    params.clear();  // rebuilt every step, as a model with changing adapters would
    layer.collect_parameters(params);
    clip_grad_norm(params, 1.0);
    adam.step(params);
    scheduler.step();
  }
  INFO("loss " << first_loss << " -> " << loss);
  CHECK(loss < 1e-6 * first_loss);  // measured: 0.13 -> 1.7e-12
  CHECK(adam.lr() == 0);  // the cosine ends at 0
}

// ---- AdamW8bit ----

namespace {

nlohmann::json load_adamw8bit_fixture() {
  const std::string path = std::string(LORA_TEST_DATA_DIR) + "/optim/adamw8bit.json";
  std::ifstream in(path);
  if (!in) FAIL("cannot open " << path);
  return nlohmann::json::parse(in);
}

Matrix<float> from_json(const nlohmann::json& values, Index rows, Index cols) {
  const std::vector<float> v = values.get<std::vector<float>>();
  REQUIRE(static_cast<Index>(v.size()) == rows * cols);
  Matrix<float> m(rows, cols);
  std::copy(v.begin(), v.end(), m.data());
  return m;
}

// The neighbours of x in the ascending table t: t[lo] <= x <= t[hi], hi = lo + 1 (x inside the table).
std::pair<float, float> bracket(const std::array<float, 256>& t, float x) {
  auto it = std::upper_bound(t.begin(), t.end(), x);
  if (it == t.end()) --it;
  if (it == t.begin()) ++it;
  return {*(it - 1), *it};
}

// 0.5 mean_i || x_i W + b - y_i ||^2 and its gradients.
struct LeastSquares {
  Matrix<float> X, Y;
  float loss(const Matrix<float>& W, const Matrix<float>& b) const {
    const Matrix<float> R = (X * W).rowwise() + b.row(0) - Y;
    return 0.5f * R.squaredNorm() / static_cast<float>(X.rows());
  }
  void gradients(const Matrix<float>& W, const Matrix<float>& b, Matrix<float>& gW, Matrix<float>& gb) const {
    const Matrix<float> R = ((X * W).rowwise() + b.row(0) - Y) / static_cast<float>(X.rows());
    gW.noalias() = X.transpose() * R;
    gb.array() = R.colwise().sum().array();
  }
};

}  // namespace

TEST_CASE("dynamic_map_unsigned is bitsandbytes' create_dynamic_map(signed=False)", "[optim][adamw8bit]") {
  const auto& u = lora::quant::dynamic_map_unsigned();
  const nlohmann::json fixture = load_adamw8bit_fixture();
  const std::vector<float> expected = fixture.at("unsigned_map").get<std::vector<float>>();
  REQUIRE(expected.size() == 256);
  for (std::size_t i = 0; i < 256; ++i) {
    INFO("entry " << i);
    CHECK(u[i] == expected[i]);
  }
  for (std::size_t i = 1; i < 256; ++i) CHECK(u[i - 1] < u[i]);
  // By hand: 0; 1e-6 times the midpoint of linspace(0.1, 1, 3)'s first two; 1 - 0.9/256 (the last midpoint of
  // linspace(0.1, 1, 129)); 1.
  CHECK(u[0] == 0.0f);
  CHECK(u[1] == Approx(0.325e-6).epsilon(1e-6));
  CHECK(u[254] == Approx(1 - 0.9 / 256).epsilon(1e-6));
  CHECK(u[255] == 1.0f);
}

TEST_CASE("dynamic codes are the nearest map entries: dequantized within half a step", "[optim][adamw8bit]") {
  std::srand(5);
  for (const bool is_signed : {true, false}) {
    const auto& t = is_signed ? lora::quant::dynamic_map() : lora::quant::dynamic_map_unsigned();
    for (int k = 0; k < 4000; ++k) {
      // Uniform values and values spread over the map's decades.
      const float r = static_cast<float>(std::rand()) / static_cast<float>(RAND_MAX);
      float x = k % 2 ? r : std::pow(10.0f, -7.0f * r);
      if (is_signed && k % 3 == 0) x = -x;
      const std::uint8_t c = is_signed ? lora::quant::detail::dynamic_code(x) : lora::quant::detail::dynamic_code_unsigned(x);
      const auto [lo, hi] = bracket(t, x);
      INFO("x = " << x << ", code " << int(c) << ", between " << lo << " and " << hi);
      CHECK(std::abs(t[c] - x) <= 0.5f * (hi - lo));
      CHECK((t[c] == lo || t[c] == hi));
    }
  }
}

TEST_CASE("AdamW8bit: three steps match the numpy reference (8-bit blocks and a float32 bias)",
          "[optim][adamw8bit]") {
  const nlohmann::json f = load_adamw8bit_fixture();
  const nlohmann::json& o = f.at("options");
  AdamW8bitOptions options;
  options.lr = o.at("lr");
  options.beta1 = o.at("beta1");
  options.beta2 = o.at("beta2");
  options.eps = o.at("eps");
  options.weight_decay = o.at("weight_decay");
  options.block_size = o.at("block_size");
  options.min_8bit_size = o.at("min_8bit_size");
  AdamW8bit<float> adam(options);

  std::vector<Owned<float>> owned_params;
  for (const char* name : {"weight", "bias"}) {
    const nlohmann::json& p = f.at("params").at(name);
    const Index rows = p.at("rows"), cols = p.at("cols");
    owned_params.push_back({name, std::string(name) == "bias" ? ParameterRole::bias : ParameterRole::weight,
                            from_json(p.at("initial"), rows, cols), Matrix<float>(rows, cols)});
  }
  ParameterList<float> params = views(owned_params);
  for (std::size_t t = 0; t < 3; ++t) {
    for (Owned<float>& p : owned_params)  // into the buffer the list views (a move would replace it)
      p.grad.array() = from_json(f.at("params").at(p.name).at("grads").at(t), p.value.rows(), p.value.cols()).array();
    adam.step(params);
    for (Owned<float>& p : owned_params) {
      const Matrix<float> expected =
          from_json(f.at("params").at(p.name).at("values").at(t), p.value.rows(), p.value.cols());
      INFO(p.name << " after step " << t + 1);
      CHECK((p.value - expected).cwiseAbs().maxCoeff() <= 1e-6f);
    }
  }
  CHECK(adam.quantized("weight"));
  CHECK(!adam.quantized("bias"));
  const nlohmann::json& w = f.at("params").at("weight");
  CHECK(*adam.codes("weight", true) == w.at("m_codes").get<std::vector<std::uint8_t>>());
  CHECK(*adam.codes("weight", false) == w.at("v_codes").get<std::vector<std::uint8_t>>());
  const std::vector<float> m_absmax = w.at("m_absmax"), v_absmax = w.at("v_absmax");
  REQUIRE(adam.absmax("weight", true)->size() == 3);
  for (std::size_t b = 0; b < 3; ++b) {
    CHECK((*adam.absmax("weight", true))[b] == Approx(m_absmax[b]).epsilon(1e-6));
    CHECK((*adam.absmax("weight", false))[b] == Approx(v_absmax[b]).epsilon(1e-6));
  }
  CHECK(adam.codes("bias", true) == nullptr);
}

TEST_CASE("AdamW8bit: the first step's states are the moments to within the map's step", "[optim][adamw8bit]") {
  std::srand(8);
  AdamW8bitOptions options;
  options.block_size = 500;
  options.min_8bit_size = 1;
  AdamW8bit<float> adam(options);
  std::vector<Owned<float>> owned_params{{"w", ParameterRole::weight, Matrix<float>::Random(30, 40),
                                          Matrix<float>::Random(30, 40)}};
  owned_params[0].grad.array() *= (3 * Matrix<float>::Random(30, 40).array()).exp();  // a few decades
  ParameterList<float> params = views(owned_params);
  adam.step(params);
  const Matrix<float>& g = owned_params[0].grad;
  const Matrix<float> m = adam.exp_avg("w"), v = adam.exp_avg_sq("w");
  REQUIRE(m.rows() == 30);
  const float* gd = g.data();
  for (const bool first : {true, false}) {
    const auto& t = first ? lora::quant::dynamic_map() : lora::quant::dynamic_map_unsigned();
    const float* deq = first ? m.data() : v.data();
    const std::vector<float>& absmax = *adam.absmax("w", first);
    REQUIRE(absmax.size() == 3);
    for (Index i = 0; i < g.size(); ++i) {
      const float exact = first ? 0.1f * gd[i] : 0.001f * gd[i] * gd[i];
      const float a = absmax[static_cast<std::size_t>(i / 500)];
      const auto [lo, hi] = bracket(t, exact / a);
      INFO((first ? "m" : "v") << " value " << i << ": " << exact << " dequantized " << deq[i]);
      // One of the two levels around the value: the nearest, or the one on its side of zero (m keeps its
      // sign, a positive v never becomes 0).
      const bool nearest = std::abs(deq[i] - exact) <= a * (0.5f * (hi - lo) + 1e-6f);
      const float tol = 1e-6f * a;
      CHECK((std::abs(deq[i] - lo * a) <= tol || std::abs(deq[i] - hi * a) <= tol));
      // Not the nearest only where the rule applies: a negative m whose nearest level is 0, a positive v
      // below half the smallest positive level.
      CHECK((nearest || (first ? exact < 0 && deq[i] < 0 : exact > 0 && deq[i] > 0 && lo == 0)));
      if (first && exact != 0 && deq[i] != 0) CHECK(std::signbit(deq[i]) == std::signbit(exact));
      if (!first && exact > 0) CHECK(deq[i] > 0);
    }
  }
  CHECK(adam.exp_avg("unknown").size() == 0);
}

// Regression: a value whose v is far below its block's largest used to code v to 0 while m kept a non-zero
// level; a step with a zero gradient then moved it by about lr c2/c1 m / (c2 eps), hundreds of times lr
// (the LoRA run of finetune_classifier went to NaN in its first epoch).
TEST_CASE("AdamW8bit: a tiny second moment does not code to 0 (bounded steps after a zero gradient)",
          "[optim][adamw8bit]") {
  AdamW8bitOptions options;
  options.lr = 1e-3;
  options.weight_decay = 0;
  options.block_size = 64;
  options.min_8bit_size = 1;
  AdamWOptions o32;
  o32.lr = options.lr;
  o32.weight_decay = 0;
  AdamW8bit<float> adam8(options);
  AdamW<float> adam32(o32);
  auto make = [] {
    std::vector<Owned<float>> p{{"w", ParameterRole::weight, Matrix<float>::Zero(1, 64), Matrix<float>::Zero(1, 64)}};
    p[0].grad(0, 0) = 1.0f;   // the block's largest
    p[0].grad(0, 1) = 1e-5f;  // v / max = 1e-10, below the unsigned map's smallest level (3.25e-7)
    return p;
  };
  std::vector<Owned<float>> p8 = make(), p32 = make();
  ParameterList<float> l8 = views(p8), l32 = views(p32);
  adam8.step(l8);
  adam32.step(l32);
  CHECK(adam8.exp_avg_sq("w")(0, 1) > 0);
  const float before8 = p8[0].value(0, 1), before32 = p32[0].value(0, 1);
  p8[0].grad(0, 1) = 0;
  p32[0].grad(0, 1) = 0;
  adam8.step(l8);
  adam32.step(l32);
  const float step8 = std::abs(p8[0].value(0, 1) - before8), step32 = std::abs(p32[0].value(0, 1) - before32);
  INFO("8-bit step " << step8 << ", 32-bit step " << step32);
  CHECK(step32 <= 2 * options.lr);
  CHECK(step8 <= 2 * options.lr);
  CHECK(std::isfinite(p8[0].value(0, 1)));
}

TEST_CASE("AdamW8bit follows 32-bit AdamW for 200 steps of least squares", "[optim][adamw8bit]") {
  std::srand(21);
  LeastSquares ls;
  ls.X = Matrix<float>::Random(256, 64);
  const Matrix<float> W_true = Matrix<float>::Random(64, 96), b_true = Matrix<float>::Random(1, 96);
  ls.Y = ((ls.X * W_true).rowwise() + b_true.row(0)) + 0.01f * Matrix<float>::Random(256, 96);
  // W: 6144 values, 8-bit in blocks of 2048; b: 96 values, float32 moments.
  auto run = [&](auto& optimizer, std::vector<Owned<float>>& p) {
    p = {{"W", ParameterRole::weight, Matrix<float>::Zero(64, 96), Matrix<float>::Zero(64, 96)},
         {"b", ParameterRole::bias, Matrix<float>::Zero(1, 96), Matrix<float>::Zero(1, 96)}};
    ParameterList<float> params = views(p);
    for (int s = 0; s < 200; ++s) {
      ls.gradients(p[0].value, p[1].value, p[0].grad, p[1].grad);
      optimizer.step(params);
    }
    return ls.loss(p[0].value, p[1].value);
  };
  AdamWOptions o32;
  o32.lr = 1e-2;
  AdamW8bitOptions o8;
  o8.lr = 1e-2;
  AdamW<float> adam32(o32);
  AdamW8bit<float> adam8(o8);
  std::vector<Owned<float>> p32, p8;
  const float initial = ls.loss(Matrix<float>::Zero(64, 96), Matrix<float>::Zero(1, 96));
  const float loss32 = run(adam32, p32), loss8 = run(adam8, p8);
  const float dW = (p8[0].value - p32[0].value).cwiseAbs().maxCoeff();
  const float db = (p8[1].value - p32[1].value).cwiseAbs().maxCoeff();
  const float scale = p32[0].value.cwiseAbs().maxCoeff();
  std::printf("AdamW8bit vs AdamW, 200 steps of least squares: loss %.6g -> %.6g (32-bit) / %.6g (8-bit); "
              "largest |W8 - W32| %.3g (|W32| <= %.3g), |b8 - b32| %.3g\n",
              static_cast<double>(initial), static_cast<double>(loss32), static_cast<double>(loss8),
              static_cast<double>(dW), static_cast<double>(scale), static_cast<double>(db));
  CHECK(adam8.quantized("W"));
  CHECK(!adam8.quantized("b"));
  CHECK(loss32 < 0.2f * initial);
  CHECK(loss8 <= 1.05f * loss32);
  CHECK(dW <= 0.05f * scale);  // measured 0.024 (lr 0.01: about two and a half steps)
  CHECK(db <= 0.05f * scale);
}

TEST_CASE("AdamW8bit::state_bytes: 2 bytes a value and 2 absmax a block, 8 bytes a value below the threshold",
          "[optim][adamw8bit]") {
  for (const Index block : {Index(2048), Index(1000)}) {
    AdamW8bitOptions options;
    options.block_size = block;
    AdamW8bit<double> adam(options);
    CHECK(adam.state_bytes() == 0);
    CHECK(adam.workspace_bytes() == 2 * sizeof(float) * static_cast<std::size_t>(block));
    std::vector<Owned<double>> p{{"a", ParameterRole::weight, Matrix<double>::Ones(64, 96), Matrix<double>::Ones(64, 96)},
                                 {"b", ParameterRole::weight, Matrix<double>::Ones(64, 64), Matrix<double>::Ones(64, 64)},
                                 {"c", ParameterRole::weight, Matrix<double>::Ones(4095, 1), Matrix<double>::Ones(4095, 1)},
                                 {"d", ParameterRole::bias, Matrix<double>::Ones(1, 96), Matrix<double>::Ones(1, 96)}};
    ParameterList<double> params = views(p);
    adam.step(params);
    const auto blocks = [&](std::size_t n) { return (n + static_cast<std::size_t>(block) - 1) / static_cast<std::size_t>(block); };
    const std::size_t expected = (2 * 6144 + 8 * blocks(6144)) + (2 * 4096 + 8 * blocks(4096)) + 8 * 4095 + 8 * 96;
    CHECK(adam.state_bytes() == expected);
    CHECK(adam.quantized("b"));
    CHECK(!adam.quantized("c"));
    adam.step(params);
    CHECK(adam.state_bytes() == expected);
    CHECK(adam.step_count("a") == 2);
  }
}

TEST_CASE("AdamW8bit: bad options and bad input throw naming the function and values", "[optim][adamw8bit][errors]") {
  auto make = [](auto change) {
    return error_of([&] {
      AdamW8bitOptions o;
      change(o);
      AdamW8bit<float> a(o);
    });
  };
  CHECK(make([](AdamW8bitOptions& o) { o.block_size = 0; }) ==
        "AdamW8bit::AdamW8bit: block_size must be > 0, got 0");
  CHECK(make([](AdamW8bitOptions& o) { o.block_size = -64; }) ==
        "AdamW8bit::AdamW8bit: block_size must be > 0, got -64");
  CHECK(make([](AdamW8bitOptions& o) { o.min_8bit_size = -1; }) ==
        "AdamW8bit::AdamW8bit: min_8bit_size must be >= 0, got -1");
  CHECK(make([](AdamW8bitOptions& o) { o.amsgrad = true; }) ==
        "AdamW8bit::AdamW8bit: amsgrad is not supported with 8-bit states, got amsgrad = true");
  CHECK(make([](AdamW8bitOptions& o) { o.lr = 0; }) == "AdamW8bit::AdamW8bit: lr must be finite and > 0, got 0");
  CHECK(make([](AdamW8bitOptions& o) { o.beta2 = 1; }) == "AdamW8bit::AdamW8bit: beta2 must be in [0, 1), got 1");
  AdamW8bitOptions small;
  small.min_8bit_size = 4;
  AdamW8bit<float> adam(small);
  CHECK(error_of([&] { adam.set_lr(-1); }) == "AdamW8bit::set_lr: lr must be finite and >= 0, got -1");
  std::vector<Owned<float>> p{owned<float>("w", ParameterRole::weight, {{1, 2, 3}, {4, 5, 6}}, {{1, 1, 1}, {1, 1, 1}}),
                              owned<float>("x", ParameterRole::weight, {{1, 2}}, {{1, 1}})};
  ParameterList<float> params = views(p);
  adam.step(params);
  const Matrix<float> before = p[0].value;
  const std::vector<std::uint8_t> codes = *adam.codes("w", true);
  p[1].grad(0, 1) = std::numeric_limits<float>::quiet_NaN();
  CHECK(error_of([&] { adam.step(params); }) == "AdamW8bit::step: the gradient of 'x' contains NaN or Inf");
  CHECK(p[0].value == before);  // nothing changed
  CHECK(*adam.codes("w", true) == codes);
  CHECK(adam.step_count("w") == 1);
}

TEST_CASE("AdamW8bit: a steady-state step with a schedule allocates nothing", "[optim][adamw8bit][alloc]") {
  AdamW8bitOptions options;
  options.block_size = 64;
  options.min_8bit_size = 100;
  AdamW8bit<float> adam(options);
  LrScheduler<AdamW8bit<float>> scheduler(adam, LrSchedule::linear(2, 20));
  std::vector<Owned<float>> p{{"w", ParameterRole::weight, Matrix<float>::Random(20, 15), Matrix<float>::Random(20, 15)},
                              {"b", ParameterRole::bias, Matrix<float>::Random(1, 15), Matrix<float>::Random(1, 15)}};
  ParameterList<float> params = views(p);
  auto train_step = [&](bool forbid) {
    counting = true;
    Eigen::internal::set_is_malloc_allowed(!forbid);
    adam.step(params);
    scheduler.step();
    Eigen::internal::set_is_malloc_allowed(true);
    counting = false;
  };
  allocations = 0;
  train_step(false);
  CHECK(allocations > 0);  // first sight: state is allocated
  allocations = 0;
  for (int s = 0; s < 5; ++s) train_step(true);
  CHECK(allocations == 0);
  CHECK(adam.step_count("w") == 6);
  CHECK(adam.lr() == Approx(1e-3 * (20 - 6) / 18.0));
}
