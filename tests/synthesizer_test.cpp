// Synthesizer layers against a double-precision forward written here from SPEC section 4: each head's logits B
// (Dense, Random, Factorized Dense, Factorized Random, dot product, mixtures), masked softmax, times G(X), heads
// concatenated, output projection. No library code is shared beyond reading the layers' public weights.
#include <attnkit/synthesizer.hpp>

#include <limits>
#include <thread>
#include <vector>

#include "test_util.hpp"

namespace attnkit {
namespace {

using testing::all_close;
using testing::as_double;
using testing::expect_error;
using testing::MatD;
using testing::random_matrix;

// ---- logits of head h over the first n tokens, straight from SPEC section 4 ----

template <class S>
MatD dense_logits(const DenseSynthesizerWeights<S>& w, const SynthesizerConfig& c, const MatD& x, Index h) {
  const Index n = x.rows(), d = c.width, l = c.max_length;
  MatD b(n, n);
  for (Index i = 0; i < n; ++i) {
    std::vector<double> hidden(static_cast<size_t>(d));
    for (Index u = 0; u < d; ++u) {
      double t = double(w.b1(0, h * d + u));
      for (Index c2 = 0; c2 < d; ++c2) t += x(i, c2) * double(w.w1(c2, h * d + u));
      hidden[size_t(u)] = std::max(t, 0.0);
    }
    for (Index j = 0; j < n; ++j) {
      double t = double(w.b2(h, j));
      for (Index u = 0; u < d; ++u) t += double(w.w2(h * l + j, u)) * hidden[size_t(u)];
      b(i, j) = t;
    }
  }
  return b;
}

template <class S>
MatD random_logits(const RandomSynthesizerWeights<S>& w, const SynthesizerConfig& c, const MatD& x, Index h) {
  return as_double(w.r).block(h * c.max_length, 0, x.rows(), x.rows());
}

template <class S>
MatD factorized_dense_logits(const FactorizedDenseSynthesizerWeights<S>& w, const SynthesizerConfig& c, const MatD& x,
                             Index h) {
  const Index n = x.rows(), a = c.a, bb = c.b;
  const MatD A = (x * as_double(w.w_a).middleCols(h * a, a)).rowwise() + as_double(w.b_a).row(0).segment(h * a, a);
  const MatD C = (x * as_double(w.w_b).middleCols(h * bb, bb)).rowwise() + as_double(w.b_b).row(0).segment(h * bb, bb);
  MatD b(n, n);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j) b(i, j) = A(i, j % a) * C(i, j % bb);  // A tiled b times .* C tiled a times
  return b;
}

template <class S>
MatD factorized_random_logits(const FactorizedRandomSynthesizerWeights<S>& w, const SynthesizerConfig& c,
                              const MatD& x, Index h) {
  const Index n = x.rows(), l = c.max_length;
  return as_double(w.r1).middleRows(h * l, n) * as_double(w.r2).middleRows(h * l, n).transpose();
}

template <class S>
MatD dot_product_logits(const DotProductWeights<S>& w, const SynthesizerConfig& c, const MatD& x, Index h,
                        const AttentionOptions& o) {
  const Index dh = c.width / c.heads;
  const double scale = o.scale > 0 ? o.scale : 1 / std::sqrt(double(dh));
  return scale * (x * as_double(w.w_q).middleCols(h * dh, dh)) * (x * as_double(w.w_k).middleCols(h * dh, dh)).transpose();
}

/// softmax over the allowed keys of scale-free logits b: log-n factor, softcap, ALiBi, causal / window / padding.
MatD probabilities(const MatD& b, const AttentionOptions& o) {
  const Index n = b.rows();
  MatD p = MatD::Zero(n, n);
  for (Index i = 0; i < n; ++i) {
    std::vector<bool> ok(static_cast<size_t>(n));
    Index count = 0;
    for (Index j = 0; j < n; ++j) {
      bool allowed = !(o.causal && j > i);
      if (o.window_left >= 0 && j < i - o.window_left) allowed = false;
      if (o.window_right >= 0 && j > i + o.window_right) allowed = false;
      if (o.key_length >= 0 && j >= o.key_length) allowed = false;
      ok[size_t(j)] = allowed;
      count += allowed;
    }
    if (count == 0) continue;
    const double factor = o.log_n_scale ? std::log(double(count)) / std::log(512.0) : 1.0;
    std::vector<double> s(size_t(n), 0);
    double mx = -std::numeric_limits<double>::infinity();
    for (Index j = 0; j < n; ++j) {
      if (!ok[size_t(j)]) continue;
      double t = factor * b(i, j);
      if (o.softcap > 0) t = o.softcap * std::tanh(t / o.softcap);
      t -= o.alibi_slope * std::abs(double(i - j));
      s[size_t(j)] = t, mx = std::max(mx, t);
    }
    double sum = 0;
    for (Index j = 0; j < n; ++j)
      if (ok[size_t(j)]) sum += std::exp(s[size_t(j)] - mx);
    for (Index j = 0; j < n; ++j)
      if (ok[size_t(j)]) p(i, j) = std::exp(s[size_t(j)] - mx) / sum;
  }
  return p;
}

/// logits(h) for every head h.
template <class F>
std::vector<MatD> each_head(const SynthesizerConfig& c, const F& logits) {
  std::vector<MatD> b;
  for (Index h = 0; h < c.heads; ++h) b.push_back(logits(h));
  return b;
}

/// The logits of every head of a layer, in double.
template <class S>
std::vector<MatD> layer_logits(const DenseSynthesizer<S>& l, const MatD& x, const AttentionOptions&) {
  return each_head(l.config(), [&](Index h) { return dense_logits<S>(l, l.config(), x, h); });
}
template <class S>
std::vector<MatD> layer_logits(const RandomSynthesizer<S>& l, const MatD& x, const AttentionOptions&) {
  return each_head(l.config(), [&](Index h) { return random_logits<S>(l, l.config(), x, h); });
}
template <class S>
std::vector<MatD> layer_logits(const FactorizedDenseSynthesizer<S>& l, const MatD& x, const AttentionOptions&) {
  return each_head(l.config(), [&](Index h) { return factorized_dense_logits<S>(l, l.config(), x, h); });
}
template <class S>
std::vector<MatD> layer_logits(const FactorizedRandomSynthesizer<S>& l, const MatD& x, const AttentionOptions&) {
  return each_head(l.config(), [&](Index h) { return factorized_random_logits<S>(l, l.config(), x, h); });
}
template <class S>
std::vector<MatD> layer_logits(const MixtureSynthesizer<S>& l, const MatD& x, const AttentionOptions& o) {
  // alpha = softmax(mixture_logits), computed here
  const Eigen::VectorXd z = as_double(l.mixture_logits).row(0).transpose();
  const Eigen::VectorXd e = (z.array() - z.maxCoeff()).exp().matrix();
  const Eigen::VectorXd alpha = e / e.sum();
  const SynthesizerConfig& c = l.config();
  std::vector<MatD> b(size_t(c.heads), MatD::Zero(x.rows(), x.rows()));
  for (Index h = 0; h < c.heads; ++h)
    for (size_t t = 0; t < l.components().size(); ++t) {
      MatD bt;
      switch (l.components()[t]) {
        case SynthesizerKind::kDense: bt = dense_logits<S>(*l.dense, c, x, h); break;
        case SynthesizerKind::kRandom: bt = random_logits<S>(*l.random, c, x, h); break;
        case SynthesizerKind::kFactorizedDense: bt = factorized_dense_logits<S>(*l.factorized_dense, c, x, h); break;
        case SynthesizerKind::kFactorizedRandom:
          bt = factorized_random_logits<S>(*l.factorized_random, c, x, h);
          break;
        case SynthesizerKind::kDotProduct: bt = dot_product_logits<S>(*l.dot_product, c, x, h, o); break;
      }
      b[size_t(h)] += alpha(Index(t)) * bt;
    }
  return b;
}

/// Y = concat_h(P_h G_h) [W_o + b_o], G = X W_v + b_v.
template <class Layer>
MatD reference_forward(const Layer& layer, const MatD& x, const AttentionOptions& o) {
  const SynthesizerConfig& c = layer.config();
  const Index dh = c.width / c.heads;
  MatD g = x * as_double(layer.w_v);
  if (layer.b_v.size() > 0) g.rowwise() += as_double(layer.b_v).row(0);
  MatD y(x.rows(), c.width);
  const std::vector<MatD> b = layer_logits(layer, x, o);
  for (Index h = 0; h < c.heads; ++h) y.middleCols(h * dh, dh) = probabilities(b[size_t(h)], o) * g.middleCols(h * dh, dh);
  if (layer.w_o.size() == 0) return y;
  MatD out = y * as_double(layer.w_o);
  if (layer.b_o.size() > 0) out.rowwise() += as_double(layer.b_o).row(0);
  return out;
}

template <class S>
double tolerance() {
  return std::is_same_v<S, float> ? 2e-5 : 1e-12;
}

template <class S>
class SynthesizerTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SynthesizerTest, Scalars, testing::ScalarName);

