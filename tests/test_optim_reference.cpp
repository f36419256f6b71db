// Optimisers, clipping and schedules against PyTorch 1.13 (float64), from fixtures written by
// tests/data/make_optim_fixtures.py: torch.optim.SGD / AdamW with parameter groups for LoRA+,
// torch.nn.utils.clip_grad_norm_, and LambdaLR with transformers' schedule formulas.
#include <lora/lora.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <string>
#include <vector>

using lora::Index;
using lora::Matrix;
using lora::ParameterList;
using lora::ParameterRole;
using nlohmann::json;
using namespace lora::optim;

namespace {

json load(const std::string& file) {
  const std::string path = std::string(LORA_TEST_DATA_DIR) + "/optim/" + file;
  std::ifstream in(path);
  if (!in) FAIL("cannot open " << path);
  return json::parse(in);
}

ParameterRole role_of(const std::string& s) {
  if (s == "lora_A") return ParameterRole::lora_A;
  if (s == "lora_B") return ParameterRole::lora_B;
  if (s == "bias") return ParameterRole::bias;
  return ParameterRole::weight;
}

template <class Scalar>
Matrix<Scalar> matrix(const json& values, Index rows, Index cols) {
  const std::vector<double> v = values.get<std::vector<double>>();
  REQUIRE(static_cast<Index>(v.size()) == rows * cols);
  Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < rows * cols; ++i) m(i / cols, i % cols) = static_cast<Scalar>(v[static_cast<std::size_t>(i)]);
  return m;
}

LrSchedule schedule_of(const json& s) {
  const std::string kind = s.at("kind");
  const std::int64_t warmup = s.at("warmup"), total = s.at("total");
  if (kind == "cosine") return LrSchedule::cosine(warmup, total, s.value("num_cycles", 0.5));
  return LrSchedule::from_name(kind, warmup, total);
}

template <class Scalar>
SGD<Scalar> make_sgd(const json& o) {
  SGDOptions options;
  options.lr = o.at("lr");
  options.momentum = o.value("momentum", 0.0);
  options.dampening = o.value("dampening", 0.0);
  options.nesterov = o.value("nesterov", false);
  options.weight_decay = o.value("weight_decay", 0.0);
  options.loraplus_lr_ratio = o.value("loraplus_lr_ratio", 1.0);
  options.loraplus_include_biases = o.value("loraplus_include_biases", false);
  options.decay_biases = o.value("decay_biases", true);
  return SGD<Scalar>(options);
}

template <class Scalar>
AdamW<Scalar> make_adamw(const json& o) {
  AdamWOptions options;
  options.lr = o.at("lr");
  options.beta1 = o.at("beta1");
  options.beta2 = o.at("beta2");
  options.eps = o.at("eps");
  options.weight_decay = o.at("weight_decay");
  options.amsgrad = o.value("amsgrad", false);
  options.loraplus_lr_ratio = o.value("loraplus_lr_ratio", 1.0);
  options.loraplus_include_biases = o.value("loraplus_include_biases", false);
  options.decay_biases = o.value("decay_biases", true);
  return AdamW<Scalar>(options);
}

struct Worst {
  double values = 0;  // largest relative error of a parameter after a step
  double norm = 0;    // of the clip_grad_norm totals
};

