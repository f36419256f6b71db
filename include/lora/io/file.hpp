// lora.hpp: POSIX file access for the I/O layer: a checked reader (regular files only, every read
// bounds-checked), an atomic writer (temporary file in the same directory, fsync, rename), and
// replace_files_together(), which replaces several files of a directory as one unit (see there).
#pragma once

#include <lora/io/error.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/syscall.h>
#endif

namespace lora {
namespace detail {

inline std::string errno_text(int err) { return std::generic_category().message(err); }

// A regular file opened for reading. Directories, FIFOs and devices are refused (reading /dev/zero or
// a pipe could allocate or block without end; the open itself is non-blocking, so a FIFO without a
// writer cannot hang it). Every read checks its range against the size taken at open and fails on a
// short read (the file shrank), so nothing is read out of bounds.
class ReadOnlyFile {
 public:
  ReadOnlyFile(std::string path, const char* where) : path_(std::move(path)) {
    do fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    while (fd_ < 0 && errno == EINTR);
    if (fd_ < 0) io_fail(where, path_, "", "cannot open: ", errno_text(errno));
    struct stat st {};
    if (::fstat(fd_, &st) != 0) {
      const int err = errno;
      ::close(fd_);
      io_fail(where, path_, "", "cannot stat: ", errno_text(err));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd_);
      io_fail(where, path_, "", "not a regular file");
    }
    size_ = static_cast<std::uint64_t>(st.st_size);
    const int flags = ::fcntl(fd_, F_GETFL);
    if (flags >= 0) ::fcntl(fd_, F_SETFL, flags & ~O_NONBLOCK);
  }
  ReadOnlyFile(const ReadOnlyFile&) = delete;
  ReadOnlyFile& operator=(const ReadOnlyFile&) = delete;
  ~ReadOnlyFile() {
    if (fd_ >= 0) ::close(fd_);
  }

  std::uint64_t size() const { return size_; }
  const std::string& path() const { return path_; }

  void read_at(std::uint64_t offset, void* dst, std::size_t n, const char* where, const std::string& tensor) const {
    if (offset > size_ || n > size_ - offset)
      io_fail(where, path_, tensor, "read of ", n, " bytes at offset ", offset, " is past the end of the file (",
              size_, " bytes)");
    auto* out = static_cast<unsigned char*>(dst);
    while (n > 0) {
      const std::size_t chunk = n < (std::size_t{1} << 30) ? n : (std::size_t{1} << 30);
      const ssize_t got = ::pread(fd_, out, chunk, static_cast<off_t>(offset));
      if (got < 0 && errno == EINTR) continue;
      if (got < 0) io_fail(where, path_, tensor, "read failed: ", errno_text(errno));
      if (got == 0) io_fail(where, path_, tensor, "the file shrank while being read");
      out += got;
      offset += static_cast<std::uint64_t>(got);
      n -= static_cast<std::size_t>(got);
    }
  }

 private:
  std::string path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
};

// Called by AtomicFileWriter after each block reaches the temporary file, with the bytes written so
// far. A testing seam only (the crash-safety test pauses or fails a writer midway); null by default.
using AtomicWriteHook = void (*)(const std::string& temp_path, std::uint64_t bytes_written);
inline AtomicWriteHook& atomic_write_hook() {
  static AtomicWriteHook hook = nullptr;
  return hook;
}

// Writes `path` atomically: the bytes go to a new temporary file in the same directory, which
// finish() flushes and fsyncs and publish() renames over `path` (then fsyncs the directory). Readers
// see the old file or the new one, never a mix. If the writer is destroyed before publish() (an
// exception), the temporary file is removed; only a killed process leaves one behind, named
// ".<name>.tmp.<pid>.<n>". The new file gets the permissions of a plain create (0666 & ~umask).
class AtomicFileWriter {
 public:
  AtomicFileWriter(std::string path, const char* where) : path_(std::move(path)), where_(where) {
    namespace fs = std::filesystem;
    const fs::path target(path_);
    const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
    dir_ = dir.string();
    static std::atomic<unsigned> counter{0};
    for (int attempt = 0; attempt < 100 && fd_ < 0; ++attempt) {
      struct timespec ts {};
      ::clock_gettime(CLOCK_MONOTONIC, &ts);
      temp_ = (dir / concat(".", target.filename().string(), ".tmp.", ::getpid(), ".", ++counter,
                            static_cast<unsigned>(ts.tv_nsec) % 100000u))
                  .string();
      fd_ = ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
      if (fd_ < 0 && errno != EEXIST && errno != EINTR)
        io_fail(where_, path_, "", "cannot create a temporary file in '", dir_, "': ", errno_text(errno));
    }
    if (fd_ < 0) io_fail(where_, path_, "", "cannot create a unique temporary file in '", dir_, "'");
    buffer_.reserve(block_size);
  }
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  ~AtomicFileWriter() {
    if (fd_ >= 0) ::close(fd_);
    if (!published_) ::unlink(temp_.c_str());
  }

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return temp_; }

