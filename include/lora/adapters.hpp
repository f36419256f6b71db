// lora.hpp: several adapters on one model: a view of the model's LoRA layers, operations over all of
// them (add, activate, scale, disable, delete, merge, hot-swap), and combining adapters into a new one.
//
// A view may also hold Embedding modules with LoRA (PEFT's lora.Embedding). Such a module has one adapter,
// always active: merge, unmerge, the adapter lists and the adapter files include it; the operations that
// would give it a second adapter, remove, switch, scale or combine its adapter are refused, naming it.
//
// Combining (add_weighted_adapter) builds an adapter whose delta is sum_i w_i s_i B_i A_i, where
// s_i = alpha_i / r_i (or alpha_i / sqrt(r_i)) is adapter i's scaling, without its runtime scale:
//   cat: exact. A = [A_1; A_2; ...] (copied), B = [w_1 s_1 B_1, w_2 s_2 B_2, ...], rank = sum r_i.
//   svd: the same sum truncated to a chosen rank k by its singular value decomposition (the best rank-k
//        approximation in the Frobenius norm); exact when k >= the rank of the sum. Computed in double
//        from thin QR factors of the stacked B and A, so the out x in delta is never formed.
// The new adapter's scaling is 1 (alpha = rank, no rsLoRA). PEFT's "linear" mode is deliberately not
// offered: it sums the A's and the B's separately, and (sum_i B_i)(sum_j A_j) contains the cross terms
// B_i A_j (i != j), so it is not the weighted sum of the deltas.
#pragma once

#include <lora/common.hpp>
#include <lora/config.hpp>
#include <lora/linear.hpp>
#include <lora/nn/embedding.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace lora {

// A LoRA layer of a model, under its module path ("encoder.layers.0.attn.q_proj").
template <class Scalar>
struct LoraModuleRef {
  std::string path;
  LoraLinear<Scalar>* layer = nullptr;
};

// An Embedding with a LoRA adapter, under its module path ("model.embed_tokens").
template <class Scalar>
struct LoraEmbeddingRef {
  std::string path;
  nn::Embedding<Scalar>* layer = nullptr;
};

// A module trained in full alongside the adapter (PEFT's modules_to_save, typically a classifier head):
// checked views of its weight [out x in] and, if it has one, its bias [out x 1].
template <class Scalar>
struct SavedModuleRef {
  std::string path;
  ParamRef<Scalar> weight;
  std::optional<ParamRef<Scalar>> bias;
};

// What the multi-adapter functions and the adapter files need from a model. The pointers are not
// owned and must outlive the calls that use them; a model class builds this view on request.
template <class Scalar>
struct LoraModelView {
  std::vector<LoraModuleRef<Scalar>> lora_modules;
  std::vector<SavedModuleRef<Scalar>> saved_modules;
  std::vector<LoraEmbeddingRef<Scalar>> embedding_modules;  // each with an adapter (has_lora())

  // Throws std::invalid_argument for null pointers, empty or repeated paths and embeddings without an adapter.
  void validate(const char* where) const {
    std::set<std::string> seen;
    for (const auto& m : lora_modules) {
      if (m.path.empty()) detail::fail(where, "a LoRA module has an empty path");
      if (!m.layer) detail::fail(where, "LoRA module '", m.path, "' has a null layer");
      if (!seen.insert(m.path).second) detail::fail(where, "module path '", m.path, "' appears twice");
    }
    for (const auto& m : embedding_modules) {
      if (m.path.empty()) detail::fail(where, "a LoRA embedding has an empty path");
      if (!m.layer) detail::fail(where, "LoRA embedding '", m.path, "' has a null layer");
      if (!m.layer->has_lora()) detail::fail(where, "embedding '", m.path, "' has no LoRA adapter");
      if (!seen.insert(m.path).second) detail::fail(where, "module path '", m.path, "' appears twice");
    }
    for (const auto& m : saved_modules) {
      if (m.path.empty()) detail::fail(where, "a saved module has an empty path");
      if (m.bias && m.bias->size() != m.weight.rows())
        detail::fail(where, "saved module '", m.path, "': bias has ", m.bias->size(), " entries, weight has ",
                     m.weight.rows(), " rows");
      if (!seen.insert(m.path).second) detail::fail(where, "module path '", m.path, "' appears twice");
    }
  }
};

// ---- operations over every LoRA layer of a model ---------------------------------------------------

