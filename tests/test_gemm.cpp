// The packed GEMM (lora/detail/gemm.hpp) against a double reference: every tail, block edge, layout and
// thread split; and the quantized base's decode kernels (lora/quant/decode.hpp) at every alignment and
// tail. Also built once per instruction set (tests/CMakeLists.txt: lora_add_kernel_variant), with
// LORA_TEST_GEMM_KERNEL naming the kernels that build's flags must select.
#include <lora/detail/gemm.hpp>
#include <lora/quant/decode.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>
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
using lora::Matrix;
using lora::testing::contains;
using lora::testing::message_of;
using lora::testing::random_matrix;

namespace {

// C = alpha A B + beta C0 in double, and per element the bound on a correct result's rounding error:
// (k + 2) eps (|alpha| sum_p |A(i, p) B(p, j)| + |beta C0(i, j)|), far below any one missing or wrong term.
template <class Scalar, class A, class B>
void gemm_reference(const A& a, const B& b, const Matrix<Scalar>& c0, Scalar alpha, Scalar beta, Matrix<double>& ref,
                    Matrix<double>& bound) {
  // Eigen's double products, not a loop of a(i, p) * b(p, j), which unoptimised sanitizer builds run for
  // minutes at the larger shapes.
  const Matrix<double> ad = a.template cast<double>(), bd = b.template cast<double>();
  Matrix<double> base = Matrix<double>::Zero(c0.rows(), c0.cols());
  if (beta != Scalar(0)) base = static_cast<double>(beta) * c0.template cast<double>();
  ref = static_cast<double>(alpha) * (ad * bd) + base;
  const Matrix<double> a_abs = ad.cwiseAbs(), b_abs = bd.cwiseAbs();  // one product type to compile
  const Matrix<double> magnitude = std::abs(static_cast<double>(alpha)) * (a_abs * b_abs) + base.cwiseAbs();
  const double eps = std::numeric_limits<Scalar>::epsilon();
  bound = (static_cast<double>(ad.cols() + 2) * eps * magnitude).array() + std::numeric_limits<double>::min();
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
  CHECK(std::string(lora::quant::kernel::name) == LORA_TEST_GEMM_KERNEL);
}
#endif

namespace {

// pack_a<MR> of an mc x kc block read through (rs, cs) against the panels written value by value: the
// values, the zero rows past mc, and nothing written past the last panel (the transposing pack's spill
// into the next step must stay inside the block).
template <int MR, class Scalar>
Index wrong_packed_values(Index mc, Index kc, Index rs, Index cs) {
  std::vector<Scalar> src(static_cast<std::size_t>((mc - 1) * rs + (kc - 1) * cs + 1));
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<Scalar>(i % 1000) + Scalar(0.5);
  const Index panels = (mc + MR - 1) / MR, size = panels * MR * kc, guard = 64;
  std::vector<Scalar> dst(static_cast<std::size_t>(size + guard), Scalar(-7));
  lora::detail::gemm_pack::pack_a<MR>(src.data(), rs, cs, mc, kc, dst.data());
  Index wrong = 0;
  for (Index i = 0; i < panels * MR; ++i)
    for (Index p = 0; p < kc; ++p) {
      const Scalar want = i < mc ? src[static_cast<std::size_t>(i * rs + p * cs)] : Scalar(0);
      if (dst[static_cast<std::size_t>((i / MR) * MR * kc + p * MR + i % MR)] != want) ++wrong;
    }
  for (Index x = size; x < size + guard; ++x)
    if (dst[static_cast<std::size_t>(x)] != Scalar(-7)) ++wrong;
  return wrong;
}

template <int MR, class Scalar>
Index wrong_packed_values_all_layouts() {
  Index wrong = 0;
  for (const Index kc : {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 256})
    for (const Index mc : {Index(1), Index(MR > 1 ? MR - 1 : 1), Index(MR), Index(2 * MR + 1)}) {
      wrong += wrong_packed_values<MR, Scalar>(mc, kc, kc + 3, 1);   // contiguous along p: the transposing pack
      wrong += wrong_packed_values<MR, Scalar>(mc, kc, 1, mc + 2);   // contiguous along i
      wrong += wrong_packed_values<MR, Scalar>(mc, kc, 2, 2 * mc + 1);  // neither
    }
  return wrong;
}

}  // namespace

TEMPLATE_TEST_CASE("pack_a writes every panel value, zero padding and nothing past the panels", "[kernels][gemm]",
                   float, double) {
  using Scalar = TestType;
  using Blocking = lora::detail::GemmBlocking<Scalar>;
  // This build's tile (the transposing pack's groups spill when MR is not a multiple of the packet
  // width) and the other kernels' MR and NR.
  CHECK(wrong_packed_values_all_layouts<Blocking::MR, Scalar>() == 0);
  CHECK(wrong_packed_values_all_layouts<Blocking::NR, Scalar>() == 0);
  CHECK(wrong_packed_values_all_layouts<4, Scalar>() == 0);
  CHECK(wrong_packed_values_all_layouts<6, Scalar>() == 0);
  CHECK(wrong_packed_values_all_layouts<12, Scalar>() == 0);
  CHECK(wrong_packed_values_all_layouts<16, Scalar>() == 0);
}

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
  const Index k = GENERATE(Index(1), Index(3), Index(9), Index(17), Index(70));
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
  // Six of the nine pairs of m in {5, 263, 517} and n in {9, 130, 333}: the largest (517 x 333) adds no
  // loop step the others do not take, and takes minutes in an unoptimised sanitizer build.
  const auto [m, n] = GENERATE(table<Index, Index>({{5, 9}, {5, 333}, {263, 130}, {263, 333}, {517, 9}, {517, 130}}));
  const Index k = 301;
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

TEMPLATE_TEST_CASE("the fused low-rank product (T = X U, C = X B + T V + bias) equals a double reference",
                   "[kernels][gemm][lora]", float, double) {
  using Scalar = TestType;
  using Blocking = lora::detail::GemmBlocking<Scalar>;
  constexpr Index MR = Blocking::MR, NR = Blocking::NR;
  // Small blocks: T is finished across several KC blocks, several MC and NC blocks read it; r past one
  // NR panel; with and without a bias; T made from X's panels or given; both thread splits.
  const bool small_blocks = GENERATE(true, false);
  const auto [m, n] = GENERATE(table<Index, Index>({{1, 1}, {MR + 1, NR - 1}, {2 * MR + 3, 3 * NR + 5}, {61, 9}, {7, 90}}));
  const Index k = GENERATE(Index(1), Index(17), Index(70));
  const Index r = GENERATE(Index(1), Index(3), Index(NR), NR + 1);
  const bool with_bias = GENERATE(true, false);
  const bool make_t = GENERATE(true, false);
  const int mode = GENERATE(0, 1);  // assign (C is not read), accumulate with beta = -1.5
  const int threads = GENERATE(1, 2);
  CAPTURE(small_blocks, m, n, k, r, with_bias, make_t, mode, threads);
  const lora::testing::ThreadSmallWork small_work(1);
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
  const Scalar beta = mode == 0 ? Scalar(0) : Scalar(-1.5);
  const Matrix<Scalar> x = random_matrix<Scalar>(m, k, 31), w = random_matrix<Scalar>(n, k, 32);
  const Matrix<Scalar> a = random_matrix<Scalar>(r, k, 33), v = random_matrix<Scalar>(r, n, 34);
  const Matrix<Scalar> bias = random_matrix<Scalar>(1, n, 35), c0 = random_matrix<Scalar>(m, n, 36);
  // The reference in double: T = X A^T; C = X W^T + T V + bias + beta C0, each entry's bound from the
  // magnitudes of its terms (T's own rounding error carried through V).
  const Matrix<double> xd = x.template cast<double>(), wd = w.template cast<double>(), ad = a.template cast<double>(),
                       vd = v.template cast<double>();
  const Matrix<double> t_ref = xd * ad.transpose(), t_mag = xd.cwiseAbs() * ad.cwiseAbs().transpose();
  Matrix<double> c_ref = xd * wd.transpose() + t_ref * vd, c_mag = xd.cwiseAbs() * wd.cwiseAbs().transpose() +
                                                                     t_mag * vd.cwiseAbs();
  if (with_bias) {
    c_ref.rowwise() += bias.template cast<double>().row(0);
    c_mag.rowwise() += bias.template cast<double>().cwiseAbs().row(0);
  }
  if (beta != Scalar(0)) {
    c_ref += static_cast<double>(beta) * c0.template cast<double>();
    c_mag += std::abs(static_cast<double>(beta)) * c0.template cast<double>().cwiseAbs();
  }
  const double eps = std::numeric_limits<Scalar>::epsilon();
  const Matrix<double> t_bound = (static_cast<double>(k + 2) * eps * t_mag).array() + std::numeric_limits<double>::min();
  const Matrix<double> c_bound =
      (static_cast<double>(k + r + 4) * eps * c_mag).array() + std::numeric_limits<double>::min();

  lora::detail::GemmBuffers<Scalar> buffers(2);
  if (small_blocks)
    for (Blocking& b : buffers) b.set_block_sizes(2 * MR, 16, 2 * NR);
  Matrix<Scalar> t(m, r), c = c0;
  if (make_t)
    t.setConstant(std::numeric_limits<Scalar>::quiet_NaN());  // made, not read
  else
    t = t_ref.template cast<Scalar>();
  if (mode == 0) c.setConstant(std::numeric_limits<Scalar>::quiet_NaN());
  lora::detail::GemmOperands<Scalar> g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = x.data();
  g.a_rs = k;
  g.a_cs = 1;
  g.b = w.data();  // B = W^T
  g.b_rs = 1;
  g.b_cs = k;
  g.c = c.data();
  g.ldc = n;
  g.beta = beta;
  lora::detail::GemmLowRank<Scalar> low;
  low.r = r;
  low.u = make_t ? a.data() : nullptr;  // U = A^T, read in place (A's rows packed) ...
  low.u_rs = 1;
  low.u_cs = k;
  const Matrix<Scalar> u_rows = a.transpose();  // ... or U [k x r] row-major (k = 17): the general path
  if (k == 17) {
    low.u = make_t ? u_rows.data() : nullptr;
    low.u_rs = r;
    low.u_cs = 1;
  }
  low.t = t.data();
  low.ldt = r;
  low.v = v.data();
  low.ldv = n;
  low.bias = with_bias ? bias.data() : nullptr;
  for (int call = 0; call < 2; ++call) {  // the second call runs on the buffers the first one grew
    if (call == 1) {
      if (make_t) t.setConstant(std::numeric_limits<Scalar>::quiet_NaN());
      c = c0;
      if (mode == 0) c.setConstant(std::numeric_limits<Scalar>::quiet_NaN());
    }
    lora::detail::packed_gemm_parallel(
        buffers, g,
        [&](Index pc, Index kc, Index jc, Index nc, Scalar* dst) {
          lora::detail::gemm_pack::pack_b<NR>(w.data() + jc * k + pc, Index(1), k, kc, nc, dst);
        },
        &low);
    if (make_t) CHECK(wrong_entries(t, t_ref, t_bound) == 0);
    CHECK(wrong_entries(c, c_ref, c_bound) == 0);
  }
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

namespace {

// The decode kernels' inputs: random code bytes, 16 levels, per block a positive absmax or (double
// quantization) an 8-bit code into a 256-entry map with a scale per group of 3 blocks, activations.
struct DecodeCase {
  std::vector<std::uint8_t> codes, qabsmax;
  std::vector<float> levels, absmax, dyn, absmax2, x;
  lora::quant::kernel::Nf4Scales scales;
  DecodeCase(unsigned seed, bool double_quant)
      : codes(512), qabsmax(600), levels(16), absmax(600), dyn(256), absmax2(200), x(8 * 300) {
    std::mt19937 gen(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto& c : codes) c = static_cast<std::uint8_t>(gen() & 0xFF);
    for (auto& c : qabsmax) c = static_cast<std::uint8_t>(gen() & 0xFF);
    for (auto& l : levels) l = u(gen);
    for (auto& a : absmax) a = 0.5f + std::abs(u(gen));
    for (auto& v : dyn) v = u(gen);
    for (auto& a : absmax2) a = 0.5f + std::abs(u(gen));
    for (auto& v : x) v = u(gen);
    if (double_quant) {
      scales.qabsmax = qabsmax.data();
      scales.dyn = dyn.data();
      scales.absmax2 = absmax2.data();
      scales.group = 3;
      scales.offset = 1.25f;
    } else {
      scales.absmax = absmax.data();
    }
  }
  // NF4 weight j of the run starting at code `first`, as QuantizedWeight::dequantize_rows makes it.
  float nf4(Index first, Index j, Index block) const {
    const auto i = static_cast<std::size_t>(first + j), b = i / static_cast<std::size_t>(block);
    const float a = scales.qabsmax ? dyn[qabsmax[b]] * absmax2[b / 3] + 1.25f : absmax[b];
    return levels[lora::quant::kernel::nibble(codes.data(), first + j)] * a;
  }
};

// |got - sum_j w_j x_j| within (len + 2) eps sum_j |w_j x_j| (plus the least normal), in double.
template <class Weight>
bool dot_close(float got, Index len, const float* x, Weight&& w) {
  double ref = 0, magnitude = 0;
  for (Index j = 0; j < len; ++j) {
    const double t = static_cast<double>(w(j)) * static_cast<double>(x[j]);
    ref += t;
    magnitude += std::abs(t);
  }
  const double bound = static_cast<double>(len + 2) * std::numeric_limits<float>::epsilon() * magnitude +
                       std::numeric_limits<double>::min();
  return std::abs(static_cast<double>(got) - ref) <= bound;
}

}  // namespace

TEST_CASE("the NF4 decode kernels equal a scalar decode at every alignment, block size and tail", "[kernels][quant]") {
  namespace kernel = lora::quant::kernel;
  const bool double_quant = GENERATE(false, true);
  const DecodeCase d(31, double_quant);
  const Index first = GENERATE(0, 1, 2, 7, 64, 65);
  const Index block = GENERATE(2, 6, 16, 64);
  Index wrong_decode = 0, wrong_dot = 0;
  for (const Index len : {0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 130, 299}) {
    CAPTURE(double_quant, first, block, len);
    std::vector<float> dst(static_cast<std::size_t>(len) + 1, -7.0f);
    kernel::nf4_decode(d.codes.data(), first, len, block, d.levels.data(), d.scales, dst.data());
    for (Index j = 0; j < len; ++j)
      if (!(dst[static_cast<std::size_t>(j)] == d.nf4(first, j, block))) ++wrong_decode;  // bit for bit
    CHECK(dst[static_cast<std::size_t>(len)] == -7.0f);  // nothing past the run
    for (const Index n : {1, 2, 3, 4, 5, 6, 7, 8}) {
      const Index ldx = 300;
      float out[8];
      kernel::with_rows(n, [&](auto rows) {
        kernel::nf4_dot<decltype(rows)::value>(d.codes.data(), first, len, block, d.levels.data(), d.scales, d.x.data(),
                                               ldx, out);
      });
      for (Index k = 0; k < n; ++k)
        if (!dot_close(out[k], len, d.x.data() + k * ldx, [&](Index j) { return d.nf4(first, j, block); })) ++wrong_dot;
    }
  }
  CHECK(wrong_decode == 0);
  CHECK(wrong_dot == 0);
}

TEST_CASE("the NF4 decoding GEMV over reordered activations equals a scalar decode", "[kernels][quant]") {
  namespace kernel = lora::quant::kernel;
  const bool double_quant = GENERATE(false, true);
  const DecodeCase d(33, double_quant);
  const Index pw = kernel::pair_width;
  CHECK(kernel::pairs_fit(4096, 64));  // the shapes of real models, on every instruction set
  CHECK(!kernel::pairs_fit(70, 64));
  CHECK(!kernel::pairs_fit(pw, pw + 2));
  Index wrong = 0;
  for (const Index block : {pw, 2 * pw, Index(64)}) {
    for (const Index blocks_per_row : {1, 2}) {
      const Index in = block * blocks_per_row;
      if (!kernel::pairs_fit(in, block) || 3 * in > 1000 || 8 * in > 2400) continue;
      std::vector<float> xp(8 * static_cast<std::size_t>(in));
      for (Index k = 0; k < 8; ++k) kernel::pair_layout(d.x.data() + k * in, in, xp.data() + k * in);
      for (const Index row : {0, 1, 2}) {
        for (const Index n : {1, 2, 3, 4, 5, 6, 7, 8}) {
          CAPTURE(double_quant, block, in, row, n);
          float out[8];
          kernel::with_rows(n, [&](auto rows) {
            kernel::nf4_dot_pairs<decltype(rows)::value>(d.codes.data(), row * in, in, block, d.levels.data(), d.scales,
                                                         xp.data(), in, out);
          });
          for (Index k = 0; k < n; ++k)
            if (!dot_close(out[k], in, d.x.data() + k * in, [&](Index j) { return d.nf4(row * in, j, block); })) ++wrong;
        }
      }
    }
  }
  CHECK(wrong == 0);
}

TEST_CASE("the int8 decode kernels equal a scalar decode at every tail", "[kernels][quant]") {
  namespace kernel = lora::quant::kernel;
  const DecodeCase d(32, false);
  const auto* codes = reinterpret_cast<const std::int8_t*>(d.codes.data());
  const float scale = 0.37f / 127.0f;
  for (const Index len : {0, 1, 2, 7, 8, 9, 15, 16, 17, 33, 64, 65, 299}) {
    CAPTURE(len);
    std::vector<float> dst(static_cast<std::size_t>(len) + 1, -7.0f);
    kernel::int8_decode(codes + 3, len, scale, dst.data());
    Index wrong = 0;
    for (Index j = 0; j < len; ++j)
      if (!(dst[static_cast<std::size_t>(j)] == static_cast<float>(codes[3 + j]) * scale)) ++wrong;
    CHECK(wrong == 0);
    CHECK(dst[static_cast<std::size_t>(len)] == -7.0f);
    for (const Index n : {1, 2, 3, 4, 5, 6, 7, 8}) {
      CAPTURE(n);
      float out[8];
      kernel::with_rows(n, [&](auto rows) {
        kernel::int8_dot<decltype(rows)::value>(codes + 3, len, scale, d.x.data() + 1, 300, out);
      });
      for (Index k = 0; k < n; ++k)
        CHECK(dot_close(out[k], len, d.x.data() + 1 + k * 300,
                        [&](Index j) { return static_cast<float>(codes[3 + j]) * scale; }));
    }
  }
}