// Runs one fixture case with the library in Scalar and checks every step against PyTorch.
template <class Scalar, class Optimizer>
void run_case(const json& c, Optimizer optimizer, double tolerance, Worst& worst) {
  struct Owned {
    std::string name;
    ParameterRole role;
    Matrix<Scalar> value, grad;
  };
  std::vector<Owned> owned;
  for (const json& p : c.at("params")) {
    const Index rows = p.at("rows"), cols = p.at("cols");
    owned.push_back({p.at("name"), role_of(p.at("role")), matrix<Scalar>(p.at("value"), rows, cols),
                     Matrix<Scalar>::Zero(rows, cols)});
  }
  ParameterList<Scalar> params;
  for (Owned& p : owned)
    params.push_back({p.name, p.role, lora::detail::parameter_view(p.value), lora::detail::parameter_view(p.grad)});

  const bool scheduled = !c.at("schedule").is_null();
  const LrSchedule schedule = scheduled ? schedule_of(c.at("schedule")) : LrSchedule();
  LrScheduler<Optimizer> scheduler(optimizer, schedule);
  const json& steps = c.at("steps");
  for (std::size_t k = 0; k < steps.size(); ++k) {
    const json& step = steps[k];
    INFO("step " << k);
    CHECK(optimizer.lr() == Approx(static_cast<double>(step.at("base_lr"))).epsilon(1e-15).margin(1e-300));
    // Written in place: the parameter list views this storage (a move-assignment would swap it away).
    for (Owned& p : owned) p.grad.array() = matrix<Scalar>(step.at("grads").at(p.name), p.value.rows(), p.value.cols()).array();
    if (!c.at("max_norm").is_null()) {
      const double total = clip_grad_norm(params, static_cast<double>(c.at("max_norm")));
      const double expected = step.at("total_norm");
      const double err = std::abs(total - expected) / expected;
      worst.norm = std::max(worst.norm, err);
      CHECK(err <= tolerance);
    }
    optimizer.step(params);
    scheduler.step();
    for (Owned& p : owned) {
      INFO("parameter " << p.name);
      const Matrix<double> expected = matrix<double>(step.at("values").at(p.name), p.value.rows(), p.value.cols());
      const double err = (p.value.template cast<double>() - expected).norm() / expected.norm();
      worst.values = std::max(worst.values, err);
      CHECK(err <= tolerance);
    }
  }
}

template <class Scalar>
Worst run_all(double tolerance) {
  const json fixture = load("steps.json");
  Worst worst;
  REQUIRE(fixture.at("cases").size() == 8);
  for (const json& c : fixture.at("cases")) {
    INFO("case: " << c.at("name").get<std::string>());
    if (c.at("optimizer") == "sgd")
      run_case<Scalar>(c, make_sgd<Scalar>(c.at("options")), tolerance, worst);
    else
      run_case<Scalar>(c, make_adamw<Scalar>(c.at("options")), tolerance, worst);
  }
  return worst;
}

}  // namespace

TEST_CASE("SGD and AdamW match torch.optim in double to 1e-12", "[optim][reference]") {
  const Worst worst = run_all<double>(1e-12);
  WARN("double: largest relative error of a parameter " << worst.values << ", of a total norm " << worst.norm);
}

TEST_CASE("SGD and AdamW in float stay close to torch.optim in double", "[optim][reference]") {
  const Worst worst = run_all<float>(2e-6);
  WARN("float: largest relative error of a parameter " << worst.values << ", of a total norm " << worst.norm);
}

TEST_CASE("schedules match transformers' formulas stepped through LambdaLR", "[optim][reference][schedule]") {
  const json fixture = load("schedules.json");
  REQUIRE(fixture.at("schedules").size() == 9);
  double worst = 0;
  for (const json& s : fixture.at("schedules")) {
    const LrSchedule schedule = schedule_of(s);
    INFO(s.at("kind").get<std::string>() << " warmup " << s.at("warmup") << " total " << s.at("total"));
    SGDOptions o;
    o.lr = 1.0;
    SGD<double> sgd(o);
    LrScheduler<SGD<double>> scheduler(sgd, schedule);
    const std::vector<double> expected = s.at("multipliers");
    for (std::size_t k = 0; k < expected.size(); ++k) {
      INFO("step " << k);
      const double m = schedule.multiplier(static_cast<std::int64_t>(k));
      worst = std::max(worst, std::abs(m - expected[k]));
      CHECK(m == Approx(expected[k]).epsilon(1e-15).margin(1e-15));
      CHECK(sgd.lr() == m);
      scheduler.step();
    }
  }
  WARN("schedules: largest absolute difference " << worst);
}