// Adapter names present in at least one layer, in first-seen order.
template <class Scalar>
std::vector<std::string> adapter_names(const LoraModelView<Scalar>& model) {
  std::vector<std::string> names;
  for (const auto& m : model.lora_modules)
    for (const std::string& n : m.layer->adapter_names())
      if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
  for (const auto& e : model.embedding_modules)
    if (std::find(names.begin(), names.end(), e.layer->adapter_name()) == names.end())
      names.push_back(e.layer->adapter_name());
  return names;
}

template <class Scalar>
std::vector<std::string> active_adapters(const LoraModelView<Scalar>& model) {
  std::vector<std::string> names;
  for (const auto& m : model.lora_modules)
    for (const std::string& n : m.layer->active_adapters())
      if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
  for (const auto& e : model.embedding_modules)  // always active
    if (std::find(names.begin(), names.end(), e.layer->adapter_name()) == names.end())
      names.push_back(e.layer->adapter_name());
  return names;
}

namespace detail {
template <class Scalar>
void require_known_adapter(const char* where, const LoraModelView<Scalar>& model, const std::string& name) {
  for (const auto& m : model.lora_modules)
    if (m.layer->has_adapter(name)) return;
  for (const auto& e : model.embedding_modules)
    if (e.layer->adapter_name() == name) return;
  std::string known;
  for (const std::string& n : adapter_names(model)) known += (known.empty() ? "'" : ", '") + n + "'";
  fail(where, "no module has an adapter named '", name, "'; the model has ", known.empty() ? "none" : known);
}
template <class Scalar>
void require_unmerged(const char* where, const LoraModelView<Scalar>& model) {
  for (const auto& m : model.lora_modules)
    if (m.layer->merged()) fail(where, "module '", m.path, "' is merged; call unmerge_adapters() first");
  for (const auto& e : model.embedding_modules)
    if (e.layer->merged()) fail(where, "module '", e.path, "' (Embedding) is merged; call unmerge_adapters() first");
}
// Refuses `what` on the Embedding adapters it would touch: all of them (name empty) or those named `name`.
template <class Scalar>
void refuse_on_embeddings(const char* where, const LoraModelView<Scalar>& model, const char* what,
                          const std::string& name = {}) {
  for (const auto& e : model.embedding_modules)
    if (name.empty() || e.layer->adapter_name() == name)
      fail(where, "module '", e.path, "' is an Embedding with LoRA adapter '", e.layer->adapter_name(),
           "'; an Embedding holds one adapter, always active, so ", what, " is not supported for it");
}
}  // namespace detail

// Adds an inactive adapter to every LoRA layer (all or none: on a throw, none is added).
template <class Scalar>
void add_adapter(const LoraModelView<Scalar>& model, const std::string& name, const LoraConfig& config) {
  constexpr const char* where = "add_adapter";
  model.validate(where);
  detail::refuse_on_embeddings(where, model, detail::concat("a second adapter ('", name, "')").c_str());
  detail::require_unmerged(where, model);
  std::size_t done = 0;
  try {
    for (; done < model.lora_modules.size(); ++done) model.lora_modules[done].layer->add_adapter(name, config);
  } catch (...) {
    for (std::size_t i = 0; i < done; ++i) model.lora_modules[i].layer->delete_adapter(name);
    throw;
  }
}

// Removes the adapter from every layer that has it.
template <class Scalar>
void delete_adapter(const LoraModelView<Scalar>& model, const std::string& name) {
  constexpr const char* where = "delete_adapter";
  model.validate(where);
  detail::require_known_adapter(where, model, name);
  detail::refuse_on_embeddings(where, model, "deleting its adapter", name);
  detail::require_unmerged(where, model);
  for (const auto& m : model.lora_modules)
    if (m.layer->has_adapter(name)) m.layer->delete_adapter(name);
}

// Makes exactly these adapters active (their deltas sum) in every layer that has them; an empty list
// leaves the base model. Every name must exist in at least one layer.
template <class Scalar>
void set_active_adapters(const LoraModelView<Scalar>& model, const std::vector<std::string>& names) {
  constexpr const char* where = "set_active_adapters";
  model.validate(where);
  for (const std::string& n : names) detail::require_known_adapter(where, model, n);
  for (const auto& e : model.embedding_modules)
    if (std::find(names.begin(), names.end(), e.layer->adapter_name()) == names.end())
      detail::refuse_on_embeddings(where, model, "deactivating its adapter", e.layer->adapter_name());
  detail::require_unmerged(where, model);
  for (const auto& m : model.lora_modules) {
    std::vector<std::string> here;
    for (const std::string& n : names)
      if (m.layer->has_adapter(n)) here.push_back(n);
    m.layer->set_active_adapters(here);
  }
}

