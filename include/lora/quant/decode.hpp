// lora.hpp internals: the decode kernels of a quantized base (quant/quant.hpp). Each decodes a run of NF4
// or int8 codes once into vector registers and either multiplies it into up to 8 activation rows (the
// decoding GEMV, n = 1 .. 8) or stores it (the packed GEMM panels of the larger products).
//
// A decoded weight is exactly the float QuantizedWeight::dequantize_rows makes: NF4 `level[code] * absmax`
// (the levels are scaled by the block's absmax once per block, the same IEEE products), int8
// `float(code) * (absmax / 127)`. Only the order of the dot products' sums differs between kernels.
//
// Chosen at compile time from the target flags, as the GEMM micro-kernels are (detail/gemm_kernels.hpp):
//   __AVX512F__           16 weights a step; the 16 NF4 levels sit in one register (vpermps)
//   __AVX2__ && __FMA__    8 weights a step; the levels in two registers, picked by the code's bit 3
//   otherwise, or LORA_GEMM_PORTABLE   2 weights (one byte of NF4 codes) a step, plain C++
// The decoding GEMV over NF4 rows of whole blocks (nf4_dot_pairs, what real shapes take) decodes twice
// as many weights a step without the shuffle that interleaves high and low nibbles, reading activations
// reordered once per call to match (pair_layout).
#pragma once

#include <lora/common.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if !defined(LORA_GEMM_PORTABLE) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)))
#include <immintrin.h>
#endif

// The walk over the codes must inline into each kernel, or its accumulators live in memory (a store and a
// load on every FMA's dependency chain: measured 2.5x slower).
#if defined(__GNUC__) || defined(__clang__)
#define LORA_DECODE_INLINE inline __attribute__((always_inline))
#else
#define LORA_DECODE_INLINE inline
#endif

namespace lora::quant::kernel {

// A hint to fetch the cache line at p, which may lie past the codes (a prefetch never faults). A single
// stream of codes otherwise runs at a fraction of the bandwidth a float GEMV's several row streams reach:
// measured 1.4x faster decoding at 11008 x 4096 on one core.
inline void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p);
#else
  (void)p;
#endif
}

// NF4 code i of a run stored two per byte, the first in the high nibble.
inline unsigned nibble(const std::uint8_t* codes, Index i) {
  const unsigned byte = codes[i >> 1];
  return (i & 1) ? (byte & 0xFu) : (byte >> 4);
}

