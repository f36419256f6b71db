// lora.hpp: initialisers for the adapter matrices, seeded and bit-reproducible.
#pragma once

#include <lora/common.hpp>
#include <lora/config.hpp>
#include <lora/detail/random.hpp>

#include <cmath>

namespace lora {

// Fills m with N(0, std^2).
template <class Derived>
void init_gaussian(Eigen::DenseBase<Derived>& m, double std, detail::Random& rng) {
  using Scalar = typename Derived::Scalar;
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<Scalar>(std * rng.normal());
}

// Fills m with U(-bound, bound).
template <class Derived>
void init_uniform(Eigen::DenseBase<Derived>& m, double bound, detail::Random& rng) {
  using Scalar = typename Derived::Scalar;
  for (Index i = 0; i < m.rows(); ++i)
    for (Index j = 0; j < m.cols(); ++j) m(i, j) = static_cast<Scalar>(rng.uniform(-bound, bound));
}

// PyTorch's kaiming_uniform_(a = sqrt(5)) on a [fan_out x fan_in] weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
template <class Derived>
void init_kaiming_uniform(Eigen::DenseBase<Derived>& m, detail::Random& rng) {
  init_uniform(m, 1.0 / std::sqrt(static_cast<double>(m.cols())), rng);
}

// The std that InitMethod::gaussian uses for a given config.
inline double gaussian_init_std(const LoraConfig& config) {
  return config.init_std ? *config.init_std : 1.0 / static_cast<double>(config.rank);
}

// Initialises A [r x in] and B [out x r] as the config asks; the draws depend only on config.seed.
template <class DerivedA, class DerivedB>
void init_adapter(Eigen::DenseBase<DerivedA>& A, Eigen::DenseBase<DerivedB>& B, const LoraConfig& config) {
  detail::Random rng(config.seed);
  switch (config.init) {
    case InitMethod::gaussian: init_gaussian(A, gaussian_init_std(config), rng); break;
    case InitMethod::kaiming_uniform: init_kaiming_uniform(A, rng); break;
    case InitMethod::random: init_kaiming_uniform(A, rng); break;
  }
  if (config.init == InitMethod::random)
    init_kaiming_uniform(B, rng);
  else
    B.setZero();
}

}  // namespace lora
