// Files on disk: adapter directories replaced as a pair (a kill and an exception at every step of a
// save), byte counts that overflow, float8, and safetensors files written by other software.
#include <lora/io.hpp>

#include "instances.hpp"
#include "temp_files.hpp"

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
using lora::detail::ReplaceStep;

using lora::testing::TempDir;
using lora::testing::listing;
using lora::testing::read_file;
using lora::testing::write_file;

namespace {


ino_t inode_of(const fs::path& p) {
  struct stat st {};
  REQUIRE(::lstat(p.c_str(), &st) == 0);
  return st.st_ino;
}

// Every entry under `dir` but the adapter's two files at the top: type, mode, inode and content (a
// symlink's target), so that "unchanged" means the same files, not copies. With `temporaries_too` false,
// the temporaries of the adapter's files (a killed file-by-file save leaves them) are left out.
std::map<std::string, std::string> snapshot_others(const fs::path& dir, bool temporaries_too = true) {
  std::map<std::string, std::string> out;
  const std::set<std::string> files = {lora::adapter_weights_file, lora::adapter_config_file};
  for (auto it = fs::recursive_directory_iterator(dir); it != fs::recursive_directory_iterator(); ++it) {
    const fs::path rel = fs::relative(it->path(), dir);
    if (files.count(rel.string())) continue;
    if (!temporaries_too && lora::detail::is_replaced_file(rel.string(), files)) continue;
    struct stat st {};
    REQUIRE(::lstat(it->path().c_str(), &st) == 0);
    std::string d = lora::detail::concat("mode ", st.st_mode, " ");
    if (S_ISLNK(st.st_mode))
      d += "link -> " + fs::read_symlink(it->path()).string();
    else if (S_ISDIR(st.st_mode))
      d += "dir";
    else
      d += lora::detail::concat("inode ", st.st_ino, ": ", read_file(it->path()));
    out[rel.string()] = d;
  }
  return out;
}

lora::LoraConfig adapter_config(double alpha, std::uint64_t seed) {
  lora::LoraConfig c;
  c.rank = 4;
  c.alpha = alpha;
  c.init = lora::InitMethod::random;  // B != 0
  c.seed = seed;
  return c;
}

// The old and the new adapter of the crash tests: same shapes (so a mix would load without complaint),
// different weights and alpha.
struct Adapters {
  lora::Matrix<float> W = lora::Matrix<float>::Random(16, 12);
  lora::LoraLinearf old_layer{W, adapter_config(8, 1)};
  lora::LoraLinearf new_layer{W, adapter_config(16, 2)};
  lora::LoraModelView<float> old_view{{{"fc", &old_layer}}, {}, {}};
  lora::LoraModelView<float> new_view{{{"fc", &new_layer}}, {}, {}};

  // "old", "new", "mixed" (weights of one, config of the other, or anything else), or "unreadable".
  std::string state_of(const std::string& dir) const {
    lora::LoraLinearf fresh(W, adapter_config(1, 3));
    const lora::LoraModelView<float> view{{{"fc", &fresh}}, {}, {}};
    lora::PeftLoraConfig config;
    try {
      config = lora::load_adapter(dir, view, "x");
    } catch (const io_error&) {
      return "unreadable";
    }
    const bool old_weights = fresh.A("x") == old_layer.A() && fresh.B("x") == old_layer.B();
    const bool new_weights = fresh.A("x") == new_layer.A() && fresh.B("x") == new_layer.B();
    if (old_weights && config.lora_alpha == 8) return "old";
    if (new_weights && config.lora_alpha == 16) return "new";
    return "mixed";
  }
};

// Entries a user or another tool put in an adapter directory: a README, tokenizer files, a second adapter
// in a subdirectory (PEFT's multi-adapter layout) with a deeper folder, a symlink and an empty folder.
void add_other_entries(const fs::path& dir, const Adapters& a) {
  write_file(dir / "README.md", "# my adapter\n");
  write_file(dir / "tokenizer.json", "{\"version\": \"1.0\"}");
  lora::save_adapter((dir / "other").string(), a.old_view);
  fs::create_directories(dir / "other" / "notes");
  write_file(dir / "other" / "notes" / "deep.txt", "deep");
  fs::create_symlink("README.md", dir / "link_to_readme");
  fs::create_directory(dir / "empty");
  ::chmod((dir / "empty").c_str(), 0750);
}

enum class Mode { exchange, without_exchange, file_by_file };
const char* to_string(Mode m) {
  return m == Mode::exchange ? "exchange" : m == Mode::without_exchange ? "without_exchange" : "file_by_file";
}

// Sets the save's testing seams for one scope.
struct TestingGuard {
  TestingGuard(Mode mode, void (*step)(ReplaceStep)) {
    auto& t = lora::detail::replace_testing();
    t.step = step;
    t.without_exchange = mode == Mode::without_exchange;
    t.file_by_file = mode == Mode::file_by_file;
  }
  ~TestingGuard() { lora::detail::replace_testing() = {}; }
};

// Whether this file system exchanges directories (ext4, xfs, btrfs, tmpfs do).
bool exchange_supported(const TempDir& tmp) {
  fs::create_directory(tmp / "x1");
  fs::create_directory(tmp / "x2");
  const int err = lora::detail::rename_exchange(AT_FDCWD, (tmp / "x1").c_str(), (tmp / "x2").c_str());
  fs::remove(tmp / "x1");
  fs::remove(tmp / "x2");
  return err == 0;
}

std::vector<ReplaceStep> expected_steps(Mode mode) {
  using S = ReplaceStep;
  switch (mode) {
    case Mode::exchange:
      return {S::started,        S::sibling_created, S::file_written, S::file_written,
              S::entries_linked, S::swapped,         S::committed,    S::finished};
    case Mode::without_exchange:
      return {S::started,        S::sibling_created, S::file_written, S::file_written, S::entries_linked,
              S::old_moved_away, S::swapped,         S::committed,    S::finished};
    case Mode::file_by_file:
      return {S::started,        S::file_written, S::file_written, S::file_published,
              S::file_published, S::committed,    S::finished};
  }
  return {};
}

int step_calls = 0, step_target = 0;
void exit_at_target_step(ReplaceStep s) {
  if (++step_calls == step_target) ::_exit(100 + static_cast<int>(s));
}
void throw_at_target_step(ReplaceStep s) {
  if (++step_calls == step_target) throw std::runtime_error(std::string("stopped at ") + lora::detail::to_string(s));
}
std::string late_entry_dir;
void add_entries_after_linking(ReplaceStep s) {
  if (s != ReplaceStep::entries_linked) return;
  write_file(fs::path(late_entry_dir) / "late.txt", "written during the save");
  write_file(fs::path(late_entry_dir) / "other" / "late_too.txt", "also");
}

}  // namespace

