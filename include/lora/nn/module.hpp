// lora.hpp: Module, the small interface every building block of a model implements.
#pragma once

#include <lora/common.hpp>
#include <lora/parameter.hpp>
#include <lora/transient.hpp>

#include <cstddef>
#include <memory>
#include <string>
#include <typeinfo>

namespace lora::nn {

template <class Scalar>
class InferenceContext;

// One step of a model: forward, backward, its trainable parameters under dotted names.
//
// forward(X)
//   requires: X is [n x in_features()], n >= 1 (modules without a fixed width accept any).
//   ensures:  returns Y [n x out_features()], a reference to the module's own buffer, valid until the
//             next forward(). In training mode the module keeps what backward() needs.
// backward(dY)
//   requires: dY = dL/dY, shaped like the output of the most recent forward(), which ran in training mode.
//   ensures:  returns dX = dL/dX (assigned, valid until the module's next forward() or backward());
//             accumulates (+=) into the gradients of the trainable parameters. zero_grad() clears them.
//   Once per training forward(), as in PyTorch: a module may write dX over what its forward() kept
//   (GELU, Dropout with p > 0, LayerNorm, RMSNorm and a Linear whose weight trains do, so no buffer
//   lives only for the gradient; it drops that cache), and then a second backward() throws until the next
//   forward().
// After share_transient_buffers(other), "the next forward()" / "backward()" above is that of this module
// or of any module sharing its buffers.
template <class Scalar>
class Module {
  static_assert(is_supported_scalar_v<Scalar>, "lora::nn modules support float and double only.");

 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;
  // Row-major inputs and row blocks of them bind without a copy; other expressions are evaluated first.
  using Input = Eigen::Ref<const MatrixType>;

  Module() = default;
  virtual ~Module() = default;

  virtual const MatrixType& forward(const Input& X) = 0;
  // infer(X, ctx)
  //   requires: X as for forward().
  //   ensures:  returns what forward() returns in eval mode, in a buffer of `ctx` (valid until ctx's next
  //             use), without changing the module: const, so threads with a context each may run one model
  //             at once. The context also says which adapters LoRA layers apply (nn/inference.hpp).
  virtual const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const {
    (void)X;
    (void)ctx;
    detail::fail("Module::infer", type_name(), " has no const inference path");
  }
  virtual const MatrixType& backward(const Input& dY) = 0;
  virtual void zero_grad() {}

  virtual void train(bool on = true) { training_ = on; }
  void eval() { train(false); }
  bool training() const { return training_; }

  // Freezes (false) or unfreezes (true) every tensor of this module that can train, children included:
  // PyTorch's requires_grad_(on). A LoRA layer's frozen base W0 never trains. Parameter lists made before
  // a change are stale: an optimiser step with one throws.
  virtual void set_requires_grad(bool /*on*/) {}

  // Appends the trainable parameters as "<prefix><name>" (prefix ends with '.', or is empty).
  virtual void collect_parameters(ParameterList<Scalar>& /*out*/, const std::string& /*prefix*/) {}
  // All parameters (frozen and trainable), and the trainable ones.
  virtual Index num_parameters() const { return 0; }
  virtual Index num_trainable_parameters() const { return 0; }

  // Widths, or -1 for modules that keep the width of their input (activations).
  virtual Index in_features() const { return -1; }
  virtual Index out_features() const { return -1; }

  // "Linear", "ReLU", ...; and a one-line description with the shapes.
  virtual std::string type_name() const = 0;
  virtual std::string describe() const { return type_name(); }

  // A deep copy: parameters, gradients, trainability and mode (not the sharing of transient buffers).
  virtual std::unique_ptr<Module> clone() const = 0;

  // share_transient_buffers(other)
  //   ensures: this module uses other's transient buffers (TransientBuffers: its output, its input
  //            gradient, staging copies; not what forward keeps for backward), and so does each child with
  //            the child of `other` at the same index and name, wherever the two are of the same type and
  //            widths (elsewhere nothing changes). other = nullptr gives this module and its children sets
  //            of their own again. Returns how many modules share (or were unshared).
  //   Afterwards a result of either module is valid only until the next call of the same kind (forward,
  //   backward) of either: share between modules that never run at the same time and whose results are
  //   read before the other one runs, such as the corresponding modules of identical stacked layers
  //   (BertForSequenceClassification does it for its encoder layers). A module whose backward() reads a
  //   child's forward output does not share that child's buffers (attention's query, key and value).
  virtual std::size_t share_transient_buffers(Module* other) {
    if (other == this) return 0;
    if (other && (typeid(*other) != typeid(*this) || other->in_features() != in_features() ||
                  other->out_features() != out_features()))
      return 0;
    std::size_t shared = share_own_buffers(other) ? 1 : 0;
    const std::size_t n = num_children();
    if (other && other->num_children() != n) return shared;
    for (std::size_t i = 0; i < n; ++i) {
      if (other && other->child_name(i) != child_name(i)) continue;
      shared += child(i).share_transient_buffers(other ? &other->child(i) : nullptr);
    }
    return shared;
  }

 protected:
  // backward() with no training forward() cached for it: none ran, or backward() already ran for it.
  // This module's own transient buffers (not its children's), shared with those of `other` (of this
  // module's dynamic type: share_transient_buffers checked it) or, for nullptr, unshared. Returns false
  // for a module that has none.
  virtual bool share_own_buffers(Module* other) {
    (void)other;
    return false;
  }
  [[noreturn]] static void fail_no_cached_forward(const char* where) {
    detail::fail(where, "no cached forward: call forward() in training mode (train()) first, once per backward() "
                        "(if backward() already ran for the last forward(), its cache now holds dX)");
  }

 protected:
  [[noreturn]] void no_child(const char* where, std::size_t i) const {
    detail::fail(where, type_name(), " has ", num_children(), " children; there is no child ", i);
  }
  // The checks every replace_child makes: index in range, non-null, same widths as the old child.
  void check_replacement(const char* where, std::size_t i, const Module* module) const {
    if (i >= num_children()) no_child(where, i);
    if (!module) detail::fail(where, "the replacement for '", child_name(i), "' is null");
    const Module& old = child(i);
    if (old.in_features() != module->in_features() || old.out_features() != module->out_features())
      detail::fail(where, "the replacement for '", child_name(i), "' (", old.describe(), ") is ",
                   module->describe(), ", ", module->in_features(), " -> ", module->out_features(), ", expected ",
                   old.in_features(), " -> ", old.out_features());
  }

 public:
  // ---- children ------------------------------------------------------------------------------------
  // A module may own child modules under names (no '.'), which make the dotted paths of the model tree:
  // Sequential's "0", "1", ..., attention's "query", "key", "value", "dense". Containers walk them to
  // list, find and replace modules (Sequential::named_modules, inject_lora). A leaf has none.
  virtual std::size_t num_children() const { return 0; }
  // requires: i < num_children() (throws otherwise).
  virtual std::string child_name(std::size_t i) const {
    no_child("Module::child_name", i);
    return {};  // not reached
  }
  virtual Module& child(std::size_t i) { no_child("Module::child", i); }
  virtual const Module& child(std::size_t i) const { no_child("Module::child", i); }
  // Puts `module` (non-null, same widths as the child) in place of child i, in this module's training
  // mode, and returns the old child. Throws and changes nothing on bad input.
  virtual std::unique_ptr<Module> replace_child(std::size_t i, std::unique_ptr<Module> module) {
    (void)module;
    no_child("Module::replace_child", i);
  }

 protected:
  Module(const Module&) = default;
  Module& operator=(const Module&) = default;

  bool training_ = true;
};

}  // namespace lora::nn
