// Running a causal RoPE attention layer beyond the length L it was "trained" at (SPEC section 6).
//
// With RoPE, the score of query i and key j depends on the relative position i - j. Queries and keys here share a
// direction c (q_i = c + noise, k_j = c + noise, before rotation), so the score carries a pattern
// sum_p |c_p|^2 cos((i - j) theta_p) over relative positions, as a trained layer's would. Trained at length L, the
// layer has only met relative positions 0 .. L-1 and rows of at most L keys. Evaluated at 4 L:
//
//   full causal attention: row i sees i + 1 keys and relative positions up to i, never met in training; its entropy
//     keeps growing (about log(i + 1) for spread-out weights) past anything seen in training;
//   causal window of L keys (j in [i - L + 1, i], SPEC's baseline): every row beyond L sees exactly the keys and
//     relative positions of training row L - 1, so its entropy stays in the trained range;
//   log-n scaling (logits times log(n_i) / log(512), with L = 512 so the factor is 1 at the training length): it
//     sharpens the long rows, so their entropy grows more slowly, but they still reach unseen relative positions.
//
// Weights of sampled rows come from the fused kernel's log-sum-exp (attention_weights_from_lse), never an n x n
// matrix. Exits non-zero when a check fails.
//
// usage: length_extrapolation
#include <attnkit/attnkit.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "claims.hpp"

using attnkit::AttentionOptions;
using attnkit::Index;
using attnkit::Matrix;
using attnkit::Vector;

namespace {

constexpr Index kDim = 64, kTrained = 512, kLength = 4 * kTrained;
constexpr Index kRowsPerBucket = 64;
constexpr double kLengthOfC = 8;
constexpr Index kTrainingRuns = 64;

struct Bucket {
  double entropy = 0;    ///< mean entropy of the sampled rows
  Index keys = 0;        ///< most keys any sampled row attends to (weight > 0)
  Index farthest = 0;    ///< largest relative position i - j with weight > 0
  double unseen = 0;     ///< mean attention mass on relative positions >= L (never met in training)
};

/// Rows [first, last) sampled evenly, kRowsPerBucket of them, first and last - 1 included.
std::vector<Index> sample(Index first, Index last) {
  std::vector<Index> rows;
  for (Index r = 0; r < kRowsPerBucket; ++r) rows.push_back(first + r * (last - 1 - first) / (kRowsPerBucket - 1));
  return rows;
}

/// Attention statistics of the sampled rows of [first, last) under `options`.
Bucket measure(const Matrix<double>& q, const Matrix<double>& k, const AttentionOptions& options, Index first,
               Index last) {
  Matrix<double> out(q.rows(), 1);
  Vector<double> lse(q.rows());
  attnkit::scaled_dot_product_attention(q, k, Matrix<double>::Zero(k.rows(), 1), out, lse, options);
  const std::vector<Index> rows = sample(first, last);
  const Matrix<double> p = attnkit::attention_weights_from_lse(q, k, lse, rows, options);
  Bucket b;
  b.entropy = attnkit::row_entropy(p).mean();
  for (Index r = 0; r < p.rows(); ++r) {
    const Index i = rows[size_t(r)];
    Index keys = 0;
    for (Index j = 0; j <= i; ++j) {
      if (p(r, j) <= 0) continue;
      ++keys;
      b.farthest = std::max(b.farthest, i - j);
      if (i - j >= kTrained) b.unseen += p(r, j) / double(p.rows());
    }
    b.keys = std::max(b.keys, keys);
  }
  return b;
}

}  // namespace

