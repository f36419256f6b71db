// lora.hpp internal: the regular expressions of PEFT configs (target_modules as a string,
// exclude_modules, layers_pattern, rank_pattern / alpha_pattern keys), matched in linear time.
//
// PEFT evaluates these with Python's `re`. The standard library's regex engine backtracks (exponential
// time, deep recursion) and a config file is untrusted input, so this is a small Thompson-NFA matcher instead: time
// O(pattern x text), no recursion while matching, bounded program size. Supported: literals, '.',
// classes [a-z0-9_] [^...], escapes \d \w \s \D \W \S \. \\ ..., groups (...) (?:...), alternation |,
// quantifiers * + ? {m} {m,} {,n} {m,n} (a trailing '?' for laziness is accepted: it does not change
// whether a full match exists), '^' at the start and '$' at the end. Anything else (back-references,
// look-arounds, \b, named groups, flags) is rejected with std::invalid_argument. Matching is per byte.
#pragma once

#include <lora/common.hpp>

#include <bitset>
#include <cstdint>
#include <string>
#include <vector>

namespace lora {
namespace detail {

class Pattern {
 public:
  // re.fullmatch(regex, text)
  static Pattern full(const std::string& regex) { return Pattern(regex, false); }
  // re.match(rf"(.*\.)?({key})$", text): PEFT's get_pattern_key, the key matches a trailing run of
  // dotted components of the module name.
  static Pattern peft_key(const std::string& key) { return Pattern(key, true); }

  bool matches(const std::string& text) const {
    std::vector<int> cur, next, stack;
    std::vector<std::uint32_t> mark(prog_.size(), 0);
    std::uint32_t gen = 1;
    add(cur, 0, mark, gen, stack);
    for (unsigned char c : text) {
      ++gen;
      next.clear();
      for (int pc : cur)
        if (prog_[static_cast<std::size_t>(pc)].op == Op::set && prog_[static_cast<std::size_t>(pc)].set[c])
          add(next, pc + 1, mark, gen, stack);
      cur.swap(next);
      if (cur.empty()) return false;
    }
    for (int pc : cur)
      if (prog_[static_cast<std::size_t>(pc)].op == Op::match) return true;
    return false;
  }

  static constexpr std::size_t max_pattern_length = 4096;
  static constexpr std::size_t max_program_size = 20000;
  static constexpr int max_nesting = 100;
  static constexpr int max_count = 1000;

 private:
  enum class Op { set, split, jump, match };
  struct Inst {
    Op op;
    std::bitset<256> set;
    int x = 0, y = 0;
  };
  enum class Kind { set, concat, alt, repeat };
  struct Node {
    Kind kind;
    std::bitset<256> set;
    std::vector<int> kids;
    int min = 0, max = 0;  // repeat; max < 0: unbounded
  };

  Pattern(const std::string& source, bool peft_key) : src_(source) {
    if (src_.size() > max_pattern_length)
      fail("pattern", "pattern has ", src_.size(), " characters, more than the limit of ", max_pattern_length);
    bool anchored_start = false;
    if (pos_ < src_.size() && src_[pos_] == '^') {
      anchored_start = true;
      ++pos_;
    }
    int root = parse_alt(0);
    if (pos_ < src_.size()) error("unbalanced ')'");
    if (peft_key && !anchored_start) {  // (.*\.)? in front of the key
      std::bitset<256> any;
      any.set();
      any.reset('\n');
      std::bitset<256> dot;
      dot.set('.');
      const int star = repeat_node(set_node(any), 0, -1);
      const int prefix = repeat_node(concat_node({star, set_node(dot)}), 0, 1);
      root = concat_node({prefix, root});
    }
    emit(root);
    push({Op::match, {}, 0, 0});
  }

  // ---- parser -----------------------------------------------------------------------------------
  [[noreturn]] void error(const char* what) const {
    fail("pattern", "cannot use the regular expression '", src_, "': ", what, " at offset ", pos_);
  }
  bool more() const { return pos_ < src_.size(); }
  char peek() const { return src_[pos_]; }

  int set_node(const std::bitset<256>& s) {
    nodes_.push_back({Kind::set, s, {}, 0, 0});
    return static_cast<int>(nodes_.size()) - 1;
  }
  int concat_node(std::vector<int> kids) {
    nodes_.push_back({Kind::concat, {}, std::move(kids), 0, 0});
    return static_cast<int>(nodes_.size()) - 1;
  }
  int repeat_node(int kid, int min, int max) {
    nodes_.push_back({Kind::repeat, {}, {kid}, min, max});
    return static_cast<int>(nodes_.size()) - 1;
  }