  void write(const void* data, std::size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    while (n > 0) {
      const std::size_t take = std::min(n, block_size - buffer_.size());
      buffer_.insert(buffer_.end(), p, p + take);
      p += take;
      n -= take;
      if (buffer_.size() == block_size) flush();
    }
  }

  // Flushes, fsyncs and closes the temporary file.
  void finish() {
    flush();
    while (::fsync(fd_) != 0)
      if (errno != EINTR) io_fail(where_, path_, "", "fsync of the temporary file failed: ", errno_text(errno));
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0 && errno != EINTR)
      io_fail(where_, path_, "", "close of the temporary file failed: ", errno_text(errno));
  }

  // Renames the finished temporary file over the target and fsyncs the directory.
  void publish() {
    if (fd_ >= 0) finish();
    if (::rename(temp_.c_str(), path_.c_str()) != 0)
      io_fail(where_, path_, "", "cannot rename the temporary file into place: ", errno_text(errno));
    published_ = true;
    const int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      const int rc = ::fsync(dfd);
      const int err = errno;
      ::close(dfd);
      if (rc != 0 && err != EINVAL && err != EINTR)  // EINVAL: the file system cannot sync directories
        io_fail(where_, path_, "", "fsync of the directory failed: ", errno_text(err));
    }
  }

  void commit() {
    finish();
    publish();
  }

 private:
  static constexpr std::size_t block_size = std::size_t{1} << 20;

  void flush() {
    const unsigned char* p = buffer_.data();
    std::size_t n = buffer_.size();
    while (n > 0) {
      const ssize_t put = ::write(fd_, p, n);
      if (put < 0 && errno == EINTR) continue;
      if (put < 0) io_fail(where_, path_, "", "write failed: ", errno_text(errno));
      if (put == 0) io_fail(where_, path_, "", "write made no progress");
      p += put;
      n -= static_cast<std::size_t>(put);
      written_ += static_cast<std::uint64_t>(put);
    }
    buffer_.clear();
    if (AtomicWriteHook hook = atomic_write_hook()) hook(temp_, written_);
  }

  std::string path_, dir_, temp_;
  const char* where_;
  int fd_ = -1;
  bool published_ = false;
  std::uint64_t written_ = 0;
  std::vector<unsigned char> buffer_;
};

