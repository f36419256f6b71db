// The quantized base (lora/quant) beside the float32 base of the same weights, in one run.
//
//   bench_quant [Google Benchmark flags]
//     decode/<base>/<out>x<in>/n:<n>/threads:<t>   the base's forward of n rows: n <= 8 is the decoding
//                                                 GEMV (codes read once), n = 64 the tiled product
//     train_step/<base>/n:512/4096x4096/r:16/threads:<t>   LoraLinear forward + backward over the base
//   counters: weight_GBps = the base's stored bytes / time (what a bandwidth-bound GEMV is limited by),
//   bits_per_weight = stored bytes * 8 / (out * in).
//   bench_quant --rss f32|nf4|int8 [out in]
//     peak resident memory of one out x in layer (default 11008 x 4096) trained with LoRA r = 16 for 4
//     steps of 16 rows, AdamW on A and B. The quantized bases are built from codes directly, as a base read
//     with load_quantized is (never a float copy of W0), so the peak is the process's own. One base per
//     process: getrusage's peak is per process.
#include <lora/lora.hpp>

#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using lora::Index;
using Mat = lora::Matrix<float>;
using BasePtr = std::shared_ptr<const lora::FrozenBase<float>>;

void set_threads(int t) {
#ifdef _OPENMP
  omp_set_num_threads(t);
#endif
  lora::set_num_threads(t);
  Eigen::setNbThreads(t);
}

enum class Kind { f32, nf4, int8 };
const char* kind_name(Kind k) { return k == Kind::f32 ? "f32" : k == Kind::nf4 ? "nf4" : "int8"; }

// W0 ~ N(0, 0.02^2), as a pretrained layer's weights roughly are; one matrix per shape for all kinds.
const Mat& weights(Index out, Index in) {
  static std::map<std::pair<Index, Index>, Mat> cache;
  auto it = cache.find({out, in});
  if (it == cache.end()) {
    std::mt19937 gen(7);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    Mat W(out, in);
    for (Index i = 0; i < W.size(); ++i) W.data()[i] = normal(gen);
    it = cache.emplace(std::make_pair(out, in), std::move(W)).first;
  }
  return it->second;
}

BasePtr make_base(Kind kind, Index out, Index in) {
  const Mat& W = weights(out, in);
  if (kind == Kind::f32) return lora::make_base<float>(W);
  return lora::quant::make_quantized_base<float>(kind == Kind::nf4 ? lora::quant::quantize_nf4(W)
                                                                   : lora::quant::quantize_int8(W));
}

