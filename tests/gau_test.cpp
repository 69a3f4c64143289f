// GAU and FLASH against double-precision forwards written here from SPEC section 5: SiLU projections, per-dimension
// scale/offset heads of Z, the three GAU normalisations, FLASH's in-chunk relu2 and cross-chunk linear attention.
#include <attnkit/gau.hpp>

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

MatD silu(const MatD& x) {
  return x.unaryExpr([](double t) { return t / (1 + std::exp(-t)); });
}

/// phi(x W + b), b optional.
template <class S>
MatD projection(const MatD& x, const Matrix<S>& w, const Matrix<S>& b) {
  MatD y = x * as_double(w);
  if (b.size() > 0) y.rowwise() += as_double(b).row(0);
  return silu(y);
}

template <class S>
MatD head(const GatedLayerBase<S>& l, const MatD& z, Index h) {
  MatD out(z.rows(), z.cols());
  for (Index i = 0; i < z.rows(); ++i)
    for (Index c = 0; c < z.cols(); ++c) out(i, c) = z(i, c) * double(l.gamma(h, c)) + double(l.beta(h, c));
  return out;
}

/// Interleaved RoPE at positions 0, 1, ...: pair (2t, 2t + 1) of row p turns by p * base^(-2t / s).
MatD rope(const MatD& x, double base) {
  MatD y = x;
  for (Index p = 0; p < x.rows(); ++p)
    for (Index t = 0; t < x.cols() / 2; ++t) {
      const double angle = double(p) * std::pow(base, -2.0 * double(t) / double(x.cols()));
      y(p, 2 * t) = x(p, 2 * t) * std::cos(angle) - x(p, 2 * t + 1) * std::sin(angle);
      y(p, 2 * t + 1) = x(p, 2 * t) * std::sin(angle) + x(p, 2 * t + 1) * std::cos(angle);
    }
  return y;
}

template <class S>
MatD gate_and_project(const GatedLayerBase<S>& l, const MatD& u, const MatD& y) {
  MatD out = u.cwiseProduct(y) * as_double(l.w_o);
  if (l.b_o.size() > 0) out.rowwise() += as_double(l.b_o).row(0);
  return out;
}

/// A (n x n) from SPEC section 5.
template <class S>
MatD gau_attention(const GatedAttentionUnit<S>& l, const MatD& x, const GauOptions& o) {
  const Index n = x.rows();
  const double s = double(l.config().shared);
  MatD q = head(l, projection(x, l.w_z, l.b_z), 0), k = head(l, projection(x, l.w_z, l.b_z), 1);
  if (l.config().rope) q = rope(q, l.config().rope_options.base), k = rope(k, l.config().rope_options.base);
  MatD a = MatD::Zero(n, n);
  for (Index i = 0; i < n; ++i) {
    std::vector<Index> keys;
    for (Index j = 0; j < n; ++j)
      if (!(o.causal && j > i) && !(o.key_length >= 0 && j >= o.key_length)) keys.push_back(j);
    const double n_i = double(keys.size());
    if (keys.empty()) continue;
    if (o.normalization == GauNormalization::kSoftmaxPlus) {
      const double factor = std::log(std::max(n_i, 16.0)) / std::log(512.0) / std::sqrt(s);
      double mx = -std::numeric_limits<double>::infinity(), sum = 0;
      for (Index j : keys) mx = std::max(mx, factor * q.row(i).dot(k.row(j)));
      for (Index j : keys) sum += std::exp(factor * q.row(i).dot(k.row(j)) - mx);
      for (Index j : keys) a(i, j) = std::exp(factor * q.row(i).dot(k.row(j)) - mx) / sum;
    } else {
      const bool shared = o.normalization == GauNormalization::kRelu2Shared;
      for (Index j : keys) {
        const double t = std::max(0.0, q.row(i).dot(k.row(j)) / (shared ? 1.0 : std::sqrt(s)));
        a(i, j) = t * t / (shared ? n_i * s : n_i);
      }
    }
  }
  return a;
}

template <class S>
MatD gau_reference(const GatedAttentionUnit<S>& l, const MatD& x, const GauOptions& o) {
  return gate_and_project(l, projection(x, l.w_u, l.b_u), gau_attention(l, x, o) * projection(x, l.w_v, l.b_v));
}