// ---- adapter files replaced as a pair -----------------------------------------------------------------

TEST_CASE("a save killed at any step leaves the old pair or the new pair and every other file", "[files][atomic]") {
  TempDir tmp;
  const bool has_exchange = exchange_supported(tmp);
  if (!has_exchange) WARN("this file system has no RENAME_EXCHANGE: the exchange mode runs the fallback");
  for (Mode mode : {Mode::exchange, Mode::without_exchange, Mode::file_by_file}) {
    INFO("mode " << to_string(mode));
    const Mode effective = mode == Mode::exchange && !has_exchange ? Mode::without_exchange : mode;
    Adapters a;
    TempDir root;
    const std::string ad = root / "adapter";
    lora::save_adapter(ad, a.old_view);
    add_other_entries(ad, a);
    const auto others = snapshot_others(ad);
    REQUIRE(a.state_of(ad) == "old");

    std::vector<ReplaceStep> steps;
    int published = 0;
    for (int k = 1;; ++k) {
      INFO("killed at step call " << k);
      REQUIRE(k < 30);
      const pid_t pid = ::fork();
      REQUIRE(pid >= 0);
      if (pid == 0) {
        TestingGuard guard(mode, exit_at_target_step);
        step_target = k;
        try {
          lora::save_adapter(ad, a.new_view);
        } catch (...) {
          ::_exit(2);
        }
        ::_exit(0);  // the save finished before call k
      }
      int status = 0;
      REQUIRE(::waitpid(pid, &status, 0) == pid);
      REQUIRE(WIFEXITED(status));
      const int code = WEXITSTATUS(status);
      REQUIRE(code != 2);
      const std::string state = a.state_of(ad);
      if (code == 0) {  // past the last step: a complete save
        CHECK(state == "new");
        CHECK(snapshot_others(ad) == others);
        break;
      }
      const auto step = static_cast<ReplaceStep>(code - 100);
      steps.push_back(step);
      INFO("step " << lora::detail::to_string(step) << ", directory reads as " << state);
      if (step == ReplaceStep::file_published) ++published;
      const std::size_t pos = steps.size() - 1;
      const std::vector<ReplaceStep> expected = expected_steps(effective);
      REQUIRE(pos < expected.size());
      const auto swap_at =
          std::find(expected.begin(), expected.end(),
                    effective == Mode::file_by_file ? ReplaceStep::file_published : ReplaceStep::swapped);
      const bool before_swap = pos < static_cast<std::size_t>(swap_at - expected.begin());
      if (effective != Mode::file_by_file) CHECK(state != "mixed");
      if (effective == Mode::file_by_file && published == 1) {
        // The documented window of the file-by-file fallback: new weights, old config.
        CHECK(state == "mixed");
      } else if (step == ReplaceStep::old_moved_away) {
        // Without RENAME_EXCHANGE, between the two renames: no directory, the old one under its
        // .lora-old name; the next save (or the sibling check it starts with) renames it back.
        CHECK(state == "unreadable");
        CHECK_FALSE(fs::exists(ad));
        const lora::detail::FileDescriptor parent = lora::detail::open_directory(AT_FDCWD, root.path.c_str());
        const auto restored = lora::detail::open_target_and_retire_siblings(
            parent.get(), "adapter", ad, {lora::adapter_weights_file, lora::adapter_config_file}, "test");
        CHECK(restored);
        CHECK(a.state_of(ad) == "old");
      } else {
        CHECK(state == (before_swap ? "old" : "new"));
      }
      CHECK(snapshot_others(ad, false) == others);
      // Back to the old pair; the save retires whatever the killed one left.
      lora::save_adapter(ad, a.old_view);
      CHECK(a.state_of(ad) == "old");
      CHECK(snapshot_others(ad) == others);
      CHECK(listing(root.path) == std::vector<std::string>{"adapter"});
    }
    CHECK(steps == expected_steps(effective));
  }
}

