// The dense product of a layer, Y = X W^T (X [m x k], W [n x k], both row-major), in fp32: the library's
// packed GEMM (detail::gemm_parallel, what DenseBase::forward runs) against Eigen's product, and, in
// executables of their own (bench/CMakeLists.txt), OpenBLAS, BLIS and oneDNN on the same shapes.
//
//   <lib>/m:../k:../n:../threads:t    lib in {lora, eigen} (bench_sgemm), openblas (bench_sgemm_openblas),
//                                      blis (bench_sgemm_blis), onednn (bench_sgemm_onednn)
//   lora_fwd/...      a LoraLinear's forward (eval, rank r_for(shape), bias): X W0^T + b + s (X A^T) B^T
//   lora_step/...     its training step (forward + backward, dX included)
//   peak/threads:t    the FMA peak: 12 independent chains of the widest vector FMA on every thread
// GFLOP/s count 2 m k n for a forward and 4 m k n for a step (dense-equivalent: LoRA's own work is overhead).
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
// PERFORMANCE.md's rank for each shape: 8 at bert-base, 64 at llama-mlp, 16 otherwise.
int r_for(const Shape& s) { return s.k == 768 ? 8 : s.n == 11008 ? 64 : 16; }

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

#if !defined(LORA_BENCH_SGEMM_OPENBLAS) && !defined(LORA_BENCH_SGEMM_BLIS) && !defined(LORA_BENCH_SGEMM_ONEDNN)
// A LoraLinear of shape s (W0 [n x k], rank r_for(s), a bias, B trained-looking): the forward in eval mode
// (train = false) or the training step.
void lora_layer(benchmark::State& state, Shape s, int threads, bool train) {
  set_threads(threads);
  lora::LoraConfig config;
  config.rank = r_for(s);
  config.alpha = 2.0 * config.rank;
  lora::LoraLinear<float> layer(Mat(Mat::Random(s.n, s.k) * 0.02f), lora::Vector<float>(lora::Vector<float>::Random(s.n)),
                                config);
  layer.B() = Mat::Random(s.n, config.rank) * 0.02f;
  layer.train(train);
  const Mat X = Mat::Random(s.m, s.k), dY = Mat::Random(s.m, s.n);
  const auto step = [&] {
    benchmark::DoNotOptimize(layer.forward(X).data());
    if (train) benchmark::DoNotOptimize(layer.backward(dY).data());
  };
  step();  // warm-up
  for (auto _ : state) {
    step();
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(
      (train ? 4.0 : 2.0) * static_cast<double>(s.m) * static_cast<double>(s.k) * static_cast<double>(s.n) * 1e-9,
      benchmark::Counter::kIsIterationInvariantRate);
}

// The FMA peak of `threads` cores: each runs 12 independent chains of the widest packet FMA Eigen has for
// the build's target (AVX2: 8 floats; AVX-512: 16), enough to cover the FMA latency of two pipes.
void fma_peak(benchmark::State& state, int threads) {
  set_threads(threads);
  using Packet = Eigen::internal::packet_traits<float>::type;
  constexpr int width = Eigen::internal::packet_traits<float>::size, chains = 12;
  constexpr long steps = 1L << 22;
  for (auto _ : state) {
    float sink = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sink)
    {
      Packet acc[chains];
      for (int c = 0; c < chains; ++c) acc[c] = Eigen::internal::pset1<Packet>(static_cast<float>(c));
      const Packet a = Eigen::internal::pset1<Packet>(0.999999f), b = Eigen::internal::pset1<Packet>(1e-7f);
      for (long i = 0; i < steps; ++i)
#pragma GCC unroll 12
        for (int c = 0; c < chains; ++c) acc[c] = Eigen::internal::pmadd(acc[c], a, b);
      for (int c = 0; c < chains; ++c) sink += Eigen::internal::predux(acc[c]);
    }
    benchmark::DoNotOptimize(sink);
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * width * chains * static_cast<double>(steps) * threads * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}
#endif

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
      benchmark::RegisterBenchmark(name("lora_fwd").c_str(), [s, threads](benchmark::State& st) {
        lora_layer(st, s, threads, false);
      })->Unit(benchmark::kMillisecond)->UseRealTime();
      benchmark::RegisterBenchmark(name("lora_step").c_str(), [s, threads](benchmark::State& st) {
        lora_layer(st, s, threads, true);
      })->Unit(benchmark::kMillisecond)->UseRealTime();
#endif
    }
#if !defined(LORA_BENCH_SGEMM_OPENBLAS) && !defined(LORA_BENCH_SGEMM_BLIS) && !defined(LORA_BENCH_SGEMM_ONEDNN)
  for (int threads : {1, 2})
    benchmark::RegisterBenchmark(("peak/threads:" + std::to_string(threads)).c_str(),
                                 [threads](benchmark::State& st) { fma_peak(st, threads); })
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
#endif
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
