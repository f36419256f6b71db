// lora.hpp: Sequential, a model as a chain of named modules, with PEFT-style dotted paths
// ("layers.0", "layers.2.lora_A.default.weight"), and what the model offers once LoRA is injected:
// its LoRA layers by path, its modules_to_save, merge/unmerge of the whole model, and the base weights
// by name (to save and reload a pretrained base).
#pragma once

#include <lora/adapters.hpp>
#include <lora/common.hpp>
#include <lora/linear.hpp>
#include <lora/nn/config.hpp>
#include <lora/nn/embedding.hpp>
#include <lora/nn/linear.hpp>
#include <lora/nn/lora_layer.hpp>
#include <lora/nn/modules_to_save.hpp>
#include <lora/nn/norm.hpp>
#include <lora/nn/inference.hpp>
#include <lora/nn/module.hpp>

#include <algorithm>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lora::nn {

template <class Scalar>
class Sequential : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::VectorType;
  using typename Module<Scalar>::Input;
  using ModulePtr = std::unique_ptr<Module<Scalar>>;

  // `name` prefixes the paths when this is the top-level model: "layers" gives "layers.0", "layers.1", ...
  // (the paths of a PyTorch model whose Sequential is the attribute `layers`); "" gives "0", "1", ...
  // A Sequential nested in another one takes its path from its parent instead.
  explicit Sequential(std::string name = "layers") : name_(std::move(name)) {
    if (name_.find('.') != std::string::npos)
      detail::fail("Sequential::Sequential", "the name '", name_, "' must not contain '.'");
  }
  Sequential(const Sequential& other) : Module<Scalar>(other) { copy_from(other); }
  Sequential& operator=(const Sequential& other) {
    if (this != &other) {
      Module<Scalar>::operator=(other);
      children_.clear();
      copy_from(other);
    }
    return *this;
  }
  Sequential(Sequential&&) noexcept = default;
  Sequential& operator=(Sequential&&) noexcept = default;
  ~Sequential() override = default;

  // ---- building ------------------------------------------------------------------------------------
  // Appends a module named by its position ("0", "1", ...) or by `child_name` (non-empty, unique, no '.').
  // Returns a reference to the stored module.
  template <class M, class = std::enable_if_t<std::is_base_of_v<Module<Scalar>, M>>>
  M& add(M module) {
    return add(std::to_string(children_.size()), std::move(module));
  }
  template <class M, class = std::enable_if_t<std::is_base_of_v<Module<Scalar>, M>>>
  M& add(const std::string& child_name, M module) {
    auto owned = std::make_unique<M>(std::move(module));
    M& ref = *owned;
    add(child_name, ModulePtr(std::move(owned)));
    return ref;
  }
  Module<Scalar>& add(ModulePtr module) { return add(std::to_string(children_.size()), std::move(module)); }
  Module<Scalar>& add(const std::string& child_name, ModulePtr module);

  std::size_t size() const { return children_.size(); }
  Module<Scalar>& operator[](std::size_t i) { return *children_.at(i).module; }
  const Module<Scalar>& operator[](std::size_t i) const { return *children_.at(i).module; }
  // Module's child interface: the modules in order, under their names.
  std::size_t num_children() const override { return children_.size(); }
  std::string child_name(std::size_t i) const override {
    if (i >= children_.size()) this->no_child("Sequential::child_name", i);
    return children_[i].name;
  }
  Module<Scalar>& child(std::size_t i) override {
    if (i >= children_.size()) this->no_child("Sequential::child", i);
    return *children_[i].module;
  }
  const Module<Scalar>& child(std::size_t i) const override {
    if (i >= children_.size()) this->no_child("Sequential::child", i);
    return *children_[i].module;
  }
  ModulePtr replace_child(std::size_t i, ModulePtr module) override {
    this->check_replacement("Sequential::replace_child", i, module.get());
    module->train(this->training_);
    return std::exchange(children_[i].module, std::move(module));
  }
  const std::string& name() const { return name_; }

  // ---- Module ----------------------------------------------------------------------------------------
  // forward runs the children in order; backward runs them in reverse and returns dL/dX of the input.
  const MatrixType& forward(const Input& X) override;
  const MatrixType& backward(const Input& dY) override;
  // Like backward(), but stops at the lowest module that has trainable parameters: every parameter
  // gradient is accumulated, dL/dX of the model input is not computed. Cheaper when the bottom is frozen.
  virtual void backward_parameters(const Input& dY);
  // The children's infer() in order (see Module::infer and nn/inference.hpp).
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override {
    if (children_.empty()) detail::fail("Sequential::infer", "the model has no modules");
    const Index in = in_features();
    if (in >= 0 && X.cols() != in)
      detail::fail("Sequential::infer", "input has ", X.cols(), " columns, expected in_features = ", in,
                   " (of the first layer)");
    const MatrixType* h = &children_.front().module->infer(X, ctx);
    for (std::size_t i = 1; i < children_.size(); ++i) h = &children_[i].module->infer(*h, ctx);
    return *h;
  }
  void zero_grad() override {
    for (Child& c : children_) c.module->zero_grad();
  }
  void train(bool on = true) override {
    Module<Scalar>::train(on);
    for (Child& c : children_) c.module->train(on);
  }
  void set_requires_grad(bool on) override {
    for (Child& c : children_) c.module->set_requires_grad(on);
  }
  // The same for the module at `path` and, when `path` names a nested Sequential, everything under it
  // (a sub-tree); throws listing the paths that exist.
  void set_requires_grad(const std::string& path, bool on);
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) override {
    for (Child& c : children_) c.module->collect_parameters(out, prefix + c.name + ".");
  }
  Index num_parameters() const override {
    Index n = 0;
    for (const Child& c : children_) n += c.module->num_parameters();
    return n;
  }
  Index num_trainable_parameters() const override {
    Index n = 0;
    for (const Child& c : children_) n += c.module->num_trainable_parameters();
    return n;
  }
  // The first width a module reads, skipping modules that take any width (activations); -1 when a
  // module that reads no width but produces one (an Embedding, which reads ids) comes first.
  Index in_features() const override {
    for (const Child& c : children_) {
      if (c.module->in_features() >= 0) return c.module->in_features();
      if (c.module->out_features() >= 0) return -1;
    }
    return -1;
  }
  Index out_features() const override {
    for (auto it = children_.rbegin(); it != children_.rend(); ++it)
      if (it->module->out_features() >= 0) return it->module->out_features();
    return -1;
  }
  std::string type_name() const override { return "Sequential"; }
  // One line per module: path, description, trainable / total parameters.
  std::string describe() const override;
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<Sequential>(*this); }

  // ---- names -----------------------------------------------------------------------------------------
  // The trainable parameters under their full names ("layers.0.lora_A.default.weight", ...).
  ParameterList<Scalar> parameters() {
    ParameterList<Scalar> list;
    collect_parameters(list, root_prefix());
    return list;
  }
  // Every module that is not a container, depth first, with its path.
  std::vector<std::pair<std::string, Module<Scalar>*>> named_modules();
  std::vector<std::pair<std::string, const Module<Scalar>*>> named_modules() const;
  std::vector<std::string> module_names() const;
  // The module at `path`; throws listing the paths that exist.
  Module<Scalar>& module(const std::string& path);
  const Module<Scalar>& module(const std::string& path) const;

  // ---- LoRA ------------------------------------------------------------------------------------------
  // The LoRA layers by module path ("layers.0"), in order.
  std::vector<std::pair<std::string, LoraLinear<Scalar>*>> lora_layers();
  std::vector<std::pair<std::string, const LoraLinear<Scalar>*>> lora_layers() const;
  // The Embedding modules that have a LoRA adapter (inject_lora's Embedding targets), by path, in order.
  std::vector<std::pair<std::string, Embedding<Scalar>*>> lora_embeddings();
  std::vector<std::pair<std::string, const Embedding<Scalar>*>> lora_embeddings() const;
  // Whether any module has LoRA (a LoRA layer or an Embedding with an adapter).
  bool has_lora() const { return !lora_layers().empty() || !lora_embeddings().empty(); }
  // The modules_to_save of inject_lora (a frozen original and a trainable copy per adapter), by path.
  std::vector<std::pair<std::string, ModulesToSave<Scalar>*>> saved_modules();
  std::vector<std::pair<std::string, const ModulesToSave<Scalar>*>> saved_modules() const;
  // The config inject_lora used, or nullptr if LoRA was not injected.
  const LoraInjectConfig* lora_config() const { return lora_config_ ? &*lora_config_ : nullptr; }

  // Merges the active adapters of every LoRA layer and the adapter of every LoRA embedding, all or none
  // (see merge_adapters in lora/adapters.hpp: layers without an active adapter are left as they are; on a
  // throw no weight has changed). unmerge() undoes merge().
  void merge();
  void unmerge();
  bool merged() const;

  // ---- base weights by name --------------------------------------------------------------------------
  // "<path>.weight" and "<path>.bias" of every Linear and LoraLinear (W0 and its bias for the latter),
  // LayerNorm and RMSNorm (weight and bias: [dim x 1]), and "<path>.weight" of every Embedding (its table
  // without the adapter): the pretrained base, without adapters. Biases are [n x 1]. A weight kept in a
  // quantized base reads as its dequantized values.
  std::vector<std::string> base_tensor_names() const;
  MatrixType base_tensor(const std::string& name) const;
  // Shapes must match (a bias or a norm's weight may be given as a row or a column). Throws on an unknown
  // name, listing the names that exist, on a merged LoRA layer or Embedding, and for a weight kept in a shared or quantized base (which is
  // read-only; quantize a model after loading its values).
  void set_base_tensor(const std::string& name, const Eigen::Ref<const MatrixType>& value);

  // Puts `module` (same widths) in place of the module at `path` and returns the old one. Parameter
  // lists that reach the old module are stale once it is destroyed.
  ModulePtr replace_module(const std::string& path, ModulePtr module);
  // Records how LoRA was injected (or clears it with std::nullopt); used by inject_lora.
  void set_lora_record(std::optional<LoraInjectConfig> config) { lora_config_ = std::move(config); }

  // The prefix of the children's paths at the top level: "layers." (or "" for an unnamed model).
  std::string root_prefix() const { return name_.empty() ? std::string() : name_ + "."; }

 private:
  struct Child {
    std::string name;
    ModulePtr module;
  };

  void copy_from(const Sequential& other) {
    name_ = other.name_;
    for (const Child& c : other.children_) children_.push_back({c.name, c.module->clone()});
    lora_config_ = other.lora_config_;
  }

  // Calls fn(path, parent, index) for every module without children (a leaf) under `self`, depth first,
  // through every module that has children (Sequential, attention, ...). An empty Sequential lists nothing.
  template <class M, class Fn>
  static void visit(M& self, const std::string& prefix, Fn&& fn) {
    for (std::size_t i = 0; i < self.num_children(); ++i) {
      auto& c = self.child(i);
      const std::string path = prefix + self.child_name(i);
      if (c.num_children() > 0 || dynamic_cast<const Sequential*>(&c))
        visit(c, path + ".", fn);
      else
        fn(path, self, i);
    }
  }

  std::string known_paths() const;
  LoraModelView<Scalar> lora_view(const char* where);

  std::string name_;
  std::vector<Child> children_;
  std::optional<LoraInjectConfig> lora_config_;
};