TEST_CASE("a save that throws at any step before it is durable leaves the directory exactly as it was",
          "[files][atomic]") {
  TempDir tmp;
  const bool has_exchange = exchange_supported(tmp);
  for (Mode mode : {Mode::exchange, Mode::without_exchange, Mode::file_by_file}) {
    INFO("mode " << to_string(mode));
    const Mode effective = mode == Mode::exchange && !has_exchange ? Mode::without_exchange : mode;
    Adapters a;
    TempDir root;
    const std::string ad = root / "adapter";
    lora::save_adapter(ad, a.old_view);
    add_other_entries(ad, a);
    const auto others = snapshot_others(ad);
    const std::string weights = read_file(ad + "/adapter_model.safetensors");
    const std::string config = read_file(ad + "/adapter_config.json");
    const ino_t dir_inode = inode_of(ad);
    const std::vector<ReplaceStep> steps = expected_steps(effective);
    for (std::size_t k = 1; k <= steps.size(); ++k) {
      const ReplaceStep step = steps[k - 1];
      // File by file, a published file cannot be taken back: only the steps before it.
      if (step == ReplaceStep::committed || step == ReplaceStep::finished || step == ReplaceStep::file_published) break;
      INFO("thrown at " << lora::detail::to_string(step));
      {
        TestingGuard guard(mode, throw_at_target_step);
        step_calls = 0;
        step_target = static_cast<int>(k);
        CHECK_THROWS_WITH(lora::save_adapter(ad, a.new_view), Contains("stopped at"));
      }
      CHECK(inode_of(ad) == dir_inode);
      CHECK(read_file(ad + "/adapter_model.safetensors") == weights);
      CHECK(read_file(ad + "/adapter_config.json") == config);
      CHECK(snapshot_others(ad) == others);
      CHECK(listing(root.path) == std::vector<std::string>{"adapter"});
      CHECK(a.state_of(ad) == "old");
    }
  }
}

TEST_CASE("failed saves: NaN weights, a write error midway, a file in the way", "[files][atomic]") {
  Adapters a;
  TempDir root;
  const std::string ad = root / "adapter";
  lora::save_adapter(ad, a.old_view);
  add_other_entries(ad, a);
  const auto others = snapshot_others(ad);
  const std::string weights = read_file(ad + "/adapter_model.safetensors");

  // Values that cannot be written fail before anything is created.
  lora::LoraLinearf bad(a.W, adapter_config(16, 2));
  bad.B().set(0, 0, NAN);
  const lora::LoraModelView<float> bad_view{{{"fc", &bad}}, {}, {}};
  CHECK_THROWS_WITH(lora::save_adapter(ad, bad_view), Contains("NaN or Inf"));
  CHECK(listing(root.path) == std::vector<std::string>{"adapter"});
  CHECK(read_file(ad + "/adapter_model.safetensors") == weights);

  // A write that fails inside the sibling (a file-size limit: EFBIG) is an io_error, and undone.
  for (Mode mode : {Mode::exchange, Mode::file_by_file}) {
    INFO("mode " << to_string(mode));
    lora::LoraLinearf big(lora::Matrix<float>::Random(256, 256), adapter_config(16, 4));
    const lora::LoraModelView<float> big_view{{{"fc", &big}}, {}, {}};
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      TestingGuard guard(mode, nullptr);
      std::signal(SIGXFSZ, SIG_IGN);
      const struct rlimit limit = {4096, 4096};
      ::setrlimit(RLIMIT_FSIZE, &limit);
      try {
        lora::save_adapter(ad, big_view);
      } catch (const io_error& e) {
        ::_exit(std::string(e.what()).find("File too large") != std::string::npos ? 0 : 3);
      } catch (...) {
        ::_exit(4);
      }
      ::_exit(5);
    }
    int status = 0;
    REQUIRE(::waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    CHECK(WEXITSTATUS(status) == 0);
    CHECK(read_file(ad + "/adapter_model.safetensors") == weights);
    CHECK(a.state_of(ad) == "old");
    CHECK(snapshot_others(ad) == others);
    CHECK(listing(root.path) == std::vector<std::string>{"adapter"});
    CHECK(listing(ad) == std::vector<std::string>{"README.md", "adapter_config.json", "adapter_model.safetensors",
                                                  "empty", "link_to_readme", "other", "tokenizer.json"});
  }

  // A file where the directory should be.
  write_file(root / "a_file", "x");
  CHECK_THROWS_WITH(lora::save_adapter(root / "a_file", a.new_view), Contains("save_adapter") && Contains("a_file"));
  CHECK(read_file(root / "a_file") == "x");
  CHECK_THROWS_AS(lora::save_adapter("/proc/lora_cannot_write_here", a.new_view), io_error);
}

