// Safetensors files, dtype conversions, PEFT adapter directories, hardened loading, atomic saving, and
// interoperability with fixtures written by an independent writer and a PyTorch reference.
#include <lora/io.hpp>

#include "instances.hpp"
#include "temp_files.hpp"

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <fstream>
#include <sstream>

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

namespace fs = std::filesystem;
using lora::Dtype;
using lora::io_error;

using lora::testing::TempDir;
using lora::testing::listing;
using lora::testing::read_file;
using lora::testing::write_file;

namespace {

const std::string data_dir = std::string(LORA_TEST_DATA_DIR) + "/io";


// The message of the io_error `f` throws (fails the test if it throws anything else or nothing).
template <class F>
std::string io_error_of(F&& f) {
  try {
    f();
  } catch (const io_error& e) {
    return e.what();
  }
  FAIL("expected an io_error");
  return "";
}

// Sets the atomic writer's hook for one scope.
struct HookGuard {
  explicit HookGuard(lora::detail::AtomicWriteHook h) { lora::detail::atomic_write_hook() = h; }
  ~HookGuard() { lora::detail::atomic_write_hook() = nullptr; }
};

// A model view of LoRA layers and saved modules, set member by member (a view may have other members).
template <class Scalar>
lora::LoraModelView<Scalar> make_view(std::vector<lora::LoraModuleRef<Scalar>> layers,
                                      std::vector<lora::SavedModuleRef<Scalar>> saved = {}) {
  lora::LoraModelView<Scalar> view;
  view.lora_modules = std::move(layers);
  view.saved_modules = std::move(saved);
  return view;
}

template <class Scalar>
lora::LoraConfig random_config(int rank, double alpha, std::uint64_t seed) {
  lora::LoraConfig c;
  c.rank = rank;
  c.alpha = alpha;
  c.init = lora::InitMethod::random;  // B != 0: a real adapter
  c.seed = seed;
  return c;
}

// A toy model: two LoRA layers and a head in modules_to_save.
template <class Scalar>
struct Toy {
  using M = lora::Matrix<Scalar>;
  using V = lora::Vector<Scalar>;
  lora::LoraLinear<Scalar> fc1, fc2;
  M head;
  V head_bias;
  Toy(int in, int hidden, int out, int classes, const lora::LoraConfig& c1, const lora::LoraConfig& c2,
      unsigned seed = 1)
      : fc1((std::srand(seed), M::Random(hidden, in)), V::Random(hidden), c1),
        fc2(M::Random(out, hidden), c2),
        head(M::Random(classes, out)),
        head_bias(V::Random(classes)) {}
  lora::LoraModelView<Scalar> view() {
    return make_view<Scalar>({{"encoder.fc1", &fc1}, {"encoder.fc2", &fc2}},
                             {{"classifier", lora::param_ref(head), lora::param_ref(head_bias)}});
  }
};

}  // namespace

// ---- dtype conversions -----------------------------------------------------------------------------

// The exact value of a binary16 / bfloat16 bit pattern, from the IEEE definition.
static double half_value(std::uint16_t bits, int exp_bits, int man_bits) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const int e = (bits >> man_bits) & ((1 << exp_bits) - 1);
  const int m = bits & ((1 << man_bits) - 1);
  const double sign = (bits >> 15) ? -1.0 : 1.0;
  if (e == (1 << exp_bits) - 1) return m ? std::nan("") : sign * INFINITY;
  if (e == 0) return sign * std::ldexp(m, 1 - bias - man_bits);
  return sign * std::ldexp(m + (1 << man_bits), e - bias - man_bits);
}

TEST_CASE("F16 and BF16 decode exactly and encode with round-to-nearest-even", "[io][dtype]") {
  for (const Dtype dt : {Dtype::F16, Dtype::BF16}) {
    const int exp_bits = dt == Dtype::F16 ? 5 : 8, man_bits = dt == Dtype::F16 ? 10 : 7;
    INFO(lora::to_string(dt));
    std::vector<double> value(65536);
    for (std::uint32_t b = 0; b < 65536; ++b) {
      unsigned char raw[8] = {};  // decode() could read 8 bytes for other dtypes
      lora::detail::store_le16(raw, static_cast<std::uint16_t>(b));
      double d = 0;
      float f = 0;
      lora::detail::decode(dt, raw, 1, &d);
      lora::detail::decode(dt, raw, 1, &f);
      value[b] = half_value(static_cast<std::uint16_t>(b), exp_bits, man_bits);
      if (std::isnan(value[b])) {
        REQUIRE(std::isnan(d));
        continue;
      }
      REQUIRE(d == value[b]);
      REQUIRE(static_cast<double>(f) == value[b]);
      // Every representable value encodes to itself (also from float), except that -0 keeps its sign.
      unsigned char back[8] = {};
      REQUIRE(lora::detail::encode(dt, &d, 1, back) == std::isfinite(d));
      REQUIRE(lora::detail::load_le16(back) == b);
      REQUIRE(lora::detail::encode(dt, &f, 1, back) == std::isfinite(f));
      REQUIRE(lora::detail::load_le16(back) == b);
    }
    // Between consecutive positive finite values: the midpoint goes to the even pattern, anything
    // above or below it (by far less than a float ulp: the double-rounding trap) to the nearer one.
    const std::uint32_t max_finite = dt == Dtype::F16 ? 0x7bff : 0x7f7f;
    for (std::uint32_t b = 0; b < max_finite; ++b) {
      const double lo = value[b], hi = value[b + 1], mid = lo + (hi - lo) / 2;
      const double nudge = std::ldexp(hi - lo, -30);
      auto enc = [&](double x) {
        unsigned char out[8] = {};
        lora::detail::encode(dt, &x, 1, out);
        return lora::detail::load_le16(out);
      };
      REQUIRE(enc(mid) == ((b & 1) ? b + 1 : b));
      REQUIRE(enc(mid + nudge) == b + 1);
      REQUIRE(enc(mid - nudge) == b);
      REQUIRE(enc(-(mid + nudge)) == ((b + 1) | 0x8000));
    }
  }
}

TEST_CASE("values beyond a 16-bit range are refused on save", "[io][dtype]") {
  lora::SafetensorsWriter w;
  lora::Matrix<float> m(1, 2);
  m << 1.0f, 70000.0f;
  CHECK_THROWS_WITH(w.add("big", m, Dtype::F16), Catch::Contains("beyond the range of F16"));
  w.add("big", m, Dtype::BF16);  // fits bfloat16
  m(0, 1) = NAN;
  CHECK_THROWS_WITH(w.add("nan", m, Dtype::F32), Catch::Contains("NaN or Inf"));
  const lora::Matrix<double> huge = lora::Matrix<double>::Constant(1, 1, 1e300);
  CHECK_THROWS_WITH(w.add("huge", huge, Dtype::F32), Catch::Contains("beyond the range of F32"));
}

// ---- safetensors: the independent writer's files -------------------------------------------------

TEMPLATE_TEST_CASE("reads every dtype of a file written by an independent writer", "[io][safetensors]", float,
                   double) {
  const auto file = lora::SafetensorsReader::open(data_dir + "/dtypes.safetensors");
  std::ifstream in(data_dir + "/dtypes_expected.json");
  const nlohmann::json expected = nlohmann::json::parse(in);
  for (const std::string name : {"m_f64", "m_f32", "m_f16", "m_bf16"}) {
    INFO(name);
    const lora::Matrix<TestType> m = file.matrix<TestType>(name, 3, 5);
    const auto& values = expected.at(name);
    for (lora::Index i = 0; i < m.size(); ++i) {
      const auto want = static_cast<TestType>(values[static_cast<std::size_t>(i)].get<double>());
      REQUIRE(m.data()[i] == want);
      REQUIRE(std::signbit(m.data()[i]) == std::signbit(want));  // -0.0 stays -0.0
    }
  }
  const lora::Vector<TestType> v = file.vector<TestType>("v_f32", 5);
  CHECK(v(0) == TestType(-2));
  CHECK(v(4) == TestType(2));
  CHECK(file.values<TestType>("scalar") == std::vector<TestType>{TestType(3.25)});
  CHECK(file.at("scalar").shape.empty());
  CHECK(file.matrix<TestType>("empty").rows() == 0);
  CHECK(file.metadata_value("format") == std::string("pt"));
  CHECK(file.metadata_value("note") == std::string("fixture"));
  CHECK(file.at("ints").dtype == Dtype::I64);
  CHECK_THROWS_WITH(file.matrix<TestType>("ints"), Catch::Contains("dtypes.safetensors") &&
                                                       Catch::Contains("'ints'") && Catch::Contains("I64"));
  CHECK_THROWS_WITH(file.matrix<TestType>("v_f32"), Catch::Contains("expected a 2-D tensor"));
  CHECK_THROWS_WITH(file.matrix<TestType>("m_f32", 5, 3), Catch::Contains("has shape [3, 5], expected [5, 3]"));
  CHECK_THROWS_WITH(file.matrix<TestType>("nope"), Catch::Contains("no such tensor"));
}

TEST_CASE("the writer's bytes equal the independent writer's, correctly rounded from double", "[io][safetensors]") {
  const auto file = lora::SafetensorsReader::open(data_dir + "/dtypes.safetensors");
  const lora::Matrix<double> src = file.matrix<double>("m_f64");
  for (const auto& [name, dtype] : std::vector<std::pair<std::string, Dtype>>{
           {"m_f64", Dtype::F64}, {"m_f32", Dtype::F32}, {"m_f16", Dtype::F16}, {"m_bf16", Dtype::BF16}}) {
    INFO(name);
    lora::SafetensorsWriter w;
    w.add("x", src, dtype);
    const std::string bytes = w.to_bytes();
    const auto mine = lora::SafetensorsReader::from_memory(bytes.data(), bytes.size());
    std::vector<unsigned char> a(mine.at("x").end - mine.at("x").begin), b(a.size());
    REQUIRE(file.at(name).end - file.at(name).begin == a.size());
    mine.read_bytes(mine.at("x"), a.data());
    file.read_bytes(file.at(name), b.data());
    CHECK(a == b);
  }
}

