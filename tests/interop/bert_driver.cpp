// The C++ side of tests/interop/bert_interop.py (run by scripts/interop.sh): Hugging Face BERT
// checkpoints and tokenizers, with lora::io and lora::text only.
//
//   bert_driver tokenize VOCAB.txt TEXTS.txt IDS.txt
//       WordPieceTokenizer::from_file(VOCAB) (do_lower_case); one text per line of TEXTS.txt, its ids
//       ([CLS] ... [SEP]) on the same line of IDS.txt, separated by spaces.
//   bert_driver forward SPEC.json
//       load_bert<float>(spec["model"]) (and from_pretrained(spec["adapter"]) when given), evaluation
//       mode, one forward of the token batch spec["sequences"] (lists of ids, padded to the longest with
//       the attention mask), written to spec["outputs"] (safetensors, F32): "last_hidden_state"
//       [batch * seq_len, hidden] (padding rows included), "pooler_output" [batch, hidden], "logits"
//       [batch, num_labels]; the metadata "initialized" and "skipped" list load_bert's report
//       (comma-separated). spec["num_labels"], when given, overrides config.json's.
// Any error ends the program with status 1 and the message on stderr.
#include <lora/io.hpp>
#include <lora/io/bert.hpp>
#include <lora/text/wordpiece.hpp>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <exception>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace {

using lora::Index;
using Json = nlohmann::json;

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ",") + n;
  return out;
}

int tokenize(const std::string& vocab, const std::string& texts, const std::string& ids) {
  const auto tokenizer = lora::text::WordPieceTokenizer::from_file(vocab);
  std::ifstream in(texts);
  if (!in) throw std::runtime_error("cannot read " + texts);
  std::ostringstream out;
  std::string line;
  while (std::getline(in, line)) {
    const std::vector<Index> encoded = tokenizer.encode(line);
    for (std::size_t i = 0; i < encoded.size(); ++i) out << (i ? " " : "") << encoded[i];
    out << '\n';
  }
  std::ofstream file(ids);
  file << out.str();
  if (!file) throw std::runtime_error("cannot write " + ids);
  return 0;
}

int forward(const std::string& spec_path) {
  std::ifstream in(spec_path);
  if (!in) throw std::runtime_error("cannot read " + spec_path);
  const Json spec = Json::parse(in);
  lora::BertLoadOptions options;
  if (spec.contains("num_labels")) options.num_labels = spec.at("num_labels").get<Index>();
  lora::BertLoadReport report;
  auto model = lora::load_bert<float>(spec.at("model").get<std::string>(), options, &report);
  if (spec.contains("adapter")) lora::from_pretrained(*model, spec.at("adapter").get<std::string>());
  model->train(false);
  const auto sequences = spec.at("sequences").get<std::vector<std::vector<Index>>>();
  const lora::nn::TokenBatch batch(sequences, model->config().vocab_size);
  const lora::Matrix<float> logits = model->forward(batch);
  lora::SafetensorsWriter writer;
  writer.add("last_hidden_state", model->last_hidden_state());
  writer.add("pooler_output", model->pooler_output());
  writer.add("logits", logits);
  writer.set_metadata("initialized", joined(report.initialized));
  writer.set_metadata("skipped", joined(report.skipped));
  writer.save(spec.at("outputs").get<std::string>());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::vector<std::string> args(argv + 1, argv + argc);
    if (args.size() == 4 && args[0] == "tokenize") return tokenize(args[1], args[2], args[3]);
    if (args.size() == 2 && args[0] == "forward") return forward(args[1]);
    std::fprintf(stderr, "usage: bert_driver tokenize VOCAB.txt TEXTS.txt IDS.txt | bert_driver forward SPEC.json\n");
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bert_driver: %s\n", e.what());
    return 1;
  }
}
