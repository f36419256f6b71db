// lora.hpp: a BERT WordPiece tokenizer that gives the ids of Hugging Face's BertTokenizer (the slow
// Python one, transformers 4.49) for a vocab.txt, such as sentence-transformers/all-MiniLM-L6-v2's.
//
//   auto tok = lora::text::WordPieceTokenizer::from_file("minilm/vocab.txt");   // do_lower_case = true
//   std::vector<lora::Index> ids = tok.encode("Café au lait!");                  // [CLS] ... [SEP]
//
// The steps, in BertTokenizer's order:
//   1. the special tokens present in the vocabulary ([UNK] [SEP] [PAD] [CLS] [MASK]) are split out of
//      the text as they are written (case-sensitive), and the rest is cut into segments around them;
//   2. do_lower_case: every character is lowered alone (str.lower() of one character; PreTrainedTokenizer
//      lowers through a one-character regex, so Greek final sigma never applies);
//   3. _clean_text: NUL, U+FFFD and category C* (control, format, unassigned, private use, surrogate)
//      are removed except \t \n \r; whitespace (Zs, \t \n \r) separates words;
//   4. CJK ideographs (HF's eight ranges) become words of their own; the segment is put in NFC;
//   5. split on whitespace; a word equal to a special token is kept whole;
//   6. do_lower_case: NFD and the nonspacing marks (category Mn) dropped: "Café" -> "cafe";
//   7. every punctuation character (ASCII non-alphanumerics, category P*) becomes a word;
//   8. WordPiece: greedy longest match first, continuations prefixed "##"; a word of more than
//      max_input_chars_per_word (100) code points, or one that cannot be covered, is one [UNK].
// The character data (unicode_tables.hpp) is Python's unicodedata of the Unicode version named in
// detail::unicode_version (14.0.0 from Debian's Python 3.11): a character assigned in a later version
// counts as unassigned, and is removed, as in that Python.
//
// Errors: invalid UTF-8 in a text throws std::invalid_argument naming the byte offset; a vocabulary
// file that cannot be read, holds invalid UTF-8 or a duplicate token, or lacks [UNK], [CLS], [SEP] or
// [PAD] throws lora::io_error naming the file and the line. Every member is const after construction:
// one tokenizer can serve many threads.
#pragma once

#include <lora/common.hpp>
#include <lora/io/error.hpp>
#include <lora/io/file.hpp>
#include <lora/text/unicode_tables.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lora::text {
namespace detail {

// Decodes UTF-8 as Python's strict codec does (no overlong forms, surrogates or code points above
// U+10FFFF). Returns the byte offset of the first invalid sequence, or npos, and says what is wrong.
inline std::size_t decode_utf8(std::string_view s, std::u32string& out, std::string& problem) {
  out.clear();
  out.reserve(s.size());
  const auto hex = [](unsigned char b) {
    const char* digits = "0123456789ABCDEF";
    return std::string("0x") + digits[b >> 4] + digits[b & 15];
  };
  std::size_t i = 0;
  while (i < s.size()) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    if (b0 < 0x80) {
      out.push_back(b0);
      ++i;
      continue;
    }
    std::size_t n = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte
    char32_t c = 0;
    if (b0 >= 0xC2 && b0 <= 0xDF) {
      n = 2;
      c = b0 & 0x1Fu;
    } else if (b0 >= 0xE0 && b0 <= 0xEF) {
      n = 3;
      c = b0 & 0x0Fu;
      if (b0 == 0xE0) lo = 0xA0;  // overlong below
      if (b0 == 0xED) hi = 0x9F;  // surrogates above
    } else if (b0 >= 0xF0 && b0 <= 0xF4) {
      n = 4;
      c = b0 & 0x07u;
      if (b0 == 0xF0) lo = 0x90;  // overlong below
      if (b0 == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      problem = "byte " + hex(b0) + (b0 < 0xC0 ? " is a continuation byte without a leading byte"
                                               : " cannot start a character (overlong or beyond U+10FFFF)");
      return i;
    }
    for (std::size_t k = 1; k < n; ++k) {
      if (i + k >= s.size()) {
        problem = "the text ends inside the " + std::to_string(n) + "-byte sequence that " + hex(b0) + " starts";
        return i;
      }
      const auto b = static_cast<unsigned char>(s[i + k]);
      if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) {
        problem = "byte " + hex(b) + " cannot follow " + hex(static_cast<unsigned char>(s[i + k - 1])) +
                  " in the sequence that " + hex(b0) + " starts";
        return i;
      }
      c = (c << 6) | (b & 0x3Fu);
    }
    out.push_back(c);
    i += n;
  }
  return std::string_view::npos;
}