/// FLASH's V_quad and V_lin from SPEC section 5, pair by pair.
template <class S>
std::pair<MatD, MatD> flash_parts(const FlashAttentionLayer<S>& l, const MatD& x, bool causal) {
  const Index n = x.rows(), c = l.config().chunk;
  const double s = double(l.config().shared);
  const MatD z = projection(x, l.w_z, l.b_z), v = projection(x, l.w_v, l.b_v);
  const MatD qq = head(l, z, 0), kq = head(l, z, 1), ql = head(l, z, 2), kl = head(l, z, 3);
  MatD quad = MatD::Zero(n, v.cols()), lin = MatD::Zero(n, v.cols());
  for (Index i = 0; i < n; ++i) {
    const Index g = i / c;
    for (Index j = g * c; j < std::min(n, (g + 1) * c); ++j) {
      if (causal && j > i) continue;
      const double t = std::max(0.0, qq.row(i).dot(kq.row(j)) / std::sqrt(s));
      quad.row(i) += t * t / double(c) * v.row(j);
    }
    const Index keys = causal ? g * c : n;  // causal: the g c tokens of the chunks before
    for (Index j = 0; j < keys; ++j) lin.row(i) += ql.row(i).dot(kl.row(j)) / double(keys) * v.row(j);
  }
  return {quad, lin};
}

template <class S>
MatD flash_reference(const FlashAttentionLayer<S>& l, const MatD& x, bool causal) {
  const auto [quad, lin] = flash_parts(l, x, causal);
  return gate_and_project(l, projection(x, l.w_u, l.b_u), quad + lin);
}

/// Error relative to the largest expected magnitude.
template <class S>
double tolerance(const MatD& expected) {
  const double scale = std::max(1.0, expected.cwiseAbs().maxCoeff());
  return scale * (std::is_same_v<S, float> ? 2e-5 : 1e-12);
}

template <class S>
class GauTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(GauTest, Scalars, testing::ScalarName);

GauConfig small_config(bool bias, bool rope) {
  GauConfig c;
  c.width = 16, c.expansion = 24, c.shared = 10, c.chunk = 8, c.bias = bias, c.rope = rope;
  return c;
}

/// Random biases, gamma and beta, so that every term of the formula is exercised.
template <class S>
void randomise(GatedLayerBase<S>& l) {
  unsigned seed = 100;
  for (Matrix<S>* m : {&l.b_u, &l.b_v, &l.b_z, &l.b_o, &l.beta})
    if (m->size() > 0) *m = random_matrix<S>(m->rows(), m->cols(), seed++, 0.3);
  l.gamma = (random_matrix<S>(l.gamma.rows(), l.gamma.cols(), seed++, 0.3).array() + S(1)).matrix();
}

const GauNormalization kNorms[] = {GauNormalization::kRelu2, GauNormalization::kRelu2Shared,
                                   GauNormalization::kSoftmaxPlus};

TYPED_TEST(GauTest, GauMatchesTheReference) {
  using S = TypeParam;
  for (bool bias : {false, true})
    for (bool rope : {false, true}) {
      GatedAttentionUnit<S> gau(small_config(bias, rope), 3);
      randomise(gau);
      for (Index n : {1, 7, 33, 130}) {  // 130 crosses the 96-row query tile
        const Matrix<S> x = random_matrix<S>(n, 16, unsigned(n));
        for (GauNormalization norm : kNorms)
          for (bool causal : {false, true}) {
            GauOptions o;
            o.normalization = norm, o.causal = causal;
            SCOPED_TRACE(::testing::Message() << "n = " << n << ", normalisation " << int(norm) << ", causal "
                                              << causal << ", bias " << bias << ", rope " << rope);
            const MatD expected = gau_reference(gau, as_double(x), o);
            EXPECT_TRUE(all_close(gau.forward(x, o), expected, tolerance<S>(expected)));
            EXPECT_TRUE(all_close(gau.attention_weights(x, o), gau_attention(gau, as_double(x), o),
                                  tolerance<S>(MatD::Ones(1, 1))));
          }
      }
    }
}

TYPED_TEST(GauTest, KeyPaddingAndThreads) {
  using S = TypeParam;
  GatedAttentionUnit<S> gau(small_config(true, false), 4);
  randomise(gau);
  const Matrix<S> x = random_matrix<S>(301, 16, 5);
  for (GauNormalization norm : kNorms)
    for (Index key_length : {0, 1, 200}) {
      GauOptions o;
      o.normalization = norm, o.key_length = key_length, o.causal = key_length == 200;
      const MatD expected = gau_reference(gau, as_double(x), o);
      EXPECT_TRUE(all_close(gau.forward(x, o), expected, tolerance<S>(expected))) << "key_length " << key_length;
      GauOptions one = o, two = o;
      one.threads = 1, two.threads = 2;
      EXPECT_EQ(gau.forward(x, one), gau.forward(x, two));
    }
}