// The runtime multiplier of one adapter in every layer that has it (kept apart from alpha / r).
template <class Scalar>
void set_adapter_scale(const LoraModelView<Scalar>& model, const std::string& name, double scale) {
  constexpr const char* where = "set_adapter_scale";
  model.validate(where);
  detail::require_known_adapter(where, model, name);
  detail::refuse_on_embeddings(where, model, "a runtime scale", name);
  for (const auto& m : model.lora_modules)
    if (m.layer->has_adapter(name)) m.layer->set_adapter_scale(name, scale);
}

// Each layer's active adapters, as returned by disable_adapters() and taken by enable_adapters().
using ActiveAdapterState = std::vector<std::vector<std::string>>;

// Base model only; returns what was active so that enable_adapters() can restore it.
template <class Scalar>
ActiveAdapterState disable_adapters(const LoraModelView<Scalar>& model) {
  constexpr const char* where = "disable_adapters";
  model.validate(where);
  detail::refuse_on_embeddings(where, model, "disabling its adapter");
  detail::require_unmerged(where, model);
  ActiveAdapterState state;
  for (const auto& m : model.lora_modules) state.push_back(m.layer->active_adapters());
  for (const auto& m : model.lora_modules) m.layer->set_active_adapters({});
  return state;
}

template <class Scalar>
void enable_adapters(const LoraModelView<Scalar>& model, const ActiveAdapterState& state) {
  constexpr const char* where = "enable_adapters";
  model.validate(where);
  if (state.size() != model.lora_modules.size())
    detail::fail(where, "the state has ", state.size(), " layers, the model ", model.lora_modules.size());
  detail::require_unmerged(where, model);
  for (std::size_t i = 0; i < state.size(); ++i) model.lora_modules[i].layer->set_active_adapters(state[i]);
}

// Merges the active adapters of every layer that has any (layers without an active adapter stay as they
// are), and the adapter of every embedding. All or none, exactly: every layer is checked and its merge
// prepared (allocations included) before any layer changes, so on a throw (naming the module) no weight
// has been written. Throws when no layer has an active adapter.
template <class Scalar>
void merge_adapters(const LoraModelView<Scalar>& model, const char* where = "merge_adapters") {
  model.validate(where);
  detail::require_unmerged(where, model);
  std::vector<LoraLinear<Scalar>*> prepared;
  std::vector<nn::Embedding<Scalar>*> prepared_embeddings;
  try {
    for (const auto& m : model.lora_modules) {
      try {
        if (m.layer->prepare_merge(where)) prepared.push_back(m.layer);
      } catch (const std::invalid_argument& e) {
        detail::fail(where, "module '", m.path, "': ", e.what());
      }
    }
    for (const auto& m : model.embedding_modules) {
      try {
        m.layer->prepare_merge(where);
        prepared_embeddings.push_back(m.layer);
      } catch (const std::invalid_argument& e) {
        detail::fail(where, "module '", m.path, "': ", e.what());
      }
    }
  } catch (...) {
    for (LoraLinear<Scalar>* l : prepared) l->cancel_merge();
    for (nn::Embedding<Scalar>* e : prepared_embeddings) e->cancel_merge();
    throw;
  }
  if (prepared.empty() && prepared_embeddings.empty())
    detail::fail(where, "no LoRA layer has an active adapter to merge");
  for (LoraLinear<Scalar>* l : prepared) l->commit_merge();
  for (nn::Embedding<Scalar>* e : prepared_embeddings) e->commit_merge();
}

template <class Scalar>
void unmerge_adapters(const LoraModelView<Scalar>& model, const char* where = "unmerge_adapters") {
  model.validate(where);
  for (const auto& m : model.lora_modules)
    if (m.layer->merged()) m.layer->unmerge();
  for (const auto& m : model.embedding_modules)
    if (m.layer->merged()) m.layer->unmerge();
}

