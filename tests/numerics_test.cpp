// The numerics contract of docs/NUMERICS.md, across families: each section here is one promise of that document,
// checked on every family it applies to. (Each family's own test file checks the same promises in more depth.)
#include <gtest/gtest.h>

#include <attnkit/attnkit.hpp>

#include <cstdio>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace attnkit::testing {
namespace {

using F = Matrix<float>;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr Index kWidth = 16, kHeads = 2;

/// One family as "sequence in, sequence out": x (n x kWidth) is the input of a layer, or q = k = v for a kernel.
struct Family {
  std::string name;
  std::function<F(const F& x, const AttentionOptions& o)> run;
  bool masks = true;  ///< takes key padding (options.key_length)
};

MultiHeadAttention<float> mha() {
  MultiHeadConfig c;
  c.width = kWidth, c.heads = kHeads;
  return MultiHeadAttention<float>(c, 3);
}
SynthesizerConfig synth_config() {
  SynthesizerConfig c;
  c.width = kWidth, c.max_length = 64, c.heads = kHeads, c.k = 4;
  return c;
}
GauConfig gau_config() {
  GauConfig c;
  c.width = kWidth, c.shared = 8, c.chunk = 8;
  return c;
}
GauOptions gau_options(const AttentionOptions& o, GauNormalization norm = GauNormalization::kRelu2) {
  GauOptions g;
  g.causal = o.causal, g.key_length = o.key_length, g.threads = o.threads, g.normalization = norm;
  return g;
}

/// Every family, layers without biases (so "attends to nothing" means an exact zero output).
std::vector<Family> families() {
  static const MultiHeadAttention<float> layer = mha();
  static const DenseSynthesizer<float> dense(synth_config(), 4);
  static const RandomSynthesizer<float> random(synth_config(), 5);
  static const FactorizedRandomSynthesizer<float> factorized(synth_config(), 6);
  static const MixtureSynthesizer<float> mixture(synth_config(),
                                                 {SynthesizerKind::kRandom, SynthesizerKind::kDotProduct}, 7);
  static const GatedAttentionUnit<float> gau(gau_config(), 8);
  static const FlashAttentionLayer<float> flash(gau_config(), 9);
  const auto linear_options = [](const AttentionOptions& o) {
    LinearOptions l;
    l.causal = o.causal, l.threads = o.threads;
    return l;
  };
  return {
      {"sdpa", [](const F& x, const AttentionOptions& o) { return scaled_dot_product_attention(x, x, x, o); }},
      {"sparse local_atrous",
       [](const F& x, const AttentionOptions& o) { return sparse_attention(x, x, x, SparsePattern::local_atrous(3), o); }},
      {"multi_head_attention (heads)",
       [](const F& x, const AttentionOptions& o) {
         F out(x.rows(), x.cols());
         multi_head_attention(x, x, x, out, kHeads, kHeads, o);
         return out;
       }},
      {"MultiHeadAttention", [](const F& x, const AttentionOptions& o) { return layer.forward(x, o); }},
      {"DenseSynthesizer", [](const F& x, const AttentionOptions& o) { return dense.forward(x, o); }},
      {"RandomSynthesizer", [](const F& x, const AttentionOptions& o) { return random.forward(x, o); }},
      {"FactorizedRandomSynthesizer", [](const F& x, const AttentionOptions& o) { return factorized.forward(x, o); }},
      {"MixtureSynthesizer", [](const F& x, const AttentionOptions& o) { return mixture.forward(x, o); }},
      {"GAU relu2", [](const F& x, const AttentionOptions& o) { return gau.forward(x, gau_options(o)); }},
      {"GAU softmax_plus",
       [](const F& x, const AttentionOptions& o) {
         return gau.forward(x, gau_options(o, GauNormalization::kSoftmaxPlus));
       }},
      {"FLASH", [](const F& x, const AttentionOptions& o) { return flash.forward(x, gau_options(o)); }, false},
      {"linear elu+1",
       [=](const F& x, const AttentionOptions& o) { return linear_attention(x, x, x, EluPlusOne{}, linear_options(o)); },
       false},
      {"linear Taylor",
       [=](const F& x, const AttentionOptions& o) { return linear_attention(x, x, x, Taylor{}, linear_options(o)); },
       false},
  };
}

// 1. A row with no allowed key attends to nothing: zeros, never NaN (SDPA's log-sum-exp is -inf).
TEST(Numerics, FullyMaskedRowsAreZeroInEveryFamilyThatMasks) {
  const F x = random_matrix<float>(23, kWidth, 1);
  AttentionOptions none;
  none.key_length = 0;
  for (const Family& f : families()) {
    if (!f.masks) continue;
    EXPECT_TRUE(f.run(x, none).isZero(0)) << f.name;
  }
  F out(23, kWidth);
  Vector<float> lse(23);
  scaled_dot_product_attention(x, x, x, out, lse, none);
  EXPECT_TRUE((lse.array() == -std::numeric_limits<float>::infinity()).all());
}

// 2. Masked keys and values are never read: NaN past the key padding, or in a later token under causal attention,
// cannot reach a row that may not see it.
TEST(Numerics, MaskedNanNeverReachesTheOutput) {
  F x = random_matrix<float>(23, kWidth, 2);
  x.bottomRows(23 - 9).setConstant(kNaN);  // tokens 9.. are padding (or, causally, the future of rows < 9)
  AttentionOptions padded, causal;
  padded.key_length = 9;
  causal.causal = true;
  for (const Family& f : families()) {
    if (f.masks) {
      EXPECT_TRUE(f.run(x, padded).topRows(9).allFinite()) << f.name << ", key padding";
    }
    EXPECT_TRUE(f.run(x, causal).topRows(9).allFinite()) << f.name << ", causal";
  }
}

// 3. NaN or Inf in an allowed position is not hidden: it propagates to every row that attends to it.
TEST(Numerics, NanInAnAllowedPositionPropagates) {
  F x = random_matrix<float>(23, kWidth, 3);
  x(4, 2) = kNaN;
  AttentionOptions causal;
  causal.causal = true;
  for (const Family& f : families()) {
    const F all = f.run(x, {}), later = f.run(x, causal);
    EXPECT_TRUE(all.row(4).array().isNaN().any()) << f.name << ": the NaN token's own row";
    EXPECT_TRUE(later.row(4).array().isNaN().any()) << f.name << ": the NaN token's own row, causal";
    EXPECT_TRUE(later.topRows(4).allFinite()) << f.name << ": rows before the NaN token, causal";
  }
  // In the kernels, a NaN key reaches every query that attends to it, and only those.
  const F q = random_matrix<float>(9, 8, 4), v = random_matrix<float>(9, 8, 5);
  F k = random_matrix<float>(9, 8, 6);
  k(6, 0) = std::numeric_limits<float>::infinity();
  AttentionOptions o;
  o.causal = true;
  const F out = scaled_dot_product_attention(q, k, v, o);
  EXPECT_TRUE(out.topRows(6).allFinite());
  EXPECT_TRUE(out.bottomRows(3).array().isNaN().all() || !out.bottomRows(3).allFinite());
}

// 4. Logits up to 1e4 in float do not overflow: the row max is subtracted before exp, so the largest logit's value
// wins exactly.
TEST(Numerics, FloatLogitsUpTo1e4DoNotOverflow) {
  const Index n = 37, d = 8;
  F q = F::Zero(n, d), k = F::Zero(n, d), v = random_matrix<float>(n, d, 7);
  for (Index i = 0; i < n; ++i) q(i, i % d) = 100.f * std::sqrt(float(d));  // q . k_j / sqrt(d) = 1e4 or 0
  for (Index j = 0; j < n; ++j) k(j, j % d) = j % 5 == 0 ? 100.f : -100.f;   // +1e4 for j = 0, 5, ...; else -1e4
  const F sdpa = scaled_dot_product_attention(q, k, v);
  const F sparse = sparse_attention(q, k, v, SparsePattern::local(40));
  F heads(n, d);
  multi_head_attention(q, k, v, heads, 2, 2);
  for (const F* out : {&sdpa, &sparse}) {
    ASSERT_TRUE(out->allFinite());
    for (Index i = 0; i < n; ++i) {
      // Row i: the keys with the same coordinate as q_i and logit +1e4 share the weight equally.
      Eigen::RowVectorXf want = Eigen::RowVectorXf::Zero(d);
      int count = 0;
      for (Index j = 0; j < n; ++j)
        if (j % d == i % d && j % 5 == 0) want += v.row(j), ++count;
      if (count == 0) continue;  // every logit of the row is 0 or -1e4: checked finite above
      EXPECT_LT((out->row(i) - want / float(count)).cwiseAbs().maxCoeff(), 1e-5f) << "row " << i;
    }
  }
  EXPECT_TRUE(heads.allFinite());
}

// 5. Float accumulation order is fixed: the result is bit for bit the same for any thread count.
TEST(Numerics, BitIdenticalForAnyThreadCount) {
  const F x = random_matrix<float>(61, kWidth, 8);
  for (const bool causal : {false, true})
    for (const Family& f : families()) {
      AttentionOptions one, two, three;
      one.causal = two.causal = three.causal = causal;
      one.threads = 1, two.threads = 2, three.threads = 3;
      const F a = f.run(x, one);
      EXPECT_TRUE((a.array() == f.run(x, two).array()).all()) << f.name << ", causal " << causal;
      EXPECT_TRUE((a.array() == f.run(x, three).array()).all()) << f.name << ", causal " << causal;
    }
}

// 6. The stated tolerance against the double-precision reference, for the kernels on round and odd sizes:
// float within 16 u sqrt(m) max|v| (u = 2^-23) for softmax attention and for linear attention with positive
// features. The measured figures are printed for NUMERICS.md.
TEST(Numerics, KernelErrorsWithinTheStatedTolerance) {
  constexpr double kUnits = 16;
  std::printf("  %-22s %6s %12s %12s\n", "kernel", "n = m", "max error", "tolerance");
  for (const Index n : {Index(1), Index(7), Index(64), Index(257), Index(1000)}) {
    const F q = random_matrix<float>(n, 32, 9), k = random_matrix<float>(n, 32, 10), v = random_matrix<float>(n, 32, 11);
    const MatD qd = as_double(q), kd = as_double(k), vd = as_double(v);
    const double tol = kUnits * std::numeric_limits<float>::epsilon() * std::sqrt(double(n)) *
                       std::max(1.0, vd.cwiseAbs().maxCoeff());
    const auto check = [&](const char* name, const F& got, const MatD& want) {
      const double err = (as_double(got) - want).cwiseAbs().maxCoeff();
      std::printf("  %-22s %6ld %12.3g %12.3g\n", name, long(n), err, tol);
      EXPECT_LE(err, tol) << name << ", n = " << n;
    };
    AttentionOptions causal;
    causal.causal = true;
    check("sdpa", scaled_dot_product_attention(q, k, v), naive_attention(qd, kd, vd, {}).out);
    check("sdpa causal", scaled_dot_product_attention(q, k, v, causal), naive_attention(qd, kd, vd, causal).out);
    const SparsePattern p = SparsePattern::local_atrous(5);
    NaiveExtras mask;
    const BoolMatrix allowed = p.mask(n, n);
    mask.mask = &allowed;
    check("sparse local_atrous(5)", sparse_attention(q, k, v, p), naive_attention(qd, kd, vd, {}, mask).out);
    // Linear attention with elu+1 features: sum_j A_ij v_j / (sum_j A_ij + eps) in double.
    const auto elu = [](const MatD& x) { return MatD(x.unaryExpr([](double t) { return t > 0 ? t + 1 : std::exp(t); })); };
    MatD a = elu(qd) * elu(kd).transpose();
    MatD want = a * vd;
    for (Index i = 0; i < n; ++i) want.row(i) /= a.row(i).sum() + 1e-6;
    check("linear elu+1", linear_attention(q, k, v, EluPlusOne{}), want);
  }
}

}  // namespace
}  // namespace attnkit::testing