inline void append_utf8(std::string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

inline std::string to_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) append_utf8(out, c);
  return out;
}

inline CharClass char_class(char32_t c) {
  const std::uint32_t key = (static_cast<std::uint32_t>(c) << 3) | 7u;
  const auto* it = std::upper_bound(std::begin(char_class_ranges), std::end(char_class_ranges), key);
  return static_cast<CharClass>(*(it - 1) & 7u);  // the first entry starts at U+0000
}

inline int combining_class(char32_t c) {
  if (c < 0x300) return 0;
  const auto* it = std::lower_bound(std::begin(combining_ranges), std::end(combining_ranges), c,
                                    [](const CombiningRange& r, char32_t v) { return r.last < v; });
  return it != std::end(combining_ranges) && it->first <= c ? it->combining_class : 0;
}

// str.lower() of one character, appended.
inline void append_lower(std::u32string& out, char32_t c) {
  if (c == lower_special_from) {
    out.append(std::begin(lower_special_to), std::end(lower_special_to));
    return;
  }
  const auto* it = std::upper_bound(std::begin(lower_runs), std::end(lower_runs), c,
                                    [](char32_t v, const LowerRun& r) { return v < r.first; });
  if (it != std::begin(lower_runs)) {
    const LowerRun& run = *(it - 1);
    const std::uint32_t offset = static_cast<std::uint32_t>(c) - run.first;
    if (offset % run.stride == 0 && offset / run.stride < run.count) {
      out.push_back(static_cast<char32_t>(static_cast<std::int64_t>(c) + run.delta));
      return;
    }
  }
  out.push_back(c);
}

// Hangul syllables decompose and compose arithmetically (Unicode 3.12).
inline constexpr char32_t hangul_s = 0xAC00, hangul_l = 0x1100, hangul_v = 0x1161, hangul_t = 0x11A7;
inline constexpr char32_t hangul_v_count = 21, hangul_t_count = 28, hangul_s_count = 19 * 21 * 28;

inline const Decomposition* find_decomposition(char32_t c) {
  const auto* it = std::lower_bound(std::begin(decompositions), std::end(decompositions), c,
                                    [](const Decomposition& d, char32_t v) { return d.code_point < v; });
  return it != std::end(decompositions) && it->code_point == c ? it : nullptr;
}

inline void append_decomposed(std::u32string& out, char32_t c) {
  if (c >= hangul_s && c < hangul_s + hangul_s_count) {
    const char32_t s = c - hangul_s;
    out.push_back(hangul_l + s / (hangul_v_count * hangul_t_count));
    out.push_back(hangul_v + (s % (hangul_v_count * hangul_t_count)) / hangul_t_count);
    if (s % hangul_t_count != 0) out.push_back(hangul_t + s % hangul_t_count);
    return;
  }
  const Decomposition* d = c < 0xC0 ? nullptr : find_decomposition(c);
  if (!d) {
    out.push_back(c);
    return;
  }
  append_decomposed(out, d->first);
  if (d->second != 0) append_decomposed(out, d->second);
}

