// lora.hpp internals: the library's own packed GEMM (the BLIS recipe), with buffers that outlive the call.
//
//   C [m x n, row-major] = alpha * A [m x k] * B [k x n] + beta * C      (beta == 0: C is not read)
//
// A and B may be row- or column-major, Maps or Blocks with any strides. Loops, outermost first:
//   jc over n in NC columns:  pack B(pc block, jc block) into NR-column panels (kept in L3)
//   pc over k in KC steps:    the first step applies beta, the later ones accumulate
//   ic over m in MC rows:     pack A(ic block, pc block) into MR-row panels (kept in L2)
//   jr, ir over NR x MR tiles: the micro-kernel (detail/gemm_kernels.hpp), its B panel held in L1
// The pack buffers belong to the thread (PackArena): every product a thread runs packs into the same two
// buffers, which only grow, so a product of a shape already seen allocates nothing and a model holds one
// set of buffers per thread (at most MC x KC + KC x NC values) rather than one per call site. A
// GemmBlocking kept by the caller holds the block sizes. gemm_parallel() splits a product over the
// threads, one GemmBlocking each. With EIGEN_USE_BLAS (the LORA_USE_BLAS build) the product goes to the BLAS through Eigen, and
// products too small to pack (a row, a column, tiny sizes) go through Eigen's ordinary product.
#pragma once

#include <lora/common.hpp>
#include <lora/detail/gemm_kernels.hpp>
#include <lora/detail/gemm_pack.hpp>
#include <lora/detail/kernels.hpp>

#include <algorithm>
#include <utility>
#include <vector>

namespace lora::detail {

// The pack buffers of the calling thread, shared by every packed product it runs (one product at a time
// per thread: packed_gemm does not call itself, nor does a pack_b). Grown, never shrunk; freed when the
// thread ends (OpenMP keeps its pool's threads, and with them their buffers).
template <class Scalar>
struct PackArena {
  // low_rank: a fused product's extra panels; t: a thread's own copy of T (packed_gemm_parallel)
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> a, b, low_rank, t;

  static PackArena& of_this_thread() {
    thread_local PackArena arena;
    return arena;
  }
};

// The block sizes of one call site; the buffers they need come from the calling thread's PackArena.
template <class Scalar>
class GemmBlocking {
 public:
  using Kernel = gemm_kernel::Kernel<Scalar>;
  static constexpr int MR = Kernel::MR, NR = Kernel::NR;

  Index mc() const { return mc_; }
  Index kc() const { return kc_; }
  Index nc() const { return nc_; }
  // Block sizes other than the kernel's defaults (tests reach every block edge with small ones):
  // mc a multiple of MR, nc a multiple of NR, all positive.
  void set_block_sizes(Index mc, Index kc, Index nc) {
    if (mc <= 0 || mc % MR != 0 || kc <= 0 || nc <= 0 || nc % NR != 0)
      fail("GemmBlocking::set_block_sizes", "need mc > 0 a multiple of ", MR, ", kc > 0 and nc > 0 a multiple of ", NR,
           ", got mc = ", mc, ", kc = ", kc, ", nc = ", nc);
    mc_ = mc;
    kc_ = kc;
    nc_ = nc;
  }

  // The calling thread's buffers, grown for an m x n x k product: {packed A, packed B}. Valid until the
  // thread's next reserve().
  std::pair<Scalar*, Scalar*> reserve(Index m, Index n, Index k) const {
    PackArena<Scalar>& arena = PackArena<Scalar>::of_this_thread();
    const Index kc = std::min(kc_, k);
    grow(arena.a, round_up(std::min(mc_, m), MR) * kc);
    grow(arena.b, kc * round_up(std::min(nc_, n), NR));
    return {arena.a.data(), arena.b.data()};
  }
  // The calling thread's buffer for a fused low-rank product's panels (packed_gemm), grown to `size`.
  Scalar* reserve_low_rank(Index size) const {
    PackArena<Scalar>& arena = PackArena<Scalar>::of_this_thread();
    grow(arena.low_rank, size);
    return arena.low_rank.data();
  }
  // The calling thread's buffer for its own copy of a fused product's T (packed_gemm_parallel), grown.
  Scalar* reserve_t(Index size) const {
    PackArena<Scalar>& arena = PackArena<Scalar>::of_this_thread();
    grow(arena.t, size);
    return arena.t.data();
  }