TEMPLATE_TEST_CASE("safetensors round trips are exact", "[io][safetensors]", float, double) {
  using M = lora::Matrix<TestType>;
  TempDir dir;
  std::srand(7);
  const M a = M::Random(5, 7), b = M::Random(3, 1);
  const lora::Vector<TestType> v = lora::Vector<TestType>::Random(9);
  const Dtype native = std::is_same_v<TestType, float> ? Dtype::F32 : Dtype::F64;
  lora::SafetensorsWriter w;
  w.add("a", a, native);
  w.add("b.weight", b, native);
  w.add_vector("v", v, native);
  w.add("h", a, Dtype::F16);
  w.set_metadata("k", "v");
  w.save(dir / "t.safetensors");
  CHECK(listing(dir.path) == std::vector<std::string>{"t.safetensors"});  // no temporary left

  const auto r = lora::SafetensorsReader::open(dir / "t.safetensors");
  CHECK(r.matrix<TestType>("a") == a);
  CHECK(r.matrix<TestType>("b.weight") == b);
  CHECK(r.vector<TestType>("v") == v);
  CHECK(r.at("v").shape == std::vector<std::uint64_t>{9});
  CHECK(r.metadata_value("format") == std::string("pt"));
  CHECK(r.metadata_value("k") == std::string("v"));
  // F16: loading and saving again reproduces the same bytes.
  lora::SafetensorsWriter again;
  again.add("h", r.matrix<TestType>("h"), Dtype::F16);
  const std::string bytes = again.to_bytes();
  const auto r2 = lora::SafetensorsReader::from_memory(bytes.data(), bytes.size());
  CHECK(r2.matrix<TestType>("h") == r.matrix<TestType>("h"));
  // Layout: header padded to 8 bytes, every tensor aligned to its element size.
  const std::string file = read_file(dir / "t.safetensors");
  CHECK(lora::detail::load_le64(reinterpret_cast<const unsigned char*>(file.data())) % 8 == 0);
  for (const auto& t : r.tensors()) CHECK(t.begin % lora::dtype_size(t.dtype) == 0);
}

TEST_CASE("the writer refuses bad names", "[io][safetensors]") {
  lora::SafetensorsWriter w;
  const lora::Matrix<float> m = lora::Matrix<float>::Ones(1, 1);
  w.add("x", m);
  CHECK_THROWS_WITH(w.add("x", m), Catch::Contains("added twice"));
  CHECK_THROWS_WITH(w.add("", m), Catch::Contains("empty"));
  CHECK_THROWS_WITH(w.add("__metadata__", m), Catch::Contains("reserved"));
  w.add("\xff", m);
  CHECK_THROWS_AS(w.to_bytes(), std::invalid_argument);
}

// ---- hardened reading ------------------------------------------------------------------------------

TEST_CASE("every malformed fixture is an io_error naming the file, the tensor and the fault", "[io][hardening]") {
  const std::vector<std::tuple<std::string, std::string, std::string>> cases = {
      // file, tensor named (or ""), words of the message
      {"short", "", "fewer than the 8"},
      {"truncated", "b", "past the end of the data section"},
      {"header_past_end", "", "larger than the rest of the file"},
      {"header_huge", "", "exceeds the limit of 100000000"},
      {"not_json", "", "not valid JSON"},
      {"not_object", "", "not a JSON object"},
      {"bad_utf8", "", "not valid JSON"},
      {"unknown_dtype", "a", "unknown dtype 'F7'"},
      {"size_mismatch", "a", "needs 24 bytes, but data_offsets [0, 16] span 16"},
      {"overlap", "b", "overlap tensor 'a'"},
      {"hole", "b", "leave a hole of 4 bytes"},
      {"trailing", "", "the data section has 16 bytes but the tensors cover 8"},
      {"past_data", "b", "past the end of the data section"},
      {"reversed", "a", "end before they begin"},
      {"duplicate", "a", "appears twice"},
      {"negative_dim", "a", "non-negative integers, found a negative number"},
      {"float_dim", "a", "non-negative integers, found a non-integer"},
      {"overflow", "a", "overflows"},
      {"missing_field", "a", "missing field(s): data_offsets"},
      {"extra_field", "a", "unexpected field 'extra'"},
      {"three_offsets", "a", "more than 2 entries"},
      {"metadata_not_string", "", "__metadata__ values must be strings"},
  };
  for (const auto& [name, tensor, words] : cases) {
    INFO(name);
    const std::string path = data_dir + "/bad/" + name + ".safetensors";
    try {
      lora::SafetensorsReader::open(path);
      FAIL("no exception");
    } catch (const io_error& e) {
      CHECK(e.file() == path);
      CHECK(e.tensor() == tensor);
      CHECK_THAT(e.what(), Catch::Contains(path) && Catch::Contains(words));
    }
    // The same bytes from memory give the same verdict.
    const std::string bytes = read_file(path);
    CHECK_THROWS_AS(lora::SafetensorsReader::from_memory(bytes.data(), bytes.size()), io_error);
  }
  // A valid file with a NaN: the header is fine, the conversion refuses it.
  const auto nan = lora::SafetensorsReader::open(data_dir + "/bad/nan.safetensors");
  CHECK_THROWS_WITH(nan.vector<float>("a"), Catch::Contains("'a'") && Catch::Contains("element 1 is NaN or Inf"));
  // Not a regular file (a directory; a FIFO without a writer, which must not block), missing file.
  CHECK_THROWS_WITH(lora::SafetensorsReader::open(data_dir), Catch::Contains("not a regular file"));
  TempDir dir;
  REQUIRE(::mkfifo((dir / "fifo").c_str(), 0600) == 0);
  CHECK_THROWS_WITH(lora::SafetensorsReader::open(dir / "fifo"), Catch::Contains("not a regular file"));
  CHECK_THROWS_WITH(lora::SafetensorsReader::open(data_dir + "/missing"), Catch::Contains("cannot open"));
}

namespace {
// Parses and converts everything; only io_error may escape.
void parse_everything(const std::string& bytes) {
  try {
    const auto r = lora::SafetensorsReader::from_memory(bytes.data(), bytes.size());
    for (const auto& t : r.tensors())
      if (lora::is_convertible(t.dtype)) (void)r.values<double>(t.name);
  } catch (const io_error&) {
  }
}
}  // namespace

TEST_CASE("truncations, header-length changes and bit flips never escape as anything but io_error",
          "[io][hardening]") {
  lora::SafetensorsWriter w;
  std::srand(3);
  w.add("base_model.model.fc.lora_A.weight", lora::Matrix<float>::Random(2, 5));
  w.add("base_model.model.fc.lora_B.weight", lora::Matrix<float>::Random(4, 2), Dtype::F16);
  w.add_vector("bias", lora::Vector<double>::Random(4), Dtype::F64);
  const std::string good = w.to_bytes();
  const auto ok = lora::SafetensorsReader::from_memory(good.data(), good.size());
  REQUIRE(ok.tensors().size() == 3);

  for (std::size_t n = 0; n < good.size(); ++n)  // every proper prefix is invalid
    CHECK_THROWS_AS(lora::SafetensorsReader::from_memory(good.data(), n), io_error);
  const std::uint64_t header = lora::detail::load_le64(reinterpret_cast<const unsigned char*>(good.data()));
  for (std::uint64_t n : {std::uint64_t{0}, header - 1, header + 1, header + 8, std::uint64_t{1} << 40,
                          ~std::uint64_t{0}}) {
    std::string bad = good;
    lora::detail::store_le64(reinterpret_cast<unsigned char*>(bad.data()), n);
    CHECK_THROWS_AS(lora::SafetensorsReader::from_memory(bad.data(), bad.size()), io_error);
  }
  int parsed = 0;
  for (std::size_t byte = 0; byte < good.size(); ++byte)
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = good;
      bad[byte] = static_cast<char>(bad[byte] ^ (1 << bit));
      REQUIRE_NOTHROW(parse_everything(bad));
      ++parsed;
    }
  CHECK(parsed == static_cast<int>(8 * good.size()));
}

// ---- PEFT config and its patterns ------------------------------------------------------------------

TEST_CASE("PEFT pattern keys and target_modules regexes match as Python's re does", "[io][pattern]") {
  using lora::detail::Pattern;
  CHECK(Pattern::peft_key("fc2").matches("encoder.fc2"));
  CHECK(Pattern::peft_key("fc2").matches("fc2"));
  CHECK_FALSE(Pattern::peft_key("fc2").matches("encoder.fc22"));
  CHECK_FALSE(Pattern::peft_key("fc2").matches("encoder.xfc2"));
  CHECK(Pattern::peft_key("layers.0.q").matches("model.layers.0.q"));
  CHECK(Pattern::peft_key("experts.*.w1").matches("model.experts.3.w1"));
  CHECK(Pattern::peft_key("^fc2").matches("fc2"));
  CHECK_FALSE(Pattern::peft_key("^fc2").matches("a.fc2"));
  CHECK(Pattern::peft_key("fc2$").matches("a.fc2"));
  CHECK(Pattern::full(R"(encoder\.fc[12])").matches("encoder.fc1"));
  CHECK_FALSE(Pattern::full(R"(encoder\.fc[12])").matches("encoder.fc3"));
  CHECK_FALSE(Pattern::full(R"(encoder\.fc[12])").matches("xencoder.fc1"));
  CHECK(Pattern::full(R"(.*\.(q|v)_proj)").matches("model.layers.11.self_attn.v_proj"));
  CHECK_FALSE(Pattern::full(R"(.*\.(q|v)_proj)").matches("model.layers.11.self_attn.k_proj"));
  CHECK(Pattern::full(R"(layers\.\d{1,2}\.[^.]+)").matches("layers.12.fc"));
  CHECK_FALSE(Pattern::full(R"(layers\.\d{1,2}\.[^.]+)").matches("layers.123.fc"));
  CHECK(Pattern::full("a{2,}b?").matches("aaaa"));
  CHECK_FALSE(Pattern::full("a+?").matches(""));  // lazy a+ still needs one a
  CHECK(Pattern::full("(?:ab)*").matches("abab"));
  CHECK(Pattern::full("x{y}").matches("x{y}"));  // not a count: literal braces, as in Python
  CHECK(Pattern::full("[]a]+").matches("]a]"));
  for (const char* bad : {"(?=x)", R"(\b)", "a**", "(", "[a", "a{1001}", R"((a)\1)", "(?P<n>x)", "*", "a)", "x^"}) {
    INFO(bad);
    CHECK_THROWS_AS(Pattern::full(bad), std::invalid_argument);
  }
  // Linear time: these take exponential time in a backtracking engine.
  const std::string as(20000, 'a');
  CHECK_FALSE(Pattern::full("(a*)*b").matches(as));
  CHECK_FALSE(Pattern::full("(a|aa)*c").matches(as));
  CHECK(Pattern::full("(a|aa)*").matches(as));
  CHECK_THROWS_WITH(Pattern::full("(((a{30}){30}){30})"), Catch::Contains("size limit"));
}