SynthesizerConfig config(Index width, Index l, Index heads) {
  SynthesizerConfig c;
  c.width = width, c.max_length = l, c.heads = heads;
  c.a = 3, c.b = l / 3, c.k = 5;
  return c;
}

const std::vector<SynthesizerKind> kAllKinds = {SynthesizerKind::kDense, SynthesizerKind::kRandom,
                                                SynthesizerKind::kFactorizedDense,
                                                SynthesizerKind::kFactorizedRandom, SynthesizerKind::kDotProduct};

/// Runs `check(layer)` for a layer of every variant built from c: the four single kinds, a mixture of all five
/// kinds (random mixture weights) and a mixture of the two input-independent kinds.
template <class S, class Check>
void for_each_variant(const SynthesizerConfig& c, const Check& check) {
  check(DenseSynthesizer<S>(c, 11), "dense");
  check(RandomSynthesizer<S>(c, 12), "random");
  check(FactorizedDenseSynthesizer<S>(c, 13), "factorized dense");
  check(FactorizedRandomSynthesizer<S>(c, 14), "factorized random");
  MixtureSynthesizer<S> all(c, kAllKinds, 15);
  all.mixture_logits = random_matrix<S>(1, 5, 16);
  check(all, "mixture of all");
  MixtureSynthesizer<S> fixed(c, {SynthesizerKind::kFactorizedRandom, SynthesizerKind::kRandom}, 17);
  fixed.mixture_logits << S(0.3), S(-0.4);
  check(fixed, "mixture of random kinds");
}

