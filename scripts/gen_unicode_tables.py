#!/usr/bin/env python3
"""Writes include/lora/text/unicode_tables.hpp: the character data of lora/text/wordpiece.hpp.

    scripts/gen_unicode_tables.py [OUTPUT]

Run it with the Python whose unicodedata the reference tokenizer uses (Debian's python3 of the interop
venv: Python 3.11, Unicode 14.0.0): Hugging Face's BertTokenizer asks unicodedata for every decision,
so the tables must come from the same Unicode version to tokenize exactly as it does. The header names
the version it was made from; code points unassigned in that version are removed by the tokenizer
(category Cn), as in Python.

Tables, over all of U+0000..U+10FFFF:
  char_class_ranges   what BertTokenizer's BasicTokenizer does with a character: removed by
                      _clean_text (NUL, U+FFFD, category C* except \\t \\n \\r), a separator (what
                      _clean_text turns into a space, or what str.split() still splits on), punctuation
                      (_is_punctuation: the four ASCII ranges of non-alphanumerics, and category P*), a
                      nonspacing mark (category Mn, dropped by _run_strip_accents), or other.
  combining_ranges    canonical combining classes other than 0 (for the canonical ordering of NFD).
  lower_runs          str.lower() of one character, where it is one character: runs of code points
                      first + k * stride (k < count) mapped to cp + delta. The only multi-character
                      lowering (U+0130 -> U+0069 U+0307) is emitted apart.
  decompositions      one step of canonical decomposition (UnicodeData.txt's field 5, at most two code
                      points), Hangul syllables excluded (decomposed arithmetically), with whether the
                      pair composes back under NFC (a primary composite, not excluded).
The script checks the assumptions the C++ code makes and fails if a future Unicode breaks one.
"""
import sys
import unicodedata

MAX = 0x110000
OTHER, REMOVED, SEPARATOR, PUNCTUATION, NONSPACING_MARK = range(5)
HANGUL_FIRST, HANGUL_LAST = 0xAC00, 0xD7A3


def is_surrogate(cp):
    return 0xD800 <= cp <= 0xDFFF


def char_class(cp):
    ch = chr(cp)
    cat = unicodedata.category(ch)
    if ch in "\t\n\r":
        return SEPARATOR
    if cp == 0 or cp == 0xFFFD or cat.startswith("C"):
        return REMOVED
    if cat == "Zs" or ch.isspace():
        return SEPARATOR
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or cat.startswith("P"):
        return PUNCTUATION
    if cat == "Mn":
        return NONSPACING_MARK
    return OTHER


def check(condition, what):
    if not condition:
        sys.exit("gen_unicode_tables.py: assumption broken: " + what)


def class_ranges():
    out, prev = [], None
    for cp in range(MAX):
        c = char_class(cp)
        if c != prev:
            out.append((cp, c))
            prev = c
    return out


def combining_ranges():
    out, start, prev = [], None, 0
    for cp in range(MAX + 1):
        c = unicodedata.combining(chr(cp)) if cp < MAX else 0
        if c != prev:
            if prev:
                out.append((start, cp - 1, prev))
            start, prev = cp, c
    return out


def lowercase():
    singles, multi = [], []
    for cp in range(MAX):
        low = chr(cp).lower()
        if low == chr(cp):
            continue
        check(low.lower() == low, "str.lower() of U+%04X is not idempotent" % cp)
        if len(low) == 1:
            singles.append((cp, ord(low) - cp))
        else:
            multi.append((cp, [ord(c) for c in low]))
    check(len(multi) == 1 and multi[0][0] == 0x130, "U+0130 is the only multi-character lowering")
    runs = []  # greedy: extend the last run while the stride and the delta hold
    for cp, delta in singles:
        if runs:
            first, count, stride, d = runs[-1]
            last = first + (count - 1) * stride
            if d == delta and count == 1 and cp - first in (1, 2):
                runs[-1] = (first, 2, cp - first, d)
                continue
            if d == delta and count > 1 and cp - last == stride:
                runs[-1] = (first, count + 1, stride, d)
                continue
        runs.append((cp, 1, 1, delta))
    check(all(r[1] < 65536 for r in runs), "a lowercase run fits 16 bits")
    return runs, multi[0]


def decompositions():
    out = []
    for cp in range(MAX):
        if HANGUL_FIRST <= cp <= HANGUL_LAST or is_surrogate(cp):
            continue
        d = unicodedata.decomposition(chr(cp))
        if not d or d.startswith("<"):
            continue
        parts = [int(x, 16) for x in d.split()]
        check(len(parts) in (1, 2), "canonical decompositions have one or two code points (U+%04X)" % cp)
        composes = len(parts) == 2 and unicodedata.normalize("NFC", chr(cp)) == chr(cp)
        if composes:
            check(unicodedata.combining(chr(parts[0])) == 0, "a primary composite starts with a starter")
        out.append((cp, parts[0], parts[1] if len(parts) == 2 else 0, composes))
    return out