// ---- Replacing several files of a directory as one unit ----------------------------------------------
//
// replace_files_together(dir, files) writes `files` into a new sibling directory of `dir` (same parent,
// named ".<name>.lora-new.<pid>.<n>"), hard-links every other entry of `dir` into it (subdirectories are
// recreated with their mode, owner and times, and their files linked), fsyncs the new files and every
// new directory, then swaps it in with one renameat2(RENAME_EXCHANGE) and fsyncs the parent. The old
// tree, now under the sibling's name, is then retired: its replaced files are deleted, the links it
// shares with the new tree are dropped, and anything the new tree lacks (an entry created by someone else
// during the save) is moved into it. A reader of `dir` sees the old set of files or the new one, never a
// mix, and every other entry of `dir` keeps its inode (content, mode, owner, times).
//   - A first save (no `dir` yet) renames the sibling into place.
//   - Without RENAME_EXCHANGE (EINVAL / ENOSYS: NFS, CIFS, older ZFS, non-Linux systems): `dir` is renamed
//     to ".<name>.lora-old.<pid>.<n>", then the sibling to `dir`. Still never a mix; a crash between the
//     two renames leaves no `dir`, the old tree intact under its .lora-old name, and the next
//     replace_files_together() into `dir` renames it back first.
//   - When a sibling cannot be used (parent not writable, `dir` a mount point or holding one, hard links
//     refused, the working directory inside `dir`): file by file, each atomic (temporary, fsync, rename),
//     in the order given. A crash between two renames then leaves the first files new and the rest old.
// Any exception before the swap is durable (the parent's fsync) undoes it: `dir` is left as it was (the
// same inode) and the sibling is removed. A killed process leaves its sibling; the next call for `dir`
// retires it as above, so nothing but replaced files is ever deleted. Each save holds an flock on its
// sibling and on `dir` (waiting for another save of the same `dir`); a locked sibling is never touched.
// Not carried over to recreated directories: extended attributes and ACLs (files keep theirs).