TYPED_TEST(SynthesizerTest, EveryVariantMatchesTheReference) {
  using S = TypeParam;
  // d_head 5 and 8 (odd and round), one head and several, l = 24 and l = 300 (crosses the 96-row and 256-key tiles).
  struct Shape {
    Index width, l, heads;
    std::vector<Index> lengths;
  };
  const std::vector<Shape> shapes = {
      {15, 24, 3, {1, 2, 7, 13, 24}}, {8, 24, 1, {5, 24}}, {16, 300, 2, {257, 300}}};
  for (const Shape& shape : shapes) {
    const SynthesizerConfig c = config(shape.width, shape.l, shape.heads);
    for (Index n : shape.lengths) {
      const Matrix<S> x = random_matrix<S>(n, c.width, unsigned(n));
      for (bool causal : {false, true}) {
        AttentionOptions o;
        o.causal = causal;
        for_each_variant<S>(c, [&](const auto& layer, const char* name) {
          SCOPED_TRACE(::testing::Message() << name << ", n = " << n << ", l = " << c.max_length << ", H = "
                                            << c.heads << ", causal = " << causal);
          const MatD expected = reference_forward(layer, as_double(x), o);
          EXPECT_TRUE(all_close(layer.forward(x, o), expected, tolerance<S>()));
          EXPECT_TRUE(all_close(layer.forward(x, o), expected, tolerance<S>()));  // again, from the kept cache
        });
      }
    }
  }
}

TYPED_TEST(SynthesizerTest, OptionsMatchTheReference) {
  using S = TypeParam;
  const SynthesizerConfig c = config(12, 30, 2);
  const Index n = 29;
  const Matrix<S> x = random_matrix<S>(n, c.width, 3);
  std::vector<AttentionOptions> cases(6);
  cases[0].window_left = 4, cases[0].window_right = 2;
  cases[1].key_length = 17;
  cases[2].alibi_slope = 0.25, cases[2].causal = true;
  cases[3].softcap = 0.5;
  cases[4].log_n_scale = true, cases[4].causal = true;
  cases[5].key_length = 0;  // no key at all: rows are zero
  for (size_t t = 0; t < cases.size(); ++t)
    for_each_variant<S>(c, [&](const auto& layer, const char* name) {
      SCOPED_TRACE(::testing::Message() << name << ", options case " << t);
      EXPECT_TRUE(all_close(layer.forward(x, cases[t]), reference_forward(layer, as_double(x), cases[t]), tolerance<S>()));
    });
}

