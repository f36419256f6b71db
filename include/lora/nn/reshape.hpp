// lora.hpp: Flatten, PyTorch's nn.Flatten() (start_dim = 1) in this library's token-row layout.
//
// A batch of n samples with g tokens of c features each is [n*g x c] here (row i*g + j is token j of
// sample i, as Embedding and TokenBatch lay them out); PyTorch holds it as [n, g, c] and nn.Flatten makes
// it [n, g*c]. Flatten(g, c) does the same: output row i is rows i*g .. i*g + g - 1 of the input side by
// side, column j*c + k of row i being input (i*g + j, k). backward() undoes the move; it has no parameters.
#pragma once

#include <lora/common.hpp>
#include <lora/nn/inference.hpp>
#include <lora/nn/module.hpp>

#include <memory>
#include <string>

namespace lora::nn {

template <class Scalar>
class Flatten final : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::Input;

  // group: the rows that make one output row (g, the tokens of a sample); features: their width (c).
  Flatten(Index group, Index features) : group_(group), features_(features) {
    if (group < 1 || features < 1)
      detail::fail("Flatten::Flatten", "group and features must be >= 1, got ", group, " and ", features);
  }

  // forward(X)
  //   requires: X [n*g x c], n >= 1 (an error names the rows and g otherwise).
  //   ensures:  returns Y [n x g*c] (own buffer); in training mode keeps n for backward().
  const MatrixType& forward(const Input& X) override {
    const Input x = lora::detail::unaliased<Scalar>(X, output_, staging_);
    flatten("Flatten::forward", x, output_);
    cached_rows_ = this->training_ ? output_.rows() : -1;
    return output_;
  }
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override {
    ModuleWorkspace<Scalar>& ws = ctx.next_workspace();
    const Input x = lora::detail::unaliased<Scalar>(X, ws.output, ws.staging);
    flatten("Flatten::infer", x, ws.output);
    return ws.output;
  }
  // backward(dY)
  //   requires: dY [n x g*c] for the n rows of the last forward, which ran in training mode.
  //   ensures:  returns dX [n*g x c], dY's rows cut back into token rows (assigned).
  const MatrixType& backward(const Input& dY) override {
    constexpr const char* where = "Flatten::backward";
    if (cached_rows_ < 0) this->fail_no_cached_forward(where);
    detail::require_shape(where, "grad_output", dY, cached_rows_, group_ * features_);
    detail::resize_workspace(grad_input_, cached_rows_ * group_, features_);
    for (Index i = 0; i < dY.rows(); ++i)
      for (Index j = 0; j < group_; ++j) grad_input_.row(i * group_ + j) = dY.row(i).segment(j * features_, features_);
    return grad_input_;
  }

  Index group() const { return group_; }
  Index in_features() const override { return features_; }
  Index out_features() const override { return group_ * features_; }
  std::string type_name() const override { return "Flatten"; }
  std::string describe() const override {
    return detail::concat("Flatten(", group_, " rows of ", features_, " -> 1 row of ", group_ * features_, ")");
  }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<Flatten>(*this); }

 private:
  void flatten(const char* where, const Input& x, MatrixType& out) const {
    detail::require_cols(where, "input", x, features_, "features");
    if (x.rows() == 0 || x.rows() % group_ != 0)
      detail::fail(where, "input has ", x.rows(), " rows, expected a positive multiple of group = ", group_);
    const Index n = x.rows() / group_;
    detail::resize_workspace(out, n, group_ * features_);
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < group_; ++j) out.row(i).segment(j * features_, features_) = x.row(i * group_ + j);
  }

  Index group_, features_;
  Index cached_rows_ = -1;
  MatrixType output_, grad_input_, staging_;
};

using Flattenf = Flatten<float>;
using Flattend = Flatten<double>;

}  // namespace lora::nn
