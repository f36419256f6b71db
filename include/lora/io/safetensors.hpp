// lora.hpp: safetensors files, read with every field validated before use, written atomically.
//
// Layout: an unsigned 64-bit little-endian N, N bytes of JSON header, then the data section. The
// header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative
// to the data section) plus an optional "__metadata__" object of strings.
//
// The reader rejects, with an io_error naming the file, the tensor and the fault: a file shorter than
// 8 bytes; N above 100 MB or past the end of the file; a header that is not well-formed UTF-8 JSON or
// not of the shape above (unknown fields included); an unknown dtype; a shape whose element count x
// dtype size differs from end - begin (or overflows); a dimension above 2^48; offsets past the data
// section, overlapping, leaving holes or not covering the data section to its end; duplicate names.
// The header is parsed with a SAX handler (no document tree), so its memory is bounded by N; tensor
// buffers are allocated only after their size has been checked against the file's size.
//
// Converted to float / double on read: F64, F32, F16, BF16, F8_E4M3, F8_E5M2 (the integer and BOOL
// tensors are listed and their bytes readable with read_bytes, but not converted). Written: F64, F32,
// F16, BF16. ShardedSafetensorsReader opens a checkpoint split into shards by its index file.
#pragma once

#include <lora/common.hpp>
#include <lora/io/dtype.hpp>
#include <lora/io/error.hpp>
#include <lora/io/file.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace lora {

// One tensor of a safetensors file.
struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::F32;
  std::vector<std::uint64_t> shape;  // [] for a scalar
  std::uint64_t begin = 0, end = 0;  // byte range inside the data section

  std::uint64_t num_elements() const {
    std::uint64_t n = 1;
    for (std::uint64_t d : shape) n *= d;  // validated not to overflow
    return n;
  }
};