TYPED_TEST(SynthesizerTest, AttentionWeightsAreTheSoftmaxOfTheLogits) {
  using S = TypeParam;
  const SynthesizerConfig c = config(12, 21, 3);
  const Matrix<S> x = random_matrix<S>(19, c.width, 5);
  AttentionOptions o;
  o.causal = true;
  for_each_variant<S>(c, [&](const auto& layer, const char* name) {
    SCOPED_TRACE(name);
    const std::vector<Matrix<S>> weights = layer.attention_weights(x, o);
    const std::vector<MatD> logits = layer_logits(layer, as_double(x), o);
    ASSERT_EQ(weights.size(), size_t(c.heads));
    for (Index h = 0; h < c.heads; ++h) {
      EXPECT_TRUE(all_close(weights[size_t(h)], probabilities(logits[size_t(h)], o), tolerance<S>()));
      EXPECT_TRUE(all_close(weights[size_t(h)].rowwise().sum(), MatD::Ones(x.rows(), 1), 1e3 * tolerance<S>()));
    }
  });
}

TYPED_TEST(SynthesizerTest, RandomWeightsDoNotDependOnTheInput) {
  using S = TypeParam;
  const SynthesizerConfig c = config(12, 21, 2);
  const Matrix<S> x1 = random_matrix<S>(17, c.width, 1), x2 = random_matrix<S>(17, c.width, 2, 5.0);
  const RandomSynthesizer<S> random(c, 3);
  const FactorizedRandomSynthesizer<S> factorized(c, 3);
  const DenseSynthesizer<S> dense(c, 3);
  for (Index h = 0; h < c.heads; ++h) {
    EXPECT_EQ(random.attention_weights(x1)[size_t(h)], random.attention_weights(x2)[size_t(h)]);
    EXPECT_EQ(factorized.attention_weights(x1)[size_t(h)], factorized.attention_weights(x2)[size_t(h)]);
    EXPECT_GT((dense.attention_weights(x1)[size_t(h)] - dense.attention_weights(x2)[size_t(h)]).norm(), 1e-3);
  }
  EXPECT_FALSE(random.depends_on_input());
  EXPECT_FALSE(factorized.depends_on_input());
  EXPECT_TRUE(dense.depends_on_input());
}

TYPED_TEST(SynthesizerTest, KeptProbabilitiesFollowLengthOptionsAndWeights) {
  using S = TypeParam;
  const SynthesizerConfig c = config(12, 21, 2);
  RandomSynthesizer<S> layer(c, 4);
  AttentionOptions causal;
  causal.causal = true;
  for (Index n : {9, 5, 9, 21}) {
    const Matrix<S> x = random_matrix<S>(n, c.width, unsigned(n));
    for (const AttentionOptions& o : {AttentionOptions{}, causal, AttentionOptions{}})
      EXPECT_TRUE(all_close(layer.forward(x, o), reference_forward(layer, as_double(x), o), tolerance<S>()));
  }
  const Matrix<S> x = random_matrix<S>(9, c.width, 7);
  const Matrix<S> before = layer.forward(x);
  layer.r *= S(3);
  layer.weights_changed();
  const Matrix<S> after = layer.forward(x);
  EXPECT_TRUE(all_close(after, reference_forward(layer, as_double(x), {}), tolerance<S>()));
  EXPECT_GT((after - before).norm(), 1e-3);
  const RandomSynthesizer<S> copy = layer;  // copies weights, not the kept probabilities
  EXPECT_TRUE(all_close(copy.forward(x), as_double(after), tolerance<S>()));
}

