// lora.hpp: a quantized base (lora/quant) as a safetensors file, in bitsandbytes' tensor names.
//
// One file holds any number of weights; for weight `<name>` (e.g. "encoder.fc1.weight"):
//   NF4:  <name>                    U8  [ceil(out*in/2), 1]  packed codes, first of a pair in the high nibble
//         <name>.quant_map          F32 [16]                 the NF4 levels (checked to be bitsandbytes')
//         <name>.absmax             F32 [blocks]             without double quantization
//                                   U8  [blocks]             with it: the 8-bit codes of absmax - offset
//         <name>.nested_absmax      F32 [ceil(blocks / nested_blocksize)]   double quantization only
//         <name>.nested_quant_map   F32 [256]                the dynamic map (checked), double quantization only
//   int8: <name>                    I8  [out, in]
//         <name>.absmax             F32 [out]                one absmax per row
// and in "__metadata__" (strings): <name>.quant_type ("nf4" | "int8"), <name>.shape ("out,in"), and for
// NF4 <name>.blocksize, with double quantization also <name>.nested_blocksize and <name>.nested_offset (the
// float's shortest decimal form, which reads back to the same bits). Other tensors (biases, norms) may sit
// beside them; load_quantized leaves them to SafetensorsReader.
//
// The reader checks, before reading or allocating anything, every metadata value (known format, integers
// with nothing around them, block sizes even / positive and at most 2^20, shape entries positive and at most
// 2^48, a finite offset) and every tensor's presence, dtype and exact shape against the metadata; the
// safetensors layer has already bounded each tensor by the file's size. It then rejects NaN/Inf or negative
// scales and quant maps that differ from bitsandbytes' tables. Any fault is an io_error naming the file,
// the tensor or key, and the expected and found values.
#pragma once

#include <lora/io/base_weights.hpp>
#include <lora/io/error.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/quant/quant.hpp>

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <system_error>
#include <vector>