inline std::string shape_string(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

namespace detail {

inline constexpr std::uint64_t safetensors_max_header = 100'000'000;  // the reference implementation's cap
inline constexpr std::uint64_t safetensors_max_index = 100'000'000;   // model.safetensors.index.json
inline constexpr std::uint64_t safetensors_max_dim = std::uint64_t{1} << 48;

// OCP float8, exact in float: E4M3 "fn" (bias 7, no Inf, S.1111.111 is NaN) and E5M2 (bias 15, Inf and
// NaN as in IEEE half, of which it is the upper byte).
inline float decode_f8_e4m3(unsigned char b) {
  const int e = (b >> 3) & 15, m = b & 7;
  if (e == 15 && m == 7) return std::numeric_limits<float>::quiet_NaN();
  const float magnitude =
      e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(static_cast<float>(8 + m), e - 10);
  return (b & 0x80) ? -magnitude : magnitude;
}
inline float decode_f8_e5m2(unsigned char b) {
  const int e = (b >> 2) & 31, m = b & 3;
  if (e == 31 && m != 0) return std::numeric_limits<float>::quiet_NaN();
  const float magnitude = e == 31  ? std::numeric_limits<float>::infinity()
                          : e == 0 ? std::ldexp(static_cast<float>(m), -16)
                                   : std::ldexp(static_cast<float>(4 + m), e - 17);
  return (b & 0x80) ? -magnitude : magnitude;
}

// product(shape) x dtype size in bytes, or false if it does not fit in 64 bits (nor the element count).
inline bool checked_byte_size(Dtype dtype, const std::vector<std::uint64_t>& shape, std::uint64_t& bytes) {
  std::uint64_t count = 1;
  for (std::uint64_t d : shape)
    if (__builtin_mul_overflow(count, d, &count)) return false;
  return !__builtin_mul_overflow(count, static_cast<std::uint64_t>(dtype_size(dtype)), &bytes);
}

// Builds the tensor list from the header's JSON events; any deviation stops the parse with a message.
class SafetensorsHeaderParser : public nlohmann::json_sax<nlohmann::json> {
 public:
  std::vector<TensorInfo> tensors;
  std::vector<std::pair<std::string, std::string>> metadata;
  std::string error, error_tensor;

  bool null() override { return unexpected("null"); }
  bool boolean(bool) override { return unexpected("a boolean"); }
  bool number_integer(number_integer_t) override { return unexpected("a negative number"); }
  bool number_float(number_float_t, const string_t&) override { return unexpected("a non-integer number"); }
  bool binary(binary_t&) override { return unexpected("binary data"); }

  bool number_unsigned(number_unsigned_t v) override {
    if (state_ == State::shape_item) {
      tensors.back().shape.push_back(v);
      return true;
    }
    if (state_ == State::offsets_item) {
      if (offsets_seen_ == 0) tensors.back().begin = v;
      else if (offsets_seen_ == 1) tensors.back().end = v;
      else return fail_with("data_offsets has more than 2 entries");
      ++offsets_seen_;
      return true;
    }
    return unexpected("a number");
  }

  bool string(string_t& s) override {
    if (state_ == State::tensor_field && field_ == Field::dtype) {
      if (!parse_dtype(s, tensors.back().dtype)) return fail_with("unknown dtype '", s, "'");
      state_ = State::tensor;
      return true;
    }
    if (state_ == State::metadata) {
      metadata.back().second = s;
      return true;
    }
    return unexpected("a string");
  }

  bool start_object(std::size_t) override {
    if (state_ == State::start) {
      state_ = State::top;
      return true;
    }
    if (state_ == State::top_value) {
      if (key_ == "__metadata__") {
        state_ = State::metadata;
      } else {
        state_ = State::tensor;
        tensors.emplace_back();
        tensors.back().name = key_;
        fields_seen_ = 0;
      }
      return true;
    }
    return unexpected("an object");
  }

  bool key(string_t& k) override {
    if (state_ == State::top) {
      if (!names_.insert(k).second) {
        error_tensor = k;
        return fail_with("the name appears twice in the header");
      }
      key_ = k;
      state_ = State::top_value;
      return true;
    }
    if (state_ == State::tensor) {
      unsigned bit = 0;
      if (k == "dtype") field_ = Field::dtype, bit = 1;
      else if (k == "shape") field_ = Field::shape, bit = 2;
      else if (k == "data_offsets") field_ = Field::offsets, bit = 4;
      else return fail_with("unexpected field '", k, "' (expected dtype, shape, data_offsets)");
      if (fields_seen_ & bit) return fail_with("field '", k, "' appears twice");
      fields_seen_ |= bit;
      state_ = State::tensor_field;
      return true;
    }
    if (state_ == State::metadata) {
      for (const auto& kv : metadata)
        if (kv.first == k) return fail_with("__metadata__ key '", k, "' appears twice");
      metadata.emplace_back(k, std::string());
      return true;
    }
    return unexpected("a key");
  }

  bool end_object() override {
    if (state_ == State::tensor) {
      if (fields_seen_ != 7) {
        error_tensor = tensors.back().name;
        return fail_with("missing field(s):", (fields_seen_ & 1) ? "" : " dtype", (fields_seen_ & 2) ? "" : " shape",
                         (fields_seen_ & 4) ? "" : " data_offsets");
      }
      state_ = State::top;
      return true;
    }
    if (state_ == State::metadata) {
      state_ = State::top;
      return true;
    }
    if (state_ == State::top) {
      state_ = State::done;
      return true;
    }
    return unexpected("'}'");
  }

  bool start_array(std::size_t) override {
    if (state_ == State::tensor_field && field_ == Field::shape) {
      state_ = State::shape_item;
      return true;
    }
    if (state_ == State::tensor_field && field_ == Field::offsets) {
      state_ = State::offsets_item;
      offsets_seen_ = 0;
      return true;
    }
    return unexpected("an array");
  }

  bool end_array() override {
    if (state_ == State::shape_item) {
      state_ = State::tensor;
      return true;
    }
    if (state_ == State::offsets_item) {
      if (offsets_seen_ != 2) return fail_with("data_offsets has ", offsets_seen_, " entries, expected 2");
      state_ = State::tensor;
      return true;
    }
    return unexpected("']'");
  }

  bool parse_error(std::size_t position, const std::string&, const nlohmann::detail::exception& e) override {
    if (error.empty()) error = concat("the header is not valid JSON (byte ", position, "): ", e.what());
    return false;
  }

 private:
  enum class State { start, top, top_value, tensor, tensor_field, shape_item, offsets_item, metadata, done };
  enum class Field { dtype, shape, offsets };

  template <class... Parts>
  bool fail_with(Parts&&... parts) {
    if (error_tensor.empty() && (state_ == State::tensor || state_ == State::tensor_field ||
                                 state_ == State::shape_item || state_ == State::offsets_item))
      error_tensor = tensors.back().name;
    error = concat(std::forward<Parts>(parts)...);
    return false;
  }
  bool unexpected(const char* what) {
    switch (state_) {
      case State::start: return fail_with("the header is not a JSON object (found ", what, ")");
      case State::top_value: return fail_with("'", key_, "' must map to an object, found ", what);
      case State::tensor_field:
        return fail_with(field_ == Field::dtype ? "dtype must be a string" : "shape and data_offsets must be arrays",
                         ", found ", what);
      case State::shape_item:
      case State::offsets_item:
        return fail_with(state_ == State::shape_item ? "shape" : "data_offsets",
                         " entries must be non-negative integers, found ", what);
      case State::metadata: return fail_with("__metadata__ values must be strings, found ", what);
      default: return fail_with("unexpected ", what, " in the header");
    }
  }

  State state_ = State::start;
  Field field_ = Field::dtype;
  std::string key_;
  std::set<std::string> names_;
  unsigned fields_seen_ = 0;
  int offsets_seen_ = 0;
};
}  // namespace detail

// Reads a safetensors file or memory buffer. Construction parses and validates the whole header;
// tensors are read and converted on request. Copies share the open file.
class SafetensorsReader {
 public:
  static SafetensorsReader open(const std::string& path) {
    SafetensorsReader r;
    r.file_ = std::make_shared<const detail::ReadOnlyFile>(path, "read_safetensors");
    r.label_ = path;
    r.size_ = r.file_->size();
    r.parse();
    return r;
  }

  // Parses a copy of `size` bytes at `data`; `label` stands for the file name in messages.
  static SafetensorsReader from_memory(const void* data, std::size_t size, std::string label = "<memory>") {
    SafetensorsReader r;
    const auto* p = static_cast<const unsigned char*>(data);
    r.memory_ = std::make_shared<const std::vector<unsigned char>>(p, p + size);
    r.label_ = std::move(label);
    r.size_ = size;
    r.parse();
    return r;
  }

  const std::string& path() const { return label_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in data order
  const std::vector<std::pair<std::string, std::string>>& metadata() const { return metadata_; }
  std::optional<std::string> metadata_value(const std::string& key) const {
    for (const auto& kv : metadata_)
      if (kv.first == key) return kv.second;
    return std::nullopt;
  }

  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const TensorInfo* find(const std::string& name) const {
    const auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
  }
  const TensorInfo& at(const std::string& name, const char* where = "SafetensorsReader::at") const {
    const TensorInfo* t = find(name);
    if (!t) detail::io_fail(where, label_, name, "no such tensor in the file");
    return *t;
  }

  // The tensor's bytes as stored (little-endian), into dst[0 .. end - begin).
  void read_bytes(const TensorInfo& t, unsigned char* dst, const char* where = "SafetensorsReader::read_bytes") const {
    read_range(data_start_ + t.begin, dst, static_cast<std::size_t>(t.end - t.begin), where, t.name);
  }

  // The dtypes values(), matrix() and vector() convert to float / double.
  static bool can_convert(Dtype d) { return is_convertible(d) || d == Dtype::F8_E4M3 || d == Dtype::F8_E5M2; }

  // All elements of a tensor of any shape, converted to Scalar, in row-major order. Throws if the dtype
  // is not one of can_convert() or a value is not finite in Scalar (NaN, Inf, or an F64 beyond float's range).
  template <class Scalar>
  std::vector<Scalar> values(const std::string& name, const char* where = "SafetensorsReader::values") const {
    const TensorInfo& t = at(name, where);
    std::vector<Scalar> out(static_cast<std::size_t>(t.num_elements()));
    convert_into(t, out.data(), where);
    return out;
  }

  // A 2-D tensor [rows, cols] as a row-major matrix.
  template <class Scalar>
  Matrix<Scalar> matrix(const std::string& name, const char* where = "SafetensorsReader::matrix") const {
    const TensorInfo& t = at(name, where);
    if (t.shape.size() != 2)
      detail::io_fail(where, label_, name, "expected a 2-D tensor, found shape ", shape_string(t.shape));
    Matrix<Scalar> m(static_cast<Index>(t.shape[0]), static_cast<Index>(t.shape[1]));
    convert_into(t, m.data(), where);
    return m;
  }
  // The same, checking the shape first.
  template <class Scalar>
  Matrix<Scalar> matrix(const std::string& name, Index rows, Index cols,
                        const char* where = "SafetensorsReader::matrix") const {
    require_shape(name, {static_cast<std::uint64_t>(rows), static_cast<std::uint64_t>(cols)}, where);
    return matrix<Scalar>(name, where);
  }

  // A 1-D tensor [n].
  template <class Scalar>
  Vector<Scalar> vector(const std::string& name, const char* where = "SafetensorsReader::vector") const {
    const TensorInfo& t = at(name, where);
    if (t.shape.size() != 1)
      detail::io_fail(where, label_, name, "expected a 1-D tensor, found shape ", shape_string(t.shape));
    Vector<Scalar> v(static_cast<Index>(t.shape[0]));
    convert_into(t, v.data(), where);
    return v;
  }
  template <class Scalar>
  Vector<Scalar> vector(const std::string& name, Index n, const char* where = "SafetensorsReader::vector") const {
    require_shape(name, {static_cast<std::uint64_t>(n)}, where);
    return vector<Scalar>(name, where);
  }

  void require_shape(const std::string& name, const std::vector<std::uint64_t>& expected, const char* where) const {
    const TensorInfo& t = at(name, where);
    if (t.shape != expected)
      detail::io_fail(where, label_, name, "has shape ", shape_string(t.shape), ", expected ", shape_string(expected));
  }

 private:
  SafetensorsReader() = default;

  void read_range(std::uint64_t offset, unsigned char* dst, std::size_t n, const char* where,
                  const std::string& tensor) const {
    if (file_) {
      file_->read_at(offset, dst, n, where, tensor);
      return;
    }
    if (offset > size_ || n > size_ - offset)
      detail::io_fail(where, label_, tensor, "read of ", n, " bytes at offset ", offset, " is past the end (",
                      size_, " bytes)");
    if (n) std::memcpy(dst, memory_->data() + offset, n);
  }

  template <class Scalar>
  void convert_into(const TensorInfo& t, Scalar* dst, const char* where) const {
    static_assert(is_supported_scalar_v<Scalar>, "SafetensorsReader converts to float or double only");
    if (!can_convert(t.dtype))
      detail::io_fail(where, label_, t.name, "dtype ", to_string(t.dtype),
                      " cannot be converted to floating point (supported: F64, F32, F16, BF16, F8_E4M3, F8_E5M2;"
                      " read_bytes() gives the stored bytes)");
    const std::size_t esize = dtype_size(t.dtype);
    const std::size_t total = static_cast<std::size_t>(t.num_elements());
    constexpr std::size_t chunk_elems = std::size_t{1} << 16;
    std::vector<unsigned char> buffer(std::min(total, chunk_elems) * esize);
    for (std::size_t done = 0; done < total;) {
      const std::size_t n = std::min(chunk_elems, total - done);
      read_range(data_start_ + t.begin + done * esize, buffer.data(), n * esize, where, t.name);
      if (t.dtype == Dtype::F8_E4M3 || t.dtype == Dtype::F8_E5M2) {
        const bool e4m3 = t.dtype == Dtype::F8_E4M3;
        for (std::size_t i = 0; i < n; ++i)
          dst[done + i] =
              static_cast<Scalar>(e4m3 ? detail::decode_f8_e4m3(buffer[i]) : detail::decode_f8_e5m2(buffer[i]));
      } else {
        detail::decode(t.dtype, buffer.data(), n, dst + done);
      }
      for (std::size_t i = 0; i < n; ++i)
        if (!std::isfinite(dst[done + i]))
          detail::io_fail(where, label_, t.name, "element ", done + i, " is NaN or Inf",
                          std::is_same_v<Scalar, float> && t.dtype == Dtype::F64 ? " (or beyond float's range)" : "");
      done += n;
    }
  }

  void parse() {
    constexpr const char* where = "read_safetensors";
    if (size_ < 8) detail::io_fail(where, label_, "", "the file has ", size_, " bytes, fewer than the 8 of the header length");
    unsigned char n8[8];
    read_range(0, n8, 8, where, "");
    const std::uint64_t n = detail::load_le64(n8);
    if (n > detail::safetensors_max_header)
      detail::io_fail(where, label_, "", "header length ", n, " exceeds the limit of ", detail::safetensors_max_header,
                      " bytes");
    if (n > size_ - 8)
      detail::io_fail(where, label_, "", "header length ", n, " is larger than the rest of the file (", size_ - 8,
                      " bytes)");
    std::string header(static_cast<std::size_t>(n), '\0');
    if (n) read_range(8, reinterpret_cast<unsigned char*>(header.data()), header.size(), where, "");

    detail::SafetensorsHeaderParser sax;
    bool ok = false;
    try {
      ok = nlohmann::json::sax_parse(header, &sax, nlohmann::json::input_format_t::json, true);
    } catch (const nlohmann::json::exception& e) {  // defensive: the SAX interface reports errors itself
      if (sax.error.empty()) sax.error = detail::concat("the header is not valid JSON: ", e.what());
      ok = false;
    }
    if (!ok) detail::io_fail(where, label_, sax.error_tensor, sax.error.empty() ? "invalid header" : sax.error);

    data_start_ = 8 + n;
    const std::uint64_t data_size = size_ - data_start_;
    for (const TensorInfo& t : sax.tensors) {
      for (std::uint64_t d : t.shape)
        if (d > detail::safetensors_max_dim)
          detail::io_fail(where, label_, t.name, "dimension ", d, " in shape ", shape_string(t.shape),
                          " is larger than 2^48");
      std::uint64_t bytes = 0;
      if (!detail::checked_byte_size(t.dtype, t.shape, bytes))
        detail::io_fail(where, label_, t.name, "shape ", shape_string(t.shape), " x ", to_string(t.dtype), " (",
                        dtype_size(t.dtype), " bytes): the byte count overflows 64 bits");
      if constexpr (sizeof(std::size_t) < sizeof(std::uint64_t))
        if (bytes > std::numeric_limits<std::size_t>::max())
          detail::io_fail(where, label_, t.name, "shape ", shape_string(t.shape), " x ", to_string(t.dtype), " needs ",
                          bytes, " bytes, more than this platform can address");
      if (t.end < t.begin)
        detail::io_fail(where, label_, t.name, "data_offsets [", t.begin, ", ", t.end, "] end before they begin");
      if (t.end - t.begin != bytes)
        detail::io_fail(where, label_, t.name, "shape ", shape_string(t.shape), " x ", to_string(t.dtype), " (",
                        dtype_size(t.dtype), " bytes) needs ", bytes, " bytes, but data_offsets [", t.begin, ", ",
                        t.end, "] span ", t.end - t.begin);
      if (t.end > data_size)
        detail::io_fail(where, label_, t.name, "data_offsets [", t.begin, ", ", t.end,
                        "] reach past the end of the data section (", data_size, " bytes)");
    }
    tensors_ = std::move(sax.tensors);
    std::stable_sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t expected = 0;
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const TensorInfo& t = tensors_[i];
      if (t.begin < expected)
        detail::io_fail(where, label_, t.name, "data_offsets [", t.begin, ", ", t.end, "] overlap tensor '",
                        tensors_[i - 1].name, "'");
      if (t.begin > expected)
        detail::io_fail(where, label_, t.name, "data_offsets [", t.begin, ", ", t.end, "] leave a hole of ",
                        t.begin - expected, " bytes before the tensor");
      expected = t.end;
      index_.emplace(t.name, i);
    }
    if (expected != data_size)
      detail::io_fail(where, label_, "", "the data section has ", data_size, " bytes but the tensors cover ", expected);
    metadata_ = std::move(sax.metadata);
  }

  std::shared_ptr<const detail::ReadOnlyFile> file_;
  std::shared_ptr<const std::vector<unsigned char>> memory_;
  std::string label_;
  std::uint64_t size_ = 0, data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::size_t> index_;
  std::vector<std::pair<std::string, std::string>> metadata_;
};

// Collects tensors (converted and copied when added) and writes them as one safetensors file. Tensors
// are laid out by decreasing element size, then name, so every tensor is aligned to its element size
// (the reference writer's order); the header is padded with spaces to a multiple of 8 bytes.
// "__metadata__" starts as {"format": "pt"}.
class SafetensorsWriter {
 public:
  SafetensorsWriter() { metadata_.emplace_back("format", "pt"); }

  // A matrix as a 2-D tensor [rows, cols].
  template <class Derived>
  void add(const std::string& name, const Eigen::MatrixBase<Derived>& m, Dtype dtype = Dtype::F32) {
    add_values(name, {static_cast<std::uint64_t>(m.rows()), static_cast<std::uint64_t>(m.cols())}, m, dtype);
  }
  // A vector (either orientation) as a 1-D tensor [n].
  template <class Derived>
  void add_vector(const std::string& name, const Eigen::MatrixBase<Derived>& v, Dtype dtype = Dtype::F32) {
    if (v.rows() != 1 && v.cols() != 1)
      detail::fail("SafetensorsWriter::add_vector", "tensor '", name, "' has shape ", detail::shape_of(v),
                   ", expected a vector");
    add_values(name, {static_cast<std::uint64_t>(v.size())}, v, dtype);
  }
  // Stored bytes of any dtype and shape (byte count checked against the shape).
  void add_raw(const std::string& name, Dtype dtype, std::vector<std::uint64_t> shape, std::vector<unsigned char> bytes) {
    constexpr const char* where = "SafetensorsWriter::add_raw";
    const std::uint64_t needed = checked_size(where, name, dtype, shape);
    if (needed != bytes.size())
      detail::fail(where, "tensor '", name, "': ", bytes.size(), " bytes given, shape ", shape_string(shape), " x ",
                   to_string(dtype), " needs ", needed);
    push(where, {name, dtype, std::move(shape), std::move(bytes)});
  }

  void set_metadata(const std::string& key, const std::string& value) {
    for (auto& kv : metadata_)
      if (kv.first == key) {
        kv.second = value;
        return;
      }
    metadata_.emplace_back(key, value);
  }

  std::size_t size() const { return entries_.size(); }

  // The whole file in memory.
  std::string to_bytes() const {
    std::string out;
    write_to([&](const void* p, std::size_t n) { out.append(static_cast<const char*>(p), n); });
    return out;
  }

  // Writes `path` atomically (see AtomicFileWriter).
  void save(const std::string& path) const {
    detail::AtomicFileWriter file(path, "SafetensorsWriter::save");
    write_to(file);
    file.commit();
  }
  // Writes into an open atomic writer (for several files published together).
  void write_to(detail::AtomicFileWriter& file) const {
    write_to([&](const void* p, std::size_t n) { file.write(p, n); });
  }

  template <class Sink>
  void write_to(Sink&& sink) const {
    std::vector<const Entry*> order;
    for (const Entry& e : entries_) order.push_back(&e);
    std::stable_sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
      const std::size_t sa = dtype_size(a->dtype), sb = dtype_size(b->dtype);
      return sa != sb ? sa > sb : a->name < b->name;
    });
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) {
      nlohmann::ordered_json meta = nlohmann::ordered_json::object();
      for (const auto& kv : metadata_) meta[kv.first] = kv.second;
      header["__metadata__"] = std::move(meta);
    }
    std::uint64_t offset = 0;
    for (const Entry* e : order) {
      const std::uint64_t end = offset + e->bytes.size();
      header[e->name] = {{"dtype", to_string(e->dtype)}, {"shape", e->shape}, {"data_offsets", {offset, end}}};
      offset = end;
    }
    std::string text;
    try {
      text = header.dump();
    } catch (const nlohmann::json::exception& e) {
      detail::fail("SafetensorsWriter", "cannot encode the header (names must be valid UTF-8): ", e.what());
    }
    text.append((8 - text.size() % 8) % 8, ' ');
    unsigned char n8[8];
    detail::store_le64(n8, text.size());
    sink(n8, 8);
    sink(text.data(), text.size());
    for (const Entry* e : order)
      if (!e->bytes.empty()) sink(e->bytes.data(), e->bytes.size());
  }

 private:
  struct Entry {
    std::string name;
    Dtype dtype;
    std::vector<std::uint64_t> shape;
    std::vector<unsigned char> bytes;
  };

  template <class Derived>
  void add_values(const std::string& name, std::vector<std::uint64_t> shape, const Eigen::MatrixBase<Derived>& m,
                  Dtype dtype) {
    constexpr const char* where = "SafetensorsWriter::add";
    using Scalar = typename Derived::Scalar;
    static_assert(is_supported_scalar_v<Scalar>, "SafetensorsWriter::add takes float or double matrices");
    if (!is_convertible(dtype))
      detail::fail(where, "tensor '", name, "': dtype ", to_string(dtype), " is not one of F64, F32, F16, BF16");
    const std::uint64_t needed = checked_size(where, name, dtype, shape);
    const Matrix<Scalar> values = m;  // row-major, evaluated
    if (!values.allFinite()) detail::fail(where, "tensor '", name, "' contains NaN or Inf");
    std::vector<unsigned char> bytes(static_cast<std::size_t>(needed));
    if (!detail::encode(dtype, values.data(), static_cast<std::size_t>(values.size()), bytes.data()))
      detail::fail(where, "tensor '", name, "' has values beyond the range of ", to_string(dtype),
                   " (max |x| = ", values.cwiseAbs().maxCoeff(), ")");
    push(where, {name, dtype, std::move(shape), std::move(bytes)});
  }

  // The byte size of a tensor to be written; the limits are the reader's, so that every file written
  // here reads back.
  static std::uint64_t checked_size(const char* where, const std::string& name, Dtype dtype,
                                    const std::vector<std::uint64_t>& shape) {
    for (std::uint64_t d : shape)
      if (d > detail::safetensors_max_dim)
        detail::fail(where, "tensor '", name, "': dimension ", d, " in shape ", shape_string(shape),
                     " is larger than 2^48");
    std::uint64_t bytes = 0;
    if (!detail::checked_byte_size(dtype, shape, bytes))
      detail::fail(where, "tensor '", name, "': shape ", shape_string(shape), " x ", to_string(dtype), " (",
                   dtype_size(dtype), " bytes): the byte count overflows 64 bits");
    if constexpr (sizeof(std::size_t) < sizeof(std::uint64_t))
      if (bytes > std::numeric_limits<std::size_t>::max())
        detail::fail(where, "tensor '", name, "': shape ", shape_string(shape), " x ", to_string(dtype), " needs ",
                     bytes, " bytes, more than this platform can address");
    return bytes;
  }

  void push(const char* where, Entry e) {
    if (e.name.empty()) detail::fail(where, "tensor name is empty");
    if (e.name == "__metadata__") detail::fail(where, "'__metadata__' is reserved");
    for (const Entry& x : entries_)
      if (x.name == e.name) detail::fail(where, "tensor '", e.name, "' added twice");
    entries_.push_back(std::move(e));
  }

  std::vector<Entry> entries_;
  std::vector<std::pair<std::string, std::string>> metadata_;
};