// Replaces one adapter's weights on one layer without touching W0: in place when rank, alpha, rsLoRA
// and dropout are unchanged, otherwise by deleting and re-adding it with the new config (its active
// flag and runtime scale are kept). Throws std::invalid_argument on shape mismatches or a merged layer,
// with the layer unchanged.
template <class Scalar, class DerivedA, class DerivedB>
void hot_swap_adapter(LoraLinear<Scalar>& layer, const std::string& name, const Eigen::MatrixBase<DerivedA>& A,
                      const Eigen::MatrixBase<DerivedB>& B, const LoraConfig& config) {
  constexpr const char* where = "hot_swap_adapter";
  if (layer.merged()) detail::fail(where, "the layer is merged; call unmerge() first");
  if (!layer.has_adapter(name)) detail::fail(where, "the layer has no adapter named '", name, "'");
  config.validate(where);
  detail::require_shape(where, "A", A, config.rank, layer.in_features());
  detail::require_shape(where, "B", B, layer.out_features(), config.rank);
  const Matrix<Scalar> a = A, b = B;  // evaluate (and check) before changing anything
  detail::require_finite(where, "A", a);
  detail::require_finite(where, "B", b);
  const LoraConfig& old = layer.adapter_config(name);
  if (old.rank == config.rank && old.alpha == config.alpha && old.use_rslora == config.use_rslora &&
      old.dropout == config.dropout) {
    layer.set_adapter_weights(name, a, b);
    return;
  }
  layer.replace_adapter(name, config, a, b);
}

// The same for an Embedding's adapter: A [r x num_embeddings], B [dim x r] (see Embedding::set_lora; the
// config's dropout is ignored, as PEFT ignores it on embeddings). Throws with the layer unchanged.
template <class Scalar, class DerivedA, class DerivedB>
void hot_swap_adapter(nn::Embedding<Scalar>& layer, const std::string& name, const Eigen::MatrixBase<DerivedA>& A,
                      const Eigen::MatrixBase<DerivedB>& B, const LoraConfig& config) {
  constexpr const char* where = "hot_swap_adapter";
  if (!layer.has_lora() || layer.adapter_name() != name)
    detail::fail(where, "the embedding has no adapter named '", name, "'",
                 layer.has_lora() ? detail::concat(" (its adapter is '", layer.adapter_name(), "')") : std::string());
  LoraConfig c = config;
  c.dropout = 0;
  try {
    layer.set_lora(c, A, B);
  } catch (const std::invalid_argument& e) {
    detail::fail(where, e.what());
  }
}

// ---- combining adapters ----------------------------------------------------------------------------

// A low-rank delta and the config that gives it its scaling: delta = config.scaling() * B A.
template <class Scalar>
struct LowRankAdapter {
  Matrix<Scalar> A, B;
  LoraConfig config;
};

enum class CombineMethod { cat, svd };

namespace detail {
template <class Scalar>
void check_sources(const char* where, const LoraLinear<Scalar>& layer, const std::vector<std::string>& names,
                   const std::vector<double>& weights) {
  if (names.empty()) fail(where, "no adapters to combine");
  if (names.size() != weights.size())
    fail(where, names.size(), " adapters but ", weights.size(), " weights; give one weight per adapter");
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (!layer.has_adapter(names[i])) fail(where, "the layer has no adapter named '", names[i], "'");
    if (!std::isfinite(weights[i])) fail(where, "weight ", i, " is not finite");
  }
}
}  // namespace detail

// Exact concatenation: the new adapter's delta is sum_i w_i s_i B_i A_i, rank sum_i r_i.
template <class Scalar>
LowRankAdapter<Scalar> combine_cat(const LoraLinear<Scalar>& layer, const std::vector<std::string>& names,
                                   const std::vector<double>& weights) {
  constexpr const char* where = "combine_cat";
  detail::check_sources(where, layer, names, weights);
  int rank = 0;
  for (const std::string& n : names) rank += layer.rank(n);
  LowRankAdapter<Scalar> out;
  out.A.resize(rank, layer.in_features());
  out.B.resize(layer.out_features(), rank);
  Index row = 0;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const int r = layer.rank(names[i]);
    out.A.middleRows(row, r) = layer.A(names[i]);
    out.B.middleCols(row, r) = static_cast<Scalar>(weights[i] * layer.scaling(names[i])) * layer.B(names[i]);
    row += r;
  }
  out.config = layer.adapter_config(names.front());
  out.config.rank = rank;
  out.config.alpha = rank;
  out.config.use_rslora = false;
  return out;
}

