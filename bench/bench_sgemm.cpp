// The dense product of a layer, Y = X W^T (X [m x k], W [n x k], both row-major), in fp32: the library's
// packed GEMM (detail::gemm_parallel, what DenseBase::forward runs) against Eigen's product, and, in
// executables of their own (bench/CMakeLists.txt), OpenBLAS, BLIS and oneDNN on the same shapes.
//
//   <lib>/m:../k:../n:../threads:t    lib in {lora, eigen} (bench_sgemm), openblas (bench_sgemm_openblas),
//                                      blis (bench_sgemm_blis), onednn (bench_sgemm_onednn)
//
// The shapes are PERFORMANCE.md's: bert-base, bert-large, llama-attn, llama-mlp. bench/sgemm_table.py
// runs the executables alternately and prints the medians (docs/packed-gemm.md).
#include <lora/lora.hpp>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <string>

#if defined(LORA_BENCH_SGEMM_OPENBLAS)
#include <cblas.h>
#elif defined(LORA_BENCH_SGEMM_BLIS)
#include <blis.h>
#elif defined(LORA_BENCH_SGEMM_ONEDNN)
#include <oneapi/dnnl/dnnl.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using lora::Index;
using Mat = lora::Matrix<float>;

struct Shape {
  Index m, k, n;
};
constexpr Shape shapes[] = {{512, 768, 768}, {1024, 1024, 1024}, {2048, 4096, 4096}, {512, 4096, 11008}};

void set_threads(int threads) {
  lora::set_num_threads(threads);
#ifdef _OPENMP
  omp_set_num_threads(threads);
#endif
#if defined(LORA_BENCH_SGEMM_OPENBLAS)
  openblas_set_num_threads(threads);
#elif defined(LORA_BENCH_SGEMM_BLIS)
  bli_thread_set_num_threads(threads);
#endif
}

// Runs product(X, W, Y) under the benchmark loop with a GFLOP/s counter.
template <class Product>
void run(benchmark::State& state, Shape s, int threads, Product&& product) {
  set_threads(threads);
  const Mat X = Mat::Random(s.m, s.k), W = Mat::Random(s.n, s.k);
  Mat Y = Mat::Zero(s.m, s.n);
  product(X, W, Y);  // warm-up: buffers grown, pages touched
  for (auto _ : state) {
    product(X, W, Y);
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * static_cast<double>(s.m) * static_cast<double>(s.k) * static_cast<double>(s.n) * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}

#if defined(LORA_BENCH_SGEMM_OPENBLAS)
constexpr const char* library = "openblas";
void product(const Mat& X, const Mat& W, Mat& Y) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(X.rows()), static_cast<blasint>(W.rows()),
              static_cast<blasint>(X.cols()), 1.0f, X.data(), static_cast<blasint>(X.cols()), W.data(),
              static_cast<blasint>(W.cols()), 0.0f, Y.data(), static_cast<blasint>(Y.cols()));
}
#elif defined(LORA_BENCH_SGEMM_BLIS)
constexpr const char* library = "blis";
void product(const Mat& X, const Mat& W, Mat& Y) {
  float one = 1, zero = 0;
  bli_sgemm(BLIS_NO_TRANSPOSE, BLIS_TRANSPOSE, X.rows(), W.rows(), X.cols(), &one, const_cast<float*>(X.data()),
            X.cols(), 1, const_cast<float*>(W.data()), W.cols(), 1, &zero, Y.data(), Y.cols(), 1);
}
#elif defined(LORA_BENCH_SGEMM_ONEDNN)
constexpr const char* library = "onednn";
void product(const Mat& X, const Mat& W, Mat& Y) {
  dnnl_sgemm('N', 'T', X.rows(), W.rows(), X.cols(), 1.0f, X.data(), X.cols(), W.data(), W.cols(), 0.0f, Y.data(),
             Y.cols());
}
#endif

void register_all() {
  for (const Shape& s : shapes)
    for (int threads : {1, 2}) {
      const auto name = [&](const char* lib) {
        return std::string(lib) + "/m:" + std::to_string(s.m) + "/k:" + std::to_string(s.k) + "/n:" +
               std::to_string(s.n) + "/threads:" + std::to_string(threads);
      };
#if defined(LORA_BENCH_SGEMM_OPENBLAS) || defined(LORA_BENCH_SGEMM_BLIS) || defined(LORA_BENCH_SGEMM_ONEDNN)
      benchmark::RegisterBenchmark(name(library).c_str(), [s, threads](benchmark::State& st) {
        run(st, s, threads, product);
      })->Unit(benchmark::kMillisecond)->UseRealTime();
#else
      benchmark::RegisterBenchmark(name("lora").c_str(), [s, threads](benchmark::State& st) {
        lora::detail::GemmBuffers<float> buffers;
        run(st, s, threads, [&](const Mat& X, const Mat& W, Mat& Y) {
          lora::detail::gemm_parallel(buffers, X, W.transpose(), Y);
        });
      })->Unit(benchmark::kMillisecond)->UseRealTime();
      benchmark::RegisterBenchmark(name("eigen").c_str(), [s, threads](benchmark::State& st) {
        run(st, s, threads, [&](const Mat& X, const Mat& W, Mat& Y) { Y.noalias() = X * W.transpose(); });
      })->Unit(benchmark::kMillisecond)->UseRealTime();
#endif
    }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
#if !defined(LORA_BENCH_SGEMM_OPENBLAS) && !defined(LORA_BENCH_SGEMM_BLIS) && !defined(LORA_BENCH_SGEMM_ONEDNN)
  std::printf("micro-kernel: %s\n", lora::detail::gemm_kernel::Kernel<float>::name);
#endif
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
