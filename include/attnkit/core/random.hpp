// attnkit: the random numbers behind every layer's initialisation. The generator and the transforms are fixed here
// (SplitMix64, Box-Muller), not taken from <random>, whose distributions differ between standard libraries: the same
// seed gives the same weights on every platform.
#pragma once

#include <cmath>
#include <cstdint>

#include "types.hpp"

namespace attnkit::detail {

/// SplitMix64 (Steele et al. 2014) with uniform and normal draws.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}

  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  /// Uniform on the open interval (0, 1): 53 random bits, never 0, so log(uniform()) is finite.
  double uniform() { return (double(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }
  /// Standard normal, by Box-Muller.
  double normal() {
    const double radius = std::sqrt(-2.0 * std::log(uniform()));  // two statements: a fixed order of the draws
    return radius * std::cos(6.283185307179586 * uniform());
  }

 private:
  std::uint64_t state_;
};

/// rows x cols, uniform on [-sqrt(6 / (fan_in + fan_out)), +...] (Glorot & Bengio 2010), fan_in = rows,
/// fan_out = cols unless given.
template <class S>
Matrix<S> xavier_uniform(Index rows, Index cols, Rng& rng, Index fan_in = -1, Index fan_out = -1) {
  const double limit = std::sqrt(6.0 / double((fan_in < 0 ? rows : fan_in) + (fan_out < 0 ? cols : fan_out)));
  Matrix<S> w(rows, cols);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<S>(limit * (2.0 * rng.uniform() - 1.0));
  return w;
}

/// rows x cols drawn from N(0, stddev^2).
template <class S>
Matrix<S> normal_matrix(Index rows, Index cols, double stddev, Rng& rng) {
  Matrix<S> w(rows, cols);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = static_cast<S>(stddev * rng.normal());
  return w;
}

}  // namespace attnkit::detail
