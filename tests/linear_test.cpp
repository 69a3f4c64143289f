// Linear attention: every feature map in every form (non-causal, chunked causal, recurrent) against the materialised
// quadratic form normalise(phi(Q) psi(K)^T) V in double, with the features written out here from SPEC section 3.
#include <attnkit/linear.hpp>

#include <Eigen/LU>

#include <functional>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace attnkit {
namespace {

using testing::all_close;
using testing::attention_tolerance;
using testing::MatD;
using testing::random_matrix;

/// Features of every row of x, in double, straight from SPEC (no stabilisation).
using Features = std::function<MatD(const MatD& x)>;

MatD elu_plus_one(const MatD& x) {
  return x.unaryExpr([](double t) { return t > 0 ? t + 1 : std::exp(t); });
}
MatD relu_floor(const MatD& x) {
  return x.unaryExpr([](double t) { return std::max(t, 0.0) + 1e-3; });
}
MatD taylor(const MatD& x) {
  MatD f(x.rows(), x.cols() + 1);
  for (Index i = 0; i < x.rows(); ++i) {
    const double norm = x.row(i).norm();
    f(i, 0) = 1;
    f.row(i).tail(x.cols()) = norm > 0 ? MatD(x.row(i) / norm) : MatD::Zero(1, x.cols());
  }
  return f;
}
Features performer(const MatD& w) {
  return [w](const MatD& x) {
    const double d = double(x.cols()), m = double(w.rows());
    const MatD xs = x * std::pow(d, -0.25);
    MatD f = xs * w.transpose();
    for (Index i = 0; i < f.rows(); ++i) {
      const double half = 0.5 * xs.row(i).squaredNorm();
      for (Index l = 0; l < f.cols(); ++l) f(i, l) = std::exp(f(i, l) - half) / std::sqrt(m);
    }
    return f;
  };
}

/// O_i = sum_j A_ij v_j / (sum_j A_ij + eps), A = phi(Q) psi(K)^T, j <= i when causal.
MatD quadratic(const Features& f, const MatD& q, const MatD& k, const MatD& v, bool causal, double eps) {
  const MatD a = f(q) * f(k).transpose();
  MatD out = MatD::Zero(q.rows(), v.cols());
  for (Index i = 0; i < q.rows(); ++i) {
    double den = eps;
    for (Index j = 0; j < k.rows() && (!causal || j <= i); ++j) {
      out.row(i) += a(i, j) * v.row(j);
      den += a(i, j);
    }
    out.row(i) /= den;
  }
  return out;
}

template <class S>
class LinearTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(LinearTest, Scalars, testing::ScalarName);

/// Runs `body(name, map, features, eps)` for every built-in map.
template <class S, class Body>
void for_each_map(Index d, const Body& body) {
  body("elu+1", EluPlusOne{}, Features(elu_plus_one), LinearOptions{}.eps);
  body("relu", Relu{}, Features(relu_floor), LinearOptions{}.eps);
  body("taylor", Taylor{}, Features(taylor), LinearOptions{}.eps);
  for (const bool orthogonal : {true, false}) {
    const PerformerFeatures<S> p(d, PerformerFeatures<S>::default_features(d), 7, orthogonal);
    // eps = 0: the output is then independent of the map's stabilising shifts, so the unstabilised formula applies.
    body(orthogonal ? "performer-orthogonal" : "performer-iid", p, performer(p.projection().template cast<double>()),
         0.0);
  }
}

TYPED_TEST(LinearTest, EveryMapEveryFormEqualsTheQuadraticForm) {
  using S = TypeParam;
  unsigned seed = 1;
  for (const auto& [n, m] : {std::pair<Index, Index>{1, 1}, {7, 7}, {65, 65}, {130, 130}, {7, 65}, {65, 3}}) {
    const Index d = 8, dv = 5;
    const Matrix<S> q = random_matrix<S>(n, d, seed), k = random_matrix<S>(m, d, seed + 1),
                    v = random_matrix<S>(m, dv, seed + 2);
    seed += 3;
    const MatD qd = q.template cast<double>(), kd = k.template cast<double>(), vd = v.template cast<double>();
    const double tol = attention_tolerance<S>(m) * 4 * (1 + vd.cwiseAbs().maxCoeff());
    for_each_map<S>(d, [&](const std::string& name, const auto& map, const Features& f, double eps) {
      SCOPED_TRACE(name + " n=" + std::to_string(n) + " m=" + std::to_string(m));
      LinearOptions o;
      o.eps = eps;
      EXPECT_TRUE(all_close(linear_attention(q, k, v, map, o), quadratic(f, qd, kd, vd, false, eps), tol));
      if (n != m) return;
      const MatD causal = quadratic(f, qd, kd, vd, true, eps);
      o.causal = true;
      for (const Index chunk : {1, 3, 0, 1000}) {
        o.chunk = chunk;
        EXPECT_TRUE(all_close(linear_attention(q, k, v, map, o), causal, tol)) << "chunk " << chunk;
      }
      // Recurrent: token by token, and in uneven blocks, equals the causal result.
      for (const Index block : {1, 5}) {
        LinearAttentionState<S, std::decay_t<decltype(map)>> state(map, d, dv, o);
        Matrix<S> stepped(n, dv);
        for (Index i0 = 0; i0 < n; i0 += block) {
          const Index t = std::min(block, n - i0);
          stepped.middleRows(i0, t) = state.step(q.middleRows(i0, t), k.middleRows(i0, t), v.middleRows(i0, t));
        }
        EXPECT_EQ(state.length(), n);
        EXPECT_TRUE(all_close(stepped, causal, tol)) << "recurrent blocks of " << block;
      }
    });
  }
}

TYPED_TEST(LinearTest, SameResultForAnyThreadCountAndChunkedEqualsRecurrentExactlyEnough) {
  using S = TypeParam;
  const Index n = 1000, d = 16;
  const Matrix<S> q = random_matrix<S>(n, d, 1), k = random_matrix<S>(n, d, 2), v = random_matrix<S>(n, d, 3);
  LinearOptions one, two;
  one.threads = 1, two.threads = 2;
  for (const bool causal : {false, true}) {
    one.causal = two.causal = causal;
    EXPECT_TRUE(linear_attention(q, k, v, EluPlusOne{}, one) == linear_attention(q, k, v, EluPlusOne{}, two));
    const PerformerFeatures<S> p(d);
    EXPECT_TRUE(linear_attention(q, k, v, p, one) == linear_attention(q, k, v, p, two));
  }
}

// Non-causal rows are independent given the keys: a slice of the queries gives, bit for bit, the rows of the whole
// call, wherever the slice starts in a chunk (offsets 1, 3 and 17 put each row at another place in its chunk) and
// however many rows it has. Every map, and Efficient Attention.
TYPED_TEST(LinearTest, AQuerysRowDoesNotDependOnTheRowsCalledWithIt) {
  using S = TypeParam;
  const Index n = 331, m = 97, d = 8;
  const Matrix<S> q = random_matrix<S>(n, d, 1), k = random_matrix<S>(m, d, 2), v = random_matrix<S>(m, d + 3, 3);
  const PerformerFeatures<S> performer_map(d);
  const auto check = [&](const char* name, const auto& call) {
    const Matrix<S> full = call(q);
    for (const Index s0 : {0, 1, 3, 17, 64})
      for (const Index rows : {1, 13, 16, 211})  // s0 + rows <= 275 < n
        EXPECT_TRUE(full.middleRows(s0, rows) == call(q.middleRows(s0, rows)))
            << name << ": rows " << s0 << " to " << s0 + rows;
  };
  check("elu+1", [&](const Matrix<S>& x) { return Matrix<S>(linear_attention(x, k, v, EluPlusOne{})); });
  check("relu", [&](const Matrix<S>& x) { return Matrix<S>(linear_attention(x, k, v, Relu{})); });
  check("Taylor", [&](const Matrix<S>& x) { return Matrix<S>(linear_attention(x, k, v, Taylor{})); });
  check("Performer", [&](const Matrix<S>& x) { return Matrix<S>(linear_attention(x, k, v, performer_map)); });
  check("Efficient Attention", [&](const Matrix<S>& x) { return Matrix<S>(efficient_attention(x, k, v)); });
}

// The inputs are read through strided views: column-major matrices (a stride between a row's elements) and blocks of
// wider matrices (a stride between rows) give, bit for bit, the row-major result. Every map and Efficient Attention,
// causal and not, with chunks short of a packet, of whole packets and wider than one product panel.
TYPED_TEST(LinearTest, ColumnMajorAndBlockInputsGiveTheRowMajorResult) {
  using S = TypeParam;
  using ColMajor = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  const Index n = 131, d = 8, dv = 5;
  const Matrix<S> q = random_matrix<S>(n, d, 1), k = random_matrix<S>(n, d, 2), v = random_matrix<S>(n, dv, 3);
  const ColMajor qc = q, kc = k, vc = v;
  Matrix<S> wide = random_matrix<S>(n, 3 * d + dv + 2, 4);
  wide.middleCols(1, d) = q, wide.middleCols(d + 2, d) = k, wide.middleCols(2 * d + 3, dv) = v;
  const auto qb = wide.middleCols(1, d), kb = wide.middleCols(d + 2, d), vb = wide.middleCols(2 * d + 3, dv);
  const PerformerFeatures<S> performer_map(d);
  const auto check = [&](const char* name, const auto& map) {
    for (const bool causal : {false, true})
      for (const Index chunk : {3, 16, 0, 100}) {
        LinearOptions o;
        o.causal = causal, o.chunk = chunk;
        const Matrix<S> expected = linear_attention(q, k, v, map, o);
        EXPECT_TRUE(linear_attention(qc, kc, vc, map, o) == expected) << name << " column-major, causal " << causal
                                                                      << ", chunk " << chunk;
        EXPECT_TRUE(linear_attention(qb, kb, vb, map, o) == expected) << name << " blocks, causal " << causal
                                                                      << ", chunk " << chunk;
      }
  };
  check("elu+1", EluPlusOne{});
  check("relu", Relu{});
  check("Taylor", Taylor{});
  check("Performer", performer_map);
  for (const Index chunk : {3, 0, 100}) {
    LinearOptions o;
    o.chunk = chunk;
    const Matrix<S> expected = efficient_attention(q, k, v, o);
    EXPECT_TRUE(efficient_attention(qc, kc, vc, o) == expected) << "Efficient Attention column-major, chunk " << chunk;
    EXPECT_TRUE(efficient_attention(qb, kb, vb, o) == expected) << "Efficient Attention blocks, chunk " << chunk;
  }
}

/// Efficient Attention's implied n x m weights, softmax_d(Q) softmax_n(K)^T, in double straight from SPEC.
MatD efficient_weights(const MatD& q, const MatD& k) {
  MatD pq = q, pk = k;
  for (Index i = 0; i < q.rows(); ++i)
    pq.row(i) = (q.row(i).array() - q.row(i).maxCoeff()).exp(), pq.row(i) /= pq.row(i).sum();
  for (Index c = 0; c < k.cols(); ++c)
    pk.col(c) = (k.col(c).array() - k.col(c).maxCoeff()).exp(), pk.col(c) /= pk.col(c).sum();
  return pq * pk.transpose();
}

TYPED_TEST(LinearTest, EfficientAttentionRowsSumToOneAndMatchTheFormula) {
  using S = TypeParam;
  const Index n = 37, m = 53, d = 6, dv = 4;
  const Matrix<S> q = random_matrix<S>(n, d, 1, 3.0), k = random_matrix<S>(m, d, 2, 3.0),
                  v = random_matrix<S>(m, dv, 3);
  const MatD weights = efficient_weights(q.template cast<double>(), k.template cast<double>());  // rows sum to 1
  for (Index i = 0; i < n; ++i) EXPECT_NEAR(weights.row(i).sum(), 1.0, 1e-12);
  const double tol = attention_tolerance<S>(m) * 4;
  EXPECT_TRUE(all_close(efficient_attention(q, k, v), weights * v.template cast<double>(), tol));
  const Matrix<S> ones = Matrix<S>::Ones(m, 1);
  EXPECT_TRUE(all_close(efficient_attention(q, k, ones), MatD::Ones(n, 1), tol));
}

// Efficient Attention keeps running column maxima and rescales its state when they rise: keys whose columns grow
// from chunk to chunk (past 50, where exp without the max overflows a float) give the formula for chunks of 1, 5, the
// default and more than m; a column whose first keys are -inf gives them no weight.
TYPED_TEST(LinearTest, EfficientAttentionRescalesAsColumnMaximaRiseAcrossChunks) {
  using S = TypeParam;
  const Index n = 23, m = 97, d = 5, dv = 3;
  const Matrix<S> q = random_matrix<S>(n, d, 4, 2.0), v = random_matrix<S>(m, dv, 6);
  Matrix<S> k = random_matrix<S>(m, d, 5);
  for (Index j = 0; j < m; ++j) k.row(j) *= S(1 + 0.6 * double(j));
  for (Index j = 0; j < 3; ++j) k(j, 1) = -std::numeric_limits<S>::infinity();
  const MatD expected =
      efficient_weights(q.template cast<double>(), k.template cast<double>()) * v.template cast<double>();
  ASSERT_TRUE(expected.allFinite());
  for (const Index chunk : {1, 5, 0, 200}) {
    LinearOptions o;
    o.chunk = chunk;
    const Matrix<S> out = efficient_attention(q, k, v, o);
    EXPECT_TRUE(all_close(out, expected, attention_tolerance<S>(m) * 4)) << "chunk " << chunk;
  }
}

// Calls larger than the cache an output counts on write it past the caches (streaming stores): its rows equal, bit
// for bit, those of calls small enough to write through the caches, a slice of the queries (non-causal, Efficient
// Attention) and the recurrent state (causal).
TEST(LinearFloatTest, OutputWrittenPastTheCachesEqualsTheCachedPath) {
  using S = float;
  const Index d = 8, dv = 8;
  const Index n = detail::usable_cache_bytes() / (2 * (d + dv) * Index(sizeof(S))) * 5 / 4;  // inputs + output
  ASSERT_TRUE(detail::streams_past_cache(2 * n * (d + dv) * Index(sizeof(S)), n * dv * Index(sizeof(S))));
  const Matrix<S> q = random_matrix<S>(n, d, 1), k = random_matrix<S>(n, d, 2), v = random_matrix<S>(n, dv, 3);
  const Index s0 = n / 3, rows = 301;
  const Matrix<S> full = linear_attention(q, k, v, EluPlusOne{});
  EXPECT_TRUE(full.middleRows(s0, rows) == linear_attention(q.middleRows(s0, rows), k, v, EluPlusOne{}));
  const Matrix<S> efficient = efficient_attention(q, k, v);
  EXPECT_TRUE(efficient.middleRows(s0, rows) == efficient_attention(q.middleRows(s0, rows), k, v));
  LinearOptions causal;
  causal.causal = true;
  LinearAttentionState<S, EluPlusOne> state(EluPlusOne{}, d, dv);
  EXPECT_TRUE(linear_attention(q, k, v, EluPlusOne{}, causal) == state.step(q, k, v));
  EXPECT_TRUE(full.allFinite() && efficient.allFinite());
}

TEST(LinearRankTest, RankOfTheImpliedAttentionIsAtMostR) {
  const Index n = 60, d = 4;  // r = d for elu+1, d + 1 for Taylor: far below n
  const MatD q = random_matrix<double>(n, d, 1), k = random_matrix<double>(n, d, 2);
  for (const auto& [f, r] : {std::pair<Features, Index>{Features(elu_plus_one), d}, {Features(taylor), d + 1}}) {
    Eigen::FullPivLU<MatD> lu(f(q) * f(k).transpose());
    lu.setThreshold(1e-10);
    EXPECT_LE(lu.rank(), r);
    EXPECT_GE(lu.rank(), r - 1);  // and not trivially low
  }
}

/// Relative RMS error of Performer's estimate of exp(q.k / sqrt(d)) over fixed pairs (q_i, k_i), over `seeds` draws.
double performer_error(Index m, bool orthogonal, const MatD& q, const MatD& k, int seeds) {
  const Index d = q.cols();
  double err2 = 0;
  for (int s = 0; s < seeds; ++s) {
    const PerformerFeatures<double> p(d, m, 100 + s, orthogonal);
    const Features f = performer(p.projection());
    const MatD est = f(q) * f(k).transpose();
    for (Index i = 0; i < q.rows(); ++i) {
      const double exact = std::exp(q.row(i).dot(k.row(i)) / std::sqrt(double(d)));
      err2 += std::pow((est(i, i) - exact) / exact, 2);
    }
  }
  return std::sqrt(err2 / double(seeds * q.rows()));
}

TEST(PerformerTest, ErrorFallsLikeOneOverSqrtM) {
  const Index d = 16;
  const MatD q = random_matrix<double>(64, d, 1, 0.5), k = random_matrix<double>(64, d, 2, 0.5);
  std::vector<double> err;
  for (const Index m : {16, 64, 256, 1024}) err.push_back(performer_error(m, false, q, k, 32));
  for (size_t i = 1; i < err.size(); ++i) {
    // Each 4x more features should halve the error (1/sqrt(m)); allow 1.5x-3x per step.
    EXPECT_GT(err[i - 1] / err[i], 1.5) << "step " << i;
    EXPECT_LT(err[i - 1] / err[i], 3.0) << "step " << i;
  }
  EXPECT_GT(err.front() / err.back(), 5.0);  // 64x more features: ideally 8x less error
  EXPECT_LT(err.front() / err.back(), 12.0);
}

TEST(PerformerTest, OrthogonalFeaturesBeatIidAtEqualM) {
  // The gain is largest for m a small multiple of d (measured with 2000 draws: 17% lower error at m = d, 2.5% at
  // m = 4 d); the relative error is heavy-tailed, so the test stays at m <= 2 d with 256 draws.
  const Index d = 16;
  const MatD q = random_matrix<double>(64, d, 1, 0.5), k = random_matrix<double>(64, d, 2, 0.5);
  for (const Index m : {16, 32}) {
    const double iid = performer_error(m, false, q, k, 256), orth = performer_error(m, true, q, k, 256);
    EXPECT_LT(orth, iid) << "m = " << m;
  }
}

TEST(PerformerTest, SeededReproducibleAndRedrawChanges) {
  const PerformerFeatures<float> a(8, 20, 5), b(8, 20, 5);
  EXPECT_TRUE(a.projection() == b.projection());
  EXPECT_EQ(a.projection().rows(), 20);
  PerformerFeatures<float> c = a;
  c.redraw(6);
  EXPECT_FALSE(c.projection() == a.projection());
  EXPECT_EQ(PerformerFeatures<float>(64).projection().rows(), Index(std::lround(64 * std::log(64.0))));
  // Orthogonal blocks: rows within a block of d are orthogonal.
  const PerformerFeatures<double> o(8, 16, 3, true);
  const MatD w = o.projection();
  for (Index i = 0; i < 8; ++i)
    for (Index j = i + 1; j < 8; ++j) EXPECT_NEAR(w.row(i).dot(w.row(j)), 0.0, 1e-10);
}

TEST(LinearFloatTest, LargeInputsNeverGiveInfOrNaN) {
  const Index n = 200, d = 64;
  Matrix<float> q = random_matrix<float>(n, d, 1) * 30.f, k = random_matrix<float>(n, d, 2) * 30.f;
  q = q.cwiseMax(-30.f).cwiseMin(30.f), k = k.cwiseMax(-30.f).cwiseMin(30.f);
  const Matrix<float> v = random_matrix<float>(n, d, 3);
  for (const bool causal : {false, true}) {
    LinearOptions o;
    o.causal = causal;
    EXPECT_TRUE(linear_attention(q, k, v, PerformerFeatures<float>(d), o).array().isFinite().all());
    EXPECT_TRUE(linear_attention(q, k, v, PerformerFeatures<float>(d, 266, 1, false), o).array().isFinite().all());
    EXPECT_TRUE(linear_attention(q, k, v, EluPlusOne{}, o).array().isFinite().all());
    EXPECT_TRUE(linear_attention(q, k, v, Taylor{}, o).array().isFinite().all());
  }
  EXPECT_TRUE(efficient_attention(q, k, v).array().isFinite().all());
}

// Taylor's scores 1 + cos cancel for a query opposite to its keys: the true weights are 0, so the output is
// 0 / (0 + eps) = 0, but float rounding leaves denominators of +-1e-7 and, before the guard, outputs of the size of
// the values or larger (the fuzzer found 7.3 and then 165 for values in [-8, 8]). The row must be zero.
TEST(LinearFloatTest, TaylorQueryOppositeToEveryKeyGetsNoWeightNotNoise) {
  const Index n = 21, d = 7;
  const Matrix<float> q = Matrix<float>::Constant(n, d, 7.9375f), k = Matrix<float>::Constant(n, d, -8.f);
  const Matrix<float> v = random_matrix<float>(n, 3, 4) * 8.f;
  for (const bool causal : {false, true})
    for (const Index chunk : {Index(0), Index(1), Index(8)}) {
      LinearOptions o;
      o.causal = causal, o.chunk = chunk;
      const Matrix<float> out = linear_attention(q, k, v, Taylor{}, o);
      EXPECT_EQ(out.cwiseAbs().maxCoeff(), 0.f) << "causal " << causal << ", chunk " << chunk;
      LinearAttentionState<float, Taylor> state(Taylor{}, d, 3);
      EXPECT_EQ(state.step(q, k, v).cwiseAbs().maxCoeff(), 0.f) << "recurrent, causal " << causal;
    }
  // A query only partly opposite keeps its (well-conditioned) weights: the guard changes nothing there.
  Matrix<float> mixed = k;
  mixed.row(3).setConstant(8.f);
  const MatD want =
      quadratic(Features(taylor), testing::as_double(q), testing::as_double(mixed), testing::as_double(v), false, 1e-6);
  EXPECT_TRUE(all_close(linear_attention(q, mixed, v, Taylor{}), want, 8e-5));  // 1e-5 of |v| <= 8
}

TEST(LinearFloatTest, NanFeaturesGiveNanRowsNotZeros) {
  Matrix<float> q = random_matrix<float>(9, 4, 1);
  const Matrix<float> k = random_matrix<float>(9, 4, 2), v = random_matrix<float>(9, 3, 3);
  q(5, 2) = std::numeric_limits<float>::quiet_NaN();
  for (const bool causal : {false, true}) {
    LinearOptions o;
    o.causal = causal;
    for (const Matrix<float>& out :
         {linear_attention(q, k, v, EluPlusOne{}, o), linear_attention(q, k, v, Taylor{}, o)}) {
      EXPECT_TRUE(out.row(5).array().isNaN().all()) << "causal " << causal;
      EXPECT_TRUE(out.row(4).array().isFinite().all());
    }
  }
}

// Found by the numerics contract test: inside a causal chunk, row i met the later values with a zero score, and
// 0 * NaN leaked a later token's NaN into earlier rows.
TEST(LinearFloatTest, CausalNanValueNeverReachesEarlierRows) {
  const Matrix<float> q = random_matrix<float>(40, 6, 1), k = random_matrix<float>(40, 6, 2);
  Matrix<float> v = random_matrix<float>(40, 5, 3);
  v(23, 1) = std::numeric_limits<float>::quiet_NaN();
  v(30, 4) = std::numeric_limits<float>::infinity();
  for (const Index chunk : {Index(1), Index(4), Index(16), Index(64)}) {
    LinearOptions o;
    o.causal = true, o.chunk = chunk;
    const Matrix<float> out = linear_attention(q, k, v, EluPlusOne{}, o);
    EXPECT_TRUE(out.topRows(23).allFinite()) << "chunk " << chunk;
    EXPECT_FALSE(out.row(23).allFinite()) << "chunk " << chunk;
    LinearAttentionState<float, Taylor> state(Taylor{}, 6, 5, o);
    EXPECT_TRUE(state.step(q, k, v).topRows(23).allFinite()) << "recurrent, chunk " << chunk;
  }
}

// Values with no columns (found by the fuzzer: the next-chunk prefetch addressed the empty value rows from a null
// pointer, which UBSan reports): every form returns n x 0, and queries still work beside an empty value matrix.
TEST(LinearFloatTest, ValuesWithoutColumnsGiveAnEmptyOutput) {
  const Matrix<float> q = random_matrix<float>(70, 6, 1), k = random_matrix<float>(70, 6, 2), v(70, 0);
  for (const bool causal : {false, true})
    for (const Index chunk : {Index(0), Index(1), Index(16)}) {
      LinearOptions o;
      o.causal = causal, o.chunk = chunk;
      const Matrix<float> out = linear_attention(q, k, v, EluPlusOne{}, o);
      EXPECT_EQ(out.rows(), 70);
      EXPECT_EQ(out.cols(), 0);
    }
  EXPECT_EQ(efficient_attention(q, k, v).cols(), 0);
}

// The default non-causal chunk (detail::linear_chunk, chosen from the shape) is the one every entry point uses: chunk
// = 0 gives bit for bit what that chunk gives, and another chunk gives something else (the key parts' sums split
// differently), so the comparison can tell them apart. With AVX-512 floats: 16 rows for elu+1 and Efficient
// Attention at d = 64, 32 at d = 128, 64 at d = 32 and for Performer's 266 features at d = 64 (bench/README.md).
TEST(LinearChunkTest, DefaultChunkIsTheOneChosenFromTheShape) {
  const auto check = [](const auto& map, Index d, Index expected_with_avx512) {
    const Matrix<float> q = random_matrix<float>(301, d, 1), k = random_matrix<float>(301, d, 2),
                        v = random_matrix<float>(301, d, 3);
    const Index c = detail::linear_chunk<float>(LinearOptions{}, detail::linear_shape<float>(map, d, d));
    EXPECT_TRUE(c == 16 || c == 32 || c == 64) << "d = " << d << ": " << c;
#ifdef EIGEN_VECTORIZE_AVX512
    EXPECT_EQ(c, expected_with_avx512) << "d = " << d;
#else
    (void)expected_with_avx512;
#endif
    LinearOptions chosen, other;
    chosen.chunk = c, other.chunk = c == 64 ? 16 : 64;
    const Matrix<float> by_default = linear_attention(q, k, v, map);
    EXPECT_TRUE(by_default == linear_attention(q, k, v, map, chosen)) << "d = " << d;
    EXPECT_FALSE(by_default == linear_attention(q, k, v, map, other)) << "d = " << d;
  };
  check(EluPlusOne{}, 32, 64);
  check(EluPlusOne{}, 64, 16);
  check(EluPlusOne{}, 128, 32);
  check(PerformerFeatures<float>(64), 64, 64);
  // Efficient Attention: its key features (ColumnExp, r = d) decide its chunk.
  const Matrix<float> q = random_matrix<float>(301, 64, 1), k = random_matrix<float>(301, 64, 2),
                      v = random_matrix<float>(301, 64, 3);
  LinearOptions chosen;
  chosen.chunk = detail::linear_chunk<float>(LinearOptions{},
                                             detail::linear_shape<float>(detail::ColumnExp<float>{nullptr}, 64, 64));
#ifdef EIGEN_VECTORIZE_AVX512
  EXPECT_EQ(chosen.chunk, 16);
#endif
  EXPECT_TRUE(efficient_attention(q, k, v) == efficient_attention(q, k, v, chosen));
}

TEST(LinearErrorsTest, BadInputNamesTheArgument) {
  using testing::expect_error;
  const Matrix<float> q = Matrix<float>::Ones(10, 4), k = Matrix<float>::Ones(12, 4), v = Matrix<float>::Ones(12, 3);
  expect_error([&] { linear_attention(q, k.leftCols(3), v, EluPlusOne{}); }, {"k", "10x4", "12x3"});
  expect_error([&] { linear_attention(q, k, v.topRows(5), EluPlusOne{}); }, {"v", "5x3"});
  LinearOptions causal;
  causal.causal = true;
  expect_error([&] { linear_attention(q, k, v, EluPlusOne{}, causal); }, {"causal", "n == m"});
  expect_error([&] { efficient_attention(q, k, v, causal); }, {"efficient_attention", "causal"});
  LinearOptions bad;
  bad.eps = -1;
  expect_error([&] { linear_attention(q, k, v, EluPlusOne{}, bad); }, {"eps"});
  bad = {}, bad.chunk = -2;
  expect_error([&] { linear_attention(q, k, v, EluPlusOne{}, bad); }, {"chunk"});
  expect_error([] { PerformerFeatures<float>(4, -1); }, {"m", "-1"});
  expect_error([] { PerformerFeatures<float>(4, 0); }, {"m", ">= 1", "0"});
  expect_error([] { PerformerFeatures<float>(0); }, {"d"});
  expect_error([&] { linear_attention(q, k, v, PerformerFeatures<float>(5)); }, {"d = 5", "d = 4"});
  Matrix<float> out(10, 2);
  expect_error([&] { linear_attention(q, k, v, out, EluPlusOne{}); }, {"out", "10x2", "10x3"});
  LinearAttentionState<float, EluPlusOne> state(EluPlusOne{}, 4, 3);
  expect_error([&] { state.step(q.topRows(2), k.topRows(2), v.topRows(3)); }, {"step", "3x3"});
}

}  // namespace
}  // namespace attnkit
