// The layer's fast paths (row-parallel small batches, packet kernels with tails, threaded splits)
// against dense formulas, at shapes that are not multiples of the vector width.
#include <lora/lora.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <limits>
#include <unistd.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(LORA_TEST_REQUIRES_AVX512) && (defined(__GNUC__) || defined(__clang__))
// This build's code uses AVX-512: on a CPU without it, report the skip (CTest's SKIP_RETURN_CODE) before
// any of it runs.
__attribute__((constructor(101))) static void skip_without_avx512() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512dq") ||
      !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl")) {
    std::fputs("skipped: this CPU has no AVX-512 (F, DQ, BW, VL)\n", stderr);
    _exit(77);
  }
}
#endif

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

namespace {

// C = alpha A B + beta C0 in double, and per element the bound on a correct result's rounding error:
// (k + 2) eps (|alpha| sum_p |A(i, p) B(p, j)| + |beta C0(i, j)|), far below any one missing or wrong term.
template <class Scalar, class A, class B>
void gemm_reference(const A& a, const B& b, const Matrix<Scalar>& c0, Scalar alpha, Scalar beta, Matrix<double>& ref,
                    Matrix<double>& bound) {
  const Index m = a.rows(), k = a.cols(), n = b.cols();
  ref.resize(m, n);
  bound.resize(m, n);
  const double eps = std::numeric_limits<Scalar>::epsilon();
  for (Index i = 0; i < m; ++i)
    for (Index j = 0; j < n; ++j) {
      double sum = 0, mag = 0;
      for (Index p = 0; p < k; ++p) {
        const double t = static_cast<double>(a(i, p)) * static_cast<double>(b(p, j));
        sum += t;
        mag += std::abs(t);
      }
      const double base = beta == Scalar(0) ? 0.0 : static_cast<double>(beta) * static_cast<double>(c0(i, j));
      ref(i, j) = static_cast<double>(alpha) * sum + base;
      bound(i, j) = static_cast<double>(k + 2) * eps * (std::abs(static_cast<double>(alpha)) * mag + std::abs(base)) +
                    std::numeric_limits<double>::min();
    }
}

// Entries of C off the reference by more than the bound (NaN counts as off).
template <class Scalar>
Index wrong_entries(const Matrix<Scalar>& c, const Matrix<double>& ref, const Matrix<double>& bound) {
  Index wrong = 0;
  for (Index i = 0; i < c.rows(); ++i)
    for (Index j = 0; j < c.cols(); ++j)
      if (!(std::abs(static_cast<double>(c(i, j)) - ref(i, j)) <= bound(i, j))) ++wrong;
  return wrong;
}

}  // namespace

#ifdef LORA_TEST_GEMM_KERNEL
TEST_CASE("the packed GEMM runs the micro-kernel its build flags select", "[kernels][gemm]") {
  CHECK(std::string(lora::detail::gemm_kernel::Kernel<float>::name) == LORA_TEST_GEMM_KERNEL);
  CHECK(std::string(lora::detail::gemm_kernel::Kernel<double>::name) == LORA_TEST_GEMM_KERNEL);
}
#endif

