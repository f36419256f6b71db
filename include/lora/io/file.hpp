// lora.hpp: POSIX file access for the I/O layer: a checked reader (regular files only, every read
// bounds-checked) and an atomic writer (temporary file in the same directory, fsync, rename).
#pragma once

#include <lora/io/error.hpp>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

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