TEST_CASE("entries added during a save, leftovers of killed saves, symlinks and first saves", "[files][atomic]") {
  Adapters a;
  TempDir root;
  const std::string ad = root / "adapter";

  SECTION("a first save creates the directory through a sibling") {
    lora::save_adapter(ad + "/", a.new_view);  // a trailing separator
    CHECK(a.state_of(ad) == "new");
    CHECK(listing(root.path) == std::vector<std::string>{"adapter"});
    CHECK(listing(ad) == std::vector<std::string>{"adapter_config.json", "adapter_model.safetensors"});
  }

  SECTION("entries created in the directory during the save end up in the new one") {
    for (Mode mode : {Mode::exchange, Mode::without_exchange}) {
      INFO("mode " << to_string(mode));
      lora::save_adapter(ad, a.old_view);
      add_other_entries(ad, a);
      late_entry_dir = ad;
      {
        TestingGuard guard(mode, add_entries_after_linking);
        lora::save_adapter(ad, a.new_view);
      }
      CHECK(a.state_of(ad) == "new");
      CHECK(read_file(ad + "/late.txt") == "written during the save");
      CHECK(read_file(ad + "/other/late_too.txt") == "also");
      CHECK(read_file(ad + "/README.md") == "# my adapter\n");
      CHECK(listing(root.path) == std::vector<std::string>{"adapter"});
      fs::remove_all(ad);
    }
  }

  SECTION("a symlink to the directory stays a symlink; the directory it names is replaced") {
    lora::save_adapter(root / "real", a.old_view);
    write_file(root.path / "real" / "README.md", "kept");
    fs::create_directory_symlink("real", ad);
    lora::save_adapter(ad, a.new_view);
    CHECK(fs::is_symlink(ad));
    CHECK(a.state_of(root / "real") == "new");
    CHECK(read_file(root.path / "real" / "README.md") == "kept");
    CHECK(listing(root.path) == std::vector<std::string>{"adapter", "real"});
  }

  SECTION("leftovers of killed saves are retired: replaced files deleted, anything else kept") {
    lora::save_adapter(ad, a.old_view);
    add_other_entries(ad, a);
    const auto others = snapshot_others(ad);
    // A sibling a killed save left before its swap (new files, links to the directory's entries)...
    const fs::path stale = root.path / ".adapter.lora-new.4242.17";
    fs::create_directory(stale);
    write_file(stale / "adapter_model.safetensors", "half written");
    fs::create_hard_link(fs::path(ad) / "README.md", stale / "README.md");
    // ...one holding a file that exists nowhere else, one a save in progress holds locked, and names that
    // only look like siblings.
    const fs::path unique = root.path / ".adapter.lora-old.4243.18";
    fs::create_directory(unique);
    write_file(unique / "only_copy.txt", "precious");
    // One whose README differs from the directory's: kept there, while everything else still moves.
    const fs::path conflict = root.path / ".adapter.lora-new.4245.20";
    fs::create_directory(conflict);
    write_file(conflict / "README.md", "another README");
    for (int i = 0; i < 20; ++i) write_file(conflict / ("only_" + std::to_string(i) + ".txt"), std::to_string(i));
    const fs::path locked = root.path / ".adapter.lora-new.4244.19";
    fs::create_directory(locked);
    write_file(locked / "adapter_model.safetensors", "in progress");
    const lora::detail::FileDescriptor lock = lora::detail::open_directory(AT_FDCWD, locked.c_str());
    REQUIRE(::flock(lock.get(), LOCK_EX) == 0);
    for (const char* name : {".adapter.lora-new.1.lora-new.5", ".adapter.lora-new.x", ".adapter.lora-new.12",
                             ".adapter2.lora-new.1.2", "adapter.lora-new.1.2"}) {
      fs::create_directory(root.path / name);
      write_file(root.path / name / "adapter_model.safetensors", "not ours");
    }
    const auto before = listing(root.path);

    CHECK(a.state_of(ad) == "old");  // none of them disturbs a load
    lora::save_adapter(ad, a.new_view);
    CHECK(a.state_of(ad) == "new");
    CHECK_FALSE(fs::exists(stale));
    CHECK_FALSE(fs::exists(unique));
    CHECK(read_file(ad + "/only_copy.txt") == "precious");
    CHECK(listing(conflict) == std::vector<std::string>{"README.md"});
    CHECK(read_file(conflict / "README.md") == "another README");
    for (int i = 0; i < 20; ++i) CHECK(read_file(ad + "/only_" + std::to_string(i) + ".txt") == std::to_string(i));
    CHECK(read_file(locked / "adapter_model.safetensors") == "in progress");
    for (const char* name : {".adapter.lora-new.1.lora-new.5", ".adapter.lora-new.x", ".adapter.lora-new.12",
                             ".adapter2.lora-new.1.2", "adapter.lora-new.1.2"})
      CHECK(read_file(root.path / name / "adapter_model.safetensors") == "not ours");
    auto after_others = snapshot_others(ad);
    after_others.erase("only_copy.txt");
    for (int i = 0; i < 20; ++i) after_others.erase("only_" + std::to_string(i) + ".txt");
    CHECK(after_others == others);
    auto expected = before;
    expected.erase(std::find(expected.begin(), expected.end(), stale.filename().string()));
    expected.erase(std::find(expected.begin(), expected.end(), unique.filename().string()));
    CHECK(listing(root.path) == expected);
  }

  CHECK(lora::detail::is_sibling_of(".adapter.lora-new.12.34", "adapter", lora::detail::sibling_new_tag));
  CHECK_FALSE(lora::detail::is_sibling_of(".adapter.lora-new.12.", "adapter", lora::detail::sibling_new_tag));
  CHECK_FALSE(lora::detail::is_sibling_of(".adapter.lora-new..34", "adapter", lora::detail::sibling_new_tag));
  CHECK_FALSE(lora::detail::is_sibling_of(".adapter.lora-new.1.2.3", "adapter", lora::detail::sibling_new_tag));
  CHECK_FALSE(lora::detail::is_sibling_of(".adapter.lora-old.1.2", "adapter", lora::detail::sibling_new_tag));
}

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

