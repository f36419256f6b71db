// lora.hpp: ModulesToSave, PEFT's ModulesToSaveWrapper: a module trained in full beside the adapters
// (typically the classifier head), kept as a frozen original and one trainable copy per adapter.
//
// The original is never trained: disabling the adapters (or activating an adapter without a copy) gives
// the base model back exactly, and two adapters each train and save their own head. The copy an adapter
// gets is made from the original when the adapter is added (inject_lora, load_adapter, add_adapter), as
// PEFT does. Parameter names follow PEFT: "<path>.modules_to_save.<adapter>.weight" for the copy in use,
// "<path>.original_module.weight" for the original if a caller makes it trainable. Adapter files keep
// PEFT's keys ("<path>.weight"): the file format does not change.
#pragma once

#include <algorithm>
#include <lora/common.hpp>
#include <lora/nn/inference.hpp>
#include <lora/nn/linear.hpp>
#include <lora/nn/module.hpp>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace lora::nn {

template <class Scalar>
class ModulesToSave final : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;
  using LinearPtr = std::unique_ptr<Linear<Scalar>>;

  // Takes the original module and freezes it (weight and bias). No copy yet: add_copy() makes them.
  explicit ModulesToSave(LinearPtr original) : original_(std::move(original)) {
    if (!original_) detail::fail("ModulesToSave::ModulesToSave", "the original module is null");
    original_->set_trainable(false);
    this->training_ = original_->training();
  }
  ModulesToSave(const ModulesToSave& other)
      : Module<Scalar>(other), original_(std::make_unique<Linear<Scalar>>(*other.original_)), active_(other.active_) {
    for (const auto& [name, copy] : other.copies_) copies_.emplace_back(name, std::make_unique<Linear<Scalar>>(*copy));
  }
  ModulesToSave& operator=(const ModulesToSave& other) {
    if (this != &other) {
      ModulesToSave copy(other);
      *this = std::move(copy);
    }
    return *this;
  }
  ModulesToSave(ModulesToSave&&) noexcept = default;
  ModulesToSave& operator=(ModulesToSave&&) noexcept = default;
  ~ModulesToSave() override = default;

  // ---- copies per adapter ----------------------------------------------------------------------------
  // A trainable copy of the original for `adapter` (non-empty, no '.', not present yet).
  Linear<Scalar>& add_copy(const std::string& adapter) {
    constexpr const char* where = "ModulesToSave::add_copy";
    if (adapter.empty() || adapter.find('.') != std::string::npos)
      detail::fail(where, "adapter name '", adapter, "' must be non-empty and contain no '.'");
    if (find(adapter)) detail::fail(where, "there is already a copy for adapter '", adapter, "'");
    auto copy = std::make_unique<Linear<Scalar>>(*original_);
    copy->set_trainable(true);  // fresh zero gradients
    copy->train(this->training_);
    copies_.emplace_back(adapter, std::move(copy));
    return *copies_.back().second;
  }
  // Removes the copy of `adapter` (the original is used for it from now on).
  void delete_copy(const std::string& adapter) {
    const auto it = std::find_if(copies_.begin(), copies_.end(), [&](const auto& c) { return c.first == adapter; });
    if (it == copies_.end())
      detail::fail("ModulesToSave::delete_copy", "no copy for adapter '", adapter, "'; copies exist for: ", names());
    copies_.erase(it);
    last_ = nullptr;
  }
  bool has_copy(const std::string& adapter) const { return find(adapter) != nullptr; }
  Linear<Scalar>& copy(const std::string& adapter) {
    return const_cast<Linear<Scalar>&>(std::as_const(*this).copy(adapter));
  }
  const Linear<Scalar>& copy(const std::string& adapter) const {
    const Linear<Scalar>* c = find(adapter);
    if (!c) detail::fail("ModulesToSave::copy", "no copy for adapter '", adapter, "'; copies exist for: ", names());
    return *c;
  }
  std::vector<std::string> adapter_names() const {
    std::vector<std::string> out;
    for (const auto& c : copies_) out.push_back(c.first);
    return out;
  }
  Linear<Scalar>& original() { return *original_; }
  const Linear<Scalar>& original() const { return *original_; }

  // Which adapter's copy forward uses: `adapter`'s copy if it has one, the original otherwise (also for
  // ""). The model-level adapter functions call this; a change between forward and backward makes
  // backward throw.
  void set_active_adapter(const std::string& adapter) {
    if (adapter != active_) last_ = nullptr;
    active_ = adapter;
  }
  const std::string& active_adapter() const { return active_; }
  // The module forward runs now.
  const Linear<Scalar>& current() const {
    const Linear<Scalar>* c = find(active_);
    return c ? *c : *original_;
  }
  Linear<Scalar>& current() { return const_cast<Linear<Scalar>&>(std::as_const(*this).current()); }

  // ---- Module ----------------------------------------------------------------------------------------
  const MatrixType& forward(const Input& X) override {
    last_ = nullptr;
    Linear<Scalar>& m = current();
    const MatrixType& y = m.forward(X);
    last_ = &m;
    return y;
  }
  const MatrixType& backward(const Input& dY) override {
    if (!last_ || last_ != &current())
      detail::fail("ModulesToSave::backward", "no forward of the module in use (the active adapter changed, or a ",
                   "copy was deleted, after forward); run forward() again");
    return last_->backward(dY);
  }
  // Named adapters: the copy of the first named adapter that has one. A mixed batch: each row through the
  // copy of its adapter (the original for rows of adapters without one).
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override {
    using Mode = typename InferenceContext<Scalar>::Adapters;
    if (ctx.mode() == Mode::named) {
      for (const std::string& n : ctx.adapter_names())
        if (const Linear<Scalar>* c = find(n)) return c->infer(X, ctx);
      return original_->infer(X, ctx);
    }
    if (ctx.mode() == Mode::active) return current().infer(X, ctx);
    ModuleWorkspace<Scalar>& ws = ctx.next_workspace();
    const MixedBatchPlan& plan = ctx.plan();
    if (plan.rows() != X.rows())
      detail::fail("ModulesToSave::infer", "the mixed-batch plan has ", plan.rows(), " rows, the input ", X.rows());
    const MatrixType& base = original_->infer(X, ctx);
    detail::resize_workspace(ws.output, base.rows(), base.cols());
    ws.output = base;
    for (const MixedBatchPlan::Group& g : plan.groups()) {
      const Linear<Scalar>* c = find(g.adapter);
      if (!c) continue;
      const auto rows = static_cast<Index>(g.rows.size());
      detail::resize_workspace(ws.staging, rows, X.cols());
      for (Index i = 0; i < rows; ++i) ws.staging.row(i) = X.row(g.rows[static_cast<std::size_t>(i)]);
      const MatrixType& y = c->infer(ws.staging, ctx);
      for (Index i = 0; i < rows; ++i) ws.output.row(g.rows[static_cast<std::size_t>(i)]) = y.row(i);
    }
    return ws.output;
  }
  void zero_grad() override {
    original_->zero_grad();
    for (auto& c : copies_) c.second->zero_grad();
  }
  void train(bool on = true) override {
    Module<Scalar>::train(on);
    original_->train(on);
    for (auto& c : copies_) c.second->train(on);
  }
  // Only the module in use trains (PEFT turns requires_grad on for the active adapter's copy alone).
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) override {
    if (find(active_)) {
      copy(active_).collect_parameters(out, prefix + "modules_to_save." + active_ + ".");
    } else {
      original_->collect_parameters(out, prefix + "original_module.");
    }
  }
  void set_requires_grad(bool on) override { current().set_trainable(on); }
  Index num_parameters() const override {
    Index n = original_->num_parameters();
    for (const auto& c : copies_) n += c.second->num_parameters();
    return n;
  }
  Index num_trainable_parameters() const override { return current().num_trainable_parameters(); }
  Index in_features() const override { return original_->in_features(); }
  Index out_features() const override { return original_->out_features(); }
  std::string type_name() const override { return "ModulesToSave"; }
  std::string describe() const override {
    return detail::concat("ModulesToSave(", original_->describe(), "; copies: ", names(),
                          "; in use: ", find(active_) ? "'" + active_ + "'" : std::string("the original"), ")");
  }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<ModulesToSave>(*this); }

 private:
  const Linear<Scalar>* find(const std::string& adapter) const {
    for (const auto& c : copies_)
      if (c.first == adapter) return c.second.get();
    return nullptr;
  }
  std::string names() const {
    std::string out;
    for (const auto& c : copies_) out += (out.empty() ? "'" : ", '") + c.first + "'";
    return out.empty() ? std::string("none") : out;
  }

  LinearPtr original_;
  std::vector<std::pair<std::string, LinearPtr>> copies_;  // by pointer: a copy never moves while it exists
  std::string active_;
  Linear<Scalar>* last_ = nullptr;  // the module of the last training forward
};

}  // namespace lora::nn
