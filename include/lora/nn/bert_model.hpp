// lora.hpp: BertForSequenceClassification, a whole BERT encoder with its pooler and classification head
// under Hugging Face's module names, so that its base tensors are a Hugging Face checkpoint's and its
// adapters a PEFT adapter's (target_modules = ["query", "value"], modules_to_save = ["classifier"]).
//
// The model tree (a Sequential with an unnamed root):
//   bert                                   ModuleGroup "BertModel"
//     embeddings                           BertEmbeddings
//       word_embeddings, position_embeddings, token_type_embeddings      Embedding
//       LayerNorm                                                       LayerNorm
//     encoder.layer.<i>                    BertLayer (attention.self.query, ..., output.LayerNorm)
//     pooler.dense                         Linear
//   classifier                             Linear [num_labels x hidden]
//
// forward(tokens) (a TokenBatch: B sequences padded to T, rows b * T + t):
//   E = LayerNorm(word[ids] + position[t] + token_type[0]), dropout  (token_type_ids are all 0)
//   H = encoder layers in turn (padding keys masked, as Hugging Face's attention_mask)
//   pooled = tanh(pooler.dense(H[b * T])), the first token of each sequence; dropout
//   logits = classifier(pooled)                                       [B x num_labels]
// backward(dlogits) runs the same in reverse, down to the lowest module that has trainable parameters
// (a frozen bottom costs nothing), and returns an empty matrix: token ids have no gradient.
// Dropout (config.hidden_dropout_prob, attention_probs_dropout_prob) acts in training mode only.
#pragma once

#include <lora/common.hpp>
#include <lora/detail/random.hpp>
#include <lora/init.hpp>
#include <lora/nn/activation.hpp>
#include <lora/nn/bert.hpp>
#include <lora/nn/bert_config.hpp>
#include <lora/nn/dropout.hpp>
#include <lora/nn/embedding.hpp>
#include <lora/nn/linear.hpp>
#include <lora/nn/norm.hpp>
#include <lora/nn/sequential.hpp>
#include <lora/nn/token_batch.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lora::nn {

