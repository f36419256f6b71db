// What finetune_classifier and rank_sweep share: the task pair, the base MLP, pretraining on task A and
// one fine-tuning run on task B.
#pragma once

#include <lora/data.hpp>
#include <lora/lora.hpp>
#include <lora/optim.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace example {

using Scalar = float;
using Model = lora::nn::Sequential<Scalar>;
using Data = lora::data::Dataset<Scalar>;

// Sizes: 32 inputs, two hidden layers of 1024, 10 classes; 8,000 samples to pretrain on A, 4,000 to
// fine-tune on B (the usual situation: little data for the new task), 4,000 held out for each.
constexpr int kHidden = 1024;
constexpr int kPretrainEpochs = 4;
constexpr int kFinetuneEpochs = 10;
constexpr lora::Index kBatch = 128;

struct Setup {
  lora::data::ClusterTask task_a, task_b;
  Data a_train, a_test, b_train, b_test;
  std::string optimizer = "adamw";  // train_and_evaluate's: "adamw" or "adamw8bit" (8-bit moments)
};

inline Setup make_setup() {
  lora::data::ClusterTaskConfig config;  // d = 32, 10 classes of 3 blobs in an 8-dimensional subspace
  config.seed = 2024;
  lora::data::TaskShift shift;  // 4 planes turned 90 degrees out of the subspace, a shift, classes 0-3
                                // cycled, 1 blob of each class given to another
  shift.seed = 7;
  auto a = lora::data::ClusterTask::make(config);
  auto b = a.shifted(shift);
  return {a, b, a.sample<Scalar>(8000, 1), a.sample<Scalar>(4000, 2), b.sample<Scalar>(4000, 3),
          b.sample<Scalar>(4000, 4)};
}

// 32 -> 1024 -> ReLU -> 1024 -> ReLU -> 10: paths layers.0 (hidden), layers.2 (hidden), layers.4 (head).
inline Model make_base() {
  Model model;
  model.add(lora::nn::Linear<Scalar>(32, kHidden, true, 1));
  model.add(lora::nn::ReLU<Scalar>());
  model.add(lora::nn::Linear<Scalar>(kHidden, kHidden, true, 2));
  model.add(lora::nn::ReLU<Scalar>());
  model.add(lora::nn::Linear<Scalar>(kHidden, 10, true, 3));
  return model;
}

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

struct RunResult {
  std::string method;
  lora::Index trainable = 0;
  double percent_of_base = 0;
  double accuracy_b = 0, accuracy_a = 0;
  double seconds = 0;            // the whole training run
  double seconds_per_epoch = 0;  // the median epoch (robust to other jobs on the machine)
  std::size_t optimizer_bytes = 0;
  std::size_t base_bytes = 0;  // the frozen weights as stored (float, or NF4 / int8 codes and scales)
};