namespace lora {

// Quantized weights by name (the name of the tensor they replace).
using QuantizedWeights = std::map<std::string, quant::QuantizedWeight>;

namespace detail {

inline constexpr std::uint64_t quantized_max_block = std::uint64_t{1} << 20;

// Sizes a QuantizedWeight's vectors must have; throws std::invalid_argument if `q` is inconsistent
// (a caller's value, not a file).
inline void check_quantized_weight(const char* where, const std::string& name, const quant::QuantizedWeight& q) {
  if (name.empty()) fail(where, "weight name is empty");
  if (q.out < 1 || q.in < 1) fail(where, "weight '", name, "': shape ", q.out, " x ", q.in, " is empty");
  const auto n = static_cast<std::size_t>(q.out * q.in);
  auto expect = [&](const char* field, std::size_t have, std::size_t want) {
    if (have != want) fail(where, "weight '", name, "': ", field, " has ", have, " entries, expected ", want);
  };
  if (q.format == quant::Format::int8) {
    expect("codes", q.codes.size(), n);
    expect("absmax", q.absmax.size(), static_cast<std::size_t>(q.out));
    return;
  }
  const Index bs = q.options.block_size;
  if (bs < 2 || bs % 2 != 0 || static_cast<std::uint64_t>(bs) > quantized_max_block)
    fail(where, "weight '", name, "': block_size must be even, >= 2 and <= ", quantized_max_block, ", got ", bs);
  expect("codes", q.codes.size(), (n + 1) / 2);
  const auto blocks = static_cast<std::size_t>(q.blocks());
  if (!q.options.double_quant) {
    expect("absmax", q.absmax.size(), blocks);
    return;
  }
  const Index nbs = q.options.absmax_block_size;
  if (nbs < 1 || static_cast<std::uint64_t>(nbs) > quantized_max_block)
    fail(where, "weight '", name, "': absmax_block_size must be in [1, ", quantized_max_block, "], got ", nbs);
  expect("qabsmax", q.qabsmax.size(), blocks);
  expect("absmax2", q.absmax2.size(), (blocks + static_cast<std::size_t>(nbs) - 1) / static_cast<std::size_t>(nbs));
  if (!std::isfinite(q.offset)) fail(where, "weight '", name, "': offset is not finite");
}

// A float32 vector (std::vector or std::array) as the writer's F32 tensor.
template <class Floats>
Eigen::Map<const Eigen::VectorXf> f32(const Floats& v) {
  return Eigen::Map<const Eigen::VectorXf>(v.data(), static_cast<Index>(v.size()));
}

inline std::string shortest_float(float v) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  return std::string(buf, r.ptr);
}

// The writer for `weights`, checked; save_quantized writes it atomically.
inline SafetensorsWriter quantized_writer(const QuantizedWeights& weights) {
  constexpr const char* where = "save_quantized";
  for (const auto& kv : weights) check_quantized_weight(where, kv.first, kv.second);
  SafetensorsWriter w;
  for (const auto& [name, q] : weights) {
    const auto out = static_cast<std::uint64_t>(q.out), in = static_cast<std::uint64_t>(q.in);
    w.set_metadata(name + ".quant_type", quant::format_name(q.format));
    w.set_metadata(name + ".shape", concat(out, ",", in));
    if (q.format == quant::Format::int8) {
      w.add_raw(name, Dtype::I8, {out, in}, {q.codes.begin(), q.codes.end()});
      w.add_vector(name + ".absmax", f32(q.absmax));
      continue;
    }
    w.set_metadata(name + ".blocksize", std::to_string(q.options.block_size));
    w.add_raw(name, Dtype::U8, {q.codes.size(), 1}, {q.codes.begin(), q.codes.end()});
    w.add_vector(name + ".quant_map", f32(quant::nf4_levels()));
    if (!q.options.double_quant) {
      w.add_vector(name + ".absmax", f32(q.absmax));
      continue;
    }
    w.set_metadata(name + ".nested_blocksize", std::to_string(q.options.absmax_block_size));
    w.set_metadata(name + ".nested_offset", shortest_float(q.offset));
    w.add_raw(name + ".absmax", Dtype::U8, {q.qabsmax.size()}, {q.qabsmax.begin(), q.qabsmax.end()});
    w.add_vector(name + ".nested_absmax", f32(q.absmax2));
    w.add_vector(name + ".nested_quant_map", f32(quant::dynamic_map()));
  }
  return w;
}

// Reads one weight's metadata and tensors, every size checked before anything is allocated.
class QuantizedWeightReader {
 public:
  QuantizedWeightReader(const SafetensorsReader& file, std::string name) : file_(file), name_(std::move(name)) {}

