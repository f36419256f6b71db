// What finetune_transformer and evaluate_transformer share: the word-language task built from Debian's
// word lists, the character tokenizer, batching, training and evaluation of a BertForSequenceClassification.
#pragma once

#include <lora/detail/random.hpp>
#include <lora/io.hpp>
#include <lora/io/bert.hpp>
#include <lora/lora.hpp>
#include <lora/nn/bert_model.hpp>
#include <lora/optim.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace example {

using Scalar = float;
using Model = lora::nn::BertForSequenceClassification<Scalar>;

struct Language {
  const char* code;
  const char* file;     // under /usr/share/dict
  const char* package;  // the Debian package that installs it
};

// Task A (pretraining) and task B (adaptation): each language of B has a relative in A (it: es/fr,
// pt: es, nl: de, da/no: sv, ca: es/fr), so what the encoder learned about spelling can carry over.
inline const std::vector<Language>& task_a_languages() {
  static const std::vector<Language> v = {{"en", "american-english", "wamerican"}, {"de", "ngerman", "wngerman"},
                                          {"fr", "french", "wfrench"},             {"es", "spanish", "wspanish"},
                                          {"sv", "swedish", "wswedish"},           {"pl", "polish", "wpolish"}};
  return v;
}
inline const std::vector<Language>& task_b_languages() {
  static const std::vector<Language> v = {{"it", "italian", "witalian"},   {"pt", "portuguese", "wportuguese"},
                                          {"nl", "dutch", "wdutch"},       {"da", "danish", "wdanish"},
                                          {"no", "bokmaal", "wnorwegian"},   {"ca", "catalan", "wcatalan"}};
  return v;
}

// UTF-8 code points of a word; false for invalid UTF-8.
inline bool decode_utf8(const std::string& s, std::vector<std::uint32_t>& out) {
  out.clear();
  for (std::size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + static_cast<std::size_t>(n) > s.size()) return false;
    std::uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1Fu) : n == 3 ? (c & 0x0Fu) : (c & 0x07u);
    for (int k = 1; k < n; ++k) {
      const unsigned char d = static_cast<unsigned char>(s[i + static_cast<std::size_t>(k)]);
      if ((d >> 6) != 2) return false;
      cp = (cp << 6) | (d & 0x3Fu);
    }
    out.push_back(cp);
    i += static_cast<std::size_t>(n);
  }
  return true;
}

// A word the task keeps: 4 to 14 letters, lower case (no proper nouns or abbreviations), no digits,
// apostrophes, hyphens or dots.
inline bool keep_word(const std::string& w, std::vector<std::uint32_t>& cps) {
  if (!decode_utf8(w, cps) || cps.size() < 4 || cps.size() > 14) return false;
  for (std::uint32_t c : cps) {
    if (c < 0x80 && !(c >= 'a' && c <= 'z')) return false;
    if (c >= 0x80 && c < 0xC0) return false;            // Latin-1 punctuation and symbols
    if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return false;  // Latin-1 capitals
  }
  return true;
}