TEST_CASE("adapter_config.json: fields, defaults and faults", "[io][config]") {
  const auto a = lora::PeftLoraConfig::load(data_dir + "/peft/adapter_a/adapter_config.json");
  CHECK(a.r == 4);
  CHECK(a.lora_alpha == 8);
  CHECK(a.use_rslora);
  CHECK(a.lora_dropout == 0.1);
  CHECK(a.rank_for("encoder.fc1") == 4);
  CHECK(a.rank_for("encoder.fc2") == 2);
  CHECK(a.alpha_for("encoder.fc2") == 3);
  CHECK(a.lora_config_for("encoder.fc1").scaling() == 4.0);
  CHECK(a.targets("encoder.fc1") == true);
  CHECK(a.targets("classifier") == false);
  CHECK(a.saves_module("classifier"));
  CHECK(a.task_type == std::string("SEQ_CLS"));
  const auto b = lora::PeftLoraConfig::load(data_dir + "/peft/adapter_b/adapter_config.json");
  CHECK(b.target_modules_regex == std::string(R"(encoder\.fc[12])"));
  CHECK(b.targets("encoder.fc2") == true);
  CHECK(b.targets("classifier") == false);

  // The smallest config PEFT accepts; PEFT's defaults fill the rest.
  const auto m = lora::PeftLoraConfig::parse(R"({"peft_type": "LORA", "target_modules": ["q"]})");
  CHECK(m.r == 8);
  CHECK(m.lora_alpha == 8);
  CHECK(m.bias == "none");
  // A round trip through our writer.
  const auto again = lora::PeftLoraConfig::parse(a.dump());
  CHECK(again.to_json() == a.to_json());

  const std::vector<std::pair<std::string, std::string>> faults = {
      {"[1]", "not a JSON object"},
      {"{", "not valid JSON"},
      {R"({"peft_type": "IA3"})", "only LORA"},
      {R"({"r": 0})", "field 'r'"},
      {R"({"r": 2.5})", "field 'r'"},
      {R"({"lora_alpha": "8"})", "field 'lora_alpha'"},
      {R"({"lora_alpha": -1})", "field 'lora_alpha'"},
      {R"({"lora_dropout": 1.0})", "field 'lora_dropout'"},
      {R"({"use_rslora": "yes"})", "field 'use_rslora'"},
      {R"({"use_dora": true})", "DoRA"},
      {R"({"lora_bias": true})", "LoRA-B biases"},
      {R"({"bias": "some"})", "field 'bias'"},
      {R"({"target_modules": [1]})", "field 'target_modules'"},
      {R"j({"target_modules": "(?=x)"})j", "target_modules"},
      {R"({"rank_pattern": {"fc": 0}})", "rank_pattern['fc']"},
      {R"({"rank_pattern": {"(a": 2}})", "rank_pattern"},
      {R"({"alpha_pattern": {"fc": null}})", "alpha_pattern['fc']"},
      {R"({"modules_to_save": "head"})", "field 'modules_to_save'"},
  };
  for (const auto& [text, words] : faults) {
    const std::string& json = text;  // a structured binding cannot be captured in C++17
    INFO(json);
    CHECK_THAT(io_error_of([&] { lora::PeftLoraConfig::parse(json, "cfg.json"); }),
               Catch::Contains("cfg.json") && Catch::Contains(words));
  }
}

TEST_CASE("adapter_config.json: PEFT's layer selection fields", "[io][config]") {
  using Names = std::vector<std::string>;
  const auto a = lora::PeftLoraConfig::parse(
      R"({"target_modules": ["q", "v"], "layers_to_transform": 1, "layers_pattern": "h", "exclude_modules": ["v"]})");
  CHECK(a.layers_to_transform == std::vector<int>{1});
  CHECK(a.layers_pattern == Names{"h"});
  CHECK(a.exclude_modules == Names{"v"});
  CHECK(a.targets("t.h.1.q") == true);
  CHECK(a.targets("t.h.1.v") == false);  // excluded
  CHECK(a.targets("t.h.2.q") == false);  // another layer
  CHECK(a.targets("t.blocks.1.q") == false);  // no "h" component before the index
  const auto b = lora::PeftLoraConfig::parse(
      R"({"target_modules": ["q"], "layers_to_transform": [0, 2], "layers_pattern": ["layers", "h"],
          "exclude_modules": ".*\\.2\\.q"})");
  CHECK(b.layers_to_transform == std::vector<int>{0, 2});
  CHECK(b.exclude_modules_regex == std::string(R"(.*\.2\.q)"));
  CHECK(b.targets("m.layers.0.q") == true);
  CHECK(b.targets("m.h.0.q") == true);
  CHECK(b.targets("m.layers.2.q") == false);
  CHECK(b.targets("m.layers.1.q") == false);
  // PEFT writes nulls and empty lists for "unused".
  const auto c = lora::PeftLoraConfig::parse(
      R"({"target_modules": ["q"], "layers_to_transform": [], "layers_pattern": [], "exclude_modules": null})");
  CHECK(c.layers_to_transform.empty());
  CHECK(c.targets("q") == true);
  // They survive a round trip through our writer and the conversion to the model-level settings.
  CHECK(lora::PeftLoraConfig::parse(b.dump()).to_json() == b.to_json());
  const lora::nn::LoraInjectConfig inject = b.to_inject_config();
  CHECK(inject.layers_pattern == Names{"layers", "h"});
  CHECK(inject.exclude_regex == R"(.*\.2\.q)");
  CHECK(lora::PeftLoraConfig::from_inject_config(inject).to_json() == b.to_json());

  const std::vector<std::pair<std::string, std::string>> faults = {
      {R"({"target_modules": ["q"], "layers_to_transform": "1"})", "field 'layers_to_transform'"},
      {R"({"target_modules": ["q"], "layers_to_transform": [1.5]})", "field 'layers_to_transform'"},
      {R"({"target_modules": ["q"], "layers_to_transform": [-1]})", "field 'layers_to_transform'"},
      {R"({"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": 3})", "field 'layers_pattern'"},
      {R"j({"target_modules": ["q"], "layers_to_transform": [0], "layers_pattern": "(?P<x>h)"})j", "layers_pattern"},
      {R"({"target_modules": ["q"], "exclude_modules": 3})", "field 'exclude_modules'"},
      {R"j({"target_modules": ["q"], "exclude_modules": "(?!x)"})j", "exclude_modules"},
      {R"({"target_modules": ".*q", "layers_to_transform": [0]})", "layers_to_transform cannot be used with a string"},
      {R"({"target_modules": ".*q", "layers_to_transform": [0], "layers_pattern": "h"})", "layers_to_transform"},
      {R"({"target_modules": ".*q", "layers_pattern": "h"})", "layers_pattern cannot be used with a string"},
  };
  for (const auto& [text, words] : faults) {
    const std::string& json = text;  // a structured binding cannot be captured in C++17
    INFO(json);
    CHECK_THAT(io_error_of([&] { lora::PeftLoraConfig::parse(json, "cfg.json"); }),
               Catch::Contains("cfg.json") && Catch::Contains(words));
  }
}

// ---- adapter directories ---------------------------------------------------------------------------