void counters(benchmark::State& state, const lora::FrozenBase<float>& base) {
  const double bytes = static_cast<double>(base.owned_bytes());
  const double weights_n = static_cast<double>(base.out_features()) * static_cast<double>(base.in_features());
  state.counters["weight_GBps"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bits_per_weight"] = 8.0 * bytes / weights_n;
}

void decode(benchmark::State& state, Kind kind, Index out, Index in, Index n, int threads) {
  set_threads(threads);
  const BasePtr base = make_base(kind, out, in);
  const Mat X = Mat::Random(n, in);
  Mat Y(n, out);
  lora::BaseWorkspace<float> work;
  for (auto _ : state) {
    base->forward(X.data(), n, Y.data(), work, false);
    benchmark::DoNotOptimize(Y.data());
    benchmark::ClobberMemory();
  }
  counters(state, *base);
  state.counters["GFLOPs"] = benchmark::Counter(2e-9 * static_cast<double>(n * out * in),
                                                benchmark::Counter::kIsIterationInvariantRate);
}

void train_step(benchmark::State& state, Kind kind, Index out, Index in, Index n, int threads) {
  set_threads(threads);
  lora::LoraConfig config;
  config.rank = 16;
  config.alpha = 32;
  config.seed = 1;
  lora::LoraLinear<float> layer(make_base(kind, out, in), config);
  const Mat X = Mat::Random(n, in), dY = Mat::Random(n, out);
  for (auto _ : state) {
    benchmark::DoNotOptimize(layer.forward(X).data());
    benchmark::DoNotOptimize(layer.backward(dY).data());
    benchmark::ClobberMemory();
  }
  counters(state, layer.base());
}

void register_all() {
  const Kind kinds[] = {Kind::f32, Kind::nf4, Kind::int8};
  struct Shape {
    Index out, in;
  };
  for (const Shape s : {Shape{4096, 4096}, Shape{11008, 4096}})
    for (const Index n : {Index(1), Index(8), Index(64)})
      for (const int t : {1, 2})
        for (const Kind k : kinds) {
          const std::string name = std::string("decode/") + kind_name(k) + "/" + std::to_string(s.out) + "x" +
                                   std::to_string(s.in) + "/n:" + std::to_string(n) + "/threads:" + std::to_string(t);
          benchmark::RegisterBenchmark(name.c_str(), decode, k, s.out, s.in, n, t)->Unit(benchmark::kMicrosecond)->UseRealTime();
        }
  for (const int t : {1, 2})
    for (const Kind k : kinds) {
      const std::string name =
          std::string("train_step/") + kind_name(k) + "/n:512/4096x4096/r:16/threads:" + std::to_string(t);
      benchmark::RegisterBenchmark(name.c_str(), train_step, k, Index(4096), Index(4096), Index(512), t)
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
}

// --rss: a base of the given kind without any float copy of W0 for the quantized kinds.
BasePtr synthetic_base(Kind kind, Index out, Index in) {
  std::mt19937 gen(3);
  if (kind == Kind::f32) {
    Mat W(out, in);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    for (Index i = 0; i < W.size(); ++i) W.data()[i] = normal(gen);
    return std::make_shared<lora::DenseBase<float>>(std::move(W), lora::Vector<float>());
  }
  lora::quant::QuantizedWeight q;
  q.format = kind == Kind::nf4 ? lora::quant::Format::nf4 : lora::quant::Format::int8;
  q.out = out;
  q.in = in;
  if (kind == Kind::nf4) {
    q.codes.resize(static_cast<std::size_t>((out * in + 1) / 2));
    q.qabsmax.resize(static_cast<std::size_t>(q.blocks()));
    q.absmax2.assign(static_cast<std::size_t>((q.blocks() + 255) / 256), 0.01f);
    q.offset = 0.05f;
    for (auto& c : q.qabsmax) c = static_cast<std::uint8_t>(gen() & 0xFF);
  } else {
    q.codes.resize(static_cast<std::size_t>(out * in));
    q.absmax.assign(static_cast<std::size_t>(out), 0.08f);
  }
  for (auto& c : q.codes) c = static_cast<std::uint8_t>(gen() & 0xFF);
  return lora::quant::make_quantized_base<float>(std::move(q));
}

int rss_main(int argc, char** argv) {
  const std::string what = argv[2];
  const Kind kind = what == "f32" ? Kind::f32 : what == "nf4" ? Kind::nf4 : what == "int8" ? Kind::int8 : Kind(-1);
  if (what != "f32" && what != "nf4" && what != "int8") {
    std::fprintf(stderr, "bench_quant --rss: expected f32, nf4 or int8, got '%s'\n", what.c_str());
    return 2;
  }
  const Index out = argc > 3 ? std::stol(argv[3]) : 11008, in = argc > 4 ? std::stol(argv[4]) : 4096;
  lora::LoraConfig config;
  config.rank = 16;
  config.alpha = 32;
  lora::LoraLinear<float> layer(synthetic_base(kind, out, in), config);
  lora::ParameterList<float> params;
  layer.collect_parameters(params);
  lora::optim::AdamW<float> opt;
  const Mat X = Mat::Random(16, in), dY = Mat::Random(16, out);
  for (int step = 0; step < 4; ++step) {
    layer.forward(X);
    layer.backward(dY);
    opt.step(params);
    layer.zero_grad();
  }
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  std::printf("%s %ld x %ld: base %zu bytes (%.3f bits per weight), peak RSS %ld KiB\n", kind_name(kind),
              static_cast<long>(out), static_cast<long>(in), layer.base().owned_bytes(),
              8.0 * static_cast<double>(layer.base().owned_bytes()) / (static_cast<double>(out) * static_cast<double>(in)),
              usage.ru_maxrss);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::strcmp(argv[1], "--rss") == 0) return rss_main(argc, argv);
  register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
