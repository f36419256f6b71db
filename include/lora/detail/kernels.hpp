// lora.hpp internals: the skinny products of a LoRA layer, written with Eigen's packet primitives.
//
// Two shapes cover every product with a small dimension r:
//   rank_update:  C = base + alpha * U V        U [m x K] (any strides), V [K x p] row-major
//   row_dots:     C = alpha * X W^T             X [m x k], W [p x k] row-major, C [m x p]
// They never call a BLAS and never start threads themselves except through parallel_for, which splits
// a range over OpenMP threads only outside a parallel region, so they can run while Eigen (or a BLAS)
// owns the big products without nesting.
#pragma once

#include <lora/common.hpp>

#include <algorithm>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lora::detail {

// Threads to use for `work` multiply-adds: all of omp_get_max_threads() (so OMP_NUM_THREADS is
// respected) for big work, fewer for small work, one inside a parallel region.
inline int threads_for(double work) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
  // Below this, a thread costs more than it saves (a fork and a join of a few microseconds on a quiet
  // machine, a lost time slice on a busy one).
  const double per_thread = 262144;
  const int by_work = static_cast<int>(work / per_thread);
  return std::max(1, std::min(omp_get_max_threads(), by_work));
#else
  (void)work;
  return 1;
#endif
}

// Piece t of nt of [0, total), boundaries rounded to `align`.
inline std::pair<Index, Index> split(Index total, Index align, int t, int nt) {
  const Index units = (total + align - 1) / align;
  return {std::min(total, units * t / nt * align), std::min(total, units * (t + 1) / nt * align)};
}

// Runs f(t, nt) on `threads` threads (t = 0 .. nt - 1); f may call barrier().
template <class F>
void parallel_region(int threads, F&& f) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    f(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  f(0, 1);
}

// Waits for every thread of the enclosing parallel_region (an orphaned OpenMP barrier).
inline void barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// Calls f(begin, end) on `threads` contiguous pieces of [0, total), boundaries rounded to `align`.
template <class F>
void parallel_for(Index total, Index align, int threads, F&& f) {
  if (total <= 0) return;
  const Index pieces = std::max<Index>(1, std::min<Index>(threads, (total + align - 1) / align));
  if (pieces == 1) {
    f(Index(0), total);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(pieces))
  {
    const Index t = omp_get_thread_num(), nt = omp_get_num_threads();
    const Index units = (total + align - 1) / align;
    const Index begin = std::min(total, units * t / nt * align);
    const Index end = std::min(total, units * (t + 1) / nt * align);
    if (begin < end) f(begin, end);
  }
#else
  f(Index(0), total);
#endif
}

template <class Scalar>
struct RankUpdate {
  Index m = 0, p = 0, K = 0;
  const Scalar* U = nullptr;  // U(i, k) = U[i * u_row + k * u_k]
  Index u_row = 0, u_k = 0;
  const Scalar* V = nullptr;  // V(k, j) = V[k * ldv + j]
  Index ldv = 0;
  const Scalar* base = nullptr;  // nullptr: 0; may equal C (in place)
  Index ldb = 0;
  const Scalar* col_add = nullptr;  // [p], added to every row (a bias), or nullptr
  Scalar* C = nullptr;
  Index ldc = 0;
  Scalar alpha = 1;
};