TEMPLATE_TEST_CASE("an adapter directory round-trips exactly, per-module ranks and alphas included", "[io][adapter]",
                   float, double) {
  TempDir dir;
  Toy<TestType> src(6, 8, 7, 3, random_config<TestType>(4, 16, 1), random_config<TestType>(2, 3, 2));
  const std::string out = dir / "adapter";
  lora::AdapterSaveOptions opts;
  opts.dtype = std::is_same_v<TestType, float> ? Dtype::F32 : Dtype::F64;
  opts.task_type = "SEQ_CLS";
  lora::save_adapter(out, src.view(), "default", opts);
  CHECK(listing(out) == std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"});

  const auto config = lora::read_adapter_config(out);
  CHECK(config.r == 4);  // ties go to the first module's values
  CHECK(config.rank_pattern == std::vector<std::pair<std::string, int>>{{"encoder.fc2", 2}});
  CHECK(config.alpha_pattern == std::vector<std::pair<std::string, double>>{{"encoder.fc2", 3.0}});
  CHECK(config.modules_to_save == std::vector<std::string>{"classifier"});
  CHECK(config.target_modules == std::vector<std::string>{"encoder.fc1", "encoder.fc2"});
  const auto weights = lora::SafetensorsReader::open(out + "/adapter_model.safetensors");
  CHECK(weights.metadata_value("format") == std::string("pt"));
  CHECK(weights.at("base_model.model.encoder.fc1.lora_A.weight").shape == std::vector<std::uint64_t>{4, 6});
  CHECK(weights.at("base_model.model.encoder.fc1.lora_B.weight").shape == std::vector<std::uint64_t>{8, 4});
  CHECK(weights.contains("base_model.model.classifier.weight"));
  CHECK(weights.contains("base_model.model.classifier.bias"));
  CHECK(weights.tensors().size() == 6);

  Toy<TestType> dst(6, 8, 7, 3, random_config<TestType>(1, 1, 9), random_config<TestType>(1, 1, 9), 2);
  lora::load_adapter(out, dst.view(), "loaded");
  CHECK(dst.fc1.A("loaded") == src.fc1.A());
  CHECK(dst.fc1.B("loaded") == src.fc1.B());
  CHECK(dst.fc2.A("loaded") == src.fc2.A());
  CHECK(dst.fc2.B("loaded") == src.fc2.B());
  CHECK(dst.head == src.head);
  CHECK(dst.head_bias == src.head_bias);
  CHECK(dst.fc1.scaling("loaded") == src.fc1.scaling());
  CHECK(dst.fc2.scaling("loaded") == src.fc2.scaling());
  CHECK(dst.fc2.rank("loaded") == 2);
  CHECK(dst.fc1.active_adapters() == std::vector<std::string>{"default"});  // loaded inactive

  // Saving what was loaded reproduces the file byte for byte.
  lora::save_adapter(dir / "again", dst.view(), "loaded", opts);
  CHECK(read_file(dir / "again/adapter_model.safetensors") == read_file(out + "/adapter_model.safetensors"));

  // F16 / BF16 on request: loaded values are the rounded ones.
  for (const Dtype dt : {Dtype::F16, Dtype::BF16}) {
    lora::AdapterSaveOptions half;
    half.dtype = dt;
    lora::save_adapter(dir / "half", src.view(), "default", half);
    const auto hw = lora::SafetensorsReader::open(dir / "half/adapter_model.safetensors");
    CHECK(hw.at("base_model.model.encoder.fc1.lora_A.weight").dtype == dt);
    Toy<TestType> h(6, 8, 7, 3, random_config<TestType>(1, 1, 9), random_config<TestType>(1, 1, 9), 2);
    lora::load_adapter(dir / "half", h.view(), "h");
    const double tol = dt == Dtype::F16 ? 1e-3 : 8e-3;
    CHECK((h.fc1.A("h") - src.fc1.A()).cwiseAbs().maxCoeff() <= tol * src.fc1.A().cwiseAbs().maxCoeff());
  }
}

TEST_CASE("rsLoRA and a trained layer bias are saved and honoured", "[io][adapter]") {
  TempDir dir;
  auto c = random_config<double>(4, 6, 5);
  c.use_rslora = true;
  c.bias = lora::BiasMode::lora_only;
  lora::LoraLineard a(lora::Matrix<double>::Random(5, 6), lora::Vector<double>::Random(5), c);
  a.bias_mut().setConstant(0.25);
  auto va = make_view<double>({{"fc", &a}});
  lora::save_adapter(dir / "ad", va);
  const auto config = lora::read_adapter_config(dir / "ad");
  CHECK(config.use_rslora);
  CHECK(config.bias == "lora_only");
  CHECK(lora::SafetensorsReader::open(dir / "ad/adapter_model.safetensors").contains("base_model.model.fc.base_layer.bias"));

  lora::LoraLineard b(lora::Matrix<double>::Random(5, 6), lora::Vector<double>::Zero(5), c);
  auto vb = make_view<double>({{"fc", &b}});
  lora::load_adapter(dir / "ad", vb, "default", lora::AdapterLoadMode::replace);
  CHECK(b.scaling("default") == 6.0 / 2.0);
  CHECK(b.bias() == a.bias());
  CHECK(b.A() == a.A().cast<float>().cast<double>());  // saved as F32 (the default)
  // A frozen bias cannot take the file's bias.
  lora::LoraLineard frozen(lora::Matrix<double>::Random(5, 6), lora::Vector<double>::Zero(5), random_config<double>(1, 1, 1));
  auto vf = make_view<double>({{"fc", &frozen}});
  CHECK_THAT(io_error_of([&] { lora::load_adapter(dir / "ad", vf, "x"); }),
             Catch::Contains("base_layer.bias") && Catch::Contains("no trainable bias"));
  CHECK_FALSE(frozen.has_adapter("x"));
}

TEST_CASE("save_adapter keeps pattern keys unambiguous", "[io][adapter]") {
  // Module "fc" is a dotted suffix of "block.fc": its key must not capture the longer path.
  TempDir dir;
  std::srand(4);
  lora::LoraLineard fc(lora::Matrix<double>::Random(6, 6), random_config<double>(2, 2, 1));
  lora::LoraLineard block_fc(lora::Matrix<double>::Random(6, 6), random_config<double>(4, 4, 2));
  lora::LoraLineard other(lora::Matrix<double>::Random(6, 6), random_config<double>(4, 4, 3));
  lora::LoraLineard plain(lora::Matrix<double>::Random(6, 6), random_config<double>(4, 4, 4));
  plain.delete_adapter("default");
  plain.add_adapter("other", random_config<double>(1, 1, 1));
  auto v = make_view<double>({{"fc", &fc}, {"block.fc", &block_fc}, {"other", &other}, {"x.other", &plain}});
  lora::save_adapter(dir / "ad", v);
  const auto config = lora::read_adapter_config(dir / "ad");
  CHECK(config.rank_for("fc") == 2);
  CHECK(config.rank_for("block.fc") == 4);
  // "other" as a list entry would also target "x.other" (no adapter there): a regex is written instead.
  REQUIRE(config.target_modules_regex.has_value());
  CHECK(config.targets("other") == true);
  CHECK(config.targets("x.other") == false);
  lora::LoraLineard fc2(lora::Matrix<double>::Random(6, 6), random_config<double>(1, 1, 1));
  lora::LoraLineard block_fc2(lora::Matrix<double>::Random(6, 6), random_config<double>(1, 1, 1));
  lora::LoraLineard other2(lora::Matrix<double>::Random(6, 6), random_config<double>(1, 1, 1));
  auto v2 = make_view<double>({{"fc", &fc2}, {"block.fc", &block_fc2}, {"other", &other2}, {"x.other", &plain}});
  lora::load_adapter(dir / "ad", v2, "y");
  CHECK(fc2.rank("y") == 2);
  CHECK(block_fc2.rank("y") == 4);
  CHECK_FALSE(plain.has_adapter("y"));
}

namespace {
// Writes an adapter directory from raw pieces, for the fault cases.
void write_adapter(const std::string& dir, const lora::SafetensorsWriter& w, const std::string& config) {
  fs::create_directories(dir);
  w.save(dir + "/adapter_model.safetensors");
  write_file(dir + "/adapter_config.json", config);
}
}  // namespace

TEST_CASE("adapter faults name the file, the tensor and the problem, and change nothing", "[io][adapter][hardening]") {
  TempDir dir;
  using M = lora::Matrix<float>;
  std::srand(11);
  const M A1 = M::Random(4, 6), B1 = M::Random(8, 4), A2 = M::Random(2, 8), B2 = M::Random(7, 2);
  const M head = M::Random(3, 7);
  const lora::Vector<float> hb = lora::Vector<float>::Random(3);
  const std::string cfg =
      R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": {"fc2": 2},
          "target_modules": ["fc1", "fc2"], "modules_to_save": ["classifier"]})";
  const std::string p = "base_model.model.encoder.";
  struct Case {
    std::string name, tensor, words;
    std::function<void(lora::SafetensorsWriter&)> extra;
    std::vector<std::string> skip;
    std::string config;
  };
  auto all = [&](lora::SafetensorsWriter& w, const std::vector<std::string>& skip) {
    auto add = [&](const std::string& n, const M& m) {
      if (std::find(skip.begin(), skip.end(), n) == skip.end()) w.add(n, m);
    };
    add(p + "fc1.lora_A.weight", A1);
    add(p + "fc1.lora_B.weight", B1);
    add(p + "fc2.lora_A.weight", A2);
    add(p + "fc2.lora_B.weight", B2);
    add("base_model.model.classifier.weight", head);
    if (std::find(skip.begin(), skip.end(), "base_model.model.classifier.bias") == skip.end())
      w.add_vector("base_model.model.classifier.bias", hb);
  };
  const std::vector<Case> cases = {
      {"missing_B", p + "fc1.lora_B.weight", "missing, while", {}, {p + "fc1.lora_B.weight"}, cfg},
      {"missing_module", p + "fc2.lora_A.weight", "matched by target_modules", {},
       {p + "fc2.lora_A.weight", p + "fc2.lora_B.weight"}, cfg},
      {"missing_head", "base_model.model.classifier.weight", "modules_to_save", {},
       {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}, cfg},
      {"missing_head_bias", "base_model.model.classifier.bias", "has a bias", {}, {"base_model.model.classifier.bias"},
       cfg},
      {"extra", "base_model.model.encoder.fc3.lora_A.weight", "unexpected tensor",
       [&](lora::SafetensorsWriter& w) { w.add("base_model.model.encoder.fc3.lora_A.weight", A1); }, {}, cfg},
      {"no_prefix", "fc1.lora_A.weight", "start with 'base_model.model.'",
       [&](lora::SafetensorsWriter& w) { w.add("fc1.lora_A.weight", A1); }, {}, cfg},
      {"dora", p + "fc1.lora_magnitude_vector", "DoRA",
       [&](lora::SafetensorsWriter& w) { w.add_vector(p + "fc1.lora_magnitude_vector", hb); }, {}, cfg},
      {"wrong_in", p + "fc1.lora_A.weight", "expected [4, 6]",
       [&](lora::SafetensorsWriter& w) { w.add(p + "fc1.lora_A.weight", M::Random(4, 5)); }, {p + "fc1.lora_A.weight"},
       cfg},
      {"wrong_out", p + "fc2.lora_B.weight", "expected [7, 2] (out_features 7",
       [&](lora::SafetensorsWriter& w) { w.add(p + "fc2.lora_B.weight", M::Random(6, 2)); }, {p + "fc2.lora_B.weight"},
       cfg},
      {"rank_vs_config", p + "fc2.lora_A.weight", "rank 4 from the config's r",
       {}, {}, R"({"peft_type": "LORA", "r": 4, "target_modules": ["fc1", "fc2"], "modules_to_save": ["classifier"]})"},
      {"wrong_head", "base_model.model.classifier.weight", "expected [3, 7]",
       [&](lora::SafetensorsWriter& w) { w.add("base_model.model.classifier.weight", M::Random(7, 3)); },
       {"base_model.model.classifier.weight"}, cfg},
      {"vector_as_A", p + "fc1.lora_A.weight", "does not match module",
       [&](lora::SafetensorsWriter& w) { w.add_vector(p + "fc1.lora_A.weight", lora::Vector<float>::Random(24)); },
       {p + "fc1.lora_A.weight"}, cfg},
  };
  for (const Case& c : cases) {
    INFO(c.name);
    lora::SafetensorsWriter w;
    all(w, c.skip);
    if (c.extra) c.extra(w);
    const std::string ad = dir / c.name;
    write_adapter(ad, w, c.config);
    Toy<float> model(6, 8, 7, 3, random_config<float>(1, 1, 1), random_config<float>(1, 1, 1));
    const M head_before = model.head;
    try {
      lora::load_adapter(ad, model.view(), "x");
      FAIL("no exception");
    } catch (const io_error& e) {
      CHECK(e.file() == ad + "/adapter_model.safetensors");
      CHECK(e.tensor() == c.tensor);
      CHECK_THAT(e.what(), Catch::Contains(c.words));
    }
    CHECK_FALSE(model.fc1.has_adapter("x"));
    CHECK_FALSE(model.fc2.has_adapter("x"));
    CHECK(model.head == head_before);
  }
  // The well-formed version loads.
  lora::SafetensorsWriter w;
  all(w, {});
  write_adapter(dir / "good", w, cfg);
  Toy<float> model(6, 8, 7, 3, random_config<float>(1, 1, 1), random_config<float>(1, 1, 1));
  lora::load_adapter(dir / "good", model.view(), "x");
  CHECK(model.fc2.A("x") == A2);
  // Name clashes, merged layers: usage errors.
  CHECK_THROWS_WITH(lora::load_adapter(dir / "good", model.view(), "x"), Catch::Contains("already has an adapter"));
  model.fc1.merge();
  CHECK_THROWS_WITH(lora::load_adapter(dir / "good", model.view(), "z"), Catch::Contains("merged"));
  model.fc1.unmerge();
  // A missing config, a corrupt config.
  fs::remove(dir / "good/adapter_config.json");
  CHECK_THAT(io_error_of([&] { lora::load_adapter(dir / "good", model.view(), "z"); }),
             Catch::Contains("adapter_config.json") && Catch::Contains("cannot open"));
  write_file(dir / "good/adapter_config.json", "{\"r\": ");
  CHECK_THAT(io_error_of([&] { lora::load_adapter(dir / "good", model.view(), "z"); }),
             Catch::Contains("not valid JSON"));
  CHECK_FALSE(model.fc1.has_adapter("z"));
}