using Sequentialf = Sequential<float>;
using Sequentiald = Sequential<double>;

// ===================================================================================================
// Implementation

template <class Scalar>
Module<Scalar>& Sequential<Scalar>::add(const std::string& child_name, ModulePtr module) {
  constexpr const char* where = "Sequential::add";
  if (!module) detail::fail(where, "the module is null");
  if (child_name.empty()) detail::fail(where, "the child name is empty");
  if (child_name.find('.') != std::string::npos)
    detail::fail(where, "the child name '", child_name, "' must not contain '.' (it separates path parts)");
  for (const Child& c : children_)
    if (c.name == child_name) detail::fail(where, "a child named '", child_name, "' already exists");
  // Widths must chain: the new module's input is the output of the last module that has a width.
  const Index previous = out_features(), next = module->in_features();
  if (previous >= 0 && next >= 0 && previous != next)
    detail::fail(where, "'", child_name, "' (", module->describe(), ") expects in_features = ", next,
                 ", but the model so far produces ", previous, " features");
  module->train(this->training_);
  children_.push_back({child_name, std::move(module)});
  return *children_.back().module;
}

template <class Scalar>
const typename Sequential<Scalar>::MatrixType& Sequential<Scalar>::forward(const Input& X) {
  constexpr const char* where = "Sequential::forward";
  if (children_.empty()) detail::fail(where, "the model has no modules");
  const Index in = in_features();
  if (in >= 0 && X.cols() != in)
    detail::fail(where, "input has ", X.cols(), " columns, expected in_features = ", in, " (of the first layer)");
  const MatrixType* h = &children_.front().module->forward(X);
  for (std::size_t i = 1; i < children_.size(); ++i) h = &children_[i].module->forward(*h);
  return *h;
}

