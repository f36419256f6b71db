// lora.hpp: mixed-adapter batches: each row of a batch names its own adapter (or the bare base).
//
//   Y = X W0^T + b, then for each adapter a named by some rows R_a:  Y[R_a] += s_a (X[R_a] A_a^T) B_a^T
//
// The base product runs once for the whole batch; rows that share an adapter are gathered and
// multiplied together (a contiguous run of rows is used in place, without a copy). Inference only:
// dropout is off, nothing is kept for backward, and the layer must be unmerged. s_a includes the
// adapter's runtime scale. Which adapters are active does not matter: the rows decide.
#pragma once

#include <lora/common.hpp>
#include <lora/linear.hpp>

#include <map>
#include <string>
#include <vector>

namespace lora {

// The grouping of a batch's rows by adapter, computed once and reused for every layer of a model.
class MixedBatchPlan {
 public:
  // The row name that means "no adapter" (PEFT's adapter_names uses the same); "" means it too.
  static constexpr const char* base_name = "__base__";

  struct Group {
    std::string adapter;
    std::vector<Index> rows;  // increasing
    bool contiguous = false;  // rows == first, first + 1, ...
  };

  MixedBatchPlan() = default;
  explicit MixedBatchPlan(const std::vector<std::string>& row_adapters) : rows_(static_cast<Index>(row_adapters.size())) {
    std::map<std::string, std::size_t> index;
    for (std::size_t i = 0; i < row_adapters.size(); ++i) {
      const std::string& name = row_adapters[i];
      if (name.empty() || name == base_name) continue;
      auto it = index.find(name);
      if (it == index.end()) {
        it = index.emplace(name, groups_.size()).first;
        groups_.push_back({name, {}, false});
      }
      groups_[it->second].rows.push_back(static_cast<Index>(i));
    }
    for (Group& g : groups_) g.contiguous = g.rows.back() - g.rows.front() + 1 == static_cast<Index>(g.rows.size());
  }

  Index rows() const { return rows_; }
  const std::vector<Group>& groups() const { return groups_; }  // adapters in order of first appearance

 private:
  Index rows_ = 0;
  std::vector<Group> groups_;
};

// Workspaces for mixed-batch forwards; one object can serve every layer of a model (the output is valid
// until the next call).
template <class Scalar>
class MixedBatchForward {
  static_assert(is_supported_scalar_v<Scalar>, "MixedBatchForward supports float and double only");

 public:
  using MatrixType = Matrix<Scalar>;

  // What to do with a row whose adapter the layer does not have.
  enum class Missing {
    error,  // throw (a misspelt name must not silently give base outputs)
    base,   // use the base for those rows: in a model, layers an adapter does not target
  };

  // requires: X is [n x in] with n = plan.rows(); the layer is unmerged.
  // ensures:  returns Y [n x out], row i computed with the adapter plan names for it.
  template <class Derived>
  const MatrixType& forward(const LoraLinear<Scalar>& layer, const Eigen::MatrixBase<Derived>& X,
                            const MixedBatchPlan& plan, Missing missing = Missing::error) {
    static_assert(std::is_same_v<typename Derived::Scalar, Scalar>,
                  "MixedBatchForward::forward: the input's Scalar must match the layer's; cast it first.");
    constexpr const char* where = "MixedBatchForward::forward";
    detail::require_cols(where, "input", X, layer.in_features(), "in_features");
    if (X.rows() != plan.rows())
      detail::fail(where, "input has ", X.rows(), " rows, the plan names adapters for ", plan.rows());
    if (layer.merged()) detail::fail(where, "the layer is merged; unmerge it for per-row adapters");
    if (missing == Missing::error)
      for (const auto& g : plan.groups())
        if (!layer.has_adapter(g.adapter)) detail::fail(where, "the layer has no adapter named '", g.adapter, "'");

    Y_.resize(X.rows(), layer.out_features());
    Y_.noalias() = X * layer.base_weight().transpose();
    if (layer.has_bias()) Y_.rowwise() += layer.bias().transpose();
    for (const auto& g : plan.groups()) {
      if (!layer.has_adapter(g.adapter)) continue;
      const auto A = layer.A(g.adapter);
      const MatrixType& B = layer.B(g.adapter);
      const Scalar s = static_cast<Scalar>(layer.scaling(g.adapter) * layer.adapter_scale(g.adapter));
      const Index n = static_cast<Index>(g.rows.size());
      T_.resize(n, A.rows());
      if (g.contiguous) {
        T_.noalias() = X.middleRows(g.rows.front(), n) * A.transpose();
        Y_.middleRows(g.rows.front(), n).noalias() += (s * T_) * B.transpose();
      } else {
        Xg_.resize(n, layer.in_features());
        for (Index i = 0; i < n; ++i) Xg_.row(i) = X.row(g.rows[static_cast<std::size_t>(i)]);
        T_.noalias() = Xg_ * A.transpose();
        U_.resize(n, layer.out_features());
        U_.noalias() = (s * T_) * B.transpose();
        for (Index i = 0; i < n; ++i) Y_.row(g.rows[static_cast<std::size_t>(i)]) += U_.row(i);
      }
    }
    return Y_;
  }

  template <class Derived>
  const MatrixType& forward(const LoraLinear<Scalar>& layer, const Eigen::MatrixBase<Derived>& X,
                            const std::vector<std::string>& row_adapters, Missing missing = Missing::error) {
    plan_ = MixedBatchPlan(row_adapters);
    return forward(layer, X, plan_, missing);
  }

 private:
  MatrixType Y_, Xg_, T_, U_;
  MixedBatchPlan plan_;
};

}  // namespace lora
