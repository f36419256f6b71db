// What a thread costs and what it saves, to place threads_for's work threshold (docs/threads.md).
//
//   fork_join/threads:t                  an empty parallel_region of t threads: the fork and the join alone
//   split_gemm/n:../k:../p:../threads:t  Y = X W^T (n x k times k x p), the rows split over t threads by
//                                        parallel_region, each running detail::gemm on its rows (what
//                                        gemm_parallel does above the threshold)
//   eigen_gemm/n:../k:../p:../threads:t  the same product by Eigen (Y.noalias() = X * W^T,
//                                        Eigen::setNbThreads(t)), whose threads wait for each other's
//                                        packed blocks in busy loops inside the product
//
// The thread count is forced here, whatever threads_for would choose. Run it on a quiet machine and
// under load (stress-ng --cpu 1 beside it) and compare the 1- and 2-thread rows of each shape.
#include <lora/lora.hpp>

#include <benchmark/benchmark.h>

#include <cstdio>
#include <vector>

namespace {

using lora::Index;
using Mat = lora::Matrix<float>;
using ColMajorMap = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>>;

void fork_join(benchmark::State& state, int threads) {
  int sink = 0;
  for (auto _ : state) {
    lora::detail::parallel_region(threads, [&](int t, int) {
      if (t == 0) ++sink;
    });
    benchmark::DoNotOptimize(sink);
  }
}

void split_gemm(benchmark::State& state, Index n, Index k, Index p, int threads) {
  const Mat X = Mat::Random(n, k), W = Mat::Random(p, k);
  Mat Y(n, p);
  std::vector<lora::detail::GemmBlocking<float>> blocking(static_cast<std::size_t>(threads));
  const ColMajorMap Wt(W.data(), k, p);
  for (auto _ : state) {
    lora::detail::parallel_region(threads, [&](int t, int nt) {
      const auto rows = lora::detail::split(n, lora::detail::kernel::MR, t, nt);
      if (rows.first >= rows.second) return;
      auto y = Y.middleRows(rows.first, rows.second - rows.first);
      lora::detail::gemm(blocking[static_cast<std::size_t>(t)], X.middleRows(rows.first, rows.second - rows.first), Wt,
                         y);
    });
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  state.counters["MMAC"] = 1e-6 * static_cast<double>(n * k * p);
  state.counters["GFLOPs"] =
      benchmark::Counter(2e-9 * static_cast<double>(n * k * p), benchmark::Counter::kIsIterationInvariantRate);
}

void eigen_gemm(benchmark::State& state, Index n, Index k, Index p, int threads) {
  const Mat X = Mat::Random(n, k), W = Mat::Random(p, k);
  Mat Y(n, p);
  const int saved = Eigen::nbThreads();
  Eigen::setNbThreads(threads);
  for (auto _ : state) {
    Y.noalias() = X * W.transpose();
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  Eigen::setNbThreads(saved);
  state.counters["MMAC"] = 1e-6 * static_cast<double>(n * k * p);
  state.counters["GFLOPs"] =
      benchmark::Counter(2e-9 * static_cast<double>(n * k * p), benchmark::Counter::kIsIterationInvariantRate);
}

void register_all() {
  struct Shape {
    Index n, k, p;
  };
  // From the digits MLP's products (batch 32, 64 -> 256 -> 256) up to a BERT-base projection.
  const Shape shapes[] = {{32, 64, 128},   {32, 64, 256},   {32, 256, 256},    {64, 256, 256},
                          {128, 256, 512}, {128, 512, 512}, {128, 1024, 1024}, {512, 768, 768}};
  char name[160];
  for (int t : {1, 2}) {
    std::snprintf(name, sizeof name, "fork_join/threads:%d", t);
    benchmark::RegisterBenchmark(name, fork_join, t)->UseRealTime()->Unit(benchmark::kMicrosecond);
  }
  for (const Shape& s : shapes)
    for (int t : {1, 2})
      for (bool eigen : {false, true}) {
        std::snprintf(name, sizeof name, "%s/n:%ld/k:%ld/p:%ld/threads:%d", eigen ? "eigen_gemm" : "split_gemm",
                      static_cast<long>(s.n), static_cast<long>(s.k), static_cast<long>(s.p), t);
        benchmark::RegisterBenchmark(name, eigen ? eigen_gemm : split_gemm, s.n, s.k, s.p, t)
            ->UseRealTime()
            ->Unit(benchmark::kMicrosecond);
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