TEST_CASE("hot swap replaces an adapter's weights in place without touching the base", "[io][adapter]") {
  TempDir dir;
  lora::AdapterSaveOptions f64;
  f64.dtype = Dtype::F64;
  Toy<double> a(6, 8, 7, 3, random_config<double>(4, 8, 1), random_config<double>(2, 4, 2));
  lora::save_adapter(dir / "v1", a.view(), "default", f64);
  Toy<double> b(6, 8, 7, 3, random_config<double>(4, 8, 3), random_config<double>(2, 4, 4));
  lora::save_adapter(dir / "v2", b.view(), "default", f64);

  Toy<double> m(6, 8, 7, 3, random_config<double>(1, 1, 9), random_config<double>(1, 1, 9));
  lora::load_adapter(dir / "v1", m.view(), "task");
  lora::set_active_adapters(m.view(), {"task"});
  lora::set_adapter_scale(m.view(), "task", 0.5);
  const lora::Matrix<double> W0 = m.fc1.base_weight();
  const double* A_storage = m.fc1.A("task").data();
  lora::hot_swap_adapter(dir / "v2", m.view(), "task");
  CHECK(m.fc1.A("task") == b.fc1.A());
  CHECK(m.fc2.B("task") == b.fc2.B());
  CHECK(m.fc1.A("task").data() == A_storage);  // in place
  CHECK(m.fc1.base_weight() == W0);
  CHECK(m.fc1.active_adapters() == std::vector<std::string>{"task"});
  CHECK(m.fc1.adapter_scale("task") == 0.5);
  // A different rank: replaced, still active, same scale.
  Toy<double> c(6, 8, 7, 3, random_config<double>(3, 8, 5), random_config<double>(2, 4, 6));
  lora::save_adapter(dir / "v3", c.view(), "default", f64);
  lora::hot_swap_adapter(dir / "v3", m.view(), "task");
  CHECK(m.fc1.rank("task") == 3);
  CHECK(m.fc1.A("task") == c.fc1.A());
  CHECK(m.fc1.base_weight() == W0);
  CHECK(m.fc1.active_adapters() == std::vector<std::string>{"task"});
  CHECK(m.fc1.adapter_scale("task") == 0.5);
  CHECK_THROWS_WITH(lora::hot_swap_adapter(dir / "v3", m.view(), "nope"), Catch::Contains("no adapter 'nope'"));
}

// ---- atomic saving -----------------------------------------------------------------------------------

namespace {
int kill_pipe = -1;
void pause_midway(const std::string&, std::uint64_t) {
  const char c = 'x';
  if (::write(kill_pipe, &c, 1) != 1) ::_exit(3);
  for (;;) ::pause();
}
void fail_midway(const std::string&, std::uint64_t) { throw std::runtime_error("simulated write failure"); }
}  // namespace

TEST_CASE("a writer killed midway leaves the previous adapter intact and loadable", "[io][atomic]") {
  TempDir dir;
  const std::string ad = dir / "adapter";
  lora::Matrix<float> W = lora::Matrix<float>::Random(64, 64);
  lora::LoraLinearf old_layer(W, random_config<float>(4, 8, 1));
  auto old_view = make_view<float>({{"fc", &old_layer}});
  lora::save_adapter(ad, old_view);
  const std::string old_weights = read_file(ad + "/adapter_model.safetensors");
  const std::string old_config = read_file(ad + "/adapter_config.json");

  // The new adapter is 4 MB: the writer is paused after its first 1 MB block reaches the disk.
  lora::LoraLinearf big(lora::Matrix<float>::Random(1024, 1024), random_config<float>(512, 8, 2));
  auto big_view = make_view<float>({{"fc", &big}});
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::close(fds[0]);
    kill_pipe = fds[1];
    lora::detail::atomic_write_hook() = pause_midway;
    try {
      lora::save_adapter(ad, big_view);
    } catch (...) {
    }
    ::_exit(2);  // not reached: the hook never returns
  }
  ::close(fds[1]);
  char c = 0;
  REQUIRE(::read(fds[0], &c, 1) == 1);  // the child is inside the write
  ::close(fds[0]);
  const std::vector<std::string> during = listing(ad), during_parent = listing(dir.path);
  REQUIRE(::kill(pid, SIGKILL) == 0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFSIGNALED(status));
  CHECK(WTERMSIG(status) == SIGKILL);

  // The new files were being written beside the directory, which still held the old ones.
  CHECK(during == std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"});
  REQUIRE(during_parent.size() == 2);
  CHECK(during_parent[0].rfind(".adapter.lora-new.", 0) == 0);
  CHECK(read_file(ad + "/adapter_model.safetensors") == old_weights);
  CHECK(read_file(ad + "/adapter_config.json") == old_config);
  lora::LoraLinearf fresh(W, random_config<float>(1, 1, 3));
  auto fresh_view = make_view<float>({{"fc", &fresh}});
  lora::load_adapter(ad, fresh_view, "restored");
  CHECK(fresh.A("restored") == old_layer.A());
  CHECK(fresh.B("restored") == old_layer.B());
  // A killed process leaves its sibling directory (.adapter.lora-new.*); it does not disturb loading, and
  // the next save removes it.
  lora::save_adapter(ad, big_view);
  CHECK(listing(dir.path) == std::vector<std::string>{"adapter"});
  lora::LoraLinearf big_again(lora::Matrix<float>::Zero(1024, 1024), random_config<float>(1, 1, 3));
  auto big_again_view = make_view<float>({{"fc", &big_again}});
  lora::load_adapter(ad, big_again_view, "big_one");
  CHECK(big_again.B("big_one") == big.B());
}

