// Reloads what finetune_classifier saved, the way a user ships an adapter: a fresh base MLP, the
// pretrained weights from base.safetensors, then the PEFT adapter directory (LoRA injected as its
// adapter_config.json says, weights from adapter_model.safetensors). Evaluates on the same held-out sets
// and checks the accuracies against those the training run measured (accuracy.txt).
#include "classifier_common.hpp"

#include <lora/io.hpp>

#include <filesystem>
#include <fstream>

using namespace example;

int main(int argc, char** argv) {
  threads_from_args(argc, argv);
  const std::filesystem::path dir = output_dir_from_args(argc, argv);
  const Setup setup = make_setup();

  Model model = make_base();
  lora::load_base_weights((dir / "base.safetensors").string(), model);
  const lora::PeftLoraConfig config = lora::from_pretrained(model, (dir / "adapter").string());
  std::printf("Loaded %s and the adapter in %s (r = %d, lora_alpha = %g, %zu target modules).\n",
              (dir / "base.safetensors").c_str(), (dir / "adapter").c_str(), config.r, config.lora_alpha,
              config.target_modules ? config.target_modules->size() : 0);
  std::printf("%s\n", lora::nn::summary(model).c_str());

  model.eval();
  const double accuracy_b = lora::nn::evaluate_accuracy(model, setup.b_test);
  const double accuracy_a = lora::nn::evaluate_accuracy(model, setup.a_test);
  double trained_b = -1, trained_a = -1;
  std::ifstream(dir / "accuracy.txt") >> trained_b >> trained_a;
  std::printf("Accuracy on B's held-out set: %.4f (the training run measured %.4f)\n", accuracy_b, trained_b);
  std::printf("Accuracy kept on A:           %.4f (the training run measured %.4f)\n", accuracy_a, trained_a);
  const bool same = accuracy_b == trained_b && accuracy_a == trained_a;
  std::printf("%s\n", same ? "Same accuracy as before saving." : "MISMATCH with the training run.");
  return same ? 0 : 1;
}
