// How concentrated can attention be? (SPEC section 6.)
//
// The concentration of a row of weights a over m keys is S(a) = |a|_1 / (sqrt(m) |a|_2): 1 when uniform, 1/sqrt(m)
// when one-hot. For m -> infinity it tends to E|a| / sqrt(E[a^2]). Take keys k ~ N(mu, sigma^2 I) and one query q,
// so the score s = q.k is N(beta, gamma^2) with beta = q.mu and gamma = sigma |q|. Then
//
//   exp (softmax):          S = E[e^s] / sqrt(E[e^(2s)]) = exp(-gamma^2 / 2)         -> 0 as gamma grows
//   identity (a = s):       S = E|s| / sqrt(beta^2 + gamma^2), sqrt(2/pi) ~ 0.80 at beta = 0, whatever gamma
//   relu^2 (a = relu(s)^2): S = (gamma^2 / 2) / sqrt(3 gamma^4 / 2) = 1/sqrt(6) ~ 0.41 at beta = 0
//   non-negative linear attention a = phi(q).phi(k), with phi(k) of mean mu~ and covariance Sigma~:
//                           S = 1 / sqrt(1 + q~' Sigma~ q~ / (q~' mu~)^2),  q~ = phi(q)
//
// so only softmax can focus on a few keys as the keys spread out; the others keep a floor. Finally, logits bounded
// in [-B, B] (for example by a softcap B) cap any single weight at 1 / (1 + (m - 1) e^(-2B)).
//
// Softmax weights come from attnkit's fused kernel (its log-sum-exp, then attention_weights_from_lse); the
// linear-attention features from attnkit's EluPlusOne. A finite sample estimates E[e^(2s)] well only while
// m >> e^(4 gamma^2), so the exp column is checked against the formula for gamma <= 1.5 with m = 2^18 keys; beyond,
// where the sample overestimates S, it is checked to fall below relu^2's floor 1/sqrt(6).
// Exits non-zero when a value leaves its range.
//
// usage: concentration
#include <attnkit/attnkit.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

#include "claims.hpp"

using attnkit::AttentionOptions;
using attnkit::Index;
using attnkit::Matrix;
using attnkit::Vector;

namespace {

constexpr Index kDim = 8;
constexpr Index kKeys = Index(1) << 18;
const double kPi = std::acos(-1.0);

/// S of the softmax weights of one query over the keys, from the fused kernel (scale 1, so the logit is q.k).
double softmax_concentration(const Matrix<double>& q, const Matrix<double>& k, const AttentionOptions& options) {
  Matrix<double> out(1, 1);
  Vector<double> lse(1);
  attnkit::scaled_dot_product_attention(q, k, Matrix<double>::Zero(k.rows(), 1), out, lse, options);
  return attnkit::concentration(attnkit::attention_weights_from_lse(q, k, lse, {0}, options))(0);
}

double row_concentration(const Eigen::ArrayXd& a) { return attnkit::concentration(a.matrix().transpose())(0); }

/// elu(x) + 1 of every row, through attnkit's feature map.
Matrix<double> elu_features(const Matrix<double>& x) {
  Matrix<double> f(x.rows(), x.cols());
  attnkit::EluPlusOne{}.map(x.data(), x.rows(), x.cols(), attnkit::FeatureRole::kKey, f.data(), f.cols());
  return f;
}

double normal_cdf(double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); }

}  // namespace

