// Fine-tuning a pretrained classifier on a shifted task: frozen base, head only, LoRA (over the float base,
// and over the base quantized to NF4 as QLoRA does, or to int8), full fine-tuning.
//
// A 32 -> 1024 -> 1024 -> 10 MLP is pretrained on task A and kept. Task B moves A's class blobs by a rigid
// motion and relabels some of them (include/lora/data.hpp explains the structure), so the frozen base
// does poorly on it. Each method starts from a copy of the same base and trains on B with AdamW (AdamW8bit,
// 8-bit moments, with --optimizer adamw8bit); the table at the end compares trainable parameters, accuracy
// on B's held-out set, accuracy kept on A, time, the frozen base's memory and the optimiser's. Then the
// float LoRA model is merged: same
// predictions, the plain MLP's speed.
//
// Files (in --out DIR, default finetune_classifier_out): the pretrained base as base.safetensors, the LoRA
// adapter as a PEFT adapter directory (adapter/), and the held-out accuracies in accuracy.txt, which
// evaluate_adapter reloads and checks.
#include "classifier_common.hpp"

#include <lora/io.hpp>

#include <filesystem>
#include <fstream>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

using namespace example;

namespace {

// Median wall time of forward() over the whole set, in ms; the three models alternate each round so
// that they see the same machine load.
std::vector<double> median_forward_ms(std::vector<Model*> models, const lora::Matrix<Scalar>& X, int rounds) {
  std::vector<std::vector<double>> times(models.size());
  for (Model* m : models) m->eval();
  for (int round = 0; round < rounds; ++round)
    for (std::size_t i = 0; i < models.size(); ++i) {
      const auto start = std::chrono::steady_clock::now();
      const auto& out = models[i]->forward(X);
      times[i].push_back(1e3 * seconds_since(start));
      if (!out.allFinite()) std::printf("non-finite output\n");
    }
  std::vector<double> medians;
  for (auto& t : times) {
    std::sort(t.begin(), t.end());
    medians.push_back(t[t.size() / 2]);
  }
  return medians;
}

}  // namespace

