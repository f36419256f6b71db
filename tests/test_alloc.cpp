// Steady-state forward and backward allocate nothing: every heap allocation of the process (malloc
// and everything built on it: operator new, Eigen's aligned_malloc, the OpenMP runtime) is counted
// around a loop of calls with a fixed batch size. Its own executable, because it replaces malloc.
#include <lora/lora.hpp>
#include <lora/nn/bert_model.hpp>
#include <lora/optim.hpp>

#include "instances.hpp"
#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <tuple>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define LORA_TEST_COUNTS_MALLOC 1
namespace {
std::atomic<long> allocations{0};
std::atomic<long long> allocated_bytes{0};
}
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);

void* malloc(std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  allocated_bytes.fetch_add(static_cast<long long>(size), std::memory_order_relaxed);
  return __libc_malloc(size);
}
void* calloc(std::size_t count, std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_calloc(count, size);
}
void* realloc(void* p, std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  return __libc_realloc(p, size);
}
void* memalign(std::size_t alignment, std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  allocated_bytes.fetch_add(static_cast<long long>(size), std::memory_order_relaxed);
  return __libc_memalign(alignment, size);
}
void* aligned_alloc(std::size_t alignment, std::size_t size) { return memalign(alignment, size); }
int posix_memalign(void** out, std::size_t alignment, std::size_t size) {
  void* p = memalign(alignment, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
void free(void* p) { __libc_free(p); }
}
#endif

using lora::Index;
using lora::Matrix;

#ifdef LORA_TEST_COUNTS_MALLOC
namespace {

long allocation_count() { return allocations.load(); }
long long allocation_bytes() { return allocated_bytes.load(); }

}  // namespace
#endif

TEMPLATE_TEST_CASE("steady-state forward and backward do not allocate", "[alloc]", float, double) {
#ifndef LORA_TEST_COUNTS_MALLOC
  SUCCEED("malloc is not replaceable in this build (sanitizer or non-glibc): nothing to count");
#else
  using Scalar = TestType;
  const Index n = GENERATE(1, 8, 64, 512);
  const Index in = GENERATE(96, 640), out = in + 32;
  // Regression: dropout on 2 threads allocated twice per step (Eigen products of the dropped input).
  const bool dropout = GENERATE(false, true);
  const int threads = GENERATE(1, 2);
  CAPTURE(n, in, out, dropout, threads);
  const lora::testing::ThreadSmallWork small_work;  // every product big enough to split, split
#ifdef _OPENMP
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(threads);
#endif
  lora::LoraConfig config;
  config.rank = 8;
  config.bias = lora::BiasMode::all;  // a trainable bias
  config.init = lora::InitMethod::random;
  config.dropout = dropout ? 0.1 : 0.0;
  lora::LoraLinear<Scalar> layer(Matrix<Scalar>::Random(out, in), lora::Vector<Scalar>::Random(out), config);
  lora::LoraConfig second = config;
  second.rank = 4;
  second.seed = 5;
  layer.add_adapter("second", second);
  layer.set_active_adapters({"default", "second"});  // several adapters
  const Matrix<Scalar> X = Matrix<Scalar>::Random(n, in), dY = Matrix<Scalar>::Random(n, out);
  lora::InferenceWorkspace<Scalar> work;
  auto step = [&] {
    layer.train();
    layer.forward(X);
    layer.backward(dY);
    layer.eval();
    layer.forward(X);
    layer.infer(X, work);
  };
  step();  // first calls size the workspaces
  step();
  const long before = allocation_count();
  for (int i = 0; i < 3; ++i) step();
  const long during = allocation_count() - before;
  CHECK(during == 0);
#ifdef _OPENMP
  omp_set_num_threads(saved_threads);
#endif
  // The counter does see allocations: a fresh matrix is one.
  const long probe = allocation_count();
  Matrix<Scalar> fresh(n, in);
  fresh.setZero();
  CHECK(allocation_count() > probe);
#endif
}

TEMPLATE_TEST_CASE("steady-state LoRA over a quantized base does not allocate", "[alloc][quant]", float, double) {
#ifndef LORA_TEST_COUNTS_MALLOC
  SUCCEED("malloc is not replaceable in this build (sanitizer or non-glibc): nothing to count");
#else
  using Scalar = TestType;
  const Index n = GENERATE(1, 8, 64);
  const bool int8 = GENERATE(false, true);
  const int threads = GENERATE(1, 2);
  CAPTURE(n, int8, threads);
  const lora::testing::ThreadSmallWork small_work;
  const int saved_threads = lora::num_threads();
  lora::set_num_threads(threads);
  // in = 128, whole blocks of 64 per row: NF4's decoding GEMV (n <= 8) reorders X into its workspace.
  const Matrix<float> W = Matrix<float>::Random(200, 128);
  lora::LoraConfig config;
  config.rank = 8;
  config.init = lora::InitMethod::random;
  lora::LoraLinear<Scalar> layer(
      lora::quant::make_quantized_base<Scalar>(int8 ? lora::quant::quantize_int8(W) : lora::quant::quantize_nf4(W)), config);
  const Matrix<Scalar> X = Matrix<Scalar>::Random(n, 128), dY = Matrix<Scalar>::Random(n, 200);
  auto step = [&] {
    layer.forward(X);
    layer.backward(dY);
  };
  step();  // first calls size the workspaces
  step();
  const long before = allocation_count();
  for (int i = 0; i < 3; ++i) step();
  const long allocations = allocation_count() - before;
  lora::set_num_threads(saved_threads);
  CHECK(allocations == 0);
#endif
}

TEMPLATE_TEST_CASE("steady-state nn::Linear forward and backward do not allocate", "[alloc][nn]", float, double) {
#ifndef LORA_TEST_COUNTS_MALLOC
  SUCCEED("malloc is not replaceable in this build (sanitizer or non-glibc): nothing to count");
#else
  // Regression: the plain layer's products went through Eigen's, which allocate their packing buffers
  // on every call (and fork a team for any product above about 10^5 multiply-adds).
  using Scalar = TestType;
  const Index n = GENERATE(1, 32, 512);
  const int threads = GENERATE(1, 2);
  CAPTURE(n, threads);
  const lora::testing::ThreadSmallWork small_work;
#ifdef _OPENMP
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(threads);
#endif
  lora::nn::Linear<Scalar> layer(640, 672, true, 1);
  const Matrix<Scalar> X = Matrix<Scalar>::Random(n, 640), dY = Matrix<Scalar>::Random(n, 672);
  auto step = [&] {
    layer.train();
    layer.forward(X);
    layer.backward(dY);
    layer.eval();
    layer.forward(X);
  };
  step();
  step();
  const long before = allocation_count();
  for (int i = 0; i < 3; ++i) step();
  CHECK(allocation_count() - before == 0);
#ifdef _OPENMP
  omp_set_num_threads(saved_threads);
#endif
#endif
}

TEMPLATE_TEST_CASE("steady-state nn::Linear over a quantized base does not allocate", "[alloc][nn][quant]", float, double) {
#ifndef LORA_TEST_COUNTS_MALLOC
  SUCCEED("malloc is not replaceable in this build (sanitizer or non-glibc): nothing to count");
#else
  using Scalar = TestType;
  const Index n = GENERATE(1, 32);
  const bool int8 = GENERATE(false, true);
  const int threads = GENERATE(1, 2);
  CAPTURE(n, int8, threads);
  const lora::testing::ThreadSmallWork small_work;
  const int saved_threads = lora::num_threads();
  lora::set_num_threads(threads);
  const Matrix<float> W = Matrix<float>::Random(200, 128);
  lora::nn::Linear<Scalar> layer(
      lora::quant::make_quantized_base<Scalar>(int8 ? lora::quant::quantize_int8(W) : lora::quant::quantize_nf4(W),
                                               lora::Vector<Scalar>::Random(200)));
  layer.set_trainable(false, true);
  const Matrix<Scalar> X = Matrix<Scalar>::Random(n, 128), dY = Matrix<Scalar>::Random(n, 200);
  auto step = [&] {
    layer.train();
    layer.forward(X);
    layer.backward(dY);
    layer.eval();
    layer.forward(X);
  };
  step();
  step();
  const long before = allocation_count();
  for (int i = 0; i < 3; ++i) step();
  const long allocations = allocation_count() - before;
  lora::set_num_threads(saved_threads);
  CHECK(allocations == 0);
#endif
}

TEST_CASE("a layer over a shared base allocates its adapter, not a copy of W0", "[alloc][base]") {
#ifndef LORA_TEST_COUNTS_MALLOC
  SUCCEED("malloc is not replaceable in this build (sanitizer or non-glibc): nothing to count");
#else
  const Index out = 1024, in = 768;
  const auto base = lora::make_base<float>(Matrix<float>::Random(out, in));
  lora::LoraConfig config;
  config.rank = 8;
  const long long before = allocation_bytes();
  lora::LoraLinear<float> first(base, config), second(base, config);
  const long long per_layer = (allocation_bytes() - before) / 2;
  const long long w0_bytes = out * in * static_cast<long long>(sizeof(float));
  INFO("bytes per layer over the shared base: " << per_layer << ", W0: " << w0_bytes);
  // A, B and their gradients: 2 x r (in + out) floats, plus names and guards.
  CHECK(per_layer < 2 * 8 * (in + out) * static_cast<long long>(sizeof(float)) + 4096);
  CHECK(per_layer < w0_bytes / 20);
  CHECK(base.use_count() == 3);
  // Two models training different adapters over it: a training step allocates nothing once warm.
  const Matrix<float> X = Matrix<float>::Random(16, in), dY = Matrix<float>::Random(16, out);
  for (int i = 0; i < 2; ++i)
    for (auto* layer : {&first, &second}) {
      layer->forward(X);
      layer->backward(dY);
    }
  const long during = allocation_count();
  for (auto* layer : {&first, &second}) {
    layer->forward(X);
    layer->backward(dY);
  }
  CHECK(allocation_count() == during);
#endif
}

TEST_CASE("two models train different adapters over one shared base", "[alloc][base]") {
#ifndef LORA_TEST_COUNTS_MALLOC
  SUCCEED("malloc is not replaceable in this build (sanitizer or non-glibc): nothing to count");
#else
  using namespace lora::nn;
  Sequential<float> first;
  first.add(Linear<float>(512, 512, true, 1));
  first.add(ReLU<float>());
  first.add(Linear<float>(512, 512, true, 2));
  first.add(ReLU<float>());
  first.add(Linear<float>(512, 10, true, 3));
  LoraInjectConfig c;
  c.target_modules = {"layers.0", "layers.2"};
  c.rank = 4;
  c.init = lora::InitMethod::random;
  inject_lora(first, c);
  const long long before = allocation_bytes();
  Sequential<float> second = first;  // the LoRA layers share their bases; adapters and the head are copied
  const long long copied = allocation_bytes() - before;
  const long long shared_w0 = 2LL * 512 * 512 * static_cast<long long>(sizeof(float));
  INFO("copying the model allocated " << copied << " bytes; the shared W0s hold " << shared_w0);
  CHECK(copied < shared_w0 / 10);
  const auto a = first.lora_layers(), b = second.lora_layers();
  for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i].second->base().dense_weight() == b[i].second->base().dense_weight());
  const Matrix<float> W0 = a[0].second->base_weight();

  // Different adapters: the second model's get other values, then both train on other targets.
  for (auto& [path, layer] : b) {
    layer->B().setRandom();
    layer->B() *= 0.01f;
  }
  const Matrix<float> X = Matrix<float>::Random(32, 512);
  const Matrix<float> target_a = Matrix<float>::Random(32, 10), target_b = Matrix<float>::Random(32, 10);
  lora::optim::SGDOptions options;
  options.lr = 1e-4;
  lora::optim::SGD<float> sgd_a(options), sgd_b(options);
  for (int step = 0; step < 5; ++step) {
    for (auto [model, target, sgd] : {std::tuple{&first, &target_a, &sgd_a}, std::tuple{&second, &target_b, &sgd_b}}) {
      model->zero_grad();
      const Matrix<float> dY = model->forward(X) - *target;  // gradient of half the squared error
      model->backward(dY);
      lora::ParameterList<float> params;
      model->collect_parameters(params, "");
      sgd->step(params);
    }
  }
  CHECK(a[0].second->base_weight() == W0);  // training never writes the shared base
  CHECK(a[0].second->A() != b[0].second->A());
  first.eval();
  second.eval();
  CHECK(first.forward(X) != second.forward(X));