  quant::QuantizedWeight read() const {
    quant::QuantizedWeight q;
    const std::string type = meta(".quant_type");
    if (type == "nf4") q.format = quant::Format::nf4;
    else if (type == "int8") q.format = quant::Format::int8;
    else fail_key(".quant_type", "unknown quant_type '", type, "', expected 'nf4' or 'int8'");
    read_shape(q);
    const auto out = static_cast<std::uint64_t>(q.out), in = static_cast<std::uint64_t>(q.in);
    if (q.format == quant::Format::int8) {
      const TensorInfo& codes = tensor("", Dtype::I8, {out, in});
      const TensorInfo& absmax = tensor(".absmax", Dtype::F32, {out});
      q.codes = bytes(codes);
      q.absmax = scales(absmax);
      return q;
    }
    q.options.block_size = static_cast<Index>(meta_integer(".blocksize", 2, quantized_max_block));
    if (q.options.block_size % 2 != 0)
      fail_key(".blocksize", "blocksize must be even, found ", q.options.block_size);
    q.options.double_quant = file_.metadata_value(name_ + ".nested_blocksize").has_value();
    const std::uint64_t blocks = static_cast<std::uint64_t>(q.blocks());
    const TensorInfo& codes = tensor("", Dtype::U8, {(out * in + 1) / 2, 1});
    const TensorInfo& levels = tensor(".quant_map", Dtype::F32, {16});
    if (!q.options.double_quant) {
      const TensorInfo& absmax = tensor(".absmax", Dtype::F32, {blocks});
      check_map(levels, quant::nf4_levels().data(), "bitsandbytes' NF4 levels");
      q.codes = bytes(codes);
      q.absmax = scales(absmax);
      return q;
    }
    q.options.absmax_block_size = static_cast<Index>(meta_integer(".nested_blocksize", 1, quantized_max_block));
    q.offset = meta_float(".nested_offset");
    const std::uint64_t nbs = static_cast<std::uint64_t>(q.options.absmax_block_size);
    const TensorInfo& qabsmax = tensor(".absmax", Dtype::U8, {blocks});
    const TensorInfo& absmax2 = tensor(".nested_absmax", Dtype::F32, {(blocks + nbs - 1) / nbs});
    const TensorInfo& dynamic = tensor(".nested_quant_map", Dtype::F32, {256});
    check_map(levels, quant::nf4_levels().data(), "bitsandbytes' NF4 levels");
    check_map(dynamic, quant::dynamic_map().data(), "bitsandbytes' signed dynamic map");
    q.codes = bytes(codes);
    q.qabsmax = bytes(qabsmax);
    q.absmax2 = scales(absmax2);
    return q;
  }

 private:
  static constexpr const char* where = "load_quantized";

  template <class... Parts>
  [[noreturn]] void fail_key(const char* suffix, Parts&&... parts) const {
    io_fail(where, file_.path(), "", "__metadata__ '", name_, suffix, "': ", std::forward<Parts>(parts)...);
  }
  template <class... Parts>
  [[noreturn]] void fail_tensor(const std::string& tensor, Parts&&... parts) const {
    io_fail(where, file_.path(), tensor, std::forward<Parts>(parts)...);
  }

  std::string meta(const char* suffix) const {
    const auto v = file_.metadata_value(name_ + suffix);
    if (!v) io_fail(where, file_.path(), "", "__metadata__ '", name_, suffix, "' is missing (weight '", name_, "')");
    return *v;
  }

  static bool parse_unsigned(const std::string& s, std::uint64_t& v) {
    const char* end = s.data() + s.size();
    const auto r = std::from_chars(s.data(), end, v);
    return !s.empty() && r.ec == std::errc() && r.ptr == end;
  }

  std::uint64_t meta_integer(const char* suffix, std::uint64_t lo, std::uint64_t hi) const {
    const std::string s = meta(suffix);
    std::uint64_t v = 0;
    if (!parse_unsigned(s, v)) fail_key(suffix, "expected a non-negative integer, found '", s, "'");
    if (v < lo || v > hi) fail_key(suffix, "expected a value in [", lo, ", ", hi, "], found ", v);
    return v;
  }

  float meta_float(const char* suffix) const {
    const std::string s = meta(suffix);
    float v = 0;
    const char* end = s.data() + s.size();
    const auto r = std::from_chars(s.data(), end, v);
    if (s.empty() || r.ec != std::errc() || r.ptr != end || !std::isfinite(v))
      fail_key(suffix, "expected a finite float, found '", s, "'");
    return v;
  }

  void read_shape(quant::QuantizedWeight& q) const {
    const std::string s = meta(".shape");
    const std::size_t comma = s.find(',');
    std::uint64_t out = 0, in = 0;
    if (comma == std::string::npos || !parse_unsigned(s.substr(0, comma), out) ||
        !parse_unsigned(s.substr(comma + 1), in))
      fail_key(".shape", "expected \"out,in\" (two non-negative integers), found '", s, "'");
    if (out < 1 || in < 1 || out > safetensors_max_dim || in > safetensors_max_dim)
      fail_key(".shape", "each entry must be in [1, 2^48], found ", out, ",", in);
    std::uint64_t n = 0;
    if (__builtin_mul_overflow(out, in, &n) || n > static_cast<std::uint64_t>(std::numeric_limits<Index>::max() / 2))
      fail_key(".shape", out, " x ", in, " elements overflow");
    q.out = static_cast<Index>(out);
    q.in = static_cast<Index>(in);
  }

