// lora.hpp internals: the register-blocked micro-kernels of the packed GEMM (detail/gemm.hpp).
//
// One micro-kernel, written once over a small vector interface V (load, broadcast, fma, store), Eigen's
// widest packet for the compiler's target (SSE, AVX, AVX-512: the same instructions hand-written
// intrinsics would use):
//   C[MR x NR] = alpha * Apanel[MR x kc] * Bpanel[kc x NR] + beta * C      (beta == 0: C is not read)
// with NR = NV * V::width. The accumulators (MR x NV vectors) stay in registers; each step of p loads NV
// vectors of the B panel and broadcasts MR values of the A panel. A tile clipped at the edge of C is
// computed in full (the panels are zero-padded) and stored through a small buffer. A second pair of
// panels (k2 steps of A2 [MR x k2] and B2 [k2 x NR]) may extend the sum before the store:
//   C[MR x NR] = alpha * (Apanel Bpanel + A2panel B2panel) + beta * C
// which is how a fused LoRA forward adds T (s B^T) and the bias to a tile while it is in registers.
//
// The tile shape is chosen at compile time from the compiler's target flags:
//   __AVX512F__              12 x 32 float, 12 x 16 double
//   __AVX2__ && __FMA__       6 x 16 float,  6 x 8 double
//   otherwise, or LORA_GEMM_PORTABLE   4 x 2 packets
// Each kernel also names its default block sizes (MC, KC, NC) for the caches of the CPUs it targets.
#pragma once

#include <lora/common.hpp>

#include <algorithm>
#include <type_traits>

namespace lora::detail::gemm_kernel {

// acc += the k steps of an A panel [MR x k] times a B panel [k x NR].
template <class V, int MR, int NV>
EIGEN_ALWAYS_INLINE void accumulate(typename V::type (&acc)[MR][NV], Index k, const typename V::Scalar* __restrict a,
                                    const typename V::Scalar* __restrict b) {
  using T = typename V::type;
  constexpr int W = V::width, NR = NV * W;
#pragma GCC unroll 4
  for (Index p = 0; p < k; ++p, a += MR, b += NR) {
    T bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T ar = V::broadcast(a[r]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(ar, bv[v], acc[r][v]);
    }
  }
}

// C tile = alpha * A panel * B panel + beta * C tile, rows x cols of it written (rows <= MR, cols <= NR).
template <class V, int MR, int NV>
inline void micro_kernel(Index kc, const typename V::Scalar* __restrict a, const typename V::Scalar* __restrict b,
                         Index k2, const typename V::Scalar* __restrict a2, const typename V::Scalar* __restrict b2,
                         typename V::Scalar* c, Index ldc, Index rows, Index cols, typename V::Scalar alpha,
                         typename V::Scalar beta) {
  using Scalar = typename V::Scalar;
  using T = typename V::type;
  constexpr int W = V::width, NR = NV * W;
  T acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V::zero();
#if defined(__GNUC__)
  // The C tile's lines, asked for while the k loop runs: C is re-read once per KC block from L3 or
  // memory, and its rows are ldc apart, too far for the hardware prefetcher to follow.
  for (Index r = 0; r < rows; ++r) {
    __builtin_prefetch(c + r * ldc, 1, 3);
    __builtin_prefetch(c + r * ldc + cols - 1, 1, 3);
  }
#endif
  accumulate<V, MR, NV>(acc, kc, a, b);
  accumulate<V, MR, NV>(acc, k2, a2, b2);
  const T va = V::broadcast(alpha), vb = V::broadcast(beta);
  if (rows == MR && cols == NR) {
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        Scalar* dst = c + r * ldc + v * W;
        const T scaled = V::mul(va, acc[r][v]);
        V::store(dst, beta == Scalar(0) ? scaled : V::fma(vb, V::load(dst), scaled));
      }
    return;
  }
  Scalar tile[MR * NR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) V::store(tile + r * NR + v * W, acc[r][v]);
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < cols; ++j) {
      Scalar& dst = c[r * ldc + j];
      dst = beta == Scalar(0) ? alpha * tile[r * NR + j] : alpha * tile[r * NR + j] + beta * dst;
    }
}

