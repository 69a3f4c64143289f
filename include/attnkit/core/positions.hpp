// attnkit: position information shared by every family: ALiBi slopes, sinusoidal encodings, rotary embeddings.
#pragma once

#include <cmath>
#include <vector>

#include "error.hpp"
#include "types.hpp"

namespace attnkit {

/// \brief ALiBi slopes of H heads (Press et al. 2022): 2^(-8 h / H) for h = 1..H when H is a power of two; otherwise
/// the paper's rule: the slopes of the largest power of two p < H, then every other slope of 2p for the rest.
inline std::vector<double> alibi_slopes(Index heads) {
  if (heads < 1) detail::fail("alibi_slopes", "heads must be >= 1, got ", heads);
  const auto power_of_two = [](Index h) {
    std::vector<double> s(static_cast<size_t>(h));
    for (Index i = 0; i < h; ++i) s[size_t(i)] = std::pow(2.0, -8.0 * double(i + 1) / double(h));
    return s;
  };
  Index p = 1;
  while (p * 2 <= heads) p *= 2;
  std::vector<double> slopes = power_of_two(p);
  if (p == heads) return slopes;
  const std::vector<double> finer = power_of_two(2 * p);
  for (Index i = 0; Index(slopes.size()) < heads; i += 2) slopes.push_back(finer[size_t(i)]);
  return slopes;
}

/// \brief Sinusoidal position encoding (Vaswani et al.): PE(p, 2i) = sin(p / 10000^(2i/D)),
/// PE(p, 2i+1) = cos(p / 10000^(2i/D)), for positions first, first + 1, ..., first + n - 1. Add it to embeddings.
template <class S>
Matrix<S> sinusoidal_position_encoding(Index n, Index width, Index first = 0) {
  if (n < 0 || width < 1 || first < 0)
    detail::fail("sinusoidal_position_encoding", "needs n >= 0, width >= 1, first >= 0; got n = ", n,
                 ", width = ", width, ", first = ", first);
  Matrix<S> pe(n, width);
  for (Index c = 0; c < width; ++c) {
    const double inv_freq = std::pow(10000.0, -double(c / 2 * 2) / double(width));
    for (Index p = 0; p < n; ++p) {
      const double angle = double(first + p) * inv_freq;
      pe(p, c) = static_cast<S>(c % 2 == 0 ? std::sin(angle) : std::cos(angle));
    }
  }
  return pe;
}

/// \brief Which coordinates RoPE rotates together: (x_{2i}, x_{2i+1}) (RoFormer, the default) or (x_i, x_{i+d/2})
/// (the "half" layout of GPT-NeoX and LLaMA checkpoints).
enum class RopeLayout { kInterleaved, kHalf };

struct RopeOptions {
  double base = 10000;  ///< theta_i = base^(-2i/d)
  RopeLayout layout = RopeLayout::kInterleaved;
};

/// \brief Rotary position embedding (Su et al., RoFormer), in place: row r of x (one head, d = x.cols() even) is at
/// position first + r, and pair i rotates by angle position * base^(-2i/d). Then q_i . k_j depends on j - i only.
template <class S>
void apply_rope(Eigen::Ref<Matrix<S>> x, Index first, const RopeOptions& options = {}) {
  const Index d = x.cols();
  if (d % 2 != 0) detail::fail("apply_rope", "needs an even head dimension, got x of ", detail::shape_str(x.rows(), d));
  if (!(options.base > 1) || !std::isfinite(options.base))
    detail::fail("apply_rope", "options.base must be finite and > 1, got ", options.base);
  if (first < 0) detail::fail("apply_rope", "first position must be >= 0, got ", first);
  const Index half = d / 2;
  const bool interleaved = options.layout == RopeLayout::kInterleaved;
  constexpr Index kReanchor = 1024;  // exact sin/cos every so many rows bounds the recurrence's drift (~1e-13)
  for (Index i = 0; i < half; ++i) {
    const double theta = std::pow(options.base, -2.0 * double(i) / double(d));
    const double step_c = std::cos(theta), step_s = std::sin(theta);
    const Index a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    double c = 0, s = 0;
    for (Index r = 0; r < x.rows(); ++r) {
      if (r % kReanchor == 0) {
        c = std::cos(double(first + r) * theta), s = std::sin(double(first + r) * theta);
      } else {  // rotate (c, s) by theta: angle (first + r) theta, in double
        const double next_c = c * step_c - s * step_s;
        s = s * step_c + c * step_s;
        c = next_c;
      }
      const S x0 = x(r, a), x1 = x(r, b), cs = static_cast<S>(c), sn = static_cast<S>(s);
      x(r, a) = x0 * cs - x1 * sn;
      x(r, b) = x0 * sn + x1 * cs;
    }
  }
}

}  // namespace attnkit
