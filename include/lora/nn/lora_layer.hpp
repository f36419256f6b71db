// lora.hpp: LoraLayer, a LoraLinear as a model module (what inject_lora puts in place of a Linear).
#pragma once

#include <lora/config.hpp>
#include <lora/linear.hpp>
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

  // forward / backward: LoraLinear's (see include/lora/linear.hpp).
  const MatrixType& forward(const Input& X) override { return layer_.forward(X); }
  const MatrixType& backward(const Input& dY) override { return layer_.backward(dY); }
  void zero_grad() override { layer_.zero_grad(); }
  void train(bool on = true) override {
    Module<Scalar>::train(on);
    layer_.train(on);
  }

  LoraLinear<Scalar>& lora() { return layer_; }
  const LoraLinear<Scalar>& lora() const { return layer_; }

  // Replaces the frozen W0 (and the bias, when given), keeping every adapter (values, scales, which are
  // active). The layer must not be merged. Shapes must match.
  template <class DerivedW>
  void set_base_weight(const Eigen::MatrixBase<DerivedW>& W0) {
    if (layer_.has_bias())
      rebuild("LoraLayer::set_base_weight", W0, layer_.bias());
    else
      rebuild("LoraLayer::set_base_weight", W0, VectorType());
  }
  template <class DerivedB>
  void set_base_bias(const Eigen::MatrixBase<DerivedB>& bias) {
    if (!layer_.has_bias()) detail::fail("LoraLayer::set_base_bias", "the layer was built without a bias");
    rebuild("LoraLayer::set_base_bias", MatrixType(layer_.base_weight()), bias);
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
  template <class DerivedW, class DerivedB>
  void rebuild(const char* where, const Eigen::MatrixBase<DerivedW>& W0, const Eigen::MatrixBase<DerivedB>& bias);

  LoraLinear<Scalar> layer_;
  LoraConfig layer_config_;  // the per-layer fields (bias mode, keep_original_weight) it was built with
};

template <class Scalar>
template <class DerivedW, class DerivedB>
void LoraLayer<Scalar>::rebuild(const char* where, const Eigen::MatrixBase<DerivedW>& W0,
                                const Eigen::MatrixBase<DerivedB>& bias) {
  if (layer_.merged()) detail::fail(where, "the layer is merged; call unmerge() first");
  detail::require_shape(where, "W0", W0, layer_.out_features(), layer_.in_features());
  const std::vector<std::string> names = layer_.adapter_names();
  const std::string default_name = LoraLinear<Scalar>::default_adapter;
  const bool has_default = layer_.has_adapter(default_name);
  // LoraLinear always starts with an adapter named "default": build with that adapter's config (or the
  // first one's), add the others, then drop "default" if this layer no longer has one.
  LoraConfig first = has_default ? layer_.adapter_config(default_name)
                                 : (names.empty() ? layer_config_ : layer_.adapter_config(names.front()));
  first.bias = layer_config_.bias;
  first.keep_original_weight = layer_config_.keep_original_weight;
  auto fresh = layer_.has_bias() ? LoraLinear<Scalar>(W0, bias, first) : LoraLinear<Scalar>(W0, first);
  for (const std::string& name : names)
    if (name != default_name) fresh.add_adapter(name, layer_.adapter_config(name));
  if (!has_default) fresh.delete_adapter(default_name);
  for (const std::string& name : names) {
    fresh.A(name) = layer_.A(name);
    fresh.B(name) = layer_.B(name);
    fresh.set_adapter_scale(name, layer_.adapter_scale(name));
  }
  fresh.set_active_adapters(layer_.active_adapters());
  fresh.train(layer_.training());
  layer_ = std::move(fresh);
}

}  // namespace lora::nn