// The vector interface over Eigen's packets: any CPU Eigen vectorises for (and scalars where it does not).
template <class S>
struct EigenPacket {
  using Scalar = S;
  using type = typename Eigen::internal::packet_traits<S>::type;
  static constexpr int width = Eigen::internal::unpacket_traits<type>::size;
  static EIGEN_ALWAYS_INLINE type zero() { return Eigen::internal::pset1<type>(S(0)); }
  static EIGEN_ALWAYS_INLINE type load(const S* p) { return Eigen::internal::ploadu<type>(p); }
  static EIGEN_ALWAYS_INLINE type broadcast(S x) { return Eigen::internal::pset1<type>(x); }
  static EIGEN_ALWAYS_INLINE type fma(type a, type b, type c) { return Eigen::internal::pmadd(a, b, c); }
  static EIGEN_ALWAYS_INLINE type mul(type a, type b) { return Eigen::internal::pmul(a, b); }
  static EIGEN_ALWAYS_INLINE void store(S* p, type x) { Eigen::internal::pstoreu(p, x); }
  // A square block of width packets and its in-register transpose (the transposing pack, gemm_pack.hpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // the packet's vector attributes, as a template argument
  using Block = Eigen::internal::PacketBlock<type, width>;
#pragma GCC diagnostic pop
  static EIGEN_ALWAYS_INLINE void transpose(Block& block) { Eigen::internal::ptranspose(block); }
};

// A kernel: MR rows x NV packets, with default block sizes.
template <class S, int MR_, Index MC_, Index KC_, Index NC_>
struct PacketKernel {
  using V = EigenPacket<S>;
  static constexpr int MR = MR_, NV = 2, NR = NV * V::width;
  static constexpr Index MC = MC_, KC = KC_, NC = NC_;
  static void run(Index kc, const S* a, const S* b, S* c, Index ldc, Index rows, Index cols, S alpha, S beta) {
    micro_kernel<V, MR, NV>(kc, a, b, 0, nullptr, nullptr, c, ldc, rows, cols, alpha, beta);
  }
  // The same with the k2 steps of a second pair of panels added before the store.
  static void run(Index kc, const S* a, const S* b, Index k2, const S* a2, const S* b2, S* c, Index ldc, Index rows,
                  Index cols, S alpha, S beta) {
    micro_kernel<V, MR, NV>(kc, a, b, k2, a2, b2, c, ldc, rows, cols, alpha, beta);
  }
};

template <class S>
constexpr Index scaled(Index float_size) {  // doubles: half as many values in the same bytes
  return std::is_same_v<S, float> ? float_size : float_size / 2;
}

// AVX-512: 24 accumulators, two B loads and twelve broadcasts per step (the broadcasts fold into the FMAs
// as embedded {1toN} memory operands), leaving 6 of the 32 zmm registers to the compiler; the BLIS
// Skylake-X shape (its 32 x 12 column-major kernel is this one transposed). 14 x 32 would use 28
// accumulators and leave the compiler too few registers to keep them all live. Block sizes for Sapphire
// Rapids (48 KiB L1d, 2 MiB L2): KC = 256 keeps a B panel (KC x NR: 32 KiB) in L1; the A block (MC x KC:
// 240 KiB) takes an eighth of L2: MC = 240 ran 10-20 % faster than an A block filling half of L2
// (MC = 960) on 1024^3 (docs/packed-gemm.md); NC bounds the packed B block (KC x NC: 4 MiB) in L3.
template <class S>
struct Avx512Kernel : PacketKernel<S, 12, scaled<S>(240), 256, scaled<S>(4096)> {
  static constexpr const char* name = "avx512";
};

// AVX2 + FMA: 12 accumulators, two B loads and six broadcasts per step, the 16 ymm registers of AVX2
// (the BLIS Haswell/Zen shape). Block sizes for Zen 3 (32 KiB L1d, 512 KiB L2): KC = 256 keeps a B panel
// (KC x NR: 16 KiB) in L1 beside the A panels streaming from L2; MC keeps the A block (MC x KC: 240 KiB)
// in half of L2; NC bounds the packed B block (KC x NC: 4 MiB) in L3.
template <class S>
struct Avx2Kernel : PacketKernel<S, 6, scaled<S>(240), 256, scaled<S>(4096)> {
  static constexpr const char* name = "avx2";
};

// Portable: 4 rows x 2 packets (4 x 8 floats with SSE). KC = 256 keeps a B panel (KC x NR) in a 32 KiB
// L1; MC = 128 keeps the A block (MC x KC) in a 256 KiB L2.
template <class S>
struct PortableKernel : PacketKernel<S, 4, 128, 256, 2048> {
  static constexpr const char* name = "portable";
};

#if !defined(LORA_GEMM_PORTABLE) && defined(__AVX512F__)
template <class S>
using Kernel = Avx512Kernel<S>;
#elif !defined(LORA_GEMM_PORTABLE) && defined(__AVX2__) && defined(__FMA__)
template <class S>
using Kernel = Avx2Kernel<S>;
#else
template <class S>
using Kernel = PortableKernel<S>;
#endif

}  // namespace lora::detail::gemm_kernel