// ---- float8 -------------------------------------------------------------------------------------------

TEST_CASE("float8 decodes exactly", "[files][dtype]") {
  // E5M2 is the upper byte of an IEEE half.
  for (int b = 0; b < 256; ++b) {
    const float expected = static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(static_cast<std::uint16_t>(b << 8)));
    const float got = lora::detail::decode_f8_e5m2(static_cast<unsigned char>(b));
    INFO("E5M2 byte " << b);
    CHECK(((std::isnan(expected) && std::isnan(got)) || got == expected));
    if (got == 0) CHECK(std::signbit(got) == std::signbit(expected));
  }
  // E4M3 "fn": the table's corners.
  using lora::detail::decode_f8_e4m3;
  CHECK(decode_f8_e4m3(0x38) == 1.0f);
  CHECK(decode_f8_e4m3(0x7e) == 448.0f);    // the largest
  CHECK(decode_f8_e4m3(0x01) == 0x1p-9f);   // the smallest subnormal
  CHECK(decode_f8_e4m3(0x08) == 0x1p-6f);   // the smallest normal
  CHECK(decode_f8_e4m3(0xae) == -0.4375f);  // 1.75 x 2^-2
  CHECK(decode_f8_e4m3(0x78) == 256.0f);    // exponent 15 is finite in the fn variant
  CHECK(std::isnan(decode_f8_e4m3(0x7f)));
  CHECK(std::isnan(decode_f8_e4m3(0xff)));
  CHECK(std::signbit(decode_f8_e4m3(0x80)));
}

// ---- safetensors files written by other software ---------------------------------------------------------

namespace {

const fs::path interop_dir = fs::path(LORA_INTEROP_DIR) / "safetensors";

bool have_interop() {
  if (fs::is_directory(interop_dir)) return true;
  WARN("skipped: " << interop_dir.string() << " is absent (interoperability files from other writers)");
  return false;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const io_error& e) {
    return e.what();
  }
  return "no error";
}

