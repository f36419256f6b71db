// lora.hpp: BERT models in Hugging Face's checkpoint layout. load_bert reads a directory that
// transformers' save_pretrained wrote (config.json + model.safetensors, or its shards) into a
// BertForSequenceClassification; save_bert writes one back (config.json + model.safetensors, as a set).
//
// Tensor names: a BertForSequenceClassification checkpoint carries the model's own names
// ("bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"); a BertModel checkpoint
// (sentence-transformers' models, BertModel.save_pretrained) the same without "bert." and without the
// classifier, which then keeps its fresh initialisation (as transformers does, which warns about it).
// A checkpoint without the pooler (BertForMaskedLM, BertModel(add_pooling_layer=False)) gets a fresh
// pooler the same way.
// Pretraining heads ("cls.*") and integer buffers ("embeddings.position_ids") are skipped; any other
// tensor the model does not have, and any tensor of the model the checkpoint lacks (the classifier
// excepted), is an error listing them. A failed load returns nothing.
#pragma once

#include <lora/io/dtype.hpp>
#include <lora/io/error.hpp>
#include <lora/io/file.hpp>
#include <lora/io/hf_checkpoint.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/nn/bert_model.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace lora {

struct BertLoadOptions {
  std::optional<Index> num_labels;  // overrides config.json's (a new head for another task)
  std::uint64_t seed = 0;           // initialises what the checkpoint lacks (the classifier)
  bool allow_missing_classifier = true;
  bool allow_missing_pooler = true;  // BertForMaskedLM checkpoints have none; transformers initialises it
};

struct BertLoadReport {
  std::vector<std::string> initialized;  // model tensors the checkpoint lacks, freshly initialised
  std::vector<std::string> skipped;      // checkpoint tensors that are not model weights
};

// load_bert<Scalar>(dir, options, report)
//   requires: dir holds a Hugging Face BERT checkpoint (see io/hf_checkpoint.hpp: config.json with
//             model_type "bert", model.safetensors or model.safetensors.index.json + shards, F64/F32/F16/BF16).
//   ensures:  a model with the checkpoint's weights, in training mode, everything trainable; *report
//             (when given) says what was initialised and what was skipped.
//   throws:   io_error for a missing or invalid file, an unknown or missing tensor (named), a shape that
//             does not fit the config (named, expected and actual).
template <class Scalar>
std::unique_ptr<nn::BertForSequenceClassification<Scalar>> load_bert(const std::string& dir,
                                                                      const BertLoadOptions& options = {},
                                                                      BertLoadReport* report = nullptr) {
  constexpr const char* where = "load_bert";
  nn::BertConfig config = read_bert_config(dir);
  if (options.num_labels) config.num_labels = *options.num_labels;
  config.validate(where);
  BertLoadReport local;
  NamedTensors<Scalar> tensors = read_checkpoint_tensors<Scalar>(dir, &local.skipped);
  auto model = std::make_unique<nn::BertForSequenceClassification<Scalar>>(config, options.seed);

  bool prefixed = false;  // a BertFor* checkpoint: its names are the model's
  auto visit_names = [&](auto&& fn) {
    for (const auto& kv : tensors.matrices) fn(kv.first);
    for (const auto& kv : tensors.vectors) fn(kv.first);
  };
  visit_names([&](const std::string& name) { prefixed = prefixed || name.rfind("bert.", 0) == 0; });
  auto model_name = [&](const std::string& name) { return prefixed || name.rfind("classifier.", 0) == 0 ? name : "bert." + name; };

  const std::vector<std::string> wanted = model->base_tensor_names();
  const std::set<std::string> known(wanted.begin(), wanted.end());
  std::set<std::string> found;
  std::string unknown;
  visit_names([&](const std::string& name) {
    if (name.rfind("cls.", 0) == 0 || name.rfind("bert.cls.", 0) == 0) {
      local.skipped.push_back(name);  // the masked-LM / next-sentence heads of pretraining
      return;
    }
    const std::string m = model_name(name);
    if (known.count(m))
      found.insert(m);
    else
      unknown += (unknown.empty() ? "" : ", ") + name;
  });
  if (!unknown.empty())
    detail::io_fail(where, dir, "", "tensors that a BERT model of this config does not have: ", unknown);
  std::string missing;
  for (const std::string& name : wanted) {
    if (found.count(name)) continue;
    if ((options.allow_missing_classifier && name.rfind("classifier.", 0) == 0) ||
        (options.allow_missing_pooler && name.rfind("bert.pooler.", 0) == 0))
      local.initialized.push_back(name);
    else
      missing += (missing.empty() ? "" : ", ") + (prefixed ? name : name.substr(name.rfind("bert.", 0) == 0 ? 5 : 0));
  }
  if (!missing.empty()) detail::io_fail(where, dir, "", "the checkpoint lacks tensors of the model: ", missing);

  auto set = [&](const std::string& name, const Eigen::Ref<const Matrix<Scalar>>& value) {
    if (name.rfind("cls.", 0) == 0 || name.rfind("bert.cls.", 0) == 0) return;
    try {
      model->set_base_tensor(model_name(name), value);
    } catch (const std::invalid_argument& e) {
      detail::io_fail(where, dir, name, e.what(), " (config.json: hidden_size ", config.hidden_size, ", vocab_size ",
                      config.vocab_size, ", intermediate_size ", config.intermediate_size, ", num_labels ",
                      config.num_labels, ")");
    }
  };
  for (const auto& kv : tensors.matrices) set(kv.first, kv.second);
  for (const auto& kv : tensors.vectors) set(kv.first, kv.second);
  if (report) *report = std::move(local);
  return model;
}

