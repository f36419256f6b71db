// Steady-state forward and backward allocate nothing: every heap allocation of the process (malloc
// and everything built on it: operator new, Eigen's aligned_malloc, the OpenMP runtime) is counted
// around a loop of calls with a fixed batch size. Its own executable, because it replaces malloc.
#include <lora/lora.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <cerrno>
#include <cstddef>

#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define LORA_TEST_COUNTS_MALLOC 1
namespace {
std::atomic<long> allocations{0};
}
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

void* malloc(std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(size);
}
void* calloc(std::size_t count, std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_calloc(count, size);
}
void* realloc(void* p, std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_realloc(p, size);
}
void* memalign(std::size_t alignment, std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(alignment, size);
}
void* aligned_alloc(std::size_t alignment, std::size_t size) { return memalign(alignment, size); }
int posix_memalign(void** out, std::size_t alignment, std::size_t size) {
  void* p = memalign(alignment, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
void free(void* p) { __libc_free(p); }
}
#endif

using lora::Index;
using lora::Matrix;

#ifdef LORA_TEST_COUNTS_MALLOC
namespace {

long allocation_count() { return allocations.load(); }

}  // namespace
#endif

TEMPLATE_TEST_CASE("steady-state forward and backward do not allocate", "[alloc]", float, double) {
#ifndef LORA_TEST_COUNTS_MALLOC
  SUCCEED("malloc is not replaceable in this build (sanitizer or non-glibc): nothing to count");
#else
  using Scalar = TestType;
  const Index n = GENERATE(1, 8, 64, 512);
  const Index in = GENERATE(96, 640), out = in + 32;
  CAPTURE(n, in, out);
  lora::LoraConfig config;
  config.rank = 8;
  config.bias = lora::BiasMode::all;
  config.init = lora::InitMethod::random;
  lora::LoraLinear<Scalar> layer(Matrix<Scalar>::Random(out, in), lora::Vector<Scalar>::Random(out), config);
  const Matrix<Scalar> X = Matrix<Scalar>::Random(n, in), dY = Matrix<Scalar>::Random(n, out);
  auto step = [&] {
    layer.train();
    layer.forward(X);
    layer.backward(dY);
    layer.eval();
    layer.forward(X);
  };
  step();  // first calls size the workspaces
  step();
  const long before = allocation_count();
  for (int i = 0; i < 3; ++i) step();
  const long during = allocation_count() - before;
  CHECK(during == 0);
  // The counter does see allocations: a fresh matrix is one.
  const long probe = allocation_count();
  Matrix<Scalar> fresh(n, in);
  fresh.setZero();
  CHECK(allocation_count() > probe);
#endif
}