// The stored integer values of an integer or BOOL tensor, decoded here from its little-endian bytes.
std::vector<std::int64_t> stored_integers(const lora::SafetensorsReader& r, const lora::TensorInfo& t) {
  std::vector<unsigned char> bytes(t.end - t.begin);
  r.read_bytes(t, bytes.data());
  const std::size_t size = lora::dtype_size(t.dtype);
  std::vector<std::int64_t> out;
  for (std::size_t i = 0; i < bytes.size(); i += size) {
    std::uint64_t u = 0;
    for (std::size_t b = 0; b < size; ++b) u |= std::uint64_t{bytes[i + b]} << (8 * b);
    const bool is_signed =
        t.dtype == Dtype::I8 || t.dtype == Dtype::I16 || t.dtype == Dtype::I32 || t.dtype == Dtype::I64;
    if (is_signed && size < 8 && (u >> (8 * size - 1))) u |= ~std::uint64_t{0} << (8 * size);  // sign extension
    out.push_back(static_cast<std::int64_t>(u));
  }
  return out;
}

// Every tensor: converted (and finite) if the dtype is one the reader converts, else refused naming it.
void check_every_tensor_reads_or_is_refused(const lora::SafetensorsReader& r) {
  for (const auto& t : r.tensors()) {
    INFO(r.path() << ": " << t.name << " " << lora::to_string(t.dtype));
    CHECK(t.end - t.begin == t.num_elements() * lora::dtype_size(t.dtype));
    if (lora::SafetensorsReader::can_convert(t.dtype)) {
      CHECK(r.values<double>(t.name).size() == t.num_elements());
      CHECK(r.values<float>(t.name).size() == t.num_elements());
    } else {
      const std::string message = error_of([&] { (void)r.values<double>(t.name); });
      CHECK_THAT(message, Contains(std::string("dtype ") + lora::to_string(t.dtype) + " cannot be converted") &&
                              Contains(t.name));
    }
  }
}

}  // namespace