 private:
  static Index round_up(Index x, Index to) { return (x + to - 1) / to * to; }
  static void grow(Eigen::Matrix<Scalar, Eigen::Dynamic, 1>& buffer, Index size) {
    if (buffer.size() < size) buffer.resize(size);
  }
  Index mc_ = Kernel::MC, kc_ = Kernel::KC, nc_ = Kernel::NC;
};

// The operands of one packed product: A(i, p) = a[i * a_rs + p * a_cs], B(p, j) = b[p * b_rs + j * b_cs],
// C(i, j) = c[i * ldc + j].
template <class Scalar>
struct GemmOperands {
  Index m = 0, n = 0, k = 0;
  const Scalar* a = nullptr;
  Index a_rs = 0, a_cs = 0;
  const Scalar* b = nullptr;
  Index b_rs = 0, b_cs = 0;
  Scalar* c = nullptr;
  Index ldc = 0;
  Scalar alpha = 1, beta = 0;
};

// C [m x n] = A [m x k] B with A and C row-major, packed rows (B is set by the caller, or packs itself).
template <class Scalar>
GemmOperands<Scalar> row_major_operands(Index m, Index n, Index k, const Scalar* a, Scalar* c) {
  GemmOperands<Scalar> g;
  g.m = m;
  g.n = n;
  g.k = k;
  g.a = a;
  g.a_rs = k;
  g.a_cs = 1;
  g.c = c;
  g.ldc = n;
  return g;
}

// The rank-r part of a LoRA forward, fused into a packed product C = A B (alpha = 1):
//   T [m x r] = A U           U [k x r]: U(p, q) = u[p * u_rs + q * u_cs] (U = A_lora^T); u == nullptr: T is given
//   C         = A B + T V + 1 bias^T + beta C       V [r x n]: V(q, j) = v[q * ldv + j]; bias [n] or nullptr
// T comes from the same packed panels of A that feed C's tiles (r more columns of the product, kept
// out of C), and T V + bias is one more stretch of each C tile's k loop (panels [T | 1] and [V; bias^T])
// run at the last KC block, before the tile's store: no pass over C or A of its own.
template <class Scalar>
struct GemmLowRank {
  Index r = 0;
  const Scalar* u = nullptr;
  Index u_rs = 0, u_cs = 0;
  Scalar* t = nullptr;
  Index ldt = 0;
  const Scalar* v = nullptr;
  Index ldv = 0;
  const Scalar* bias = nullptr;
};

// The packed product on the calling thread (k >= 1), each block of B packed by
// pack_b(pc, kc, jc, nc, dst): B(pc + p, jc + j), p < kc, j < nc, into gemm_pack::pack_b's panels at dst
// (zeros past column nc). A B that is not in memory as values (a quantized W0) decodes itself there.
// With `low` (r >= 1, alpha = 1), the fused low-rank product above.
template <class Scalar, class PackB>
void packed_gemm(const GemmBlocking<Scalar>& blocking, const GemmOperands<Scalar>& g, PackB&& pack_b,
                 const GemmLowRank<Scalar>* low = nullptr) {
  using Kernel = gemm_kernel::Kernel<Scalar>;
  constexpr int MR = Kernel::MR, NR = Kernel::NR;
  LORA_ASSERT(g.k >= 1 && (!low || (low->r >= 1 && g.alpha == Scalar(1))));
  const auto [pa, pb] = blocking.reserve(g.m, g.n, g.k);
  const Index MC = blocking.mc(), KC = blocking.kc(), NC = blocking.nc();
  // The low-rank panels: U's block (kc x r, NR-column panels), [T | 1] (MR-row panels of k2 steps) and
  // [V; bias^T] (k2 x NR panels), k2 = r (+ 1 with a bias).
  const Index r = low ? low->r : 0, k2 = low ? r + (low->bias ? 1 : 0) : 0;
  const bool make_t = low && low->u;
  const auto round_up = [](Index x, Index to) { return (x + to - 1) / to * to; };
  const Index u_size = make_t ? std::min(KC, g.k) * round_up(r, NR) : 0;
  const Index t_size = round_up(std::min(MC, g.m), MR) * k2;
  Scalar* pu = low ? blocking.reserve_low_rank(u_size + t_size + k2 * round_up(std::min(NC, g.n), NR)) : nullptr;
  Scalar* pt = pu + u_size;
  Scalar* pv = pt + t_size;
  for (Index jc = 0; jc < g.n; jc += NC) {
    const Index nc = std::min(NC, g.n - jc);
    if (low) gemm_pack::pack_b_row<NR>(low->v + jc, low->ldv, Index(1), r, nc, low->bias ? low->bias + jc : nullptr, pv);
    for (Index pc = 0; pc < g.k; pc += KC) {
      const Index kc = std::min(KC, g.k - pc);
      const Scalar beta = pc == 0 ? g.beta : Scalar(1);
      const bool last = pc + kc == g.k, t_here = make_t && jc == 0;
      pack_b(pc, kc, jc, nc, pb);
      if (t_here) gemm_pack::pack_b<NR>(low->u + pc * low->u_rs, low->u_rs, low->u_cs, kc, r, pu);
      for (Index ic = 0; ic < g.m; ic += MC) {
        const Index mc = std::min(MC, g.m - ic);
        gemm_pack::pack_a<MR>(g.a + ic * g.a_rs + pc * g.a_cs, g.a_rs, g.a_cs, mc, kc, pa);
        if (t_here) {  // T's rows of this block, from the panels just packed (complete at the last block)
          for (Index jr = 0; jr < r; jr += NR)
            for (Index ir = 0; ir < mc; ir += MR)
              Kernel::run(kc, pa + ir * kc, pu + jr * kc, low->t + (ic + ir) * low->ldt + jr, low->ldt,
                          std::min<Index>(MR, mc - ir), std::min<Index>(NR, r - jr), Scalar(1),
                          pc == 0 ? Scalar(0) : Scalar(1));
        }
        if (low && last) gemm_pack::pack_a_ones<MR>(low->t + ic * low->ldt, low->ldt, Index(1), mc, r, low->bias != nullptr, pt);
        for (Index jr = 0; jr < nc; jr += NR) {
          const Index cols = std::min<Index>(NR, nc - jr);
          for (Index ir = 0; ir < mc; ir += MR) {
            Scalar* c = g.c + (ic + ir) * g.ldc + jc + jr;
            const Index rows = std::min<Index>(MR, mc - ir);
            if (low && last)
              Kernel::run(kc, pa + ir * kc, pb + jr * kc, k2, pt + ir * k2, pv + jr * k2, c, g.ldc, rows, cols,
                          g.alpha, beta);
            else
              Kernel::run(kc, pa + ir * kc, pb + jr * kc, c, g.ldc, rows, cols, g.alpha, beta);
          }
        }
      }
    }
  }
}

// The pack_b of a product whose B is read from memory through (g.b, g.b_rs, g.b_cs).
template <class Scalar>
auto pack_b_from_memory(const GemmOperands<Scalar>& g) {
  return [&g](Index pc, Index kc, Index jc, Index nc, Scalar* dst) {
    gemm_pack::pack_b<GemmBlocking<Scalar>::NR>(g.b + pc * g.b_rs + jc * g.b_cs, g.b_rs, g.b_cs, kc, nc, dst);
  };
}

// The packed product on the calling thread (k >= 1), B read from memory.
template <class Scalar>
void packed_gemm(const GemmBlocking<Scalar>& blocking, const GemmOperands<Scalar>& g,
                 const GemmLowRank<Scalar>* low = nullptr) {
  packed_gemm(blocking, g, pack_b_from_memory(g), low);
}

// Keeps a parameter out of template argument deduction (alpha, beta take the blocking's scalar).
template <class T>
struct gemm_scalar {
  using type = T;
};

// dst = alpha * lhs * rhs + beta * dst for a row-major dst (no aliasing), on the calling thread.
template <class Scalar, class Lhs, class Rhs, class Dst>
void gemm(GemmBlocking<Scalar>& blocking, const Lhs& lhs, const Rhs& rhs, Dst& dst,
          typename gemm_scalar<Scalar>::type alpha = Scalar(1), typename gemm_scalar<Scalar>::type beta = Scalar(0)) {
  using namespace Eigen;
  static_assert(Dst::Flags & RowMajorBit, "lora::detail::gemm writes row-major destinations");
  LORA_ASSERT(lhs.cols() == rhs.rows() && dst.rows() == lhs.rows() && dst.cols() == rhs.cols());
  [[maybe_unused]] constexpr bool direct = (Lhs::Flags & DirectAccessBit) && (Rhs::Flags & DirectAccessBit) &&
                          (Dst::Flags & DirectAccessBit);
#ifdef EIGEN_USE_BLAS
  constexpr bool packed = false;  // the BLAS runs the product (through Eigen's product)
#else
  constexpr bool packed = direct;
#endif
  const Index m = lhs.rows(), k = lhs.cols(), n = rhs.cols();
  bool small = m <= 1 || n <= 1 || k == 0 || m + n + k < 20;
  if constexpr (packed) small = small || dst.colStride() != 1;
  if (!packed || small) {
    (void)blocking;
    if (beta == Scalar(0)) {
      if (alpha == Scalar(1))
        dst.noalias() = lhs * rhs;
      else
        dst.noalias() = alpha * (lhs * rhs);
    } else {
      if (beta != Scalar(1)) dst *= beta;
      dst.noalias() += alpha * (lhs * rhs);
    }
    return;
  }
  if constexpr (packed) {
    GemmOperands<Scalar> g;
    g.m = m;
    g.n = n;
    g.k = k;
    g.a = lhs.data();
    g.a_rs = lhs.rowStride();
    g.a_cs = lhs.colStride();
    g.b = rhs.data();
    g.b_rs = rhs.rowStride();
    g.b_cs = rhs.colStride();
    g.c = dst.data();
    g.ldc = dst.rowStride();
    g.alpha = alpha;
    g.beta = beta;
    packed_gemm(blocking, g);
  }
}

// One GemmBlocking per thread of gemm_parallel().
template <class Scalar>
using GemmBuffers = std::vector<GemmBlocking<Scalar>>;

// Whether a product of m x p split over `threads` goes by rows (else by columns). Each thread packs all
// of the operand it does not split, so the split goes along the longer of m and p; few rows (dX = dY W0
// while decoding) always split the columns.
template <class Scalar>
bool split_rows(Index m, Index p, int threads) {
  return m > p && m >= 4 * GemmBlocking<Scalar>::MR * threads;
}

// dst = alpha * lhs * rhs + beta * dst split over the threads (split_rows), each running gemm() on its
// part with its own buffers: no allocation once the buffers have seen the shape.
template <class Scalar, class Lhs, class Rhs, class Dst>
void gemm_parallel(GemmBuffers<Scalar>& buffers, const Lhs& lhs, const Rhs& rhs, Dst& dst,
                   typename gemm_scalar<Scalar>::type alpha = Scalar(1),
                   typename gemm_scalar<Scalar>::type beta = Scalar(0)) {
  const Index m = lhs.rows(), p = rhs.cols();
#ifdef EIGEN_USE_BLAS
  const int threads = 1;  // the BLAS threads its own products
#else
  const int threads =
      threads_for(static_cast<double>(m) * static_cast<double>(lhs.cols()) * static_cast<double>(p));
#endif
  if (static_cast<int>(buffers.size()) < std::max(threads, 1)) buffers.resize(static_cast<std::size_t>(std::max(threads, 1)));
  if (threads <= 1) {
    gemm(buffers.front(), lhs, rhs, dst, alpha, beta);
    return;
  }
  constexpr Index MR = GemmBlocking<Scalar>::MR, NR = GemmBlocking<Scalar>::NR;
  const bool by_rows = split_rows<Scalar>(m, p, threads);
  parallel_region(threads, [&](int t, int nt) {
    GemmBlocking<Scalar>& own = buffers[static_cast<std::size_t>(t)];
    if (by_rows) {
      const auto rows = split(m, MR, t, nt);
      if (rows.first >= rows.second) return;
      auto d = dst.middleRows(rows.first, rows.second - rows.first);
      gemm(own, lhs.middleRows(rows.first, rows.second - rows.first), rhs, d, alpha, beta);
    } else {
      const auto cols = split(p, NR, t, nt);
      if (cols.first >= cols.second) return;
      auto d = dst.middleCols(cols.first, cols.second - cols.first);
      gemm(own, lhs, rhs.middleCols(cols.first, cols.second - cols.first), d, alpha, beta);
    }
  });
}

// packed_gemm(blocking, g, pack_b, low) split over the threads as gemm_parallel splits (pack_b sees the
// whole product's coordinates), one GemmBlocking of `buffers` each. Threads run even in the BLAS build:
// a B that packs itself has no BLAS product. Split by columns, a fused product that makes T needs all of
// T in every column part: when its r columns are a small part of a thread's (8 r threads <= n), every
// thread makes T itself from the A panels it packs anyway (the last thread into T, the others into a copy
// of their own), with no barrier and no pass over A of its own; otherwise T = A U is made first on each
// thread's rows, and after a barrier the column parts read it.
template <class Scalar, class PackB>
void packed_gemm_parallel(GemmBuffers<Scalar>& buffers, const GemmOperands<Scalar>& g, PackB&& pack_b,
                          const GemmLowRank<Scalar>* low = nullptr) {
  const double work = static_cast<double>(g.m) * static_cast<double>(g.k) *
                      static_cast<double>(g.n + (low ? low->r : 0));
  const int threads = std::max(threads_for(work), 1);
  if (static_cast<int>(buffers.size()) < threads) buffers.resize(static_cast<std::size_t>(threads));
  if (threads == 1) {
    packed_gemm(buffers.front(), g, pack_b, low);
    return;
  }
  constexpr Index MR = GemmBlocking<Scalar>::MR, NR = GemmBlocking<Scalar>::NR;
  const bool by_rows = split_rows<Scalar>(g.m, g.n, threads);
  parallel_region(threads, [&](int t, int nt) {
    GemmBlocking<Scalar>& own = buffers[static_cast<std::size_t>(t)];
    GemmOperands<Scalar> part = g;
    GemmLowRank<Scalar> part_low = low ? *low : GemmLowRank<Scalar>{};
    if (by_rows) {
      const auto rows = split(g.m, MR, t, nt);
      if (rows.first >= rows.second) return;
      part.m = rows.second - rows.first;
      part.a += rows.first * g.a_rs;
      part.c += rows.first * g.ldc;
      if (low) part_low.t += rows.first * part_low.ldt;
      packed_gemm(own, part, pack_b, low ? &part_low : nullptr);
      return;
    }
    if (low && low->u && 8 * low->r * nt <= g.n) {  // each thread makes all of T
      if (t < nt - 1) {  // the last thread, which always has columns, writes T
        part_low.t = own.reserve_t(g.m * low->r);
        part_low.ldt = low->r;
      }
    } else if (low && low->u) {  // T = A U by rows first: every column part needs all of it
      const auto rows = split(g.m, MR, t, nt);
      if (rows.first < rows.second && low->u_rs == 1 && g.a_cs == 1) {
        // U = A_lora^T with A_lora's rows packed, A row-major: the rank-r row kernel, which reads A once
        // and packs nothing (a packed product of r columns would pack all of A for them)
        kernel::row_dots_block(g.k, g.a, g.a_rs, low->u, low->u_cs, low->t, low->ldt, Scalar(1), rows.first,
                               rows.second, Index(0), low->r);
      } else if (rows.first < rows.second) {
        GemmOperands<Scalar> tg;
        tg.m = rows.second - rows.first;
        tg.n = low->r;
        tg.k = g.k;
        tg.a = g.a + rows.first * g.a_rs;
        tg.a_rs = g.a_rs;
        tg.a_cs = g.a_cs;
        tg.b = low->u;
        tg.b_rs = low->u_rs;
        tg.b_cs = low->u_cs;
        tg.c = low->t + rows.first * low->ldt;
        tg.ldc = low->ldt;
        packed_gemm(own, tg);
      }
      barrier(nt);
      part_low.u = nullptr;
    }
    const auto cols = split(g.n, NR, t, nt);
    if (cols.first >= cols.second) return;
    part.n = cols.second - cols.first;
    part.c += cols.first;
    if (low) {
      part_low.v += cols.first;
      if (part_low.bias) part_low.bias += cols.first;
    }
    packed_gemm(
        own, part,
        [&](Index pc, Index kc, Index jc, Index nc, Scalar* dst) { pack_b(pc, kc, cols.first + jc, nc, dst); },
        low ? &part_low : nullptr);
  });
}

// packed_gemm_parallel with B read from memory (pack_b_from_memory).
template <class Scalar>
void packed_gemm_parallel(GemmBuffers<Scalar>& buffers, const GemmOperands<Scalar>& g,
                          const GemmLowRank<Scalar>* low = nullptr) {
  packed_gemm_parallel(buffers, g, pack_b_from_memory(g), low);
}

}  // namespace lora::detail