  const TensorInfo& tensor(const char* suffix, Dtype dtype, const std::vector<std::uint64_t>& shape) const {
    const std::string n = name_ + suffix;
    const TensorInfo* t = file_.find(n);
    if (!t)
      fail_tensor(n, "missing (weight '", name_, "' expects ", to_string(dtype), " ", shape_string(shape), ")");
    if (t->dtype != dtype) fail_tensor(n, "dtype ", to_string(t->dtype), ", expected ", to_string(dtype));
    if (t->shape != shape) fail_tensor(n, "shape ", shape_string(t->shape), ", expected ", shape_string(shape));
    return *t;
  }

  std::vector<std::uint8_t> bytes(const TensorInfo& t) const {
    std::vector<std::uint8_t> b(static_cast<std::size_t>(t.end - t.begin));
    file_.read_bytes(t, b.data(), where);
    return b;
  }

  // Finite (checked by values()) and non-negative.
  std::vector<float> scales(const TensorInfo& t) const {
    std::vector<float> v = file_.values<float>(t.name, where);
    for (std::size_t i = 0; i < v.size(); ++i)
      if (v[i] < 0) fail_tensor(t.name, "element ", i, " is ", v[i], ", expected an absmax >= 0");
    return v;
  }

  void check_map(const TensorInfo& t, const float* expected, const char* what) const {
    const std::vector<std::uint8_t> b = bytes(t);
    for (std::size_t i = 0; i < b.size() / 4; ++i) {
      const std::uint32_t u = load_le32(b.data() + 4 * i);
      float v = 0;
      std::memcpy(&v, &u, 4);
      if (std::memcmp(&v, expected + i, 4) != 0)
        fail_tensor(t.name, "element ", i, " is ", v, ", expected ", expected[i], " (", what, ")");
    }
  }

  const SafetensorsReader& file_;
  std::string name_;
};

}  // namespace detail

// Writes `weights` atomically in the layout above. Throws std::invalid_argument for an inconsistent
// weight (vector sizes, block sizes), io_error for file-system failures; nothing is written then.
inline void save_quantized(const std::string& path, const QuantizedWeights& weights) {
  detail::quantized_writer(weights).save(path);
}

// Every weight with a "<name>.quant_type" metadata key; throws io_error if there is none.
inline QuantizedWeights load_quantized(const SafetensorsReader& file) {
  static const std::string suffix = ".quant_type";
  QuantizedWeights out;
  for (const auto& kv : file.metadata()) {
    const std::string& key = kv.first;
    if (key.size() <= suffix.size() || key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    std::string name = key.substr(0, key.size() - suffix.size());
    quant::QuantizedWeight q = detail::QuantizedWeightReader(file, name).read();
    out.emplace(std::move(name), std::move(q));
  }
  if (out.empty())
    detail::io_fail("load_quantized", file.path(), "", "no quantized weight: __metadata__ has no '<name>", suffix,
                    "' key");
  return out;
}

inline QuantizedWeights load_quantized(const std::string& path) {
  return load_quantized(SafetensorsReader::open(path));
}

// Every matrix of a base (load_base_weights reads F64/F32/F16/BF16 into Scalar) quantized in `format`;
// the vectors (biases, norms) stay as they are in `base`.
template <class Scalar>
QuantizedWeights quantize_matrices(const NamedTensors<Scalar>& base, quant::Format format,
                                   const quant::Nf4Options& options = {}) {
  QuantizedWeights out;
  for (const auto& kv : base.matrices)
    out.emplace(kv.first, format == quant::Format::nf4 ? quant::quantize_nf4(kv.second, options)
                                                       : quant::quantize_int8(kv.second));
  return out;
}

}  // namespace lora
