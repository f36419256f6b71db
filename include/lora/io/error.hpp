// lora.hpp: io_error, the exception every file operation throws.
#pragma once

#include <lora/common.hpp>

#include <stdexcept>
#include <string>
#include <utility>

namespace lora {

// A file could not be read or written, or its content is invalid. Derived from std::runtime_error
// (not std::invalid_argument): the fault is in a file or the file system, not in an argument.
// The message names the function, the file, the tensor (when one is concerned) and what is wrong:
//   "load_adapter: /tmp/a/adapter_model.safetensors: tensor 'base_model.model.fc1.lora_A.weight':
//    shape [4, 6] does not match module 'fc1': expected [4, 8] (in_features = 8)"
class io_error : public std::runtime_error {
 public:
  io_error(std::string where, std::string file, std::string tensor, std::string problem)
      : std::runtime_error(format(where, file, tensor, problem)),
        file_(std::move(file)),
        tensor_(std::move(tensor)),
        problem_(std::move(problem)) {}

  const std::string& file() const noexcept { return file_; }      // the path, or "<memory>"
  const std::string& tensor() const noexcept { return tensor_; }  // empty when no tensor is concerned
  const std::string& problem() const noexcept { return problem_; }

 private:
  static std::string format(const std::string& where, const std::string& file, const std::string& tensor,
                            const std::string& problem) {
    std::string m = where + ": " + file + ": ";
    if (!tensor.empty()) m += "tensor '" + tensor + "': ";
    return m + problem;
  }
  std::string file_, tensor_, problem_;
};

namespace detail {

template <class... Parts>
[[noreturn]] void io_fail(const char* where, const std::string& file, const std::string& tensor, Parts&&... parts) {
  throw io_error(where, file, tensor, concat(std::forward<Parts>(parts)...));
}

}  // namespace detail
}  // namespace lora