#if !defined(LORA_GEMM_PORTABLE) && defined(__AVX512F__)
struct Isa {
  static constexpr const char* name = "avx512";
  static constexpr int width = 16;
  using V = __m512;
  struct Levels {
    __m512 t;
  };
  static Levels levels(const float* lv, float a) { return {_mm512_mul_ps(_mm512_loadu_ps(lv), _mm512_set1_ps(a))}; }
  // Weights 0 .. 15 from the 8 bytes at p.
  static V nf4(const std::uint8_t* p, const Levels& l) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), m = _mm_set1_epi8(0x0F);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m), lo = _mm_and_si128(b, m);
    return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), l.t);
  }
  // Weights 0 .. 31 from the 16 bytes at p: even = weights 0, 2, .., 30 (the high nibbles), odd = 1, 3, ..,
  // 31. vpermps reads only an index's low 4 bits, so the low nibble needs no mask.
  static void nf4_pairs(const std::uint8_t* p, const Levels& l, V& even, V& odd) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    even = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), l.t);
    odd = _mm512_permutexvar_ps(b, l.t);
  }
  static V int8(const std::int8_t* p, V scale) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), scale);
  }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
};
#elif !defined(LORA_GEMM_PORTABLE) && defined(__AVX2__) && defined(__FMA__)
struct Isa {
  static constexpr const char* name = "avx2";
  static constexpr int width = 8;
  using V = __m256;
  struct Levels {
    __m256 lo, hi;  // levels 0 .. 7 and 8 .. 15
  };
  static Levels levels(const float* lv, float a) {
    const __m256 s = _mm256_set1_ps(a);
    return {_mm256_mul_ps(_mm256_loadu_ps(lv), s), _mm256_mul_ps(_mm256_loadu_ps(lv + 8), s)};
  }
  // Weights 0 .. 7 from the 4 bytes at p.
  static V nf4(const std::uint8_t* p, const Levels& l) {
    std::int32_t word;
    std::memcpy(&word, p, sizeof word);
    const __m128i b = _mm_cvtsi32_si128(word), m = _mm_set1_epi8(0x0F);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), m), lo = _mm_and_si128(b, m);
    const __m256i code = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
    const __m256 low = _mm256_permutevar8x32_ps(l.lo, code), high = _mm256_permutevar8x32_ps(l.hi, code);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));  // bit 3 -> sign
  }
  // Weights 0 .. 15 from the 8 bytes at p: even = weights 0, 2, .., 14 (the high nibbles), odd = 1, 3, ..,
  // 15. vpermps reads only an index's low 3 bits; the blend takes the high half where bit 3 is set.
  static void nf4_pairs(const std::uint8_t* p, const Levels& l, V& even, V& odd) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i h = _mm256_srli_epi32(b, 4);
    even = _mm256_blendv_ps(_mm256_permutevar8x32_ps(l.lo, h), _mm256_permutevar8x32_ps(l.hi, h),
                            _mm256_castsi256_ps(_mm256_slli_epi32(b, 24)));
    odd = _mm256_blendv_ps(_mm256_permutevar8x32_ps(l.lo, b), _mm256_permutevar8x32_ps(l.hi, b),
                           _mm256_castsi256_ps(_mm256_slli_epi32(b, 28)));
  }
  static V int8(const std::int8_t* p, V scale) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), scale);
  }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float sum(V v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
};
#else
struct Isa {
  static constexpr const char* name = "portable";
  static constexpr int width = 2;
  struct V {
    float v[2];
  };
  struct Levels {
    float t[16];
  };
  static Levels levels(const float* lv, float a) {
    Levels l;
    for (int c = 0; c < 16; ++c) l.t[c] = lv[c] * a;
    return l;
  }
  static V nf4(const std::uint8_t* p, const Levels& l) { return {{l.t[p[0] >> 4], l.t[p[0] & 0xF]}}; }
  static void nf4_pairs(const std::uint8_t* p, const Levels& l, V& even, V& odd) {
    even = {{l.t[p[0] >> 4], l.t[p[1] >> 4]}};
    odd = {{l.t[p[0] & 0xF], l.t[p[1] & 0xF]}};
  }
  static V int8(const std::int8_t* p, V scale) {
    return {{static_cast<float>(p[0]) * scale.v[0], static_cast<float>(p[1]) * scale.v[1]}};
  }
  static V set1(float v) { return {{v, v}}; }
  static V load(const float* p) { return {{p[0], p[1]}}; }
  static void store(float* p, V v) {
    p[0] = v.v[0];
    p[1] = v.v[1];
  }
  static V fma(V a, V b, V c) { return {{c.v[0] + a.v[0] * b.v[0], c.v[1] + a.v[1] * b.v[1]}}; }
  static V add(V a, V b) { return {{a.v[0] + b.v[0], a.v[1] + b.v[1]}}; }
  static float sum(V v) { return v.v[0] + v.v[1]; }
};
#endif

// The kernel this build selected: "avx512", "avx2" or "portable".
inline constexpr const char* name = Isa::name;