int main(int argc, char** argv) {
  const auto program_start = std::chrono::steady_clock::now();
  threads_from_args(argc, argv);
  Setup setup = make_setup();
  std::printf("Task A: %d classes of 3 blobs in %d dimensions; task B: the blobs rotated and shifted, some "
              "relabelled.\n",
              setup.task_a.num_classes(), setup.task_a.dim());
  std::printf("Data: %ld A train / %ld A test, %ld B train / %ld B test. Threads: %d (--threads N to change).\n\n",
              static_cast<long>(setup.a_train.size()), static_cast<long>(setup.a_test.size()),
              static_cast<long>(setup.b_train.size()), static_cast<long>(setup.b_test.size()), lora::num_threads());

  // ---- pretrain on A ------------------------------------------------------------------------------
  Model base = make_base();
  const lora::Index base_params = base.num_parameters();
  std::printf("Base MLP, %s parameters:\n%s\n\nPretraining on task A (AdamW, lr %g, batch %ld):\n",
              lora::nn::with_thousands(base_params).c_str(), base.describe().c_str(), kLrFull,
              static_cast<long>(kBatch));
  const RunResult pre = train_and_evaluate("pretrain", base, base_params, setup.a_train, kPretrainEpochs, kLrFull, setup);
  std::printf("Base model: accuracy %.3f on A's held-out set, %.3f on B's.\n", pre.accuracy_a, pre.accuracy_b);
  const std::filesystem::path out_dir = output_dir_from_args(argc, argv);
  std::filesystem::create_directories(out_dir);
  lora::save_base_weights((out_dir / "base.safetensors").string(), base);
  std::printf("Saved the base to %s.\n\n", (out_dir / "base.safetensors").c_str());

  // ---- the four methods on B -----------------------------------------------------------------------
  std::vector<RunResult> results;
  setup.optimizer = optimizer_from_args(argc, argv);  // pretraining above is always AdamW
  std::printf("Fine-tuning on task B, %d epochs each, with %s (--optimizer adamw|adamw8bit):\n", kFinetuneEpochs,
              setup.optimizer.c_str());
  {
    Model frozen = base;
    freeze_all_but(frozen, "");
    results.push_back(train_and_evaluate("frozen base", frozen, base_params, setup.b_train, 0, kLrFull, setup));
  }
  {
    Model head = base;
    freeze_all_but(head, "layers.4");
    results.push_back(train_and_evaluate("head only", head, base_params, setup.b_train, kFinetuneEpochs, kLrHead, setup));
  }
  Model lora_model = base;
  lora::nn::inject_lora(lora_model, lora_config(8));
  std::printf("  LoRA r = 8 on layers.0 and layers.2, head in modules_to_save: %s\n",
              lora::nn::summary(lora_model).c_str());
  results.push_back(
      train_and_evaluate("LoRA r=8", lora_model, base_params, setup.b_train, kFinetuneEpochs, kLrLora, setup));
  lora::save_adapter((out_dir / "adapter").string(), lora_model);
  {
    std::ofstream accuracy(out_dir / "accuracy.txt");
    accuracy.precision(17);
    accuracy << results.back().accuracy_b << " " << results.back().accuracy_a << "\n";
  }
  std::printf("  Saved the adapter to %s (adapter_model.safetensors, adapter_config.json).\n",
              (out_dir / "adapter").c_str());
  // QLoRA: the hidden layers' weights quantized (the head stays in float: it trains), LoRA over them.
  for (const lora::quant::Format format : {lora::quant::Format::nf4, lora::quant::Format::int8}) {
    Model quantized = base;
    lora::quant::QuantizeModelConfig qc;
    qc.format = format;
    qc.skip_modules = {"layers.4"};
    lora::quant::quantize_model(quantized, qc);
    lora::nn::inject_lora(quantized, lora_config(8));
    const std::string name = std::string("LoRA r=8, ") + (format == lora::quant::Format::nf4 ? "NF4 base" : "int8 base");
    results.push_back(train_and_evaluate(name, quantized, base_params, setup.b_train, kFinetuneEpochs, kLrLora, setup));
  }
  {
    Model full = base;
    results.push_back(train_and_evaluate("full", full, base_params, setup.b_train, kFinetuneEpochs, kLrFull, setup));
  }

  std::printf("\n| method | trainable params | %% of base | accuracy on B | accuracy kept on A | wall time | "
              "base memory | optimizer state |\n|---|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const RunResult& r : results)
    std::printf("| %s | %s | %.2f %% | %.3f | %.3f | %.1f s | %s bytes | %s bytes |\n", r.method.c_str(),
                lora::nn::with_thousands(r.trainable).c_str(), r.percent_of_base, r.accuracy_b, r.accuracy_a,
                r.seconds, lora::nn::with_thousands(static_cast<lora::Index>(r.base_bytes)).c_str(),
                lora::nn::with_thousands(static_cast<lora::Index>(r.optimizer_bytes)).c_str());
  const RunResult &frozen = results[0], &head = results[1], &lora_run = results[2], &nf4 = results[3],
                  &int8 = results[4], &full = results[5];
  const double gain = full.accuracy_b - frozen.accuracy_b;
  auto share = [&](const RunResult& r) { return 100 * (r.accuracy_b - frozen.accuracy_b) / gain; };
  std::printf("\nShare of full fine-tuning's accuracy gain on B (%.3f -> %.3f): head only %.1f %%, LoRA %.1f %% "
              "with %.2f %% of the base's parameters trainable; over an NF4 base %.1f %% (base %.1fx smaller), "
              "over an int8 base %.1f %% (%.1fx smaller).\n",
              frozen.accuracy_b, full.accuracy_b, share(head), share(lora_run), lora_run.percent_of_base, share(nf4),
              static_cast<double>(lora_run.base_bytes) / static_cast<double>(nf4.base_bytes), share(int8),
              static_cast<double>(lora_run.base_bytes) / static_cast<double>(int8.base_bytes));

  // ---- merge: same predictions, plain speed ----------------------------------------------------------
  lora_model.eval();
  std::vector<int> unmerged_pred, merged_pred;
  lora::nn::predict(lora_model, setup.b_test.X, unmerged_pred);
  const lora::Matrix<Scalar> unmerged_logits = lora_model.forward(setup.b_test.X);
  Model merged = lora_model;
  merged.merge();
  lora::nn::predict(merged, setup.b_test.X, merged_pred);
  const double max_diff = (merged.forward(setup.b_test.X) - unmerged_logits).cwiseAbs().maxCoeff();
  long same = 0;
  for (std::size_t i = 0; i < merged_pred.size(); ++i) same += merged_pred[i] == unmerged_pred[i] ? 1 : 0;
  std::printf("\nMerged LoRA model: the same prediction on %ld of %zu held-out rows; largest logit difference "
              "%.2g (float rounding).\n",
              same, merged_pred.size(), max_diff);
  const lora::Matrix<Scalar> rows = setup.b_test.X.topRows(1000);
  const std::vector<double> ms = median_forward_ms({&base, &lora_model, &merged}, rows, 9);
  std::printf("Forward over %ld rows (median of 9, alternating): plain MLP %.2f ms, LoRA unmerged %.2f ms "
              "(%.2fx), merged %.2f ms (%.2fx).\n",
              static_cast<long>(rows.rows()), ms[0], ms[1], ms[1] / ms[0], ms[2], ms[2] / ms[0]);
  std::printf("\nTotal time: %.1f s\n", seconds_since(program_start));
  return same == static_cast<long>(merged_pred.size()) ? 0 : 1;
}
