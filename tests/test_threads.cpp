// Threads: one model served by many threads through the const inference path, the library called from
// inside the caller's own OpenMP parallel region, and lora::set_num_threads. scripts/test.sh --tsan runs
// this file under ThreadSanitizer (without OpenMP, whose runtime TSan cannot see into).
#include <lora/lora.hpp>

#include "instances.hpp"
#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// Stand-ins for a BLAS's thread-count setters: lora::set_num_threads must find them through its weak
// declarations. Not in a BLAS build, whose real setters they would replace.
#if defined(LORA_WEAK_BLAS_SETTERS) && !defined(EIGEN_USE_BLAS)
namespace {
std::atomic<long> openblas_count{0}, blis_count{0};
}
extern "C" void openblas_set_num_threads(int n) { openblas_count = n; }
extern "C" void bli_thread_set_num_threads(long n) { blis_count = n; }
#endif

using lora::Index;
using lora::Matrix;
using lora::testing::random_matrix;

namespace {

// A small MLP with LoRA on its two hidden layers and three adapters ("default", "a", "b").
lora::nn::Sequential<float> shared_model() {
  lora::nn::Sequential<float> model;
  model.add(lora::nn::Linear<float>(24, 32, true, 1));
  model.add(lora::nn::GELU<float>());
  model.add(lora::nn::Linear<float>(32, 32, true, 2));
  model.add(lora::nn::ReLU<float>());
  model.add(lora::nn::Linear<float>(32, 5, true, 3));
  lora::nn::LoraInjectConfig c;
  c.target_modules = {"layers.0", "layers.2"};
  c.rank = 4;
  c.init = lora::InitMethod::random;
  lora::nn::inject_lora(model, c);
  std::uint64_t seed = 10;
  for (auto& [path, layer] : model.lora_layers())
    for (const char* name : {"a", "b"}) {
      lora::LoraConfig extra;
      extra.rank = name[0] == 'a' ? 2 : 6;
      extra.init = lora::InitMethod::random;
      extra.seed = seed++;
      if (path != "layers.2" || name[0] != 'b') layer->add_adapter(name, extra);  // "b" only on layers.0
    }
  model.lora_layers().front().second->set_adapter_scale("a", 0.5);
  return model;
}

// What thread t asks for: its own adapter choice.
void configure(lora::nn::InferenceContext<float>& ctx, int t, Index rows) {
  switch (t % 5) {
    case 0: ctx.use_active_adapters(); break;
    case 1: ctx.use_adapters({"a"}); break;
    case 2: ctx.use_adapters({"a", "b"}); break;
    case 3: ctx.use_adapters({}); break;
    default: {
      std::vector<std::string> rows_adapters;
      for (Index i = 0; i < rows; ++i) rows_adapters.push_back(i % 3 == 0 ? "a" : i % 3 == 1 ? "b" : "");
      ctx.use_plan(lora::MixedBatchPlan(rows_adapters));
    }
  }
}

}  // namespace

TEST_CASE("8 threads x 1000 forwards on one shared model give exactly the serial outputs", "[threads]") {
  const lora::nn::Sequential<float> model = shared_model();
  constexpr int threads = 8, calls = 1000;
  constexpr Index rows = 6;
  std::vector<Matrix<float>> inputs, expected;
  for (int t = 0; t < threads; ++t) {
    inputs.push_back(random_matrix<float>(rows, 24, static_cast<unsigned>(100 + t)));
    lora::nn::InferenceContext<float> ctx;
    configure(ctx, t, rows);
    expected.push_back(lora::nn::infer(model, inputs.back(), ctx));
  }
  // The choices differ from each other, so a thread that used another's adapters would be caught.
  for (int t = 1; t < 5; ++t) CHECK(expected[static_cast<std::size_t>(t)] != expected[0]);

  std::vector<int> mismatches(threads, 0);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      lora::nn::InferenceContext<float> ctx;  // each thread its own workspaces
      configure(ctx, t, rows);
      for (int i = 0; i < calls; ++i)
        if (lora::nn::infer(model, inputs[static_cast<std::size_t>(t)], ctx) != expected[static_cast<std::size_t>(t)])
          ++mismatches[static_cast<std::size_t>(t)];
    });
  for (std::thread& th : pool) th.join();
  for (int t = 0; t < threads; ++t) CHECK(mismatches[static_cast<std::size_t>(t)] == 0);
}