TYPED_TEST(GauTest, IdentityAttentionIsTheGatedLinearUnit) {
  using S = TypeParam;
  GatedAttentionUnit<S> gau(small_config(true, false), 6);
  randomise(gau);
  const Matrix<S> x = random_matrix<S>(13, 16, 7);
  const MatD u = projection(as_double(x), gau.w_u, gau.b_u), v = projection(as_double(x), gau.w_v, gau.b_v);
  const MatD glu = gate_and_project(gau, u, v);  // (U .* V) W_o + b_o: the GLU feed-forward
  const Matrix<S> identity = Matrix<S>::Identity(13, 13);
  EXPECT_TRUE(all_close(gau.forward_with_attention(x, identity), glu, tolerance<S>(glu)));
  // The hook takes the layer's own attention to its forward.
  GauOptions o;
  o.causal = true;
  EXPECT_TRUE(all_close(gau.forward_with_attention(x, gau.attention_weights(x, o)), as_double(gau.forward(x, o)),
                        tolerance<S>(glu)));
}

TYPED_TEST(GauTest, ScalingZByLambdaScalesRelu2AttentionByLambdaToTheFourth) {
  using S = TypeParam;
  GatedAttentionUnit<S> gau(small_config(false, false), 8);  // beta = 0
  const Matrix<S> x = random_matrix<S>(20, 16, 9);
  for (GauNormalization norm : {GauNormalization::kRelu2, GauNormalization::kRelu2Shared}) {
    GauOptions o;
    o.normalization = norm;
    const Matrix<S> a = gau.attention_weights(x, o);
    GatedAttentionUnit<S> scaled = gau;
    const S lambda = S(1.5);
    scaled.gamma *= lambda;  // Q -> lambda Q and K -> lambda K: the same as Z -> lambda Z with beta = 0
    const Matrix<S> b = scaled.attention_weights(x, o);
    EXPECT_GT(a.maxCoeff(), S(0));
    EXPECT_TRUE(all_close(b, as_double(a) * std::pow(1.5, 4), 1e-5 * as_double(b).cwiseAbs().maxCoeff()));
  }
}

TYPED_TEST(GauTest, SoftmaxPlusIsPlainSoftmaxAt512Tokens) {
  using S = TypeParam;
  GatedAttentionUnit<S> gau(small_config(false, false), 10);
  const Matrix<S> x = random_matrix<S>(512, 16, 11);
  GauOptions o;
  o.normalization = GauNormalization::kSoftmaxPlus;
  // log(512) / log(512) = 1: softmax(Q K^T / sqrt(s)) through the exact attention oracle.
  const MatD z = projection(as_double(x), gau.w_z, gau.b_z);
  const MatD q = head(gau, z, 0), k = head(gau, z, 1), v = projection(as_double(x), gau.w_v, gau.b_v);
  AttentionOptions plain;
  plain.scale = 1 / std::sqrt(10.0);
  const MatD av = testing::naive_attention(q, k, v, plain).out;
  const MatD expected = gate_and_project(gau, projection(as_double(x), gau.w_u, gau.b_u), av);
  EXPECT_TRUE(all_close(gau.forward(x, o), expected, tolerance<S>(expected)));
}

TYPED_TEST(GauTest, FlashMatchesTheReference) {
  using S = TypeParam;
  for (bool bias : {false, true}) {
    FlashAttentionLayer<S> flash(small_config(bias, false), 12);
    randomise(flash);
    for (Index n : {1, 7, 8, 29, 64, 300}) {  // c = 8: a short first chunk, exact multiples, a short last chunk
      const Matrix<S> x = random_matrix<S>(n, 16, unsigned(n + 1));
      for (bool causal : {false, true}) {
        GauOptions o;
        o.causal = causal;
        SCOPED_TRACE(::testing::Message() << "n = " << n << ", causal " << causal << ", bias " << bias);
        const MatD expected = flash_reference(flash, as_double(x), causal);
        EXPECT_TRUE(all_close(flash.forward(x, o), expected, tolerance<S>(expected)));
        const auto [quad, lin] = flash_parts(flash, as_double(x), causal);
        const FlashParts<S> parts = flash.attention_parts(x, o);
        EXPECT_TRUE(all_close(parts.quadratic, quad, tolerance<S>(quad)));
        EXPECT_TRUE(all_close(parts.linear, lin, tolerance<S>(lin)));
      }
    }
  }
}