TEST_CASE("safetensors files of the official library and of other writers", "[files][interop]") {
  if (!have_interop()) return;

  SECTION("SafeTensors.jl and numpy: every dtype, shapes [3], [3, 5], [3, 5, 7]") {
    const fs::path d = interop_dir / "fluxml_safetensors_jl_non_sharded";
    const auto julia = lora::SafetensorsReader::open((d / "model.safetensors").string());
    const auto with_meta = lora::SafetensorsReader::open((d / "model.with_metadata.safetensors").string());
    const auto numpy = lora::SafetensorsReader::open((d / "model.numpy.safetensors").string());
    const std::map<std::string, Dtype> prefixes = {
        {"bfloat16", Dtype::BF16},       {"bool", Dtype::BOOL},   {"float16", Dtype::F16},
        {"float32", Dtype::F32},         {"float64", Dtype::F64}, {"float8_e4m3fn", Dtype::F8_E4M3},
        {"float8_e5m2", Dtype::F8_E5M2}, {"int16", Dtype::I16},   {"int32", Dtype::I32},
        {"int64", Dtype::I64},           {"int8", Dtype::I8},     {"uint8", Dtype::U8}};
    const std::map<std::string, std::vector<std::uint64_t>> shapes = {{"3", {3}}, {"35", {3, 5}}, {"357", {3, 5, 7}}};
    CHECK(julia.tensors().size() == prefixes.size() * 3);
    CHECK(numpy.tensors().size() == 27);  // numpy has no bfloat16 or float8
    for (const auto* r : {&julia, &numpy}) {
      for (const auto& t : r->tensors()) {
        INFO(r->path() << ": " << t.name);
        const auto cut = t.name.rfind('_');
        REQUIRE(prefixes.count(t.name.substr(0, cut)));
        CHECK(t.dtype == prefixes.at(t.name.substr(0, cut)));
        CHECK(t.shape == shapes.at(t.name.substr(cut + 1)));
      }
      check_every_tensor_reads_or_is_refused(*r);
    }
    // numpy's file holds arange(n) in every dtype (BOOL: n % 2), row-major.
    for (const auto& t : numpy.tensors()) {
      INFO(t.name);
      if (lora::SafetensorsReader::can_convert(t.dtype)) {
        const auto v = numpy.values<double>(t.name);
        for (std::size_t i = 0; i < v.size(); ++i) CHECK(v[i] == static_cast<double>(i));
      } else {
        const auto v = stored_integers(numpy, t);
        for (std::size_t i = 0; i < v.size(); ++i)
          CHECK(v[i] == static_cast<std::int64_t>(t.dtype == Dtype::BOOL ? i % 2 : i));
      }
    }
    // Julia's random values, checked against Python's struct module (and a float8 table for F8).
    CHECK(julia.values<double>("float64_3") ==
          std::vector<double>{0.09568845342543757, -0.09626170885828042, -0.7743970759206625});
    CHECK(julia.values<float>("float32_3") ==
          std::vector<float>{0.01330372504889965f, 0.581986665725708f, 0.4747563302516937f});
    CHECK(julia.values<double>("float16_3") == std::vector<double>{0.123779296875, 1.6435546875, 0.454833984375});
    CHECK(julia.values<double>("bfloat16_3") == std::vector<double>{-0.82421875, -0.373046875, 0.84375});
    CHECK(julia.values<double>("float8_e4m3fn_3") == std::vector<double>{-0.4375, -0.28125, -1.0});
    CHECK(julia.values<double>("float8_e5m2_3") == std::vector<double>{-0.75, -0.1875, -0.75});
    const auto e4m3 = julia.values<double>("float8_e4m3fn_357");
    CHECK(std::vector<double>(e4m3.begin(), e4m3.begin() + 4) == std::vector<double>{-0.625, 1.0, 0.3125, -0.375});
    CHECK(stored_integers(julia, julia.at("int32_3")) == std::vector<std::int64_t>{42, 13, 59});
    // The file with metadata holds the same tensors.
    CHECK(with_meta.metadata_value("test") == std::string("metadata"));
    CHECK(with_meta.metadata_value("version") == std::string("2.2"));
    CHECK(julia.metadata().empty());
    for (const auto& t : julia.tensors()) {
      INFO(t.name);
      const lora::TensorInfo& u = with_meta.at(t.name);
      CHECK(u.dtype == t.dtype);
      CHECK(u.shape == t.shape);
      CHECK(stored_integers(with_meta, u).size() == t.num_elements());
      std::vector<unsigned char> x(t.end - t.begin), y(u.end - u.begin);
      julia.read_bytes(t, x.data());
      with_meta.read_bytes(u, y.data());
      CHECK(x == y);
    }
  }

  SECTION("a sharded checkpoint and its index") {
    const fs::path d = interop_dir / "fluxml_safetensors_jl_sharded";
    const auto sharded = lora::ShardedSafetensorsReader::open((d / "model.safetensors.index.json").string());
    const auto whole = lora::SafetensorsReader::open(
        (interop_dir / "fluxml_safetensors_jl_non_sharded" / "model.safetensors").string());
    CHECK(sharded.shards().size() == 6);
    CHECK(sharded.weight_map().size() == whole.tensors().size());
    std::uint64_t bytes = 0;
    for (const auto& t : whole.tensors()) {
      INFO(t.name);
      const lora::TensorInfo& s = sharded.at(t.name);
      CHECK(s.dtype == t.dtype);
      CHECK(s.shape == t.shape);
      std::vector<unsigned char> x(t.end - t.begin), y(s.end - s.begin);
      whole.read_bytes(t, x.data());
      sharded.shard_of(t.name).read_bytes(s, y.data());
      CHECK(x == y);
      if (lora::SafetensorsReader::can_convert(t.dtype))
        CHECK(sharded.values<double>(t.name) == whole.values<double>(t.name));
      bytes += s.end - s.begin;
    }
    CHECK(sharded.total_size() == bytes);
    CHECK(sharded.shard_of("bool_357").path() == (d / "model-00003-of-00006.safetensors").string());
    for (const auto& shard : sharded.shards()) {
      CHECK(shard.second.metadata_value("format") == std::string("pt"));
      check_every_tensor_reads_or_is_refused(shard.second);
    }
    CHECK_THAT(error_of([&] { (void)sharded.at("nope"); }),
               Contains("'nope'") && Contains("no such tensor in the index"));
  }

  SECTION("the safetensors PR 84 samples: headers not aligned to 8 bytes, one dtype a file") {
    const fs::path d = interop_dir / "hf_safetensors_pr84_samples";
    const std::map<std::string, Dtype> files = {{"B", Dtype::U8},  {"H", Dtype::U16}, {"I", Dtype::U32},
                                                {"b", Dtype::I8},  {"d", Dtype::F64}, {"e", Dtype::F16},
                                                {"f", Dtype::F32}, {"h", Dtype::I16}, {"i", Dtype::I32}};
    const auto overall = lora::SafetensorsReader::open((d / "overall.safetensors").string());
    CHECK(overall.tensors().size() == files.size());
    for (const auto& kv : files) {
      INFO(kv.first);
      const auto r = lora::SafetensorsReader::open((d / (kv.first + ".safetensors")).string());
      REQUIRE(r.tensors().size() == 1);
      const lora::TensorInfo& t = r.tensors().front();
      CHECK(t.name == kv.first);
      CHECK(t.dtype == kv.second);
      CHECK(t.shape == std::vector<std::uint64_t>{6});
      CHECK(r.metadata_value("test") == std::string("a"));
      CHECK(overall.at(kv.first).dtype == kv.second);
      // Each holds -3 .. 2 (the unsigned ones wrapped).
      const std::uint64_t size = lora::dtype_size(t.dtype);
      const bool is_unsigned = t.dtype == Dtype::U8 || t.dtype == Dtype::U16 || t.dtype == Dtype::U32;
      for (const auto* file : {&r, &overall}) {
        if (lora::SafetensorsReader::can_convert(t.dtype)) {
          CHECK(file->values<double>(kv.first) == std::vector<double>{-3, -2, -1, 0, 1, 2});
          CHECK(file->values<float>(kv.first) == std::vector<float>{-3, -2, -1, 0, 1, 2});
        } else {
          const auto v = stored_integers(*file, file->at(kv.first));
          for (int i = 0; i < 6; ++i)
            CHECK(v[i] ==
                  (is_unsigned && i < 3 ? static_cast<std::int64_t>((std::uint64_t{1} << (8 * size)) - 3 + i) : i - 3));
          CHECK_THAT(error_of([&] { (void)file->values<float>(kv.first); }),
                     Contains(std::string("dtype ") + lora::to_string(t.dtype) + " cannot be converted"));
        }
      }
    }
  }

  SECTION("IREE's files: no tensors at all (header {}), one and several F32") {
    const fs::path d = interop_dir / "iree_testdata";
    const auto empty = lora::SafetensorsReader::open((d / "empty.safetensors").string());
    CHECK(empty.tensors().empty());
    CHECK(empty.metadata().empty());
    const auto single = lora::SafetensorsReader::open((d / "single.safetensors").string());
    REQUIRE(single.tensors().size() == 1);
    CHECK(single.matrix<float>("tensor0", 2, 2) == lora::Matrix<float>::Zero(2, 2));
    const auto multiple = lora::SafetensorsReader::open((d / "multiple.safetensors").string());
    CHECK(multiple.tensors().size() == 3);
    CHECK(multiple.matrix<double>("tensor1").rows() == 1);
    CHECK(multiple.matrix<double>("tensor2").cols() == 3);
    check_every_tensor_reads_or_is_refused(multiple);
  }

  SECTION("candle's examples: I64 and U8 tensors") {
    const fs::path d = interop_dir / "candle_examples";
    const auto codes = lora::SafetensorsReader::open((d / "jfk-codes.safetensors").string());
    CHECK(codes.at("codes").dtype == Dtype::I64);
    CHECK(codes.at("codes").shape == std::vector<std::uint64_t>{1, 2, 828});
    const auto voices = lora::SafetensorsReader::open((d / "voices.safetensors").string());
    CHECK(voices.at("tokens").shape == std::vector<std::uint64_t>{1, 982, 33});
    CHECK(voices.at("mask").dtype == Dtype::U8);
    for (std::int64_t m : stored_integers(voices, voices.at("mask"))) CHECK((m == 0 || m == 1));
    check_every_tensor_reads_or_is_refused(codes);
    check_every_tensor_reads_or_is_refused(voices);
  }
}

