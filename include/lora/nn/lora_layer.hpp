// lora.hpp: LoraLayer, a LoraLinear as a model module (what inject_lora puts in place of a Linear).
#pragma once

#include <lora/config.hpp>
#include <lora/linear.hpp>
#include <lora/nn/inference.hpp>
#include <lora/nn/module.hpp>

#include <memory>
#include <string>
#include <utility>

namespace lora::nn {

template <class Scalar>
class LoraLayer final : public Module<Scalar> {
 public:
  using typename Module<Scalar>::MatrixType;
  using typename Module<Scalar>::VectorType;
  using typename Module<Scalar>::Input;

  // W0 [out x in] frozen, its bias [out] (trainable iff config.bias != none) and the "default" adapter.
  template <class DerivedW>
  LoraLayer(const Eigen::MatrixBase<DerivedW>& W0, const LoraConfig& config)
      : layer_(W0, config), layer_config_(config) {}
  template <class DerivedW, class DerivedB>
  LoraLayer(const Eigen::MatrixBase<DerivedW>& W0, const Eigen::MatrixBase<DerivedB>& bias, const LoraConfig& config)
      : layer_(W0, bias, config), layer_config_(config) {}
  // Over a base that other layers or models may share: nothing is copied.
  LoraLayer(typename LoraLinear<Scalar>::BasePtr base, const LoraConfig& config)
      : layer_(std::move(base), config), layer_config_(config) {}

  // forward / backward: LoraLinear's (see include/lora/linear.hpp).
  const MatrixType& forward(const Input& X) override { return layer_.forward(X); }
  const MatrixType& backward(const Input& dY) override { return layer_.backward(dY); }
  const MatrixType& infer(const Input& X, InferenceContext<Scalar>& ctx) const override {
    ModuleWorkspace<Scalar>& ws = ctx.next_workspace();
    switch (ctx.mode()) {
      case InferenceContext<Scalar>::Adapters::named: return layer_.infer(X, ws.lora, ctx.adapter_names(), true);
      case InferenceContext<Scalar>::Adapters::per_row:
        return ws.mixed.forward(layer_, X, ctx.plan(), MixedBatchForward<Scalar>::Missing::base);
      default: return layer_.infer(X, ws.lora);
    }
  }
  void zero_grad() override { layer_.zero_grad(); }
  void train(bool on = true) override {
    Module<Scalar>::train(on);
    layer_.train(on);
  }

  // The active adapters and the bias (W0 is the frozen base and never trains).
  void set_requires_grad(bool on) override { layer_.set_trainable(on, on); }

  LoraLinear<Scalar>& lora() { return layer_; }
  const LoraLinear<Scalar>& lora() const { return layer_; }

  // Replaces the frozen W0 with a copy of these values (a new base of this layer's own), or the bias
  // values; every adapter is kept (values, scales, which are active). Unmerged layers only; shapes must match.
  template <class DerivedW>
  void set_base_weight(const Eigen::MatrixBase<DerivedW>& W0) {
    constexpr const char* where = "LoraLayer::set_base_weight";
    detail::require_shape(where, "W0", W0, layer_.out_features(), layer_.in_features());
    if (layer_.merged()) detail::fail(where, "the layer is merged; call unmerge() first");
    if (!layer_.base().dense_weight())
      detail::fail(where, "the base ", layer_.base().describe(),
                   " is not stored as dense values; a dense W0 would silently change its format: set_base() "
                   "a base of the kind wanted instead");
    try {
      if (layer_.base().has_bias())
        layer_.set_base(make_base<Scalar>(W0, layer_.bias()));
      else
        layer_.set_base(make_base<Scalar>(W0));
    } catch (const std::invalid_argument& e) {
      detail::fail(where, e.what());
    }
  }
  template <class DerivedB>
  void set_base_bias(const Eigen::MatrixBase<DerivedB>& bias) {
    try {
      layer_.set_bias(bias);
    } catch (const std::invalid_argument& e) {
      detail::fail("LoraLayer::set_base_bias", e.what());
    }
  }

  // "lora_A.<adapter>.weight", "lora_B.<adapter>.weight" per active adapter, "bias" when it trains.
  void collect_parameters(ParameterList<Scalar>& out, const std::string& prefix) override {
    layer_.collect_parameters(out, prefix);
  }
  Index num_parameters() const override { return layer_.num_trainable_parameters() + layer_.num_frozen_parameters(); }
  Index num_trainable_parameters() const override { return layer_.num_trainable_parameters(); }
  Index in_features() const override { return layer_.in_features(); }
  Index out_features() const override { return layer_.out_features(); }
  std::string type_name() const override { return "LoraLinear"; }
  std::string describe() const override {
    std::string adapters;
    for (const std::string& name : layer_.active_adapters())
      adapters += detail::concat(adapters.empty() ? "" : ", ", name, ": r = ", layer_.rank(name),
                                 ", scaling = ", layer_.scaling(name));
    return detail::concat("LoraLinear(", in_features(), " -> ", out_features(),
                          layer_.has_bias() ? (layer_.bias_trainable() ? ", trainable bias" : ", bias") : ", no bias",
                          "; ", adapters.empty() ? "no active adapter" : adapters, layer_.merged() ? "; merged" : "",
                          ")");
  }
  std::unique_ptr<Module<Scalar>> clone() const override { return std::make_unique<LoraLayer>(*this); }

 private:
  bool share_own_buffers(Module<Scalar>* other) override {
    layer_.share_transient_buffers(other ? &static_cast<LoraLayer*>(other)->layer_ : nullptr);
    return true;
  }

  LoraLinear<Scalar> layer_;
  LoraConfig layer_config_;  // the per-layer fields (bias mode, keep_original_weight) it was built with
};

}  // namespace lora::nn
