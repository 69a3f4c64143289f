// MultiHeadAttention against a double-precision oracle written from SPEC section 1: projections in double,
// RoPE by its explicit cos/sin formula, ALiBi slopes by hand, and the loop attention of test_util.hpp per head.
#include <attnkit/attnkit.hpp>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace attnkit {
namespace {

using testing::all_close;
using testing::MatD;
using testing::naive_attention;
using testing::random_matrix;

// RoPE straight from the definition: pair i of row r rotates by (first + r) * base^(-2i/d).
MatD rope_by_formula(MatD x, Index first, const RopeOptions& ro) {
  const Index d = x.cols(), half = d / 2;
  for (Index r = 0; r < x.rows(); ++r)
    for (Index i = 0; i < half; ++i) {
      const double angle = double(first + r) * std::pow(ro.base, -2.0 * double(i) / double(d));
      const Index a = ro.layout == RopeLayout::kInterleaved ? 2 * i : i;
      const Index b = ro.layout == RopeLayout::kInterleaved ? 2 * i + 1 : i + half;
      const double x0 = x(r, a), x1 = x(r, b);
      x(r, a) = x0 * std::cos(angle) - x1 * std::sin(angle);
      x(r, b) = x0 * std::sin(angle) + x1 * std::cos(angle);
    }
  return x;
}

template <class S>
MatD naive_mha(const MultiHeadAttention<S>& layer, const MatD& xq, const MatD& xk, const MatD& xv, AttentionOptions o,
               Index first = 0) {
  const MultiHeadConfig& c = layer.config();
  const Index dh = c.head_dim, group = c.heads / c.kv_heads;
  MatD q = xq * layer.w_q.template cast<double>(), k = xk * layer.w_k.template cast<double>();
  MatD v = xv * layer.w_v.template cast<double>();
  if (c.projection_bias) {
    q.rowwise() += layer.b_q.template cast<double>().row(0);
    k.rowwise() += layer.b_k.template cast<double>().row(0);
    v.rowwise() += layer.b_v.template cast<double>().row(0);
  }
  MatD concat(xq.rows(), c.heads * dh);
  for (Index h = 0; h < c.heads; ++h) {
    const Index g = h / group;
    MatD qh = q.middleCols(h * dh, dh), kh = k.middleCols(g * dh, dh);
    if (c.rope) qh = rope_by_formula(qh, first, c.rope_options), kh = rope_by_formula(kh, 0, c.rope_options);
    if (c.alibi) o.alibi_slope = std::pow(2.0, -8.0 * double(h + 1) / double(c.heads));  // H a power of two here
    concat.middleCols(h * dh, dh) = naive_attention(qh, kh, v.middleCols(g * dh, dh), o).out;
  }
  if (!c.output_projection) return concat;
  MatD out = concat * layer.w_o.template cast<double>();
  if (c.output_bias) out.rowwise() += layer.b_o.template cast<double>().row(0);
  return out;
}

template <class S>
class MultiHeadTest : public ::testing::Test {
 protected:
  static double tol() { return std::is_same_v<S, float> ? 2e-5 : 1e-12; }

  // Random biases so they matter, then forward vs the oracle.
  static void randomise_biases(MultiHeadAttention<S>& layer, unsigned seed) {
    for (Matrix<S>* b : {&layer.b_q, &layer.b_k, &layer.b_v, &layer.b_o})
      if (b->size() > 0) *b = random_matrix<S>(b->rows(), b->cols(), seed++, 0.5);
  }

