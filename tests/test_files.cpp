// Files on disk: byte counts that overflow.
#include <lora/io.hpp>

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

namespace fs = std::filesystem;
using Catch::Contains;
using lora::Dtype;
using lora::io_error;

// ---- byte counts ----------------------------------------------------------------------------------

TEST_CASE("shapes whose byte count overflows 64 bits are refused by the writer and the reader",
          "[files][safetensors]") {
  lora::SafetensorsWriter w;
  // 2^46 x 2^16 elements of 4 bytes: 2^64 bytes, which wrapped to 0 and matched an empty buffer.
  const std::vector<std::uint64_t> wraps{std::uint64_t{1} << 46, std::uint64_t{1} << 16};
  CHECK_THROWS_AS(w.add_raw("huge", Dtype::F32, wraps, {}), std::invalid_argument);
  CHECK_THROWS_WITH(w.add_raw("huge", Dtype::F32, wraps, {}),
                    Contains("SafetensorsWriter::add_raw") && Contains("'huge'") &&
                        Contains("[70368744177664, 65536] x F32") && Contains("overflows 64 bits"));
  // 2^63 elements of 2 bytes, at the largest dimension the reader accepts.
  CHECK_THROWS_WITH(w.add_raw("bf16", Dtype::BF16, {std::uint64_t{1} << 48, std::uint64_t{1} << 15}, {}),
                    Contains("'bf16'") && Contains("x BF16 (2 bytes)") && Contains("overflows 64 bits"));
  // The element count itself overflowing, and a dimension beyond what the reader accepts.
  CHECK_THROWS_WITH(w.add_raw("count", Dtype::U8, {std::uint64_t{1} << 40, std::uint64_t{1} << 40}, {}),
                    Contains("'count'") && Contains("overflows"));
  CHECK_THROWS_WITH(w.add_raw("dim", Dtype::U8, {0, std::uint64_t{1} << 50}, {}),
                    Contains("'dim'") && Contains("larger than 2^48"));
  CHECK(w.size() == 0);
  w.add_raw("zero", Dtype::F32, {0, std::uint64_t{1} << 48}, {});  // empty, within limits
  const std::string bytes = w.to_bytes();
  CHECK(lora::SafetensorsReader::from_memory(bytes.data(), bytes.size()).at("zero").shape[1] == std::uint64_t{1} << 48);

  // The reader: the same shape in a header.
  const std::string header = R"({"huge":{"dtype":"F32","shape":[70368744177664,65536],"data_offsets":[0,0]}})";
  std::string file(8, '\0');
  lora::detail::store_le64(reinterpret_cast<unsigned char*>(file.data()), header.size());
  file += header;
  try {
    (void)lora::SafetensorsReader::from_memory(file.data(), file.size(), "wrapping.safetensors");
    FAIL("expected an io_error");
  } catch (const io_error& e) {
    CHECK(e.tensor() == "huge");
    CHECK_THAT(e.what(), Contains("read_safetensors") && Contains("[70368744177664, 65536] x F32") &&
                             Contains("overflows 64 bits"));
  }
}