TEST_CASE("the const layer path is the layer's eval forward", "[threads]") {
  lora::LoraConfig c;
  c.rank = 3;
  c.init = lora::InitMethod::random;
  lora::LoraLinear<double> layer(random_matrix<double>(9, 7, 1), lora::Vector<double>::Random(9), c);
  layer.add_adapter("other", c);
  const Matrix<double> X = random_matrix<double>(5, 7, 2);
  lora::InferenceWorkspace<double> work;
  layer.eval();
  CHECK(lora::testing::relative_error(layer.infer(X, work), layer.forward(X)) < 1e-14);
  layer.set_active_adapters({"default", "other"});
  const Matrix<double> both = layer.forward(X);
  layer.set_active_adapters({});
  CHECK(lora::testing::relative_error(layer.infer(X, work, {"default", "other"}), both) < 1e-14);
  CHECK_THROWS_WITH(layer.infer(X, work, {"missing"}), Catch::Contains("LoraLinear::infer: no adapter named 'missing'"));
  layer.set_active_adapters({"default"});
  layer.merge();
  CHECK(lora::testing::relative_error(layer.infer(X, work), layer.forward(X)) < 1e-14);
  CHECK_THROWS_WITH(layer.infer(X, work, {"default"}), Catch::Contains("the layer is merged"));
}

#ifdef _OPENMP
TEST_CASE("forward and backward inside the caller's OpenMP parallel region", "[threads][openmp][regression]") {
  // Regression: backward() called inside the caller's own parallel region deadlocked (the kernels' barrier
  // ran although no team was forked): #pragma omp parallel for over 3 layers on 2 threads hung. A hang
  // fails this test by CTest's timeout.
  lora::LoraConfig c;
  c.rank = 8;
  c.init = lora::InitMethod::random;
  c.dropout = 0.1;
  std::vector<lora::LoraLinear<float>> layers;
  for (unsigned i = 0; i < 3; ++i) {
    c.seed = i;
    layers.emplace_back(random_matrix<float>(256, 192, i), c);
  }
  std::vector<lora::LoraLinear<float>> serial = layers;
  const Matrix<float> X = random_matrix<float>(64, 192, 9), R = random_matrix<float>(64, 256, 10);
  std::vector<Matrix<float>> dX(3), serial_dX(3);
  for (int rep = 0; rep < 20; ++rep) {
#pragma omp parallel for num_threads(2) schedule(static, 1)
    for (int i = 0; i < 3; ++i) {
      layers[static_cast<std::size_t>(i)].forward(X);
      dX[static_cast<std::size_t>(i)] = layers[static_cast<std::size_t>(i)].backward(R);
    }
    for (std::size_t i = 0; i < 3; ++i) {
      serial[i].forward(X);
      serial_dX[i] = serial[i].backward(R);
    }
  }
  for (std::size_t i = 0; i < 3; ++i) {
    CHECK(lora::testing::relative_error(dX[i], serial_dX[i]) < 1e-5);
    CHECK(lora::testing::relative_error(layers[i].grad_A(), serial[i].grad_A()) < 1e-5);
  }
}
#endif

namespace {

// Puts the thread settings back as they were: the library's default (set_num_threads never called),
// OpenMP's count for this thread, Eigen following OpenMP.
struct RestoreThreadSettings {
#ifdef _OPENMP
  int omp = omp_get_max_threads();
#endif
  ~RestoreThreadSettings() {
    lora::detail::configured_threads = 0;
#ifdef _OPENMP
    omp_set_num_threads(omp);
#endif
    Eigen::setNbThreads(0);
  }
};

// The OpenMP team sizes the kernels' parallel_for runs with for work big enough for every thread.
std::set<int> team_sizes_of_big_work() {
  std::set<int> sizes;
  std::mutex lock;
  lora::detail::parallel_for(1 << 20, 1, lora::detail::threads_for(1e300), [&](Index, Index) {
#ifdef _OPENMP
    const int size = omp_get_num_threads();
#else
    const int size = 1;
#endif
    const std::lock_guard<std::mutex> guard(lock);
    sizes.insert(size);
  });
  return sizes;
}

}  // namespace