int main() {
  Claims claims;
  Gaussian normal(11);
  // q: a fixed unit vector; mu = beta q, so q.mu = beta and gamma = sigma.
  Matrix<double> q = normal(1, kDim);
  q /= q.norm();
  const Matrix<double> z = normal(kKeys, kDim);
  AttentionOptions unscaled;
  unscaled.scale = 1;
  char what[96];

  std::printf("Concentration S of one query's weights over m = %ld keys, k ~ N(beta q, gamma^2 I), |q| = 1:\n",
              long(kKeys));
  for (double beta : {0.0, 1.0}) {
    std::printf(" beta = %.1f\n", beta);
    for (double gamma : {0.25, 0.5, 1.0, 1.5, 2.0, 3.0}) {
      const Matrix<double> k = (gamma * z).rowwise() + beta * q.row(0);
      const Eigen::ArrayXd s = (k * q.transpose()).array();
      std::snprintf(what, sizeof what, "gamma = %.2f, exp", gamma);
      const double s_exp = softmax_concentration(q, k, unscaled), exp_predicted = std::exp(-gamma * gamma / 2);
      if (gamma <= 1.5)
        claims.check_near(what, s_exp, exp_predicted, 0.05);
      else  // the sample overestimates S here, but it already lies below the floors of the other forms
        claims.check(what, s_exp, exp_predicted, 0, 1 / std::sqrt(6.0));
      // E|s| for s ~ N(beta, gamma^2).
      const double mean_abs = gamma * std::sqrt(2 / kPi) * std::exp(-beta * beta / (2 * gamma * gamma)) +
                              beta * (1 - 2 * normal_cdf(-beta / gamma));
      std::snprintf(what, sizeof what, "gamma = %.2f, identity", gamma);
      claims.check_near(what, row_concentration(s), mean_abs / std::sqrt(beta * beta + gamma * gamma), 0.01);
      if (beta == 0) {
        std::snprintf(what, sizeof what, "gamma = %.2f, relu^2", gamma);
        claims.check_near(what, row_concentration(s.max(0.0).square()), 1 / std::sqrt(6.0), 0.02);
      }
      // elu + 1 linear attention: predict from the feature moments of an independent sample of keys.
      const Matrix<double> fresh = (gamma * normal(kKeys / 4, kDim)).rowwise() + beta * q.row(0);
      const Matrix<double> phi_fresh = elu_features(fresh);
      const Eigen::RowVectorXd mu = phi_fresh.colwise().mean();
      const Matrix<double> centred = phi_fresh.rowwise() - mu;
      const Matrix<double> sigma = centred.transpose() * centred / double(fresh.rows());
      const Eigen::RowVectorXd q_phi = elu_features(q).row(0);
      const double mean = q_phi.dot(mu), variance = q_phi * sigma * q_phi.transpose();
      std::snprintf(what, sizeof what, "gamma = %.2f, elu+1 linear attention", gamma);
      claims.check_near(what, row_concentration((elu_features(k) * q_phi.transpose()).array()),
                        1 / std::sqrt(1 + variance / (mean * mean)), 0.02);
    }
  }

  // Bounded logits: a softcap B keeps every logit in (-B, B). The extreme row (one key far above, the rest far
  // below) reaches the bound; random logits of spread 10 stay under it.
  std::printf("\nLargest weight with logits capped at B (softcap), against 1 / (1 + (m - 1) e^(-2B)):\n");
  for (Index m : {16, 512, 4096}) {
    for (double bound : {1.0, 3.0, 6.0}) {
      AttentionOptions capped = unscaled;
      capped.softcap = bound;
      Matrix<double> k = Matrix<double>::Constant(m, 1, -1e3);
      k(0, 0) = 1e3;
      const Matrix<double> one = Matrix<double>::Ones(1, 1);
      Vector<double> lse(1);
      Matrix<double> out(1, 1);
      attnkit::scaled_dot_product_attention(one, k, Matrix<double>::Zero(m, 1), out, lse, capped);
      const double extreme = attnkit::attention_weights_from_lse(one, k, lse, {0}, capped)(0, 0);
      const double predicted = attnkit::max_attainable_weight(m, bound);
      std::snprintf(what, sizeof what, "m = %4ld, B = %.0f: extreme row", long(m), bound);
      claims.check_near(what, extreme, predicted, 1e-12);
      const Matrix<double> wild = normal(m, 1, 10);
      attnkit::scaled_dot_product_attention(one, wild, Matrix<double>::Zero(m, 1), out, lse, capped);
      const double largest = attnkit::attention_weights_from_lse(one, wild, lse, {0}, capped).maxCoeff();
      std::snprintf(what, sizeof what, "m = %4ld, B = %.0f: random logits, largest", long(m), bound);
      claims.check(what, largest, predicted, 0, predicted * (1 + 1e-12));
    }
  }
  return claims.exit_code();
}
