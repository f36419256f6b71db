// Threads: one model served by many threads through the const inference path, and the library called from
// inside the caller's own OpenMP parallel region. scripts/test.sh --tsan runs this file under
// ThreadSanitizer (without OpenMP, whose runtime TSan cannot see into).
#include <lora/lora.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <string>
#include <thread>
#include <vector>

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
