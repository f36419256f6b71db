// The layer's fast paths (row-parallel small batches, packet kernels with tails, threaded splits)
// against dense formulas, at shapes that are not multiples of the vector width.
#include <lora/lora.hpp>

#include "instances.hpp"
#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#ifdef _OPENMP
#include <omp.h>
#endif

using lora::Index;
using lora::LoraConfig;
using lora::LoraLinear;
using lora::Matrix;
using lora::Vector;
using lora::testing::relative_error;
using lora::testing::tolerance;
using lora::testing::random_matrix;

namespace {

LoraConfig config_with(int rank, unsigned seed) {
  LoraConfig c;
  c.rank = rank;
  c.alpha = 1.5 * rank;
  c.seed = seed;
  c.init = lora::InitMethod::random;  // B != 0
  c.bias = lora::BiasMode::all;
  return c;
}

}  // namespace

TEMPLATE_TEST_CASE("fast paths equal the dense formulas", "[kernels]", float, double) {
  using Scalar = TestType;
  const Index n = GENERATE(1, 2, 7, 8, 9, 67, 300);  // 300: dA and dB with K in two packed blocks
  const Index in = GENERATE(37, 203), out = in == 37 ? 45 : 150;
  const int threads = GENERATE(1, 2);
  const lora::testing::ThreadSmallWork small_work;
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
  CAPTURE(n, in, out, threads);
  const Matrix<Scalar> W0 = random_matrix<Scalar>(out, in, 1);
  const Vector<Scalar> b = Vector<Scalar>::Random(out);
  LoraLinear<Scalar> layer(W0, b, config_with(5, 2));
  layer.add_adapter("idle", config_with(3, 3));  // inactive: its rows sit between W0 and "other"
  layer.add_adapter("other", config_with(16, 4));
  layer.set_active_adapters({"default", "other"});
  layer.set_adapter_scale("other", 0.5);

  const auto s0 = static_cast<Scalar>(layer.scaling("default"));
  const auto s1 = static_cast<Scalar>(0.5 * layer.scaling("other"));
  const Matrix<Scalar> A0 = layer.A("default"), A1 = layer.A("other");
  const Matrix<Scalar> B0 = layer.B("default"), B1 = layer.B("other");
  const Matrix<Scalar> W = W0 + s0 * B0 * A0 + s1 * B1 * A1;
  const Matrix<Scalar> X = random_matrix<Scalar>(n, in, 5), dY = random_matrix<Scalar>(n, out, 6);
  Matrix<Scalar> Y = X * W.transpose();
  Y.rowwise() += b.transpose();

  CHECK(relative_error(layer.forward(X), Y) < tolerance<Scalar>());
  layer.zero_grad();
  const Matrix<Scalar> dX = layer.backward(dY);
  CHECK(relative_error(dX, Matrix<Scalar>(dY * W)) < tolerance<Scalar>());
  const Matrix<Scalar> T0 = X * A0.transpose(), T1 = X * A1.transpose();
  CHECK(relative_error(layer.grad_B("default"), Matrix<Scalar>(s0 * dY.transpose() * T0)) < tolerance<Scalar>());
  CHECK(relative_error(layer.grad_B("other"), Matrix<Scalar>(s1 * dY.transpose() * T1)) < tolerance<Scalar>());
  CHECK(relative_error(layer.grad_A("default"), Matrix<Scalar>(s0 * (dY * B0).transpose() * X)) <
        tolerance<Scalar>());
  CHECK(relative_error(layer.grad_A("other"), Matrix<Scalar>(s1 * (dY * B1).transpose() * X)) <
        tolerance<Scalar>());
  CHECK(layer.grad_A("idle").isZero(0));
  CHECK(relative_error(layer.grad_bias(), Vector<Scalar>(dY.colwise().sum().transpose())) < tolerance<Scalar>());

  layer.eval();
  CHECK(relative_error(layer.forward(X), Y) < tolerance<Scalar>());
  layer.merge();
  CHECK(relative_error(layer.base_weight(), W) < tolerance<Scalar>());
  CHECK(relative_error(layer.forward(X), Y) < tolerance<Scalar>());
  layer.unmerge();
  CHECK(relative_error(layer.base_weight(), W0) < tolerance<Scalar>());
#ifdef _OPENMP
  omp_set_num_threads(omp_get_num_procs());
#endif
}