  void check_self(const MultiHeadConfig& config, Index n, const AttentionOptions& o, const std::string& what) {
    SCOPED_TRACE(what + " n=" + std::to_string(n));
    MultiHeadAttention<S> layer(config, 7);
    randomise_biases(layer, 100);
    const Matrix<S> x = random_matrix<S>(n, layer.config().width, 3);
    const MatD xd = x.template cast<double>();
    const MatD expected = naive_mha(layer, xd, xd, xd, o);
    const double scale = 1 + expected.cwiseAbs().maxCoeff();
    EXPECT_TRUE(all_close(layer.forward(x, o), expected, tol() * scale));
    Matrix<S> out(n, layer.output_width());
    layer.forward_into(x, out, o);
    EXPECT_TRUE(all_close(out, expected, tol() * scale)) << "forward_into";
  }
};

using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(MultiHeadTest, Scalars, testing::ScalarName);

MultiHeadConfig config(Index width, Index heads, Index kv_heads) {
  MultiHeadConfig c;
  c.width = width, c.heads = heads, c.kv_heads = kv_heads;
  return c;
}

TYPED_TEST(MultiHeadTest, MhaGqaMqaWithAndWithoutBiasesAndOutputProjection) {
  const std::pair<Index, Index> layouts[] = {{4, 4}, {8, 2}, {4, 1}};
  for (const auto& [h, hkv] : layouts)
    for (bool bias : {false, true})
      for (bool projection : {false, true}) {
        MultiHeadConfig c = config(32, h, hkv);
        c.projection_bias = bias, c.output_projection = projection, c.output_bias = bias && projection;
        const std::string what = "H=" + std::to_string(h) + " H_kv=" + std::to_string(hkv) + (bias ? " bias" : "") +
                                 (projection ? " w_o" : "");
        for (Index n : {1, 7, 33}) this->check_self(c, n, {}, what);
      }
}

TYPED_TEST(MultiHeadTest, EveryOptionAndPosition) {
  MultiHeadConfig base = config(48, 8, 2);
  base.head_dim = 10;  // not width / H
  std::vector<std::pair<std::string, AttentionOptions>> options(7);
  options[0].first = "causal", options[0].second.causal = true;
  options[1].first = "window", options[1].second.window_left = 3, options[1].second.window_right = 2;
  options[2].first = "key padding", options[2].second.key_length = 20;
  options[3].first = "softcap", options[3].second.softcap = 1.5;
  options[4].first = "log-n", options[4].second.log_n_scale = true;
  options[5].first = "scale", options[5].second.scale = 0.2;
  options[6].first = "all", options[6].second.causal = true, options[6].second.window_left = 9,
  options[6].second.softcap = 2, options[6].second.log_n_scale = true, options[6].second.threads = 1;
  for (const auto& [name, o] : options) {
    this->check_self(base, 29, o, name);
    MultiHeadConfig rope = base;
    rope.rope = true;
    this->check_self(rope, 29, o, name + " rope");
    rope.rope_options.layout = RopeLayout::kHalf, rope.rope_options.base = 500;
    this->check_self(rope, 29, o, name + " rope half base 500");
    MultiHeadConfig alibi = base;
    alibi.alibi = true;
    this->check_self(alibi, 29, o, name + " alibi");
  }
}

TYPED_TEST(MultiHeadTest, CrossAttentionWithDifferentKeyAndValueWidths) {
  using S = TypeParam;
  MultiHeadConfig c = config(24, 6, 3);
  c.key_width = 17, c.value_width = 11, c.projection_bias = true, c.output_bias = true;
  MultiHeadAttention<S> layer(c, 5);
  this->randomise_biases(layer, 200);
  const Matrix<S> xq = random_matrix<S>(13, 24, 1), xk = random_matrix<S>(31, 17, 2), xv = random_matrix<S>(31, 11, 3);
  for (bool causal : {false, true}) {
    AttentionOptions o;
    o.causal = causal;
    const MatD expected =
        naive_mha(layer, xq.template cast<double>(), xk.template cast<double>(), xv.template cast<double>(), o);
    EXPECT_TRUE(all_close(layer.forward(xq, xk, xv, o), expected, this->tol() * (1 + expected.cwiseAbs().maxCoeff())));
  }
  // forward(x_q, x_kv) when keys and values come from one input.
  MultiHeadConfig same = config(24, 6, 3);
  same.key_width = 9;
  MultiHeadAttention<S> cross(same, 6);
  const Matrix<S> xkv = random_matrix<S>(40, 9, 4);
  const MatD kvd = xkv.template cast<double>();
  const MatD expected = naive_mha(cross, xq.template cast<double>(), kvd, kvd, {});
  EXPECT_TRUE(all_close(cross.forward(xq, xkv), expected, this->tol() * (1 + expected.cwiseAbs().maxCoeff())));
}

TYPED_TEST(MultiHeadTest, DecodingTokenByTokenEqualsOneCausalForward) {
  using S = TypeParam;
  MultiHeadConfig c = config(32, 8, 2);
  c.rope = true, c.alibi = true, c.projection_bias = true;
  MultiHeadAttention<S> layer(c, 11);
  this->randomise_biases(layer, 300);
  const Index n = 40;
  const Matrix<S> x = random_matrix<S>(n, 32, 9);
  AttentionOptions o;
  o.causal = true;
  const Matrix<S> full = layer.forward(x, o);
  for (Index block : {1, 3, 40}) {
    KVCache<S> cache = layer.make_cache(n);
    for (Index t = 0; t < n; t += block) {
      const Index count = std::min(block, n - t);
      const Matrix<S> step = layer.forward_step(x.middleRows(t, count), cache);
      ASSERT_EQ(cache.size(), t + count);
      const MatD expected = full.middleRows(t, count).template cast<double>();
      EXPECT_TRUE(all_close(step, expected, this->tol() * 10)) << "block " << block << " at token " << t;
    }
    EXPECT_TRUE(cache.full());
    // Outputs cannot see a uniform shift of positions (RoPE is relative), so check the absolute positions directly:
    // the cached keys are x W_k + b_k rotated at positions 0..n-1.
    MatD keys = x.template cast<double>() * layer.w_k.template cast<double>();
    keys.rowwise() += layer.b_k.template cast<double>().row(0);
    for (Index g = 0; g < 2; ++g)
      keys.middleCols(g * 4, 4) = rope_by_formula(keys.middleCols(g * 4, 4), 0, c.rope_options);
    EXPECT_TRUE(all_close(cache.keys(), keys, this->tol() * (1 + keys.cwiseAbs().maxCoeff()))) << "cached keys";
  }
}

TYPED_TEST(MultiHeadTest, DecodingOverALongCacheSplitsKeysAndStillEqualsTheFullForward) {
  using S = TypeParam;
  for (Index kv_heads : {1, 2, 8}) {
    MultiHeadConfig c = config(32, 8, kv_heads);
    c.rope = true, c.alibi = true;
    MultiHeadAttention<S> layer(c, 17);
    const Index n = 1100;
    const Matrix<S> x = random_matrix<S>(n, 32, 19);
    AttentionOptions o;
    o.causal = true;
    const Matrix<S> full = layer.forward(x, o);
    KVCache<S> cache = layer.make_cache(n);
    layer.forward_step(x.topRows(n - 3), cache);
    for (Index t = n - 3; t < n; ++t) {
      const Matrix<S> step = layer.forward_step(x.middleRows(t, 1), cache);
      EXPECT_TRUE(all_close(step, full.middleRows(t, 1).template cast<double>(), this->tol() * 10))
          << "H_kv " << kv_heads << " token " << t;
    }
  }
}

TYPED_TEST(MultiHeadTest, VariableLengthBatchEqualsPerSequenceCalls) {
  using S = TypeParam;
  MultiHeadConfig c = config(32, 4, 2);
  c.rope = true;
  MultiHeadAttention<S> layer(c, 13);
  std::vector<Matrix<S>> batch;
  for (Index n : {1, 17, 64, 5, 33}) batch.push_back(random_matrix<S>(n, 32, unsigned(n)));
  AttentionOptions o;
  o.causal = true;
  const std::vector<Matrix<S>> out = layer.forward(batch, o);
  ASSERT_EQ(out.size(), batch.size());
  for (size_t b = 0; b < batch.size(); ++b) {
    const Matrix<S> alone = layer.forward(batch[b], o);
    EXPECT_TRUE(all_close(out[b], alone.template cast<double>(), this->tol())) << "sequence " << b;
  }
  EXPECT_TRUE(layer.forward(std::vector<Matrix<S>>{}, o).empty());
}

TYPED_TEST(MultiHeadTest, AttentionOnProjectedHeadsEqualsPerHeadOracle) {
  using S = TypeParam;
  const Index n = 21, m = 34, heads = 6, kv_heads = 2, dk = 5, dv = 7;
  const Matrix<S> q = random_matrix<S>(n, heads * dk, 1), k = random_matrix<S>(m, kv_heads * dk, 2);
  const Matrix<S> v = random_matrix<S>(m, kv_heads * dv, 3);
  const std::vector<double> slopes = alibi_slopes(heads);
  for (bool with_slopes : {false, true}) {
    AttentionOptions o;
    o.causal = true, o.align = CausalAlign::kTopLeft;
    Matrix<S> out(n, heads * dv);
    multi_head_attention(q, k, v, out, heads, kv_heads, o, with_slopes ? slopes : std::vector<double>{});
    for (Index h = 0; h < heads; ++h) {
      const Index g = h / (heads / kv_heads);
      AttentionOptions oh = o;
      if (with_slopes) oh.alibi_slope = slopes[size_t(h)];
      const auto expected = naive_attention(q.middleCols(h * dk, dk).template cast<double>(),
                                            k.middleCols(g * dk, dk).template cast<double>(),
                                            v.middleCols(g * dv, dv).template cast<double>(), oh);
      EXPECT_TRUE(all_close(out.middleCols(h * dv, dv), expected.out, this->tol())) << "head " << h;
    }
  }
  Matrix<S> out(n, heads * dv);
  EXPECT_THROW(multi_head_attention(q, k, v, out, heads, 4), Error);                          // 6 % 4 != 0
  EXPECT_THROW(multi_head_attention(q, k, v, out, heads, kv_heads, {}, {0.5, 0.25}), Error);  // one slope per head
  Matrix<S> small(n, dv);
  EXPECT_THROW(multi_head_attention(q, k, v, small, heads, kv_heads), Error);
}

TYPED_TEST(MultiHeadTest, CacheKeepsEachHeadApartAndKeepsEveryTokenAsItGrows) {
  using S = TypeParam;
  // Each head's rows live in a block of their own, which the storage's growth (64, 128, 256 and 300 tokens here)
  // must move whole: the cache holds x W_k + b_k and x W_v + b_v of every token appended, head h in keys(h).
  MultiHeadConfig c = config(24, 6, 3);
  c.projection_bias = true;
  MultiHeadAttention<S> layer(c, 41);
  this->randomise_biases(layer, 42);
  const Index n = 300, d = c.width / c.heads;
  const Matrix<S> x = random_matrix<S>(n, 24, 43);
  KVCache<S> cache = layer.make_cache(n);
  EXPECT_EQ(cache.kv_heads(), 3);
  EXPECT_EQ(cache.kv_width(), 3 * d);
  for (Index t = 0, block = 1; t < n; t += block, block = block % 37 + 5) {
    const Index count = std::min(block, n - t);
    layer.forward_step(x.middleRows(t, count), cache);
  }
  ASSERT_EQ(cache.size(), n);
  MatD keys = x.template cast<double>() * layer.w_k.template cast<double>();
  MatD values = x.template cast<double>() * layer.w_v.template cast<double>();
  keys.rowwise() += layer.b_k.template cast<double>().row(0);
  values.rowwise() += layer.b_v.template cast<double>().row(0);
  EXPECT_TRUE(all_close(cache.keys(), keys, this->tol() * (1 + keys.cwiseAbs().maxCoeff()))) << "keys";
  EXPECT_TRUE(all_close(cache.values(), values, this->tol() * (1 + values.cwiseAbs().maxCoeff()))) << "values";
  for (Index h = 0; h < 3; ++h) {
    EXPECT_EQ(Matrix<S>(cache.keys(h)), Matrix<S>(cache.keys().middleCols(h * d, d))) << "head " << h;
    EXPECT_EQ(Matrix<S>(cache.values(h)), Matrix<S>(cache.values().middleCols(h * d, d))) << "head " << h;
  }
  EXPECT_THROW(cache.keys(3), Error);
  // A rolled-back step's tokens are overwritten by the next ones.
  cache.truncate(100);
  layer.forward_step(x.middleRows(200, 7), cache);
  ASSERT_EQ(cache.size(), 107);
  EXPECT_TRUE(
      all_close(cache.keys().bottomRows(7), keys.middleRows(200, 7), this->tol() * (1 + keys.cwiseAbs().maxCoeff())));
  EXPECT_TRUE(
      all_close(cache.values().topRows(100), values.topRows(100), this->tol() * (1 + values.cwiseAbs().maxCoeff())));
}

TEST(MultiHeadDeterminism, LayerOutputIsBitIdenticalForAnyThreadCount) {
  // Width 512: wide enough that a library GEMM re-blocks its depth when it runs threads of its own.
  MultiHeadConfig c = config(512, 8, 2);
  c.rope = true, c.projection_bias = true, c.output_bias = true;
  MultiHeadAttention<float> layer(c, 21);
  const Matrix<float> x = random_matrix<float>(301, 512, 22);
  AttentionOptions o;
  o.causal = true, o.threads = 1;
  const Matrix<float> serial = layer.forward(x, o);
  KVCache<float> cache = layer.make_cache(302);
  layer.forward_step(x, cache, o);
  const Matrix<float> step_serial = layer.forward_step(x.topRows(1), cache, o);
  for (int threads : {2, 3, 0}) {
    o.threads = threads;
    const Matrix<float> parallel = layer.forward(x, o);
    EXPECT_EQ(std::memcmp(serial.data(), parallel.data(), sizeof(float) * size_t(serial.size())), 0) << threads;
    cache.truncate(301);
    const Matrix<float> step = layer.forward_step(x.topRows(1), cache, o);
    EXPECT_EQ(std::memcmp(step_serial.data(), step.data(), sizeof(float) * size_t(step.size())), 0) << threads;
  }
}

TEST(Positions, AlibiSlopesFollowThePaper) {
  const std::vector<double> eight = alibi_slopes(8);
  for (int h = 0; h < 8; ++h) EXPECT_DOUBLE_EQ(eight[size_t(h)], std::pow(2.0, -(h + 1)));
  // H = 6: the 4-head slopes 2^-2, 2^-4, 2^-6, 2^-8, then every other 8-head slope: 2^-1, 2^-3.
  const std::vector<double> six = alibi_slopes(6);
  const double expected[] = {0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125};
  ASSERT_EQ(six.size(), 6u);
  for (int h = 0; h < 6; ++h) EXPECT_DOUBLE_EQ(six[size_t(h)], expected[h]) << "head " << h;
  EXPECT_THROW(alibi_slopes(0), Error);
}

TEST(Positions, SinusoidalEncoding) {
  const Matrix<double> pe = sinusoidal_position_encoding<double>(50, 6, 3);
  for (Index p = 0; p < 50; ++p)
    for (Index i = 0; i < 3; ++i) {
      const double angle = double(p + 3) / std::pow(10000.0, 2.0 * double(i) / 6.0);
      EXPECT_NEAR(pe(p, 2 * i), std::sin(angle), 1e-12);
      EXPECT_NEAR(pe(p, 2 * i + 1), std::cos(angle), 1e-12);
    }
  EXPECT_THROW(sinusoidal_position_encoding<float>(4, 0), Error);
}

TEST(Positions, RopeMatchesFormulaAndDependsOnRelativePositionOnly) {
  for (RopeLayout layout : {RopeLayout::kInterleaved, RopeLayout::kHalf}) {
    RopeOptions ro;
    ro.layout = layout;
    // Long enough to cross the recurrence's re-anchoring points; starting far from 0.
    MatD x = random_matrix<double>(3000, 16, 1);
    const MatD expected = rope_by_formula(x, 12345, ro);
    apply_rope<double>(x, 12345, ro);
    EXPECT_TRUE(all_close(x, expected, 1e-9));
    // The same query and key vector at every position: q_i . k_j must depend on j - i only.
    const Matrix<double> q0 = random_matrix<double>(1, 16, 2), k0 = random_matrix<double>(1, 16, 3);
    Matrix<double> q = q0.replicate(40, 1), k = k0.replicate(40, 1);
    apply_rope<double>(q, 0, ro);
    apply_rope<double>(k, 0, ro);
    const Matrix<double> scores = q * k.transpose();
    for (Index i = 0; i < 40; ++i)
      for (Index j = 0; j < 40; ++j) {
        const Index di = std::max<Index>(0, i - j), dj = di + (j - i);  // the pair (di, dj) has the same j - i
        EXPECT_NEAR(scores(i, j), scores(di, dj), 1e-9) << i << ", " << j;
      }
  }
  Matrix<float> odd(2, 3);
  EXPECT_THROW(apply_rope<float>(odd, 0), Error);
}

template <class F>
void expect_error(const F& call, const char* needle) {
  testing::expect_error(call, {needle});
}

TEST(MultiHeadErrors, BadConfigurationsInputsWeightsAndCaches) {
  expect_error([] { MultiHeadAttention<float>(config(32, 8, 3)); }, "H % H_kv");
  expect_error([] { MultiHeadAttention<float>(config(30, 8, 8)); }, "not divisible");
  expect_error([] { MultiHeadAttention<float>(config(0, 1, 1)); }, "width");
  MultiHeadConfig odd = config(30, 2, 2);
  odd.rope = true;  // head_dim 15
  expect_error([&] { MultiHeadAttention<float> l(odd); }, "even head_dim");
  MultiHeadAttention<float> layer(config(32, 4, 2), 1);
  const Matrix<float> x = Matrix<float>::Ones(5, 32), wrong = Matrix<float>::Ones(5, 31);
  expect_error([&] { layer.forward(wrong); }, "5x31");
  expect_error([&] { layer.forward(x, wrong); }, "key_width");
  Matrix<float> out(5, 30);
  expect_error([&] { layer.forward_into(x, out); }, "out is 5x30");
  MultiHeadAttention<float> broken = layer;
  broken.w_k = Matrix<float>::Ones(32, 8);
  expect_error([&] { broken.forward(x); }, "w_k is 32x8");
  broken = layer;
  broken.b_q = Matrix<float>::Ones(1, 32);
  expect_error([&] { broken.forward(x); }, "b_q");
  MultiHeadConfig with_alibi = config(32, 4, 2);
  with_alibi.alibi = true;
  AttentionOptions slope;
  slope.alibi_slope = 0.5;
  expect_error([&] { MultiHeadAttention<float>(with_alibi).forward(x, slope); }, "alibi_slope");
  AttentionOptions bad;
  bad.window_left = -7;
  expect_error([&] { layer.forward(x, bad); }, "window_left");
  KVCache<float> cache = layer.make_cache(6);
  layer.forward_step(x, cache);
  expect_error([&] { layer.forward_step(x.topRows(2), cache); }, "full");
  EXPECT_EQ(cache.size(), 5);  // unchanged by the failed step
  layer.forward_step(x.topRows(1), cache);
  EXPECT_TRUE(cache.full());
  cache.truncate(2);
  EXPECT_EQ(cache.size(), 2);
  EXPECT_THROW(cache.truncate(3), Error);
  KVCache<float> other(10, 7);
  expect_error([&] { layer.forward_step(x, other); }, "cache holds rows of 7");
  expect_error([&] { layer.forward(std::vector<Matrix<float>>{x, wrong}); }, "sequence 1");
}

}  // namespace
}  // namespace attnkit
