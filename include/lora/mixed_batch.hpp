// lora.hpp: mixed-adapter batches: each row of a batch names its own adapter (or the bare base).
//
//   Y = X W0^T + b, then for each adapter a named by some rows R_a:  Y[R_a] += s_a (X[R_a] A_a^T) B_a^T
//
// The base product runs once for the whole batch (threaded by Eigen); rows that share an adapter are
// gathered and multiplied together (a contiguous run of rows is used in place, without a copy). With
// OpenMP and enough adapter work, the groups run in parallel, each single-threaded inside, on
// per-thread workspaces sized before the parallel loop. Inference only:
// dropout is off, nothing is kept for backward, and the layer must be unmerged. s_a includes the
// adapter's runtime scale. Which adapters are active does not matter: the rows decide.
#pragma once

#include <lora/common.hpp>
#include <lora/linear.hpp>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

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
// until the next call). The layer is only read: threads that each own a MixedBatchForward may run mixed
// batches on one shared layer at once.
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

    // X is kept in the workspace (groups gather its rows), then the base product for the whole batch.
    const Index in = layer.in_features(), out = layer.out_features();
    detail::resize_workspace(X_, X.rows(), in);
    X_ = X;
    layer.infer(X_, main_, no_adapters_);
    Y_.swap(main_.output);  // the result lives here until the next call; main_ gets it back then

    // Size every workspace for the largest group first: nothing allocates inside the parallel loop.
    const auto& groups = plan.groups();
    Index max_rows = 0, max_rank = 0;
    double work = 0;  // multiply-adds of the adapter terms
    for (const auto& g : groups) {
      if (!layer.has_adapter(g.adapter)) continue;
      const auto n = static_cast<Index>(g.rows.size());
      max_rows = std::max(max_rows, n);
      max_rank = std::max<Index>(max_rank, layer.rank(g.adapter));
      work += static_cast<double>(n) * layer.rank(g.adapter) * static_cast<double>(in + out);
    }
    const int threads = std::max(1, std::min(detail::threads_for(work), static_cast<int>(groups.size())));
    if (static_cast<int>(work_.size()) < threads) work_.resize(static_cast<std::size_t>(threads));
    const Index pack = std::max(detail::kernel::panel_size<Scalar>(max_rank, out), detail::kernel::columns_pack_size<Scalar>());
    for (int t = 0; t < threads; ++t) {
      Workspace& w = work_[static_cast<std::size_t>(t)];
      detail::resize_workspace(w.X, max_rows, in);
      detail::resize_workspace(w.T, max_rows, max_rank);
      detail::resize_workspace(w.U, max_rows, out);
      detail::resize_workspace(w.sBt, max_rank, out);
      if (w.pack.size() < pack) w.pack.resize(pack);
    }
    const int count = static_cast<int>(groups.size());
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (threads > 1)
#endif
    for (int i = 0; i < count; ++i) {
#ifdef _OPENMP
      Workspace& w = work_[static_cast<std::size_t>(omp_get_thread_num())];
#else
      Workspace& w = work_.front();
#endif
      add_group(layer, groups[static_cast<std::size_t>(i)], w);
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
  struct Workspace {
    MatrixType X, T, U, sBt;
    detail::PackBuffer<Scalar> pack;
  };

  // Y[rows] += s (X[rows] A^T) B^T with the rank-r kernels, single-threaded (inside the group loop).
  void add_group(const LoraLinear<Scalar>& layer, const MixedBatchPlan::Group& g, Workspace& w) {
    if (!layer.has_adapter(g.adapter)) return;
    const auto A = layer.A(g.adapter);
    const auto B = layer.B(g.adapter);
    const Scalar s = static_cast<Scalar>(layer.scaling(g.adapter) * layer.adapter_scale(g.adapter));
    const Index n = static_cast<Index>(g.rows.size()), r = A.rows(), in = A.cols(), out = B.rows();
    w.sBt.topRows(r) = s * B.transpose();
    const Scalar* x = X_.data() + g.rows.front() * in;
    if (!g.contiguous) {
      for (Index i = 0; i < n; ++i) w.X.row(i) = X_.row(g.rows[static_cast<std::size_t>(i)]);
      x = w.X.data();
    }
    detail::kernel::row_dots_block(in, x, in, A.data(), in, w.T.data(), w.T.cols(), Scalar(1), 0, n, 0, r);  // T = X_g A^T
    Scalar* target = g.contiguous ? Y_.data() + g.rows.front() * out : w.U.data();
    auto update = detail::in_place_update(n, out, r, w.T.data(), w.T.cols(), Index(1), w.sBt.data(), out, target, out);
    if (!g.contiguous) update.base = nullptr;
    detail::kernel::rank_update_columns<false>(update, w.pack.data(), 0, out);
    if (!g.contiguous)
      for (Index i = 0; i < n; ++i) Y_.row(g.rows[static_cast<std::size_t>(i)]) += w.U.row(i);
  }

  MatrixType X_, Y_;
  InferenceWorkspace<Scalar> main_;
  std::vector<std::string> no_adapters_;  // always empty: the base product alone
  std::vector<Workspace> work_;
  MixedBatchPlan plan_;
};

}  // namespace lora