// One line of a word list as a UTF-8 word: drops a trailing '\r' and affix flags ("word/FLAGS"); a line
// that is not valid UTF-8 is read as ISO-8859-1, the encoding of the swedish and bokmaal lists.
inline void read_word_list_line(std::string& line, std::vector<std::uint32_t>& cps) {
  if (!line.empty() && line.back() == '\r') line.pop_back();
  const std::size_t slash = line.find('/');
  if (slash != std::string::npos) line.resize(slash);
  if (decode_utf8(line, cps)) return;
  std::string utf8;
  utf8.reserve(2 * line.size());
  for (const char ch : line) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (c < 0x80) {
      utf8.push_back(ch);
    } else {
      utf8.push_back(static_cast<char>(0xC0 | (c >> 6)));
      utf8.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  line.swap(utf8);
}

struct Word {
  std::string text;
  int label = 0;
};

struct Split {
  std::vector<Word> train, test;
};

// Reads each language's list, draws `per_language` training and `test_per_language` held-out words
// (reservoir sampling with a fixed seed: the same words on every machine with the same lists), and drops
// every drawn word that any other language of the task also lists (its label would be ambiguous).
// Training and held-out words are distinct words. Throws naming the file and its package if a list is
// missing. `dict_dir` is where the lists are (Debian: /usr/share/dict).
inline Split make_split(const std::vector<Language>& languages, std::size_t per_language, std::size_t test_per_language,
                        std::uint64_t seed, const std::string& dict_dir = "/usr/share/dict") {
  const std::size_t want = per_language + test_per_language;
  std::vector<std::vector<std::string>> drawn(languages.size());
  std::vector<std::uint32_t> cps;
  for (std::size_t l = 0; l < languages.size(); ++l) {
    const std::string path = dict_dir + "/" + languages[l].file;
    std::ifstream in(path);
    if (!in)
      lora::detail::fail("make_split", "cannot read ", path, " (Debian package ", languages[l].package,
                         "; scripts/finetune_transformer.sh installs it)");
    lora::detail::Random rng(seed + l);
    std::unordered_set<std::string> seen;
    std::string line;
    std::size_t count = 0;
    auto& sample = drawn[l];
    while (std::getline(in, line)) {
      read_word_list_line(line, cps);
      if (!keep_word(line, cps) || !seen.insert(line).second) continue;
      ++count;
      if (sample.size() < want) {
        sample.push_back(line);
      } else {
        const auto j = static_cast<std::size_t>(rng.uniform() * static_cast<double>(count));
        if (j < want) sample[j] = line;
      }
    }
  }
  // Words drawn for a language that another language of the task lists too.
  std::unordered_map<std::string, std::size_t> owner;
  for (std::size_t l = 0; l < languages.size(); ++l)
    for (const std::string& w : drawn[l]) owner.emplace(w, l);
  std::unordered_set<std::string> ambiguous;
  for (std::size_t l = 0; l < languages.size(); ++l) {
    std::ifstream in(dict_dir + "/" + languages[l].file);
    std::string line;
    while (std::getline(in, line)) {
      read_word_list_line(line, cps);
      const auto it = owner.find(line);
      if (it != owner.end() && it->second != l) ambiguous.insert(line);
    }
  }
  Split split;
  for (std::size_t l = 0; l < languages.size(); ++l) {
    std::vector<std::string> words;
    for (const std::string& w : drawn[l])
      if (!ambiguous.count(w)) words.push_back(w);
    std::sort(words.begin(), words.end());  // the reservoir's order depends on the list's; fix it
    lora::detail::Random rng(seed + 100 + l);
    for (std::size_t i = words.size(); i > 1; --i)
      std::swap(words[i - 1], words[static_cast<std::size_t>(rng.uniform() * static_cast<double>(i))]);
    const std::size_t test = std::min(test_per_language, words.size() / 4);
    for (std::size_t i = 0; i < words.size(); ++i) {
      Word w{words[i], static_cast<int>(l)};
      if (i < test)
        split.test.push_back(w);
      else if (split.train.size() < (l + 1) * per_language)
        split.train.push_back(w);
    }
  }
  return split;
}

// Characters as tokens: [PAD] 0, [CLS] 1, [UNK] 2, then every code point of the given words, in order.
class CharTokenizer {
 public:
  static constexpr lora::Index pad = 0, cls = 1, unk = 2;
  explicit CharTokenizer(const std::vector<const std::vector<Word>*>& sets) {
    std::set<std::uint32_t> all;
    std::vector<std::uint32_t> cps;
    for (const auto* set : sets)
      for (const Word& w : *set)
        if (decode_utf8(w.text, cps)) all.insert(cps.begin(), cps.end());
    for (std::uint32_t c : all) ids_.emplace(c, static_cast<lora::Index>(3 + ids_.size()));
  }
  // The vocabulary as written by save(): one code point per line (decimal), id 3 first.
  static CharTokenizer load(const std::string& path) {
    std::ifstream in(path);
    if (!in) lora::detail::fail("CharTokenizer::load", "cannot read ", path);
    CharTokenizer t({});
    std::uint32_t c = 0;
    while (in >> c) t.ids_.emplace(c, static_cast<lora::Index>(3 + t.ids_.size()));
    return t;
  }
  void save(const std::string& path) const {
    std::vector<std::uint32_t> by_id(ids_.size());
    for (const auto& [c, id] : ids_) by_id[static_cast<std::size_t>(id - 3)] = c;
    std::ofstream out(path);
    for (std::uint32_t c : by_id) out << c << '\n';
    if (!out) lora::detail::fail("CharTokenizer::save", "cannot write ", path);
  }
  lora::Index vocab_size() const { return static_cast<lora::Index>(3 + ids_.size()); }
  std::vector<lora::Index> encode(const std::string& word) const {
    std::vector<std::uint32_t> cps;
    if (!decode_utf8(word, cps)) lora::detail::fail("CharTokenizer::encode", "'", word, "' is not valid UTF-8");
    std::vector<lora::Index> ids = {cls};
    for (std::uint32_t c : cps) {
      const auto it = ids_.find(c);
      ids.push_back(it == ids_.end() ? unk : it->second);
    }
    return ids;
  }

 private:
  std::map<std::uint32_t, lora::Index> ids_;
};

// Token batches built once (no allocation per step); their order is shuffled per epoch.
struct Batches {
  std::vector<lora::nn::TokenBatch> tokens;
  std::vector<std::vector<int>> labels;
  std::size_t words = 0;
};

template <class Encode>
Batches make_batches(const std::vector<Word>& words, lora::Index batch_size, lora::Index vocab_size, Encode&& encode,
                     std::uint64_t shuffle_seed) {
  std::vector<std::size_t> order(words.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  lora::detail::Random rng(shuffle_seed);
  for (std::size_t i = order.size(); i > 1; --i)
    std::swap(order[i - 1], order[static_cast<std::size_t>(rng.uniform() * static_cast<double>(i))]);
  Batches b;
  b.words = words.size();
  for (std::size_t begin = 0; begin < order.size(); begin += static_cast<std::size_t>(batch_size)) {
    const std::size_t end = std::min(order.size(), begin + static_cast<std::size_t>(batch_size));
    std::vector<std::vector<lora::Index>> seqs;
    std::vector<int> labels;
    for (std::size_t i = begin; i < end; ++i) {
      seqs.push_back(encode(words[order[i]].text));
      labels.push_back(words[order[i]].label);
    }
    b.tokens.emplace_back(seqs, vocab_size);
    b.labels.push_back(std::move(labels));
  }
  return b;
}

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Accuracy of the model (eval mode) on prepared batches.
inline double evaluate(Model& model, const Batches& batches) {
  model.train(false);
  std::size_t right = 0;
  std::vector<int> predicted;
  for (std::size_t k = 0; k < batches.tokens.size(); ++k) {
    lora::nn::argmax_rows(model.forward(batches.tokens[k]), predicted);
    for (std::size_t i = 0; i < predicted.size(); ++i) right += predicted[i] == batches.labels[k][i];
  }
  model.train(true);
  return static_cast<double>(right) / static_cast<double>(batches.words);
}

// Peak resident memory since the last reset (Linux: /proc/self/status VmHWM, reset through clear_refs).
inline void reset_peak_rss() {
  std::ofstream("/proc/self/clear_refs") << "5";
}
inline double peak_rss_mib() {
  std::ifstream in("/proc/self/status");
  std::string key;
  while (in >> key) {
    if (key == "VmHWM:") {
      double kib = 0;
      in >> kib;
      return kib / 1024.0;
    }
    in.ignore(1 << 12, '\n');
  }
  return 0;
}

struct TrainStats {
  double seconds = 0, last_loss = 0;
  std::size_t optimizer_bytes = 0;
};

// AdamW on every trainable parameter, `epochs` passes over `train` (batch order shuffled per epoch), one
// progress line per epoch.
inline TrainStats train(Model& model, Batches& train, int epochs, double lr, const std::string& label,
                        bool progress = true) {
  TrainStats stats;
  const auto start = std::chrono::steady_clock::now();
  auto params = model.parameters();
  if (params.empty() || epochs <= 0) return stats;
  lora::optim::AdamWOptions options;
  options.lr = lr;
  lora::optim::AdamW<Scalar> optimizer(options);
  lora::nn::SoftmaxCrossEntropy<Scalar> loss;
  std::vector<std::size_t> order(train.tokens.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  lora::detail::Random rng(17);
  const std::size_t total_steps = order.size() * static_cast<std::size_t>(epochs);
  std::size_t step = 0;
  model.train(true);
  for (int epoch = 1; epoch <= epochs; ++epoch) {
    for (std::size_t i = order.size(); i > 1; --i)
      std::swap(order[i - 1], order[static_cast<std::size_t>(rng.uniform() * static_cast<double>(i))]);
    double sum = 0;
    std::size_t right = 0, seen = 0;
    std::vector<int> predicted;
    for (std::size_t k : order) {
      // Linear decay of the learning rate to 10 % of lr over the run.
      optimizer.set_lr(lr * (1.0 - 0.9 * static_cast<double>(step++) / static_cast<double>(total_steps)));
      model.zero_grad();
      const auto& logits = model.forward(train.tokens[k]);
      sum += loss.forward(logits, train.labels[k]) * static_cast<double>(train.labels[k].size());
      lora::nn::argmax_rows(logits, predicted);
      for (std::size_t i = 0; i < predicted.size(); ++i) right += predicted[i] == train.labels[k][i];
      seen += train.labels[k].size();
      model.backward(loss.backward());
      optimizer.step(params);
    }
    stats.last_loss = sum / static_cast<double>(seen);
    if (progress)
      std::printf("  %-22s epoch %2d/%d  loss %.4f  accuracy %.3f  %6.1f s\n", label.c_str(), epoch, epochs,
                  stats.last_loss, static_cast<double>(right) / static_cast<double>(seen), seconds_since(start));
    std::fflush(stdout);
  }
  stats.optimizer_bytes = optimizer.state_bytes();
  stats.seconds = seconds_since(start);
  return stats;
}

// A model for task B from a pretrained one: every base tensor but the classifier, which is new.
inline std::unique_ptr<Model> for_task(const Model& base, lora::Index num_labels, std::uint64_t seed) {
  lora::nn::BertConfig config = base.config();
  config.num_labels = num_labels;
  auto model = std::make_unique<Model>(config, seed);
  for (const std::string& name : base.base_tensor_names())
    if (name.rfind("classifier.", 0) != 0) model->set_base_tensor(name, base.base_tensor(name));
  return model;
}

// One line of an example's results table.
struct Row {
  std::string method;
  lora::Index trainable = 0;
  double percent = 0, accuracy = 0, seconds = 0, rss_mib = 0;
  std::size_t optimizer_bytes = 0, base_bytes = 0;
};

// The examples' LoRA configuration: `targets` at `rank`, alpha = 2 r, the classifier trained in full.
inline lora::nn::LoraInjectConfig lora_on(std::vector<std::string> targets, int rank) {
  lora::nn::LoraInjectConfig c;
  c.target_modules = std::move(targets);
  c.modules_to_save = {"classifier"};
  c.rank = rank;
  c.alpha = 2.0 * rank;
  c.seed = 5;
  return c;
}

}  // namespace example