// The absmax of each NF4 block: absmax[b], or with double quantization (qabsmax set)
// dyn[qabsmax[b]] * absmax2[b / group] + offset.
struct Nf4Scales {
  const float* absmax = nullptr;
  const std::uint8_t* qabsmax = nullptr;
  const float* dyn = nullptr;
  const float* absmax2 = nullptr;
  Index group = 1;
  float offset = 0;
  // Block b's absmax; g = b / group (the caller's, so a walk over blocks divides once).
  float at(Index b, Index g) const {
    if (!qabsmax) return absmax[b];
    return dyn[qabsmax[b]] * absmax2[g] + offset;
  }
  float at(Index b) const { return at(b, qabsmax ? b / group : 0); }
};

// The absmax of blocks b, b + 1, ... in turn, dividing once: a kernel's walk over consecutive blocks.
class Nf4BlockScales {
 public:
  Nf4BlockScales(const Nf4Scales& scales, Index b)
      : s_(scales), b_(b), g_(scales.qabsmax ? b / scales.group : 0), g_end_((g_ + 1) * scales.group) {}
  Index block() const { return b_; }  // the block next() reads
  float next() {
    const float a = s_.at(b_, g_);
    if (++b_ == g_end_) {
      ++g_;
      g_end_ += s_.group;
    }
    return a;
  }

 private:
  const Nf4Scales& s_;
  Index b_, g_, g_end_;
};

// The U independent vector sums of each of N rows, and a scalar rest (the run's single weights).
template <int N, int U>
struct RowSums {
  typename Isa::V v[N][U];
  float rest[N];
  RowSums() {
    for (int k = 0; k < N; ++k) {
      for (int u = 0; u < U; ++u) v[k][u] = Isa::set1(0.0f);
      rest[k] = 0.0f;
    }
  }
  void total(float* out) const {
    for (int k = 0; k < N; ++k) {
      typename Isa::V t = v[k][0];
      for (int u = 1; u < U; ++u) t = Isa::add(t, v[k][u]);
      out[k] = Isa::sum(t) + rest[k];
    }
  }
};

// f(std::integral_constant<int, u>()) for u = 0 .. U - 1, unrolled.
template <int U, class F, int... u>
LORA_DECODE_INLINE void unrolled(F&& f, std::integer_sequence<int, u...>) {
  (f(std::integral_constant<int, u>()), ...);
}
template <int U, class F>
LORA_DECODE_INLINE void unrolled(F&& f) {
  unrolled<U>(f, std::make_integer_sequence<int, U>());
}

// Visits NF4 codes [first, first + len) in blocks of `block` codes counted from code 0 (block even, as
// QuantizedWeight requires): chunk(j, V, u) for Isa::width weights from offset j (relative to first), u
// (a std::integral_constant) cycling through 0 .. U - 1 within a block so a caller can keep U independent
// sums; one(j, w) for single weights at the run's ends.
template <int U, class Chunk, class One>
LORA_DECODE_INLINE void nf4_walk(const std::uint8_t* codes, Index first, Index len, Index block, const float* lv,
                                 const Nf4Scales& scales, Chunk&& chunk, One&& one) {
  constexpr Index W = Isa::width;
  if (len <= 0) return;
  Nf4BlockScales blocks(scales, first / block);
  Index i = first;
  const Index end = first + len;
  while (i < end) {
    const Index stop = std::min(end, (blocks.block() + 1) * block);
    const float a = blocks.next();
    if (i & 1) {  // only at the run's start: blocks start at even codes
      one(i - first, lv[nibble(codes, i)] * a);
      ++i;
    }
    const typename Isa::Levels l = Isa::levels(lv, a);
    for (; i + U * W <= stop; i += U * W)
      unrolled<U>([&](auto u) {
        const Index at = i + decltype(u)::value * W;
        chunk(at - first, Isa::nf4(codes + (at >> 1), l), u);
      });
    for (; i + W <= stop; i += W) chunk(i - first, Isa::nf4(codes + (i >> 1), l), std::integral_constant<int, 0>());
    for (; i < stop; ++i) one(i - first, lv[nibble(codes, i)] * a);
  }
}