template <class Scalar>
const typename Sequential<Scalar>::MatrixType& Sequential<Scalar>::backward(const Input& dY) {
  if (children_.empty()) detail::fail("Sequential::backward", "the model has no modules");
  const MatrixType* g = &children_.back().module->backward(dY);
  for (std::size_t i = children_.size() - 1; i-- > 0;) g = &children_[i].module->backward(*g);
  return *g;
}

template <class Scalar>
void Sequential<Scalar>::backward_parameters(const Input& dY) {
  if (children_.empty()) detail::fail("Sequential::backward_parameters", "the model has no modules");
  std::size_t lowest = children_.size();
  for (std::size_t i = 0; i < children_.size(); ++i)
    if (children_[i].module->num_trainable_parameters() > 0) {
      lowest = i;
      break;
    }
  if (lowest == children_.size()) return;  // nothing trains
  const MatrixType* g = &children_.back().module->backward(dY);
  for (std::size_t i = children_.size() - 1; i-- > lowest;) g = &children_[i].module->backward(*g);
}

template <class Scalar>
std::string Sequential<Scalar>::describe() const {
  std::ostringstream out;
  out << "Sequential(\n";
  for (const auto& [path, m] : named_modules())
    out << "  " << path << ": " << m->describe() << "  [" << m->num_trainable_parameters() << " / "
        << m->num_parameters() << " trainable]\n";
  out << ")";
  return out.str();
}

