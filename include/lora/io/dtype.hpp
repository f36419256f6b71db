// lora.hpp: safetensors element types and the conversions between them and float / double.
//
// Reading converts F64, F32, F16 and BF16 to the model's Scalar; writing converts the other way. The
// 16-bit conversions use Eigen::half and Eigen::bfloat16, which widen exactly and narrow float with
// round-to-nearest-even. From double, the value is first narrowed to float with round-to-odd, so the
// result is the correctly rounded 16-bit value (a plain double -> float -> half would round twice).
// The other safetensors types are recognised (their sizes are validated) but not converted.
#pragma once

#include <lora/common.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace lora {

enum class Dtype { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64 };

inline const char* to_string(Dtype d) {
  switch (d) {
    case Dtype::BOOL: return "BOOL";
    case Dtype::U8: return "U8";
    case Dtype::I8: return "I8";
    case Dtype::F8_E5M2: return "F8_E5M2";
    case Dtype::F8_E4M3: return "F8_E4M3";
    case Dtype::I16: return "I16";
    case Dtype::U16: return "U16";
    case Dtype::F16: return "F16";
    case Dtype::BF16: return "BF16";
    case Dtype::I32: return "I32";
    case Dtype::U32: return "U32";
    case Dtype::F32: return "F32";
    case Dtype::I64: return "I64";
    case Dtype::U64: return "U64";
    case Dtype::F64: return "F64";
  }
  return "?";
}

// Bytes per element.
inline std::size_t dtype_size(Dtype d) {
  switch (d) {
    case Dtype::BOOL: case Dtype::U8: case Dtype::I8: case Dtype::F8_E5M2: case Dtype::F8_E4M3: return 1;
    case Dtype::I16: case Dtype::U16: case Dtype::F16: case Dtype::BF16: return 2;
    case Dtype::I32: case Dtype::U32: case Dtype::F32: return 4;
    case Dtype::I64: case Dtype::U64: case Dtype::F64: return 8;
  }
  return 0;
}

// The types this library converts to and from float / double.
inline bool is_convertible(Dtype d) {
  return d == Dtype::F64 || d == Dtype::F32 || d == Dtype::F16 || d == Dtype::BF16;
}

// Parses a safetensors dtype name; false for an unknown one.
inline bool parse_dtype(const std::string& name, Dtype& out) {
  static constexpr Dtype all[] = {Dtype::BOOL, Dtype::U8,   Dtype::I8,  Dtype::F8_E5M2, Dtype::F8_E4M3,
                                  Dtype::I16,  Dtype::U16,  Dtype::F16, Dtype::BF16,    Dtype::I32,
                                  Dtype::U32,  Dtype::F32,  Dtype::I64, Dtype::U64,     Dtype::F64};
  for (Dtype d : all)
    if (name == to_string(d)) {
      out = d;
      return true;
    }
  return false;
}

namespace detail {

// Little-endian loads and stores, independent of the host's byte order (compilers emit plain moves).
inline std::uint16_t load_le16(const unsigned char* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
inline std::uint32_t load_le32(const unsigned char* p) {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}
inline std::uint64_t load_le64(const unsigned char* p) {
  return static_cast<std::uint64_t>(load_le32(p)) | (static_cast<std::uint64_t>(load_le32(p + 4)) << 32);
}
inline void store_le16(unsigned char* p, std::uint16_t v) {
  p[0] = static_cast<unsigned char>(v);
  p[1] = static_cast<unsigned char>(v >> 8);
}
inline void store_le32(unsigned char* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
inline void store_le64(unsigned char* p, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

template <class To, class From>
To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// double -> float rounded to odd: truncate toward zero, then set the last bit if anything was lost.
// Rounding that float to a format with at least 2 fewer significand bits (half: 11, bfloat16: 8) gives
// the same result as rounding the double directly.
inline float round_to_odd_float(double d) {
  const float f = static_cast<float>(d);
  if (static_cast<double>(f) == d || !std::isfinite(f)) return f;
  std::uint32_t bits = bits_as<std::uint32_t>(f);
  if (std::fabs(static_cast<double>(f)) > std::fabs(d)) bits -= 1;  // magnitude one step toward zero
  return bits_as<float>(bits | 1u);
}

inline float narrow_for_16bit(float v) { return v; }
inline float narrow_for_16bit(double v) { return round_to_odd_float(v); }

// Decodes n elements of a convertible dtype from little-endian bytes.
template <class Scalar>
void decode(Dtype dtype, const unsigned char* src, std::size_t n, Scalar* dst) {
  switch (dtype) {
    case Dtype::F64:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<Scalar>(bits_as<double>(load_le64(src + 8 * i)));
      break;
    case Dtype::F32:
      for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<Scalar>(bits_as<float>(load_le32(src + 4 * i)));
      break;
    case Dtype::F16:
      for (std::size_t i = 0; i < n; ++i)
        dst[i] = static_cast<Scalar>(static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(load_le16(src + 2 * i))));
      break;
    case Dtype::BF16:
      for (std::size_t i = 0; i < n; ++i)
        dst[i] = static_cast<Scalar>(
            static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(load_le16(src + 2 * i))));
      break;
    default: LORA_ASSERT(false && "decode: dtype is not convertible");
  }
}

// Encodes n values into little-endian bytes of a convertible dtype. Returns false if a finite value
// became Inf (it does not fit the target type); dst is then partly written.
template <class Scalar>
bool encode(Dtype dtype, const Scalar* src, std::size_t n, unsigned char* dst) {
  bool fits = true;
  switch (dtype) {
    case Dtype::F64:
      for (std::size_t i = 0; i < n; ++i) store_le64(dst + 8 * i, bits_as<std::uint64_t>(static_cast<double>(src[i])));
      break;
    case Dtype::F32:
      for (std::size_t i = 0; i < n; ++i) {
        const float v = static_cast<float>(src[i]);
        fits = fits && std::isfinite(v);
        store_le32(dst + 4 * i, bits_as<std::uint32_t>(v));
      }
      break;
    case Dtype::F16:
      for (std::size_t i = 0; i < n; ++i) {
        const Eigen::half h(narrow_for_16bit(src[i]));
        fits = fits && (Eigen::numext::isfinite)(h);
        store_le16(dst + 2 * i, Eigen::numext::bit_cast<std::uint16_t>(h));
      }
      break;
    case Dtype::BF16:
      for (std::size_t i = 0; i < n; ++i) {
        const Eigen::bfloat16 h(narrow_for_16bit(src[i]));
        fits = fits && (Eigen::numext::isfinite)(h);
        store_le16(dst + 2 * i, Eigen::numext::bit_cast<std::uint16_t>(h));
      }
      break;
    default: LORA_ASSERT(false && "encode: dtype is not convertible");
  }
  return fits;
}

}  // namespace detail
}  // namespace lora
