// lora.hpp: BertConfig, the shape of a BERT encoder and its classification head, with Hugging Face's
// config.json field names (io/hf_checkpoint.hpp reads it from a checkpoint directory).
#pragma once

#include <lora/common.hpp>

#include <cmath>
#include <string>

namespace lora::nn {

struct BertConfig {
  Index vocab_size = 30522;
  Index hidden_size = 768;
  Index num_hidden_layers = 12;
  Index num_attention_heads = 12;
  Index intermediate_size = 3072;
  Index max_position_embeddings = 512;
  Index type_vocab_size = 2;
  Index pad_token_id = 0;
  double layer_norm_eps = 1e-12;
  std::string hidden_act = "gelu";  // the exact, erf-based GELU; the only activation supported
  // Dropout after the embeddings, on each residual branch and on the pooled output (hidden), and on the
  // attention probabilities (attention_probs). Training mode only; p = 0 turns it off.
  double hidden_dropout_prob = 0.1;
  double attention_probs_dropout_prob = 0.1;
  // Outputs of the classification head (Hugging Face's num_labels; BertForSequenceClassification).
  Index num_labels = 2;
  // The standard deviation of the initial weights of a fresh model (Hugging Face's _init_weights).
  double initializer_range = 0.02;

  // Throws std::invalid_argument naming `where` and the field for a value the model cannot be built with:
  // sizes < 1, hidden_size not divisible by num_attention_heads, pad_token_id outside the vocabulary,
  // eps <= 0, dropout outside [0, 1), hidden_act other than "gelu".
  void validate(const char* where) const {
    auto positive = [&](const char* field, Index v) {
      if (v < 1) detail::fail(where, "BertConfig.", field, " must be >= 1, got ", v);
    };
    positive("vocab_size", vocab_size);
    positive("hidden_size", hidden_size);
    positive("num_hidden_layers", num_hidden_layers);
    positive("num_attention_heads", num_attention_heads);
    positive("intermediate_size", intermediate_size);
    positive("max_position_embeddings", max_position_embeddings);
    positive("type_vocab_size", type_vocab_size);
    positive("num_labels", num_labels);
    if (hidden_size % num_attention_heads != 0)
      detail::fail(where, "BertConfig.hidden_size (", hidden_size, ") is not a multiple of num_attention_heads (",
                   num_attention_heads, ")");
    if (pad_token_id < 0 || pad_token_id >= vocab_size)
      detail::fail(where, "BertConfig.pad_token_id ", pad_token_id, " is outside the vocabulary [0, ", vocab_size, ")");
    if (!(layer_norm_eps > 0) || !std::isfinite(layer_norm_eps))
      detail::fail(where, "BertConfig.layer_norm_eps must be positive and finite, got ", layer_norm_eps);
    auto probability = [&](const char* field, double p) {
      if (!(p >= 0 && p < 1)) detail::fail(where, "BertConfig.", field, " must be in [0, 1), got ", p);
    };
    if (!(initializer_range > 0) || !std::isfinite(initializer_range))
      detail::fail(where, "BertConfig.initializer_range must be positive and finite, got ", initializer_range);
    probability("hidden_dropout_prob", hidden_dropout_prob);
    probability("attention_probs_dropout_prob", attention_probs_dropout_prob);
    if (hidden_act != "gelu")
      detail::fail(where, "BertConfig.hidden_act '", hidden_act, "' is not supported (only \"gelu\", the exact GELU)");
  }
};

}  // namespace lora::nn