// Hugging Face's BertEmbeddings: the sum of the word, position and token-type embeddings, normalised.
// Children: "word_embeddings", "position_embeddings", "token_type_embeddings" (Embedding; a replacement
// must be an Embedding of the same size) and "LayerNorm".
template <class Scalar>
class BertEmbeddings final : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;
  using ModulePtr = std::unique_ptr<Module<Scalar>>;

  // Tables N(0, 1) seeded from seed .. seed + 2 (BertForSequenceClassification re-initialises them);
  // LayerNorm weight 1, bias 0.
  BertEmbeddings(const BertConfig& config, std::uint64_t seed = 0) : max_positions_(config.max_position_embeddings) {
    config.validate("BertEmbeddings::BertEmbeddings");
    children_[0] = std::make_unique<Embedding<Scalar>>(config.vocab_size, config.hidden_size, seed);
    children_[1] = std::make_unique<Embedding<Scalar>>(config.max_position_embeddings, config.hidden_size, seed + 1);
    children_[2] = std::make_unique<Embedding<Scalar>>(config.type_vocab_size, config.hidden_size, seed + 2);
    children_[3] = std::make_unique<LayerNorm<Scalar>>(config.hidden_size, config.layer_norm_eps);
    hidden_ = config.hidden_size;
  }
  BertEmbeddings(const BertEmbeddings& other)
      : Module<Scalar>(other), hidden_(other.hidden_), max_positions_(other.max_positions_), dropout_(other.dropout_) {
    for (int i = 0; i < 4; ++i) children_[i] = other.children_[i]->clone();
  }
  BertEmbeddings& operator=(const BertEmbeddings&) = delete;
  ~BertEmbeddings() override = default;

  void set_dropout(double p, std::uint64_t seed = 0) {
    dropout_ = Dropout<Scalar>(p, seed);
    dropout_.train(this->training_);
  }

  // forward(tokens)
  //   requires: tokens.vocab_size() == the word table's size; tokens.seq_len() <= max_position_embeddings.
  //   ensures:  returns [tokens.num_rows() x hidden] (own buffer, valid until the next forward).
  const MatrixType& forward(const TokenBatch& tokens) {
    constexpr const char* where = "BertEmbeddings::forward";
    if (tokens.vocab_size() != table(0).num_embeddings())
      detail::fail(where, "the batch's ids are checked against a vocabulary of ", tokens.vocab_size(),
                   ", the word embeddings have ", table(0).num_embeddings(), " rows");
    if (tokens.seq_len() > max_positions_)
      detail::fail(where, "sequences of ", tokens.seq_len(), " tokens exceed max_position_embeddings = ", max_positions_);
    const Index n = tokens.num_rows(), T = tokens.seq_len();
    positions_.resize(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) positions_[static_cast<std::size_t>(i)] = i % T;
    types_.assign(static_cast<std::size_t>(n), 0);
    detail::resize_workspace(sum_, n, hidden_);
    sum_.noalias() = table(0).forward(tokens.ids());
    sum_.noalias() += table(1).forward(positions_);
    sum_.noalias() += table(2).forward(types_);
    const MatrixType& E = children_[3]->forward(sum_);
    cached_ = this->training_;
    return dropout_.p() > 0 ? dropout_.forward(E) : E;
  }
  const MatrixType& forward(const Input&) override {
    detail::fail("BertEmbeddings::forward", "the embeddings take token ids with their layout: forward(TokenBatch)");
  }
  // Accumulates the gradients of the tables and the norm; returns an empty matrix.
  const MatrixType& backward(const Input& dY) override {
    constexpr const char* where = "BertEmbeddings::backward";
    if (!cached_) this->fail_no_cached_forward(where);
    detail::require_shape(where, "grad_output", dY, sum_.rows(), hidden_);
    const MatrixType& dS = children_[3]->backward(dropout_.p() > 0 ? Input(dropout_.backward(dY)) : dY);
    for (int i = 0; i < 3; ++i)
      if (children_[i]->num_trainable_parameters() > 0) children_[i]->backward(dS);
    return no_gradient_;
  }

  void zero_grad() override {
    for (auto& c : children_) c->zero_grad();
  }
  void train(bool on = true) override {
    Module<Scalar>::train(on);
    for (auto& c : children_) c->train(on);
    dropout_.train(on);
    if (!on) cached_ = false;
  }
  void set_requires_grad(bool on) override {
    for (auto& c : children_) c->set_requires_grad(on);
  }
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) override {
    for (int i = 0; i < 4; ++i) children_[i]->collect_parameters(out, prefix + name(i) + ".");
  }
  Index num_parameters() const override {
    Index n = 0;
    for (const auto& c : children_) n += c->num_parameters();
    return n;
  }
  Index num_trainable_parameters() const override {
    Index n = 0;
    for (const auto& c : children_) n += c->num_trainable_parameters();
    return n;
  }
  Index out_features() const override { return hidden_; }
  Index max_position_embeddings() const { return max_positions_; }
  std::string type_name() const override { return "BertEmbeddings"; }
  std::string describe() const override {
    return detail::concat("BertEmbeddings(vocab=", table(0).num_embeddings(), ", hidden=", hidden_,
                          ", positions=", max_positions_, ")");
  }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<BertEmbeddings>(*this); }

  std::size_t num_children() const override { return 4; }
  std::string child_name(std::size_t i) const override {
    if (i >= 4) this->no_child("BertEmbeddings::child_name", i);
    return name(static_cast<int>(i));
  }
  Module<Scalar>& child(std::size_t i) override {
    if (i >= 4) this->no_child("BertEmbeddings::child", i);
    return *children_[i];
  }
  const Module<Scalar>& child(std::size_t i) const override {
    if (i >= 4) this->no_child("BertEmbeddings::child", i);
    return *children_[i];
  }
  ModulePtr replace_child(std::size_t i, ModulePtr module) override {
    constexpr const char* where = "BertEmbeddings::replace_child";
    this->check_replacement(where, i, module.get());
    if (i < 3) {
      const auto* e = dynamic_cast<const Embedding<Scalar>*>(module.get());
      if (!e || e->num_embeddings() != table(static_cast<int>(i)).num_embeddings())
        detail::fail(where, "the replacement for '", name(static_cast<int>(i)), "' is ", module->describe(),
                     ", expected an Embedding(", table(static_cast<int>(i)).num_embeddings(), ", ", hidden_, ")");
    }
    module->train(this->training_);
    cached_ = false;
    return std::exchange(children_[i], std::move(module));
  }

 private:
  static const char* name(int i) {
    static const char* names[4] = {"word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"};
    return names[i];
  }
  Embedding<Scalar>& table(int i) { return static_cast<Embedding<Scalar>&>(*children_[i]); }
  const Embedding<Scalar>& table(int i) const { return static_cast<const Embedding<Scalar>&>(*children_[i]); }

  Index hidden_ = 0, max_positions_;
  ModulePtr children_[4];
  Dropout<Scalar> dropout_{0.0};
  bool cached_ = false;
  std::vector<Index> positions_, types_;
  MatrixType sum_, no_gradient_;
};