// The best rank-`rank` approximation of sum_i w_i s_i B_i A_i. If the sum has lower rank, the extra
// rows of A and columns of B are zero.
template <class Scalar>
LowRankAdapter<Scalar> combine_svd(const LoraLinear<Scalar>& layer, const std::vector<std::string>& names,
                                   const std::vector<double>& weights, int rank) {
  constexpr const char* where = "combine_svd";
  detail::check_sources(where, layer, names, weights);
  const Index in = layer.in_features(), out_f = layer.out_features();
  if (rank < 1 || rank > std::min(in, out_f))
    detail::fail(where, "rank must be in [1, min(in_features, out_features) = ", std::min(in, out_f), "], got ", rank);
  using MatD = Eigen::MatrixXd;  // column-major, double: the factorizations' natural form
  Index R = 0;
  for (const std::string& n : names) R += layer.rank(n);
  MatD Bc(out_f, R), AcT(in, R);
  Index col = 0;
  for (std::size_t i = 0; i < names.size(); ++i) {
    const int r = layer.rank(names[i]);
    Bc.middleCols(col, r) = (weights[i] * layer.scaling(names[i])) * layer.B(names[i]).template cast<double>();
    AcT.middleCols(col, r) = layer.A(names[i]).template cast<double>().transpose();
    col += r;
  }
  // delta = Bc AcT^T = Qb (Rb Ra^T) Qa^T; the SVD of the small middle factor gives the SVD of delta.
  const Index k1 = std::min(out_f, R), k2 = std::min(in, R);
  Eigen::HouseholderQR<MatD> qb(Bc), qa(AcT);
  const MatD Qb = qb.householderQ() * MatD::Identity(out_f, k1);
  const MatD Qa = qa.householderQ() * MatD::Identity(in, k2);
  const MatD Rb = qb.matrixQR().topRows(k1).template triangularView<Eigen::Upper>();
  const MatD Ra = qa.matrixQR().topRows(k2).template triangularView<Eigen::Upper>();
  const MatD M = Rb * Ra.transpose();  // k1 x k2
  Eigen::JacobiSVD<MatD> svd(M, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Index k = std::min<Index>(rank, svd.singularValues().size());
  const Eigen::VectorXd root = svd.singularValues().head(k).cwiseSqrt();
  LowRankAdapter<Scalar> result;
  result.B = Matrix<Scalar>::Zero(out_f, rank);
  result.A = Matrix<Scalar>::Zero(rank, in);
  result.B.leftCols(k) = ((Qb * svd.matrixU().leftCols(k)) * root.asDiagonal()).template cast<Scalar>();
  result.A.topRows(k) = (root.asDiagonal() * (Qa * svd.matrixV().leftCols(k)).transpose()).template cast<Scalar>();
  result.config = layer.adapter_config(names.front());
  result.config.rank = rank;
  result.config.alpha = rank;
  result.config.use_rslora = false;
  return result;
}

// Adds the combination of `sources` (weights[i] each) as a new inactive adapter `name` on every layer that
// has at least one of the sources (sources a layer lacks contribute nothing there). `rank` is used by
// svd only. All or none: on a throw, no layer gets the new adapter.
template <class Scalar>
void add_weighted_adapter(const LoraModelView<Scalar>& model, const std::vector<std::string>& sources,
                          const std::vector<double>& weights, const std::string& name, CombineMethod method,
                          int rank = 0) {
  constexpr const char* where = "add_weighted_adapter";
  model.validate(where);
  detail::require_unmerged(where, model);
  for (const std::string& s : sources) detail::refuse_on_embeddings(where, model, "combining its adapter", s);
  if (sources.size() != weights.size())
    detail::fail(where, sources.size(), " adapters but ", weights.size(), " weights");
  for (const std::string& s : sources) detail::require_known_adapter(where, model, s);
  std::vector<std::pair<LoraLinear<Scalar>*, LowRankAdapter<Scalar>>> planned;
  for (const auto& m : model.lora_modules) {
    std::vector<std::string> here;
    std::vector<double> w;
    for (std::size_t i = 0; i < sources.size(); ++i)
      if (m.layer->has_adapter(sources[i])) here.push_back(sources[i]), w.push_back(weights[i]);
    if (here.empty()) continue;
    if (m.layer->has_adapter(name)) detail::fail(where, "module '", m.path, "' already has an adapter named '", name, "'");
    try {
      planned.emplace_back(m.layer, method == CombineMethod::cat ? combine_cat(*m.layer, here, w)
                                                                 : combine_svd(*m.layer, here, w, rank));
    } catch (const std::invalid_argument& e) {
      detail::fail(where, "module '", m.path, "': ", e.what());
    }
  }
  std::size_t done = 0;
  try {
    for (; done < planned.size(); ++done) {
      auto& [layer, adapter] = planned[done];
      layer->add_adapter(name, adapter.config);
      layer->set_adapter_weights(name, adapter.A, adapter.B);
    }
  } catch (...) {
    for (std::size_t i = 0; i < done; ++i) planned[i].first->delete_adapter(name);
    throw;
  }
}

}  // namespace lora
