// Sparse attention: the index sets against SPEC section 2 written out independently here, and the kernel against the
// double-precision loop oracle with the equivalent boolean mask, and against the fused dense kernel with that mask.
#include <attnkit/sparse.hpp>

#include <algorithm>
#include <functional>
#include <numeric>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "test_util.hpp"

namespace attnkit {
namespace {

using testing::all_close;
using testing::attention_tolerance;
using testing::MatD;
using testing::naive_attention;
using testing::random_matrix;

Index fdiv(Index a, Index b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
Index fmod_(Index a, Index b) { return a - fdiv(a, b) * b; }

/// SPEC section 2, one predicate per pattern, on query position a and key j (non-causal sets; callers add causal).
using Spec = std::function<bool(Index i, Index a, Index j)>;

Spec spec_local(Index w) {
  return [w](Index, Index a, Index j) { return std::abs(a - j) <= w; };
}
Spec spec_atrous(Index k, Index window = -1) {
  return [=](Index, Index a, Index j) { return fmod_(a - j, k) == 0 && (window < 0 || std::abs(a - j) <= window); };
}
Spec spec_local_atrous(Index k) {
  return [k](Index, Index a, Index j) { return std::abs(a - j) <= k || fmod_(a - j, k) == 0; };
}
Spec spec_strided(Index l) {
  return [l](Index, Index a, Index j) {
    return (std::max<Index>(0, a - l) <= j && j <= a) || (j <= a && fmod_(a - j, l) == 0);
  };
}
Spec spec_fixed(Index l, Index c) {
  return [=](Index, Index a, Index j) { return fdiv(j, l) == fdiv(a, l) || j % l >= l - c; };
}
Spec spec_block(const BoolMatrix& layout, Index b) {
  return [layout, b](Index i, Index, Index j) { return layout(i / b, j / b); };
}
Spec spec_union(Spec x, Spec y) {
  return [x, y](Index i, Index a, Index j) { return x(i, a, j) || y(i, a, j); };
}

/// The boolean mask of a spec with the options' causal / window / padding applied, for the oracle.
BoolMatrix spec_mask(const Spec& spec, Index n, Index m, const AttentionOptions& o) {
  const Index shift = o.align == CausalAlign::kBottomRight ? m - n : 0;
  BoolMatrix b(n, m);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < m; ++j) {
      const Index a = i + shift;
      bool ok = spec(i, a, j);
      if (o.causal && j > a) ok = false;
      if (o.window_left >= 0 && j < a - o.window_left) ok = false;
      if (o.window_right >= 0 && j > a + o.window_right) ok = false;
      if (o.key_length >= 0 && j >= o.key_length) ok = false;
      b(i, j) = ok;
    }
  return b;
}

BoolMatrix random_layout(Index rows, Index cols, unsigned seed, double density) {
  std::mt19937 gen(seed);
  std::bernoulli_distribution on(density);
  BoolMatrix b(rows, cols);
  for (Index i = 0; i < b.size(); ++i) b.data()[i] = on(gen);
  return b;
}

struct Case {
  std::string name;
  SparsePattern pattern;
  Spec spec;
};

/// Every named pattern, with parameters scaled to n, plus unions (direct + gathered, two gathered, blocks + local,
/// blocks of two sizes).
std::vector<Case> cases(Index n, Index m) {
  const Index l = std::max<Index>(2, Index(std::sqrt(double(std::max(n, m)))));
  const Index b = 4;
  const BoolMatrix layout = random_layout((n + b - 1) / b, (m + b - 1) / b, unsigned(n * 31 + m), 0.3);
  const BoolMatrix layout3 = random_layout((n + 2) / 3, (m + 2) / 3, unsigned(n * 17 + m), 0.2);
  return {
      {"local3", SparsePattern::local(3), spec_local(3)},
      {"local0", SparsePattern::local(0), spec_local(0)},
      {"atrous3", SparsePattern::atrous(3), spec_atrous(3)},
      {"atrous2_window9", SparsePattern::atrous(2, 9), spec_atrous(2, 9)},
      {"atrous1", SparsePattern::atrous(1), spec_atrous(1)},
      {"local_atrous" + std::to_string(l), SparsePattern::local_atrous(l), spec_local_atrous(l)},
      {"strided" + std::to_string(l), SparsePattern::strided(l), spec_strided(l)},
      {"fixed" + std::to_string(l) + "_2", SparsePattern::fixed(l, 2), spec_fixed(l, 2)},
      {"fixed5_5", SparsePattern::fixed(5, 5), spec_fixed(5, 5)},
      {"fixed4_0", SparsePattern::fixed(4, 0), spec_fixed(4, 0)},
      {"block4", SparsePattern::block(layout, b), spec_block(layout, b)},
      {"block4_or_local2", SparsePattern::block(layout, b) | SparsePattern::local(2),
       spec_union(spec_block(layout, b), spec_local(2))},
      {"block4_or_block3", SparsePattern::block(layout, b) | SparsePattern::block(layout3, 3),
       spec_union(spec_block(layout, b), spec_block(layout3, 3))},  // rows share keys only within both blocks
      {"atrous3_or_atrous2", SparsePattern::atrous(3) | SparsePattern::atrous(2),
       spec_union(spec_atrous(3), spec_atrous(2))},
      {"fixed4_1_or_atrous5", SparsePattern::fixed(4, 1) | SparsePattern::atrous(5),
       spec_union(spec_fixed(4, 1), spec_atrous(5))},
      // Segments whose closing keys two column terms of their length hold, and a segment beside a band and columns
      // of another length (SparseProblem leaves a segment's closing columns to the columns' call).
      {"fixed6_2_or_fixed6_4", SparsePattern::fixed(6, 2) | SparsePattern::fixed(6, 4),
       spec_union(spec_fixed(6, 2), spec_fixed(6, 4))},
      {"fixed6_2_or_local2_or_fixed4_1",
       SparsePattern::fixed(6, 2) | SparsePattern::local(2) | SparsePattern::fixed(4, 1),
       spec_union(spec_union(spec_fixed(6, 2), spec_local(2)), spec_fixed(4, 1))},
  };
}

TEST(SparsePatternTest, IndexSetsMatchSpec) {
  for (const Index n : {1, 2, 7, 16, 65}) {
    for (const Index m : {n, n + 5, std::max<Index>(1, n / 2)}) {
      for (const bool causal : {false, true}) {
        for (const CausalAlign align : {CausalAlign::kBottomRight, CausalAlign::kTopLeft}) {
          AttentionOptions o;
          o.causal = causal, o.align = align;
          for (const Case& c : cases(n, m)) {
            SCOPED_TRACE(c.name + " n=" + std::to_string(n) + " m=" + std::to_string(m) + (causal ? " causal" : "") +
                         (align == CausalAlign::kTopLeft ? " top-left" : ""));
            const BoolMatrix expected = spec_mask(c.spec, n, m, o);
            for (Index i = 0; i < n; ++i) {
              std::vector<Index> want;
              for (Index j = 0; j < m; ++j)
                if (expected(i, j)) want.push_back(j);
              ASSERT_EQ(c.pattern.keys(i, n, m, o), want) << "row " << i;
            }
          }
        }
      }
    }
  }
}

TEST(SparsePatternTest, BordersOfTheNamedSets) {
  // Row 0 and the last row, written out by hand from SPEC for n = m = 10.
  using V = std::vector<Index>;
  EXPECT_EQ(SparsePattern::local(2).keys(0, 10, 10), (V{0, 1, 2}));
  EXPECT_EQ(SparsePattern::local(2).keys(9, 10, 10), (V{7, 8, 9}));
  AttentionOptions causal;
  causal.causal = true;
  EXPECT_EQ(SparsePattern::local(2).keys(5, 10, 10, causal), (V{3, 4, 5}));
  EXPECT_EQ(SparsePattern::atrous(3).keys(4, 10, 10), (V{1, 4, 7}));
  EXPECT_EQ(SparsePattern::atrous(3, 3).keys(4, 10, 10), (V{1, 4, 7}));
  EXPECT_EQ(SparsePattern::atrous(3, 2).keys(4, 10, 10), (V{4}));
  EXPECT_EQ(SparsePattern::local_atrous(3).keys(8, 10, 10), (V{2, 5, 6, 7, 8, 9}));
  EXPECT_EQ(SparsePattern::strided(3).keys(8, 10, 10), (V{2, 5, 6, 7, 8}));
  EXPECT_EQ(SparsePattern::strided(3).keys(1, 10, 10), (V{0, 1}));
  EXPECT_EQ(SparsePattern::fixed(4, 1).keys(5, 10, 10), (V{3, 4, 5, 6, 7}));
  EXPECT_EQ(SparsePattern::fixed(4, 1).keys(5, 10, 10, causal), (V{3, 4, 5}));
  EXPECT_EQ(SparsePattern::fixed(4, 2).keys(9, 10, 10), (V{2, 3, 6, 7, 8, 9}));
  BoolMatrix layout(3, 3);
  layout << true, false, false, false, false, true, true, true, false;
  EXPECT_EQ(SparsePattern::block(layout, 4).keys(5, 10, 10), (V{8, 9}));
  EXPECT_EQ(SparsePattern::block(layout, 4).keys(9, 10, 10), (V{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_EQ(SparsePattern::block(layout, 4).keys(4, 10, 10), (V{8, 9}));
  EXPECT_EQ(SparsePattern::block(layout, 4).keys(3, 10, 10), (V{0, 1, 2, 3}));
}

template <class S>
class SparseTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SparseTest, Scalars, testing::ScalarName);

/// sparse_attention == the double loop oracle with the spec's mask, and == the fused dense kernel with that mask.
template <class S>
void expect_matches(const Case& c, Index n, Index m, Index d, Index dv, const AttentionOptions& o, unsigned seed) {
  SCOPED_TRACE(c.name + " n=" + std::to_string(n) + " m=" + std::to_string(m) + " d=" + std::to_string(d) +
               (o.causal ? " causal" : ""));
  const Matrix<S> q = random_matrix<S>(n, d, seed), k = random_matrix<S>(m, d, seed + 1),
                  v = random_matrix<S>(m, dv, seed + 2);
  const BoolMatrix mask = spec_mask(c.spec, n, m, o);
  testing::NaiveExtras extras;
  extras.mask = &mask;
  const MatD expected =
      naive_attention(q.template cast<double>(), k.template cast<double>(), v.template cast<double>(), o, extras).out;
  const Matrix<S> out = sparse_attention(q, k, v, c.pattern, o);
  const double tol = attention_tolerance<S>(m) * (1 + v.cwiseAbs().maxCoeff());
  EXPECT_TRUE(all_close(out, expected, tol));
  const Matrix<S> dense = scaled_dot_product_attention(q, k, v, o, mask);
  EXPECT_TRUE(all_close(out, dense.template cast<double>(), tol));
}

TYPED_TEST(SparseTest, EveryPatternEqualsMaskedDenseOnOddSizes) {
  using S = TypeParam;
  unsigned seed = 1;
  for (const Index n : {1, 7, 65, 257}) {
    for (const bool causal : {false, true}) {
      AttentionOptions o;
      o.causal = causal;
      for (const Case& c : cases(n, n)) expect_matches<S>(c, n, n, 13, 9, o, seed += 3);
    }
  }
}

TYPED_TEST(SparseTest, LongerSequenceCrossesEveryTileAndBlockOfRows) {
  using S = TypeParam;
  // n = 1000 spans several query and key tiles; 4500 rows cross a 4096-row block of the gathered path.
  unsigned seed = 100;
  for (const Case& c : cases(1000, 1000)) expect_matches<S>(c, 1000, 1000, 16, 16, {}, seed += 3);
  const Index n = 4500;
  const Matrix<S> q = random_matrix<S>(n, 8, 5), k = random_matrix<S>(n, 8, 6), v = random_matrix<S>(n, 8, 7);
  AttentionOptions o;
  o.causal = true;
  for (const SparsePattern& p : {SparsePattern::local_atrous(67), SparsePattern::fixed(64, 3)}) {
    const Matrix<S> out = sparse_attention(q, k, v, p, o);
    const Matrix<S> dense = scaled_dot_product_attention(q, k, v, o, p.mask(n, n, o));
    EXPECT_TRUE(all_close(out, dense.template cast<double>(), attention_tolerance<S>(n) * 8));
  }
}

TYPED_TEST(SparseTest, CrossAttentionBothAlignments) {
  using S = TypeParam;
  unsigned seed = 200;
  for (const auto& [n, m] : {std::pair<Index, Index>{7, 65}, {65, 7}, {31, 100}, {100, 31}}) {
    for (const CausalAlign align : {CausalAlign::kBottomRight, CausalAlign::kTopLeft}) {
      for (const bool causal : {false, true}) {
        AttentionOptions o;
        o.causal = causal, o.align = align;
        for (const Case& c : cases(n, m)) expect_matches<S>(c, n, m, 5, 11, o, seed += 3);
      }
    }
  }
}

TYPED_TEST(SparseTest, CombinesWithEveryOption) {
  using S = TypeParam;
  unsigned seed = 300;
  std::vector<AttentionOptions> all;
  AttentionOptions o;
  o.key_length = 50, all.push_back(o);
  o = {}, o.alibi_slope = 0.25, o.causal = true, all.push_back(o);
  o = {}, o.softcap = 2.0, o.scale = 0.7, all.push_back(o);
  o = {}, o.log_n_scale = true, all.push_back(o);
  o = {}, o.log_n_scale = true, o.causal = true, o.key_length = 60, all.push_back(o);
  o = {}, o.window_left = 10, o.window_right = 3, all.push_back(o);
  o = {}, o.query_tile = 7, o.key_tile = 5, o.causal = true, all.push_back(o);
  for (const AttentionOptions& opt : all)
    for (const Case& c : cases(67, 67)) expect_matches<S>(c, 67, 67, 6, 5, opt, seed += 3);
}

TYPED_TEST(SparseTest, ALoneBandRunsAsTheDenseSlidingWindow) {
  using S = TypeParam;
  // A pattern whose only direct term is a band runs its band as a window of the dense kernel: on the same tiles the
  // two agree bit for bit, with the options' own window, causal mask and alignment folded in.
  unsigned seed = 350;
  for (const auto& [n, m] : {std::pair<Index, Index>{1, 1}, {7, 7}, {65, 65}, {257, 257}, {31, 100}, {100, 31}}) {
    for (const Index w : {0, 3, 64}) {
      for (const bool causal : {false, true}) {
        AttentionOptions o;
        o.causal = causal, o.query_tile = 12, o.key_tile = 32, o.window_right = 5;
        o.align = (n + m + w) % 2 ? CausalAlign::kTopLeft : CausalAlign::kBottomRight;
        AttentionOptions window = o;
        window.window_left = w, window.window_right = std::min<Index>(w, 5);
        const Matrix<S> q = random_matrix<S>(n, 9, seed), k = random_matrix<S>(m, 9, seed + 1),
                        v = random_matrix<S>(m, 16, seed + 2);
        seed += 3;
        EXPECT_TRUE(sparse_attention(q, k, v, SparsePattern::local(w), o) ==
                    scaled_dot_product_attention(q, k, v, window))
            << "n=" << n << " m=" << m << " w=" << w << (causal ? " causal" : "");
      }
    }
  }
}

TYPED_TEST(SparseTest, SameResultForAnyThreadCount) {
  using S = TypeParam;
  const Index n = 700;
  const Matrix<S> q = random_matrix<S>(n, 16, 1), k = random_matrix<S>(n, 16, 2), v = random_matrix<S>(n, 16, 3);
  for (const Case& c : cases(n, n)) {
    AttentionOptions one, two;
    one.threads = 1, two.threads = 2;
    const Matrix<S> a = sparse_attention(q, k, v, c.pattern, one), b = sparse_attention(q, k, v, c.pattern, two);
    EXPECT_TRUE(a == b) << c.name;
  }
}

TYPED_TEST(SparseTest, DecodingOneQueryOverManyKeys) {
  using S = TypeParam;
  // One query against 5000 keys goes split-K inside each sub-call.
  for (const Case& c : cases(1, 5000)) expect_matches<S>(c, 1, 5000, 8, 8, {}, 400);
}

TYPED_TEST(SparseTest, KeysOutsideThePatternAreNeverReachedEvenIfNaN) {
  using S = TypeParam;
  const Index n = 97;
  Matrix<S> q = random_matrix<S>(n, 8, 1), k = random_matrix<S>(n, 8, 2), v = random_matrix<S>(n, 8, 3);
  AttentionOptions o;
  o.causal = true;
  // Poison every key that row 96 may not see under local(4); other rows see them, so this checks masking, not reads.
  const SparsePattern p = SparsePattern::local_atrous(4);
  const Matrix<S> clean = sparse_attention(q, k, v, p, o);
  Matrix<S> kp = k, vp = v;
  kp.row(91).setConstant(std::numeric_limits<S>::quiet_NaN());
  vp.row(91).setConstant(std::numeric_limits<S>::infinity());
  const Matrix<S> poisoned = sparse_attention(q, kp, vp, p, o);
  // Equal up to rounding, not bit for bit: a NaN sends its residue classes from the lanes to the general calls.
  EXPECT_TRUE(poisoned.row(96).allFinite());
  EXPECT_TRUE(all_close(poisoned.row(96), clean.row(96).template cast<double>(), attention_tolerance<S>(n)));
  EXPECT_TRUE(poisoned.row(90).array().isFinite().all());
  // Padding keys are never read at all.
  o.key_length = 80;
  Matrix<S> kpad = k, vpad = v;
  kpad.bottomRows(n - 80).setConstant(std::numeric_limits<S>::quiet_NaN());
  vpad.bottomRows(n - 80).setConstant(std::numeric_limits<S>::quiet_NaN());
  EXPECT_TRUE(sparse_attention(q, kpad, vpad, p, o).array().isFinite().all());
}

TYPED_TEST(SparseTest, RowsWithNoAllowedKeyAreZero) {
  using S = TypeParam;
  BoolMatrix layout(2, 2);
  layout << false, true, false, false;  // rows 4..7 attend nothing
  const Matrix<S> q = random_matrix<S>(8, 4, 1), k = random_matrix<S>(8, 4, 2), v = random_matrix<S>(8, 4, 3);
  const Matrix<S> out = sparse_attention(q, k, v, SparsePattern::block(layout, 4));
  EXPECT_TRUE(out.bottomRows(4).isZero(0));
  EXPECT_FALSE(out.topRows(4).isZero(0));
  // atrous(10) over 3 keys: query rows whose residue has no key get zeros.
  AttentionOptions top;
  top.align = CausalAlign::kTopLeft;
  const Matrix<S> out2 = sparse_attention(q, k.topRows(3), v.topRows(3), SparsePattern::atrous(10), top);
  EXPECT_TRUE(out2.bottomRows(5).isZero(0));
}

// Found by the fuzzer: with d_v = 0 the gathered (atrous) terms sized their partial log-sum-exps together with the
// empty partial outputs, so never, and merged from past the end (an Eigen assertion under the asan preset).
TYPED_TEST(SparseTest, ZeroValueColumnsWithGatheredTerms) {
  using S = TypeParam;
  const Matrix<S> q = random_matrix<S>(37, 2, 1), k = random_matrix<S>(11, 2, 2), v(11, 0);
  AttentionOptions o;
  o.align = CausalAlign::kTopLeft, o.window_left = 3, o.key_length = 4;
  for (const SparsePattern& p : {SparsePattern::strided(4), SparsePattern::local_atrous(3), SparsePattern::fixed(4, 1),
                                 SparsePattern::atrous(3)}) {
    const Matrix<S> out = sparse_attention(q, k, v, p, o);
    EXPECT_EQ(out.rows(), 37);
    EXPECT_EQ(out.cols(), 0);
  }
}

TYPED_TEST(SparseTest, EmptySequencesAndHugeParameters) {
  using S = TypeParam;
  const Matrix<S> q = random_matrix<S>(5, 4, 1), k = random_matrix<S>(6, 4, 2), v = random_matrix<S>(6, 3, 3);
  const Index huge = std::numeric_limits<Index>::max();
  for (const SparsePattern& p : {SparsePattern::local(2), SparsePattern::local_atrous(3), SparsePattern::fixed(4, 2)}) {
    EXPECT_TRUE(sparse_attention(q, k.topRows(0), v.topRows(0), p).isZero(0));  // no keys: zeros, not NaN
    EXPECT_EQ(sparse_attention(q.topRows(0), k, v, p).rows(), 0);
  }
  // Widths and rates beyond the sequence mean "everything in reach": no overflow, same as dense attention.
  const Matrix<S> dense = scaled_dot_product_attention(q, k, v);
  for (const SparsePattern& p :
       {SparsePattern::local(huge), SparsePattern::atrous(1, huge), SparsePattern::local_atrous(huge),
        SparsePattern::strided(huge) | SparsePattern::local(huge), SparsePattern::fixed(huge, huge)})
    EXPECT_TRUE(all_close(sparse_attention(q, k, v, p), dense.template cast<double>(), attention_tolerance<S>(6) * 4));
}

TYPED_TEST(SparseTest, WritesIntoCallersBufferAndReadsMaps) {
  using S = TypeParam;
  const Index n = 33;
  std::vector<S> qbuf(n * 6), kbuf(n * 6), vbuf(n * 4);
  std::mt19937 gen(3);
  std::normal_distribution<double> dist;
  for (auto* b : {&qbuf, &kbuf, &vbuf})
    for (S& x : *b) x = S(dist(gen));
  // Column-major maps: the kernel reads them in place through strided views.
  using ColMajor = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  const Eigen::Map<const ColMajor> q(qbuf.data(), n, 6), k(kbuf.data(), n, 6), v(vbuf.data(), n, 4);
  Matrix<S> out(n, 4);
  const SparsePattern p = SparsePattern::fixed(5, 2);
  sparse_attention(q, k, v, out, p);
  const Matrix<S> expected = reference::sparse_attention(Matrix<S>(q), Matrix<S>(k), Matrix<S>(v), p);
  EXPECT_TRUE(all_close(out, expected.template cast<double>(), attention_tolerance<S>(n) * 4));
}

// Patterns with no direct term (atrous alone, unions of them) let the first gathered term's calls write their rows of
// the caller's output in place, k rows apart; later terms merge into them. Into a block of a larger buffer: every
// row right, the rest of the buffer untouched, rows whose residue class has no key zero, any thread count alike.
TYPED_TEST(SparseTest, GatheredOnlyPatternsWriteTheirRowsInPlace) {
  using S = TypeParam;
  struct Shape {
    SparsePattern pattern;
    Index n, m;
  };
  const std::vector<Shape> shapes = {{SparsePattern::atrous(1), 4500, 4500},  // a class of more than 4096 rows
                                     {SparsePattern::atrous(7), 301, 301},
                                     {SparsePattern::atrous(3, 10), 97, 131},
                                     {SparsePattern::atrous(3) | SparsePattern::atrous(2), 259, 259},
                                     {SparsePattern::atrous(10), 23, 3}};  // 7 of 10 classes without a key
  const S sentinel = S(7.25);
  for (const Shape& sh : shapes) {
    for (const bool causal : {false, true}) {
      SCOPED_TRACE("n=" + std::to_string(sh.n) + " m=" + std::to_string(sh.m) + (causal ? " causal" : ""));
      const Index dv = 5;
      const Matrix<S> q = random_matrix<S>(sh.n, 8, 1), k = random_matrix<S>(sh.m, 8, 2),
                      v = random_matrix<S>(sh.m, dv, 3);
      AttentionOptions o;
      o.causal = causal;
      o.align = CausalAlign::kTopLeft;
      const MatD expected =
          reference::sparse_attention(q.template cast<double>().eval(), k.template cast<double>().eval(),
                                      v.template cast<double>().eval(), sh.pattern, o);
      Matrix<S> first;
      for (const int threads : {1, 2}) {
        o.threads = threads;
        Matrix<S> buffer = Matrix<S>::Constant(sh.n + 3, dv + 4, sentinel);
        sparse_attention(q, k, v, buffer.block(2, 1, sh.n, dv), sh.pattern, o);
        const Matrix<S> out = buffer.block(2, 1, sh.n, dv);
        EXPECT_TRUE(all_close(out, expected, attention_tolerance<S>(sh.m) * 4));
        Matrix<S> outside = buffer;
        outside.block(2, 1, sh.n, dv).setConstant(sentinel);
        EXPECT_TRUE((outside.array() == sentinel).all()) << "wrote outside its block, threads=" << threads;
        if (threads == 1) first = out;
        EXPECT_TRUE(out == first) << "threads=" << threads;
      }
      if (sh.m == 3) {
        for (Index i = 0; i < sh.n; ++i) {
          if (i % 10 >= 3) {
            EXPECT_TRUE(first.row(i).isZero(0)) << "row " << i;
          }
        }
      }
    }
  }
}

// Calls larger than the cache they can count on stream past it: an atrous term writes its residue classes' rows (rate
// rows apart) with streaming stores, and the tile loop of a band fetches its next keys and values ahead. Sampled rows,
// each against its own keys in double precision. Odd widths leave rows that start mid-packet.
TEST(SparseStreamingTest, RowsOfCallsPastTheCachesMatchTheDoubleOracle) {
  using S = float;
  const Index d = 8, dv = 7;
  const Index n = detail::usable_cache_bytes() / (2 * (d + dv) * Index(sizeof(S))) * 5 / 4;
  ASSERT_TRUE(detail::streams_past_cache(2 * n * (d + dv) * Index(sizeof(S)), n * dv * Index(sizeof(S))));
  const Matrix<S> q = random_matrix<S>(n, d, 1), k = random_matrix<S>(n, d, 2), v = random_matrix<S>(n, dv, 3);
  const std::vector<std::tuple<const char*, SparsePattern, Spec, Index>> patterns = {
      {"atrous(1009)", SparsePattern::atrous(1009), spec_atrous(1009), 1009},
      {"local(37)", SparsePattern::local(37), spec_local(37), 37},
      {"strided(101)", SparsePattern::strided(101), spec_strided(101), 101}};
  for (const auto& [name, pattern, spec, width] : patterns)
    for (const bool causal : {false, true}) {
      AttentionOptions o;
      o.causal = causal;
      const Matrix<S> out = sparse_attention(q, k, v, pattern, o);
      for (const Index i : {Index(0), Index(1), width - 1, width, n / 2 + 5, n - width - 1, n - 2, n - 1}) {
        std::vector<Index> keys;
        for (Index j = 0; j < n; ++j)
          if (spec(i, i, j) && (!causal || j <= i)) keys.push_back(j);
        Eigen::VectorXd logits(Index(keys.size()));
        for (size_t t = 0; t < keys.size(); ++t)
          logits[Index(t)] = q.row(i).cast<double>().dot(k.row(keys[t]).cast<double>()) / std::sqrt(double(d));
        const Eigen::VectorXd w = (logits.array() - logits.maxCoeff()).exp().matrix();
        Eigen::RowVectorXd expected = Eigen::RowVectorXd::Zero(dv);
        for (size_t t = 0; t < keys.size(); ++t) expected += w[Index(t)] * v.row(keys[t]).cast<double>();
        expected /= w.sum();
        EXPECT_TRUE(all_close(out.row(i), MatD(expected), attention_tolerance<S>(Index(keys.size()))))
            << name << " row " << i << (causal ? " causal" : "");
      }
      EXPECT_TRUE(out.allFinite()) << name;
    }
}

// fixed(l, c) as two calls that never overlap: the segment's call keeps l - c keys a row (its closing c columns are the
// columns' call's), so no tile of the columns' call is partial without causal masking. The split keeps every row's key
// set (the union of the two terms is the pattern's set, the terms disjoint for c < l) for n != m, both alignments,
// causal or not, and c from 0 to l; the results match the oracle (cases() holds fixed patterns and their unions).
TYPED_TEST(SparseTest, FixedSegmentsLeaveTheirClosingColumnsToTheColumnsCall) {
  using S = TypeParam;
  using Kind = SparsePattern::Kind;
  for (const Index l : {1, 5, 16, 128})
    for (const Index c : {Index(0), Index(1), Index(3), l - 1, l}) {
      if (c < 0 || c > l) continue;
      const SparsePattern pattern = SparsePattern::fixed(l, c);
      for (const auto& [n, m] : {std::pair<Index, Index>{1, 1}, {7, 7}, {130, 130}, {300, 259}, {259, 300}})
        for (const bool causal : {false, true})
          for (const CausalAlign align : {CausalAlign::kBottomRight, CausalAlign::kTopLeft}) {
            SCOPED_TRACE("fixed(" + std::to_string(l) + ", " + std::to_string(c) + ") n=" + std::to_string(n) +
                         " m=" + std::to_string(m) + (causal ? " causal" : "") +
                         (align == CausalAlign::kTopLeft ? " top-left" : ""));
            AttentionOptions o;
            o.causal = causal;
            o.align = align;
            const detail::SparseProblem<S> problem("test", pattern, n, m, o);
            ASSERT_EQ(problem.direct.size(), 1u);
            ASSERT_EQ(problem.direct[0].kind, Kind::kSegment);
            EXPECT_EQ(problem.direct[0].count, c < l ? c : 0);
            for (Index i = 0; i < n; ++i) {
              const Index a = problem.base.position(i);
              std::vector<Index> keys;
              for (const SparsePattern::Term* t : problem.ordered)
                problem.for_each_key(*t, a, i, problem.base.row_range(i), [&](Index j) { keys.push_back(j); });
              std::sort(keys.begin(), keys.end());
              if (c < l) {  // disjoint; with c = l the columns' call excludes the segment's keys instead
                EXPECT_TRUE(std::adjacent_find(keys.begin(), keys.end()) == keys.end()) << "row " << i;
              }
              keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
              EXPECT_EQ(keys, pattern.keys(i, n, m, o)) << "row " << i;
            }
            if (c == 0 || c == l || causal) continue;
            // The columns' call: its keys j = l - c, ..., l - 1 (mod l), every row's range all of them, every tile
            // full (the segment before it holds none of them). With c = l the segment keeps its keys (trimming it
            // would empty it) and the columns' call masks them.
            const detail::IndexMap columns{l - c, c, l};
            const Index count = columns.count_below(m);
            const detail::SparseMask<S> mask(&problem, 0, {}, columns);
            std::vector<detail::KeyRange> ranges(static_cast<size_t>(n));
            for (Index s = 0; s < n; ++s) ranges[size_t(s)] = mask.row_range(s);
            for (Index s0 = 0; s0 < n && count > 0; s0 += 6) {
              const Index rows = std::min<Index>(6, n - s0);
              EXPECT_EQ(mask.classify(s0, ranges.data() + s0, rows, 0, count), detail::TileKind::kFull)
                  << "rows " << s0;
            }
          }
    }
}

// The residue lanes' patterns at rate r: residue terms alone, windowed, and after the terms they continue (a band,
// another residue class).
std::vector<Case> residue_cases(Index r) {
  return {
      {"atrous", SparsePattern::atrous(r), spec_atrous(r)},
      {"atrous_window", SparsePattern::atrous(r, 2 * r + 1), spec_atrous(r, 2 * r + 1)},
      {"local_atrous", SparsePattern::local_atrous(r), spec_local_atrous(r)},
      {"strided", SparsePattern::strided(r), spec_strided(r)},
      {"local3_or_atrous", SparsePattern::local(3) | SparsePattern::atrous(r),
       spec_union(spec_local(3), spec_atrous(r))},
      {"atrous_or_atrous", SparsePattern::atrous(r) | SparsePattern::atrous(r + 2),
       spec_union(spec_atrous(r), spec_atrous(r + 2))},
  };
}

// Every residue case at rate r and sizes n x m with every option the lanes keep (causal, both alignments, key
// padding, ALiBi with and without causal, log-n scaling, windows, two threads), against the double oracle and the
// dense kernel with the mask; with vector packets, asserting that the lanes take the term. Then one thread against
// two, bit for bit.
template <class S>
void expect_residue_lanes_match(Index r, Index n, Index m, Index d, Index dv, unsigned& seed) {
  constexpr Index P = detail::KernelShape<S>::kPacket;
  const std::vector<Case> patterns = residue_cases(r);
  std::vector<AttentionOptions> options(9);
  options[1].causal = true;
  options[2].causal = true, options[2].align = CausalAlign::kTopLeft;
  options[3].key_length = m - m / 3;
  options[4].alibi_slope = 0.25, options[4].causal = true;
  options[5].log_n_scale = true;
  options[6].window_left = 2 * r + 1, options[6].align = CausalAlign::kTopLeft;
  options[7].window_right = r, options[7].threads = 2;
  options[8].alibi_slope = 0.25;
  for (const AttentionOptions& o : options) {
    for (const Case& c : patterns) {
      expect_matches<S>(c, n, m, d, dv, o, seed += 3);
      if (P > 1) {
        const detail::SparseProblem<S> problem("test", c.pattern, n, m, o);
        EXPECT_TRUE(detail::ResidueLanes<S>::applies(problem, Index(problem.gathered.size()) - 1, o))
            << c.name << " r=" << r << " n=" << n << " m=" << m;
      }
    }
  }
  const Matrix<S> q = random_matrix<S>(n, d, 1), k = random_matrix<S>(m, d, 2), v = random_matrix<S>(m, dv, 3);
  for (const Case& c : patterns) {
    AttentionOptions one, two;
    one.threads = 1, two.threads = 2;
    EXPECT_TRUE(sparse_attention(q, k, v, c.pattern, one) == sparse_attention(q, k, v, c.pattern, two)) << c.name;
  }
}

// Short residue classes run side by side, one per lane of a packet (ResidueLanes): rates from the packet size up,
// with lane counts that do not divide them, n != m both ways (expect_residue_lanes_match above).
TYPED_TEST(SparseTest, ShortResidueClassesRunAsLanesAndMatchTheOracle) {
  using S = TypeParam;
  constexpr Index P = detail::KernelShape<S>::kPacket;
  unsigned seed = 500;
  for (const Index r : {P, P + 3, 2 * P + 5}) {
    const Index big = std::min<Index>(200, 50 * r);  // classes of at most 64 keys (the lanes' limit)
    for (const auto& [n, m] : {std::pair<Index, Index>{1, 1}, {7, 7}, {65, 65}, {65, 102}, {65, 22}, {big, big}})
      expect_residue_lanes_match<S>(r, n, m, 6, 5, seed);
  }
}

// Residue classes that fill most of a packet run one class at a time, its queries in the lanes
// (ResidueLanes::by_class, when they keep over 3/4 of their pairs: not the causal options), and shorter ones in the
// lanes: rates from the packet size up, classes of P, 3P/4 + 1 and P/2 queries (the last in the lanes; n a multiple
// of the rate or a row short of one); n != m both ways, with a d_v of a packet and a scalar tail
// (expect_residue_lanes_match above).
TYPED_TEST(SparseTest, FullResidueClassesRunClassByClassAndMatchTheOracle) {
  using S = TypeParam;
  constexpr Index P = detail::KernelShape<S>::kPacket;
  unsigned seed = 1300;
  for (const Index r : {P, P + 3, 2 * P + 5})
    for (const Index queries : {P, 3 * P / 4 + 1, std::max<Index>(P / 2, 1)}) {
      for (const Index n : {queries * r, std::max<Index>(1, queries * r - 1)}) {
        if (P > 1) {  // query positions 0 .. n - 1: ceil(n / r) a class
          EXPECT_EQ(detail::ResidueLanes<S>::by_class((n + r - 1) / r), queries > P / 2) << "r=" << r << " n=" << n;
        }
        for (const Index m : {n, n + r / 2 + 1, std::max<Index>(1, n - r)})
          expect_residue_lanes_match<S>(r, n, m, 9, P + 3, seed);
      }
    }
}

// Value rows k rows apart, a multiple of 1 KiB, fall in a few sets of the L1 cache: the lanes then copy a lane's rows
// side by side when eight or more groups of its queries read them (ResidueLanes::copies_values). Rates P and 2 P with a
// d_v that makes them alias (a scalar tail where the packet allows one), classes of 36 queries, and the options that
// trim the keys a group weighs (causal, windows, key padding, ALiBi), against the oracle and the masked dense kernel.
TYPED_TEST(SparseTest, AliasingValueRowsOfLanesAreCopiedAndMatchTheOracle) {
  using S = TypeParam;
  constexpr Index P = detail::KernelShape<S>::kPacket;
  unsigned seed = 900;
  for (const Index k : {P, 2 * P}) {
    const Index unit = 1024 / std::gcd<Index>(1024, k * Index(sizeof(S)));  // d_v a multiple of it: rows alias
    const Index dv = unit * ((65 + unit - 1) / unit), n = 36 * k;
    const std::vector<Case> patterns = {
        {"atrous", SparsePattern::atrous(k), spec_atrous(k)},
        {"atrous_window", SparsePattern::atrous(k, 6 * k + 1), spec_atrous(k, 6 * k + 1)},
        {"local_atrous", SparsePattern::local_atrous(k), spec_local_atrous(k)},
        {"strided", SparsePattern::strided(k), spec_strided(k)},
    };
    std::vector<AttentionOptions> options(5);
    options[1].causal = true;
    options[2].window_left = 5 * k, options[2].align = CausalAlign::kTopLeft;
    options[3].key_length = n - 3 * k - 1;
    options[4].alibi_slope = 0.25, options[4].causal = true;
    for (const AttentionOptions& o : options)
      for (const Case& c : patterns) {
        expect_matches<S>(c, n, n, 8, dv, o, seed += 3);
        if (P > 1) {
          const detail::SparseProblem<S> problem("test", c.pattern, n, n, o);
          EXPECT_TRUE(detail::ResidueLanes<S>::applies(problem, Index(problem.gathered.size()) - 1, o)) << c.name;
          EXPECT_TRUE(detail::ResidueLanes<S>::copies_values(k, dv)) << "k=" << k << " d_v=" << dv;
        }
      }
  }
}

// A NaN or Inf in a query, key or value row sends its lanes' classes back to the general calls: it reaches the rows
// that see it and no other, even in the same lanes (causal rows before a key, the band's rows a class excludes).
TYPED_TEST(SparseTest, ResidueLanesLeaveNaNOnlyWhereItIsSeen) {
  using S = TypeParam;
  constexpr Index P = detail::KernelShape<S>::kPacket;
  const Index r = 2 * P + 1;
  AttentionOptions causal;
  causal.causal = true;
  // Classes of 150 / r queries run in lanes; of P queries (n = P r), class by class when they keep 3/4 of their pairs
  // (local_atrous, and atrous windowed to all but the classes' far corners: a NaN key there must reach no row).
  for (const Index n : {Index(150), P * r}) {
    const Index poisoned_row = n == 150 ? 86 : 1;  // (a class's first position: the window below masks it for the last)
    const Index lanes = n / r;
    SCOPED_TRACE("n=" + std::to_string(n));
    const Matrix<S> q = random_matrix<S>(n, 8, 1), k = random_matrix<S>(n, 8, 2), v = random_matrix<S>(n, 8, 3);
    for (const auto& [p, o] : {std::pair<SparsePattern, AttentionOptions>{SparsePattern::strided(r), {}},
                               {SparsePattern::atrous(r), causal},
                               {SparsePattern::local_atrous(r), {}},
                               {SparsePattern::atrous(r, std::max<Index>(0, lanes - 3) * r), {}}}) {
      const Matrix<S> clean = sparse_attention(q, k, v, p, o);
      const BoolMatrix sees = p.mask(n, n, o);
      for (const int which : {0, 1, 2}) {
        SCOPED_TRACE(std::string(which == 0   ? "q"
                                 : which == 1 ? "k"
                                              : "v") +
                     " poisoned, " + std::to_string(p.terms().size()) + " terms" + (o.causal ? ", causal" : ""));
        Matrix<S> qp = q, kp = k, vp = v;
        (which == 0   ? qp
         : which == 1 ? kp
                      : vp)
            .row(poisoned_row)
            .setConstant(which == 2 ? std::numeric_limits<S>::infinity() : std::numeric_limits<S>::quiet_NaN());
        const Matrix<S> out = sparse_attention(qp, kp, vp, p, o);
        for (Index i = 0; i < n; ++i) {
          const bool reached = which == 0 ? i == poisoned_row : sees(i, poisoned_row);
          if (reached) {
            EXPECT_FALSE(out.row(i).allFinite()) << "row " << i;
          } else {
            EXPECT_TRUE(out.row(i).allFinite()) << "row " << i;
            EXPECT_TRUE(all_close(out.row(i), clean.row(i).template cast<double>(), attention_tolerance<S>(n) * 4))
                << "row " << i;
          }
        }
      }
    }
  }
}

TEST(SparseErrorsTest, BadPatternsAndShapesName) {
  using testing::expect_error;
  expect_error([] { SparsePattern::local(-1); }, {"local", "w", "-1"});
  expect_error([] { SparsePattern::atrous(0); }, {"atrous", "k", "0"});
  expect_error([] { SparsePattern::atrous(2, -2); }, {"atrous", "window"});
  expect_error([] { SparsePattern::local_atrous(0); }, {"local_atrous"});
  expect_error([] { SparsePattern::strided(0); }, {"strided", "l"});
  expect_error([] { SparsePattern::fixed(0, 0); }, {"fixed", "l"});
  expect_error([] { SparsePattern::fixed(4, 5); }, {"fixed", "c", "5"});
  expect_error([] { SparsePattern::fixed(4, -1); }, {"fixed", "c"});
  expect_error([] { SparsePattern::block(BoolMatrix::Ones(2, 2), 0); }, {"block_size", "0"});
  const Matrix<float> q = Matrix<float>::Ones(10, 4), k = Matrix<float>::Ones(12, 4), v = Matrix<float>::Ones(12, 3);
  expect_error([&] { sparse_attention(q, k, v, SparsePattern::block(BoolMatrix::Ones(2, 2), 4)); },
               {"block layout", "2x2", "3x3"});
  expect_error([&] { sparse_attention(q, k, v, SparsePattern()); }, {"empty"});
  expect_error([&] { sparse_attention(q, k.leftCols(3), v, SparsePattern::local(1)); }, {"k", "10x4", "12x3"});
  expect_error([&] { sparse_attention(q, k, v.topRows(5), SparsePattern::local(1)); }, {"v", "5x3"});
  Matrix<float> out(10, 2);
  expect_error([&] { sparse_attention(q, k, v, out, SparsePattern::local(1)); }, {"out", "10x2", "10x3"});
  AttentionOptions bad;
  bad.softcap = -1;
  expect_error([&] { sparse_attention(q, k, v, SparsePattern::local(1), bad); }, {"softcap"});
}

}  // namespace
}  // namespace attnkit
