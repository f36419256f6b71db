// Several adapters on one model: the operations over a LoraModelView, combining adapters (cat, svd),
// and mixed-adapter batches, each checked against a dense reference.
#include <lora/lora.hpp>

#include <catch2/catch.hpp>

#include "instances.hpp"
#include "gradient_check.hpp"

#include <Eigen/SVD>

using lora::testing::relative_error;

namespace {

lora::LoraConfig cfg(int rank, double alpha, std::uint64_t seed, bool rslora = false) {
  lora::LoraConfig c;
  c.rank = rank;
  c.alpha = alpha;
  c.use_rslora = rslora;
  c.init = lora::InitMethod::random;
  c.seed = seed;
  return c;
}

// s B A of one adapter, in double.
template <class Scalar>
lora::Matrix<double> delta(const lora::LoraLinear<Scalar>& l, const std::string& name) {
  return l.scaling(name) * l.adapter_scale(name) * l.B(name).template cast<double>() * l.A(name).template cast<double>();
}

}  // namespace

TEMPLATE_TEST_CASE("model-level adapter operations", "[adapters]", float, double) {
  using M = lora::Matrix<TestType>;
  std::srand(5);
  const M W1 = M::Random(8, 6), W2 = M::Random(5, 8);
  lora::LoraLinear<TestType> fc1(W1, cfg(2, 4, 1)), fc2(W2, cfg(2, 4, 2));
  fc1.eval();
  fc2.eval();
  const lora::LoraModelView<TestType> model{{{"fc1", &fc1}, {"fc2", &fc2}}, {}, {}};
  lora::add_adapter(model, "second", cfg(3, 3, 3));
  CHECK(lora::adapter_names(model) == std::vector<std::string>{"default", "second"});
  CHECK(fc2.has_adapter("second"));

  const M X = M::Random(4, 6);
  auto run = [&] { return M(fc2.forward(M(fc1.forward(X)))); };
  // Dense reference: each layer's W + sum of its active adapters' s B A, times their runtime scale.
  auto reference = [&](double scale_default, double scale_second) {
    auto dense = [&](const lora::LoraLinear<TestType>& l, const M& W) {
      lora::Matrix<double> D = W.template cast<double>();
      for (const auto& [name, scale] : {std::pair<std::string, double>{"default", scale_default}, {"second", scale_second}})
        D += scale * l.scaling(name) * l.B(name).template cast<double>() * l.A(name).template cast<double>();
      return D;
    };
    return lora::Matrix<double>(X.template cast<double>() * dense(fc1, W1).transpose() * dense(fc2, W2).transpose());
  };
  const double tol = lora::testing::tolerance<TestType>();
  CHECK(relative_error(run(), reference(1, 0)) < tol);
  lora::set_active_adapters(model, {"default", "second"});  // deltas sum
  CHECK(relative_error(run(), reference(1, 1)) < tol);
  lora::set_adapter_scale(model, "second", -0.5);  // runtime scale, apart from alpha / r
  CHECK(fc1.scaling("second") == 1.0);
  CHECK(relative_error(run(), reference(1, -0.5)) < tol);
  const auto state = lora::disable_adapters(model);  // base only
  CHECK(relative_error(run(), reference(0, 0)) < tol);
  lora::enable_adapters(model, state);
  CHECK(lora::active_adapters(model) == std::vector<std::string>{"default", "second"});
  const M unmerged = run();
  lora::merge_adapters(model);
  CHECK(fc1.merged());
  CHECK(relative_error(run(), unmerged) < tol);
  CHECK_THROWS_WITH(lora::set_active_adapters(model, {"default"}), Catch::Contains("merged"));
  lora::unmerge_adapters(model);
  lora::delete_adapter(model, "second");
  CHECK(lora::adapter_names(model) == std::vector<std::string>{"default"});
  CHECK_THROWS_WITH(lora::set_active_adapters(model, {"second"}), Catch::Contains("no module has an adapter named 'second'"));
  CHECK_THROWS_WITH(lora::delete_adapter(model, "second"), Catch::Contains("'second'"));
  // add_adapter is all or none: fc2 already has "wide", so fc1 does not keep it either.
  fc2.add_adapter("wide", cfg(2, 2, 1));
  CHECK_THROWS_WITH(lora::add_adapter(model, "wide", cfg(6, 6, 1)), Catch::Contains("'wide' already exists"));
  CHECK_FALSE(fc1.has_adapter("wide"));
  fc2.delete_adapter("wide");
  // A rank above min(in, out) is accepted, as PEFT accepts it (fc2 is 8 -> 5).
  lora::add_adapter(model, "wide", cfg(6, 6, 1));
  CHECK(fc2.rank("wide") == 6);
  const lora::LoraModelView<TestType> twice{{{"fc1", &fc1}, {"fc1", &fc2}}, {}, {}};
  CHECK_THROWS_WITH(lora::set_active_adapters(twice, {}), Catch::Contains("appears twice"));
}