namespace kernel {

using Eigen::internal::padd;
using Eigen::internal::pmadd;
using Eigen::internal::predux;
using Eigen::internal::pset1;
using Eigen::internal::ploadu;
using Eigen::internal::pstoreu;

template <class Scalar>
using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
template <class Scalar>
constexpr Index packet_size = Eigen::internal::unpacket_traits<Packet<Scalar>>::size;

// Rows i0 .. i0 + MR of C, columns j0 .. j0 + 2 packets.
template <int MR, class Scalar>
void rank_update_tile(const RankUpdate<Scalar>& a, Index i0, Index j0) {
  using P = Packet<Scalar>;
  constexpr Index ps = packet_size<Scalar>;
  P c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) c0[r] = c1[r] = pset1<P>(Scalar(0));
  const Scalar* u = a.U + i0 * a.u_row;
  const Scalar* v = a.V + j0;
  for (Index k = 0; k < a.K; ++k, u += a.u_k, v += a.ldv) {
    const P v0 = ploadu<P>(v), v1 = ploadu<P>(v + ps);
    for (int r = 0; r < MR; ++r) {
      const P ur = pset1<P>(u[r * a.u_row]);
      c0[r] = pmadd(ur, v0, c0[r]);
      c1[r] = pmadd(ur, v1, c1[r]);
    }
  }
  const P alpha = pset1<P>(a.alpha);
  for (int r = 0; r < MR; ++r) {
    P b0 = pset1<P>(Scalar(0)), b1 = b0;
    if (a.base) {
      b0 = ploadu<P>(a.base + (i0 + r) * a.ldb + j0);
      b1 = ploadu<P>(a.base + (i0 + r) * a.ldb + j0 + ps);
    }
    if (a.col_add) {
      b0 = padd(b0, ploadu<P>(a.col_add + j0));
      b1 = padd(b1, ploadu<P>(a.col_add + j0 + ps));
    }
    pstoreu(a.C + (i0 + r) * a.ldc + j0, pmadd(alpha, c0[r], b0));
    pstoreu(a.C + (i0 + r) * a.ldc + j0 + ps, pmadd(alpha, c1[r], b1));
  }
}

template <class Scalar>
void rank_update_scalar(const RankUpdate<Scalar>& a, Index i, Index j) {
  Scalar s = 0;
  for (Index k = 0; k < a.K; ++k) s += a.U[i * a.u_row + k * a.u_k] * a.V[k * a.ldv + j];
  Scalar b = a.base ? a.base[i * a.ldb + j] : Scalar(0);
  if (a.col_add) b += a.col_add[j];
  a.C[i * a.ldc + j] = b + a.alpha * s;
}

template <class Scalar>
void rank_update_rows(const RankUpdate<Scalar>& a, Index i0, Index mr, Index j0, Index j1) {
  constexpr Index nr = 2 * packet_size<Scalar>;
  Index j = j0;
  for (; j + nr <= j1; j += nr) {
    switch (mr) {
      case 4: rank_update_tile<4>(a, i0, j); break;
      case 3: rank_update_tile<3>(a, i0, j); break;
      case 2: rank_update_tile<2>(a, i0, j); break;
      default: rank_update_tile<1>(a, i0, j); break;
    }
  }
  for (; j < j1; ++j)
    for (Index r = 0; r < mr; ++r) rank_update_scalar(a, i0 + r, j);
}

// C rows [i0, i1) x columns [j0, j1). A short K streams rows of C (row-major order, bandwidth);
// a long K keeps a column strip of V in cache while all rows of C pass over it.
template <class Scalar>
void rank_update_block(const RankUpdate<Scalar>& a, Index i0, Index i1, Index j0, Index j1) {
  constexpr Index nr = 2 * packet_size<Scalar>;
  if (a.K <= 64) {
    for (Index i = i0; i < i1; i += 4) rank_update_rows(a, i, std::min<Index>(4, i1 - i), j0, j1);
  } else {
    for (Index j = j0; j < j1; j += nr) {
      const Index je = std::min(j1, j + nr);
      for (Index i = i0; i < i1; i += 4) rank_update_rows(a, i, std::min<Index>(4, i1 - i), j, je);
    }
  }
}

// IB rows of X against JB rows of W.
template <int IB, int JB, class Scalar>
void row_dots_tile(const Scalar* X, Index ldx, const Scalar* W, Index ldw, Index k, Scalar* C, Index ldc,
                   Scalar alpha) {
  using P = Packet<Scalar>;
  constexpr Index ps = packet_size<Scalar>;
  P acc[IB][JB];
  for (int i = 0; i < IB; ++i)
    for (int j = 0; j < JB; ++j) acc[i][j] = pset1<P>(Scalar(0));
  Index t = 0;
  for (; t + ps <= k; t += ps) {
    P w[JB];
    for (int j = 0; j < JB; ++j) w[j] = ploadu<P>(W + j * ldw + t);
    for (int i = 0; i < IB; ++i) {
      const P x = ploadu<P>(X + i * ldx + t);
      for (int j = 0; j < JB; ++j) acc[i][j] = pmadd(x, w[j], acc[i][j]);
    }
  }
  for (int i = 0; i < IB; ++i)
    for (int j = 0; j < JB; ++j) {
      Scalar s = predux(acc[i][j]);
      for (Index u = t; u < k; ++u) s += X[i * ldx + u] * W[j * ldw + u];
      C[i * ldc + j] = alpha * s;
    }
}