TEMPLATE_TEST_CASE("the packed GEMM equals a double reference at every tail, block edge and layout", "[kernels][gemm]",
                   float, double) {
  using Scalar = TestType;
  using Blocking = lora::detail::GemmBlocking<Scalar>;
  using RowMajor = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using ColMajor = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  constexpr Index MR = Blocking::MR, NR = Blocking::NR;
  // Small blocks put block edges (MC, KC, NC) inside small products; the defaults run once per shape too.
  const bool small_blocks = GENERATE(true, false);
  const Index m = GENERATE(Index(1), Index(2), MR - 1, MR + 1, 2 * MR + 3, Index(61));
  const Index n = GENERATE(Index(1), NR - 1, NR + 1, 3 * NR + 5);
  const Index k = GENERATE(Index(1), Index(3), Index(17), Index(70));
  const int layout = GENERATE(0, 1, 2, 3);  // A row/col-major x B row/col-major, then strided views
  const int mode = GENERATE(0, 1, 2);       // assign, accumulate, alpha and beta
  const int threads = GENERATE(1, 2);
  CAPTURE(small_blocks, m, n, k, layout, mode, threads);
  const lora::testing::ThreadSmallWork small_work(1);
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  const Scalar alpha = mode == 2 ? Scalar(0.75) : Scalar(1);
  const Scalar beta = mode == 0 ? Scalar(0) : mode == 1 ? Scalar(1) : Scalar(-1.5);

  // Strided views: A and B as blocks of wider matrices (an outer stride larger than the size), B as the
  // transpose of a weight (Y = X W^T).
  const Matrix<Scalar> a_wide = random_matrix<Scalar>(m + 3, k + 5, 11);
  const Matrix<Scalar> b_wide = random_matrix<Scalar>(k + 4, n + 7, 12);
  const RowMajor a_row = a_wide.block(2, 1, m, k);
  const ColMajor a_col = a_row;
  const RowMajor b_row = b_wide.block(1, 3, k, n);
  const RowMajor w = b_row.transpose();  // B = W^T: column-major through the transpose
  Matrix<Scalar> c0 = random_matrix<Scalar>(m, n, 13);
  Matrix<double> ref, bound;
  gemm_reference<Scalar>(a_row, b_row, c0, alpha, beta, ref, bound);

  lora::detail::GemmBuffers<Scalar> buffers(2);
  if (small_blocks)
    for (Blocking& b : buffers) b.set_block_sizes(2 * MR, 16, 2 * NR);
  Matrix<Scalar> c = c0;
  if (mode == 0) c.setConstant(std::numeric_limits<Scalar>::quiet_NaN());  // assign must not read C
  // The destination is a block of a wider matrix too: the columns beside it must stay untouched.
  Matrix<Scalar> c_wide = Matrix<Scalar>::Constant(m + 2, n + 3, Scalar(7));
  c_wide.block(1, 2, m, n) = c;
  auto dst = c_wide.block(1, 2, m, n);
  const auto run = [&](const auto& lhs, const auto& rhs) {
    lora::detail::gemm_parallel(buffers, lhs, rhs, dst, alpha, beta);
  };
  switch (layout) {
    case 0:
      run(a_row, b_row);
      break;
    case 1:
      run(a_col, w.transpose());
      break;
    case 2:  // Blocks of wider matrices, row-major A
      run(a_wide.block(2, 1, m, k), b_wide.block(1, 3, k, n));
      break;
    default: {  // Maps with an outer stride, column-major A
      ColMajor a_tall = ColMajor::Zero(m + 4, k);
      a_tall.topRows(m) = a_col;
      const Eigen::Map<const ColMajor, 0, Eigen::OuterStride<>> a_map(a_tall.data(), m, k, Eigen::OuterStride<>(m + 4));
      const Matrix<Scalar> w_wide = [&] {
        Matrix<Scalar> x = Matrix<Scalar>::Zero(n, k + 9);
        x.leftCols(k) = w;
        return x;
      }();
      run(a_map, w_wide.leftCols(k).transpose());
    }
  }
  c = dst;
  CHECK(wrong_entries(c, ref, bound) == 0);
  Matrix<Scalar> outside = c_wide;
  outside.block(1, 2, m, n).setConstant(Scalar(7));
  CHECK((outside.array() == Scalar(7)).all());
#ifdef _OPENMP
  omp_set_num_threads(omp_get_num_procs());
#endif
}

TEMPLATE_TEST_CASE("the packed GEMM splits large products over the threads and reuses its buffers", "[kernels][gemm]",
                   float, double) {
  using Scalar = TestType;
  // Past the default block sizes (KC = 256, MC = 240 on AVX-512), so every loop takes several steps.
  const Index m = GENERATE(Index(5), Index(263), Index(517)), k = 301, n = GENERATE(Index(9), Index(130), Index(333));
  const int threads = GENERATE(1, 2);
  CAPTURE(m, n, threads);
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  const lora::testing::ThreadSmallWork small_work(1);
  const Matrix<Scalar> a = random_matrix<Scalar>(m, k, 21), w = random_matrix<Scalar>(n, k, 22);
  Matrix<Scalar> c0 = Matrix<Scalar>::Zero(m, n), c(m, n);
  Matrix<double> ref, bound;
  gemm_reference<Scalar>(a, w.transpose(), c0, Scalar(1), Scalar(0), ref, bound);
  lora::detail::GemmBuffers<Scalar> buffers;
  for (int call = 0; call < 2; ++call) {  // the second call runs on the buffers the first one grew
    c.setConstant(Scalar(-3));
    lora::detail::gemm_parallel(buffers, a, w.transpose(), c);
    CHECK(wrong_entries(c, ref, bound) == 0);
  }
  // Accumulate: C += A W^T twice over.
  gemm_reference<Scalar>(a, w.transpose(), c, Scalar(1), Scalar(1), ref, bound);
  lora::detail::gemm_parallel(buffers, a, w.transpose(), c, Scalar(1), Scalar(1));
  CHECK(wrong_entries(c, ref, bound) == 0);
#ifdef _OPENMP
  omp_set_num_threads(omp_get_num_procs());
#endif
}

TEST_CASE("GemmBlocking rejects block sizes the kernel cannot tile", "[kernels][gemm]") {
  using Blocking = lora::detail::GemmBlocking<float>;
  Blocking b;
  const Index mc = b.mc(), kc = b.kc(), nc = b.nc();
  CHECK(contains(message_of([&] { b.set_block_sizes(Blocking::MR + 1, 8, Blocking::NR); }), "set_block_sizes"));
  CHECK(contains(message_of([&] { b.set_block_sizes(Blocking::MR, 0, Blocking::NR); }), "kc = 0"));
  CHECK(contains(message_of([&] { b.set_block_sizes(Blocking::MR, 8, Blocking::NR - 1); }), "nc = "));
  CHECK((b.mc() == mc && b.kc() == kc && b.nc() == nc));  // a rejected change leaves the blocking as it was
  b.set_block_sizes(2 * Blocking::MR, 8, 3 * Blocking::NR);
  CHECK((b.mc() == 2 * Blocking::MR && b.kc() == 8 && b.nc() == 3 * Blocking::NR));
}
