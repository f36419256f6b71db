// Files on disk: adapter directories replaced as a pair (a kill and an exception at every step of a
// save), byte counts that overflow, and float8.
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
using lora::detail::ReplaceStep;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    std::string templ = (fs::temp_directory_path() / "lora_files_XXXXXX").string();
    REQUIRE(::mkdtemp(templ.data()) != nullptr);
    path = templ;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
};

std::string read_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

void write_file(const fs::path& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f << bytes;
}

std::vector<std::string> listing(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

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
  lora::LoraModelView<float> old_view{{{"fc", &old_layer}}, {}};
  lora::LoraModelView<float> new_view{{{"fc", &new_layer}}, {}};

  // "old", "new", "mixed" (weights of one, config of the other, or anything else), or "unreadable".
  std::string state_of(const std::string& dir) const {
    lora::LoraLinearf fresh(W, adapter_config(1, 3));
    const lora::LoraModelView<float> view{{{"fc", &fresh}}, {}};
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
  bad.B()(0, 0) = NAN;
  const lora::LoraModelView<float> bad_view{{{"fc", &bad}}, {}};
  CHECK_THROWS_WITH(lora::save_adapter(ad, bad_view), Contains("NaN or Inf"));
  CHECK(listing(root.path) == std::vector<std::string>{"adapter"});
  CHECK(read_file(ad + "/adapter_model.safetensors") == weights);

  // A write that fails inside the sibling (a file-size limit: EFBIG) is an io_error, and undone.
  for (Mode mode : {Mode::exchange, Mode::file_by_file}) {
    INFO("mode " << to_string(mode));
    lora::LoraLinearf big(lora::Matrix<float>::Random(256, 256), adapter_config(16, 4));
    const lora::LoraModelView<float> big_view{{{"fc", &big}}, {}};
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
