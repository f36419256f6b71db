// lora.hpp: the thread count, in one call (PyTorch's torch.set_num_threads / get_num_threads).
//
//   lora::set_num_threads(n)   the library's kernels, Eigen's products and the linked BLAS use n threads
//   lora::num_threads()        what the library's kernels use now
//
// The default (never called) is OpenMP's: OMP_NUM_THREADS, else one thread per logical CPU; small
// products run on fewer threads whatever the setting (docs/threads.md).
#pragma once

#include <lora/common.hpp>
#include <lora/detail/kernels.hpp>

#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif

// The BLAS libraries' own setters, declared weak: each is the function of the BLAS the program links
// (shared library), and a null pointer when no linked library defines it, so this header needs no BLAS
// header and links without a BLAS. The declarations match the BLAS headers' (BLIS's dim_t is int64_t).
// A statically linked BLAS is reached only if something else pulls the setter's object file in.
#if (defined(__GNUC__) || defined(__clang__)) && defined(__ELF__)
#define LORA_WEAK_BLAS_SETTERS 1
extern "C" {
void openblas_set_num_threads(int) __attribute__((weak));    // OpenBLAS
void bli_thread_set_num_threads(long) __attribute__((weak));  // BLIS
void MKL_Set_Num_Threads(int) __attribute__((weak));          // MKL (mkl_set_num_threads)
void flexiblas_set_num_threads(int) __attribute__((weak));    // FlexiBLAS (passes it to its backend)
}
#endif

namespace lora {

// requires: n >= 1 (more threads than logical CPUs is allowed: the kernels then oversubscribe them).
// ensures:  the library's kernels use at most n threads from now on, in every thread of the program
//           (omp_set_num_threads only sets the calling thread's count); Eigen::setNbThreads(n);
//           omp_set_num_threads(n) for the calling thread; the linked BLAS's setter, if any, gets n.
// Call it between operations. A product of the library already running in another thread keeps the count
// it started with; the next one uses n. Concurrent calls are serialised. (Eigen's and the BLAS's counts
// are theirs: docs/threads.md.)
inline void set_num_threads(int n) {
  if (n < 1) detail::fail("set_num_threads", "the thread count must be at least 1, got ", n);
  static std::mutex lock;
  const std::lock_guard<std::mutex> guard(lock);
  detail::configured_threads.store(n, std::memory_order_relaxed);
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
  Eigen::setNbThreads(n);
#ifdef LORA_WEAK_BLAS_SETTERS
  if (openblas_set_num_threads) openblas_set_num_threads(n);
  if (bli_thread_set_num_threads) bli_thread_set_num_threads(n);
  if (MKL_Set_Num_Threads) MKL_Set_Num_Threads(n);
  if (flexiblas_set_num_threads) flexiblas_set_num_threads(n);
#endif
}

// The most threads the library's kernels use for one product: set_num_threads's n once it was called,
// else the calling thread's omp_get_max_threads(); 1 without OpenMP.
inline int num_threads() { return detail::max_threads(); }

}  // namespace lora
