// lora.hpp internals: Eigen's matrix product with packing buffers that outlive the call.
//
// `dst.noalias() = lhs * rhs` allocates Eigen's packing buffers on every call once they pass
// EIGEN_STACK_ALLOCATION_LIMIT (and always for a threaded product). gemm() runs Eigen's single-threaded
// GEMM (its blocking heuristics, or the BLAS with EIGEN_USE_BLAS) with a GemmBlocking that keeps the
// buffers, and gemm_parallel() splits a product over the threads with one GemmBlocking each, so a
// product of a shape already seen allocates nothing. This reaches into Eigen::internal (3.4's
// level3_blocking and gemm_functor).
#pragma once

#include <lora/common.hpp>
#include <lora/detail/kernels.hpp>

#include <algorithm>
#include <vector>

namespace lora::detail {

// Packing buffers and block sizes of one product with a row-major destination (for which Eigen
// computes the transposed product, so its "rows" are the destination's columns).
template <class Scalar>
class GemmBlocking : public Eigen::internal::level3_blocking<Scalar, Scalar> {
 public:
  GemmBlocking() = default;
  // Copies get their own buffers: the base class holds raw pointers into them.
  GemmBlocking(const GemmBlocking&) {}
  GemmBlocking& operator=(const GemmBlocking&) { return *this; }

  // Block sizes for a single-threaded run (Eigen re-computes them through initParallel when it threads).
  void configure(Index rows, Index cols, Index depth) {
    this->m_mc = cols;
    this->m_nc = rows;
    this->m_kc = depth;
    Eigen::internal::computeProductBlockingSizes<Scalar, Scalar, 1>(this->m_kc, this->m_mc, this->m_nc, Index(1));
    allocateAll();
  }

  // Called by Eigen's parallelize_gemm before it starts its threads.
  void initParallel(Index rows, Index cols, Index depth, Index num_threads) {
    this->m_mc = cols;
    this->m_nc = rows;
    this->m_kc = depth;
    Index m = this->m_mc;
    Eigen::internal::computeProductBlockingSizes<Scalar, Scalar, 1>(this->m_kc, m, this->m_nc, num_threads);
  }
  void allocateA() { this->m_blockA = grow(buffer_A_, this->m_mc * this->m_kc); }
  void allocateB() { this->m_blockB = grow(buffer_B_, this->m_kc * this->m_nc); }
  void allocateAll() {
    allocateA();
    allocateB();
  }

 private:
  static Scalar* grow(Eigen::Matrix<Scalar, Eigen::Dynamic, 1>& buffer, Index size) {
    if (buffer.size() < size) buffer.resize(size);
    return buffer.data();
  }
  Eigen::Matrix<Scalar, Eigen::Dynamic, 1> buffer_A_, buffer_B_;
};

// dst = lhs * rhs for dense row-major dst (no aliasing), Eigen's GEMM with persistent buffers, on the
// calling thread. Shapes too small for Eigen's GEMM (or vectors) go through Eigen's ordinary product.
// Eigen's own threaded GEMM is not used: each of its threads allocates a packing buffer on every call once
// the blocks pass EIGEN_STACK_ALLOCATION_LIMIT (it does on CPUs with a large L2); gemm_parallel() threads
// instead.
template <class Scalar, class Lhs, class Rhs, class Dst>
void gemm(GemmBlocking<Scalar>& blocking, const Lhs& lhs, const Rhs& rhs, Dst& dst) {
  using namespace Eigen;
  static_assert(Dst::Flags & RowMajorBit, "lora::detail::gemm writes row-major destinations");
  if (lhs.rows() <= 1 || rhs.cols() <= 1 || lhs.cols() == 0 ||
      lhs.cols() + lhs.rows() + rhs.cols() < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD) {
    dst.noalias() = lhs * rhs;
    return;
  }
  using Gemm = internal::general_matrix_matrix_product<Index, Scalar, (Lhs::Flags & RowMajorBit) ? RowMajor : ColMajor,
                                                       false, Scalar, (Rhs::Flags & RowMajorBit) ? RowMajor : ColMajor,
                                                       false, RowMajor, 1>;
  using Functor = internal::gemm_functor<Scalar, Index, Gemm, Lhs, Rhs, Dst, GemmBlocking<Scalar>>;
  blocking.configure(dst.rows(), dst.cols(), lhs.cols());
  dst.setZero();
  Functor(lhs, rhs, dst, Scalar(1), blocking)(0, lhs.rows(), 0, rhs.cols());
}

// One GemmBlocking per thread of gemm_parallel().
template <class Scalar>
using GemmBuffers = std::vector<GemmBlocking<Scalar>>;

// dst = lhs * rhs split over the threads, each running gemm() on its part with its own buffers: no
// allocation once the buffers have seen the shape. Many rows: the threads take rows of lhs and dst; few
// rows (dX = dY W0 while decoding): columns of rhs and dst.
template <class Scalar, class Lhs, class Rhs, class Dst>
void gemm_parallel(GemmBuffers<Scalar>& buffers, const Lhs& lhs, const Rhs& rhs, Dst& dst) {
  const Index m = lhs.rows(), p = rhs.cols();
#ifdef EIGEN_USE_BLAS
  const int threads = 1;  // the BLAS threads its own products
#else
  const int threads =
      threads_for(static_cast<double>(m) * static_cast<double>(lhs.cols()) * static_cast<double>(p));
#endif
  if (static_cast<int>(buffers.size()) < threads) buffers.resize(static_cast<std::size_t>(threads));
  if (threads <= 1) {
    gemm(buffers.front(), lhs, rhs, dst);
    return;
  }
  const bool by_rows = m >= 16 * threads;
  parallel_region(threads, [&](int t, int nt) {
    GemmBlocking<Scalar>& own = buffers[static_cast<std::size_t>(t)];
    if (by_rows) {
      const auto rows = split(m, kernel::MR, t, nt);
      if (rows.first >= rows.second) return;
      auto d = dst.middleRows(rows.first, rows.second - rows.first);
      gemm(own, lhs.middleRows(rows.first, rows.second - rows.first), rhs, d);
    } else {
      const auto cols = split(p, 16, t, nt);
      if (cols.first >= cols.second) return;
      auto d = dst.middleCols(cols.first, cols.second - cols.first);
      gemm(own, lhs, rhs.middleCols(cols.first, cols.second - cols.first), d);
    }
  });
}

}  // namespace lora::detail
