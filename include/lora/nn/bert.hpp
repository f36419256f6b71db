// lora.hpp: BertLayer, one encoder block of BERT / RoBERTa under Hugging Face's module names, so that
// PEFT's target_modules = ["query", "value"] means here what it means in PEFT.
//
// forward (X [n x hidden], the TokenBatch layout; set_layout() gives the batch shape and the lengths):
//   C  = attention.self(X)                         multi-head self-attention without its output projection
//   H1 = attention.output.LayerNorm(attention.output.dense(C) + X)
//   G  = GELU(intermediate.dense(H1))              exact, erf-based (hidden_act = "gelu")
//   Y  = output.LayerNorm(output.dense(G) + H1)
// backward (dY): through output.LayerNorm to dS2; dH1 = dS2 + intermediate.dense.backward(GELU'(...)
//   output.dense.backward(dS2)); through attention.output.LayerNorm to dS1;
//   dX = dS1 + attention.self.backward(attention.output.dense.backward(dS1)).
// Dropout (set_dropout; none by default), in training mode, where BERT has it: on the attention
// probabilities, and on each branch before its residual sum (dense(C) and dense(G) above).
//
// Paths under a BertLayer at <p> (Hugging Face's BertLayer state dict):
//   <p>.attention.self.{query,key,value}, <p>.attention.output.dense, <p>.attention.output.LayerNorm,
//   <p>.intermediate.dense, <p>.output.dense, <p>.output.LayerNorm.
// The intermediate nodes (attention, attention.output, intermediate, output) are ModuleGroups: they name
// their children and hold no computation of their own; BertLayer runs the leaves. Leaves may be replaced
// (inject_lora puts LoRA layers in place of the Linear ones); the groups themselves may not.
#pragma once

#include <lora/common.hpp>
#include <lora/nn/activation.hpp>
#include <lora/nn/attention.hpp>
#include <lora/nn/dropout.hpp>
#include <lora/nn/linear.hpp>
#include <lora/nn/module.hpp>
#include <lora/nn/norm.hpp>
#include <lora/nn/token_batch.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lora::nn {

// A node of a model tree that only names its children (Hugging Face's BertSelfOutput, BertIntermediate,
// ...): its parent calls the children. forward and backward throw.
template <class Scalar>
class ModuleGroup final : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;
  using ModulePtr = std::unique_ptr<Module<Scalar>>;

  explicit ModuleGroup(std::string type) : type_(std::move(type)) {}
  ModuleGroup(const ModuleGroup& other) : Module<Scalar>(other), type_(other.type_) {
    for (const auto& [name, m] : other.children_) children_.emplace_back(name, m->clone());
  }
  ModuleGroup& operator=(const ModuleGroup&) = delete;
  ~ModuleGroup() override = default;

  // Appends a child (non-null; name non-empty, unique, without '.'); returns it.
  Module<Scalar>& add(const std::string& name, ModulePtr module) {
    constexpr const char* where = "ModuleGroup::add";
    if (!module) detail::fail(where, "the module '", name, "' is null");
    if (name.empty() || name.find('.') != std::string::npos)
      detail::fail(where, "the name '", name, "' must be non-empty and contain no '.'");
    for (const auto& c : children_)
      if (c.first == name) detail::fail(where, type_, " already has a child '", name, "'");
    children_.emplace_back(name, std::move(module));
    return *children_.back().second;
  }

  const MatrixType& forward(const Input&) override {
    detail::fail("ModuleGroup::forward", type_, " only names its children; its parent runs them");
  }
  const MatrixType& backward(const Input&) override {
    detail::fail("ModuleGroup::backward", type_, " only names its children; its parent runs them");
  }
  void zero_grad() override {
    for (auto& c : children_) c.second->zero_grad();
  }
  void train(bool on = true) override {
    Module<Scalar>::train(on);
    for (auto& c : children_) c.second->train(on);
  }
  void set_requires_grad(bool on) override {
    for (auto& c : children_) c.second->set_requires_grad(on);
  }
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) override {
    for (auto& c : children_) c.second->collect_parameters(out, prefix + c.first + ".");
  }
  Index num_parameters() const override {
    Index n = 0;
    for (const auto& c : children_) n += c.second->num_parameters();
    return n;
  }
  Index num_trainable_parameters() const override {
    Index n = 0;
    for (const auto& c : children_) n += c.second->num_trainable_parameters();
    return n;
  }
  std::string type_name() const override { return type_; }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<ModuleGroup>(*this); }

  std::size_t num_children() const override { return children_.size(); }
  std::string child_name(std::size_t i) const override {
    if (i >= children_.size()) this->no_child("ModuleGroup::child_name", i);
    return children_[i].first;
  }
  Module<Scalar>& child(std::size_t i) override {
    if (i >= children_.size()) this->no_child("ModuleGroup::child", i);
    return *children_[i].second;
  }
  const Module<Scalar>& child(std::size_t i) const override {
    if (i >= children_.size()) this->no_child("ModuleGroup::child", i);
    return *children_[i].second;
  }
  // Leaves only: a child that has children of its own (a group) keeps its place.
  ModulePtr replace_child(std::size_t i, ModulePtr module) override {
    this->check_replacement("ModuleGroup::replace_child", i, module.get());
    if (children_[i].second->num_children() > 0)
      detail::fail("ModuleGroup::replace_child", "'", children_[i].first, "' groups modules; replace those instead");
    module->train(this->training_);
    return std::exchange(children_[i].second, std::move(module));
  }

 private:
  std::string type_;
  std::vector<std::pair<std::string, ModulePtr>> children_;
};

