// lora.hpp: Hugging Face checkpoint directories (what save_pretrained writes): config.json, read into an
// nn::BertConfig, and the weights, from model.safetensors or from the shards that
// model.safetensors.index.json lists. pytorch_model.bin (a pickle) is not read.
#pragma once

#include <lora/io/base_weights.hpp>
#include <lora/io/error.hpp>
#include <lora/io/file.hpp>
#include <lora/io/safetensors.hpp>
#include <lora/nn/bert_config.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

namespace lora {

// Reads <dir>/config.json as transformers' BertConfig does: a missing field takes Hugging Face's default
// (which nn::BertConfig's defaults are), null counts as missing. num_labels comes from "num_labels", else
// from the size of "id2label" (what save_pretrained writes), else 2.
// Throws io_error (naming the file and the field, expected and found) for a file that is not a BERT
// config: not JSON, model_type missing or not "bert" (roberta, gpt2, ... have other weights), a field of
// the wrong JSON type, num_labels disagreeing with id2label, and what the model would compute
// differently: position_embedding_type other than "absolute", is_decoder, add_cross_attention, a
// classifier_dropout other than hidden_dropout_prob. Values of the right type the model cannot be built
// with (hidden_size not a multiple of num_attention_heads, hidden_act other than "gelu", ...) throw
// std::invalid_argument from nn::BertConfig::validate, with the file named.
inline nn::BertConfig read_bert_config(const std::string& dir) {
  constexpr const char* where = "read_bert_config";
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  const std::string text = detail::read_small_file(path, 16u << 20, where);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    detail::io_fail(where, path, "", "not valid JSON: ", e.what());
  }
  if (!j.is_object()) detail::io_fail(where, path, "", "the config is not a JSON object");
  auto has = [&](const char* field) { return j.contains(field) && !j.at(field).is_null(); };
  auto bad = [&](const char* field, const char* expected) {
    detail::io_fail(where, path, "", "field '", field, "' must be ", expected, ", found ", j.at(field).dump());
  };

  if (!has("model_type"))
    detail::io_fail(where, path, "", "field 'model_type' is missing; expected \"bert\" (a BERT checkpoint)");
  if (!j["model_type"].is_string()) bad("model_type", "the string \"bert\"");
  const std::string model_type = j["model_type"].get<std::string>();
  if (model_type != "bert")
    detail::io_fail(where, path, "", "field 'model_type' is \"", model_type,
                    "\"; only \"bert\" is supported (architectures BertModel, BertForSequenceClassification, ...)");
  if (has("architectures")) {
    if (!j["architectures"].is_array()) bad("architectures", "a list of strings");
    for (const auto& a : j["architectures"])
      if (!a.is_string()) bad("architectures", "a list of strings");
  }

  nn::BertConfig c;
  auto integer = [&](const char* field, Index& out) {
    if (!has(field)) return;
    const auto& v = j[field];
    if (!v.is_number_integer() ||
        (v.is_number_unsigned() && v.get<std::uint64_t>() > static_cast<std::uint64_t>(std::numeric_limits<Index>::max())))
      bad(field, "an integer");
    out = static_cast<Index>(v.get<std::int64_t>());
  };
  auto number = [&](const char* field, double& out) {
    if (!has(field)) return;
    if (!j[field].is_number()) bad(field, "a number");
    out = j[field].get<double>();
  };
  auto string = [&](const char* field, std::string& out) {
    if (!has(field)) return;
    if (!j[field].is_string()) bad(field, "a string");
    out = j[field].get<std::string>();
  };
  auto flag_is_false = [&](const char* field, const char* why) {
    if (!has(field)) return;
    if (!j[field].is_boolean()) bad(field, "true or false");
    if (j[field].get<bool>()) detail::io_fail(where, path, "", "field '", field, "' is true; ", why);
  };
  integer("vocab_size", c.vocab_size);
  integer("hidden_size", c.hidden_size);
  integer("num_hidden_layers", c.num_hidden_layers);
  integer("num_attention_heads", c.num_attention_heads);
  integer("intermediate_size", c.intermediate_size);
  integer("max_position_embeddings", c.max_position_embeddings);
  integer("type_vocab_size", c.type_vocab_size);
  integer("pad_token_id", c.pad_token_id);
  number("layer_norm_eps", c.layer_norm_eps);
  string("hidden_act", c.hidden_act);
  number("hidden_dropout_prob", c.hidden_dropout_prob);
  number("attention_probs_dropout_prob", c.attention_probs_dropout_prob);
  number("initializer_range", c.initializer_range);

  std::string position_embedding_type = "absolute";
  string("position_embedding_type", position_embedding_type);
  if (position_embedding_type != "absolute")
    detail::io_fail(where, path, "", "field 'position_embedding_type' is \"", position_embedding_type,
                    "\"; only \"absolute\" position embeddings are supported");
  flag_is_false("is_decoder", "a causal (decoder) BERT is not supported");
  flag_is_false("add_cross_attention", "cross-attention is not supported");
  if (has("classifier_dropout")) {
    double p = 0;
    number("classifier_dropout", p);
    if (p != c.hidden_dropout_prob)
      detail::io_fail(where, path, "", "field 'classifier_dropout' is ", p, ", but the classifier's dropout is "
                      "hidden_dropout_prob (", c.hidden_dropout_prob, ") here; set it to null or to that value");
  }