template <class Scalar>
std::vector<std::pair<std::string, Module<Scalar>*>> Sequential<Scalar>::named_modules() {
  std::vector<std::pair<std::string, Module<Scalar>*>> out;
  visit(*this, root_prefix(), [&](const std::string& path, Module<Scalar>& parent, std::size_t i) {
    out.emplace_back(path, &parent.child(i));
  });
  return out;
}

template <class Scalar>
std::vector<std::pair<std::string, const Module<Scalar>*>> Sequential<Scalar>::named_modules() const {
  std::vector<std::pair<std::string, const Module<Scalar>*>> out;
  visit(*this, root_prefix(), [&](const std::string& path, const Module<Scalar>& parent, std::size_t i) {
    out.emplace_back(path, &parent.child(i));
  });
  return out;
}

template <class Scalar>
std::vector<std::string> Sequential<Scalar>::module_names() const {
  std::vector<std::string> names;
  for (const auto& entry : named_modules()) names.push_back(entry.first);
  return names;
}

template <class Scalar>
std::string Sequential<Scalar>::known_paths() const {
  std::string known;
  for (const auto& [path, m] : named_modules()) known += detail::concat(known.empty() ? "" : ", ", path, " (", m->type_name(), ")");
  return known.empty() ? std::string("none") : known;
}

