// lora.hpp: AdamW with block-wise 8-bit moments, as bitsandbytes' 8-bit optimisers (AdamW8bit, optim_bits=8,
// block-wise; Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").
//
// A parameter with at least `min_8bit_size` values keeps m and v as 8-bit codes: its values, in storage
// (row-major) order, are cut into blocks of `block_size` (a shorter last block); each block has one float32
// absmax for m and one for v. m is coded into the signed dynamic map (quant::dynamic_map()), v into the
// unsigned one (quant::dynamic_map_unsigned()): state = map[code] * absmax. A smaller parameter keeps float32
// m and v. Per parameter with gradient g, at its step t >= 1 (all in float32, as bitsandbytes' kernels):
//   m, v = dequantized block (8-bit) or the float32 moments
//   m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
//   p = p + step_size m / (sqrt(v) + c2 eps),   step_size = -lr c2 / c1,   c1 = 1 - beta1^t,
//                                               c2 = sqrt(1 - beta2^t)
//   p = p (1 - lr wd)                                                (decay after the update, if wd > 0)
//   8-bit: absmax = max |m| (|v|) over the block, code = nearest map entry to m / absmax (v / absmax),
//          except that m keeps its sign (as bitsandbytes' kernel: a code on the other side of zero moves one
//          step back) and a positive v never codes to 0 but to the smallest positive level (3.25e-7). The
//          second rule is ours: bitsandbytes rounds v to 0 when it is below half that level times its block's
//          largest, and a later step with a zero gradient then divides a non-zero m by c2 eps alone, a step
//          hundreds of times lr (measured: 0.37 at lr 1e-3; the LoRA run of finetune_classifier, whose ReLU
//          layers give exact zero gradients, went to NaN in its first epoch).
// The update uses the new moments before they are requantized. Mathematically the same as AdamW's
// (lr / c1) m / (sqrt(v) / c2 + eps); the decay differs from torch's AdamW (applied first) by lr^2 wd terms.
// Assumptions where bitsandbytes' CUDA kernel is not reproduced bit for bit: the nearest code is exact
// (ties to the lower code) where the kernel searches approximately; c1, c2, step_size, c2 eps and the decay
// factor are computed in double and rounded to float32 once; an all-zero block codes every value as 0
// (absmax 0). m's map is quant::dynamic_map() (bitsandbytes 0.47's state2.code), whose lowest entry is -1.
// States start at zero. Gradient scaling, percentile clipping and max_unorm are not implemented.
#pragma once

#include <lora/common.hpp>
#include <lora/optim/adamw.hpp>
#include <lora/optim/state.hpp>
#include <lora/parameter.hpp>
#include <lora/quant/quant.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lora::optim {

struct AdamW8bitOptions : AdamWOptions {
  Index block_size = 2048;     // values per absmax (> 0); bitsandbytes' block-wise optimisers use 2048
  Index min_8bit_size = 4096;  // parameters with fewer values keep float32 moments (>= 0; bitsandbytes: 4096)

  void validate(const char* where) const {
    AdamWOptions::validate(where);
    if (amsgrad) lora::detail::fail(where, "amsgrad is not supported with 8-bit states, got amsgrad = true");
    if (block_size <= 0) lora::detail::fail(where, "block_size must be > 0, got ", block_size);
    if (min_8bit_size < 0) lora::detail::fail(where, "min_8bit_size must be >= 0, got ", min_8bit_size);
  }
};

}  // namespace lora::optim

namespace lora::detail {

// The moments of one parameter: 8-bit codes and per-block absmax values, or float32 moments.
struct Adam8bitMoments {
  bool quantized = false;
  std::vector<std::uint8_t> m_codes, v_codes;  // one per value (8-bit)
  std::vector<float> m_absmax, v_absmax;       // one per block (8-bit)
  std::vector<float> m, v;                     // one per value (float32)

  std::size_t bytes() const {
    return m_codes.size() + v_codes.size() + sizeof(float) * (m_absmax.size() + v_absmax.size() + m.size() + v.size());
  }
};

}  // namespace lora::detail

namespace lora::optim {

template <class Scalar>
class AdamW8bit {
  static_assert(is_supported_scalar_v<Scalar>, "AdamW8bit<Scalar> supports float and double only.");

 public:
  using Options = AdamW8bitOptions;

  // The scratch for one block's dequantized moments (2 x block_size floats) is allocated here.
  explicit AdamW8bit(const AdamW8bitOptions& options = AdamW8bitOptions()) : options_(options) {
    options_.validate("AdamW8bit::AdamW8bit");
    m_work_.resize(static_cast<std::size_t>(options_.block_size));
    v_work_.resize(static_cast<std::size_t>(options_.block_size));
  }

