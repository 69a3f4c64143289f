// Analysis functions on hand-computed cases: entropy of uniform and one-hot rows, the concentration metric's two
// ends, the max-weight bound against softmax at the extreme logits, and weights rebuilt from the kernel's lse against
// the materialising oracle.
#include <attnkit/analysis.hpp>
#include <attnkit/reference.hpp>

#include <limits>
#include <vector>

#include "test_util.hpp"

namespace attnkit {
namespace {

using testing::all_close;
using testing::as_double;
using testing::expect_error;
using testing::MatD;
using testing::random_matrix;

TEST(Analysis, EntropyOfUniformIsLogNAndOfOneHotIsZero) {
  for (Index n : {1, 2, 7, 64}) {
    const MatD uniform = MatD::Constant(3, n, 1.0 / double(n));
    EXPECT_NEAR(row_entropy(uniform)(1), std::log(double(n)), 1e-12) << n;
    MatD one_hot = MatD::Zero(2, n);
    one_hot(0, n - 1) = 1, one_hot(1, 0) = 1;
    EXPECT_EQ(row_entropy(one_hot)(0), 0.0);
    EXPECT_EQ(row_entropy(one_hot)(1), 0.0);
  }
  // p = (1/2, 1/4, 1/4): 1.5 log 2.
  const Matrix<float> p = (Matrix<float>(1, 3) << 0.5f, 0.25f, 0.25f).finished();
  EXPECT_NEAR(row_entropy(p)(0), 1.5 * std::log(2.0), 1e-7);
  expect_error([] { row_entropy((MatD(1, 2) << 0.5, -0.5).finished()); }, {"row_entropy", ">= 0", "(0, 1)"});
  expect_error([] { row_entropy((MatD(1, 2) << std::numeric_limits<double>::quiet_NaN(), 1).finished()); },
               {"finite"});
}

TEST(Analysis, ConcentrationRunsFromOneOverRootNToOne) {
  for (Index n : {1, 4, 9, 100}) {
    MatD rows = MatD::Zero(3, n);
    rows.row(0).setConstant(1.0 / double(n));  // uniform
    rows(1, n / 2) = 1;                         // one-hot
    const Vector<double> s = concentration(rows);
    EXPECT_NEAR(s(0), 1.0, 1e-12);
    EXPECT_NEAR(s(1), 1.0 / std::sqrt(double(n)), 1e-12);
    EXPECT_EQ(s(2), 0.0) << "a zero row, where S is undefined";
  }
  // Half the keys equal, the others zero: S = sqrt(1/2).
  const MatD half = (MatD(1, 4) << 1, 1, 0, 0).finished();
  EXPECT_NEAR(concentration(half)(0), std::sqrt(0.5), 1e-12);
}

TEST(Analysis, MaxAttainableWeightIsSoftmaxAtTheExtremeLogits) {
  for (Index n : {1, 2, 10, 1000})
    for (double bound : {0.0, 0.5, 3.0}) {
      // One key at +bound, the others at -bound.
      const double expected = std::exp(bound) / (std::exp(bound) + double(n - 1) * std::exp(-bound));
      EXPECT_NEAR(max_attainable_weight(n, bound), expected, 1e-14) << n << " " << bound;
    }
  EXPECT_EQ(max_attainable_weight(1, 0), 1.0);
  EXPECT_DOUBLE_EQ(max_attainable_weight(5, 0), 0.2);
  expect_error([] { max_attainable_weight(0, 1); }, {"n must be >= 1"});
  expect_error([] { max_attainable_weight(4, -1); }, {"bound"});
}

TEST(PerturbedMasking, ImpactOfATokenTheEncoderIgnoresIsZero) {
  // H(x)_i = x_i + sum of every row but row 2: token 2 never affects another token's encoding.
  const auto encoder = [](const MatD& x) {
    MatD h = x;
    const MatD others = x.colwise().sum() - x.row(2);
    h.rowwise() += others.row(0);
    return h;
  };
  const MatD x = random_matrix<double>(6, 4, 1);
  const MatD mask = MatD::Zero(1, 4);
  const Matrix<double> impact = impact_matrix(encoder, x, mask);
  for (Index i = 0; i < 6; ++i) {
    EXPECT_EQ(impact(i, i), 0.0);
    if (i != 2) {
      EXPECT_NEAR(impact(i, 2), 0.0, 1e-12) << i;
    }
    // Any other token j moves row i by |x_j - mask| = |x_j|.
    for (Index j = 0; j < 6; ++j) {
      if (j != i && j != 2) {
        EXPECT_NEAR(impact(i, j), x.row(j).norm(), 1e-12) << i << " " << j;
      }
    }
  }
  expect_error([&] { impact_matrix(encoder, x, MatD::Zero(1, 3)); }, {"mask_embedding", "1x3", "1x4"});
  const auto bad = [](const MatD& in) { return MatD(in.topRows(1)); };
  expect_error([&] { impact_matrix(bad, x, mask); }, {"encoder returned", "1x4"});
}

TEST(PerturbedMasking, SegmentsAndParseOfAHandMadeImpactMatrix) {
  // Tokens 0-2 and 3-4 are two strongly coupled groups; inside the first, 0 and 1 are closer than 2.
  MatD impact = MatD::Constant(5, 5, 0.1);
  impact.block(0, 0, 3, 3).setConstant(1.0);
  impact.block(0, 0, 2, 2).setConstant(2.0);
  impact.block(3, 3, 2, 2).setConstant(1.5);
  impact.diagonal().setZero();
  EXPECT_EQ(segment(impact, 0.5), (std::vector<Index>{0, 3}));
  EXPECT_EQ(segment(impact, 1.2), (std::vector<Index>{0, 2, 3}));
  EXPECT_EQ(segment(impact, 5.0), (std::vector<Index>{0, 1, 2, 3, 4}));
  const std::vector<ParseNode> tree = parse_tree(impact);
  EXPECT_EQ(tree[0].begin, 0);
  EXPECT_EQ(tree[0].end, 5);
  EXPECT_EQ(tree[size_t(tree[0].left)].end, 3) << "the root splits between the groups";
  EXPECT_EQ(bracketed(tree, {"a", "b", "c", "d", "e"}), "(((a b) c) (d e))");
  EXPECT_EQ(tree.size(), 9u) << "a binary tree over 5 leaves has 9 nodes";
  expect_error([] { segment(MatD::Zero(2, 3), 0); }, {"square", "2x3"});
  expect_error([] { parse_tree(MatD::Zero(2, 3)); }, {"square"});
  EXPECT_TRUE(parse_tree(MatD(0, 0)).empty());
}

template <class S>
class AnalysisTyped : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(AnalysisTyped, Scalars, testing::ScalarName);

TYPED_TEST(AnalysisTyped, WeightsFromTheStoredLogSumExpMatchTheOracle) {
  using S = TypeParam;
  const Index n = 37, m = 300, d = 16;
  const Matrix<S> q = random_matrix<S>(n, d, 1), k = random_matrix<S>(m, d, 2), v = random_matrix<S>(m, 8, 3);
  std::vector<AttentionOptions> cases(4);
  cases[1].causal = true;
  cases[2].window_left = 20, cases[2].alibi_slope = 0.1, cases[2].softcap = 3;
  cases[3].key_length = 0;  // no key at all: zero weights
  for (size_t t = 0; t < cases.size(); ++t) {
    Matrix<S> out(n, 8);
    Vector<S> lse(n);
    scaled_dot_product_attention(q, k, v, out, lse, cases[t]);
    const std::vector<Index> rows = {0, 5, 36};
    const Matrix<S> p = attention_weights_from_lse(q, k, lse, rows, cases[t]);
    const Matrix<S> all = reference::attention_weights(q, k, cases[t]);
    for (size_t r = 0; r < rows.size(); ++r)
      EXPECT_TRUE(all_close(p.row(Index(r)), as_double(Matrix<S>(all.row(rows[r]))),
                            std::is_same_v<S, float> ? 1e-5 : 1e-12))
          << "case " << t << ", row " << rows[r];
  }
  Vector<S> lse = Vector<S>::Zero(n), short_lse = Vector<S>::Zero(3);
  expect_error([&] { attention_weights_from_lse(q, k, lse, {n}, {}); }, {"row 37", "n = 37"});
  expect_error([&] { attention_weights_from_lse(q, k, short_lse, {0}, {}); }, {"lse has 3", "n = 37"});
}

}  // namespace
}  // namespace attnkit