template <class Scalar>
Module<Scalar>& Sequential<Scalar>::module(const std::string& path) {
  return const_cast<Module<Scalar>&>(std::as_const(*this).module(path));
}

template <class Scalar>
const Module<Scalar>& Sequential<Scalar>::module(const std::string& path) const {
  for (const auto& [p, m] : named_modules())
    if (p == path) return *m;
  detail::fail("Sequential::module", "no module named '", path, "'; the model has: ", known_paths());
}

template <class Scalar>
void Sequential<Scalar>::set_requires_grad(const std::string& path, bool on) {
  const std::string below = path + ".";
  bool found = false;
  for (const auto& [p, m] : named_modules())
    if (p == path || p.compare(0, below.size(), below) == 0) {
      m->set_requires_grad(on);
      found = true;
    }
  if (!found)
    detail::fail("Sequential::set_requires_grad", "no module or sub-tree named '", path, "'; the model has: ",
                 known_paths());
}

template <class Scalar>
typename Sequential<Scalar>::ModulePtr Sequential<Scalar>::replace_module(const std::string& path, ModulePtr module) {
  constexpr const char* where = "Sequential::replace_module";
  if (!module) detail::fail(where, "the module is null");
  ModulePtr old_module;
  bool done = false;
  visit(*this, root_prefix(), [&](const std::string& p, Module<Scalar>& parent, std::size_t i) {
    if (done || p != path) return;
    try {
      old_module = parent.replace_child(i, std::move(module));
    } catch (const std::invalid_argument& e) {
      detail::fail(where, "'", path, "': ", e.what());
    }
    done = true;
  });
  if (!done) detail::fail(where, "no module named '", path, "'; the model has: ", known_paths());
  return old_module;
}

template <class Scalar>
std::vector<std::pair<std::string, LoraLinear<Scalar>*>> Sequential<Scalar>::lora_layers() {
  std::vector<std::pair<std::string, LoraLinear<Scalar>*>> out;
  for (const auto& [path, m] : named_modules())
    if (auto* l = dynamic_cast<LoraLayer<Scalar>*>(m)) out.emplace_back(path, &l->lora());
  return out;
}

template <class Scalar>
std::vector<std::pair<std::string, const LoraLinear<Scalar>*>> Sequential<Scalar>::lora_layers() const {
  std::vector<std::pair<std::string, const LoraLinear<Scalar>*>> out;
  for (const auto& [path, m] : named_modules())
    if (auto* l = dynamic_cast<const LoraLayer<Scalar>*>(m)) out.emplace_back(path, &l->lora());
  return out;
}

template <class Scalar>
std::vector<std::pair<std::string, Embedding<Scalar>*>> Sequential<Scalar>::lora_embeddings() {
  std::vector<std::pair<std::string, Embedding<Scalar>*>> out;
  for (const auto& [path, m] : named_modules())
    if (auto* e = dynamic_cast<Embedding<Scalar>*>(m); e && e->has_lora()) out.emplace_back(path, e);
  return out;
}

template <class Scalar>
std::vector<std::pair<std::string, const Embedding<Scalar>*>> Sequential<Scalar>::lora_embeddings() const {
  std::vector<std::pair<std::string, const Embedding<Scalar>*>> out;
  for (const auto& [path, m] : named_modules())
    if (auto* e = dynamic_cast<const Embedding<Scalar>*>(m); e && e->has_lora()) out.emplace_back(path, e);
  return out;
}