// Independent sums per row of a dot kernel over N rows: enough to hide the FMA latency when N is small.
template <int N>
inline constexpr int sums_per_row = N >= 4 ? 1 : N >= 2 ? 2 : 4;

// out[k] = sum_j w_j X[k ldx + j], k < N, over the NF4 weights w of codes [first, first + len).
template <int N>
inline void nf4_dot(const std::uint8_t* codes, Index first, Index len, Index block, const float* lv,
                    const Nf4Scales& scales, const float* X, Index ldx, float* out) {
  constexpr int U = sums_per_row<N>;
  RowSums<N, U> acc;
  nf4_walk<U>(
      codes, first, len, block, lv, scales,
      [&](Index j, typename Isa::V w, auto u) {
        constexpr int v = decltype(u)::value;
        for (int k = 0; k < N; ++k) acc.v[k][v] = Isa::fma(w, Isa::load(X + k * ldx + j), acc.v[k][v]);
      },
      [&](Index j, float w) {
        for (int k = 0; k < N; ++k) acc.rest[k] += w * X[k * ldx + j];
      });
  acc.total(out);
}

// f(j, w_j) for each NF4 weight of codes [first, first + len), in order.
template <class F>
inline void nf4_each(const std::uint8_t* codes, Index first, Index len, Index block, const float* lv,
                     const Nf4Scales& scales, F&& f) {
  nf4_walk<1>(
      codes, first, len, block, lv, scales,
      [&](Index j, typename Isa::V w, auto) {
        float t[Isa::width];
        Isa::store(t, w);
        for (Index m = 0; m < Isa::width; ++m) f(j + m, t[m]);
      },
      f);
}

// dst[j] = T(w_j) over the NF4 weights of codes [first, first + len).
template <class T>
inline void nf4_decode(const std::uint8_t* codes, Index first, Index len, Index block, const float* lv,
                       const Nf4Scales& scales, T* dst) {
  if constexpr (std::is_same_v<T, float>)
    nf4_walk<1>(
        codes, first, len, block, lv, scales, [&](Index j, typename Isa::V w, auto) { Isa::store(dst + j, w); },
        [&](Index j, float w) { dst[j] = w; });
  else
    nf4_each(codes, first, len, block, lv, scales, [&](Index j, float w) { dst[j] = static_cast<T>(w); });
}

// The decoding GEMV's fast NF4 path reads a run of codes in steps of pair_width weights, decoding the
// high nibbles (even weights) and the low nibbles (odd weights) of Isa::width bytes into two registers
// with no interleaving shuffle. The activations must then be in the same order: pair_layout writes
// x [len] so that each step's even weights meet x_even and its odd weights x_odd.
inline constexpr Index pair_width = 2 * Isa::width;

// Whether nf4_dot_pairs can run on rows of `in` codes in blocks of `block`: every row and block starts a
// step.
inline bool pairs_fit(Index in, Index block) { return in % block == 0 && block % pair_width == 0; }

// xp = x reordered for nf4_dot_pairs: per step of pair_width, x[0, 2, 4, ..] then x[1, 3, 5, ..].
// len a multiple of pair_width.
inline void pair_layout(const float* x, Index len, float* xp) {
  constexpr Index W = Isa::width;
  for (Index c = 0; c < len; c += 2 * W, x += 2 * W, xp += 2 * W)
    for (Index m = 0; m < W; ++m) {
      xp[m] = x[2 * m];
      xp[W + m] = x[2 * m + 1];
    }
}