TEST_CASE("hot swap of one layer keeps the base bit-exact", "[adapters]") {
  std::srand(6);
  const lora::Matrix<double> W = lora::Matrix<double>::Random(7, 9);
  lora::LoraLineard l(W, cfg(3, 6, 1));
  l.merge();
  l.unmerge();
  const lora::Matrix<double> W_now = l.base_weight();
  const lora::Matrix<double> A = lora::Matrix<double>::Random(3, 9), B = lora::Matrix<double>::Random(7, 3);
  lora::hot_swap_adapter(l, "default", A, B, cfg(3, 6, 9));
  CHECK(l.A() == A);
  CHECK(l.B() == B);
  CHECK(l.base_weight() == W_now);
  CHECK_THROWS_WITH(lora::hot_swap_adapter(l, "default", A, B, cfg(2, 6, 9)), Catch::Contains("A has shape 3 x 9"));
  CHECK_THROWS_WITH(lora::hot_swap_adapter(l, "nope", A, B, cfg(3, 6, 9)), Catch::Contains("no adapter named 'nope'"));
}

TEST_CASE("combining adapters: cat is exact, svd is the best rank-k approximation", "[adapters][combine]") {
  std::srand(8);
  lora::LoraLineard l(lora::Matrix<double>::Random(20, 16), cfg(3, 6, 1));
  l.add_adapter("b", cfg(2, 5, 2, true));
  l.add_adapter("c", cfg(4, 2, 3));
  const std::vector<std::string> names{"default", "b", "c"};
  const std::vector<double> w{0.7, -1.3, 2.0};
  const lora::Matrix<double> target = w[0] * delta(l, "default") + w[1] * delta(l, "b") + w[2] * delta(l, "c");

  const auto cat = lora::combine_cat(l, names, w);
  CHECK(cat.config.rank == 9);
  CHECK(cat.config.scaling() == 1.0);
  CHECK(cat.A.topRows(3) == l.A("default"));  // A rows are copies
  CHECK(relative_error(cat.config.scaling() * cat.B * cat.A, target) < 1e-15);

  // svd with k >= rank(target) = 9 reproduces it; with k < 9 it attains the Eckart-Young error.
  const Eigen::JacobiSVD<Eigen::MatrixXd> dense(target);
  const Eigen::VectorXd sigma = dense.singularValues();
  for (int k : {9, 12, 5, 1}) {
    INFO("k = " << k);
    const auto s = lora::combine_svd(l, names, w, k);
    CHECK(s.A.rows() == k);
    const lora::Matrix<double> approx = s.config.scaling() * s.B * s.A;
    const double best = std::sqrt(sigma.tail(sigma.size() - std::min<Eigen::Index>(k, sigma.size())).squaredNorm());
    const double err = (approx - target).norm();
    if (k >= 9)
      CHECK(err <= 1e-13 * target.norm());
    else
      CHECK(std::abs(err - best) <= 1e-12 * target.norm());
  }

  // As a new adapter on a model: forward equals the weighted sum.
  lora::LoraLineard other(lora::Matrix<double>::Random(20, 16), cfg(2, 2, 4));  // has none of b, c
  const lora::LoraModelView<double> model{{{"l", &l}, {"other", &other}}, {}, {}};
  lora::add_weighted_adapter(model, names, w, "mix", lora::CombineMethod::cat);
  lora::add_weighted_adapter(model, {"b", "c"}, {1.0, 1.0}, "mix_svd", lora::CombineMethod::svd, 4);
  CHECK(l.rank("mix") == 9);
  CHECK(other.rank("mix") == 2);  // only "default" exists there
  CHECK(relative_error(delta(other, "mix"), 0.7 * delta(other, "default")) < 1e-15);
  CHECK(l.rank("mix_svd") == 4);
  CHECK_FALSE(other.has_adapter("mix_svd"));
  l.eval();
  l.set_active_adapters({"mix"});
  const lora::Matrix<double> X = lora::Matrix<double>::Random(5, 16);
  const lora::Matrix<double> expected = X * (l.base_weight() + target).transpose();
  CHECK(relative_error(l.forward(X), expected) < 1e-14);

  CHECK_THROWS_WITH(lora::combine_cat(l, {"default", "b"}, {1.0}), Catch::Contains("one weight per adapter"));
  CHECK_THROWS_WITH(lora::combine_svd(l, names, w, 17), Catch::Contains("rank must be in [1, min"));
  lora::LoraLineard narrow(lora::Matrix<double>::Random(4, 16), cfg(3, 3, 1));
  narrow.add_adapter("x", cfg(3, 3, 2));
  CHECK(lora::combine_cat(narrow, {"default", "x"}, {1.0, 1.0}).config.rank == 6);  // above min(4, 16): allowed
  CHECK_THROWS_WITH(lora::add_weighted_adapter(model, names, w, "mix", lora::CombineMethod::cat),
                    Catch::Contains("already has an adapter named 'mix'"));
}