template <class Scalar>
std::vector<std::pair<std::string, ModulesToSave<Scalar>*>> Sequential<Scalar>::saved_modules() {
  std::vector<std::pair<std::string, ModulesToSave<Scalar>*>> out;
  for (const auto& [path, m] : named_modules())
    if (auto* s = dynamic_cast<ModulesToSave<Scalar>*>(m)) out.emplace_back(path, s);
  return out;
}

template <class Scalar>
std::vector<std::pair<std::string, const ModulesToSave<Scalar>*>> Sequential<Scalar>::saved_modules() const {
  std::vector<std::pair<std::string, const ModulesToSave<Scalar>*>> out;
  for (const auto& [path, m] : named_modules())
    if (auto* s = dynamic_cast<const ModulesToSave<Scalar>*>(m)) out.emplace_back(path, s);
  return out;
}

template <class Scalar>
LoraModelView<Scalar> Sequential<Scalar>::lora_view(const char* where) {
  LoraModelView<Scalar> view;
  for (const auto& [path, layer] : lora_layers()) view.lora_modules.push_back({path, layer});
  for (const auto& [path, layer] : lora_embeddings()) view.embedding_modules.push_back({path, layer});
  if (view.lora_modules.empty() && view.embedding_modules.empty()) detail::fail(where, "the model has no LoRA layer");
  return view;
}

template <class Scalar>
void Sequential<Scalar>::merge() {
  merge_adapters(lora_view("Sequential::merge"), "Sequential::merge");
}

template <class Scalar>
void Sequential<Scalar>::unmerge() {
  constexpr const char* where = "Sequential::unmerge";
  const LoraModelView<Scalar> view = lora_view(where);
  if (!merged()) detail::fail(where, "the model is not merged");
  unmerge_adapters(view, where);
}

template <class Scalar>
bool Sequential<Scalar>::merged() const {
  for (const auto& [path, layer] : lora_layers())
    if (layer->merged()) return true;
  for (const auto& [path, layer] : lora_embeddings())
    if (layer->merged()) return true;
  return false;
}

template <class Scalar>
std::vector<std::string> Sequential<Scalar>::base_tensor_names() const {
  std::vector<std::string> names;
  for (const auto& [path, entry] : named_modules()) {
    bool has_bias = false;
    const Module<Scalar>* m = entry;
    if (auto* s = dynamic_cast<const ModulesToSave<Scalar>*>(m)) m = &s->original();
    if (auto* l = dynamic_cast<const Linear<Scalar>*>(m))
      has_bias = l->has_bias();
    else if (auto* q = dynamic_cast<const LoraLayer<Scalar>*>(m))
      has_bias = q->lora().has_bias();
    else if (dynamic_cast<const LayerNorm<Scalar>*>(m))
      has_bias = true;
    else if (!dynamic_cast<const RMSNorm<Scalar>*>(m) && !dynamic_cast<const Embedding<Scalar>*>(m))
      continue;
    names.push_back(path + ".weight");
    if (has_bias) names.push_back(path + ".bias");
  }
  return names;
}