int main() {
  Claims claims;
  Gaussian normal(5);
  // Queries c, keys c plus unit noise (c of length 8), then RoPE at each row's position.
  const Matrix<double> c = normal(1, kDim) * (kLengthOfC / std::sqrt(double(kDim)));
  Matrix<double> q = c.replicate(kLength, 1);
  Matrix<double> k = normal(kLength, kDim).rowwise() + c.row(0);
  attnkit::apply_rope<double>(q, 0);
  attnkit::apply_rope<double>(k, 0);

  AttentionOptions full, window, log_n;
  full.causal = window.causal = log_n.causal = true;
  window.window_left = kTrained - 1;
  log_n.log_n_scale = true;
  const struct {
    const char* name;
    AttentionOptions options;
  } variants[] = {{"full causal", full}, {"window of L keys", window}, {"full + log-n scaling", log_n}};

  // "Training": kTrainingRuns sequences of length L with fresh key noise. The longest row, L - 1, attends to L keys
  // at relative positions 0 .. L-1; its entropy over the runs is the trained range for a row of that length.
  Vector<double> trained(kTrainingRuns);
  for (Index t = 0; t < kTrainingRuns; ++t) {
    Matrix<double> qt = c.replicate(kTrained, 1), kt = normal(kTrained, kDim).rowwise() + c.row(0);
    attnkit::apply_rope<double>(qt, 0);
    attnkit::apply_rope<double>(kt, 0);
    trained(t) = measure(qt, kt, full, kTrained - 1, kTrained).entropy;
  }
  const double trained_mean = trained.mean();
  std::printf("RoPE attention trained at L = %ld, evaluated at n = %ld (d = %ld, %ld rows sampled per range)\n",
              long(kTrained), long(kLength), long(kDim), long(kRowsPerBucket));
  std::printf("Training, row L - 1 over %ld runs: entropy %.3f .. %.3f, mean %.3f\n\n", long(kTrainingRuns),
              trained.minCoeff(), trained.maxCoeff(), trained_mean);
  std::printf("  %-22s %-14s %12s %6s %14s %18s\n", "variant", "rows", "mean entropy", "keys", "max rel. pos.",
              "mass at i-j >= L");
  Bucket last[3];
  for (int v = 0; v < 3; ++v) {
    for (Index b = 1; b < 4; ++b) {
      const Bucket m = measure(q, k, variants[v].options, b * kTrained, (b + 1) * kTrained);
      std::printf("  %-22s [%4ld, %4ld)   %12.3f %6ld %14ld %18.3f\n", variants[v].name, long(b * kTrained),
                  long((b + 1) * kTrained), m.entropy, long(m.keys), long(m.farthest), m.unseen);
      last[v] = m;
    }
  }

  std::printf("\nChecks on rows [3L, 4L):\n");
  const Bucket &f = last[0], &w = last[1], &g = last[2];
  claims.check("window: keys per row", double(w.keys), double(kTrained), double(kTrained), double(kTrained));
  claims.check("window: largest relative position", double(w.farthest), double(kTrained - 1), 0,
               double(kTrained - 1));
  // The window rows are statistically row L - 1 of training: the means agree within their sampling error (~0.03).
  claims.check("window: mean entropy", w.entropy, trained_mean, trained_mean - 0.1, trained_mean + 0.1);
  claims.check("full: largest relative position", double(f.farthest), ">= L", double(kTrained), double(kLength - 1));
  claims.check("full: mass on unseen relative positions", f.unseen, "> 0", 0.2, 1);
  claims.check("full: mean entropy minus trained", f.entropy - trained_mean, "> 0", 0.5, 10);
  claims.check("log-n: mass on unseen relative positions", g.unseen, "> 0", 0.1, 1);
  claims.check("log-n: entropy growth over full's", (g.entropy - trained_mean) / (f.entropy - trained_mean),
               "< 1", 0, 0.95);

  // Inside the trained length the window masks nothing: rows [0, L) equal full attention.
  const Matrix<double> v = normal(kLength, 8);
  const Matrix<double> of = attnkit::scaled_dot_product_attention(q, k, v, full);
  const Matrix<double> ow = attnkit::scaled_dot_product_attention(q, k, v, window);
  claims.check("rows [0, L): |window - full|", (of.topRows(kTrained) - ow.topRows(kTrained)).cwiseAbs().maxCoeff(),
               0.0, 0, 1e-12);
  return claims.exit_code();
}
