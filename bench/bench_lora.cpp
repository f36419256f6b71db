// LoRA layer benchmarks: every operation next to the dense product of the same shape, in the same run.
//
// Names: <op>/<scalar>/n:<n>/in:<in>/out:<out>/r:<r>/threads:<t>. Ops:
//   dense_fwd   Y = X W0^T, the baseline (Eigen, or the BLAS with LORA_USE_BLAS)
//   lora_fwd    unmerged forward, eval mode          merged_fwd  forward after merge()
//   backward    backward() after a training forward  train_step  training forward + backward (dA, dB, dX)
//   merge, unmerge, rmw (one read-modify-write pass over W0, the bandwidth floor of merge)
// Counter GFLOPs: dense-equivalent, 2 n in out per forward, 2 n in out for dX (backward),
// 4 n in out for a training step, 2 in out r for merge; rmw reports GB/s (8 in out bytes).
// bench/run.py runs this with repetitions and interleaving and prints medians and ratios.
#include <lora/lora.hpp>

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef EIGEN_USE_BLAS
extern "C" __attribute__((weak)) void openblas_set_num_threads(int);
#endif

namespace {

using lora::Index;

struct Case {
  Index n, in, out;
  int r;
  bool all_ops;  // the sweeps time only dense_fwd, lora_fwd and train_step
};

void set_threads(int t) {
#ifdef _OPENMP
  omp_set_num_threads(t);
#endif
  Eigen::setNbThreads(t);
#ifdef EIGEN_USE_BLAS
  if (openblas_set_num_threads) openblas_set_num_threads(t);
#endif
}

template <class Scalar>
lora::Matrix<Scalar> random_matrix(Index rows, Index cols, Scalar scale) {
  return lora::Matrix<Scalar>::Random(rows, cols) * scale;
}

template <class Scalar>
lora::LoraLinear<Scalar> make_layer(const Case& c) {
  lora::LoraConfig config;
  config.rank = c.r;
  config.alpha = 2 * c.r;
  config.seed = 1;
  lora::LoraLinear<Scalar> layer(random_matrix<Scalar>(c.out, c.in, Scalar(0.02)), config);
  layer.B() = random_matrix<Scalar>(c.out, c.r, Scalar(0.02));  // a trained-looking adapter
  return layer;
}

double dense_flops(const Case& c) { return 2.0 * static_cast<double>(c.n * c.in * c.out); }

template <class Scalar>
void dense_fwd(benchmark::State& state, Case c, int threads) {
  set_threads(threads);
  const lora::Matrix<Scalar> W0 = random_matrix<Scalar>(c.out, c.in, Scalar(0.02));
  const lora::Matrix<Scalar> X = random_matrix<Scalar>(c.n, c.in, Scalar(1));
  lora::Matrix<Scalar> Y(c.n, c.out);
  for (auto _ : state) {
    Y.noalias() = X * W0.transpose();
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOPs"] = benchmark::Counter(dense_flops(c) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

template <class Scalar>
void lora_fwd(benchmark::State& state, Case c, int threads, bool merged) {
  set_threads(threads);
  auto layer = make_layer<Scalar>(c);
  layer.eval();
  if (merged) layer.merge();
  const lora::Matrix<Scalar> X = random_matrix<Scalar>(c.n, c.in, Scalar(1));
  for (auto _ : state) {
    benchmark::DoNotOptimize(layer.forward(X).data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOPs"] = benchmark::Counter(dense_flops(c) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

template <class Scalar>
void backward(benchmark::State& state, Case c, int threads, bool with_forward) {
  set_threads(threads);
  auto layer = make_layer<Scalar>(c);
  const lora::Matrix<Scalar> X = random_matrix<Scalar>(c.n, c.in, Scalar(1));
  const lora::Matrix<Scalar> dY = random_matrix<Scalar>(c.n, c.out, Scalar(1));
  layer.forward(X);
  for (auto _ : state) {
    if (with_forward) benchmark::DoNotOptimize(layer.forward(X).data());
    benchmark::DoNotOptimize(layer.backward(dY).data());
    benchmark::ClobberMemory();
  }
  const double flops = dense_flops(c) * (with_forward ? 2 : 1);
  state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

template <class Scalar>
void merge_op(benchmark::State& state, Case c, int threads, bool time_merge) {
  set_threads(threads);
  auto layer = make_layer<Scalar>(c);
  layer.eval();
  using clock = std::chrono::steady_clock;
  for (auto _ : state) {
    const auto t0 = clock::now();
    layer.merge();
    const auto t1 = clock::now();
    layer.unmerge();
    const auto t2 = clock::now();
    state.SetIterationTime(std::chrono::duration<double>(time_merge ? t1 - t0 : t2 - t1).count());
  }
  const double flops = 2.0 * static_cast<double>(c.in * c.out) * c.r;
  state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// One read-modify-write pass over an out x in matrix on the given threads: what merge cannot beat.
template <class Scalar>
void rmw(benchmark::State& state, Case c, int threads) {
  set_threads(threads);
  lora::Matrix<Scalar> W = random_matrix<Scalar>(c.out, c.in, Scalar(0.02));
  const Scalar step = Scalar(1e-7);
  for (auto _ : state) {
    lora::detail::parallel_for(c.out, 1, threads, [&](Index b, Index e) { W.middleRows(b, e - b).array() += step; });
    benchmark::DoNotOptimize(W.data());
    benchmark::ClobberMemory();
  }
  const double bytes = 2.0 * sizeof(Scalar) * static_cast<double>(c.in * c.out);
  state.counters["GBs"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

std::string name(const char* op, const char* scalar, const Case& c, int t) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "%s/%s/n:%ld/in:%ld/out:%ld/r:%d/threads:%d", op, scalar, static_cast<long>(c.n),
                static_cast<long>(c.in), static_cast<long>(c.out), c.r, t);
  return buf;
}

template <class Scalar>
void register_case(const char* scalar, const Case& c, int t) {
  // Large cases run one iteration per repetition: medians come from the repetitions.
  const double dense_seconds = dense_flops(c) / 100e9 / t;
  const int min_iters = dense_seconds > 0.05 ? 1 : 0;
  auto add = [&](benchmark::internal::Benchmark* b, bool manual = false) {
    b->Unit(benchmark::kMillisecond);
    if (manual)
      b->UseManualTime();
    else
      b->UseRealTime();  // threaded work: rates by wall-clock time
    if (min_iters) b->Iterations(1);
    return b;
  };
  add(benchmark::RegisterBenchmark(name("dense_fwd", scalar, c, t).c_str(), dense_fwd<Scalar>, c, t));
  add(benchmark::RegisterBenchmark(name("lora_fwd", scalar, c, t).c_str(), lora_fwd<Scalar>, c, t, false));
  add(benchmark::RegisterBenchmark(name("train_step", scalar, c, t).c_str(), backward<Scalar>, c, t, true));
  if (!c.all_ops) return;
  add(benchmark::RegisterBenchmark(name("merged_fwd", scalar, c, t).c_str(), lora_fwd<Scalar>, c, t, true));
  if (c.n > 1) add(benchmark::RegisterBenchmark(name("backward", scalar, c, t).c_str(), backward<Scalar>, c, t, false));
  add(benchmark::RegisterBenchmark(name("merge", scalar, c, t).c_str(), merge_op<Scalar>, c, t, true), true);
  add(benchmark::RegisterBenchmark(name("unmerge", scalar, c, t).c_str(), merge_op<Scalar>, c, t, false), true);
  add(benchmark::RegisterBenchmark(name("rmw", scalar, c, t).c_str(), rmw<Scalar>, c, t));
}

void register_all() {
  std::vector<Case> cases = {
      {1, 4096, 4096, 16, true},      // decode
      {8, 4096, 4096, 16, true},      // decode, a few sequences
      {512, 768, 768, 8, true},       // bert-base
      {1024, 1024, 1024, 16, true},   // bert-large
      {2048, 4096, 4096, 16, true},   // llama-attn
      {512, 4096, 11008, 64, true},   // llama-mlp
  };
  for (int r : {1, 2, 4, 8, 32, 64}) cases.push_back({256, 4096, 4096, r, false});  // rank sweep (16: below)
  for (Index n : {2, 4, 16, 32, 64, 128, 256, 1024}) cases.push_back({n, 4096, 4096, 16, false});  // batch sweep
  for (int t : {1, 2})
    for (const Case& c : cases) {
      register_case<float>("f32", c, t);
      register_case<double>("f64", c, t);
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
