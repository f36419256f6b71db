// lora.hpp: TokenBatch, a batch of variable-length token sequences padded to a common length, with its
// lengths and attention mask; the layout the transformer blocks read.
#pragma once

#include <lora/common.hpp>

#include <vector>

namespace lora::nn {

// Sequences laid out as token rows: sequence b, position t is row b * seq_len() + t of every
// [batch * seq_len x hidden] activation. Positions t >= length(b) are padding: their id is pad_id, their
// mask entry 0 (real tokens 1), as Hugging Face's attention_mask.
//
// TokenBatch(sequences, vocab_size, pad_id)
//   requires: at least one sequence; every sequence non-empty; every id in [0, vocab_size); pad_id in
//             [0, vocab_size). A bad id is an error naming the sequence, the position and vocab_size.
//   ensures:  seq_len() = the longest length; ids() holds batch * seq_len ids, padded with pad_id.
class TokenBatch {
 public:
  TokenBatch(const std::vector<std::vector<Index>>& sequences, Index vocab_size, Index pad_id = 0)
      : vocab_size_(vocab_size), pad_id_(pad_id) {
    constexpr const char* where = "TokenBatch::TokenBatch";
    if (vocab_size < 1) detail::fail(where, "vocab_size must be >= 1, got ", vocab_size);
    if (pad_id < 0 || pad_id >= vocab_size)
      detail::fail(where, "pad_id ", pad_id, " is outside the vocabulary [0, ", vocab_size, ")");
    if (sequences.empty()) detail::fail(where, "the batch has no sequences");
    for (std::size_t b = 0; b < sequences.size(); ++b) {
      if (sequences[b].empty()) detail::fail(where, "sequence ", b, " is empty");
      for (std::size_t t = 0; t < sequences[b].size(); ++t) {
        const Index id = sequences[b][t];
        if (id < 0 || id >= vocab_size)
          detail::fail(where, "sequence ", b, ", position ", t, ": token id ", id, " is outside the vocabulary [0, ",
                       vocab_size, ")");
      }
      seq_len_ = std::max<Index>(seq_len_, static_cast<Index>(sequences[b].size()));
    }
    lengths_.reserve(sequences.size());
    ids_.assign(sequences.size() * static_cast<std::size_t>(seq_len_), pad_id);
    for (std::size_t b = 0; b < sequences.size(); ++b) {
      lengths_.push_back(static_cast<Index>(sequences[b].size()));
      for (std::size_t t = 0; t < sequences[b].size(); ++t) ids_[b * seq_len_ + t] = sequences[b][t];
    }
  }

  Index batch_size() const { return static_cast<Index>(lengths_.size()); }
  Index seq_len() const { return seq_len_; }
  Index num_rows() const { return batch_size() * seq_len_; }
  Index vocab_size() const { return vocab_size_; }
  Index pad_id() const { return pad_id_; }
  Index length(Index b) const {
    if (b < 0 || b >= batch_size()) detail::fail("TokenBatch::length", "sequence ", b, " is outside [0, ", batch_size(), ")");
    return lengths_[static_cast<std::size_t>(b)];
  }
  const std::vector<Index>& lengths() const { return lengths_; }
  // Row-major [batch x seq_len] ids, padding included.
  const std::vector<Index>& ids() const { return ids_; }
  // 1 for a real token, 0 for padding.
  bool mask(Index b, Index t) const { return t >= 0 && t < seq_len_ && t < length(b); }

 private:
  Index vocab_size_, pad_id_, seq_len_ = 0;
  std::vector<Index> lengths_, ids_;
};

}  // namespace lora::nn