TEST_CASE("a save that fails midway leaves the old files and no temporary file", "[io][atomic]") {
  TempDir dir;
  const std::string ad = dir / "adapter";
  lora::LoraLinearf layer(lora::Matrix<float>::Random(32, 32), random_config<float>(4, 8, 1));
  auto view = make_view<float>({{"fc", &layer}});
  lora::save_adapter(ad, view);
  const std::string before = read_file(ad + "/adapter_model.safetensors");
  lora::LoraLinearf big(lora::Matrix<float>::Random(1024, 1024), random_config<float>(300, 8, 2));
  auto big_view = make_view<float>({{"fc", &big}});
  {
    HookGuard guard(fail_midway);
    CHECK_THROWS_WITH(lora::save_adapter(ad, big_view), "simulated write failure");
  }
  CHECK(listing(ad) == std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"});
  CHECK(listing(dir.path) == std::vector<std::string>{"adapter"});
  CHECK(read_file(ad + "/adapter_model.safetensors") == before);
  // Values that cannot be written fail before any file is touched.
  big.B().set(0, 0, NAN);
  CHECK_THROWS_WITH(lora::save_adapter(ad, big_view), Catch::Contains("NaN or Inf"));
  CHECK(listing(ad) == std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"});
  CHECK_THROWS_WITH(lora::save_adapter(ad, view, "nope"), Catch::Contains("no module has an adapter named 'nope'"));
  // An unwritable place is an io_error.
  CHECK_THROWS_AS(lora::save_adapter("/proc/lora_cannot_write_here", view), io_error);
}

// ---- base weights ------------------------------------------------------------------------------------

TEST_CASE("base weights round-trip and load from the independent writer's file", "[io][base]") {
  TempDir dir;
  lora::NamedTensors<float> w;
  w.matrices["encoder.fc1.weight"] = lora::Matrix<float>::Random(8, 6);
  w.vectors["encoder.fc1.bias"] = lora::Vector<float>::Random(8);
  lora::save_base_weights(dir / "base.safetensors", w);
  const auto back = lora::load_base_weights<float>(dir / "base.safetensors");
  CHECK(back.matrices.at("encoder.fc1.weight") == w.matrices.at("encoder.fc1.weight"));
  CHECK(back.vectors.at("encoder.fc1.bias") == w.vectors.at("encoder.fc1.bias"));
  w.vectors["encoder.fc1.weight"] = lora::Vector<float>::Random(2);
  CHECK_THROWS_WITH(lora::save_base_weights(dir / "dup.safetensors", w), Catch::Contains("added twice"));

  const auto toy = lora::load_base_weights<double>(data_dir + "/peft/base_model.safetensors");
  CHECK(toy.matrices.size() == 3);
  CHECK(toy.vectors.size() == 3);
  CHECK(toy.matrices.at("encoder.fc2.weight").rows() == 7);
  CHECK_THROWS_WITH(lora::load_base_weights<double>(data_dir + "/dtypes.safetensors"),
                    Catch::Contains("'scalar'") && Catch::Contains("neither 1-D nor 2-D"));
}

// ---- interoperability with PyTorch / PEFT ------------------------------------------------------------

TEST_CASE("adapters written outside this library give PyTorch's PEFT-way outputs", "[io][interop]") {
  using M = lora::Matrix<double>;
  const std::string peft = data_dir + "/peft";
  const auto base = lora::load_base_weights<double>(peft + "/base_model.safetensors");
  const auto c = random_config<double>(1, 1, 1);
  lora::LoraLineard fc1(base.matrices.at("encoder.fc1.weight"), base.vectors.at("encoder.fc1.bias"), c);
  lora::LoraLineard fc2(base.matrices.at("encoder.fc2.weight"), base.vectors.at("encoder.fc2.bias"), c);
  M head = base.matrices.at("classifier.weight");
  lora::Vector<double> head_bias = base.vectors.at("classifier.bias");
  const M base_head = head;
  const lora::Vector<double> base_head_bias = head_bias;
  auto model = make_view<double>({{"encoder.fc1", &fc1}, {"encoder.fc2", &fc2}},
                                 {{"classifier", lora::param_ref(head), lora::param_ref(head_bias)}});
  const auto config_a = lora::load_adapter(peft + "/adapter_a", model, "a");
  CHECK(config_a.use_rslora);
  lora::load_adapter(peft + "/adapter_b", model, "b");  // F16 weights, no modules_to_save
  CHECK(fc1.rank("a") == 4);
  CHECK(fc2.rank("a") == 2);  // rank_pattern
  CHECK(fc1.scaling("a") == 8.0 / 2.0);
  CHECK(fc2.scaling("a") == 3.0 / std::sqrt(2.0));  // alpha_pattern, rsLoRA
  CHECK(fc1.scaling("b") == 2.0);

  const auto ref = lora::SafetensorsReader::open(peft + "/reference.safetensors");
  const M X = ref.matrix<double>("X");
  fc1.eval();
  fc2.eval();
  auto encoder = [&](const std::vector<std::string>& names) {
    lora::set_active_adapters(model, names);
    const M h = fc1.forward(X).cwiseMax(0.0);
    return M(fc2.forward(h).cwiseMax(0.0));
  };
  auto rel = [](const M& a, const M& b) { return (a - b).norm() / b.norm(); };
  const M Y_a = (encoder({"a"}) * head.transpose()).rowwise() + head_bias.transpose();
  const M Y_b = (encoder({"b"}) * base_head.transpose()).rowwise() + base_head_bias.transpose();
  CHECK(rel(Y_a, ref.matrix<double>("Y_a")) < 1e-12);
  CHECK(rel(Y_b, ref.matrix<double>("Y_b")) < 1e-12);
  CHECK(rel(encoder({"a", "b"}), ref.matrix<double>("H_ab")) < 1e-12);
  CHECK(rel(encoder({}), ref.matrix<double>("H_base")) < 1e-12);

  // Mixed batch: rows a, b, base, a, b through both layers.
  const lora::MixedBatchPlan plan({"a", "b", "__base__", "a", "b"});
  lora::MixedBatchForward<double> mixed;
  const M h = mixed.forward(fc1, X, plan).cwiseMax(0.0);
  const M H_mixed = mixed.forward(fc2, h, plan).cwiseMax(0.0);
  CHECK(rel(H_mixed, ref.matrix<double>("H_mixed")) < 1e-12);
  CHECK(ref.metadata_value("rows") == std::string("a,b,__base__,a,b"));

  // Merged, the same outputs.
  lora::set_active_adapters(model, {"a"});
  lora::merge_adapters(model);
  const M Y_merged = (M(fc2.forward(M(fc1.forward(X).cwiseMax(0.0))).cwiseMax(0.0)) * head.transpose()).rowwise() +
                     head_bias.transpose();
  CHECK(rel(Y_merged, ref.matrix<double>("Y_a")) < 1e-12);
  lora::unmerge_adapters(model);
}

// ---- Hugging Face checkpoint directories ---------------------------------------------------------------

namespace {

// config.json as transformers' save_pretrained writes it for a BertForSequenceClassification (every size
// differs from Hugging Face's default, so that a field read into the wrong member shows).
nlohmann::json hf_bert_config() {
  return nlohmann::json::parse(R"({
    "_name_or_path": "tiny-bert",
    "architectures": ["BertForSequenceClassification"],
    "attention_probs_dropout_prob": 0.15,
    "classifier_dropout": null,
    "gradient_checkpointing": false,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.2,
    "hidden_size": 96,
    "id2label": {"0": "a", "1": "b", "2": "c", "3": "d", "4": "e"},
    "label2id": {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4},
    "initializer_range": 0.05,
    "intermediate_size": 200,
    "layer_norm_eps": 1e-07,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "pad_token_id": 1,
    "position_embedding_type": "absolute",
    "problem_type": "single_label_classification",
    "torch_dtype": "float32",
    "transformers_version": "4.36.2",
    "type_vocab_size": 3,
    "use_cache": true,
    "vocab_size": 1000
  })");
}

void write_config(const TempDir& dir, const nlohmann::json& config) { write_file(dir / "config.json", config.dump(2)); }

// The exact value a float stored as `dtype` reads back as (Eigen's conversions round to nearest even).
double stored_value(float x, Dtype dtype) {
  if (dtype == Dtype::F16) return static_cast<double>(static_cast<float>(Eigen::half(x)));
  if (dtype == Dtype::BF16) return static_cast<double>(static_cast<float>(Eigen::bfloat16(x)));
  return static_cast<double>(x);
}

// An I64 position_ids buffer [1, n] holding 0 .. n-1, as older transformers versions saved it.
std::vector<unsigned char> position_ids_bytes(int n) {
  std::vector<unsigned char> bytes(8 * static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) lora::detail::store_le64(bytes.data() + 8 * i, static_cast<std::uint64_t>(i));
  return bytes;
}

// A checkpoint's tensors with what each must read back as, in double.
struct CheckpointTensors {
  std::map<std::string, std::pair<Dtype, lora::Matrix<double>>> matrices;  // stored dtype, expected values
  std::map<std::string, std::pair<Dtype, lora::Vector<double>>> vectors;

  CheckpointTensors() {
    std::srand(7);
    // Values of float precision, scaled past 1 so that F16 and BF16 round them.
    auto add_matrix = [&](const std::string& name, Dtype dtype, int rows, int cols) {
      const lora::Matrix<float> m = lora::Matrix<float>::Random(rows, cols) * 3.7f;
      lora::Matrix<double> expected(rows, cols);
      for (int i = 0; i < rows; ++i)
        for (int k = 0; k < cols; ++k) expected(i, k) = stored_value(m(i, k), dtype);
      matrices.emplace(name, std::make_pair(dtype, m.cast<double>()));
      expected_matrices.emplace(name, expected);
    };
    auto add_vector = [&](const std::string& name, Dtype dtype, int n) {
      const lora::Vector<float> v = lora::Vector<float>::Random(n) * 2.3f;
      lora::Vector<double> expected(n);
      for (int i = 0; i < n; ++i) expected(i) = stored_value(v(i), dtype);
      vectors.emplace(name, std::make_pair(dtype, v.cast<double>()));
      expected_vectors.emplace(name, expected);
    };
    add_matrix("bert.embeddings.word_embeddings.weight", Dtype::F32, 10, 4);
    add_matrix("bert.encoder.layer.0.attention.self.query.weight", Dtype::F16, 4, 4);
    add_vector("bert.encoder.layer.0.attention.self.query.bias", Dtype::BF16, 4);
    add_vector("bert.embeddings.LayerNorm.weight", Dtype::F32, 4);
    add_matrix("classifier.weight", Dtype::BF16, 3, 4);
    add_vector("classifier.bias", Dtype::F16, 3);
    // Full double precision, where F64 keeps every bit.
    const lora::Matrix<double> pooler = lora::Matrix<double>::Random(4, 4) / 3.0;
    matrices.emplace("bert.pooler.dense.weight", std::make_pair(Dtype::F64, pooler));
    expected_matrices.emplace("bert.pooler.dense.weight", pooler);
  }

  // Adds the tensors whose names `keep` accepts to a writer (position_ids is the caller's).
  template <class Keep>
  void add_to(lora::SafetensorsWriter& w, Keep keep) const {
    for (const auto& kv : matrices)
      if (keep(kv.first)) w.add(kv.first, kv.second.second, kv.second.first);
    for (const auto& kv : vectors)
      if (keep(kv.first)) w.add_vector(kv.first, kv.second.second, kv.second.first);
  }

  template <class Scalar>
  void check(const lora::NamedTensors<Scalar>& got) const {
    REQUIRE(got.matrices.size() == expected_matrices.size());
    REQUIRE(got.vectors.size() == expected_vectors.size());
    for (const auto& kv : expected_matrices) {
      INFO(kv.first);
      REQUIRE(got.matrices.count(kv.first));
      CHECK(got.matrices.at(kv.first) == kv.second.cast<Scalar>());  // exact: one rounding from the stored value
    }
    for (const auto& kv : expected_vectors) {
      INFO(kv.first);
      REQUIRE(got.vectors.count(kv.first));
      CHECK(got.vectors.at(kv.first) == kv.second.cast<Scalar>());
    }
  }

  std::vector<std::string> names() const {
    std::vector<std::string> all;
    for (const auto& kv : matrices) all.push_back(kv.first);
    for (const auto& kv : vectors) all.push_back(kv.first);
    return all;
  }

  std::map<std::string, lora::Matrix<double>> expected_matrices;
  std::map<std::string, lora::Vector<double>> expected_vectors;
};

const std::string shard1 = "model-00001-of-00002.safetensors", shard2 = "model-00002-of-00002.safetensors";

// Writes a two-shard checkpoint: the embeddings (and position_ids) in shard 1, the rest in shard 2, and
// the index mapping each tensor to its shard (position_ids included, as transformers writes it).
void write_sharded(const TempDir& dir, const CheckpointTensors& tensors) {
  auto in_first = [](const std::string& name) { return name.rfind("bert.embeddings.", 0) == 0; };
  lora::SafetensorsWriter w1, w2;
  tensors.add_to(w1, in_first);
  tensors.add_to(w2, [&](const std::string& name) { return !in_first(name); });
  w1.add_raw("bert.embeddings.position_ids", Dtype::I64, {1, 16}, position_ids_bytes(16));
  w1.save(dir / shard1);
  w2.save(dir / shard2);
  nlohmann::json map = nlohmann::json::object();
  for (const std::string& name : tensors.names()) map[name] = in_first(name) ? shard1 : shard2;
  map["bert.embeddings.position_ids"] = shard1;
  write_file(dir / "model.safetensors.index.json",
             nlohmann::json{{"metadata", {{"total_size", 1234}}}, {"weight_map", map}}.dump(2));
}

}  // namespace

TEST_CASE("read_bert_config: Hugging Face's config.json fields", "[io][hf]") {
  TempDir dir;
  write_config(dir, hf_bert_config());
  const lora::nn::BertConfig c = lora::read_bert_config(dir.path.string());
  CHECK(c.vocab_size == 1000);
  CHECK(c.hidden_size == 96);
  CHECK(c.num_hidden_layers == 3);
  CHECK(c.num_attention_heads == 4);
  CHECK(c.intermediate_size == 200);
  CHECK(c.max_position_embeddings == 64);
  CHECK(c.type_vocab_size == 3);
  CHECK(c.pad_token_id == 1);
  CHECK(c.layer_norm_eps == 1e-7);
  CHECK(c.hidden_act == "gelu");
  CHECK(c.hidden_dropout_prob == 0.2);
  CHECK(c.attention_probs_dropout_prob == 0.15);
  CHECK(c.initializer_range == 0.05);
  CHECK(c.num_labels == 5);  // the size of id2label

  // num_labels: the field alone, or neither (Hugging Face's 2); the architecture does not matter.
  auto j = hf_bert_config();
  j.erase("id2label");
  j.erase("label2id");
  j["num_labels"] = 4;
  j["architectures"] = {"BertModel"};
  write_config(dir, j);
  CHECK(lora::read_bert_config(dir.path.string()).num_labels == 4);
  j.erase("num_labels");
  j.erase("architectures");
  write_config(dir, j);
  CHECK(lora::read_bert_config(dir.path.string()).num_labels == 2);
  // Only model_type is required; a missing field takes Hugging Face's default.
  write_config(dir, nlohmann::json{{"model_type", "bert"}});
  const auto defaults = lora::read_bert_config(dir.path.string());
  CHECK(defaults.hidden_size == 768);
  CHECK(defaults.vocab_size == 30522);
  CHECK(defaults.num_labels == 2);
}

TEST_CASE("read_bert_config: faults name the file, the field, expected and found", "[io][hf][hardening]") {
  TempDir dir;
  const std::string path = dir / "config.json";
  CHECK_THAT(io_error_of([&] { lora::read_bert_config(dir.path.string()); }),
             Catch::Contains(path) && Catch::Contains("cannot open"));

  using Edit = std::function<void(nlohmann::json&)>;
  auto set = [](const char* field, nlohmann::json value) -> Edit {
    return [=](nlohmann::json& j) { j[field] = value; };
  };
  const std::vector<std::pair<Edit, std::string>> faults = {
      {set("model_type", "roberta"), "field 'model_type' is \"roberta\""},
      {set("model_type", "gpt2"), "field 'model_type' is \"gpt2\""},
      {[](nlohmann::json& j) { j.erase("model_type"); }, "field 'model_type' is missing"},
      {set("model_type", nullptr), "field 'model_type' is missing"},
      {set("model_type", 1), "field 'model_type' must be"},
      {set("architectures", "BertModel"), "field 'architectures' must be a list of strings, found \"BertModel\""},
      {set("hidden_size", "96"), "field 'hidden_size' must be an integer, found \"96\""},
      {set("hidden_size", 96.5), "field 'hidden_size' must be an integer, found 96.5"},
      {set("num_hidden_layers", true), "field 'num_hidden_layers' must be an integer, found true"},
      {set("vocab_size", 18446744073709551615ull), "field 'vocab_size' must be an integer"},
      {set("layer_norm_eps", "1e-12"), "field 'layer_norm_eps' must be a number"},
      {set("hidden_dropout_prob", nlohmann::json::array()), "field 'hidden_dropout_prob' must be a number"},
      {set("hidden_act", 1), "field 'hidden_act' must be a string"},
      {set("position_embedding_type", "relative_key"), "field 'position_embedding_type' is \"relative_key\""},
      {set("position_embedding_type", 0), "field 'position_embedding_type' must be a string"},
      {set("is_decoder", true), "field 'is_decoder' is true"},
      {set("add_cross_attention", true), "field 'add_cross_attention' is true"},
      {set("classifier_dropout", 0.3), "field 'classifier_dropout' is 0.3"},
      {set("id2label", nlohmann::json::array({"a", "b"})), "field 'id2label' must be an object"},
      {set("num_labels", 3), "field 'num_labels' is 3 but 'id2label' has 5 entries"},
      {set("num_labels", "5"), "field 'num_labels' must be an integer"},
  };
  for (const auto& [edit, words] : faults) {
    const std::string& expected = words;
    auto j = hf_bert_config();
    edit(j);
    write_config(dir, j);
    INFO(j.dump());
    try {
      lora::read_bert_config(dir.path.string());
      FAIL("no exception");
    } catch (const io_error& e) {
      CHECK(e.file() == path);
      CHECK_THAT(e.what(), Catch::Contains("read_bert_config") && Catch::Contains(expected));
    }
  }
  write_file(path, "{\"model_type\": ");
  CHECK_THAT(io_error_of([&] { lora::read_bert_config(dir.path.string()); }), Catch::Contains("not valid JSON"));
  write_file(path, "[\"bert\"]");
  CHECK_THAT(io_error_of([&] { lora::read_bert_config(dir.path.string()); }), Catch::Contains("not a JSON object"));

  // Well-typed values the model cannot be built with: BertConfig::validate's std::invalid_argument, with the file.
  const std::vector<std::pair<Edit, std::string>> invalid = {
      {set("num_attention_heads", 5), "hidden_size (96) is not a multiple of num_attention_heads (5)"},
      {set("hidden_act", "relu"), "hidden_act 'relu' is not supported"},
      {set("hidden_size", 0), "hidden_size must be >= 1, got 0"},
      {set("pad_token_id", 1000), "pad_token_id 1000 is outside the vocabulary"},
      {set("layer_norm_eps", 0), "layer_norm_eps must be positive"},
      {set("attention_probs_dropout_prob", 1), "attention_probs_dropout_prob must be in [0, 1)"},
  };
  for (const auto& [edit, words] : invalid) {
    const std::string& expected = words;
    auto j = hf_bert_config();
    edit(j);
    write_config(dir, j);
    INFO(j.dump());
    try {
      lora::read_bert_config(dir.path.string());
      FAIL("no exception");
    } catch (const std::invalid_argument& e) {
      CHECK_THAT(e.what(), Catch::Contains("read_bert_config") && Catch::Contains(expected) && Catch::Contains(path));
    }
  }
}

TEMPLATE_TEST_CASE("read_checkpoint_tensors: one file or shards, every float dtype, buffers skipped", "[io][hf]",
                   float, double) {
  const CheckpointTensors tensors;
  SECTION("model.safetensors") {
    TempDir dir;
    lora::SafetensorsWriter w;
    tensors.add_to(w, [](const std::string&) { return true; });
    w.add_raw("bert.embeddings.position_ids", Dtype::I64, {1, 16}, position_ids_bytes(16));
    w.add_raw("bert.embeddings.token_type_ids", Dtype::I64, {1, 16}, std::vector<unsigned char>(128, 0));
    w.save(dir / "model.safetensors");
    std::vector<std::string> skipped = {"earlier"};
    const auto got = lora::read_checkpoint_tensors<TestType>(dir.path.string(), &skipped);
    tensors.check(got);
    CHECK(skipped == std::vector<std::string>{"earlier", "bert.embeddings.position_ids", "bert.embeddings.token_type_ids"});
    CHECK_NOTHROW(lora::read_checkpoint_tensors<TestType>(dir.path.string()));  // skipped is optional
    // model.safetensors wins over an index, as in transformers.
    write_file(dir / "model.safetensors.index.json", "not read");
    tensors.check(lora::read_checkpoint_tensors<TestType>(dir.path.string()));
  }
  SECTION("shards") {
    TempDir dir;
    write_sharded(dir, tensors);
    std::vector<std::string> skipped;
    tensors.check(lora::read_checkpoint_tensors<TestType>(dir.path.string(), &skipped));
    CHECK(skipped == std::vector<std::string>{"bert.embeddings.position_ids"});
  }
}

TEST_CASE("read_checkpoint_tensors: faults name the file and the tensor and return nothing", "[io][hf][hardening]") {
  const CheckpointTensors tensors;

  SECTION("a directory without weights") {
    TempDir dir;
    write_config(dir, hf_bert_config());
    CHECK_THAT(io_error_of([&] { lora::read_checkpoint_tensors<float>(dir.path.string()); }),
               Catch::Contains("read_checkpoint_tensors") && Catch::Contains(dir.path.string()) &&
                   Catch::Contains("model.safetensors.index.json") && Catch::Contains("pytorch_model.bin is not read"));
    write_file(dir / "pytorch_model.bin", "PK");
    CHECK_THAT(io_error_of([&] { lora::read_checkpoint_tensors<float>(dir.path.string()); }),
               Catch::Contains("this one has pytorch_model.bin"));
    CHECK_THAT(io_error_of([&] { lora::read_checkpoint_tensors<float>(dir / "missing"); }),
               Catch::Contains("not a directory"));
  }

  SECTION("tensors that are not weights") {
    struct Case {
      std::string name;
      Dtype dtype;
      std::vector<std::uint64_t> shape;
      std::string words;
    };
    const std::vector<Case> cases = {
        {"bert.encoder.layer.0.attention.self.query.weight_ids", Dtype::I32, {2}, "dtype I32 is not a weight type"},
        {"bert.encoder.layer.0.attention.self.distance_table", Dtype::F32, {1, 1, 2}, "shape [1, 1, 2] is neither 1-D nor 2-D"},
        {"bert.pooler.dense.weight_scale", Dtype::F32, {}, "shape [] is neither 1-D nor 2-D"},
        {"bert.embeddings.mask", Dtype::BOOL, {4}, "dtype BOOL is not a weight type"},
        {"bert.pooler.dense.weight", Dtype::F8_E4M3, {2, 2}, "dtype F8_E4M3 is not a weight type"},
    };
    for (const Case& c : cases) {
      INFO(c.name);
      TempDir dir;
      lora::SafetensorsWriter w;
      tensors.add_to(w, [&](const std::string& name) { return name != c.name; });
      w.add_raw("bert.embeddings.position_ids", Dtype::I64, {1, 16}, position_ids_bytes(16));
      std::uint64_t bytes = lora::dtype_size(c.dtype);
      for (std::uint64_t d : c.shape) bytes *= d;
      w.add_raw(c.name, c.dtype, c.shape, std::vector<unsigned char>(bytes, 0));
      w.save(dir / "model.safetensors");
      std::vector<std::string> skipped = {"earlier"};
      try {
        lora::read_checkpoint_tensors<double>(dir.path.string(), &skipped);
        FAIL("no exception");
      } catch (const io_error& e) {
        CHECK(e.file() == dir / "model.safetensors");
        CHECK(e.tensor() == c.name);
        CHECK_THAT(e.what(), Catch::Contains("read_checkpoint_tensors") && Catch::Contains(c.words));
      }
      CHECK(skipped == std::vector<std::string>{"earlier"});  // unchanged
    }
    TempDir dir;
    lora::SafetensorsWriter().save(dir / "model.safetensors");
    CHECK_THAT(io_error_of([&] { lora::read_checkpoint_tensors<float>(dir.path.string()); }),
               Catch::Contains("holds no tensors"));
  }

  SECTION("index faults") {
    // Each case edits a valid two-shard checkpoint; the message names the file and the tensor.
    struct Case {
      std::string what;
      std::function<void(const TempDir&)> edit;
      std::string file, tensor, words;
    };
    const std::string moved = "bert.pooler.dense.weight";  // in shard 2
    auto rewrite_index = [](const TempDir& dir, const std::function<void(nlohmann::json&)>& f) {
      auto index = nlohmann::json::parse(read_file(dir / "model.safetensors.index.json"));
      f(index["weight_map"]);
      write_file(dir / "model.safetensors.index.json", index.dump());
    };
    // Rewrites shard 2 with `extra` added (taken from the checkpoint's own values).
    auto rewrite_shard2 = [&](const TempDir& dir, const std::string& extra) {
      lora::SafetensorsWriter w;
      tensors.add_to(w, [](const std::string& name) { return name.rfind("bert.embeddings.", 0) != 0; });
      w.add(extra, lora::Matrix<double>::Ones(2, 2));
      w.save(dir / shard2);
    };
    const std::vector<Case> cases = {
        {"missing shard",
         [&](const TempDir& dir) { rewrite_index(dir, [&](auto& m) { m[moved] = "model-00003-of-00003.safetensors"; }); },
         "model-00003-of-00003.safetensors", "", "cannot open"},
        {"tensor in another shard than the map says",
         [&](const TempDir& dir) { rewrite_index(dir, [&](auto& m) { m[moved] = shard1; }); }, shard1, moved,
         "mapped to this shard by"},
        {"tensor in two shards",
         [&](const TempDir& dir) { rewrite_shard2(dir, "bert.embeddings.word_embeddings.weight"); }, shard2,
         "bert.embeddings.word_embeddings.weight", "maps it to " + shard1},
        {"shard outside the directory",
         [&](const TempDir& dir) { rewrite_index(dir, [&](auto& m) { m[moved] = "../" + shard2; }); },
         "model.safetensors.index.json", moved, "is not a file name in the index's directory"},
        {"absolute shard path",
         [&](const TempDir& dir) { rewrite_index(dir, [&](auto& m) { m[moved] = dir / shard2; }); },
         "model.safetensors.index.json", moved, "is not a file name in the index's directory"},
        {"stray tensor", [&](const TempDir& dir) { rewrite_shard2(dir, "bert.extra.weight"); }, shard2,
         "bert.extra.weight", "does not list it"},
        {"empty weight_map", [&](const TempDir& dir) { rewrite_index(dir, [](auto& m) { m = nlohmann::json::object(); }); },
         "model.safetensors.index.json", "", "lists no tensors"},
        {"index not JSON", [](const TempDir& dir) { write_file(dir / "model.safetensors.index.json", "{"); },
         "model.safetensors.index.json", "", "not valid JSON"},
        {"no weight_map",
         [](const TempDir& dir) { write_file(dir / "model.safetensors.index.json", R"({"metadata": {}})"); },
         "model.safetensors.index.json", "", "\"weight_map\""},
    };
    for (const Case& c : cases) {
      INFO(c.what);
      TempDir dir;
      write_sharded(dir, tensors);
      c.edit(dir);
      std::vector<std::string> skipped;
      try {
        lora::read_checkpoint_tensors<float>(dir.path.string(), &skipped);
        FAIL("no exception");
      } catch (const io_error& e) {
        CHECK(e.file() == dir / c.file);
        CHECK(e.tensor() == c.tensor);
        CHECK_THAT(e.what(), Catch::Contains(c.words));
      }
      CHECK(skipped.empty());
    }
  }
}

TEST_CASE("the BERT fixture reads as a Hugging Face checkpoint with a PEFT adapter", "[io][hf]") {
  const std::string dir = std::string(LORA_TEST_DATA_DIR) + "/bert_fixture";
  const lora::nn::BertConfig c = lora::read_bert_config(dir);
  CHECK(c.vocab_size == 50);
  CHECK(c.hidden_size == 8);
  CHECK(c.num_hidden_layers == 2);
  CHECK(c.num_attention_heads == 2);
  CHECK(c.intermediate_size == 12);
  CHECK(c.max_position_embeddings == 16);
  CHECK(c.type_vocab_size == 2);
  CHECK(c.num_labels == 3);
  CHECK(c.layer_norm_eps == 1e-12);
  CHECK(c.pad_token_id == 0);

  std::vector<std::string> skipped;
  const auto w = lora::read_checkpoint_tensors<double>(dir, &skipped);
  CHECK(skipped == std::vector<std::string>{"bert.embeddings.position_ids"});
  CHECK(w.matrices.size() == 1 + 2 + 2 * 6 + 2);  // embeddings, pooler, classifier, 6 per layer
  CHECK(w.vectors.size() == 2 + 2 * 10 + 2);
  CHECK(w.matrices.at("bert.embeddings.word_embeddings.weight").rows() == 50);
  CHECK(w.matrices.at("bert.encoder.layer.1.intermediate.dense.weight").rows() == 12);
  CHECK(w.matrices.at("bert.encoder.layer.1.output.dense.weight").cols() == 12);
  CHECK(w.matrices.at("classifier.weight").rows() == 3);
  // The reference holds the gradient of every parameter, in its shape.
  const auto ref = lora::SafetensorsReader::open(dir + "/reference.safetensors");
  for (const auto& kv : w.matrices) {
    INFO(kv.first);
    CHECK(ref.at("grad." + kv.first).shape ==
          std::vector<std::uint64_t>{static_cast<std::uint64_t>(kv.second.rows()), static_cast<std::uint64_t>(kv.second.cols())});
  }
  for (const auto& kv : w.vectors) {
    INFO(kv.first);
    CHECK(ref.at("grad." + kv.first).shape == std::vector<std::uint64_t>{static_cast<std::uint64_t>(kv.second.size())});
  }
  CHECK(ref.matrix<double>("last_hidden_state").rows() == 15);

  const auto adapter = lora::PeftLoraConfig::load(dir + "/adapter/adapter_config.json");
  CHECK(adapter.r == 2);
  CHECK(adapter.lora_config_for("bert.encoder.layer.0.attention.self.query").scaling() == 2.0);
  CHECK(adapter.targets("bert.encoder.layer.1.attention.self.value") == true);
  CHECK(adapter.targets("bert.encoder.layer.1.attention.self.key") == false);
  CHECK(adapter.saves_module("classifier"));
}