TEMPLATE_TEST_CASE("rank_update equals base + alpha U V + bias at every split and tail", "[kernels]", float, double) {
  using Scalar = TestType;
  // K = 0 (no adapter rows), short K (V packed once), K above long_k_block (packed block by block)
  const Index K = GENERATE(Index(0), Index(1), Index(16), Index(70), lora::detail::long_k_block + 1, Index(600));
  const Index m = GENERATE(1, 5, 6, 13, 40), p = GENERATE(3, 16, 37, 150);
  const int threads = GENERATE(1, 2);
  const bool strided_u = GENERATE(false, true);  // U read transposed, as dB and dA read T and dT
  const lora::testing::ThreadSmallWork small_work;
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
  CAPTURE(K, m, p, threads, strided_u);
  const Matrix<Scalar> U = random_matrix<Scalar>(m, K, 1), V = random_matrix<Scalar>(K, p + 3, 2);  // ldv > p
  const Matrix<Scalar> Ut = U.transpose(), base = random_matrix<Scalar>(m, p, 3);
  const Vector<Scalar> bias = Vector<Scalar>::Random(p);
  Matrix<Scalar> C = base;
  lora::detail::RankUpdate<Scalar> a;
  a.m = m;
  a.p = p;
  a.K = K;
  a.U = strided_u ? Ut.data() : U.data();
  a.u_row = strided_u ? 1 : K;
  a.u_k = strided_u ? m : 1;
  a.V = V.data();
  a.ldv = p + 3;
  a.base = C.data();  // in place
  a.ldb = p;
  a.col_add = bias.data();
  a.C = C.data();
  a.ldc = p;
  a.alpha = Scalar(0.75);
  lora::detail::PackBuffer<Scalar> work;
  const Scalar max_abs = lora::detail::rank_update<true>(a, work);
  Matrix<Scalar> expected = base + Scalar(0.75) * U * V.leftCols(p);
  expected.rowwise() += bias.transpose();
  CHECK(relative_error(C, expected) < tolerance<Scalar>());
  CHECK(std::abs(max_abs - C.cwiseAbs().maxCoeff()) <= tolerance<Scalar>() * max_abs);
  // a second call reuses the workspace and gives the same result
  const Index capacity = work.size();
  C = base;
  lora::detail::rank_update(a, work);
  CHECK(relative_error(C, expected) < tolerance<Scalar>());
  CHECK(work.size() == capacity);
#ifdef _OPENMP
  omp_set_num_threads(omp_get_num_procs());
#endif
}

TEST_CASE("threads_for takes any amount of work", "[kernels][regression]") {
  // Regression: static_cast<int>(work / 262144) overflowed (undefined behaviour) past ~5.6e14 multiply-adds.
  const int most = lora::detail::threads_for(1e6 * 262144);
  CHECK(lora::detail::threads_for(1e300) == most);
  CHECK(lora::detail::threads_for(std::numeric_limits<double>::infinity()) == most);
  CHECK(lora::detail::threads_for(std::numeric_limits<double>::quiet_NaN()) == 1);
  CHECK(lora::detail::threads_for(0) == 1);
  CHECK(lora::detail::threads_for(-5) == 1);
#ifdef _OPENMP
  CHECK(most == omp_get_max_threads());
#endif
}

TEST_CASE("threads_for keeps small products on one thread", "[kernels][threads][regression]") {
  // Regression: every product of more than 2 x 262,144 multiply-adds forked a team, and LoRA on a small
  // MLP (batch 32, 64 -> 256 -> 256) trained about 15 times slower on 2 threads than on 1 while another
  // job held a core (docs/threads.md).
  CHECK(lora::detail::threads_for(32.0 * 256 * 256) == 1);
  CHECK(lora::detail::threads_for(64.0 * 256 * 256) == 1);
  CHECK(lora::detail::threads_for(2 * lora::detail::default_work_per_thread - 1) == 1);
#ifdef _OPENMP
  if (omp_get_max_threads() >= 2) CHECK(lora::detail::threads_for(2 * lora::detail::default_work_per_thread) == 2);
#endif
}

TEMPLATE_TEST_CASE("nn::Linear's products equal the dense formulas at every split", "[kernels][nn]", float, double) {
  using Scalar = TestType;
  const Index n = GENERATE(1, 7, 67, 300);
  const Index in = GENERATE(5, 203), out = in == 5 ? 150 : 37;
  const int threads = GENERATE(1, 2);
  const lora::testing::ThreadSmallWork small_work;
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
  CAPTURE(n, in, out, threads);
  const Matrix<Scalar> W = random_matrix<Scalar>(out, in, 1);
  const Vector<Scalar> b = Vector<Scalar>::Random(out);
  lora::nn::Linear<Scalar> layer(W, b);
  const Matrix<Scalar> X = random_matrix<Scalar>(n, in, 2), dY = random_matrix<Scalar>(n, out, 3);
  Matrix<Scalar> Y = X * W.transpose();
  Y.rowwise() += b.transpose();
  CHECK(relative_error(layer.forward(X), Y) < tolerance<Scalar>());
  CHECK(relative_error(layer.backward(dY), Matrix<Scalar>(dY * W)) < tolerance<Scalar>());
  // dY read through a view with a row stride (the block of a wider matrix)
  Matrix<Scalar> wide = Matrix<Scalar>::Zero(n, out + 3);
  wide.leftCols(out) = dY;
  layer.forward(X);
  CHECK(relative_error(layer.backward(wide.leftCols(out)), Matrix<Scalar>(dY * W)) < tolerance<Scalar>());
  // two backward calls accumulate
  CHECK(relative_error(layer.grad_weight(), Matrix<Scalar>(2 * dY.transpose() * X)) < tolerance<Scalar>());
  CHECK(relative_error(layer.grad_bias(), Vector<Scalar>(2 * dY.colwise().sum().transpose())) < tolerance<Scalar>());
#ifdef _OPENMP
  omp_set_num_threads(omp_get_num_procs());
#endif
}