#endif
}

TEST_CASE("a BERT training step allocates nothing in steady state; its layers share their transient buffers",
          "[alloc][bert]") {
#ifndef LORA_TEST_COUNTS_MALLOC
  SUCCEED("malloc is not replaceable in this build (sanitizer or non-glibc): nothing to count");
#else
  using namespace lora::nn;
  BertConfig config;
  config.vocab_size = 50;
  config.hidden_size = 32;
  config.num_hidden_layers = 4;
  config.num_attention_heads = 4;
  config.intermediate_size = 128;
  config.max_position_embeddings = 16;
  config.num_labels = 3;
  config.hidden_dropout_prob = 0.1;
  config.attention_probs_dropout_prob = 0.1;
  std::vector<std::vector<Index>> ids;
  for (Index b = 0; b < 16; ++b) ids.push_back(std::vector<Index>(static_cast<std::size_t>(4 + b % 9), 1 + b % 40));
  const TokenBatch batch(ids, config.vocab_size);
  std::vector<int> labels(ids.size());
  for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<int>(i % 3);
  const bool lora = GENERATE(false, true);
  CAPTURE(lora);
  // The bytes the first steps allocate, with the layers' buffers shared or not.
  long long first_steps[2] = {0, 0};
  for (int share = 0; share < 2; ++share) {
    BertForSequenceClassification<float> model(config, 1);
    if (lora) {
      LoraInjectConfig c;
      c.target_modules = {"query", "value"};
      c.modules_to_save = {"classifier"};
      c.rank = 4;
      inject_lora(model, c);
    }
    model.set_share_layer_buffers(share == 1);
    lora::ParameterList<float> params = model.parameters();
    lora::optim::AdamW<float> optimizer{lora::optim::AdamWOptions{}};
    SoftmaxCrossEntropy<float> loss;
    auto step = [&] {
      model.zero_grad();
      loss.forward(model.forward(batch), labels);
      model.backward(loss.backward());
      optimizer.step(params);
    };
    const long long bytes = allocation_bytes();
    step();
    step();
    first_steps[share] = allocation_bytes() - bytes;
    const long before = allocation_count();
    for (int i = 0; i < 3; ++i) step();
    CHECK(allocation_count() - before == 0);
  }
  // Shared, layers 1..3 use layer 0's outputs and gradients: at least the intermediate.dense output, the
  // GELU output and output.dense's dX ([rows x intermediate] each) are not allocated again per layer.
  const long long per_layer = 3LL * batch.num_rows() * config.intermediate_size * static_cast<long long>(sizeof(float));
  INFO("first two steps: " << first_steps[0] << " bytes unshared, " << first_steps[1] << " shared");
  CHECK(first_steps[0] - first_steps[1] >= (config.num_hidden_layers - 1) * per_layer);
#endif
}