// Canonical decomposition followed by the canonical ordering of every run of non-starters.
inline std::u32string nfd(std::u32string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (char32_t c : s) append_decomposed(out, c);
  for (std::size_t i = 0; i < out.size();) {
    if (combining_class(out[i]) == 0) {
      ++i;
      continue;
    }
    std::size_t end = i + 1;
    while (end < out.size() && combining_class(out[end]) != 0) ++end;
    if (end - i > 1)
      std::stable_sort(out.begin() + static_cast<std::ptrdiff_t>(i), out.begin() + static_cast<std::ptrdiff_t>(end),
                       [](char32_t a, char32_t b) { return combining_class(a) < combining_class(b); });
    i = end;
  }
  return out;
}

// The primary composite of a starter and the character after it, or 0.
inline char32_t compose_pair(char32_t a, char32_t b) {
  if (a >= hangul_l && a < hangul_l + 19 && b >= hangul_v && b < hangul_v + hangul_v_count)
    return hangul_s + ((a - hangul_l) * hangul_v_count + (b - hangul_v)) * hangul_t_count;
  if (a >= hangul_s && a < hangul_s + hangul_s_count && (a - hangul_s) % hangul_t_count == 0 && b > hangul_t &&
      b < hangul_t + hangul_t_count)
    return a + (b - hangul_t);
  struct Pairs {
    std::vector<std::pair<std::uint64_t, char32_t>> sorted;
    Pairs() {
      for (const Decomposition& d : decompositions)
        if (d.composes) sorted.emplace_back((std::uint64_t{d.first} << 21) | d.second, d.code_point);
      std::sort(sorted.begin(), sorted.end());
    }
  };
  static const Pairs pairs;  // built once (thread-safe initialisation of a local static)
  const std::uint64_t key = (std::uint64_t{a} << 21) | b;
  const auto it = std::lower_bound(pairs.sorted.begin(), pairs.sorted.end(), key,
                                   [](const std::pair<std::uint64_t, char32_t>& p, std::uint64_t k) { return p.first < k; });
  return it != pairs.sorted.end() && it->first == key ? it->second : 0;
}

// Normalization Form C: NFD, then the canonical composition of UAX #15.
inline std::u32string nfc(std::u32string_view s) {
  if (std::all_of(s.begin(), s.end(), [](char32_t c) { return c < 0x300; })) return std::u32string(s);
  const std::u32string d = nfd(s);
  std::u32string out;
  out.reserve(d.size());
  std::size_t starter = 0;
  bool have_starter = false;
  int last_class = 0;
  for (char32_t c : d) {
    const int cc = combining_class(c);
    if (have_starter && (last_class < cc || last_class == 0)) {
      // last_class == 0 here means the starter is the character just before c.
      const char32_t composite = compose_pair(out[starter], c);
      if (composite != 0) {
        out[starter] = composite;
        continue;
      }
    }
    if (cc == 0) {
      starter = out.size();
      have_starter = true;  // non-starters before the first starter compose with nothing
    }
    last_class = cc;
    out.push_back(c);
  }
  return out;
}

// BasicTokenizer._is_chinese_char: the CJK ideograph blocks, not Hangul, Hiragana or Katakana.
inline bool is_cjk_ideograph(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B820 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

}  // namespace detail

class WordPieceTokenizer {
 public:
  // Longer words (in code points) become one [UNK], as BertTokenizer's WordpieceTokenizer does.
  static constexpr Index max_input_chars_per_word = 100;

