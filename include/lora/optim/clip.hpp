// lora.hpp: gradients of a parameter list: their norm, norm clipping (torch.nn.utils.clip_grad_norm_ with
// the L2 norm), zeroing.
#pragma once

#include <lora/common.hpp>
#include <lora/parameter.hpp>

#include <cmath>
#include <limits>

namespace lora::optim {

// The L2 norm of all gradients of `params` seen as one vector, accumulated in double (no overflow for
// float gradients; double gradients beyond 1e154 are rescaled). 0 for an empty list; NaN or Inf when a
// gradient holds one.
template <class Scalar>
double grad_norm(const ParameterList<Scalar>& params) {
  lora::detail::require_live_parameters("grad_norm", params, false);
  double sum = 0;
  for (const Parameter<Scalar>& p : params) sum += p.grad.template cast<double>().squaredNorm();
  if (std::isfinite(sum) || std::isnan(sum)) return std::sqrt(sum);
  // Inf is an Inf entry, or squares that overflowed: then redo the sum scaled by the largest entry.
  double largest = 0;
  for (const Parameter<Scalar>& p : params) {
    if (!p.grad.allFinite()) return std::numeric_limits<double>::infinity();
    if (p.grad.size() > 0) largest = std::fmax(largest, static_cast<double>(p.grad.cwiseAbs().maxCoeff()));
  }
  double scaled = 0;
  for (const Parameter<Scalar>& p : params)
    scaled += (p.grad.template cast<double>() / largest).squaredNorm();
  return largest * std::sqrt(scaled);
}

// Scales every gradient by max_norm / (total + 1e-6) when that is < 1, where total = grad_norm(params),
// and returns total (before clipping), as torch.nn.utils.clip_grad_norm_ does.
// A non-finite total throws when error_if_nonfinite (the default); otherwise the gradients are left as
// they are and the non-finite total is returned, so the caller can skip the step. (PyTorch would scale
// them by NaN.) max_norm = +Inf only measures.
template <class Scalar>
double clip_grad_norm(ParameterList<Scalar>& params, double max_norm, bool error_if_nonfinite = true) {
  constexpr const char* where = "clip_grad_norm";
  if (std::isnan(max_norm) || max_norm <= 0) lora::detail::fail(where, "max_norm must be > 0, got ", max_norm);
  lora::detail::require_live_parameters(where, params, false);
  const double total = grad_norm(params);
  if (!std::isfinite(total)) {
    if (!error_if_nonfinite) return total;
    for (const Parameter<Scalar>& p : params)
      if (!p.grad.allFinite())
        lora::detail::fail(where, "the gradient of '", p.name, "' contains NaN or Inf; total norm is ", total);
    lora::detail::fail(where, "the total gradient norm is ", total);
  }
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1)
    for (Parameter<Scalar>& p : params) p.grad *= static_cast<Scalar>(coef);
  return total;
}

// Sets every gradient of `params` to zero (for models whose own zero_grad() is out of reach).
template <class Scalar>
void zero_grad(ParameterList<Scalar>& params) {
  lora::detail::require_live_parameters("zero_grad", params, false);
  for (Parameter<Scalar>& p : params) p.grad.setZero();
}

}  // namespace lora::optim