// A checkpoint split into shards, as transformers and huggingface_hub write it: the index file
// (model.safetensors.index.json: {"metadata": {"total_size": bytes, ...}, "weight_map": {tensor: shard}})
// beside the shard files. open() reads the index and opens every shard it names (each validated as by
// SafetensorsReader); it throws io_error for a shard name that is not a plain file name of that
// directory, a missing shard, a mapped tensor absent from its shard, or a shard holding a tensor the map
// does not send to it.
class ShardedSafetensorsReader {
 public:
  static ShardedSafetensorsReader open(const std::string& index_path) {
    constexpr const char* where = "ShardedSafetensorsReader::open";
    const std::string text = detail::read_small_file(index_path, detail::safetensors_max_index, where);
    nlohmann::json index;
    try {
      index = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      detail::io_fail(where, index_path, "", "not valid JSON: ", e.what());
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      detail::io_fail(where, index_path, "", "expected an object with a \"weight_map\" object");
    ShardedSafetensorsReader r;
    r.path_ = index_path;
    if (index.contains("metadata")) {
      const nlohmann::json& meta = index["metadata"];
      if (!meta.is_object()) detail::io_fail(where, index_path, "", "\"metadata\" is not an object");
      if (meta.contains("total_size")) {
        if (!meta["total_size"].is_number_unsigned())
          detail::io_fail(where, index_path, "", "metadata.total_size is not a non-negative integer");
        r.total_size_ = meta["total_size"].get<std::uint64_t>();
      }
    }
    const std::filesystem::path dir = std::filesystem::path(index_path).parent_path();
    for (const auto& kv : index["weight_map"].items()) {
      if (!kv.value().is_string()) detail::io_fail(where, index_path, kv.key(), "the shard name is not a string");
      const std::string shard = kv.value().get<std::string>();
      // A plain name: the index must not send the reader outside its directory.
      if (shard.empty() || shard == "." || shard == ".." || shard.find('/') != std::string::npos)
        detail::io_fail(where, index_path, kv.key(), "shard '", shard, "' is not a file name in the index's directory");
      r.weight_map_.emplace(kv.key(), shard);
      if (!r.shards_.count(shard)) r.shards_.emplace(shard, SafetensorsReader::open((dir / shard).string()));
    }
    for (const auto& kv : r.weight_map_)
      if (!r.shards_.at(kv.second).contains(kv.first))
        detail::io_fail(where, r.shards_.at(kv.second).path(), kv.first, "mapped to this shard by ", index_path,
                        ", but not in it");
    for (const auto& shard : r.shards_)
      for (const TensorInfo& t : shard.second.tensors()) {
        const auto it = r.weight_map_.find(t.name);
        if (it == r.weight_map_.end() || it->second != shard.first)
          detail::io_fail(where, shard.second.path(), t.name, "in this shard, but ", index_path,
                          it == r.weight_map_.end() ? " does not list it" : " maps it to " + it->second);
      }
    return r;
  }

  const std::string& path() const { return path_; }                                     // the index file
  const std::map<std::string, std::string>& weight_map() const { return weight_map_; }  // tensor -> shard
  const std::map<std::string, SafetensorsReader>& shards() const { return shards_; }    // shard -> reader
  std::optional<std::uint64_t> total_size() const { return total_size_; }               // as the index states it

  // The shard holding `tensor`.
  const SafetensorsReader& shard_of(const std::string& tensor,
                                    const char* where = "ShardedSafetensorsReader::shard_of") const {
    const auto it = weight_map_.find(tensor);
    if (it == weight_map_.end()) detail::io_fail(where, path_, tensor, "no such tensor in the index");
    return shards_.at(it->second);
  }
  const TensorInfo& at(const std::string& tensor) const { return shard_of(tensor).at(tensor); }
  template <class Scalar>
  std::vector<Scalar> values(const std::string& tensor) const {
    return shard_of(tensor).template values<Scalar>(tensor);
  }

 private:
  std::string path_;
  std::map<std::string, std::string> weight_map_;
  std::map<std::string, SafetensorsReader> shards_;
  std::optional<std::uint64_t> total_size_;
};

}  // namespace lora