  int parse_alt(int depth) {
    std::vector<int> kids{parse_concat(depth)};
    while (more() && peek() == '|') {
      ++pos_;
      kids.push_back(parse_concat(depth));
    }
    if (kids.size() == 1) return kids.front();
    nodes_.push_back({Kind::alt, {}, std::move(kids), 0, 0});
    return static_cast<int>(nodes_.size()) - 1;
  }

  int parse_concat(int depth) {
    std::vector<int> kids;
    while (more() && peek() != '|' && peek() != ')') {
      if (peek() == '$' && pos_ + 1 == src_.size()) {  // end anchor: full matching already ends there
        ++pos_;
        break;
      }
      kids.push_back(parse_repeat(depth));
    }
    return concat_node(std::move(kids));
  }

  bool parse_count(int& min, int& max) {  // at '{'; false (and pos_ unchanged) when it is a literal
    std::size_t p = pos_ + 1;
    auto number = [&](int& out) {
      const std::size_t start = p;
      long v = 0;
      while (p < src_.size() && src_[p] >= '0' && src_[p] <= '9' && p - start < 6) v = v * 10 + (src_[p++] - '0');
      out = static_cast<int>(v);
      return p > start;
    };
    const bool has_min = number(min);
    if (!has_min) min = 0;
    if (p < src_.size() && src_[p] == '}') {
      if (!has_min) return false;
      max = min;
    } else if (p < src_.size() && src_[p] == ',') {
      ++p;
      if (!number(max)) max = -1;
      if (!has_min && max < 0) return false;
      if (p >= src_.size() || src_[p] != '}') return false;
    } else {
      return false;
    }
    pos_ = p + 1;
    if (min > max_count || max > max_count) error("repeat count above 1000");
    if (max >= 0 && max < min) error("repeat range {m,n} with n < m");
    return true;
  }

  int parse_repeat(int depth) {
    int atom = parse_atom(depth);
    bool repeated = false;
    while (more()) {
      int min = 0, max = 0;
      const char c = peek();
      if (c == '*') {
        min = 0, max = -1, ++pos_;
      } else if (c == '+') {
        min = 1, max = -1, ++pos_;
      } else if (c == '?') {
        min = 0, max = 1, ++pos_;
      } else if (c == '{') {
        if (!parse_count(min, max)) break;
      } else {
        break;
      }
      if (repeated) error("multiple repeat");
      repeated = true;
      if (more() && peek() == '?') ++pos_;  // lazy: the same language
      atom = repeat_node(atom, min, max);
    }
    return atom;
  }

  static std::bitset<256> class_of(char e, bool& ok) {
    std::bitset<256> s;
    ok = true;
    auto range = [&](int a, int b) {
      for (int i = a; i <= b; ++i) s.set(static_cast<std::size_t>(i));
    };
    switch (e) {
      case 'd': range('0', '9'); break;
      case 'w': range('0', '9'), range('a', 'z'), range('A', 'Z'), s.set('_'); break;
      case 's': s.set(' '), s.set('\t'), s.set('\n'), s.set('\r'), s.set('\f'), s.set('\v'); break;
      case 'D': s = class_of('d', ok).flip(); break;
      case 'W': s = class_of('w', ok).flip(); break;
      case 'S': s = class_of('s', ok).flip(); break;
      default: ok = false;
    }
    return s;
  }

  // After a backslash: a class (\d ...) or one literal byte.
  std::bitset<256> parse_escape() {
    if (!more()) error("trailing backslash");
    const char e = src_[pos_++];
    bool is_class = false;
    std::bitset<256> s = class_of(e, is_class);
    if (is_class) return s;
    const unsigned char u = static_cast<unsigned char>(e);
    if (e == 'n') s.set('\n');
    else if (e == 't') s.set('\t');
    else if (e == 'r') s.set('\r');
    else if (e == 'f') s.set('\f');
    else if (e == 'v') s.set('\v');
    else if ((u >= '0' && u <= '9') || (u >= 'a' && u <= 'z') || (u >= 'A' && u <= 'Z'))
      error("unsupported escape");  // \b \A \Z \1 ...
    else
      s.set(u);
    return s;
  }

  std::bitset<256> parse_class() {  // after '['
    std::bitset<256> s;
    bool negate = false;
    if (more() && peek() == '^') negate = true, ++pos_;
    bool first = true;
    while (true) {
      if (!more()) error("missing ']'");
      char c = peek();
      if (c == ']' && !first) {
        ++pos_;
        break;
      }
      first = false;
      ++pos_;
      std::bitset<256> item;
      int lo = static_cast<unsigned char>(c);
      if (c == '\\') {
        item = parse_escape();
        if (item.count() != 1) {  // \d and friends cannot start a range
          s |= item;
          continue;
        }
        for (int i = 0; i < 256; ++i)
          if (item[static_cast<std::size_t>(i)]) lo = i;
      }
      if (pos_ + 1 < src_.size() && peek() == '-' && src_[pos_ + 1] != ']') {
        ++pos_;
        int hi = static_cast<unsigned char>(src_[pos_++]);
        if (hi == '\\') {
          const std::bitset<256> h = parse_escape();
          if (h.count() != 1) error("bad character range");
          for (int i = 0; i < 256; ++i)
            if (h[static_cast<std::size_t>(i)]) hi = i;
        }
        if (hi < lo) error("bad character range");
        for (int i = lo; i <= hi; ++i) s.set(static_cast<std::size_t>(i));
      } else {
        s.set(static_cast<std::size_t>(lo));
      }
    }
    if (negate) s.flip();
    return s;
  }