// Hugging Face's BertForSequenceClassification (see the top of this file). It is a Sequential, so that
// everything that works on a model tree works on it: inject_lora, save_adapter / load_adapter /
// from_pretrained, quant::quantize_model, base_tensor_names() (Hugging Face's state-dict names),
// summary(). Its own forward takes a TokenBatch; forward(X) of a matrix throws.
template <class Scalar>
class BertForSequenceClassification final : public Sequential<Scalar> {
 public:
  using typename Sequential<Scalar>::MatrixType;
  using typename Sequential<Scalar>::Input;

  // requires: config valid (config.validate). ensures: Hugging Face's initialisation (_init_weights):
  // Linear and Embedding weights ~ N(0, config.initializer_range), biases 0, the padding row of the word
  // embeddings 0, LayerNorm 1 and 0, from a seeded platform-independent stream; everything trainable;
  // dropout streams seeded from the same seed.
  explicit BertForSequenceClassification(const BertConfig& config, std::uint64_t seed = 0)
      : Sequential<Scalar>(""), config_(config) {
    config.validate("BertForSequenceClassification::BertForSequenceClassification");
    auto bert = std::make_unique<ModuleGroup<Scalar>>("BertModel");
    bert->add("embeddings", std::make_unique<BertEmbeddings<Scalar>>(config, seed));
    auto layers = std::make_unique<ModuleGroup<Scalar>>("ModuleList");
    for (Index i = 0; i < config.num_hidden_layers; ++i)
      layers->add(std::to_string(i), std::make_unique<BertLayer<Scalar>>(config.hidden_size, config.num_attention_heads,
                                                                          config.intermediate_size, config.layer_norm_eps,
                                                                          seed + 16 * static_cast<std::uint64_t>(i + 1)));
    auto encoder = std::make_unique<ModuleGroup<Scalar>>("BertEncoder");
    encoder->add("layer", std::move(layers));
    bert->add("encoder", std::move(encoder));
    auto pooler = std::make_unique<ModuleGroup<Scalar>>("BertPooler");
    pooler->add("dense", std::make_unique<Linear<Scalar>>(config.hidden_size, config.hidden_size, true, seed + 3));
    bert->add("pooler", std::move(pooler));
    Sequential<Scalar>::add("bert", std::unique_ptr<Module<Scalar>>(std::move(bert)));
    Sequential<Scalar>::add("classifier", std::unique_ptr<Module<Scalar>>(std::make_unique<Linear<Scalar>>(
                                              config.hidden_size, config.num_labels, true, seed + 4)));
    initialize_weights(seed);
    set_dropout(config.hidden_dropout_prob, config.attention_probs_dropout_prob, seed);
  }
  BertForSequenceClassification(const BertForSequenceClassification& other)
      : Sequential<Scalar>(other),
        config_(other.config_),
        tanh_(other.tanh_),
        dropout_(other.dropout_),
        share_layer_buffers_(other.share_layer_buffers_) {}
  BertForSequenceClassification& operator=(const BertForSequenceClassification&) = delete;
  ~BertForSequenceClassification() override = default;

  const BertConfig& config() const { return config_; }

