// Sparse attention patterns (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"; Su's local +
// atrous combination): each pattern's mask for n = 16 drawn as a grid like the paper's figures, a check that the sparse
// kernel equals dense attention with that mask, and the measured speed-up over dense attention at a long length.
//
// usage: sparse_patterns [n]     (default n = 16384; timings are one thread, best of a few calls)
#include <attnkit/attnkit.hpp>

#include "timing.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using attnkit::Index;
using attnkit::Matrix;
using attnkit::SparsePattern;

namespace {

struct Named {
  std::string name;
  SparsePattern pattern;
  bool causal;
};

/// A BigBird-like block layout: a band of three blocks plus a global first block row and column.
attnkit::BoolMatrix band_and_global(Index n, Index block) {
  const Index blocks = (n + block - 1) / block;
  attnkit::BoolMatrix layout = attnkit::BoolMatrix::Constant(blocks, blocks, false);
  for (Index b = 0; b < blocks; ++b)
    for (Index c = std::max<Index>(0, b - 1); c <= std::min(blocks - 1, b + 1); ++c) layout(b, c) = true;
  layout.col(0).setConstant(true);
  layout.row(0).setConstant(true);
  return layout;
}

/// The patterns at a scale that suits length n: window and stride about sqrt(n), as the paper suggests.
std::vector<Named> patterns(Index n) {
  const Index l = std::max<Index>(2, Index(std::sqrt(double(n)))), block = std::max<Index>(2, l / 2);
  return {{"local(" + std::to_string(l) + ")", SparsePattern::local(l), false},
          {"atrous(" + std::to_string(l) + ")", SparsePattern::atrous(l), false},
          {"local_atrous(" + std::to_string(l) + ")", SparsePattern::local_atrous(l), false},
          {"strided(" + std::to_string(l) + "), causal", SparsePattern::strided(l), true},
          {"fixed(" + std::to_string(l) + ", " + std::to_string(std::max<Index>(1, l / 8)) + "), causal",
           SparsePattern::fixed(l, std::max<Index>(1, l / 8)), true},
          {"block(" + std::to_string(block) + ", band + global)",
           SparsePattern::block(band_and_global(n, block), block), false}};
}

}  // namespace

int main(int argc, char** argv) {
  const Index n_long = argc > 1 ? std::atol(argv[1]) : 16384, d = 64, n_grid = 16;

  // 1. The masks at n = 16: '#' = attends, '.' = skipped; row i is a query, column j a key.
  std::printf("Each pattern at n = %ld (rows: queries, columns: keys, '#' = attends)\n\n", long(n_grid));
  for (const Named& p : patterns(n_grid)) {
    attnkit::AttentionOptions o;
    o.causal = p.causal;
    const attnkit::BoolMatrix mask = p.pattern.mask(n_grid, n_grid, o);
    std::printf("%s: %ld of %ld pairs\n", p.name.c_str(), long(mask.count()), long(mask.size()));
    for (Index i = 0; i < n_grid; ++i) {
      std::string row;
      for (Index j = 0; j < n_grid; ++j) row += mask(i, j) ? "# " : ". ";
      std::printf("  %s\n", row.c_str());
    }
    std::printf("\n");
  }

  // 2. Sparse == dense attention with the pattern's boolean mask (n = 300, odd on purpose).
  const Index n_check = 300;
  const Matrix<double> q = Matrix<double>::Random(n_check, d), k = Matrix<double>::Random(n_check, d),
                       v = Matrix<double>::Random(n_check, d);
  double worst = 0;
  for (const Named& p : patterns(n_check)) {
    attnkit::AttentionOptions o;
    o.causal = p.causal;
    const Matrix<double> sparse = attnkit::sparse_attention(q, k, v, p.pattern, o);
    const Matrix<double> dense = attnkit::reference::sparse_attention(q, k, v, p.pattern, o);
    worst = std::max(worst, (sparse - dense).cwiseAbs().maxCoeff());
  }
  std::printf("max |sparse - dense with the mask| over every pattern at n = %ld (double): %.2e\n\n", long(n_check),
              worst);

  // 3. Speed-up over dense attention at n_long, one thread: time follows the allowed pairs, not n^2.
  const Matrix<float> ql = Matrix<float>::Random(n_long, d), kl = Matrix<float>::Random(n_long, d),
                      vl = Matrix<float>::Random(n_long, d);
  Matrix<float> out(n_long, d);
  attnkit::AttentionOptions one;
  one.threads = 1;
  const double dense_ms = best_ms([&] { attnkit::scaled_dot_product_attention(ql, kl, vl, out, one); }, 2);
  std::printf("n = %ld, d = %ld, one thread: dense attention %.1f ms\n", long(n_long), long(d), dense_ms);
  std::printf("  %-34s %12s %10s %10s\n", "pattern", "keys/query", "ms", "speed-up");
  for (const Named& p : patterns(n_long)) {
    attnkit::AttentionOptions o = one;
    o.causal = p.causal;
    const double ms = best_ms([&] { attnkit::sparse_attention(ql, kl, vl, out, p.pattern, o); }, 3);
    Index pairs = 0;  // |A_i| summed, sampled every 64th row to stay O(n) here
    for (Index i = 0; i < n_long; i += 64) pairs += Index(p.pattern.keys(i, n_long, n_long, o).size());
    const double per_query = double(pairs) / double((n_long + 63) / 64);
    std::printf("  %-34s %12.0f %10.2f %9.1fx\n", p.name.c_str(), per_query, ms, dense_ms / ms);
  }
  return worst < 1e-12 ? 0 : 1;
}
