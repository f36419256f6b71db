// lora.hpp internals: AVX-512F micro-kernels of the packed GEMM (included by gemm_kernels.hpp).
//
// 12 x 32 float / 12 x 16 double: 24 accumulators, two B loads and twelve broadcasts per step (the
// broadcasts fold into the FMAs as embedded {1toN} memory operands), leaving 6 of the 32 zmm registers
// to the compiler; the BLIS Skylake-X shape (its 32 x 12 column-major kernel is this one transposed).
// 14 x 32 would use 28 accumulators and leave the compiler too few registers to keep them all live.
// Block sizes for Sapphire Rapids (48 KiB L1d, 2 MiB L2): KC = 256 keeps a B panel (KC x NR: 32 KiB) in
// L1; the A block (MC x KC: 240 KiB) takes an eighth of L2: MC = 240 ran 10-20 % faster than an A block
// filling half of L2 (MC = 960) on 1024^3 here (docs/packed-gemm.md); NC bounds the packed B block
// (KC x NC: 4 MiB) in L3.
#pragma once

#include <lora/detail/gemm_kernels.hpp>

#include <immintrin.h>
#include <type_traits>

namespace lora::detail::gemm_kernel {

struct Avx512Float {
  using Scalar = float;
  using type = __m512;
  static constexpr int width = 16;
  static EIGEN_ALWAYS_INLINE type zero() { return _mm512_setzero_ps(); }
  static EIGEN_ALWAYS_INLINE type load(const float* p) { return _mm512_loadu_ps(p); }
  static EIGEN_ALWAYS_INLINE type broadcast(float x) { return _mm512_set1_ps(x); }
  static EIGEN_ALWAYS_INLINE type fma(type a, type b, type c) { return _mm512_fmadd_ps(a, b, c); }
  static EIGEN_ALWAYS_INLINE type mul(type a, type b) { return _mm512_mul_ps(a, b); }
  static EIGEN_ALWAYS_INLINE void store(float* p, type x) { _mm512_storeu_ps(p, x); }
};

struct Avx512Double {
  using Scalar = double;
  using type = __m512d;
  static constexpr int width = 8;
  static EIGEN_ALWAYS_INLINE type zero() { return _mm512_setzero_pd(); }
  static EIGEN_ALWAYS_INLINE type load(const double* p) { return _mm512_loadu_pd(p); }
  static EIGEN_ALWAYS_INLINE type broadcast(double x) { return _mm512_set1_pd(x); }
  static EIGEN_ALWAYS_INLINE type fma(type a, type b, type c) { return _mm512_fmadd_pd(a, b, c); }
  static EIGEN_ALWAYS_INLINE type mul(type a, type b) { return _mm512_mul_pd(a, b); }
  static EIGEN_ALWAYS_INLINE void store(double* p, type x) { _mm512_storeu_pd(p, x); }
};

template <class S>
struct Avx512Kernel {
  using V = std::conditional_t<std::is_same_v<S, float>, Avx512Float, Avx512Double>;
  static constexpr int MR = 12, NV = 2, NR = NV * V::width;
  static constexpr Index KC = 256, MC = std::is_same_v<S, float> ? 240 : 120,
                          NC = std::is_same_v<S, float> ? 4096 : 2048;
  static constexpr const char* name = "avx512";
  static void run(Index kc, const S* a, const S* b, S* c, Index ldc, Index rows, Index cols, S alpha, S beta) {
    micro_kernel<V, MR, NV>(kc, a, b, c, ldc, rows, cols, alpha, beta);
  }
};

}  // namespace lora::detail::gemm_kernel