// Trains every trainable parameter of `model` on `train` with AdamW (AdamW8bit if setup.optimizer is
// "adamw8bit"), printing one line per epoch
// (epoch, loss, accuracy on the batches, elapsed time), then measures the held-out accuracies.
inline RunResult train_and_evaluate(const std::string& method, Model& model, lora::Index base_params,
                                    const Data& train, int epochs, double lr, const Setup& setup,
                                    bool progress = true) {
  RunResult r;
  r.method = method;
  r.trainable = model.num_trainable_parameters();
  r.base_bytes = lora::quant::base_bytes(model);
  r.percent_of_base = 100.0 * static_cast<double>(r.trainable) / static_cast<double>(base_params);
  const auto start = std::chrono::steady_clock::now();
  if (epochs > 0 && r.trainable > 0) {
    auto params = model.parameters();
    lora::data::MiniBatches<Scalar> batches(train, kBatch, /*seed=*/11);
    std::vector<double> epoch_seconds;
    auto run = [&](auto& optimizer) {
      for (int epoch = 1; epoch <= epochs; ++epoch) {
        batches.shuffle();
        const auto stats = lora::nn::train_epoch(model, batches, [&] { optimizer.step(params); });
        epoch_seconds.push_back(stats.seconds);
        if (progress)
          std::printf("  %-12s epoch %2d/%d  loss %.4f  accuracy %.3f  %6.1f s\n", method.c_str(), epoch, epochs,
                      stats.loss, stats.accuracy, seconds_since(start));
        std::fflush(stdout);
      }
      r.optimizer_bytes = optimizer.state_bytes();
    };
    if (setup.optimizer == "adamw8bit") {
      lora::optim::AdamW8bitOptions options;
      options.lr = lr;
      lora::optim::AdamW8bit<Scalar> optimizer(options);
      run(optimizer);
    } else {
      lora::optim::AdamWOptions options;
      options.lr = lr;
      lora::optim::AdamW<Scalar> optimizer(options);
      run(optimizer);
    }
    std::sort(epoch_seconds.begin(), epoch_seconds.end());
    r.seconds_per_epoch = epoch_seconds[epoch_seconds.size() / 2];
  }
  r.seconds = seconds_since(start);
  r.accuracy_b = lora::nn::evaluate_accuracy(model, setup.b_test);
  r.accuracy_a = lora::nn::evaluate_accuracy(model, setup.a_test);
  return r;
}

// Freezes every layer except the one at `trainable_path` (none if empty).
inline void freeze_all_but(Model& model, const std::string& trainable_path) {
  model.set_requires_grad(false);
  if (!trainable_path.empty()) model.set_requires_grad(trainable_path, true);
}

// LoRA of rank r on the hidden Linear layers, the head fully trainable (modules_to_save), alpha = 2 r
// (scaling 2 at every rank), A drawn as PEFT does by default (Kaiming-uniform). layers.0 has 32 inputs,
// so its rank is capped at 32 (rank_pattern), keeping the scaling.
inline lora::nn::LoraInjectConfig lora_config(int rank) {
  lora::nn::LoraInjectConfig config;
  config.target_modules = {"layers.0", "layers.2"};
  config.modules_to_save = {"layers.4"};
  config.rank = rank;
  config.alpha = 2.0 * rank;
  if (rank > 32) {
    config.rank_pattern = {{"layers.0", 32}};
    config.alpha_pattern = {{"layers.0", 64}};
  }
  config.init = lora::InitMethod::kaiming_uniform;
  config.seed = 5;
  return config;
}

// "--threads N" sets the library's thread count (lora::set_num_threads); the default here is 1. With 2
// threads, the products of this example (batch 128, 1024 x 1024) are big enough to be split; on a
// machine shared with other jobs each split waits for a thread the scheduler may not run for
// milliseconds, so 1 thread is the safe choice there (docs/threads.md).
inline int threads_from_args(int argc, char** argv) {
  int threads = 1;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--threads") threads = std::max(1, std::atoi(argv[i + 1]));
  lora::set_num_threads(threads);
  return threads;
}

// "--out DIR": where finetune_classifier writes and evaluate_adapter reads; default finetune_classifier_out.
inline std::string output_dir_from_args(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--out") return argv[i + 1];
  return "finetune_classifier_out";
}

// "--optimizer adamw|adamw8bit": the fine-tuning optimiser (default adamw); anything else is an error.
inline std::string optimizer_from_args(int argc, char** argv) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--optimizer") {
      const std::string name = argv[i + 1];
      if (name != "adamw" && name != "adamw8bit")
        lora::detail::fail("optimizer_from_args", "--optimizer must be adamw or adamw8bit, got '", name, "'");
      return name;
    }
  return "adamw";
}

constexpr double kLrFull = 1e-3;   // full fine-tuning and pretraining
constexpr double kLrHead = 3e-3;   // head only
constexpr double kLrLora = 3e-3;   // LoRA: adapters and head

}  // namespace example
