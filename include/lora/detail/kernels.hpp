// lora.hpp internals: the skinny products of a LoRA layer, written with Eigen's packet primitives.
//
// Two shapes cover every product with a small dimension r:
//   rank_update:  C = base + alpha * U V        U [m x K] (any strides), V [K x p] row-major, packed
//                                               into a caller-kept PackBuffer
//   row_dots:     C = alpha * X W^T             X [m x k], W [p x k] row-major, C [m x p]
// They never call a BLAS and start threads only through parallel_for / parallel_region, which fork
// only outside a parallel region, so they can run while Eigen (or a BLAS) owns the big products without
// nesting.
#pragma once

#include <lora/common.hpp>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <utility>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lora::detail {

// The count lora::set_num_threads stored (0: never called). One for the whole program, read by every
// thread: omp_set_num_threads, by contrast, sets only the calling thread's count.
inline std::atomic<int> configured_threads{0};

// The most threads a kernel may use: lora::set_num_threads's count, else the calling thread's
// omp_get_max_threads() (OMP_NUM_THREADS, omp_set_num_threads); 1 without OpenMP.
inline int max_threads() {
#ifdef _OPENMP
  const int set = configured_threads.load(std::memory_order_relaxed);
  return set > 0 ? set : omp_get_max_threads();
#else
  return 1;
#endif
}

// Multiply-adds each thread of a kernel gets at least (about 0.3 ms of one core). A fork and a join cost
// a few microseconds on a quiet machine; on a busy one, each can wait milliseconds for a thread the
// scheduler has not run yet (docs/threads.md measures both), so small products stay on one thread.
constexpr double default_work_per_thread = 1 << 22;
// The threshold threads_for applies; tests lower it to reach the threaded splits with small shapes.
inline std::atomic<double> work_per_thread{default_work_per_thread};

// Threads to use for `work` multiply-adds: all of max_threads() for big work, fewer for small work, one
// inside a parallel region.
inline int threads_for(double work) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
  const double per_thread = work_per_thread.load(std::memory_order_relaxed);
  const int most = max_threads();
  // Compared in double: work / per_thread exceeds INT_MAX for large products (and is NaN for NaN work).
  const double by_work = work / per_thread;
  if (!(by_work >= 1)) return 1;
  return by_work >= most ? most : std::max(1, static_cast<int>(by_work));
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

// Runs f(t, nt) on `threads` threads (t = 0 .. nt - 1); f may call barrier(nt).
template <class F>
void parallel_region(int threads, F&& f) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    f(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#else
  (void)threads;
#endif
  f(0, 1);
}

// Waits for every thread of the enclosing parallel_region (an orphaned OpenMP barrier). With nt == 1 the
// region did not fork, and an OpenMP barrier would bind to the caller's own parallel region (when the
// library is called from one) and wait for threads that never reach it.
inline void barrier(int nt) {
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp barrier
  }
#else
  (void)nt;
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

// C = base + alpha U V (+ col_add on every row), C [m x p], for a small m or a small K.
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

// The common form: C += alpha U V in place (base = C).
template <class Scalar>
RankUpdate<Scalar> in_place_update(Index m, Index p, Index K, const Scalar* U, Index u_row, Index u_k, const Scalar* V,
                                   Index ldv, Scalar* C, Index ldc, Scalar alpha = Scalar(1)) {
  RankUpdate<Scalar> a;
  a.m = m;
  a.p = p;
  a.K = K;
  a.U = U;
  a.u_row = u_row;
  a.u_k = u_k;
  a.V = V;
  a.ldv = ldv;
  a.base = C;
  a.ldb = ldc;
  a.C = C;
  a.ldc = ldc;
  a.alpha = alpha;
  return a;
}

// Above this K (the long dimension of dA = dT^T X and dB^T = s T^T dY) V is packed in blocks of this many
// rows, one block at a time.
constexpr Index long_k_block = 256;

