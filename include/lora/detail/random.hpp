// lora.hpp internal: a seeded random source whose output is the same on every platform.
// std::mt19937_64 is fully specified by the standard; the std:: distributions are not, so the
// uniform and normal draws are written out here.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>

namespace lora::detail {

class Random {
 public:
  explicit Random(std::uint64_t seed = 0) : engine_(seed) {}

  void seed(std::uint64_t s) {
    engine_.seed(s);
    has_spare_ = false;
  }

  // Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

  double uniform(double lo, double hi) { return lo + (hi - lo) * uniform(); }

  // Standard normal by the Box-Muller transform (both outputs used).
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    constexpr double two_pi = 6.283185307179586476925286766559;
    const double u1 = 1.0 - uniform();  // in (0, 1], so log is finite
    const double u2 = uniform();
    const double radius = std::sqrt(-2.0 * std::log(u1));
    spare_ = radius * std::sin(two_pi * u2);
    has_spare_ = true;
    return radius * std::cos(two_pi * u2);
  }

  std::uint64_t next_u64() { return engine_(); }

 private:
  std::mt19937_64 engine_;
  double spare_ = 0;
  bool has_spare_ = false;
};

}  // namespace lora::detail