TEST_CASE("a sharded index is checked against its shards", "[files][safetensors]") {
  TempDir d;
  lora::SafetensorsWriter a, b;
  a.add("x", lora::Matrix<float>::Ones(2, 3));
  b.add("y", lora::Matrix<float>::Ones(1, 2));
  b.add("z", lora::Matrix<float>::Ones(1, 1));
  a.save(d / "s1.safetensors");
  b.save(d / "s2.safetensors");
  auto index = [&](const std::string& map) {
    write_file(d / "index.json", R"({"metadata": {"total_size": 36}, "weight_map": )" + map + "}");
    return d / "index.json";
  };
  const auto ok = lora::ShardedSafetensorsReader::open(
      index(R"({"x": "s1.safetensors", "y": "s2.safetensors", "z": "s2.safetensors"})"));
  CHECK(ok.values<float>("y") == std::vector<float>{1, 1});
  CHECK(ok.total_size() == 36u);
  auto fault = [&](const std::string& map) {
    return error_of([&] { (void)lora::ShardedSafetensorsReader::open(index(map)); });
  };
  CHECK_THAT(fault(R"({"x": "s1.safetensors", "y": "s2.safetensors"})"),
             Contains("ShardedSafetensorsReader::open") && Contains("'z'") && Contains("does not list it"));
  CHECK_THAT(fault(R"({"x": "s1.safetensors", "y": "s2.safetensors", "z": "s1.safetensors"})"),
             Contains("'z'") && Contains("not in it"));
  CHECK_THAT(fault(R"({"x": "s1.safetensors", "y": "s2.safetensors", "z": "s3.safetensors"})"),
             Contains("s3.safetensors") && Contains("cannot open"));
  CHECK_THAT(fault(R"({"x": "../s1.safetensors"})"), Contains("not a file name in the index's directory"));
  CHECK_THAT(fault(R"({"x": 1})"), Contains("'x'") && Contains("not a string"));
  CHECK_THAT(fault(R"([])"), Contains("weight_map"));
  write_file(d / "index.json", "{\"weight_map\": ");
  CHECK_THAT(error_of([&] { (void)lora::ShardedSafetensorsReader::open(d / "index.json"); }),
             Contains("not valid JSON"));
}