template <class Scalar>
typename Sequential<Scalar>::MatrixType Sequential<Scalar>::base_tensor(const std::string& name) const {
  constexpr const char* where = "Sequential::base_tensor";
  for (const auto& [path, m] : named_modules()) {
    const bool is_weight = name == path + ".weight", is_bias = name == path + ".bias";
    if (!is_weight && !is_bias) continue;
    const Module<Scalar>* module = m;
    if (auto* s = dynamic_cast<const ModulesToSave<Scalar>*>(m)) module = &s->original();
    if (auto* l = dynamic_cast<const Linear<Scalar>*>(module)) {
      if (is_weight) return l->weight_values();
      if (l->has_bias()) return l->bias();
    } else if (auto* q = dynamic_cast<const LoraLayer<Scalar>*>(module)) {
      if (q->lora().merged()) detail::fail(where, "'", path, "' is merged; unmerge() to read the base weight");
      if (is_weight) {  // dense values of any kind of base (a quantized one dequantized)
        MatrixType W(q->out_features(), q->in_features());
        q->lora().base().dense_rows(0, q->out_features(), W.data());
        return W;
      }
      if (q->lora().has_bias()) return q->lora().bias();
    } else if (auto* e = dynamic_cast<const Embedding<Scalar>*>(module)) {
      if (e->merged()) detail::fail(where, "'", path, "' is merged; unmerge() to read the base table");
      if (is_weight) return e->weight();
    } else if (auto* n = dynamic_cast<const LayerNorm<Scalar>*>(module)) {
      return is_weight ? MatrixType(n->weight()) : MatrixType(n->bias());
    } else if (auto* r = dynamic_cast<const RMSNorm<Scalar>*>(module)) {
      if (is_weight) return r->weight();
    }
  }
  std::string known;
  for (const std::string& n : base_tensor_names()) known += (known.empty() ? "" : ", ") + n;
  detail::fail(where, "no base tensor named '", name, "'; the model has: ", known.empty() ? "none" : known);
}

namespace detail_sequential {
// A vector parameter from a row or a column of values, checked (shape, finite).
template <class Scalar>
void set_vector(ParamRef<Scalar> target, const Eigen::Ref<const Matrix<Scalar>>& value) {
  if (value.rows() != 1 && value.cols() != 1)
    lora::detail::fail("set_vector", "expected a vector of ", target.rows(), " values, got ", lora::detail::shape_of(value));
  if (value.size() != target.rows())
    lora::detail::fail("set_vector", "expected ", target.rows(), " values, got ", value.size());
  if (!value.allFinite()) lora::detail::fail("set_vector", "the values contain NaN or Inf");
  if (value.cols() == 1)
    target = value;
  else
    target = value.transpose();
}
}  // namespace detail_sequential

template <class Scalar>
void Sequential<Scalar>::set_base_tensor(const std::string& name, const Eigen::Ref<const MatrixType>& value) {
  constexpr const char* where = "Sequential::set_base_tensor";
  for (const auto& [path, m] : named_modules()) {
    const bool is_weight = name == path + ".weight", is_bias = name == path + ".bias";
    if (!is_weight && !is_bias) continue;
    Module<Scalar>* module = m;
    if (auto* s = dynamic_cast<ModulesToSave<Scalar>*>(m)) module = &s->original();
    try {
      if (auto* l = dynamic_cast<Linear<Scalar>*>(module)) {
        if (is_weight) return l->set_weight(value);
        if (l->has_bias()) return l->set_bias(value);
      } else if (auto* q = dynamic_cast<LoraLayer<Scalar>*>(module)) {
        if (is_weight) return q->set_base_weight(value);
        if (q->lora().has_bias()) return q->set_base_bias(value);
      } else if (auto* e = dynamic_cast<Embedding<Scalar>*>(module)) {
        if (is_weight) return e->set_weight(value);
      } else if (auto* n = dynamic_cast<LayerNorm<Scalar>*>(module)) {
        return detail_sequential::set_vector<Scalar>(is_weight ? n->weight() : n->bias(), value);
      } else if (auto* r = dynamic_cast<RMSNorm<Scalar>*>(module)) {
        if (is_weight) return detail_sequential::set_vector<Scalar>(r->weight(), value);
      }
    } catch (const std::invalid_argument& e) {
      detail::fail(where, name, ": ", e.what());
    }
  }
  std::string known;
  for (const std::string& n : base_tensor_names()) known += (known.empty() ? "" : ", ") + n;
  detail::fail(where, "no base tensor named '", name, "'; the model has: ", known.empty() ? "none" : known);
}

}  // namespace lora::nn