// An owned file descriptor.
class FileDescriptor {
 public:
  FileDescriptor() = default;
  explicit FileDescriptor(int fd) : fd_(fd) {}
  FileDescriptor(FileDescriptor&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  FileDescriptor& operator=(FileDescriptor&& other) noexcept {
    if (this != &other) {
      reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
  ~FileDescriptor() { reset(); }
  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  int release() { return std::exchange(fd_, -1); }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// Opens a directory relative to `at`; with `no_follow`, a symlink is refused (ELOOP / ENOTDIR).
inline FileDescriptor open_directory(int at, const char* name, bool no_follow = true) {
  int fd;
  do fd = ::openat(at, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC | (no_follow ? O_NOFOLLOW : 0));
  while (fd < 0 && errno == EINTR);
  return FileDescriptor(fd);
}

// fsync of a directory: 0 or the errno. EINVAL (the file system cannot sync directories) counts as done.
inline int sync_directory(int fd) {
  while (::fsync(fd) != 0) {
    if (errno == EINTR) continue;
    return errno == EINVAL ? 0 : errno;
  }
  return 0;
}

// The names in a directory ("." and ".." left out); false, with errno set, if it cannot be read.
inline bool list_directory(int dir_fd, std::vector<std::string>& names) {
  FileDescriptor own = open_directory(dir_fd, ".");  // an offset of its own
  if (!own) return false;
  DIR* d = ::fdopendir(own.get());
  if (!d) return false;
  own.release();
  errno = 0;
  while (const dirent* e = ::readdir(d)) {
    if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) names.emplace_back(e->d_name);
    errno = 0;
  }
  const int err = errno;
  ::closedir(d);
  errno = err;
  return err == 0;
}

// Exchanges two names of one directory atomically. 0 or the errno; EINVAL or ENOSYS: not supported here.
inline int rename_exchange(int dir_fd, const char* a, const char* b) {
#if defined(__linux__) && defined(SYS_renameat2)
  constexpr unsigned exchange_flag = 1u << 1;  // RENAME_EXCHANGE of <linux/fs.h>, Linux 3.15
  if (::syscall(SYS_renameat2, dir_fd, a, dir_fd, b, exchange_flag) == 0) return 0;
  return errno;
#else
  (void)dir_fd, (void)a, (void)b;
  return ENOSYS;
#endif
}

// An exclusive flock without waiting; false if another open file holds one (or locks are unsupported).
inline bool try_lock(int fd) {
  while (::flock(fd, LOCK_EX | LOCK_NB) != 0)
    if (errno != EINTR) return false;
  return true;
}

// The points between the steps of replace_files_together(), in order (`file_written` once per file).
enum class ReplaceStep {
  started,          // stale siblings retired, nothing written yet
  sibling_created,  // the empty sibling directory exists
  file_written,     // one new file complete and fsynced (in the sibling, or as a temporary in `dir`)
  entries_linked,   // the other entries linked into the sibling, every directory of it fsynced
  old_moved_away,   // without RENAME_EXCHANGE: `dir` renamed to its .lora-old name, so absent
  swapped,          // the sibling is `dir` now (exchanged, or renamed in)
  file_published,   // file by file: one temporary renamed over its file (once per file)
  committed,        // the parent (file by file: `dir`) fsynced; the new files are durable
  finished,         // the old tree retired
};

inline const char* to_string(ReplaceStep s) {
  switch (s) {
    case ReplaceStep::started:
      return "started";
    case ReplaceStep::sibling_created:
      return "sibling_created";
    case ReplaceStep::file_written:
      return "file_written";
    case ReplaceStep::entries_linked:
      return "entries_linked";
    case ReplaceStep::old_moved_away:
      return "old_moved_away";
    case ReplaceStep::swapped:
      return "swapped";
    case ReplaceStep::file_published:
      return "file_published";
    case ReplaceStep::committed:
      return "committed";
    case ReplaceStep::finished:
      return "finished";
  }
  return "?";
}

// Testing seams, inert by default: `step` is called at each ReplaceStep (the crash tests exit or throw
// there); the flags make a save behave as on a file system without RENAME_EXCHANGE, or as where no
// sibling directory can be used.
struct ReplaceTesting {
  void (*step)(ReplaceStep) = nullptr;
  bool without_exchange = false;
  bool file_by_file = false;
};
inline ReplaceTesting& replace_testing() {
  static ReplaceTesting testing;
  return testing;
}
inline void replace_step(ReplaceStep s) {
  if (void (*f)(ReplaceStep) = replace_testing().step) f(s);
}

// One file for replace_files_together(): its name in the directory and a function writing its bytes
// (called again if a first attempt through the sibling had to give way to file by file).
struct NewFile {
  std::string name;
  std::function<void(AtomicFileWriter&)> write;
};

inline constexpr const char* sibling_new_tag = ".lora-new.";
inline constexpr const char* sibling_old_tag = ".lora-old.";

// Whether `entry` is exactly "." name tag <digits> "." <digits>, a sibling this code made for `name`.
inline bool is_sibling_of(const std::string& entry, const std::string& name, const char* tag) {
  const std::string prefix = "." + name + tag;
  if (entry.size() <= prefix.size() || entry.compare(0, prefix.size(), prefix) != 0) return false;
  int dots = 0;
  bool digit_before = false;
  for (std::size_t i = prefix.size(); i < entry.size(); ++i) {
    const char c = entry[i];
    if (c >= '0' && c <= '9') {
      digit_before = true;
    } else if (c == '.' && digit_before && dots == 0) {
      ++dots;
      digit_before = false;
    } else {
      return false;
    }
  }
  return dots == 1 && digit_before;
}

// Whether `entry` is one of the files being replaced, or an AtomicFileWriter temporary of one.
inline bool is_replaced_file(const std::string& entry, const std::set<std::string>& files) {
  if (files.count(entry)) return true;
  for (const std::string& f : files)
    if (is_sibling_of(entry, f, ".tmp.")) return true;
  return false;
}

inline std::string sibling_name(const std::string& name, const char* tag) {
  static std::atomic<unsigned> counter{0};
  struct timespec ts {};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return concat(".", name, tag, ::getpid(), ".", ++counter, static_cast<unsigned>(ts.tv_nsec) % 100000u);
}

// errnos after which the sibling cannot be used here but writing file by file may still work.
inline bool sibling_unusable(int err) {
  return err == EPERM || err == EACCES || err == EXDEV || err == EBUSY || err == EMLINK || err == EOPNOTSUPP ||
         err == ENOTSUP || err == ENOSYS || err == EINVAL;
}

// Gives a recreated directory the mode, owner and (with `times`) the times of the one it mirrors.
inline void copy_directory_attributes(int fd, const struct stat& from, bool times) {
  struct stat now {};
  if (::fstat(fd, &now) == 0 && (now.st_uid != from.st_uid || now.st_gid != from.st_gid))
    (void)!::fchown(fd, from.st_uid, from.st_gid);  // best effort: only root may give a directory away
  ::fchmod(fd, from.st_mode & 07777);
  if (times) {
    const struct timespec t[2] = {from.st_atim, from.st_mtim};
    ::futimens(fd, t);
  }
}

// Hard-links every entry of `from` into `to` (skipping `skip`, top level only), recreating directories;
// fsyncs each directory it makes. 0 or the errno of the first failure (EXDEV: a mount point inside).
inline int mirror_entries(int from, int to, const std::set<std::string>* skip, dev_t dev) {
  std::vector<std::string> names;
  if (!list_directory(from, names)) return errno;
  for (const std::string& name : names) {
    if (skip && skip->count(name)) continue;
    const char* n = name.c_str();
    struct stat st {};
    if (::fstatat(from, n, &st, AT_SYMLINK_NOFOLLOW) != 0) {
      if (errno == ENOENT) continue;  // removed meanwhile
      return errno;
    }
    if (st.st_dev != dev) return EXDEV;
    if (!S_ISDIR(st.st_mode)) {
      if (::linkat(from, n, to, n, 0) != 0) return errno;  // a symlink is linked, not followed
      continue;
    }
    if (::mkdirat(to, n, 0700) != 0) return errno;
    const FileDescriptor src = open_directory(from, n);
    if (!src) return errno;
    const FileDescriptor dst = open_directory(to, n);
    if (!dst) return errno;
    if (const int err = mirror_entries(src.get(), dst.get(), nullptr, dev)) return err;
    copy_directory_attributes(dst.get(), st, true);
    if (const int err = sync_directory(dst.get())) return err;
  }
  return 0;
}

// Retires the tree `old_fd` that `new_fd` replaced: entries `new_fd` lacks are moved into it (created
// during the save, or their only copy), entries both hold (the same inode) are unlinked, and so are the
// replaced files `ours` (top level only); directories present in both are retired recursively. Anything
// else (another entry under a name `new_fd` also uses) stays. True if `old_fd` was emptied. The
// temporaries of the replaced files count as replaced files.
inline bool retire_entries(int old_fd, int new_fd, const std::set<std::string>* ours) {
  std::vector<std::string> names;
  if (!list_directory(old_fd, names)) return false;
  bool emptied = true;
  for (const std::string& name : names) {
    const char* n = name.c_str();
    struct stat so {};
    struct stat sn {};
    bool gone = false;
    if (::fstatat(old_fd, n, &so, AT_SYMLINK_NOFOLLOW) != 0) {
      gone = errno == ENOENT;
    } else if (ours && !S_ISDIR(so.st_mode) && is_replaced_file(name, *ours)) {
      gone = ::unlinkat(old_fd, n, 0) == 0 || errno == ENOENT;
    } else if (::fstatat(new_fd, n, &sn, AT_SYMLINK_NOFOLLOW) != 0) {
      gone = errno == ENOENT && ::renameat(old_fd, n, new_fd, n) == 0;
    } else if (!S_ISDIR(so.st_mode) && so.st_dev == sn.st_dev && so.st_ino == sn.st_ino) {
      gone = ::unlinkat(old_fd, n, 0) == 0;
    } else if (S_ISDIR(so.st_mode) && S_ISDIR(sn.st_mode)) {
      const FileDescriptor o = open_directory(old_fd, n), m = open_directory(new_fd, n);
      gone = o && m && retire_entries(o.get(), m.get(), nullptr) && ::unlinkat(old_fd, n, AT_REMOVEDIR) == 0;
    }
    emptied = emptied && gone;  // an entry not gone is kept where it is
  }
  return emptied;
}

// Before a save into `name`: if it is absent but a killed save left it under its .lora-old name (the
// window without RENAME_EXCHANGE), renames it back; then, if `name` exists, retires every unlocked
// sibling against it. Returns the target, open and locked (invalid if there is none).
inline FileDescriptor open_target_and_retire_siblings(int parent_fd, const std::string& name, const std::string& path,
                                                      const std::set<std::string>& ours, const char* where) {
  std::vector<std::string> entries;
  if (!list_directory(parent_fd, entries))
    io_fail(where, path, "", "cannot list the parent directory: ", errno_text(errno));
  std::sort(entries.begin(), entries.end());
  struct stat st {};
  if (::fstatat(parent_fd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) {
    for (const std::string& e : entries) {
      if (!is_sibling_of(e, name, sibling_old_tag)) continue;
      const FileDescriptor fd = open_directory(parent_fd, e.c_str());
      if (fd && try_lock(fd.get()) && ::renameat(parent_fd, e.c_str(), parent_fd, name.c_str()) == 0) break;
    }
  }
  // The target, locked; a concurrent save of it holds the lock until it is done, then the name may
  // stand for its new tree, so the identity is checked after the wait.
  FileDescriptor target;
  for (int attempt = 0;; ++attempt) {
    target = open_directory(parent_fd, name.c_str());
    if (!target) {
      if (errno == ENOENT) return target;
      io_fail(where, path, "", "cannot open the directory: ", errno_text(errno));
    }
    // Without locks (some network file systems) the save goes on unlocked.
    while (::flock(target.get(), LOCK_EX) != 0 && errno == EINTR) continue;
    struct stat a {};
    struct stat b {};
    if (::fstat(target.get(), &a) == 0 && ::fstatat(parent_fd, name.c_str(), &b, AT_SYMLINK_NOFOLLOW) == 0 &&
        a.st_dev == b.st_dev && a.st_ino == b.st_ino)
      break;
    if (attempt == 100) io_fail(where, path, "", "the directory keeps being replaced by other processes");
  }
  for (const std::string& e : entries) {
    if (!is_sibling_of(e, name, sibling_new_tag) && !is_sibling_of(e, name, sibling_old_tag)) continue;
    const FileDescriptor fd = open_directory(parent_fd, e.c_str());
    if (!fd || !try_lock(fd.get())) continue;  // a save in progress
    if (retire_entries(fd.get(), target.get(), &ours)) ::unlinkat(parent_fd, e.c_str(), AT_REMOVEDIR);
  }
  // Temporaries a killed file-by-file save left in the target (".<file>.tmp.<pid>.<n>"): saves of this
  // directory wait for the lock, so only a writer that takes none could still own one; it would be alive.
  std::vector<std::string> inside;
  if (list_directory(target.get(), inside))
    for (const std::string& e : inside) {
      if (ours.count(e) || !is_replaced_file(e, ours)) continue;
      const std::size_t digits = e.rfind(".tmp.") + 5;
      const long pid = std::strtol(e.c_str() + digits, nullptr, 10);
      if (pid > 0 && pid != ::getpid() && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH)
        ::unlinkat(target.get(), e.c_str(), 0);
    }
  return target;
}

// The directory to replace: absolute, symlinks resolved (a link to a directory keeps pointing to it and
// the directory it names is replaced), its parent created.
struct ReplaceTarget {
  std::string path, parent, name;
};
inline ReplaceTarget resolve_replace_target(const std::string& dir, const char* where) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path p = fs::absolute(fs::path(dir), ec);
  if (!ec) p = fs::weakly_canonical(p, ec);
  if (ec) io_fail(where, dir, "", "cannot resolve the path: ", ec.message());
  if (p.filename().empty()) p = p.parent_path();  // a trailing separator
  fs::create_directories(p.parent_path(), ec);
  if (ec) io_fail(where, dir, "", "cannot create the parent directory: ", ec.message());
  return {p.string(), p.parent_path().string(), p.filename().string()};
}

// Through a sibling directory (see above). False, with nothing changed, where a sibling cannot be used.
inline bool replace_through_sibling(int parent_fd, const ReplaceTarget& t, const FileDescriptor& old,
                                    const std::vector<NewFile>& files, const std::set<std::string>& ours,
                                    const char* where) {
  enum class State { building, renamed_in, exchanged, moved_away, moved_in, committed };
  std::string sibling;
  FileDescriptor fd;
  for (int attempt = 0; attempt < 100 && !fd; ++attempt) {
    sibling = sibling_name(t.name, sibling_new_tag);
    if (::mkdirat(parent_fd, sibling.c_str(), 0777) != 0) {
      if (errno == EEXIST || errno == EINTR) continue;
      if (sibling_unusable(errno)) return false;
      io_fail(where, t.path, "", "cannot create a directory in '", t.parent, "': ", errno_text(errno));
    }
    fd = open_directory(parent_fd, sibling.c_str());
    if (!fd) io_fail(where, t.path, "", "cannot open the new directory '", sibling, "': ", errno_text(errno));
  }
  if (!fd) io_fail(where, t.path, "", "cannot create a uniquely named directory in '", t.parent, "'");
  try_lock(fd.get());
  const std::string sibling_path = (std::filesystem::path(t.parent) / sibling).string();
  const std::string old_name = sibling_name(t.name, sibling_old_tag);
  const char* name = t.name.c_str();
  State state = State::building;
  std::string old_tree;  // where the old tree is once swapped out
  // Undoes everything but a committed swap; never throws.
  auto undo = [&]() noexcept {
    bool restored = true;
    if (state == State::exchanged) restored = rename_exchange(parent_fd, sibling.c_str(), name) == 0;
    if (state == State::moved_in || state == State::renamed_in)
      restored = ::renameat(parent_fd, name, parent_fd, sibling.c_str()) == 0;
    if ((state == State::moved_in && restored) || state == State::moved_away)
      restored = ::renameat(parent_fd, old_name.c_str(), parent_fd, name) == 0;
    if (!restored) return;  // the new tree stays in place; the old one is a stale sibling
    std::error_code ec;
    std::filesystem::remove_all(sibling_path, ec);  // only the new files and links to entries of `dir`
  };
  try {
    replace_step(ReplaceStep::sibling_created);
    for (const NewFile& f : files) {
      AtomicFileWriter file((std::filesystem::path(sibling_path) / f.name).string(), where);
      f.write(file);
      file.commit();
      replace_step(ReplaceStep::file_written);
    }
    if (old) {
      struct stat st {};
      if (::fstat(old.get(), &st) != 0) io_fail(where, t.path, "", "cannot stat the directory: ", errno_text(errno));
      if (const int err = mirror_entries(old.get(), fd.get(), &ours, st.st_dev)) {
        if (!sibling_unusable(err))
          io_fail(where, t.path, "", "cannot link the directory's other entries into '", sibling_path,
                  "': ", errno_text(err));
        undo();
        return false;
      }
      copy_directory_attributes(fd.get(), st, false);
    }
    if (const int err = sync_directory(fd.get()))
      io_fail(where, t.path, "", "fsync of '", sibling_path, "' failed: ", errno_text(err));
    replace_step(ReplaceStep::entries_linked);

    if (!old) {
      if (::renameat(parent_fd, sibling.c_str(), parent_fd, name) != 0) {
        const int err = errno;
        if (err == EEXIST || err == ENOTEMPTY)
          io_fail(where, t.path, "", "the directory was created by another process during the save");
        io_fail(where, t.path, "", "cannot rename '", sibling_path, "' into place: ", errno_text(err));
      }
      state = State::renamed_in;
    } else {
      int err = replace_testing().without_exchange ? EINVAL : rename_exchange(parent_fd, sibling.c_str(), name);
      if (err == 0) {
        state = State::exchanged;
        old_tree = sibling;
      } else if (err == EINVAL || err == ENOSYS) {
        if (::renameat(parent_fd, name, parent_fd, old_name.c_str()) != 0) {
          err = errno;
          if (!sibling_unusable(err))
            io_fail(where, t.path, "", "cannot rename the directory aside: ", errno_text(err));
          undo();
          return false;
        }
        state = State::moved_away;
        old_tree = old_name;
        replace_step(ReplaceStep::old_moved_away);
        if (::renameat(parent_fd, sibling.c_str(), parent_fd, name) != 0)
          io_fail(where, t.path, "", "cannot rename '", sibling_path, "' into place: ", errno_text(errno));
        state = State::moved_in;
      } else {
        if (!sibling_unusable(err))  // EBUSY / EXDEV: a mount point; EPERM: a sticky parent
          io_fail(where, t.path, "", "cannot exchange '", sibling_path, "' with the directory: ", errno_text(err));
        undo();
        return false;
      }
    }
    replace_step(ReplaceStep::swapped);
    if (const int err = sync_directory(parent_fd))
      io_fail(where, t.path, "", "fsync of '", t.parent, "' failed: ", errno_text(err));
    state = State::committed;
  } catch (...) {
    if (state != State::committed) undo();
    throw;
  }
  replace_step(ReplaceStep::committed);
  if (old && retire_entries(old.get(), fd.get(), &ours)) ::unlinkat(parent_fd, old_tree.c_str(), AT_REMOVEDIR);
  replace_step(ReplaceStep::finished);
  return true;
}

// File by file: each new file atomic, the renames in the order of `files`.
inline void replace_file_by_file(const ReplaceTarget& t, const std::vector<NewFile>& files, const char* where) {
  std::error_code ec;
  std::filesystem::create_directories(t.path, ec);
  if (ec) io_fail(where, t.path, "", "cannot create the directory: ", ec.message());
  std::vector<std::unique_ptr<AtomicFileWriter>> writers;
  for (const NewFile& f : files) {
    writers.push_back(std::make_unique<AtomicFileWriter>((std::filesystem::path(t.path) / f.name).string(), where));
    f.write(*writers.back());
    writers.back()->finish();
    replace_step(ReplaceStep::file_written);
  }
  for (auto& w : writers) {
    w->publish();  // renames, then fsyncs the directory
    replace_step(ReplaceStep::file_published);
  }
  replace_step(ReplaceStep::committed);
  replace_step(ReplaceStep::finished);
}

// Replaces `files` in directory `dir` (created if missing) as one unit, keeping every other entry of it;
// see the top of this section for the steps, the fallbacks and what each guarantees.
inline void replace_files_together(const std::string& dir, const std::vector<NewFile>& files, const char* where) {
  namespace fs = std::filesystem;
  const ReplaceTarget t = resolve_replace_target(dir, where);
  std::set<std::string> ours;
  for (const NewFile& f : files) ours.insert(f.name);
  bool by_file = replace_testing().file_by_file || t.name.empty();  // the root cannot be renamed
  {  // a process working inside `dir` would be left in the deleted old tree
    std::error_code ec;
    const std::string cwd = fs::current_path(ec).string() + "/";
    by_file = by_file || (!ec && cwd.compare(0, t.path.size() + 1, t.path + "/") == 0);
  }
  const FileDescriptor parent = open_directory(AT_FDCWD, t.parent.c_str(), false);
  if (!parent) io_fail(where, t.path, "", "cannot open the parent directory: ", errno_text(errno));
  const FileDescriptor old = open_target_and_retire_siblings(parent.get(), t.name, t.path, ours, where);
  if (old) {
    struct stat a {};
    struct stat b {};
    by_file = by_file || ::fstat(old.get(), &a) != 0 || ::fstat(parent.get(), &b) != 0 || a.st_dev != b.st_dev;
  }
  replace_step(ReplaceStep::started);
  if (!by_file && replace_through_sibling(parent.get(), t, old, files, ours, where)) return;
  replace_file_by_file(t, files, where);
}

// Reads a whole small file (a JSON config) after checking its size against `max_bytes`.
inline std::string read_small_file(const std::string& path, std::uint64_t max_bytes, const char* where) {
  ReadOnlyFile file(path, where);
  if (file.size() > max_bytes)
    io_fail(where, path, "", "file has ", file.size(), " bytes, more than the limit of ", max_bytes);
  std::string text(static_cast<std::size_t>(file.size()), '\0');
  if (!text.empty()) file.read_at(0, text.data(), text.size(), where, "");
  return text;
}

}  // namespace detail
}  // namespace lora