TYPED_TEST(GauTest, FlashLinearPartIsFullLinearAttention) {
  using S = TypeParam;
  const Matrix<S> x = random_matrix<S>(61, 16, 13);
  for (Index chunk : {1, 3, 8, 1000}) {
    GauConfig c = small_config(false, false);
    c.chunk = chunk;
    FlashAttentionLayer<S> flash(c, 14);
    randomise(flash);
    // Un-chunked: (Q_lin K_lin^T / n) V over all 61 tokens.
    const MatD z = projection(as_double(x), flash.w_z, flash.b_z), v = projection(as_double(x), flash.w_v, flash.b_v);
    const MatD full = head(flash, z, 2) * head(flash, z, 3).transpose() / 61.0 * v;
    EXPECT_TRUE(all_close(flash.attention_parts(x).linear, full, tolerance<S>(full))) << "chunk " << chunk;
  }
}

TYPED_TEST(GauTest, FlashShortLastChunkIsZeroPaddingToAWholeChunk) {
  using S = TypeParam;
  FlashAttentionLayer<S> flash(small_config(false, false), 15);  // no bias: a zero token has V = phi(0) = 0
  const Matrix<S> x = random_matrix<S>(29, 16, 16);
  Matrix<S> padded = Matrix<S>::Zero(32, 16);
  padded.topRows(29) = x;
  GauOptions o;
  o.causal = true;
  const Matrix<S> out = flash.forward(x, o);
  EXPECT_TRUE(all_close(out, as_double(Matrix<S>(flash.forward(padded, o).topRows(29))), tolerance<S>(as_double(out))));
  // Dividing the last chunk by its 5 tokens instead of c = 8 would change the last rows.
  const FlashParts<S> parts = flash.attention_parts(x, o);
  EXPECT_GT(parts.quadratic.bottomRows(5).cwiseAbs().maxCoeff(), S(0));
}

TYPED_TEST(GauTest, FlashSameResultForAnyThreadCount) {
  using S = TypeParam;
  GauConfig c = small_config(true, false);
  c.chunk = 40;
  FlashAttentionLayer<S> flash(c, 17);
  randomise(flash);
  const Matrix<S> x = random_matrix<S>(333, 16, 18);
  for (bool causal : {false, true}) {
    GauOptions one, two;
    one.threads = 1, two.threads = 2;
    one.causal = two.causal = causal;
    EXPECT_EQ(flash.forward(x, one), flash.forward(x, two));
  }
}

TYPED_TEST(GauTest, NanInATokenStaysInItsRowsAndLaterOnes) {
  using S = TypeParam;
  GatedAttentionUnit<S> gau(small_config(false, false), 19);
  FlashAttentionLayer<S> flash(small_config(false, false), 19);
  Matrix<S> x = random_matrix<S>(30, 16, 20);
  const Matrix<S> clean_gau = gau.forward(x, {GauNormalization::kRelu2, true}),
                  clean_flash = flash.forward(x, {GauNormalization::kRelu2, true});
  x.row(17).setConstant(std::numeric_limits<S>::quiet_NaN());
  const Matrix<S> bad_gau = gau.forward(x, {GauNormalization::kRelu2, true});
  EXPECT_EQ(bad_gau.topRows(17), clean_gau.topRows(17));
  EXPECT_TRUE(bad_gau.row(17).hasNaN());  // relu(NaN)^2 is NaN, not 0
  // NaN logits with finite gates: relu(NaN)^2 must stay NaN rather than become a zero weight.
  GatedAttentionUnit<S> nan_gamma = gau;
  nan_gamma.gamma(0, 3) = std::numeric_limits<S>::quiet_NaN();
  const Matrix<S> finite = random_matrix<S>(30, 16, 21);
  for (GauNormalization norm : kNorms) {
    EXPECT_TRUE(nan_gamma.attention_weights(finite, {norm, false}).array().isNaN().all()) << int(norm);
    EXPECT_TRUE(nan_gamma.forward(finite, {norm, false}).array().isNaN().all()) << int(norm);
  }
  const Matrix<S> bad_flash = flash.forward(x, {GauNormalization::kRelu2, true});
  EXPECT_EQ(bad_flash.topRows(17), clean_flash.topRows(17));  // row 16 shares its chunk, not its causal past
  EXPECT_TRUE(bad_flash.row(17).hasNaN());
}