template <class Scalar>
class BertLayer final : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;
  using ModulePtr = std::unique_ptr<Module<Scalar>>;

  // requires: hidden, heads, intermediate >= 1, hidden divisible by heads, layer_norm_eps > 0.
  // ensures:  Linear layers initialised as PyTorch's nn.Linear from seeds seed .. seed + 5; LayerNorms
  //           with weight 1, bias 0; everything trainable.
  BertLayer(Index hidden, Index heads, Index intermediate, double layer_norm_eps = 1e-12, std::uint64_t seed = 0)
      : hidden_(hidden), intermediate_(intermediate) {
    constexpr const char* where = "BertLayer::BertLayer";
    if (intermediate < 1) detail::fail(where, "intermediate must be >= 1, got ", intermediate);
    auto attention = std::make_unique<ModuleGroup<Scalar>>("BertAttention");
    attention->add("self", std::make_unique<MultiHeadSelfAttention<Scalar>>(hidden, heads, false, seed, false));
    auto self_output = std::make_unique<ModuleGroup<Scalar>>("BertSelfOutput");
    self_output->add("dense", std::make_unique<Linear<Scalar>>(hidden, hidden, true, seed + 3));
    self_output->add("LayerNorm", std::make_unique<LayerNorm<Scalar>>(hidden, layer_norm_eps));
    attention->add("output", std::move(self_output));
    auto inter = std::make_unique<ModuleGroup<Scalar>>("BertIntermediate");
    inter->add("dense", std::make_unique<Linear<Scalar>>(hidden, intermediate, true, seed + 4));
    auto output = std::make_unique<ModuleGroup<Scalar>>("BertOutput");
    output->add("dense", std::make_unique<Linear<Scalar>>(intermediate, hidden, true, seed + 5));
    output->add("LayerNorm", std::make_unique<LayerNorm<Scalar>>(hidden, layer_norm_eps));
    groups_[0] = std::move(attention);
    groups_[1] = std::move(inter);
    groups_[2] = std::move(output);
  }
  BertLayer(const BertLayer& other)
      : Module<Scalar>(other),
        hidden_(other.hidden_),
        intermediate_(other.intermediate_),
        gelu_(other.gelu_),
        drop1_(other.drop1_),
        drop2_(other.drop2_) {
    for (int i = 0; i < 3; ++i) groups_[i] = std::make_unique<ModuleGroup<Scalar>>(*other.groups_[i]);
  }
  BertLayer& operator=(const BertLayer&) = delete;
  ~BertLayer() override = default;

  // The batch shape and each sequence's length (see MultiHeadSelfAttention::set_layout).
  void set_layout(Index batch, Index seq_len, const std::vector<Index>& lengths) {
    self_attention().set_layout(batch, seq_len, lengths);
    cached_ = false;
  }
  void set_layout(const TokenBatch& tokens) { set_layout(tokens.batch_size(), tokens.seq_len(), tokens.lengths()); }

  // Dropout in training mode: hidden_p on the two residual branches, attention_p on the attention
  // probabilities (BERT's hidden_dropout_prob and attention_probs_dropout_prob); streams seeded from
  // seed, seed + 1, seed + 2. requires: both in [0, 1).
  void set_dropout(double hidden_p, double attention_p, std::uint64_t seed = 0) {
    constexpr const char* where = "BertLayer::set_dropout";
    if (!(hidden_p >= 0 && hidden_p < 1)) detail::fail(where, "hidden_p must be in [0, 1), got ", hidden_p);
    self_attention().set_dropout(attention_p, seed + 2);
    drop1_ = Dropout<Scalar>(hidden_p, seed);
    drop2_ = Dropout<Scalar>(hidden_p, seed + 1);
    drop1_.train(this->training_);
    drop2_.train(this->training_);
    cached_ = false;
  }

  const MatrixType& forward(const Input& X) override {
    constexpr const char* where = "BertLayer::forward";
    detail::require_cols(where, "input", X, hidden_, "hidden");
    const MatrixType& C = self_attention().forward(X);
    const MatrixType& Z1 = leaf(0, 1, 0).forward(C);
    MatrixType& sum1 = sum1_buffer();
    detail::resize_workspace(sum1, X.rows(), hidden_);
    sum1.noalias() = (drop1_.p() > 0 ? drop1_.forward(Z1) : Z1) + X;
    const MatrixType& H1 = leaf(0, 1, 1).forward(sum1);
    const MatrixType& G = gelu_.forward(leaf(1, 0).forward(H1));
    const MatrixType& Z2 = leaf(2, 0).forward(G);
    MatrixType& sum2 = sum2_buffer();
    detail::resize_workspace(sum2, X.rows(), hidden_);
    sum2.noalias() = (drop2_.p() > 0 ? drop2_.forward(Z2) : Z2) + H1;
    cached_ = this->training_;
    rows_ = X.rows();
    return leaf(2, 1).forward(sum2);
  }

  const MatrixType& backward(const Input& dY) override {
    constexpr const char* where = "BertLayer::backward";
    if (!cached_) this->fail_no_cached_forward(where);
    detail::require_shape(where, "grad_output", dY, rows_, hidden_);
    const MatrixType& dS2 = leaf(2, 1).backward(dY);
    const MatrixType& dG = leaf(2, 0).backward(drop2_.p() > 0 ? drop2_.backward(dS2) : dS2);
    const MatrixType& dH1 = leaf(1, 0).backward(gelu_.backward(dG));
    MatrixType& grad_h1 = grad_h1_buffer();
    detail::resize_workspace(grad_h1, dH1.rows(), hidden_);
    grad_h1.noalias() = dH1 + dS2;
    const MatrixType& dS1 = leaf(0, 1, 1).backward(grad_h1);
    const MatrixType& dX = self_attention().backward(leaf(0, 1, 0).backward(drop1_.p() > 0 ? drop1_.backward(dS1) : dS1));
    detail::resize_workspace(grad_input_, dX.rows(), hidden_);
    grad_input_.noalias() = dX + dS1;
    return grad_input_;
  }

  void zero_grad() override {
    for (auto& g : groups_) g->zero_grad();
  }
  void train(bool on = true) override {
    Module<Scalar>::train(on);
    for (auto& g : groups_) g->train(on);
    gelu_.train(on);
    drop1_.train(on);
    drop2_.train(on);
    if (!on) cached_ = false;
  }
  void set_requires_grad(bool on) override {
    for (auto& g : groups_) g->set_requires_grad(on);
  }
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) override {
    for (int i = 0; i < 3; ++i) groups_[i]->collect_parameters(out, prefix + group_name(i) + ".");
  }
  Index num_parameters() const override {
    Index n = 0;
    for (const auto& g : groups_) n += g->num_parameters();
    return n;
  }
  Index num_trainable_parameters() const override {
    Index n = 0;
    for (const auto& g : groups_) n += g->num_trainable_parameters();
    return n;
  }
  Index in_features() const override { return hidden_; }
  Index out_features() const override { return hidden_; }
  Index intermediate_size() const { return intermediate_; }
  std::string type_name() const override { return "BertLayer"; }
  std::string describe() const override {
    const auto& att = static_cast<const MultiHeadSelfAttention<Scalar>&>(groups_[0]->child(0));
    return detail::concat("BertLayer(hidden=", hidden_, ", heads=", att.heads(), ", intermediate=", intermediate_, ")");
  }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<BertLayer>(*this); }

  // Children: "attention", "intermediate", "output" (groups; their leaves are replaceable).
  std::size_t num_children() const override { return 3; }
  std::string child_name(std::size_t i) const override {
    if (i >= 3) this->no_child("BertLayer::child_name", i);
    return group_name(static_cast<int>(i));
  }
  Module<Scalar>& child(std::size_t i) override {
    if (i >= 3) this->no_child("BertLayer::child", i);
    return *groups_[i];
  }
  const Module<Scalar>& child(std::size_t i) const override {
    if (i >= 3) this->no_child("BertLayer::child", i);
    return *groups_[i];
  }
  ModulePtr replace_child(std::size_t i, ModulePtr) override {
    if (i >= 3) this->no_child("BertLayer::replace_child", i);
    detail::fail("BertLayer::replace_child", "'", group_name(static_cast<int>(i)),
                 "' groups modules; replace those instead (for example '", group_name(static_cast<int>(i)),
                 i == 0 ? ".self.query')" : ".dense')");
  }

 private:
  static const char* group_name(int i) {
    static const char* names[3] = {"attention", "intermediate", "output"};
    return names[i];
  }
  MultiHeadSelfAttention<Scalar>& self_attention() {
    return static_cast<MultiHeadSelfAttention<Scalar>&>(groups_[0]->child(0));
  }
  // The leaf at groups_[g] -> child a (-> child b); looked up on each call, since leaves may be replaced.
  Module<Scalar>& leaf(int g, std::size_t a) { return groups_[g]->child(a); }
  Module<Scalar>& leaf(int g, std::size_t a, std::size_t b) { return groups_[g]->child(a).child(b); }

  Index hidden_, intermediate_;
  std::unique_ptr<ModuleGroup<Scalar>> groups_[3];
  GELU<Scalar> gelu_;
  Dropout<Scalar> drop1_{0.0}, drop2_{0.0};
  bool cached_ = false;
  Index rows_ = 0;  // rows of the last forward
  // dX, kept: the layer below reads it as its dY while its own transient buffers are written.
  MatrixType grad_input_;
  // The residual sums and the gradient at H1: shareable (see Module::share_transient_buffers), with
  // those of the GELU and the dropouts.
  TransientBuffers<Scalar, 3> transient_;
  MatrixType& sum1_buffer() { return transient_[0]; }
  MatrixType& sum2_buffer() { return transient_[1]; }
  MatrixType& grad_h1_buffer() { return transient_[2]; }
  bool share_own_buffers(Module<Scalar>* other) override {
    auto* o = static_cast<BertLayer*>(other);
    transient_.share(o ? &o->transient_ : nullptr);
    gelu_.share_transient_buffers(o ? &o->gelu_ : nullptr);
    drop1_.share_transient_buffers(o ? &o->drop1_ : nullptr);
    drop2_.share_transient_buffers(o ? &o->drop2_ : nullptr);
    return true;
  }
};

}  // namespace lora::nn