// out[k] = sum_j w_j x_k[j], k < N, over the NF4 weights of codes [first, first + len), with the x rows in
// pair_layout at Xp + k ldx. first and len multiples of block, pairs_fit(len, block).
template <int N>
inline void nf4_dot_pairs(const std::uint8_t* codes, Index first, Index len, Index block, const float* lv,
                          const Nf4Scales& scales, const float* Xp, Index ldx, float* out) {
  constexpr Index W = Isa::width;
  constexpr int U = N == 1 ? 2 : 1;  // steps unrolled: 2 U sums per row
  RowSums<N, 2 * U> acc;
  Nf4BlockScales blocks(scales, first / block);
  const std::uint8_t* p = codes + (first >> 1);
  const float* x = Xp;
  for (Index i = 0; i < len; i += block) {
    prefetch(p + 1024);
    const typename Isa::Levels l = Isa::levels(lv, blocks.next());
    Index j = 0;
    // The unrolled steps and the rest are written out: one shared step lambda measured 1.3-1.6x slower.
    for (; j + U * 2 * W <= block; j += U * 2 * W, p += U * W, x += U * 2 * W)
      unrolled<U>([&](auto u) {
        constexpr int v = decltype(u)::value;
        typename Isa::V even, odd;
        Isa::nf4_pairs(p + v * W, l, even, odd);
        for (int k = 0; k < N; ++k) {
          acc.v[k][2 * v] = Isa::fma(even, Isa::load(x + k * ldx + v * 2 * W), acc.v[k][2 * v]);
          acc.v[k][2 * v + 1] = Isa::fma(odd, Isa::load(x + k * ldx + v * 2 * W + W), acc.v[k][2 * v + 1]);
        }
      });
    for (; j < block; j += 2 * W, p += W, x += 2 * W) {
      typename Isa::V even, odd;
      Isa::nf4_pairs(p, l, even, odd);
      for (int k = 0; k < N; ++k) {
        acc.v[k][0] = Isa::fma(even, Isa::load(x + k * ldx), acc.v[k][0]);
        acc.v[k][1] = Isa::fma(odd, Isa::load(x + k * ldx + W), acc.v[k][1]);
      }
    }
  }
  acc.total(out);
}

// out[k] = sum_j float(codes[j]) scale X[k ldx + j], k < N, j < len.
template <int N>
inline void int8_dot(const std::int8_t* codes, Index len, float scale, const float* X, Index ldx, float* out) {
  constexpr Index W = Isa::width;
  constexpr int U = sums_per_row<N>;
  const typename Isa::V s = Isa::set1(scale);
  RowSums<N, U> acc;
  auto step = [&](Index j, auto u) {
    constexpr int v = decltype(u)::value;
    const typename Isa::V w = Isa::int8(codes + j, s);
    for (int k = 0; k < N; ++k) acc.v[k][v] = Isa::fma(w, Isa::load(X + k * ldx + j), acc.v[k][v]);
  };
  Index j = 0;
  for (; j + U * W <= len; j += U * W) {
    if (j % 64 == 0) prefetch(codes + j + 1024);
    unrolled<U>([&](auto u) { step(j + decltype(u)::value * W, u); });
  }
  for (; j + W <= len; j += W) step(j, std::integral_constant<int, 0>());
  for (; j < len; ++j) {
    const float w = static_cast<float>(codes[j]) * scale;
    for (int k = 0; k < N; ++k) acc.rest[k] += w * X[k * ldx + j];
  }
  acc.total(out);
}

// dst[j] = T(float(codes[j]) scale), j < len.
template <class T>
inline void int8_decode(const std::int8_t* codes, Index len, float scale, T* dst) {
  constexpr Index W = Isa::width;
  Index j = 0;
  if constexpr (std::is_same_v<T, float>) {
    const typename Isa::V s = Isa::set1(scale);
    for (; j + W <= len; j += W) Isa::store(dst + j, Isa::int8(codes + j, s));
  }
  for (; j < len; ++j) dst[j] = static_cast<T>(static_cast<float>(codes[j]) * scale);
}

// f(std::integral_constant<int, N>()) for N == n, 1 <= n <= 8 (a kernel's row count as a constant).
template <class F>
inline void with_rows(Index n, F&& f) {
  switch (n) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

}  // namespace lora::quant::kernel