TEST(GauErrors, ParameterCountsAndBadInput) {
  GauConfig c = small_config(true, false);
  const GatedAttentionUnit<float> gau(c);
  const Index d = 16, e = 24, s = 10;
  EXPECT_EQ(gau.parameter_count(), 3 * d * e + d * s + 4 * s + 2 * e + s + d);
  EXPECT_EQ(FlashAttentionLayer<float>(c).parameter_count(), 3 * d * e + d * s + 8 * s + 2 * e + s + d);
  GauConfig defaults;
  defaults.width = 8;
  EXPECT_EQ(GatedAttentionUnit<float>(defaults).config().expansion, 16);
  EXPECT_EQ(GatedAttentionUnit<float>(defaults).w_z.cols(), 128);

  expect_error([&] { gau.forward(Matrix<float>::Zero(5, 15)); }, {"5x15", "d = 16"});
  GauOptions pad;
  pad.key_length = 6;
  expect_error([&] { gau.forward(Matrix<float>::Zero(5, 16), pad); }, {"key_length", "n = 5"});
  GatedAttentionUnit<float> broken = gau;
  broken.w_z.resize(16, 11);
  expect_error([&] { broken.forward(Matrix<float>::Zero(5, 16)); }, {"w_z", "16x11", "16x10"});
  Matrix<float> out(5, 17);
  expect_error([&] { gau.forward_into(Matrix<float>::Zero(5, 16), out); }, {"out", "5x17"});
  expect_error([&] { gau.forward_with_attention(Matrix<float>::Zero(5, 16), Matrix<float>::Zero(5, 4)); },
               {"attention", "5x4", "5x5"});
  const FlashAttentionLayer<float> flash(c);
  expect_error([&] { flash.forward(Matrix<float>::Zero(5, 16), pad); }, {"key_length", "FLASH"});
  GauOptions softmax;
  softmax.normalization = GauNormalization::kSoftmaxPlus;
  expect_error([&] { flash.forward(Matrix<float>::Zero(5, 16), softmax); }, {"normalization"});

  GauConfig bad = c;
  bad.shared = 0;
  expect_error([&] { GatedAttentionUnit<float> l(bad); }, {"config.shared", "got 0"});
  bad = c, bad.chunk = 0;
  expect_error([&] { FlashAttentionLayer<float> l(bad); }, {"config.chunk", "got 0"});
  bad = c, bad.width = 0;
  expect_error([&] { GatedAttentionUnit<float> l(bad); }, {"config.width"});
  bad = c, bad.expansion = -3;
  expect_error([&] { FlashAttentionLayer<float> l(bad); }, {"config.expansion", "-3"});
  bad = c, bad.rope = true, bad.shared = 9;
  expect_error([&] { GatedAttentionUnit<float> l(bad); }, {"RoPE", "9"});
  bad = c, bad.rope = true;
  expect_error([&] { FlashAttentionLayer<float> l(bad); }, {"rope", "FLASH"});
  bad = c, bad.init = GauInit::kNormal, bad.init_std = 0;
  expect_error([&] { GatedAttentionUnit<float> l(bad); }, {"init_std"});
}

TEST(GauInitialisation, LecunNormalOrAGivenStandardDeviation) {
  GauConfig c;
  c.width = 256, c.expansion = 512, c.shared = 128;
  const GatedAttentionUnit<double> lecun(c, 1), same(c, 1);
  EXPECT_EQ(lecun.w_u, same.w_u);
  const auto stddev = [](const Matrix<double>& w) { return std::sqrt(w.squaredNorm() / double(w.size())); };
  EXPECT_NEAR(stddev(lecun.w_u), 1 / std::sqrt(256.0), 0.01 / std::sqrt(256.0) * 10);
  EXPECT_NEAR(stddev(lecun.w_o), 1 / std::sqrt(512.0), 0.01 / std::sqrt(512.0) * 10);
  c.init = GauInit::kNormal;
  const GatedAttentionUnit<double> paper(c, 1);
  EXPECT_NEAR(stddev(paper.w_z), 0.02, 0.002);
  EXPECT_TRUE(paper.gamma.isOnes() && paper.beta.isZero());
}

}  // namespace
}  // namespace attnkit