TEMPLATE_TEST_CASE("steady-state AdamW8bit steps do not allocate", "[alloc][optim]", float, double) {
#ifndef LORA_TEST_COUNTS_MALLOC
  SUCCEED("malloc is not replaceable in this build (sanitizer or non-glibc): nothing to count");
#else
  using Scalar = TestType;
  lora::LoraConfig config;
  config.rank = 8;
  config.bias = lora::BiasMode::all;
  config.init = lora::InitMethod::random;
  // lora_B [640 x 8] = 5120 values: 8-bit in blocks of 2048 (the last shorter); lora_A and the bias: float32.
  lora::LoraLinear<Scalar> layer(Matrix<Scalar>::Random(640, 96), lora::Vector<Scalar>::Random(640), config);
  const Matrix<Scalar> X = Matrix<Scalar>::Random(16, 96), dY = Matrix<Scalar>::Random(16, 640);
  lora::ParameterList<Scalar> params;
  layer.collect_parameters(params, "layer.");
  lora::optim::AdamW8bit<Scalar> adam;
  lora::optim::LrScheduler<lora::optim::AdamW8bit<Scalar>> scheduler(adam, lora::optim::LrSchedule::cosine(2, 10));
  auto step = [&] {
    layer.zero_grad();
    layer.forward(X);
    layer.backward(dY);
    lora::optim::clip_grad_norm(params, 1.0);
    adam.step(params);
    scheduler.step();
  };
  const long first = allocation_count();
  step();  // first sight: the states
  CHECK(allocation_count() > first);
  step();
  const long before = allocation_count();
  for (int i = 0; i < 3; ++i) step();
  CHECK(allocation_count() - before == 0);
  CHECK(adam.quantized("layer.lora_B.default.weight"));
  CHECK(!adam.quantized("layer.lora_A.default.weight"));
#endif
}