TEMPLATE_TEST_CASE("mixed batches: each row gets its own adapter", "[adapters][mixed]", float, double) {
  using M = lora::Matrix<TestType>;
  std::srand(9);
  lora::LoraLinear<TestType> l(M::Random(12, 10), lora::Vector<TestType>::Random(12), cfg(2, 4, 1));
  l.add_adapter("b", cfg(3, 3, 2));
  l.add_adapter("c", cfg(1, 2, 3, true));
  l.set_adapter_scale("c", 0.3);
  l.eval();
  const M X = M::Random(9, 10);
  // Scattered groups, a contiguous group (c), base rows by both spellings.
  const std::vector<std::string> rows{"b", "default", "", "b", "c", "c", "c", "__base__", "default"};
  lora::MixedBatchForward<TestType> mixed;
  const M Y = mixed.forward(l, X, rows);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const std::string& name = rows[i];
    l.set_active_adapters(name.empty() || name == "__base__" ? std::vector<std::string>{} : std::vector<std::string>{name});
    const M y = l.forward(X.row(static_cast<lora::Index>(i)));
    INFO("row " << i << " (" << name << ")");
    CHECK(relative_error(Y.row(static_cast<lora::Index>(i)), y) < lora::testing::tolerance<TestType>());
  }
  const lora::MixedBatchPlan plan(rows);
  CHECK(plan.groups().size() == 3);
  CHECK(plan.groups()[2].contiguous);
  CHECK_FALSE(plan.groups()[0].contiguous);

  CHECK_THROWS_WITH(mixed.forward(l, X, std::vector<std::string>(9, "nope")), Catch::Contains("no adapter named 'nope'"));
  const M base_only = mixed.forward(l, X, std::vector<std::string>(9, "nope"), lora::MixedBatchForward<TestType>::Missing::base);
  l.set_active_adapters({});
  CHECK(relative_error(base_only, M(l.forward(X))) < lora::testing::tolerance<TestType>());
  CHECK_THROWS_WITH(mixed.forward(l, X, std::vector<std::string>(3, "b")), Catch::Contains("plan names adapters for 3"));
  l.set_active_adapters({"b"});
  l.merge();
  CHECK_THROWS_WITH(mixed.forward(l, X, rows), Catch::Contains("merged"));
}

TEST_CASE("mixed batches with enough work to run the groups in parallel", "[adapters][mixed]") {
  // 64 rows x 16 adapters of rank 32 on a 512 x 512 layer: 2M multiply-adds in the adapter terms, above
  // the threshold for the parallel loop (when OpenMP is on).
  std::srand(12);
  using M = lora::Matrix<float>;
  lora::LoraLinearf l(M::Random(512, 512), lora::Vector<float>::Random(512), cfg(32, 8, 0));
  for (int a = 1; a < 16; ++a) l.add_adapter("a" + std::to_string(a), cfg(32, 8, static_cast<std::uint64_t>(a)));
  l.eval();
  const M X = M::Random(64, 512);
  std::vector<std::string> rows;
  for (int i = 0; i < 64; ++i) rows.push_back(i % 17 == 16 ? "" : (i % 17 == 0 ? "default" : "a" + std::to_string(i % 17)));
  lora::MixedBatchForward<float> mixed;
  const M Y = mixed.forward(l, X, rows);
  M expected(64, 512);
  for (int i = 0; i < 64; ++i) {
    l.set_active_adapters(rows[static_cast<std::size_t>(i)].empty() ? std::vector<std::string>{}
                                                                     : std::vector<std::string>{rows[static_cast<std::size_t>(i)]});
    expected.row(i) = l.forward(X.row(i));
  }
  CHECK(relative_error(Y, expected) < 1e-5);
  CHECK(mixed.forward(l, X, rows) == Y);  // deterministic: the same result on reuse
}
