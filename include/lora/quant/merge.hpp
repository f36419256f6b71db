// lora.hpp: merge rules for a LoRA layer over a quantized base.
//
// LoraLinear::merge() refuses a quantized base (a delta below the quantization step would be lost and
// the merged layer would behave like the base). merge_and_dequantize() returns a dense base
// W0' = dequant(W0) + sum_active s_i B_i A_i (s_i = alpha/r times the adapter scale) for export;
// merge_and_requantize() requantizes W0' in the base's format on explicit request and reports how much
// the layer's outputs change on the probe inputs the caller gives.
#pragma once

#include <lora/linear.hpp>
#include <lora/quant/quant.hpp>

namespace lora::quant {

// W0 + the active adapters' deltas, dense [out x in]; the layer is not changed.
template <class Scalar>
Matrix<Scalar> merged_dense_weight(const LoraLinear<Scalar>& layer) {
  const Index out = layer.out_features(), in = layer.in_features();
  Matrix<Scalar> W(out, in);
  layer.base().dense_rows(0, out, W.data());
  for (const std::string& name : layer.active_adapters()) {
    const Scalar s = static_cast<Scalar>(layer.scaling(name) * layer.adapter_scale(name));
    W.noalias() += s * layer.B(name) * layer.A(name);
  }
  return W;
}

// A dense base holding the merged weight (with the base's bias when it has one).
template <class Scalar>
std::shared_ptr<const DenseBase<Scalar>> merge_and_dequantize(const LoraLinear<Scalar>& layer) {
  Matrix<Scalar> W = merged_dense_weight(layer);
  Vector<Scalar> b = layer.base().has_bias() ? Vector<Scalar>(layer.base().bias()) : Vector<Scalar>();
  return std::make_shared<DenseBase<Scalar>>(std::move(W), std::move(b));
}

struct RequantizeReport {
  double weight_change = 0;     // ||W0'q - W0'||_F / ||W0'||_F (requantized vs exact merged weight)
  double output_change = 0;     // ||Y_q - Y||_F / ||Y||_F on the probe, Y = X W0'^T, Y_q = X W0'q^T
  double delta_retained = 0;    // <W0'q - W0q, D> / ||D||_F^2, D = W0' - W0q: the share of the delta that survives
                                // in its own direction (1: all of it, 0: none)
};

template <class Scalar>
struct Requantized {
  std::shared_ptr<const QuantizedBase<Scalar>> base;
  RequantizeReport report;
};

// Requantizes the merged weight in the layer's base format (a QuantizedBase required) and measures the
// change on `probe` [m x in] (m >= 1).
template <class Scalar, class Derived>
Requantized<Scalar> merge_and_requantize(const LoraLinear<Scalar>& layer, const Eigen::MatrixBase<Derived>& probe) {
  const char* where = "merge_and_requantize";
  const auto* qb = dynamic_cast<const QuantizedBase<Scalar>*>(&layer.base());
  if (!qb) lora::detail::fail(where, "the layer's base (", layer.base().describe(), ") is not a QuantizedBase");
  if (probe.cols() != layer.in_features() || probe.rows() < 1)
    lora::detail::fail(where, "probe must be m x ", layer.in_features(), " with m >= 1, got ", probe.rows(), " x ",
                       probe.cols());
  const Matrix<Scalar> W = merged_dense_weight(layer);
  const QuantizedWeight& old = qb->weight();
  QuantizedWeight q = old.format == Format::nf4 ? quantize_nf4(W, old.options) : quantize_int8(W);
  Matrix<Scalar> Wq(W.rows(), W.cols()), W0(W.rows(), W.cols());
  q.dequantize_rows(0, q.out, Wq.data());
  old.dequantize_rows(0, old.out, W0.data());
  const Matrix<Scalar> X = probe.template cast<Scalar>();
  Requantized<Scalar> r;
  r.report.weight_change = static_cast<double>((Wq - W).norm() / W.norm());
  const Matrix<Scalar> Y = X * W.transpose(), Yq = X * Wq.transpose();
  r.report.output_change = static_cast<double>((Yq - Y).norm() / Y.norm());
  const Matrix<Scalar> delta = W - W0;
  const double d2 = static_cast<double>(delta.squaredNorm());
  r.report.delta_retained = d2 > 0 ? static_cast<double>((Wq - W0).cwiseProduct(delta).sum()) / d2 : 0.0;
  Vector<Scalar> b = qb->has_bias() ? Vector<Scalar>(qb->bias()) : Vector<Scalar>();
  r.base = make_quantized_base<Scalar>(std::move(q), std::move(b));
  return r;
}

}  // namespace lora::quant
