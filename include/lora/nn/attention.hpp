// lora.hpp: MultiHeadSelfAttention, scaled dot-product self-attention over token rows, with query, key,
// value and output projections as ordinary child modules (nn::Linear at construction).
//
// Layout: the input is [batch * seq_len x hidden], sequence b's position t at row b * seq_len + t (the
// TokenBatch layout). set_layout() gives the module the batch shape and each sequence's length; keys at
// positions >= length are padding and get no attention (Hugging Face's attention_mask); with causal = true
// query t also ignores keys after t. Padded query rows are computed like others (they attend to the real
// keys), as in Hugging Face; a loss should ignore them.
//
// forward: Q = query(X), K = key(X), V = value(X); per sequence b and head h (head width d = hidden / heads)
//   S = Q_bh K_bh^T / sqrt(d), masked entries excluded, P = softmax over each row, C_bh = P V_bh;
//   Y = dense(C).
// backward (per b, h, from dC = dense.backward(dY)):
//   dP = dC_bh V_bh^T, dV_bh = P^T dC_bh, dS = P .* (dP - rowsum(dP .* P)) / sqrt(d),
//   dQ_bh = dS K_bh, dK_bh = dS^T Q_bh; dX = query.backward(dQ) + key.backward(dK) + value.backward(dV).
#pragma once

#include <lora/common.hpp>
#include <lora/detail/kernels.hpp>
#include <lora/detail/random.hpp>
#include <lora/nn/linear.hpp>
#include <lora/nn/module.hpp>
#include <lora/nn/token_batch.hpp>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lora::nn {