TYPED_TEST(SynthesizerTest, MixtureWithOneHotWeightsEqualsThatComponent) {
  using S = TypeParam;
  SynthesizerConfig c = config(12, 21, 3);
  c.projection_bias = true;
  const Matrix<S> x = random_matrix<S>(20, c.width, 8);
  AttentionOptions o;
  o.causal = true;
  MixtureSynthesizer<S> mixture(c, kAllKinds, 9);
  mixture.b_v = random_matrix<S>(1, c.width, 10), mixture.b_o = random_matrix<S>(1, c.width, 11);
  const auto one_hot = [&](Index t) {
    mixture.mixture_logits.setZero();
    mixture.mixture_logits(0, t) = S(800);  // exp(-800) is 0 in double and float: the others weigh exactly nothing
  };
  const auto same_projections = [&](auto& layer) {
    layer.w_v = mixture.w_v, layer.b_v = mixture.b_v, layer.w_o = mixture.w_o, layer.b_o = mixture.b_o;
  };
  DenseSynthesizer<S> dense(c, 1);
  static_cast<DenseSynthesizerWeights<S>&>(dense) = *mixture.dense;
  same_projections(dense);
  one_hot(0);
  EXPECT_TRUE(all_close(mixture.forward(x, o), as_double(dense.forward(x, o)), tolerance<S>()));
  RandomSynthesizer<S> random(c, 1);
  static_cast<RandomSynthesizerWeights<S>&>(random) = *mixture.random;
  same_projections(random);
  one_hot(1);
  EXPECT_TRUE(all_close(mixture.forward(x, o), as_double(random.forward(x, o)), tolerance<S>()));
  FactorizedDenseSynthesizer<S> fd(c, 1);
  static_cast<FactorizedDenseSynthesizerWeights<S>&>(fd) = *mixture.factorized_dense;
  same_projections(fd);
  one_hot(2);
  EXPECT_TRUE(all_close(mixture.forward(x, o), as_double(fd.forward(x, o)), tolerance<S>()));
  FactorizedRandomSynthesizer<S> fr(c, 1);
  static_cast<FactorizedRandomSynthesizerWeights<S>&>(fr) = *mixture.factorized_random;
  same_projections(fr);
  one_hot(3);
  EXPECT_TRUE(all_close(mixture.forward(x, o), as_double(fr.forward(x, o)), tolerance<S>()));
  // The dot-product component alone is causal multi-head softmax(Q K^T / sqrt(d_head)) attention.
  one_hot(4);
  const Index dh = c.width / c.heads;
  const MatD q = as_double(x) * as_double(mixture.dot_product->w_q), k = as_double(x) * as_double(mixture.dot_product->w_k);
  const MatD g = (as_double(x) * as_double(mixture.w_v)).rowwise() + as_double(mixture.b_v).row(0);
  MatD y(x.rows(), c.width);
  for (Index h = 0; h < c.heads; ++h)
    y.middleCols(h * dh, dh) =
        testing::naive_attention(q.middleCols(h * dh, dh), k.middleCols(h * dh, dh), g.middleCols(h * dh, dh), o).out;
  const MatD expected = (y * as_double(mixture.w_o)).rowwise() + as_double(mixture.b_o).row(0);
  EXPECT_TRUE(all_close(mixture.forward(x, o), expected, tolerance<S>()));
  EXPECT_EQ(mixture.mixture_weights()[4], 1.0);
}

TYPED_TEST(SynthesizerTest, ParameterCountsMatchTheSpec) {
  using S = TypeParam;
  SynthesizerConfig c = config(12, 24, 3);
  c.a = 4, c.b = 6, c.k = 7;
  const Index d = c.width, l = c.max_length, H = c.heads, projections = 2 * d * d;
  // SPEC section 4, per head: Dense d^2 + d + d l + l; Random l^2; Factorized Random 2 l k; Factorized Dense
  // d (a + b) + a + b.
  EXPECT_EQ(DenseSynthesizer<S>(c).parameter_count(), H * (d * d + d + d * l + l) + projections);
  EXPECT_EQ(RandomSynthesizer<S>(c).parameter_count(), H * l * l + projections);
  EXPECT_EQ(FactorizedRandomSynthesizer<S>(c).parameter_count(), H * 2 * l * c.k + projections);
  EXPECT_EQ(FactorizedDenseSynthesizer<S>(c).parameter_count(), H * (d * (c.a + c.b) + c.a + c.b) + projections);
  // The counts are those of the weights the layers hold.
  const DenseSynthesizer<S> dense(c);
  EXPECT_EQ(dense.logit_parameter_count(), dense.w1.size() + dense.b1.size() + dense.w2.size() + dense.b2.size());
  const FactorizedDenseSynthesizer<S> fd(c);
  EXPECT_EQ(fd.logit_parameter_count(), fd.w_a.size() + fd.b_a.size() + fd.w_b.size() + fd.b_b.size());
  const MixtureSynthesizer<S> mixture(c, kAllKinds);
  EXPECT_EQ(mixture.logit_parameter_count(),
            H * (d * d + d + d * l + l) + H * l * l + H * (d * (c.a + c.b) + c.a + c.b) + H * 2 * l * c.k +
                2 * d * d + 5);
  c.projection_bias = true;
  EXPECT_EQ(RandomSynthesizer<S>(c).parameter_count(), H * l * l + projections + 2 * d);
  c.output_projection = false;
  EXPECT_EQ(RandomSynthesizer<S>(c).parameter_count(), H * l * l + d * d + d);
}