  // Re-draws every weight as the constructor does (see there); the model must have no LoRA and no
  // quantized base (throws otherwise).
  void initialize_weights(std::uint64_t seed) {
    constexpr const char* where = "BertForSequenceClassification::initialize_weights";
    detail::Random rng(seed ^ 0x9e3779b97f4a7c15ull);
    const double std = config_.initializer_range;
    for (const auto& [path, m] : this->named_modules()) {
      // Drawn in place (the word embeddings of a real vocabulary are tens of MiB).
      if (auto* linear = dynamic_cast<Linear<Scalar>*>(m)) {
        if (linear->frozen_base()) detail::fail(where, "'", path, "' reads a frozen base");
        linear->weight().modify([&](auto& W) { init_gaussian(W, std, rng); });
        if (linear->has_bias()) linear->bias().setZero();
      } else if (auto* e = dynamic_cast<Embedding<Scalar>*>(m)) {
        if (e->has_lora()) detail::fail(where, "'", path, "' has a LoRA adapter");
        const bool word = path == "bert.embeddings.word_embeddings";
        e->weight().modify([&](auto& E) {
          init_gaussian(E, std, rng);
          if (word) E.row(config_.pad_token_id).setZero();
        });
      } else if (auto* n = dynamic_cast<LayerNorm<Scalar>*>(m)) {
        n->weight().setOnes();
        n->bias().setZero();
      } else if (m->num_parameters() > 0) {
        detail::fail(where, "'", path, "' is ", m->describe(), ", which this initialisation does not know");
      }
    }
  }

  // Dropout in training mode: hidden_p after the embeddings, on each layer's residual branches and on
  // the pooled output, attention_p on the attention probabilities. requires: both in [0, 1).
  void set_dropout(double hidden_p, double attention_p, std::uint64_t seed = 0) {
    constexpr const char* where = "BertForSequenceClassification::set_dropout";
    if (!(hidden_p >= 0 && hidden_p < 1)) detail::fail(where, "hidden_p must be in [0, 1), got ", hidden_p);
    if (!(attention_p >= 0 && attention_p < 1)) detail::fail(where, "attention_p must be in [0, 1), got ", attention_p);
    embeddings().set_dropout(hidden_p, seed + 101);
    for (Index i = 0; i < num_layers(); ++i) layer(i).set_dropout(hidden_p, attention_p, seed + 211 + 7 * static_cast<std::uint64_t>(i));
    dropout_ = Dropout<Scalar>(hidden_p, seed + 103);
    dropout_.train(this->training_);
    config_.hidden_dropout_prob = hidden_p;
    config_.attention_probs_dropout_prob = attention_p;
  }

  // The encoder's layers share their transient buffers (Module::share_transient_buffers): each layer
  // after the first uses the first one's outputs, input gradients and staging copies wherever the two
  // have the same modules, so a training step holds those of one layer plus what every layer's
  // backward needs. A layer's intermediate results (its children's outputs) are then valid only until
  // the next layer runs; the model's own results (logits, last_hidden_state, pooler_output, the input
  // gradients of backward) are not affected. On by default; off, each layer has buffers of its own.
  void set_share_layer_buffers(bool on) { share_layer_buffers_ = on; }
  bool share_layer_buffers() const { return share_layer_buffers_; }

  // forward(tokens): the logits [batch x num_labels] (own buffer, valid until the next forward). The
  // batch's vocabulary must be the model's (its ids were checked against it).
  const MatrixType& forward(const TokenBatch& tokens) {
    // Linked here, since inject_lora and quantize_model replace leaves (a new leaf has its own buffers).
    for (Index i = 1; i < num_layers(); ++i) layer(i).share_transient_buffers(share_layer_buffers_ ? &layer(0) : nullptr);
    const MatrixType* H = &embeddings().forward(tokens);
    for (Index i = 0; i < num_layers(); ++i) {
      BertLayer<Scalar>& l = layer(i);
      l.set_layout(tokens);
      H = &l.forward(*H);
    }
    hidden_ = H;
    const Index B = tokens.batch_size(), T = tokens.seq_len();
    seq_len_ = T;
    detail::resize_workspace(first_, B, config_.hidden_size);
    for (Index b = 0; b < B; ++b) first_.row(b) = H->row(b * T);
    pooled_ = &tanh_.forward(pooler().forward(first_));
    const MatrixType& D = dropout_.p() > 0 ? dropout_.forward(*pooled_) : *pooled_;
    cached_ = this->training_;
    return classifier().forward(D);
  }
  const MatrixType& forward(const Input&) override {
    detail::fail("BertForSequenceClassification::forward", "the model takes token ids with their layout: forward(TokenBatch)");
  }
  const MatrixType& infer(const Input&, InferenceContext<Scalar>&) const override {
    detail::fail("BertForSequenceClassification::infer", "no const inference path: use forward(TokenBatch) in eval mode");
  }
  // The last forward's encoder output [batch * seq_len x hidden] (Hugging Face's last_hidden_state, padding
  // rows included) and pooled output [batch x hidden] (pooler_output).
  const MatrixType& last_hidden_state() const {
    if (!hidden_) detail::fail("BertForSequenceClassification::last_hidden_state", "no forward yet");
    return *hidden_;
  }
  const MatrixType& pooler_output() const {
    if (!pooled_) detail::fail("BertForSequenceClassification::pooler_output", "no forward yet");
    return *pooled_;
  }

