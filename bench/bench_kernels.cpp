// The rank-r kernels of include/lora/detail/kernels.hpp on the shapes the layer gives them, next to
// Eigen's own product of the same shape (which allocates its packing buffers on each call).
//
// Names: <kernel>/<shape>/threads:<t> and eigen_<kernel>/<shape>/threads:<t>; GFLOPs counts 2 m p K.
//   rank_update  C = C + alpha U V: epilogue (m = n, p = out, K = r), merge (m = out, p = in, K = r),
//                dB^T and dA (m = r, K = n: U read transposed, as the layer reads T and dT), nn::Linear's
//                dW (m = out, p = in, K = n: U = dY^T read transposed)
//   row_dots     C = X W^T with a small p: T = X A^T and dT = dY (s B^T)^T (m = n, p = r, k = in or out)
#include <lora/lora.hpp>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using lora::Index;
using Mat = lora::Matrix<float>;

void set_threads(int t) {
#ifdef _OPENMP
  omp_set_num_threads(t);
#endif
  Eigen::setNbThreads(t);
}

struct Shape {
  const char* what;
  Index m, p, K;
  bool transposed_u;  // U(i, k) read from a K x m matrix (dB, dA)
};

void rank_update(benchmark::State& state, Shape s, int threads, bool eigen) {
  set_threads(threads);
  const Mat U = Mat::Random(s.m, s.K), Ut = U.transpose(), V = Mat::Random(s.K, s.p);
  Mat C = Mat::Random(s.m, s.p);
  lora::detail::RankUpdate<float> a;
  a.m = s.m;
  a.p = s.p;
  a.K = s.K;
  a.U = s.transposed_u ? Ut.data() : U.data();
  a.u_row = s.transposed_u ? 1 : s.K;
  a.u_k = s.transposed_u ? s.m : 1;
  a.V = V.data();
  a.ldv = s.p;
  a.base = C.data();
  a.ldb = s.p;
  a.C = C.data();
  a.ldc = s.p;
  a.alpha = 1e-6f;
  lora::detail::PackBuffer<float> work;
  for (auto _ : state) {
    if (eigen)
      C.noalias() += 1e-6f * (Ut.transpose() * V);
    else
      lora::detail::rank_update(a, work);
    benchmark::DoNotOptimize(C.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOPs"] = benchmark::Counter(2e-9 * static_cast<double>(s.m * s.p * s.K),
                                                benchmark::Counter::kIsIterationInvariantRate);
}

void row_dots(benchmark::State& state, Shape s, int threads, bool eigen) {
  set_threads(threads);
  const Mat X = Mat::Random(s.m, s.K), W = Mat::Random(s.p, s.K);
  Mat C(s.m, s.p);
  for (auto _ : state) {
    if (eigen)
      C.noalias() = X * W.transpose();
    else
      lora::detail::row_dots(s.m, s.p, s.K, X.data(), s.K, W.data(), s.K, C.data(), s.p);
    benchmark::DoNotOptimize(C.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOPs"] = benchmark::Counter(2e-9 * static_cast<double>(s.m * s.p * s.K),
                                                benchmark::Counter::kIsIterationInvariantRate);
}

void register_all() {
  const Shape updates[] = {
      {"epilogue", 1024, 1024, 16, false},  {"epilogue", 512, 768, 8, false},  {"epilogue", 512, 11008, 64, false},
      {"merge", 4096, 4096, 16, false},     {"dB", 16, 1024, 1024, true},      {"dB", 16, 4096, 2048, true},
      {"dA", 64, 4096, 512, true},
      // nn::Linear's weight gradient dW += dY^T X (m = out, p = in, K = n): the digits MLP, the classifier
      // example, a large layer
      {"dW", 256, 256, 32, true},          {"dW", 10, 256, 32, true},         {"dW", 1024, 1024, 128, true},
      {"dW", 4096, 4096, 512, true},
  };
  const Shape dots[] = {{"T", 1024, 16, 1024, false}, {"dT", 2048, 16, 4096, false}, {"decode", 1, 4112, 4096, false}};
  char name[160];
  for (int t : {1, 2}) {
    for (const Shape& s : updates)
      for (bool eigen : {false, true}) {
        std::snprintf(name, sizeof name, "%srank_update/%s/m:%ld/p:%ld/K:%ld/threads:%d", eigen ? "eigen_" : "", s.what,
                      static_cast<long>(s.m), static_cast<long>(s.p), static_cast<long>(s.K), t);
        benchmark::RegisterBenchmark(name, rank_update, s, t, eigen)->UseRealTime()->Unit(benchmark::kMillisecond);
      }
    for (const Shape& s : dots)
      for (bool eigen : {false, true}) {
        std::snprintf(name, sizeof name, "%srow_dots/%s/m:%ld/p:%ld/k:%ld/threads:%d", eigen ? "eigen_" : "", s.what,
                      static_cast<long>(s.m), static_cast<long>(s.p), static_cast<long>(s.K), t);
        benchmark::RegisterBenchmark(name, row_dots, s, t, eigen)->UseRealTime()->Unit(benchmark::kMillisecond);
      }
  }
}

}  // namespace

int main(int argc, char** argv) {
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
