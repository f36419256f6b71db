// Mixed-adapter batches: 64 rows naming 1, 8 or 64 distinct adapters, against the same layer's
// ordinary forward with one active adapter, and the dense product of W0 alone. Rows are assigned
// round-robin (row i uses adapter i mod k), so with k = 8 every group is scattered (gathered rows).
// Ratios to read: mixed(k) / single; single / dense.
//   OMP_NUM_THREADS=1 build/bench/bench/bench_mixed --benchmark_repetitions=15
//     --benchmark_enable_random_interleaving=true --benchmark_report_aggregates_only=true
#include <lora/lora.hpp>

#include <benchmark/benchmark.h>

#include <algorithm>
#include <string>
#include <vector>

namespace {

using M = lora::Matrix<float>;
constexpr int rows = 64;

struct Fixture {
  lora::LoraLinearf layer;
  M X;
  Fixture(int in, int out, int rank, int adapters)
      : layer((std::srand(1), M::Random(out, in)), config(rank, 0)), X(M::Random(rows, in)) {
    for (int a = 1; a < adapters; ++a) layer.add_adapter("a" + std::to_string(a), config(rank, a));
    layer.eval();
  }
  static lora::LoraConfig config(int rank, int seed) {
    lora::LoraConfig c;
    c.rank = rank;
    c.alpha = 2 * rank;
    c.init = lora::InitMethod::random;
    c.seed = static_cast<std::uint64_t>(seed);
    return c;
  }
  static std::string name(int a) { return a == 0 ? "default" : "a" + std::to_string(a); }
};

double flops(int in, int out, int rank) { return 2.0 * rows * in * out + 2.0 * rows * rank * (in + out); }

void BM_dense(benchmark::State& state) {
  const int in = static_cast<int>(state.range(0)), out = static_cast<int>(state.range(1));
  std::srand(1);
  const M W = M::Random(out, in), X = M::Random(rows, in);
  M Y(rows, out);
  for (auto _ : state) {
    Y.noalias() = X * W.transpose();
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * rows * in * out * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_single_adapter(benchmark::State& state) {
  const int in = static_cast<int>(state.range(0)), out = static_cast<int>(state.range(1));
  const int rank = static_cast<int>(state.range(2));
  Fixture f(in, out, rank, 1);
  for (auto _ : state) {
    benchmark::DoNotOptimize(f.layer.forward(f.X).data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(flops(in, out, rank) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_mixed(benchmark::State& state) {
  const int in = static_cast<int>(state.range(0)), out = static_cast<int>(state.range(1));
  const int rank = static_cast<int>(state.range(2)), k = static_cast<int>(state.range(3));
  Fixture f(in, out, rank, k);
  std::vector<std::string> names;
  for (int i = 0; i < rows; ++i) names.push_back(Fixture::name(i % k));
  const lora::MixedBatchPlan plan(names);
  lora::MixedBatchForward<float> mixed;
  for (auto _ : state) {
    benchmark::DoNotOptimize(mixed.forward(f.layer, f.X, plan).data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] = benchmark::Counter(flops(in, out, rank) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void shapes(benchmark::internal::Benchmark* b, bool with_k) {
  for (const auto& s : std::vector<std::vector<long>>{{1024, 1024, 16}, {4096, 4096, 16}}) {
    if (!with_k) {
      b->Args({s[0], s[1], s[2]});
      continue;
    }
    for (long k : {1, 8, 64}) b->Args({s[0], s[1], s[2], k});
  }
}

}  // namespace

// On a shared machine the fastest repetition is the least disturbed one: report it beside the median.
double fastest(const std::vector<double>& v) { return *std::min_element(v.begin(), v.end()); }

BENCHMARK(BM_dense)->Args({1024, 1024})->Args({4096, 4096})->Unit(benchmark::kMicrosecond)->UseRealTime()
    ->ComputeStatistics("min", fastest);
BENCHMARK(BM_single_adapter)->Apply([](auto* b) { shapes(b, false); })->Unit(benchmark::kMicrosecond)->UseRealTime()
    ->ComputeStatistics("min", fastest);
BENCHMARK(BM_mixed)->Apply([](auto* b) { shapes(b, true); })->Unit(benchmark::kMicrosecond)->UseRealTime()
    ->ComputeStatistics("min", fastest);

BENCHMARK_MAIN();
