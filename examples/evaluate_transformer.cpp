// evaluate_transformer: reloads what finetune_transformer saved (the task-A base in Hugging Face's layout,
// the task-B LoRA {q, v} adapter as a PEFT directory, the character vocabulary and the held-out words of
// task B) and prints the accuracy, which must equal the one finetune_transformer printed.
//   evaluate_transformer --out DIR   (default finetune_transformer_out)
#include "transformer_common.hpp"

#include <filesystem>
#include <fstream>

int main(int argc, char** argv) {
  std::string out = "finetune_transformer_out";
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--out") out = argv[i + 1];
  const std::filesystem::path dir(out);
  try {
    const example::CharTokenizer tokenizer = example::CharTokenizer::load((dir / "chars.txt").string());
    std::vector<example::Word> words;
    std::ifstream in(dir / "b_test.txt");
    if (!in) lora::detail::fail("evaluate_transformer", "cannot read ", (dir / "b_test.txt").string());
    example::Word w;
    int labels = 0;
    while (in >> w.label >> w.text) {
      words.push_back(w);
      labels = std::max(labels, w.label + 1);
    }
    lora::BertLoadOptions options;
    options.num_labels = labels;
    lora::BertLoadReport report;
    auto model = lora::load_bert<example::Scalar>((dir / "base").string(), options, &report);
    lora::from_pretrained(*model, (dir / "adapter").string());
    std::printf("Loaded %s/base (%s parameters) and %s/adapter (LoRA and the task-B head):\n%s\n", out.c_str(),
                lora::nn::with_thousands(model->num_parameters()).c_str(), out.c_str(), lora::nn::summary(*model).c_str());
    const example::Batches test =
        example::make_batches(words, 256, tokenizer.vocab_size(), [&](const std::string& s) { return tokenizer.encode(s); }, 4);
    std::printf("Task B held-out accuracy (%zu words): %.4f\n", words.size(), example::evaluate(*model, test));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "evaluate_transformer: %s\n", e.what());
    return 1;
  }
  return 0;
}