  // backward(dlogits) [batch x num_labels] of the last forward in training mode: accumulates every
  // trainable parameter's gradient (see the top of this file); returns an empty matrix.
  const MatrixType& backward(const Input& dlogits) override {
    constexpr const char* where = "BertForSequenceClassification::backward";
    if (!cached_) detail::fail(where, "no cached forward: call forward(TokenBatch) in training mode (train()) first");
    detail::require_shape(where, "grad_logits", dlogits, first_.rows(), config_.num_labels);
    // The lowest part that trains: -1 the embeddings, 0 .. L-1 a layer, L the pooler, L + 1 the head.
    const Index L = num_layers();
    Index lowest = L + 1;
    if (pooler().num_trainable_parameters() > 0) lowest = L;
    for (Index i = L; i-- > 0;)
      if (layer(i).num_trainable_parameters() > 0) lowest = i;
    if (embeddings().num_trainable_parameters() > 0) lowest = -1;
    const MatrixType& dD = classifier().backward(dlogits);
    if (lowest > L) return no_gradient_;
    const MatrixType& dFirst = pooler().backward(tanh_.backward(dropout_.p() > 0 ? Input(dropout_.backward(dD)) : Input(dD)));
    if (lowest == L) return no_gradient_;
    detail::resize_workspace(grad_hidden_, first_.rows() * seq_len_, config_.hidden_size);
    grad_hidden_.setZero();
    for (Index b = 0; b < first_.rows(); ++b) grad_hidden_.row(b * seq_len_) = dFirst.row(b);
    const MatrixType* g = &grad_hidden_;
    for (Index i = L; i-- > std::max<Index>(lowest, 0);) g = &layer(i).backward(*g);
    if (lowest < 0) embeddings().backward(*g);
    return no_gradient_;
  }
  void backward_parameters(const Input& dlogits) override { backward(dlogits); }

  void train(bool on = true) override {
    Sequential<Scalar>::train(on);
    tanh_.train(on);
    dropout_.train(on);
    if (!on) cached_ = false;
  }
  std::string type_name() const override { return "BertForSequenceClassification"; }
  std::string describe() const override {
    return detail::concat("BertForSequenceClassification(layers=", config_.num_hidden_layers, ", hidden=",
                          config_.hidden_size, ", heads=", config_.num_attention_heads, ", labels=", config_.num_labels, ")");
  }
  std::unique_ptr<Module<Scalar>> clone() const override {
    return std::make_unique<BertForSequenceClassification>(*this);
  }

  // The parts, looked up in the tree on each call (inject_lora and quantize_model replace leaves).
  Index num_layers() const { return config_.num_hidden_layers; }
  BertEmbeddings<Scalar>& embeddings() { return static_cast<BertEmbeddings<Scalar>&>(bert().child(0)); }
  BertLayer<Scalar>& layer(Index i) {
    if (i < 0 || i >= num_layers())
      detail::fail("BertForSequenceClassification::layer", "layer ", i, " is outside [0, ", num_layers(), ")");
    return static_cast<BertLayer<Scalar>&>(bert().child(1).child(0).child(static_cast<std::size_t>(i)));
  }
  Module<Scalar>& pooler() { return bert().child(2).child(0); }
  Module<Scalar>& classifier() { return this->child(1); }

 private:
  // Built once in the constructor; the tree's shape is fixed afterwards.
  using Sequential<Scalar>::add;
  Module<Scalar>& bert() { return this->child(0); }

  BertConfig config_;
  Tanh<Scalar> tanh_;
  Dropout<Scalar> dropout_{0.0};
  bool cached_ = false;
  bool share_layer_buffers_ = true;
  Index seq_len_ = 0;
  const MatrixType* hidden_ = nullptr;
  const MatrixType* pooled_ = nullptr;
  MatrixType first_, grad_hidden_, no_gradient_;
};

}  // namespace lora::nn