  // step(params)
  //   requires: as AdamW::step: grads of the values' shapes and finite, unique names, a known name keeps
  //             its shape.
  //   ensures:  one update of every value; each parameter counts its own steps. A parameter's state is
  //             allocated on its first step, never afterwards. On a throw no value and no state has changed.
  void step(ParameterList<Scalar>& params) {
    const auto& entries = state_.resolve("AdamW8bit::step", params);
    const lora::detail::GroupRules rules{options_.loraplus_lr_ratio, options_.loraplus_include_biases,
                                         options_.decay_biases};
    for (std::size_t i = 0; i < params.size(); ++i) update(params[i], *entries[i], rules);
    lora::detail::touch_parameters(params);
  }

  // Accepts 0 (schedules reach it); the constructor does not.
  void set_lr(double lr) {
    if (!std::isfinite(lr) || lr < 0)
      lora::detail::fail("AdamW8bit::set_lr", "lr must be finite and >= 0, got ", lr);
    options_.lr = lr;
  }
  double lr() const { return options_.lr; }
  const AdamW8bitOptions& options() const { return options_; }

  // Bytes of the moments: per 8-bit parameter 2 bytes per value + 2 float absmax per block; per float32
  // parameter 8 bytes per value. The shared block scratch (workspace_bytes()) is not state.
  std::size_t state_bytes() const { return state_.bytes(); }
  std::size_t workspace_bytes() const { return sizeof(float) * (m_work_.size() + v_work_.size()); }
  std::int64_t step_count(const std::string& name) const {
    const auto* e = state_.find(name);
    return e ? e->steps : 0;
  }
  // Whether the named parameter's moments are 8-bit (false for an unknown name or before its first step).
  bool quantized(const std::string& name) const {
    const auto* e = state_.find(name);
    return e && e->steps > 0 && e->extra.quantized;
  }
  // The (dequantized) moments m and v of a parameter as float32, in its shape; empty before its first step.
  Matrix<float> exp_avg(const std::string& name) const { return moment(name, true); }
  Matrix<float> exp_avg_sq(const std::string& name) const { return moment(name, false); }
  // The raw state of an 8-bit parameter (nullptr otherwise): codes per value, absmax per block.
  const std::vector<std::uint8_t>* codes(const std::string& name, bool first) const {
    const auto* s = moments(name);
    return s && s->quantized ? (first ? &s->m_codes : &s->v_codes) : nullptr;
  }
  const std::vector<float>* absmax(const std::string& name, bool first) const {
    const auto* s = moments(name);
    return s && s->quantized ? (first ? &s->m_absmax : &s->v_absmax) : nullptr;
  }
  std::size_t num_states() const { return state_.size(); }
  void reset_state() { state_.clear(); }
  bool erase_state(const std::string& name) { return state_.erase(name); }

 private:
  using Store = lora::detail::StateStore<Scalar, 0, lora::detail::Adam8bitMoments>;
  using Entry = typename Store::Entry;

  struct Step {
    float beta1, beta2, step_size, c2_eps, decay;
  };

  const lora::detail::Adam8bitMoments* moments(const std::string& name) const {
    const auto* e = state_.find(name);
    return e && e->steps > 0 ? &e->extra : nullptr;
  }

  Matrix<float> moment(const std::string& name, bool first) const {
    const auto* e = state_.find(name);
    if (!e || e->steps == 0) return Matrix<float>();
    const lora::detail::Adam8bitMoments& s = e->extra;
    Matrix<float> out(e->rows, e->cols);
    float* o = out.data();
    const Index n = out.size();
    if (!s.quantized) {
      std::copy_n((first ? s.m : s.v).data(), n, o);
      return out;
    }
    const auto& map = first ? quant::dynamic_map() : quant::dynamic_map_unsigned();
    const auto& c = first ? s.m_codes : s.v_codes;
    const auto& a = first ? s.m_absmax : s.v_absmax;
    for (Index i = 0; i < n; ++i)
      o[i] = map[c[static_cast<std::size_t>(i)]] * a[static_cast<std::size_t>(i / options_.block_size)];
    return out;
  }