template <int IB, class Scalar>
void row_dots_row(const Scalar* X, Index ldx, const Scalar* W, Index ldw, Index k, Index j0, Index j1, Scalar* C,
                  Index ldc, Scalar alpha) {
  Index j = j0;
  for (; j + 4 <= j1; j += 4) row_dots_tile<IB, 4>(X, ldx, W + j * ldw, ldw, k, C + j, ldc, alpha);
  for (; j < j1; ++j) row_dots_tile<IB, 1>(X, ldx, W + j * ldw, ldw, k, C + j, ldc, alpha);
}

}  // namespace kernel

// C = base + alpha U V (+ col_add), split over the longer of rows and columns.
template <class Scalar>
void rank_update(const RankUpdate<Scalar>& a) {
  if (a.m <= 0 || a.p <= 0) return;
  const int threads = threads_for(static_cast<double>(a.m) * static_cast<double>(a.p) * static_cast<double>(a.K + 1));
  constexpr Index nr = 2 * kernel::packet_size<Scalar>;
  if (a.K > 64 || a.m < 4 * threads) {
    parallel_for(a.p, nr, threads, [&](Index j0, Index j1) { kernel::rank_update_block(a, 0, a.m, j0, j1); });
  } else {
    parallel_for(a.m, 4, threads, [&](Index i0, Index i1) { kernel::rank_update_block(a, i0, i1, 0, a.p); });
  }
}

namespace kernel {

// row_dots on rows [i0, i1) of X and rows [j0, j1) of W, on the calling thread.
template <class Scalar>
void row_dots_block(Index k, const Scalar* X, Index ldx, const Scalar* W, Index ldw, Scalar* C, Index ldc,
                    Scalar alpha, Index i0, Index i1, Index j0, Index j1) {
  for (Index jb = j0; jb < j1; jb += 64) {  // 64 rows of W stay in cache while the rows of X pass
    const Index je = std::min(j1, jb + 64);
    Index i = i0;
    for (; i + 2 <= i1; i += 2) row_dots_row<2>(X + i * ldx, ldx, W, ldw, k, jb, je, C + i * ldc, ldc, alpha);
    for (; i < i1; ++i) row_dots_row<1>(X + i * ldx, ldx, W, ldw, k, jb, je, C + i * ldc, ldc, alpha);
  }
}

}  // namespace kernel

// C(i, j) = alpha X.row(i) . W.row(j) for i < m, j < p, over k entries; rows of X and W contiguous.
// Split over rows of W when there are few rows of X (decoding), else over rows of X.
template <class Scalar>
void row_dots(Index m, Index p, Index k, const Scalar* X, Index ldx, const Scalar* W, Index ldw, Scalar* C,
              Index ldc, Scalar alpha = Scalar(1)) {
  if (m <= 0 || p <= 0) return;
  const int threads = threads_for(static_cast<double>(m) * static_cast<double>(p) * static_cast<double>(k));
  if (m < 2 * threads * 4) {
    // Few rows of X: each W row is read once from memory, the X rows stay in cache.
    parallel_for(p, 4, threads, [&](Index j0, Index j1) {
      kernel::row_dots_block(k, X, ldx, W, ldw, C, ldc, alpha, 0, m, j0, j1);
    });
  } else {
    parallel_for(m, 2, threads, [&](Index i0, Index i1) {
      kernel::row_dots_block(k, X, ldx, W, ldw, C, ldc, alpha, i0, i1, 0, p);
    });
  }
}

}  // namespace lora::detail