  if (has("id2label")) {
    if (!j["id2label"].is_object()) bad("id2label", "an object {\"0\": label, ...}");
    c.num_labels = static_cast<Index>(j["id2label"].size());
  }
  if (has("num_labels")) {
    const Index from_map = c.num_labels;
    integer("num_labels", c.num_labels);
    if (has("id2label") && c.num_labels != from_map)
      detail::io_fail(where, path, "", "field 'num_labels' is ", c.num_labels, " but 'id2label' has ", from_map,
                      " entries");
  }

  try {
    c.validate(where);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(detail::concat(e.what(), " (in ", path, ")"));
  }
  return c;
}

namespace detail {

// Integer buffers that transformers registers on its embeddings and older versions saved with the
// weights (BertEmbeddings.position_ids, .token_type_ids): constants of the model, not parameters.
inline bool is_checkpoint_buffer(const TensorInfo& t) {
  switch (t.dtype) {
    case Dtype::I64: case Dtype::I32: case Dtype::I16: case Dtype::I8:
    case Dtype::U64: case Dtype::U32: case Dtype::U16: case Dtype::U8: break;
    default: return false;
  }
  const std::size_t dot = t.name.rfind('.');
  const std::string leaf = dot == std::string::npos ? t.name : t.name.substr(dot + 1);
  return leaf == "position_ids" || leaf == "token_type_ids";
}

inline bool is_regular_file(const std::filesystem::path& p) {
  std::error_code ec;
  return std::filesystem::is_regular_file(p, ec);
}

}  // namespace detail

// Reads the weights of the checkpoint in `dir`: model.safetensors if present (as transformers does),
// otherwise model.safetensors.index.json and every shard it lists, each opened and read once (see
// ShardedSafetensorsReader: shard names are plain file names of `dir`, every mapped tensor is in the
// shard the map names, and every tensor of a shard is mapped to that shard, so none is read twice).
// F64, F32, F16 and BF16 tensors are converted to Scalar, 2-D into matrices and 1-D into vectors, under
// their names in the file (with a task model's prefix such as "bert."). Integer buffers named
// "*.position_ids" or "*.token_type_ids" are left out and their names appended to *skipped (when given).
// Throws io_error naming the file and the tensor for any other tensor that is not floating point (F8
// included: FP8 checkpoints need their scales), a tensor that is neither 1-D nor 2-D, an invalid file or
// index, an empty checkpoint, and a directory holding neither file. On a throw *skipped is unchanged.
template <class Scalar>
NamedTensors<Scalar> read_checkpoint_tensors(const std::string& dir, std::vector<std::string>* skipped = nullptr) {
  static_assert(is_supported_scalar_v<Scalar>, "read_checkpoint_tensors reads into float or double");
  namespace fs = std::filesystem;
  constexpr const char* where = "read_checkpoint_tensors";
  const fs::path root(dir);
  const fs::path single = root / "model.safetensors", index = root / "model.safetensors.index.json";

  NamedTensors<Scalar> out;
  std::vector<std::string> buffers;
  auto take = [&](const SafetensorsReader& file, const TensorInfo& t) {
    if (detail::is_checkpoint_buffer(t)) {
      buffers.push_back(t.name);
      return;
    }
    if (!is_convertible(t.dtype))
      detail::io_fail(where, file.path(), t.name, "dtype ", to_string(t.dtype),
                      " is not a weight type (expected F64, F32, F16 or BF16; the only integer tensors skipped are"
                      " the buffers *.position_ids and *.token_type_ids)");
    if (t.shape.size() == 2) out.matrices.emplace(t.name, file.matrix<Scalar>(t.name, where));
    else if (t.shape.size() == 1) out.vectors.emplace(t.name, file.vector<Scalar>(t.name, where));
    else detail::io_fail(where, file.path(), t.name, "shape ", shape_string(t.shape), " is neither 1-D nor 2-D");
  };

  if (detail::is_regular_file(single)) {
    const SafetensorsReader file = SafetensorsReader::open(single.string());
    if (file.tensors().empty()) detail::io_fail(where, file.path(), "", "the checkpoint holds no tensors");
    for (const TensorInfo& t : file.tensors()) take(file, t);
  } else if (detail::is_regular_file(index)) {
    const ShardedSafetensorsReader sharded = ShardedSafetensorsReader::open(index.string());
    if (sharded.weight_map().empty()) detail::io_fail(where, index.string(), "", "the weight_map lists no tensors");
    for (const auto& shard : sharded.shards())
      for (const TensorInfo& t : shard.second.tensors()) take(shard.second, t);
  } else {
    std::error_code ec;
    if (!fs::is_directory(root, ec)) detail::io_fail(where, dir, "", "not a directory");
    detail::io_fail(where, dir, "", "no model.safetensors and no model.safetensors.index.json: a Hugging Face "
                    "checkpoint directory holds config.json and either model.safetensors or the index with its "
                    "shards",
                    detail::is_regular_file(root / "pytorch_model.bin")
                        ? " (this one has pytorch_model.bin, a pickle, which is not read: convert it to safetensors)"
                        : " (pytorch_model.bin is not read)");
  }
  if (skipped) skipped->insert(skipped->end(), buffers.begin(), buffers.end());
  return out;
}

}  // namespace lora