  // The Adam update of the n values from row-major position k0 of p (views with an outer stride) with
  // their float32 moments m and v (updated in place).
  static void adam(Parameter<Scalar>& p, Index k0, float* m, float* v, Index n, const Step& s) {
    const Index cols = p.value.cols();
    Index r = k0 / cols, c = k0 % cols;
    for (Index j = 0; j < n; ++j) {
      Scalar& pj = p.value.data()[r * p.value.outerStride() + c];
      const auto gj = static_cast<float>(p.grad.data()[r * p.grad.outerStride() + c]);
      if (++c == cols) c = 0, ++r;
      m[j] = m[j] * s.beta1 + (1.0f - s.beta1) * gj;
      v[j] = v[j] * s.beta2 + (1.0f - s.beta2) * (gj * gj);
      const float u = s.step_size * (m[j] / (std::sqrt(v[j]) + s.c2_eps));
      pj = (pj + static_cast<Scalar>(u)) * static_cast<Scalar>(s.decay);
    }
  }

  // absmax of x[0, n) and the codes of x / absmax (all zero_code for absmax 0): the nearest map entry, but
  // a first moment keeps its sign (as bitsandbytes' kernel: a code on the other side of zero moves one step
  // back) and a positive second moment never codes to 0 (the smallest positive level; see the header).
  static float requantize(const float* x, Index n, bool first, std::uint8_t* codes) {
    const auto& map = first ? quant::dynamic_map() : quant::dynamic_map_unsigned();
    float a = 0;
    for (Index j = 0; j < n; ++j) a = std::max(a, std::abs(x[j]));
    if (a == 0) {
      std::fill_n(codes, n, first ? signed_zero_code() : std::uint8_t{0});
      return a;
    }
    for (Index j = 0; j < n; ++j) {
      std::uint8_t c = quant::detail::nearest_code(map, x[j] / a);
      if (first && std::signbit(map[c]) != std::signbit(x[j])) c = static_cast<std::uint8_t>(x[j] > 0 ? c + 1 : c - 1);
      if (!first && x[j] > 0 && map[c] == 0.0f) c = 1;  // map[0] = 0 < map[1]
      codes[j] = c;
    }
    return a;
  }

  void update(Parameter<Scalar>& p, Entry& e, const lora::detail::GroupRules& rules) {
    lora::detail::Adam8bitMoments& s = e.extra;
    const Index n = p.value.size();
    const auto un = static_cast<std::size_t>(n);
    if (e.steps == 0) {  // first sight: zero moments
      s.quantized = n >= options_.min_8bit_size;
      if (s.quantized) {
        const auto blocks = static_cast<std::size_t>((n + options_.block_size - 1) / options_.block_size);
        s.m_codes.assign(un, signed_zero_code());
        s.v_codes.assign(un, 0);
        s.m_absmax.assign(blocks, 0.0f);
        s.v_absmax.assign(blocks, 0.0f);
      } else {
        s.m.assign(un, 0.0f);
        s.v.assign(un, 0.0f);
      }
    }
    const std::int64_t t = ++e.steps;
    const double lr = options_.lr * rules.lr_factor(p.role);
    const double wd = rules.decays(p.role) ? options_.weight_decay : 0.0;
    const double c1 = 1 - std::pow(options_.beta1, static_cast<double>(t));
    const double c2 = std::sqrt(1 - std::pow(options_.beta2, static_cast<double>(t)));
    const Step st{static_cast<float>(options_.beta1), static_cast<float>(options_.beta2),
                  static_cast<float>(-lr * c2 / c1), static_cast<float>(c2 * options_.eps),
                  static_cast<float>(wd > 0 ? 1 - lr * wd : 1.0)};
    if (!s.quantized) {
      adam(p, 0, s.m.data(), s.v.data(), n, st);
      return;
    }
    const auto& smap = quant::dynamic_map();
    const auto& umap = quant::dynamic_map_unsigned();
    const Index bs = options_.block_size;
    float* m = m_work_.data();
    float* v = v_work_.data();
    for (Index b = 0; b * bs < n; ++b) {
      const Index i0 = b * bs, len = std::min(bs, n - i0);
      const auto ub = static_cast<std::size_t>(b);
      std::uint8_t* mc = s.m_codes.data() + i0;
      std::uint8_t* vc = s.v_codes.data() + i0;
      for (Index j = 0; j < len; ++j) {
        m[j] = smap[mc[j]] * s.m_absmax[ub];
        v[j] = umap[vc[j]] * s.v_absmax[ub];
      }
      adam(p, i0, m, v, len, st);
      s.m_absmax[ub] = requantize(m, len, true, mc);
      s.v_absmax[ub] = requantize(v, len, false, vc);
    }
  }

  static std::uint8_t signed_zero_code() {
    static const std::uint8_t c = quant::detail::dynamic_code(0.0f);
    return c;
  }

  AdamW8bitOptions options_;
  Store state_;
  std::vector<float> m_work_, v_work_;  // one block's dequantized moments
};

using AdamW8bitf = AdamW8bit<float>;
using AdamW8bitd = AdamW8bit<double>;

}  // namespace lora::optim