  // Reads a vocab.txt: one token per line (lines end with \n, \r\n or \r, as Python's text mode reads
  // them), the id of a token is its line's index from 0. Must hold [UNK], [CLS], [SEP] and [PAD].
  static WordPieceTokenizer from_file(const std::string& vocab_path, bool do_lower_case = true) {
    const char* where = "WordPieceTokenizer::from_file";
    const std::string bytes = lora::detail::read_small_file(vocab_path, std::uint64_t{1} << 28, where);
    std::vector<std::string> tokens;
    std::vector<std::size_t> starts;  // byte offset of each line, for the messages
    std::size_t begin = 0;
    while (begin < bytes.size()) {
      std::size_t end = bytes.find_first_of("\r\n", begin);
      if (end == std::string::npos) end = bytes.size();
      tokens.push_back(bytes.substr(begin, end - begin));
      starts.push_back(begin);
      begin = end + 1;
      if (end + 1 < bytes.size() && bytes[end] == '\r' && bytes[end + 1] == '\n') ++begin;
    }
    WordPieceTokenizer t;
    const std::string problem = t.build(std::move(tokens), do_lower_case, [&](Index i) {
      return lora::detail::concat("line ", i + 1, " (byte offset ", starts[static_cast<std::size_t>(i)], ")");
    });
    if (!problem.empty()) lora::detail::io_fail(where, vocab_path, "", problem);
    return t;
  }

  // The same from the tokens themselves (id = position); throws std::invalid_argument.
  static WordPieceTokenizer from_tokens(std::vector<std::string> tokens, bool do_lower_case = true) {
    WordPieceTokenizer t;
    const std::string problem =
        t.build(std::move(tokens), do_lower_case, [](Index i) { return lora::detail::concat("token ", i); });
    if (!problem.empty()) lora::detail::fail("WordPieceTokenizer::from_tokens", problem);
    return t;
  }

  // The ids of the word pieces of utf8_text, between [CLS] and [SEP] when add_special_tokens: what
  // BertTokenizer.encode(text, add_special_tokens=...) returns (no truncation).
  std::vector<Index> encode(const std::string& utf8_text, bool add_special_tokens = true) const {
    std::vector<Index> ids;
    if (add_special_tokens) ids.push_back(cls_);
    run(utf8_text, "WordPieceTokenizer::encode", nullptr, &ids);
    if (add_special_tokens) ids.push_back(sep_);
    return ids;
  }

  // The word pieces of utf8_text ("##" marks a continuation), as BertTokenizer.tokenize(text).
  std::vector<std::string> tokenize(const std::string& utf8_text) const {
    std::vector<Index> ids;
    run(utf8_text, "WordPieceTokenizer::tokenize", nullptr, &ids);
    std::vector<std::string> out;
    out.reserve(ids.size());
    for (Index i : ids) out.push_back(tokens_[static_cast<std::size_t>(i)]);
    return out;
  }

  // The words before WordPiece (steps 1-7 above): lowered, cleaned, accents stripped, punctuation split.
  std::vector<std::string> basic_tokenize(const std::string& utf8_text) const {
    std::vector<std::u32string> words;
    run(utf8_text, "WordPieceTokenizer::basic_tokenize", &words, nullptr);
    std::vector<std::string> out;
    out.reserve(words.size());
    for (const auto& w : words) out.push_back(detail::to_utf8(w));
    return out;
  }

  // The id of a token, or unk_id() for one the vocabulary does not hold (convert_tokens_to_ids).
  Index id(const std::string& token) const {
    const auto it = ids_.find(token);
    return it == ids_.end() ? unk_ : it->second;
  }
  bool contains(const std::string& token) const { return ids_.count(token) != 0; }

  const std::string& token(Index id) const {
    if (id < 0 || id >= vocab_size())
      lora::detail::fail("WordPieceTokenizer::token", "id ", id, " is out of range, expected 0 <= id < vocab_size = ",
                         vocab_size());
    return tokens_[static_cast<std::size_t>(id)];
  }

  Index vocab_size() const { return static_cast<Index>(tokens_.size()); }
  Index unk_id() const { return unk_; }
  Index cls_id() const { return cls_; }
  Index sep_id() const { return sep_; }
  Index pad_id() const { return pad_; }
  Index mask_id() const { return mask_; }  // -1 when the vocabulary has no [MASK]
  bool do_lower_case() const { return do_lower_case_; }

 private:
  WordPieceTokenizer() = default;