  int parse_atom(int depth) {
    const char c = peek();
    ++pos_;
    switch (c) {
      case '(': {
        if (depth + 1 > max_nesting) error("groups nested too deeply");
        if (more() && peek() == '?') {
          if (pos_ + 1 < src_.size() && src_[pos_ + 1] == ':')
            pos_ += 2;
          else
            error("unsupported group syntax '(?'");
        }
        const int inner = parse_alt(depth + 1);
        if (!more() || peek() != ')') error("missing ')'");
        ++pos_;
        return inner;
      }
      case '[': return set_node(parse_class());
      case '.': {
        std::bitset<256> any;
        any.set();
        any.reset('\n');
        return set_node(any);
      }
      case '\\': return set_node(parse_escape());
      case '*': case '+': case '?': error("nothing to repeat");
      case '^': error("'^' is supported only at the start");
      case '$': error("'$' is supported only at the end");
      default: {
        std::bitset<256> one;
        one.set(static_cast<unsigned char>(c));
        return set_node(one);
      }
    }
  }

  // ---- compiler ---------------------------------------------------------------------------------
  int push(Inst inst) {
    if (prog_.size() >= max_program_size) error("the expression expands beyond the size limit");
    prog_.push_back(std::move(inst));
    return static_cast<int>(prog_.size()) - 1;
  }
  int pc() const { return static_cast<int>(prog_.size()); }

  void emit(int id) {
    const Node node = nodes_[static_cast<std::size_t>(id)];  // copy: nodes_ is stable, but keep it simple
    switch (node.kind) {
      case Kind::set: push({Op::set, node.set, 0, 0}); break;
      case Kind::concat:
        for (int k : node.kids) emit(k);
        break;
      case Kind::alt: {
        std::vector<int> jumps;
        for (std::size_t i = 0; i + 1 < node.kids.size(); ++i) {
          const int split = push({Op::split, {}, 0, 0});
          prog_[static_cast<std::size_t>(split)].x = pc();
          emit(node.kids[i]);
          jumps.push_back(push({Op::jump, {}, 0, 0}));
          prog_[static_cast<std::size_t>(split)].y = pc();
        }
        emit(node.kids.back());
        for (int j : jumps) prog_[static_cast<std::size_t>(j)].x = pc();
        break;
      }
      case Kind::repeat: {
        const int kid = node.kids.front();
        for (int i = 0; i < node.min; ++i) emit(kid);
        if (node.max < 0) {  // L: split(body, out); body; jump L
          const int loop = push({Op::split, {}, 0, 0});
          prog_[static_cast<std::size_t>(loop)].x = pc();
          emit(kid);
          push({Op::jump, {}, loop, 0});
          prog_[static_cast<std::size_t>(loop)].y = pc();
        } else {
          std::vector<int> splits;
          for (int i = node.min; i < node.max; ++i) {
            const int split = push({Op::split, {}, 0, 0});
            prog_[static_cast<std::size_t>(split)].x = pc();
            splits.push_back(split);
            emit(kid);
          }
          for (int s : splits) prog_[static_cast<std::size_t>(s)].y = pc();
        }
        break;
      }
    }
  }

  // ---- matcher ----------------------------------------------------------------------------------
  void add(std::vector<int>& list, int start, std::vector<std::uint32_t>& mark, std::uint32_t gen,
           std::vector<int>& stack) const {
    stack.assign(1, start);
    while (!stack.empty()) {
      const int pc = stack.back();
      stack.pop_back();
      auto& m = mark[static_cast<std::size_t>(pc)];
      if (m == gen) continue;
      m = gen;
      const Inst& inst = prog_[static_cast<std::size_t>(pc)];
      if (inst.op == Op::jump) {
        stack.push_back(inst.x);
      } else if (inst.op == Op::split) {
        stack.push_back(inst.y);
        stack.push_back(inst.x);
      } else {
        list.push_back(pc);
      }
    }
  }

  std::string src_;
  std::size_t pos_ = 0;
  std::vector<Node> nodes_;
  std::vector<Inst> prog_;
};

}  // namespace detail
}  // namespace lora
