// A scikit-learn-digits-sized run, to see what the thread settings do on a quiet and on a busy machine:
//   1,437 training samples of 64 inputs, 10 classes (task A of lora/data.hpp at digits' shape), an MLP
//   64 -> H -> ReLU -> H -> ReLU -> 10 trained in full with AdamW, then LoRA r = 8 on the two hidden
//   layers (head in modules_to_save) trained on task B; batch 32.
//
//   digits_mlp [--threads N] [--eigen-threads N] [--work-per-thread W] [--hidden H] [--batch B] [--epochs E]
//              [--repeat R]
//
// --threads calls lora::set_num_threads(N) (default: not called, the library's defaults);
// --eigen-threads then overrides Eigen::setNbThreads alone; --work-per-thread replaces the kernels'
// threshold (lora::detail::work_per_thread, multiply-adds per thread) to measure other values.
// Prints each repetition's MLP and LoRA training time, the median, and the 1-minute load average before
// and after.
#include <lora/data.hpp>
#include <lora/lora.hpp>
#include <lora/optim.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace {

using Scalar = float;
using Model = lora::nn::Sequential<Scalar>;

double load_average() {
  std::ifstream in("/proc/loadavg");
  double one = -1;
  in >> one;
  return one;
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double train(Model& model, const lora::data::Dataset<Scalar>& data, lora::Index batch, int epochs, double lr) {
  lora::optim::AdamWOptions options;
  options.lr = lr;
  lora::optim::AdamW<Scalar> optimizer(options);
  auto params = model.parameters();
  lora::data::MiniBatches<Scalar> batches(data, batch, /*seed=*/3);
  const auto start = std::chrono::steady_clock::now();
  for (int e = 0; e < epochs; ++e) {
    batches.shuffle();
    lora::nn::train_epoch(model, batches, [&] { optimizer.step(params); });
  }
  return seconds_since(start);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 0, eigen_threads = 0, hidden = 256, epochs = 20, repeat = 3;
  double work_per_thread = 0;
  lora::Index batch = 32;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    const int value = std::atoi(argv[i + 1]);
    if (flag == "--threads")
      threads = value;
    else if (flag == "--eigen-threads")
      eigen_threads = value;
    else if (flag == "--work-per-thread")
      work_per_thread = std::atof(argv[i + 1]);
    else if (flag == "--hidden")
      hidden = value;
    else if (flag == "--batch")
      batch = value;
    else if (flag == "--epochs")
      epochs = value;
    else if (flag == "--repeat")
      repeat = value;
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (threads > 0) lora::set_num_threads(threads);
  if (eigen_threads > 0) Eigen::setNbThreads(eigen_threads);
  if (work_per_thread > 0) lora::detail::work_per_thread = work_per_thread;

  lora::data::ClusterTaskConfig config;
  config.dim = 64;
  config.latent_dim = 16;
  config.seed = 1;
  const auto task_a = lora::data::ClusterTask::make(config);
  lora::data::TaskShift shift;
  const auto task_b = task_a.shifted(shift);
  const auto a = task_a.sample<Scalar>(1437, 1), b = task_b.sample<Scalar>(1437, 2);

  const double load_before = load_average();
  std::vector<double> mlp_s, lora_s;
  for (int r = 0; r < repeat; ++r) {
    Model model;
    model.add(lora::nn::Linear<Scalar>(64, hidden, true, 1));
    model.add(lora::nn::ReLU<Scalar>());
    model.add(lora::nn::Linear<Scalar>(hidden, hidden, true, 2));
    model.add(lora::nn::ReLU<Scalar>());
    model.add(lora::nn::Linear<Scalar>(hidden, 10, true, 3));
    mlp_s.push_back(train(model, a, batch, epochs, 1e-3));
    lora::nn::LoraInjectConfig c;
    c.target_modules = {"layers.0", "layers.2"};
    c.modules_to_save = {"layers.4"};
    c.rank = 8;
    c.alpha = 16;
    c.seed = 5;
    lora::nn::inject_lora(model, c);
    lora_s.push_back(train(model, b, batch, epochs, 3e-3));
    std::printf("  run %d: MLP %.3f s, LoRA %.3f s\n", r + 1, mlp_s.back(), lora_s.back());
  }
  std::printf(
      "threads %d (kernels %d, Eigen %d, %.0f multiply-adds per thread), hidden %d, batch %ld, %d epochs each: "
      "MLP %.3f s, LoRA %.3f s (medians of %d); load average %.2f -> %.2f\n",
      threads, lora::num_threads(), Eigen::nbThreads(), lora::detail::work_per_thread.load(), hidden,
      static_cast<long>(batch), epochs, median(mlp_s), median(lora_s), repeat, load_before, load_average());
  return 0;
}