template <class Scalar>
class MultiHeadSelfAttention final : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;
  using ModulePtr = std::unique_ptr<Module<Scalar>>;

  // requires: hidden >= 1, heads >= 1, hidden divisible by heads.
  // ensures:  four hidden x hidden Linear children with bias, seeded seed, seed+1, seed+2, seed+3; with
  //           output_projection = false the first three only, and forward returns the context C (the
  //           output projection then belongs to the caller: BERT's attention.output.dense, see BertLayer).
  MultiHeadSelfAttention(Index hidden, Index heads, bool causal = false, std::uint64_t seed = 0,
                         bool output_projection = true)
      : hidden_(hidden), heads_(heads), causal_(causal), count_(output_projection ? 4 : 3) {
    constexpr const char* where = "MultiHeadSelfAttention::MultiHeadSelfAttention";
    if (hidden < 1 || heads < 1) detail::fail(where, "hidden and heads must be >= 1, got ", hidden, " and ", heads);
    if (hidden % heads != 0) detail::fail(where, "hidden = ", hidden, " is not divisible by heads = ", heads);
    for (int i = 0; i < count_; ++i)
      children_[i] = std::make_unique<Linear<Scalar>>(hidden, hidden, true, seed + static_cast<std::uint64_t>(i));
  }
  MultiHeadSelfAttention(const MultiHeadSelfAttention& other)
      : Module<Scalar>(other),
        hidden_(other.hidden_),
        heads_(other.heads_),
        causal_(other.causal_),
        count_(other.count_),
        batch_(other.batch_),
        seq_len_(other.seq_len_),
        lengths_(other.lengths_),
        dropout_(other.dropout_),
        dropout_rng_(other.dropout_rng_) {
    for (int i = 0; i < count_; ++i) children_[i] = other.children_[i]->clone();
  }
  MultiHeadSelfAttention& operator=(const MultiHeadSelfAttention&) = delete;
  ~MultiHeadSelfAttention() override = default;

  // set_layout(batch, seq_len, lengths)
  //   requires: batch, seq_len >= 1; lengths has batch entries, each in [1, seq_len].
  //   ensures:  the next forward() takes batch * seq_len rows. A cached forward is dropped.
  void set_layout(Index batch, Index seq_len, const std::vector<Index>& lengths) {
    constexpr const char* where = "MultiHeadSelfAttention::set_layout";
    if (batch < 1 || seq_len < 1) detail::fail(where, "batch and seq_len must be >= 1, got ", batch, " and ", seq_len);
    if (static_cast<Index>(lengths.size()) != batch)
      detail::fail(where, "lengths has ", lengths.size(), " entries, expected batch = ", batch);
    for (std::size_t b = 0; b < lengths.size(); ++b)
      if (lengths[b] < 1 || lengths[b] > seq_len)
        detail::fail(where, "sequence ", b, " has length ", lengths[b], ", expected 1..seq_len = ", seq_len);
    batch_ = batch;
    seq_len_ = seq_len;
    lengths_ = lengths;
    cached_ = false;
  }
  void set_layout(const TokenBatch& tokens) { set_layout(tokens.batch_size(), tokens.seq_len(), tokens.lengths()); }

  // Dropout on the attention probabilities (BERT's attention_probs_dropout_prob), in training mode: each
  // probability is zeroed with probability p, the others scaled by 1 / (1 - p), before they weight the
  // values; the softmax's backward reads the probabilities before dropout. requires: 0 <= p < 1.
  void set_dropout(double p, std::uint64_t seed = 0) {
    if (!(p >= 0 && p < 1)) detail::fail("MultiHeadSelfAttention::set_dropout", "p must be in [0, 1), got ", p);
    dropout_ = p;
    dropout_rng_.seed(seed);
    cached_ = false;
  }
  double dropout() const { return dropout_; }

  const MatrixType& forward(const Input& X) override {
    constexpr const char* where = "MultiHeadSelfAttention::forward";
    if (batch_ < 1) detail::fail(where, "no layout: call set_layout() first");
    detail::require_shape(where, "input", X, batch_ * seq_len_, hidden_);
    // The projections' outputs are used where the children keep them: each stays valid until that
    // child's next forward (the Module contract), which only this module calls.
    q_ = &children_[0]->forward(X);
    k_ = &children_[1]->forward(X);
    v_ = &children_[2]->forward(X);
    const MatrixType &q = *q_, &k = *k_, &v = *v_;
    const Index T = seq_len_, d = hidden_ / heads_;
    const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(d));
    detail::resize_workspace(probs_, batch_ * heads_ * T, T);
    MatrixType& context = context_buffer();
    detail::resize_workspace(context, batch_ * T, hidden_);
    dropping_ = this->training_ && dropout_ > 0;
    const int threads = head_threads(2);
    if (dropping_) {
      // Drawn here, in (b, h, i, j) order, so that the masks do not depend on the thread count.
      detail::resize_workspace(drop_mask_, batch_ * heads_ * T, T);
      const Scalar keep = static_cast<Scalar>(1.0 / (1.0 - dropout_));
      for (Index r = 0; r < drop_mask_.rows(); ++r)
        for (Index j = 0; j < T; ++j) drop_mask_(r, j) = dropout_rng_.uniform() < dropout_ ? Scalar(0) : keep;
      for (int t = 0; t < threads; ++t) detail::resize_workspace(scratch_[static_cast<std::size_t>(t)].dropped, T, T);
    }
    for_each_head(threads, [&](Index b, Index h, Scratch& own) {
      const Index len = lengths_[static_cast<std::size_t>(b)];
      auto P = probs_.block((b * heads_ + h) * T, 0, T, T);
      P.noalias() = q.block(b * T, h * d, T, d) * k.block(b * T, h * d, T, d).transpose();
      for (Index i = 0; i < T; ++i) {
        const Index visible = causal_ ? std::min(len, i + 1) : len;
        auto row = P.row(i);
        const Scalar m = row.head(visible).maxCoeff() * scale;
        row.head(visible) = (row.head(visible).array() * scale - m).exp().matrix();
        row.head(visible) /= row.head(visible).sum();
        row.tail(T - visible).setZero();
      }
      if (dropping_) {
        own.dropped.noalias() = P.cwiseProduct(drop_mask_.block((b * heads_ + h) * T, 0, T, T));
        context.block(b * T, h * d, T, d).noalias() = own.dropped * v.block(b * T, h * d, T, d);
      } else {
        context.block(b * T, h * d, T, d).noalias() = P * v.block(b * T, h * d, T, d);
      }
    });
    cached_ = this->training_;
    return count_ == 4 ? children_[3]->forward(context) : context;
  }

  const MatrixType& backward(const Input& dY) override {
    constexpr const char* where = "MultiHeadSelfAttention::backward";
    if (!cached_) this->fail_no_cached_forward(where);
    detail::require_shape(where, "grad_output", dY, batch_ * seq_len_, hidden_);
    const Input dC = count_ == 4 ? Input(children_[3]->backward(dY)) : dY;
    const MatrixType &q = *q_, &k = *k_, &v = *v_;
    const Index T = seq_len_, d = hidden_ / heads_;
    const Scalar scale = Scalar(1) / std::sqrt(static_cast<Scalar>(d));
    MatrixType &dq = dq_buffer(), &dk = dk_buffer(), &dv = dv_buffer(), &dx = grad_input_buffer();
    detail::resize_workspace(dq, batch_ * T, hidden_);
    detail::resize_workspace(dk, batch_ * T, hidden_);
    detail::resize_workspace(dv, batch_ * T, hidden_);
    const int threads = head_threads(4);
    for (int t = 0; t < threads; ++t) {
      Scratch& own = scratch_[static_cast<std::size_t>(t)];
      detail::resize_workspace(own.dp, T, T);
      if (dropping_) detail::resize_workspace(own.dropped, T, T);
    }
    for_each_head(threads, [&](Index b, Index h, Scratch& own) {
      const auto P = probs_.block((b * heads_ + h) * T, 0, T, T);
      const auto dc = dC.block(b * T, h * d, T, d);
      MatrixType& dp = own.dp;
      dp.noalias() = dc * v.block(b * T, h * d, T, d).transpose();
      if (dropping_) {
        const auto M = drop_mask_.block((b * heads_ + h) * T, 0, T, T);
        own.dropped.noalias() = P.cwiseProduct(M);
        dv.block(b * T, h * d, T, d).noalias() = own.dropped.transpose() * dc;
        dp.array() *= M.array();
      } else {
        dv.block(b * T, h * d, T, d).noalias() = P.transpose() * dc;
      }
      for (Index i = 0; i < T; ++i) {
        const Scalar dot = dp.row(i).dot(P.row(i));
        dp.row(i) = (P.row(i).array() * (dp.row(i).array() - dot) * scale).matrix();
      }
      dq.block(b * T, h * d, T, d).noalias() = dp * k.block(b * T, h * d, T, d);
      dk.block(b * T, h * d, T, d).noalias() = dp.transpose() * q.block(b * T, h * d, T, d);
    });
    dx = children_[0]->backward(dq);
    dx += children_[1]->backward(dk);
    dx += children_[2]->backward(dv);
    return dx;
  }

  void zero_grad() override {
    for (int i = 0; i < count_; ++i) children_[i]->zero_grad();
  }
  void train(bool on = true) override {
    Module<Scalar>::train(on);
    for (int i = 0; i < count_; ++i) children_[i]->train(on);
    if (!on) cached_ = false;
  }
  void set_requires_grad(bool on) override {
    for (int i = 0; i < count_; ++i) children_[i]->set_requires_grad(on);
  }

  // Children, in order, under Hugging Face's names: "query", "key", "value", "dense" (BERT's
  // attention.output.dense; absent without the output projection).
  // (Module's child interface; the named forms below forward to it.)
  std::size_t num_children() const override { return static_cast<std::size_t>(count_); }
  std::string child_name(std::size_t i) const override {
    if (i >= num_children()) this->no_child("MultiHeadSelfAttention::child_name", i);
    return projection_name(static_cast<int>(i));
  }
  Module<Scalar>& child(std::size_t i) override {
    if (i >= num_children()) this->no_child("MultiHeadSelfAttention::child", i);
    return *children_[i];
  }
  const Module<Scalar>& child(std::size_t i) const override {
    if (i >= num_children()) this->no_child("MultiHeadSelfAttention::child", i);
    return *children_[i];
  }
  // replace_child(i, module)
  //   requires: i < num_children(); module non-null with in_features = out_features = hidden.
  //   ensures:  the child is replaced (e.g. a Linear by a LoRA layer over it) and returned; the cached
  //             forward is dropped.
  ModulePtr replace_child(std::size_t i, ModulePtr module) override {
    this->check_replacement("MultiHeadSelfAttention::replace_child", i, module.get());
    module->train(this->training_);
    cached_ = false;
    return std::exchange(children_[i], std::move(module));
  }
  void for_each_child(const std::function<void(const std::string&, Module<Scalar>&)>& fn) {
    for (int i = 0; i < count_; ++i) fn(projection_name(i), *children_[i]);
  }
  Module<Scalar>& child(const std::string& name) { return *children_[index_of("MultiHeadSelfAttention::child", name)]; }
  ModulePtr replace_child(const std::string& name, ModulePtr module) {
    return replace_child(static_cast<std::size_t>(index_of("MultiHeadSelfAttention::replace_child", name)),
                         std::move(module));
  }

  // Shares this module's own transient buffers and those of the output projection; not the query, key
  // and value children's, whose outputs backward() reads.
  std::size_t share_transient_buffers(Module<Scalar>* other) override {
    if (other == this) return 0;
    auto* o = dynamic_cast<MultiHeadSelfAttention*>(other);
    if (other && (!o || o->hidden_ != hidden_ || o->count_ != count_)) return 0;
    share_own_buffers(other);
    return 1 + (count_ == 4 ? children_[3]->share_transient_buffers(o ? o->children_[3].get() : nullptr) : 0);
  }

  // Children's parameters as "<prefix><child>.<name>".
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) override {
    for (int i = 0; i < count_; ++i) children_[i]->collect_parameters(out, prefix + projection_name(i) + ".");
  }
  Index num_parameters() const override {
    Index n = 0;
    for (int i = 0; i < count_; ++i) n += children_[i]->num_parameters();
    return n;
  }
  Index num_trainable_parameters() const override {
    Index n = 0;
    for (int i = 0; i < count_; ++i) n += children_[i]->num_trainable_parameters();
    return n;
  }
  Index in_features() const override { return hidden_; }
  Index out_features() const override { return hidden_; }
  Index heads() const { return heads_; }
  bool causal() const { return causal_; }
  bool output_projection() const { return count_ == 4; }
  std::string type_name() const override { return "MultiHeadSelfAttention"; }
  std::string describe() const override {
    return detail::concat("MultiHeadSelfAttention(hidden=", hidden_, ", heads=", heads_, causal_ ? ", causal" : "",
                          count_ == 4 ? "" : ", no output projection", ")");
  }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<MultiHeadSelfAttention>(*this); }

 private:
  static const char* projection_name(int i) {
    static const char* names[4] = {"query", "key", "value", "dense"};
    return names[i];
  }
  int index_of(const char* where, const std::string& name) const {
    for (int i = 0; i < count_; ++i)
      if (name == projection_name(i)) return i;
    detail::fail(where, "no child '", name, "' (children: query, key, value", count_ == 4 ? ", dense)" : ")");
  }

  // Each thread's T x T scratch for one (sequence, head) pair at a time.
  struct Scratch {
    MatrixType dropped, dp;
  };

  // Threads for the per-head loop, `products` T x T x d products per head. Those products are small and
  // go through Eigen's product at about a third of the packed GEMM's rate per multiply-add (a profile of
  // the MiniLM shape), so their work counts four times against threads_for's threshold. Grows scratch_
  // to that many entries, outside any parallel region (nothing allocates inside one).
  int head_threads(int products) {
    const Index T = seq_len_, d = hidden_ / heads_;
    const double work = 4.0 * static_cast<double>(batch_ * heads_) * static_cast<double>(T * T) *
                        static_cast<double>(products * d + 8);
    const int threads = static_cast<int>(std::max<Index>(1, std::min<Index>(detail::threads_for(work), batch_ * heads_)));
    if (scratch_.size() < static_cast<std::size_t>(threads)) scratch_.resize(static_cast<std::size_t>(threads));
    return threads;
  }
  // f(b, h, scratch) for every sequence b and head h, the pairs split in contiguous runs over `threads`.
  // Each pair writes its own blocks of the outputs; nothing inside may throw.
  template <class F>
  void for_each_head(int threads, F&& f) {
    const Index pairs = batch_ * heads_;
    detail::parallel_region(threads, [&](int t, int nt) {
      Scratch& own = scratch_[static_cast<std::size_t>(t)];
      const auto range = detail::split(pairs, 1, t, nt);
      for (Index pair = range.first; pair < range.second; ++pair) f(pair / heads_, pair % heads_, own);
    });
  }

  Index hidden_, heads_;
  bool causal_;
  int count_;  // 4 with the output projection, 3 without
  ModulePtr children_[4];
  Index batch_ = 0, seq_len_ = 0;
  std::vector<Index> lengths_;
  double dropout_ = 0;
  detail::Random dropout_rng_;
  bool dropping_ = false;  // the last forward applied dropout (training mode, p > 0)
  MatrixType drop_mask_;
  std::vector<Scratch> scratch_;  // one per thread of the per-head loops
  bool cached_ = false;
  // The projections of the last forward, in the children's own output buffers (a copy starts without them).
  const MatrixType *q_ = nullptr, *k_ = nullptr, *v_ = nullptr;
  MatrixType probs_;
  // The context and the gradients dQ, dK, dV, dX: shareable (see share_transient_buffers).
  TransientBuffers<Scalar, 5> transient_;
  MatrixType& context_buffer() { return transient_[0]; }
  MatrixType& dq_buffer() { return transient_[1]; }
  MatrixType& dk_buffer() { return transient_[2]; }
  MatrixType& dv_buffer() { return transient_[3]; }
  MatrixType& grad_input_buffer() { return transient_[4]; }
  bool share_own_buffers(Module<Scalar>* other) override {
    transient_.share(other ? &static_cast<MultiHeadSelfAttention*>(other)->transient_ : nullptr);
    return true;
  }
};

}  // namespace lora::nn