// save_bert(model, dir, dtype)
//   requires: the model unmerged (its base tensors readable); dtype F32 (default), F64, F16 or BF16.
//   ensures:  dir holds config.json (Hugging Face's BertConfig fields, architectures
//             ["BertForSequenceClassification"]) and model.safetensors with the model's base tensors
//             under its names (a LoRA model's base: W0, not the adapters; save_adapter writes those),
//             replaced as a set; load_bert reads them back exactly (in the dtype's precision).
template <class Scalar>
void save_bert(const std::string& dir, const nn::BertForSequenceClassification<Scalar>& model, Dtype dtype = Dtype::F32) {
  constexpr const char* where = "save_bert";
  if (model.merged()) detail::fail(where, "the model is merged; unmerge() it to save the base");
  const nn::BertConfig& c = model.config();
  nlohmann::ordered_json j;
  j["architectures"] = {"BertForSequenceClassification"};
  j["attention_probs_dropout_prob"] = c.attention_probs_dropout_prob;
  j["hidden_act"] = c.hidden_act;
  j["hidden_dropout_prob"] = c.hidden_dropout_prob;
  j["hidden_size"] = c.hidden_size;
  nlohmann::ordered_json id2label, label2id;
  for (Index i = 0; i < c.num_labels; ++i) {
    id2label[std::to_string(i)] = "LABEL_" + std::to_string(i);
    label2id["LABEL_" + std::to_string(i)] = i;
  }
  j["id2label"] = id2label;
  j["initializer_range"] = c.initializer_range;
  j["intermediate_size"] = c.intermediate_size;
  j["label2id"] = label2id;
  j["layer_norm_eps"] = c.layer_norm_eps;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["model_type"] = "bert";
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["pad_token_id"] = c.pad_token_id;
  j["position_embedding_type"] = "absolute";
  j["type_vocab_size"] = c.type_vocab_size;
  j["vocab_size"] = c.vocab_size;
  const std::string text = j.dump(2) + "\n";

  SafetensorsWriter writer;
  for (const std::string& name : model.base_tensor_names()) {
    const Matrix<Scalar> value = model.base_tensor(name);
    const bool vector = name.size() > 5 && (name.compare(name.size() - 5, 5, ".bias") == 0 ||
                                            name.find("LayerNorm.weight") != std::string::npos);
    if (vector)
      writer.add_vector(name, Vector<Scalar>(value.col(0)), dtype);
    else
      writer.add(name, value, dtype);
  }
  detail::replace_files_together(
      dir,
      {{"model.safetensors", [&](detail::AtomicFileWriter& file) { writer.write_to(file); }},
       {"config.json", [&](detail::AtomicFileWriter& file) { file.write(text.data(), text.size()); }}},
      where);
}

}  // namespace lora
