// Linear attention next to exact attention: how close Performer gets to softmax, where linear attention becomes
// faster, and the concentration experiment of SPEC section 6 (how peaked the attention weights can be as keys spread
// out), predicted vs measured.
//
// usage: linear_attention [max_n]     (default 8192: the crossover search doubles n up to it)
#include <attnkit/attnkit.hpp>

#include "timing.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>

using attnkit::Index;
using attnkit::Matrix;

namespace {

/// S(a) = |a|_1 / (sqrt(n) |a|_2): 1 for uniform weights, 1/sqrt(n) for one-hot.
double concentration(const Eigen::VectorXd& a) { return a.lpNorm<1>() / (std::sqrt(double(a.size())) * a.norm()); }

Eigen::MatrixXd gaussian(Index rows, Index cols, double sigma, std::mt19937_64& gen) {
  std::normal_distribution<double> dist(0.0, sigma);
  Eigen::MatrixXd x(rows, cols);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = dist(gen);
  return x;
}

Eigen::MatrixXd elu_plus_one(const Eigen::MatrixXd& x) {
  return x.unaryExpr([](double t) { return t > 0 ? t + 1 : std::exp(t); });
}

}  // namespace

int main(int argc, char** argv) {
  const Index max_n = argc > 1 ? std::atol(argv[1]) : 8192, d = 64;

  // 1. Performer estimates softmax attention; its error falls as features are added. elu+1 is a different kernel.
  {
    const Index n = 512;
    const Matrix<double> q = Matrix<double>::Random(n, d), k = Matrix<double>::Random(n, d),
                         v = Matrix<double>::Random(n, d);
    const Matrix<double> exact = attnkit::scaled_dot_product_attention(q, k, v);
    const double scale = exact.norm();
    std::printf("1. Relative difference to exact softmax attention (n = %ld, d = %ld, double):\n", long(n), long(d));
    std::printf("   elu+1: %.3f\n", (attnkit::linear_attention(q, k, v, attnkit::EluPlusOne{}) - exact).norm() / scale);
    for (const Index m : {64, 256, 1024, 4096}) {
      attnkit::LinearOptions o;
      o.eps = 0;
      const double err =
          (attnkit::linear_attention(q, k, v, attnkit::PerformerFeatures<double>(d, m, 1), o) - exact).norm() / scale;
      std::printf("   Performer, m = %4ld orthogonal features: %.4f\n", long(m), err);
    }
  }

  // 2. The crossover: exact attention costs O(n^2 d), linear O(n d^2).
  {
    std::printf("\n2. Time per call, one thread, float, d = %ld (ms):\n", long(d));
    std::printf("   %6s %10s %10s %12s %12s\n", "n", "exact", "elu+1", "exact causal", "elu+1 causal");
    Index crossover = -1, crossover_causal = -1;
    for (Index n = 64; n <= max_n; n *= 2) {
      const Matrix<float> q = Matrix<float>::Random(n, d), k = Matrix<float>::Random(n, d),
                          v = Matrix<float>::Random(n, d);
      Matrix<float> out(n, d);
      attnkit::AttentionOptions exact;
      exact.threads = 1;
      attnkit::LinearOptions linear;
      linear.threads = 1;
      const int calls = n <= 1024 ? 20 : 3;
      double t[4];
      for (int causal = 0; causal < 2; ++causal) {
        exact.causal = linear.causal = causal != 0;
        t[2 * causal] = best_ms([&] { attnkit::scaled_dot_product_attention(q, k, v, out, exact); }, calls);
        t[2 * causal + 1] =
            best_ms([&] { attnkit::linear_attention(q, k, v, out, attnkit::EluPlusOne{}, linear); }, calls);
      }
      std::printf("   %6ld %10.3f %10.3f %12.3f %12.3f\n", long(n), t[0], t[1], t[2], t[3]);
      if (crossover < 0 && t[1] < t[0]) crossover = n;
      if (crossover_causal < 0 && t[3] < t[2]) crossover_causal = n;
    }
    std::printf("   linear (elu+1) is faster from n = %ld (non-causal) and n = %ld (causal); -1 = not up to %ld\n",
                long(crossover), long(crossover_causal), long(max_n));
  }

  // 3. Concentration (SPEC section 6): keys k ~ N(0, sigma^2 I), one query q with |q| = 1, so beta = q.mu = 0 and
  // gamma = sigma. Weights over n keys: softmax a_j = exp(q.k_j) has S -> exp(-gamma^2 / 2) (it can concentrate
  // without bound); identity a_j = q.k_j has S -> sqrt(2 / pi) ~ 0.80 and relu^2 has S -> 1 / sqrt(6) ~ 0.41 at any
  // gamma; non-negative linear attention a_j = phi(q).phi(k_j) has S = 1 / sqrt(1 + q~' C q~ / (q~' mu~)^2), with
  // mu~ and C the mean and covariance of phi(k), q~ = phi(q) (estimated here from an independent sample).
  {
    const Index n = 20000, dim = 8;
    std::mt19937_64 gen(7);
    Eigen::VectorXd q = gaussian(dim, 1, 1.0, gen).col(0);
    q /= q.norm();
    std::printf("\n3. Concentration S of the weights over n = %ld keys, d = %ld (smaller = more peaked):\n", long(n),
                long(dim));
    std::printf("   %5s | %8s %9s | %8s %9s | %8s %9s | %8s %9s\n", "sigma", "softmax", "predicted", "identity",
                "predicted", "relu^2", "predicted", "elu+1", "predicted");
    for (const double sigma : {0.25, 0.5, 1.0, 1.5, 2.0, 3.0}) {
      const Eigen::MatrixXd keys = gaussian(n, dim, sigma, gen);
      const Eigen::VectorXd s = keys * q;
      const Eigen::VectorXd soft = (s.array() - s.maxCoeff()).exp().matrix();
      const Eigen::VectorXd relu2 = s.array().max(0.0).square().matrix();
      const Eigen::MatrixXd phi_q = elu_plus_one(q.transpose());
      const Eigen::VectorXd elu = elu_plus_one(keys) * phi_q.transpose();
      // The elu+1 prediction from an independent sample of phi(k).
      const Eigen::MatrixXd f = elu_plus_one(gaussian(n, dim, sigma, gen));
      const Eigen::RowVectorXd mu = f.colwise().mean();
      const Eigen::MatrixXd centred = f.rowwise() - mu;
      const Eigen::MatrixXd cov = centred.transpose() * centred / double(n - 1);
      const double qmu = (phi_q * mu.transpose())(0, 0), qcq = (phi_q * cov * phi_q.transpose())(0, 0);
      std::printf("   %5.2f | %8.3f %9.3f | %8.3f %9.3f | %8.3f %9.3f | %8.3f %9.3f\n", sigma, concentration(soft),
                  std::exp(-sigma * sigma / 2), concentration(s), std::sqrt(2 / M_PI), concentration(relu2),
                  1 / std::sqrt(6.0), concentration(elu), 1 / std::sqrt(1 + qcq / (qmu * qmu)));
    }
    std::printf(
        "   Softmax weights concentrate as keys spread out; linear attention's cannot fall below its floor.\n"
        "   (The softmax prediction is the n -> infinity limit: for sigma >= 2 it needs n >> e^(sigma^2) keys.)\n");
  }
  return 0;
}
