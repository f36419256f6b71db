// lora.hpp: Module, the small interface every building block of a model implements.
#pragma once

#include <lora/common.hpp>
#include <lora/parameter.hpp>

#include <memory>
#include <string>

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
//   ensures:  returns dX = dL/dX (assigned, valid until the next backward()); accumulates (+=) into the
//             gradients of the trainable parameters. zero_grad() clears them.
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

  // A deep copy: parameters, gradients, trainability and mode.
  virtual std::unique_ptr<Module> clone() const = 0;

 protected:
  Module(const Module&) = default;
  Module& operator=(const Module&) = default;

  bool training_ = true;
};

}  // namespace lora::nn