TYPED_TEST(SynthesizerTest, WeightsAreReproducibleFromTheSeed) {
  using S = TypeParam;
  const SynthesizerConfig c = config(12, 21, 3);
  const DenseSynthesizer<S> a(c, 42), b(c, 42), other(c, 43);
  EXPECT_EQ(a.w1, b.w1);
  EXPECT_EQ(a.w2, b.w2);
  EXPECT_EQ(a.w_v, b.w_v);
  EXPECT_EQ(a.w_o, b.w_o);
  EXPECT_NE(a.w1, other.w1);
  EXPECT_EQ(MixtureSynthesizer<S>(c, kAllKinds, 5).random->r, MixtureSynthesizer<S>(c, kAllKinds, 5).random->r);
  // Xavier-uniform: within +-sqrt(6 / (fan_in + fan_out)), spread over it.
  const double limit = std::sqrt(6.0 / double(2 * c.width));
  EXPECT_LE(a.w_v.cwiseAbs().maxCoeff(), limit);
  EXPECT_GT(a.w_v.cwiseAbs().maxCoeff(), 0.8 * limit);
  EXPECT_TRUE(a.b1.isZero());
  EXPECT_TRUE(a.b2.isZero());
}

TYPED_TEST(SynthesizerTest, SameResultForAnyThreadCountAndConcurrentCalls) {
  using S = TypeParam;
  const SynthesizerConfig c = config(16, 300, 2);
  const Matrix<S> x = random_matrix<S>(299, c.width, 12);
  for_each_variant<S>(c, [&](const auto& layer, const char* name) {
    SCOPED_TRACE(name);
    AttentionOptions one, two;
    one.threads = 1, two.threads = 2;
    one.causal = two.causal = true;
    EXPECT_EQ(layer.forward(x, one), layer.forward(x, two));
  });
  const RandomSynthesizer<S> layer(c, 13);
  const Matrix<S> expected = layer.forward(x);
  std::vector<Matrix<S>> results(4);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < results.size(); ++t)
    threads.emplace_back([&, t] {
      AttentionOptions o;
      o.causal = t % 2 == 1;
      results[t] = layer.forward(x.topRows(Index(250 + t)), o);  // every call needs other probabilities
    });
  for (std::thread& t : threads) t.join();
  for (size_t t = 0; t < results.size(); ++t) {
    AttentionOptions o;
    o.causal = t % 2 == 1;
    EXPECT_TRUE(all_close(results[t], reference_forward(layer, as_double(Matrix<S>(x.topRows(Index(250 + t)))), o),
                          tolerance<S>()));
  }
}

TYPED_TEST(SynthesizerTest, CausalRowsNeverSeeLaterTokensEvenNaN) {
  using S = TypeParam;
  const SynthesizerConfig c = config(12, 24, 2);
  Matrix<S> x = random_matrix<S>(23, c.width, 14);
  const Index poisoned = 15;
  AttentionOptions o;
  o.causal = true;
  for_each_variant<S>(c, [&](const auto& layer, const char* name) {
    SCOPED_TRACE(name);
    const Matrix<S> clean = layer.forward(x, o);
    Matrix<S> bad = x;
    bad.row(poisoned).setConstant(std::numeric_limits<S>::quiet_NaN());
    const Matrix<S> out = layer.forward(bad, o);
    EXPECT_EQ(out.topRows(poisoned), clean.topRows(poisoned));
    EXPECT_TRUE(out.row(poisoned).hasNaN());
  });
}