TEST_CASE("set_num_threads sets the kernels' thread count in every thread of the program", "[threads]") {
  const RestoreThreadSettings restore;
#ifdef _OPENMP
  // More threads than logical CPUs (allowed), so the count differs from OpenMP's default in other threads.
  const int n = omp_get_num_procs() + 1;
#else
  const int n = 3;
#endif
  lora::set_num_threads(n);
#ifdef _OPENMP
  CHECK(lora::num_threads() == n);
  CHECK(lora::detail::threads_for(1e300) == n);
  CHECK(team_sizes_of_big_work() == std::set<int>{n});
  CHECK(omp_get_max_threads() == n);
  CHECK(Eigen::nbThreads() == n);
  // A thread started afterwards sees the count too (omp_set_num_threads alone would not reach it: it
  // starts from OpenMP's default).
  int other_num = 0, other_for = 0;
  std::set<int> other_sizes;
  std::thread([&] {
    other_num = lora::num_threads();
    other_for = lora::detail::threads_for(1e300);
    other_sizes = team_sizes_of_big_work();
  }).join();
  CHECK(other_num == n);
  CHECK(other_for == n);
  CHECK(other_sizes == std::set<int>{n});
  // Small work still runs on one thread.
  CHECK(lora::detail::threads_for(1000) == 1);
  lora::set_num_threads(1);
  CHECK(lora::num_threads() == 1);
  CHECK(team_sizes_of_big_work() == std::set<int>{1});
  CHECK(Eigen::nbThreads() == 1);
#else
  CHECK(lora::num_threads() == 1);  // without OpenMP the kernels run on the calling thread
  CHECK(team_sizes_of_big_work() == std::set<int>{1});
#endif
#if defined(LORA_WEAK_BLAS_SETTERS) && !defined(EIGEN_USE_BLAS)
  lora::set_num_threads(n);
  CHECK(openblas_count == n);
  CHECK(blis_count == n);
#endif
}

TEST_CASE("set_num_threads refuses a count below 1 and keeps the setting", "[threads]") {
  const RestoreThreadSettings restore;
  lora::set_num_threads(1);
  for (int bad : {0, -1, -64}) {
    CHECK_THROWS_AS(lora::set_num_threads(bad), std::invalid_argument);
    CHECK_THROWS_WITH(lora::set_num_threads(bad),
                      Catch::Contains("set_num_threads") && Catch::Contains("got " + std::to_string(bad)));
    CHECK(lora::num_threads() == 1);
  }
}

TEST_CASE("set_num_threads while other threads run products changes no result", "[threads]") {
  const RestoreThreadSettings restore;
  // Products big enough to thread (threads_for's threshold) and small ones, in the const path.
  lora::LoraConfig c;
  c.rank = 8;
  c.init = lora::InitMethod::random;
  const lora::LoraLinear<float> layer(random_matrix<float>(512, 384, 1), c);
  const Matrix<float> X = random_matrix<float>(256, 384, 2);
  lora::InferenceWorkspace<float> serial;
  const Matrix<float> expected = layer.infer(X, serial);
  std::atomic<bool> done{false};
  std::vector<double> worst(3, 0.0);
  std::vector<std::thread> pool;
  for (std::size_t t = 0; t < worst.size(); ++t)
    pool.emplace_back([&, t] {
      lora::InferenceWorkspace<float> work;
      for (int i = 0; i < 30; ++i)
        worst[t] = std::max(worst[t], lora::testing::relative_error(layer.infer(X, work), expected));
    });
  std::thread setter([&] {
    for (int i = 0; !done; i = (i + 1) % 3) lora::set_num_threads(1 + i);
  });
  for (std::thread& th : pool) th.join();
  done = true;
  setter.join();
  for (double e : worst) CHECK(e < 1e-5);
}