def check_assumptions(decomps):
    # Every character str.split() splits on is removed by _clean_text or is a separator.
    for cp in range(MAX):
        if chr(cp).isspace():
            check(char_class(cp) in (REMOVED, SEPARATOR), "U+%04X is whitespace for str.split()" % cp)
    # Separators do not change case (lowering comes before _clean_text), and those that _clean_text keeps
    # (U+2028, U+2029) neither decompose nor compose, so NFC keeps them in place.
    involved = {d[0] for d in decomps} | {d[1] for d in decomps} | {d[2] for d in decomps}
    for cp in range(MAX):
        if char_class(cp) == SEPARATOR:
            check(chr(cp).lower() == chr(cp), "separator U+%04X has no lower case" % cp)
            kept = unicodedata.category(chr(cp)) != "Zs" and chr(cp) not in " \t\n\r"
            check(not kept or (cp not in involved and not unicodedata.combining(chr(cp))),
                  "separator U+%04X kept by _clean_text is inert under NFC" % cp)
    # Lowering before NFC is the same as lowering after it: a composite of lower-case-stable parts is
    # itself stable, so BasicTokenizer's second lower() (after NFC) changes nothing.
    for cp, a, b, composes in decomps:
        if composes and chr(a).lower() == chr(a) and chr(b).lower() == chr(b):
            check(chr(cp).lower() == chr(cp), "composite U+%04X of lower-case parts is lower-case" % cp)


def hex_list(values, per_line, width=0):
    items = ["0x%0*X" % (width, v) for v in values]
    lines = []
    for i in range(0, len(items), per_line):
        lines.append("    " + ", ".join(items[i:i + per_line]) + ",")
    return "\n".join(lines)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "include/lora/text/unicode_tables.hpp"
    classes = class_ranges()
    combining = combining_ranges()
    lower, special = lowercase()
    decomps = decompositions()
    check_assumptions(decomps)
    check(all(c < (1 << 3) for _, c in classes), "a class fits 3 bits")

    version = unicodedata.unidata_version
    py = "%d.%d.%d" % sys.version_info[:3]
    out = []
    out.append("// lora.hpp: Unicode character data for lora/text/wordpiece.hpp. GENERATED by scripts/gen_unicode_tables.py")
    out.append("// from Python %s's unicodedata (Unicode %s): do not edit, run the script. See the script for" % (py, version))
    out.append("// what each table holds and the assumptions it checks.")
    out.append("#pragma once")
    out.append("")
    out.append("#include <cstdint>")
    out.append("")
    out.append("namespace lora::text::detail {")
    out.append("")
    out.append('inline constexpr char unicode_version[] = "%s";' % version)
    out.append("")
    out.append("// What BertTokenizer's BasicTokenizer does with a character.")
    out.append("enum class CharClass : std::uint8_t { other = %d, removed = %d, separator = %d, punctuation = %d, nonspacing_mark = %d };"
               % (OTHER, REMOVED, SEPARATOR, PUNCTUATION, NONSPACING_MARK))
    out.append("")
    out.append("// (first << 3) | class, sorted: the class holds from first up to the next entry's first (%d ranges)." % len(classes))
    out.append("inline constexpr std::uint32_t char_class_ranges[] = {")
    out.append(hex_list([(cp << 3) | c for cp, c in classes], 10))
    out.append("};")
    out.append("")
    out.append("// Canonical combining classes other than 0, sorted: {first, last, class} (%d ranges)." % len(combining))
    out.append("struct CombiningRange {")
    out.append("  std::uint32_t first, last;")
    out.append("  std::uint8_t combining_class;")
    out.append("};")
    out.append("inline constexpr CombiningRange combining_ranges[] = {")
    line = []
    for i, (a, b, c) in enumerate(combining):
        line.append("{0x%X, 0x%X, %d}" % (a, b, c))
        if len(line) == 6 or i == len(combining) - 1:
            out.append("    " + ", ".join(line) + ",")
            line = []
    out.append("};")
    out.append("")
    out.append("// str.lower() of one character: first + k * stride (k < count) lowers to itself + delta; sorted (%d runs)." % len(lower))
    out.append("struct LowerRun {")
    out.append("  std::uint32_t first;")
    out.append("  std::uint16_t count;")
    out.append("  std::uint8_t stride;")
    out.append("  std::int32_t delta;")
    out.append("};")
    out.append("inline constexpr LowerRun lower_runs[] = {")
    line = []
    for i, (a, n, s, d) in enumerate(lower):
        line.append("{0x%X, %d, %d, %d}" % (a, n, s, d))
        if len(line) == 5 or i == len(lower) - 1:
            out.append("    " + ", ".join(line) + ",")
            line = []
    out.append("};")
    out.append("// The one character whose lower case is two characters.")
    out.append("inline constexpr std::uint32_t lower_special_from = 0x%X;" % special[0])
    out.append("inline constexpr std::uint32_t lower_special_to[] = {%s};" % ", ".join("0x%X" % c for c in special[1]))
    out.append("")
    out.append("// One step of canonical decomposition, Hangul syllables excluded, sorted: {code point, first, second (0")
    out.append("// for a singleton), whether first + second composes back to the code point under NFC} (%d entries)." % len(decomps))
    out.append("struct Decomposition {")
    out.append("  std::uint32_t code_point, first, second;")
    out.append("  bool composes;")
    out.append("};")
    out.append("inline constexpr Decomposition decompositions[] = {")
    line = []
    for i, (cp, a, b, c) in enumerate(decomps):
        line.append("{0x%X, 0x%X, 0x%X, %s}" % (cp, a, b, "true" if c else "false"))
        if len(line) == 5 or i == len(decomps) - 1:
            out.append("    " + ", ".join(line) + ",")
            line = []
    out.append("};")
    out.append("")
    out.append("}  // namespace lora::text::detail")
    out.append("")
    with open(path, "w") as f:
        f.write("\n".join(out))
    print("%s: Unicode %s (Python %s): %d class ranges, %d combining ranges, %d lowercase runs, %d decompositions"
          % (path, version, py, len(classes), len(combining), len(lower), len(decomps)))


if __name__ == "__main__":
    main()