TYPED_TEST(SynthesizerTest, WritesIntoACallersBuffer) {
  using S = TypeParam;
  SynthesizerConfig c = config(12, 24, 3);
  c.output_projection = false;
  const MixtureSynthesizer<S> layer(c, kAllKinds, 3);
  const Matrix<S> x = random_matrix<S>(11, c.width, 15);
  Matrix<S> big = Matrix<S>::Zero(20, 30);
  layer.forward_into(x, big.block(2, 3, 11, 12));
  EXPECT_TRUE(all_close(big.block(2, 3, 11, 12), reference_forward(layer, as_double(x), {}), tolerance<S>()));
  EXPECT_TRUE(big.topRows(2).isZero());
  EXPECT_EQ(layer.forward(Matrix<S>(0, c.width)).rows(), 0);
}

TEST(SynthesizerErrors, BadInputNamesTheLimit) {
  SynthesizerConfig c = config(12, 24, 3);
  const DenseSynthesizer<float> dense(c);
  expect_error([&] { dense.forward(Matrix<float>::Zero(25, 12)); }, {"n = 25", "l = 24"});
  expect_error([&] { dense.forward(Matrix<float>::Zero(5, 13)); }, {"5x13", "d = 12"});
  Matrix<float> out(5, 11);
  expect_error([&] { dense.forward_into(Matrix<float>::Zero(5, 12), out); }, {"out", "5x11", "5x12"});
  AttentionOptions scaled;
  scaled.scale = 0.5;
  expect_error([&] { dense.forward(Matrix<float>::Zero(5, 12), scaled); }, {"options.scale", "dot-product"});
  AttentionOptions padded;
  padded.key_length = 9;
  expect_error([&] { dense.forward(Matrix<float>::Zero(5, 12), padded); }, {"key_length"});
  DenseSynthesizer<float> broken(c);
  broken.w2.resize(3, 3);
  expect_error([&] { broken.forward(Matrix<float>::Zero(5, 12)); }, {"w2", "3x3", "72x12"});
  MixtureSynthesizer<float> mixture(c, {SynthesizerKind::kRandom, SynthesizerKind::kDotProduct});
  mixture.mixture_logits(0, 1) = std::numeric_limits<float>::infinity();
  expect_error([&] { mixture.forward(Matrix<float>::Zero(5, 12)); }, {"mixture_logits", "finite"});
  mixture.mixture_logits.resize(1, 3);
  expect_error([&] { mixture.forward(Matrix<float>::Zero(5, 12)); }, {"mixture_logits", "1x3", "1x2"});

  SynthesizerConfig bad = c;
  bad.a = 5, bad.b = 5;
  expect_error([&] { FactorizedDenseSynthesizer<float> l(bad); }, {"a * b = l = 24", "a = 5", "b = 5"});
  bad.a = 0, bad.b = 24;
  expect_error([&] { FactorizedDenseSynthesizer<float> l(bad); }, {"config.a >= 1"});
  bad = c, bad.k = 0;
  expect_error([&] { FactorizedRandomSynthesizer<float> l(bad); }, {"config.k >= 1", "got 0"});
  expect_error([&] { MixtureSynthesizer<float> l(bad, {SynthesizerKind::kFactorizedRandom}); }, {"config.k"});
  bad = c, bad.heads = 5;
  expect_error([&] { RandomSynthesizer<float> l(bad); }, {"heads", "d = 12", "H = 5"});
  bad = c, bad.width = 0;
  expect_error([&] { RandomSynthesizer<float> l(bad); }, {"config.width"});
  bad = c, bad.max_length = 0;
  expect_error([&] { RandomSynthesizer<float> l(bad); }, {"config.max_length"});
  expect_error([&] { MixtureSynthesizer<float> l(c, {}); }, {"at least one component"});
  expect_error([&] { MixtureSynthesizer<float> l(c, {SynthesizerKind::kRandom, SynthesizerKind::kRandom}); },
               {"more than once"});
}

}  // namespace
}  // namespace attnkit