  // Fills the tokenizer; returns what is wrong with the tokens ("" when nothing), `where(i)` naming token i.
  template <class Where>
  std::string build(std::vector<std::string> tokens, bool do_lower_case, Where&& where) {
    do_lower_case_ = do_lower_case;
    ids_.reserve(tokens.size());
    std::u32string decoded;
    std::string problem;
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const Index id = static_cast<Index>(i);
      const std::size_t bad = detail::decode_utf8(tokens[i], decoded, problem);
      if (bad != std::string_view::npos)
        return lora::detail::concat(where(id), ": invalid UTF-8 at byte ", bad, " of the token: ", problem);
      const auto [it, inserted] = ids_.emplace(tokens[i], id);
      if (!inserted)
        return lora::detail::concat(where(id), ": token '", tokens[i], "' is a duplicate of ", where(it->second),
                                    ", expected every token once");
    }
    tokens_ = std::move(tokens);
    const auto require = [&](const char* name, Index& into) {
      const auto it = ids_.find(name);
      if (it == ids_.end()) return false;
      into = it->second;
      return true;
    };
    for (const char* name : {"[UNK]", "[CLS]", "[SEP]", "[PAD]"}) {
      Index unused = 0;
      if (!require(name, unused))
        return lora::detail::concat("the vocabulary (", tokens_.size(), " tokens) has no ", name,
                                    " token, expected [UNK], [CLS], [SEP] and [PAD]");
    }
    require("[UNK]", unk_);
    require("[CLS]", cls_);
    require("[SEP]", sep_);
    require("[PAD]", pad_);
    if (!require("[MASK]", mask_)) mask_ = -1;
    // PreTrainedTokenizer's order of all_special_tokens; none is a prefix of another.
    for (const char* name : {"[UNK]", "[SEP]", "[PAD]", "[CLS]", "[MASK]"}) {
      const auto it = ids_.find(name);
      if (it != ids_.end()) specials_.emplace_back(std::u32string(name, name + std::char_traits<char>::length(name)), it->second);
    }
    return "";
  }

  // The special token that starts at text[i], or nullptr.
  const std::pair<std::u32string, Index>* special_at(const std::u32string& text, std::size_t i) const {
    const std::pair<std::u32string, Index>* best = nullptr;
    for (const auto& s : specials_)
      if (text.compare(i, s.first.size(), s.first) == 0 && (!best || s.first.size() > best->first.size())) best = &s;
    return best;
  }

  // Steps 1-8; collects the words (before WordPiece) or the ids.
  void run(const std::string& utf8_text, const char* where, std::vector<std::u32string>* words,
           std::vector<Index>* ids) const {
    std::u32string text;
    std::string problem;
    const std::size_t bad = detail::decode_utf8(utf8_text, text, problem);
    if (bad != std::string_view::npos) lora::detail::fail(where, "invalid UTF-8 at byte offset ", bad, ": ", problem);
    std::size_t segment = 0;
    for (std::size_t i = 0; i <= text.size();) {
      const auto* special = i < text.size() ? special_at(text, i) : nullptr;
      if (!special && i < text.size()) {
        ++i;
        continue;
      }
      basic_words(std::u32string_view(text).substr(segment, i - segment), words, ids);
      if (!special) break;
      if (words) words->push_back(special->first);
      if (ids) ids->push_back(special->second);
      i += special->first.size();
      segment = i;
    }
  }

  void basic_words(std::u32string_view segment, std::vector<std::u32string>* words, std::vector<Index>* ids) const {
    using detail::CharClass;
    // Lowering (PreTrainedTokenizer.tokenize), _clean_text and _tokenize_chinese_chars, then NFC.
    std::u32string lowered;
    if (do_lower_case_) {
      lowered.reserve(segment.size());
      for (char32_t c : segment) detail::append_lower(lowered, c);
      segment = lowered;
    }
    std::u32string cleaned;
    cleaned.reserve(segment.size());
    for (char32_t c : segment) {
      const CharClass k = detail::char_class(c);
      if (k == CharClass::removed) continue;
      if (k == CharClass::separator) {
        cleaned.push_back(U' ');
      } else if (detail::is_cjk_ideograph(c)) {
        cleaned.push_back(U' ');
        cleaned.push_back(c);
        cleaned.push_back(U' ');
      } else {
        cleaned.push_back(c);
      }
    }
    const std::u32string text = detail::nfc(cleaned);
    // Every separator is a space by now (the generator checks that NFC moves none).
    std::u32string word;
    for (std::size_t begin = 0; begin < text.size();) {
      std::size_t end = text.find(U' ', begin);
      if (end == std::u32string::npos) end = text.size();
      if (end > begin) {
        word.assign(text, begin, end - begin);
        const bool never_split = std::any_of(specials_.begin(), specials_.end(),
                                             [&](const std::pair<std::u32string, Index>& s) { return s.first == word; });
        if (never_split) {
          emit(word, words, ids);
        } else {
          // str.lower() again would change nothing: the text is lowered already and NFC composes lower-case
          // parts into lower-case characters (checked by the generator).
          if (do_lower_case_) strip_accents(word);
          split_on_punctuation(word, words, ids);
        }
      }
      begin = end + 1;
    }
  }

  static void strip_accents(std::u32string& word) {
    if (std::all_of(word.begin(), word.end(), [](char32_t c) { return c < 0xC0; })) return;
    std::u32string d = detail::nfd(word);
    d.erase(std::remove_if(d.begin(), d.end(),
                           [](char32_t c) { return detail::char_class(c) == detail::CharClass::nonspacing_mark; }),
            d.end());
    word = std::move(d);
  }

  void split_on_punctuation(const std::u32string& word, std::vector<std::u32string>* words,
                            std::vector<Index>* ids) const {
    std::size_t begin = 0;
    for (std::size_t i = 0; i < word.size(); ++i) {
      if (detail::char_class(word[i]) != detail::CharClass::punctuation) continue;
      if (i > begin) emit(word.substr(begin, i - begin), words, ids);
      emit(word.substr(i, 1), words, ids);
      begin = i + 1;
    }
    if (word.size() > begin) emit(word.substr(begin), words, ids);
  }

  void emit(const std::u32string& word, std::vector<std::u32string>* words, std::vector<Index>* ids) const {
    if (words) words->push_back(word);
    if (ids) wordpiece(word, *ids);
  }

  // Greedy longest-match-first over the vocabulary; a word it cannot cover is one [UNK].
  void wordpiece(const std::u32string& word, std::vector<Index>& ids) const {
    if (static_cast<Index>(word.size()) > max_input_chars_per_word) {
      ids.push_back(unk_);
      return;
    }
    std::string utf8;
    std::vector<std::size_t> offsets;  // byte offset of each code point, and of the end
    offsets.reserve(word.size() + 1);
    for (char32_t c : word) {
      offsets.push_back(utf8.size());
      detail::append_utf8(utf8, c);
    }
    offsets.push_back(utf8.size());
    const std::size_t first = ids.size();
    std::string piece;
    for (std::size_t start = 0; start < word.size();) {
      std::size_t end = word.size();
      Index found = -1;
      for (; end > start; --end) {
        piece.assign(start > 0 ? "##" : "");
        piece.append(utf8, offsets[start], offsets[end] - offsets[start]);
        const auto it = ids_.find(piece);
        if (it != ids_.end()) {
          found = it->second;
          break;
        }
      }
      if (found < 0) {
        ids.resize(first);
        ids.push_back(unk_);
        return;
      }
      ids.push_back(found);
      start = end;
    }
  }

  std::vector<std::string> tokens_;
  std::unordered_map<std::string, Index> ids_;
  std::vector<std::pair<std::u32string, Index>> specials_;  // in the text, matched as written
  bool do_lower_case_ = true;
  Index unk_ = 0, cls_ = 0, sep_ = 0, pad_ = 0, mask_ = -1;
};

}  // namespace lora::text
