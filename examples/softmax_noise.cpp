// Softmax is robust to noise on its logits (SPEC section 6). Adding iid eps_i ~ N(0, sigma^2) to the logits s_i turns
// the weights p_i into p_i w_i / sum_j p_j w_j with w_i = e^(eps_i - sigma^2 / 2), E[w_i] = 1, Var[w_i] = e^(sigma^2) - 1.
// When the weights are spread out the denominator stays near 1, and the output o = sum_i p_i v_i moves by
//
//     E |o' - o|^2  =  (e^(sigma^2) - 1) * sum_i p_i^2 |v_i - o|^2,
//
// which falls like 1/n for s, v ~ N(0, 1) (sum_i p_i^2 is about e / n). SPEC quotes a typical RMS change of about
// 0.09, 0.05, 0.03 and 0.014 for n = 64, 256, 1024, 4096 at sigma = 0.5. A constant shift of every logit changes
// nothing, because softmax subtracts it out.
//
// The logits go through attnkit's fused kernel as one query q = [1] against keys k_i = s_i (scale 1), so the noise is
// added to the keys. Exits non-zero when a measurement leaves its range.
//
// usage: softmax_noise [trials]   (default 48 logit draws per n)
#include <attnkit/attnkit.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "claims.hpp"

using attnkit::AttentionOptions;
using attnkit::Index;
using attnkit::Matrix;

namespace {

constexpr Index kValueWidth = 16;  // v_i has 16 components; RMS is per component
constexpr int kNoiseDraws = 32;    // noise draws per logit draw

Matrix<double> attend(const Matrix<double>& logits, const Matrix<double>& v) {
  AttentionOptions o;
  o.scale = 1;
  return attnkit::scaled_dot_product_attention(Matrix<double>::Ones(1, 1), logits, v, o);
}

double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int trials = int(argument_or(argc, argv, 48, 1, "softmax_noise [trials >= 1]"));
  Claims claims;
  Gaussian normal(2026);

  std::printf("RMS change of the output under logit noise, s, v ~ N(0, 1), %d logit draws x %d noise draws:\n",
              trials, kNoiseDraws);
  const double typical[] = {0.09, 0.05, 0.03, 0.014};  // SPEC, sigma = 0.5
  const Index lengths[] = {64, 256, 1024, 4096};
  for (int t = 0; t < 4; ++t) {
    const Index n = lengths[t];
    for (double sigma : {0.25, 0.5, 1.0}) {
      double measured_sq = 0, predicted_sq = 0;
      std::vector<double> typical_change;
      for (int trial = 0; trial < trials; ++trial) {
        const Matrix<double> s = normal(n, 1, 1), v = normal(n, kValueWidth, 1);
        const Matrix<double> o = attend(s, v);
        // The prediction from this draw's weights: p_i = softmax(s)_i.
        const Eigen::ArrayXd p = (s.col(0).array() - s.maxCoeff()).exp();
        const Eigen::ArrayXd w = p / p.sum();
        const Eigen::ArrayXd spread = (v.rowwise() - o.row(0)).rowwise().squaredNorm().array();
        const double predicted = (std::exp(sigma * sigma) - 1) * (w.square() * spread).sum() / kValueWidth;
        double change = 0;
        for (int r = 0; r < kNoiseDraws; ++r)
          change += (attend(s + normal(n, 1, sigma), v) - o).squaredNorm() / (kValueWidth * kNoiseDraws);
        measured_sq += change / trials, predicted_sq += predicted / trials;
        typical_change.push_back(std::sqrt(change));
      }
      char what[96];
      std::snprintf(what, sizeof what, "n = %4ld, sigma = %.2f: RMS change", long(n), sigma);
      // The formula is first order in the denominator's fluctuation, whose relative size is about
      // sqrt((e^(sigma^2) - 1) e / n): small at large n, 0.2 at n = 64 and sigma = 1.
      const double tolerance = 0.06 + 1.2 * std::sqrt((std::exp(sigma * sigma) - 1) * std::exp(1.0) / double(n));
      claims.check_near(what, std::sqrt(measured_sq), std::sqrt(predicted_sq), tolerance);
      if (sigma == 0.5) {
        std::snprintf(what, sizeof what, "n = %4ld, sigma = 0.50: median over draws", long(n));
        claims.check_near(what, median(typical_change), typical[t], 0.3);
      }
    }
  }

  // A constant shift c of every logit: the same weights up to rounding of s_i + c, so the output moves by at most a
  // few ulps of |c| (double precision here).
  std::printf("\nConstant shift of every logit:\n");
  const Matrix<double> s = normal(1024, 1, 1), v = normal(1024, kValueWidth, 1);
  const Matrix<double> o = attend(s, v);
  for (double c : {-40.0, 0.5, 7.0, 300.0}) {
    const double change = (attend(s.array() + c, v) - o).cwiseAbs().maxCoeff();
    char what[96];
    std::snprintf(what, sizeof what, "shift %+.1f: largest output change", c);
    claims.check(what, change, 0.0, 0.0, 64 * (1 + std::abs(c)) * 1.1e-16);
  }
  return claims.exit_code();
}