namespace kernel {

using Eigen::internal::padd;
using Eigen::internal::pabs;
using Eigen::internal::pmadd;
using Eigen::internal::pmax;
using Eigen::internal::predux;
using Eigen::internal::predux_max;
using Eigen::internal::pset1;
using Eigen::internal::ploadu;
using Eigen::internal::pstoreu;

template <class Scalar>
using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
template <class Scalar>
constexpr Index packet_size = Eigen::internal::unpacket_traits<Packet<Scalar>>::size;

// Register tiles of C are MR rows x nr columns (two packets): 12 accumulators, as in the usual
// 6 x 16 single-precision AVX2 GEMM kernel.
constexpr int MR = 6;
template <class Scalar>
constexpr Index nr = 2 * packet_size<Scalar>;

// Panels: V's columns in groups of nr, each group stored as K rows of nr contiguous values, the last
// group zero-padded. The micro-kernel then reads V contiguously; rows of V read in place lie a power of
// two apart for the usual layer sizes and evict each other from the caches.
template <class Scalar>
constexpr Index panel_size(Index K, Index p) {
  return (p + nr<Scalar> - 1) / nr<Scalar> * nr<Scalar> * K;
}

// Columns [j0, j1) of V (K rows, row stride ldv; j0 a multiple of nr) into panels at dst.
template <class Scalar>
void pack_panels(const Scalar* V, Index ldv, Index K, Index j0, Index j1, Scalar* dst) {
  using P = Packet<Scalar>;
  constexpr Index ps = packet_size<Scalar>, w = nr<Scalar>;
  if (K == 0) return;  // empty panels; V (no rows) may be null, and null + j is undefined
  for (Index j = j0; j < j1; j += w, dst += K * w) {
    const Index cols = std::min(w, j1 - j);
    const Scalar* v = V + j;
    if (cols == w) {
      for (Index k = 0; k < K; ++k, v += ldv) {
        pstoreu(dst + k * w, ploadu<P>(v));
        pstoreu(dst + k * w + ps, ploadu<P>(v + ps));
      }
    } else {
      for (Index k = 0; k < K; ++k, v += ldv)
        for (Index c = 0; c < w; ++c) dst[k * w + c] = c < cols ? v[c] : Scalar(0);
    }
  }
}

// acc (rows i0 .. i0 + R of U times one panel, over K steps).
template <int R, class Scalar>
EIGEN_ALWAYS_INLINE void tile_product(const Scalar* u, Index u_row, Index u_k, const Scalar* panel, Index K,
                                      Packet<Scalar> (&c0)[MR], Packet<Scalar> (&c1)[MR]) {
  using P = Packet<Scalar>;
  constexpr Index ps = packet_size<Scalar>;
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = pset1<P>(Scalar(0));
  for (Index k = 0; k < K; ++k, u += u_k, panel += 2 * ps) {
    const P v0 = ploadu<P>(panel), v1 = ploadu<P>(panel + ps);
    for (int r = 0; r < R; ++r) {
      const P ur = pset1<P>(u[r * u_row]);
      c0[r] = pmadd(ur, v0, c0[r]);
      c1[r] = pmadd(ur, v1, c1[r]);
    }
  }
}

// C rows i0 .. i0 + R, columns j0 .. j0 + cols (cols <= nr): C = (first ? base + col_add : C) + alpha acc.
// Returns the largest |C| written when TrackMax.
template <int R, bool TrackMax, class Scalar>
EIGEN_ALWAYS_INLINE Scalar store_tile(const RankUpdate<Scalar>& a, bool first, Index i0, Index j0, Index cols,
                                      const Packet<Scalar> (&c0)[MR], const Packet<Scalar> (&c1)[MR]) {
  using P = Packet<Scalar>;
  constexpr Index ps = packet_size<Scalar>, w = nr<Scalar>;
  const P alpha = pset1<P>(a.alpha);
  P big = pset1<P>(Scalar(0));
  const Scalar* base = first ? a.base : a.C;
  const Index ldb = first ? a.ldb : a.ldc;
  const Scalar* col_add = first ? a.col_add : nullptr;
  for (int r = 0; r < R; ++r) {
    Scalar* c = a.C + (i0 + r) * a.ldc + j0;
    if (cols == w) {
      P b0 = pset1<P>(Scalar(0)), b1 = b0;
      if (base) {
        b0 = ploadu<P>(base + (i0 + r) * ldb + j0);
        b1 = ploadu<P>(base + (i0 + r) * ldb + j0 + ps);
      }
      if (col_add) {
        b0 = padd(b0, ploadu<P>(col_add + j0));
        b1 = padd(b1, ploadu<P>(col_add + j0 + ps));
      }
      b0 = pmadd(alpha, c0[r], b0);
      b1 = pmadd(alpha, c1[r], b1);
      pstoreu(c, b0);
      pstoreu(c + ps, b1);
      if (TrackMax) big = pmax(big, pmax(pabs(b0), pabs(b1)));
    } else {
      alignas(64) Scalar acc[w];
      pstoreu(acc, c0[r]);
      pstoreu(acc + ps, c1[r]);
      for (Index j = 0; j < cols; ++j) {
        Scalar v = base ? base[(i0 + r) * ldb + j0 + j] : Scalar(0);
        if (col_add) v += col_add[j0 + j];
        v += a.alpha * acc[j];
        c[j] = v;
        if (TrackMax) big = pmax(big, pset1<P>(std::abs(v)));
      }
    }
  }
  return TrackMax ? predux_max(big) : Scalar(0);
}

template <bool TrackMax, class Scalar>
Scalar tile(const RankUpdate<Scalar>& a, bool first, const Scalar* u, const Scalar* panel, Index K, Index rows,
            Index i0, Index j0, Index cols) {
  Packet<Scalar> c0[MR], c1[MR];
  switch (rows) {
#define LORA_TILE_CASE(R)                                                 \
  case R:                                                                 \
    tile_product<R>(u, a.u_row, a.u_k, panel, K, c0, c1);                 \
    return store_tile<R, TrackMax>(a, first, i0, j0, cols, c0, c1);
    LORA_TILE_CASE(6)
    LORA_TILE_CASE(5)
    LORA_TILE_CASE(4)
    LORA_TILE_CASE(3)
    LORA_TILE_CASE(2)
    default:
      LORA_TILE_CASE(1)
#undef LORA_TILE_CASE
  }
}

// The panels of a chunk of columns of V (K rows) fill at most this much, so they stay in L2 while the rows
// of C pass over them.
constexpr Index panel_cache_bytes = 96 * 1024;

template <class Scalar>
Index chunk_columns(Index K) {
  const Index cols = panel_cache_bytes / static_cast<Index>(sizeof(Scalar)) / std::max<Index>(1, K);
  return std::max(nr<Scalar>, cols / nr<Scalar> * nr<Scalar>);
}

// Rows [i0, i1) x columns [j0, j1) of C from V already packed into panels that start at column pj0
// (j0 - pj0 a multiple of nr), over k in [k0, k0 + K) of U; `first` applies base and col_add, else C
// accumulates.
template <bool TrackMax, class Scalar>
Scalar rank_update_panels(const RankUpdate<Scalar>& a, const Scalar* panels, Index pj0, Index k0, Index K, bool first,
                          Index i0, Index i1, Index j0, Index j1) {
  constexpr Index w = nr<Scalar>;
  Scalar big = 0;
  const Index chunk = chunk_columns<Scalar>(K);
  for (Index jc = j0; jc < j1; jc += chunk) {
    const Index jce = std::min(j1, jc + chunk);
    for (Index i = i0; i < i1; i += MR) {
      const Index rows = std::min<Index>(MR, i1 - i);
      // K = 0 reads no U, which may then be null (null + offset is undefined).
      const Scalar* u = K == 0 ? a.U : a.U + i * a.u_row + k0 * a.u_k;
      for (Index j = jc; j < jce; j += w) {
        const Scalar m =
            tile<TrackMax>(a, first, u, panels + (j - pj0) / w * K * w, K, rows, i, j, std::min(w, jce - j));
        if (TrackMax) big = std::max(big, m);
      }
    }
  }
  return big;
}

// Size of the pack buffer rank_update_columns needs (per thread).
template <class Scalar>
Index columns_pack_size() {
  return std::max(panel_cache_bytes / static_cast<Index>(sizeof(Scalar)), long_k_block * nr<Scalar>);
}

// Every row of C, columns [j0, j1) (j0 a multiple of nr): V is packed chunk by chunk and, for a long K,
// in blocks of long_k_block rows, into `pack` (columns_pack_size()), so each block of V is read once from
// memory while C's tiles accumulate across the blocks.
template <bool TrackMax, class Scalar>
Scalar rank_update_columns(const RankUpdate<Scalar>& a, Scalar* pack, Index j0, Index j1) {
  const Index kc = std::min(a.K, long_k_block);
  const Index chunk = chunk_columns<Scalar>(kc);
  Scalar big = 0;
  for (Index jc = j0; jc < j1; jc += chunk) {
    const Index jce = std::min(j1, jc + chunk);
    for (Index k0 = 0;; k0 += kc) {  // at least once: K = 0 still writes base + col_add
      const Index kb = std::min(kc, a.K - k0);
      pack_panels(a.V + k0 * a.ldv, a.ldv, kb, jc, jce, pack);
      const bool last = k0 + kb >= a.K;
      const Scalar m = rank_update_panels<TrackMax>(a, pack, jc, k0, kb, k0 == 0, Index(0), a.m, jc, jce);
      if (TrackMax && last) big = std::max(big, m);
      if (last) break;
    }
  }
  return big;
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

// Workspace of rank_update(): packed panels, kept by the caller so steady-state calls never allocate.
template <class Scalar>
using PackBuffer = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

// C = base + alpha U V (+ col_add), split over the threads. With enough rows, V is packed once and the
// threads split the rows of C; otherwise (few rows, or a long K) they split its columns, each packing its
// own. Returns max |C| over every entry written when TrackMax (for merge's overflow bound).
template <bool TrackMax = false, class Scalar>
Scalar rank_update(const RankUpdate<Scalar>& a, PackBuffer<Scalar>& work) {
  if (a.m <= 0 || a.p <= 0) return Scalar(0);
  constexpr Index w = kernel::nr<Scalar>;
  const int threads = threads_for(static_cast<double>(a.m) * static_cast<double>(a.p) * static_cast<double>(a.K + 1));
  std::mutex lock;
  Scalar big = 0;
  auto combine = [&](Scalar m) {
    if (!TrackMax) return;
    const std::lock_guard<std::mutex> guard(lock);
    big = std::max(big, m);
  };
  if (a.K > long_k_block || a.m < kernel::MR * threads) {
    const Index per_thread = kernel::columns_pack_size<Scalar>();
    if (work.size() < per_thread * threads) work.resize(per_thread * threads);
    parallel_region(threads, [&](int t, int nt) {
      const auto cols = split(a.p, w, t, nt);
      if (cols.first < cols.second)
        combine(kernel::rank_update_columns<TrackMax>(a, work.data() + t * per_thread, cols.first, cols.second));
    });
    return big;
  }
  const Index size = kernel::panel_size<Scalar>(a.K, a.p);
  if (work.size() < size) work.resize(size);
  kernel::pack_panels(a.V, a.ldv, a.K, Index(0), a.p, work.data());
  parallel_for(a.m, kernel::MR, threads, [&](Index i0, Index i1) {
    combine(kernel::rank_update_panels<TrackMax>(a, work.data(), 0, 0, a.K, true, i0, i1, 0, a.p));
  });
  return big;
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
