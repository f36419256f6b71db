// lora.hpp internals: AVX2 + FMA micro-kernels of the packed GEMM (included by gemm_kernels.hpp).
//
// 6 x 16 float / 6 x 8 double: 12 accumulators, two B loads and six broadcasts per step, the 16 ymm
// registers of AVX2 (the BLIS Haswell/Zen shape). Block sizes for Zen 3 (32 KiB L1d, 512 KiB L2):
// KC = 256 keeps a B panel (KC x NR: 16 KiB) in L1 beside the A panels streaming from L2; MC keeps the
// A block (MC x KC: 240 KiB) in half of L2; NC bounds the packed B block (KC x NC: 4 MiB / 4 MiB) in L3.
#pragma once

#include <lora/detail/gemm_kernels.hpp>

#include <immintrin.h>
#include <type_traits>

namespace lora::detail::gemm_kernel {

struct Avx2Float {
  using Scalar = float;
  using type = __m256;
  static constexpr int width = 8;
  static EIGEN_ALWAYS_INLINE type zero() { return _mm256_setzero_ps(); }
  static EIGEN_ALWAYS_INLINE type load(const float* p) { return _mm256_loadu_ps(p); }
  static EIGEN_ALWAYS_INLINE type broadcast(float x) { return _mm256_set1_ps(x); }
  static EIGEN_ALWAYS_INLINE type fma(type a, type b, type c) { return _mm256_fmadd_ps(a, b, c); }
  static EIGEN_ALWAYS_INLINE type mul(type a, type b) { return _mm256_mul_ps(a, b); }
  static EIGEN_ALWAYS_INLINE void store(float* p, type x) { _mm256_storeu_ps(p, x); }
};

struct Avx2Double {
  using Scalar = double;
  using type = __m256d;
  static constexpr int width = 4;
  static EIGEN_ALWAYS_INLINE type zero() { return _mm256_setzero_pd(); }
  static EIGEN_ALWAYS_INLINE type load(const double* p) { return _mm256_loadu_pd(p); }
  static EIGEN_ALWAYS_INLINE type broadcast(double x) { return _mm256_set1_pd(x); }
  static EIGEN_ALWAYS_INLINE type fma(type a, type b, type c) { return _mm256_fmadd_pd(a, b, c); }
  static EIGEN_ALWAYS_INLINE type mul(type a, type b) { return _mm256_mul_pd(a, b); }
  static EIGEN_ALWAYS_INLINE void store(double* p, type x) { _mm256_storeu_pd(p, x); }
};

template <class S>
struct Avx2Kernel {
  using V = std::conditional_t<std::is_same_v<S, float>, Avx2Float, Avx2Double>;
  static constexpr int MR = 6, NV = 2, NR = NV * V::width;
  static constexpr Index KC = 256, MC = std::is_same_v<S, float> ? 240 : 120,
                          NC = std::is_same_v<S, float> ? 4096 : 2048;
  static constexpr const char* name = "avx2";
  static void run(Index kc, const S* a, const S* b, S* c, Index ldc, Index rows, Index cols, S alpha, S beta) {
    micro_kernel<V, MR, NV>(kc, a, b, c, ldc, rows, cols, alpha, beta);
  }
};

}  // namespace lora::detail::gemm_kernel
