// Synthesizer attention (Tay et al. 2020): attention maps that no query-key dot product produced. Draws the maps of
// Dense, Random and vanilla dot-product attention on a short sentence as character heat maps, checks what each
// depends on, prints parameter counts and the speed of every variant relative to multi-head attention.
//
// usage: synthesizer [n]     (timing length, default 2048; timings are one thread, best of a few calls)
#include <attnkit/attnkit.hpp>

#include "timing.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

using attnkit::Index;
using attnkit::Matrix;
using attnkit::SynthesizerConfig;
using attnkit::SynthesizerKind;

namespace {

int failures = 0;

void check(bool ok, const char* what) {
  std::printf("  [%s] %s\n", ok ? "ok" : "FAILED", what);
  failures += ok ? 0 : 1;
}

/// One embedding row per character: the same character gives the same row.
Matrix<float> embed(const std::string& text, Index width) {
  Matrix<float> x(Index(text.size()), width);
  for (Index i = 0; i < x.rows(); ++i)
    for (Index c = 0; c < width; ++c)
      x(i, c) = float(std::sin(0.7 * double(c + 1) * double(static_cast<unsigned char>(text[size_t(i)]))));
  return x;
}

/// Heat maps side by side, each shaded against its own largest weight.
void draw(const std::string& text, const std::vector<std::pair<std::string, Matrix<float>>>& maps) {
  const char* ramp = " .:-=+*#%@";
  const Index n = Index(text.size());
  std::printf("\n      ");
  for (const auto& [name, p] : maps) std::printf("%-*s  ", int(n), name.c_str());
  std::printf("\n      ");
  for (size_t m = 0; m < maps.size(); ++m) std::printf("%s  ", text.c_str());
  std::printf("\n");
  for (Index i = 0; i < n; ++i) {
    std::printf("   %c  ", text[size_t(i)]);
    for (const auto& [name, p] : maps) {
      const float top = p.maxCoeff();
      for (Index j = 0; j < n; ++j) std::putchar(ramp[std::min(9, int(9.999f * p(i, j) / top))]);
      std::printf("  ");
    }
    std::printf("\n");
  }
}

using Layers = std::vector<std::pair<const char*, std::unique_ptr<attnkit::SynthesizerLayer<float>>>>;

/// One layer of every variant, seed 1.
Layers every_variant(const SynthesizerConfig& c) {
  Layers layers;
  layers.emplace_back("dense", std::make_unique<attnkit::DenseSynthesizer<float>>(c, 1));
  layers.emplace_back("random", std::make_unique<attnkit::RandomSynthesizer<float>>(c, 1));
  layers.emplace_back("factorized dense", std::make_unique<attnkit::FactorizedDenseSynthesizer<float>>(c, 1));
  layers.emplace_back("factorized random", std::make_unique<attnkit::FactorizedRandomSynthesizer<float>>(c, 1));
  layers.emplace_back("random + vanilla", std::make_unique<attnkit::MixtureSynthesizer<float>>(
                                              c, std::vector<SynthesizerKind>{SynthesizerKind::kRandom,
                                                                              SynthesizerKind::kDotProduct},
                                              1));
  return layers;
}

}  // namespace

int main(int argc, char** argv) {
  const Index timing_n = argc > 1 ? std::atol(argv[1]) : 2048;
  if (timing_n < 16) {
    std::fprintf(stderr, "usage: synthesizer [n >= 16]\n");
    return 2;
  }

  // 1. Maps on a short sentence: one head, width 32, l = its length.
  const std::string text = "the cat sat, the", other = "a dog ran far off";
  SynthesizerConfig c;
  c.width = 32, c.max_length = Index(other.size()), c.heads = 1;
  const attnkit::DenseSynthesizer<float> dense(c, 1);
  attnkit::RandomSynthesizer<float> random(c, 2);
  // Random is learned: a trained R often looks like a soft band of relative positions. Give it one, to see it.
  for (Index i = 0; i < c.max_length; ++i)
    for (Index j = 0; j < c.max_length; ++j) random.r(i, j) = -0.8f * float(std::abs(i - j - 1)) + 0.3f * random.r(i, j);
  random.weights_changed();
  const attnkit::MixtureSynthesizer<float> vanilla(c, {SynthesizerKind::kDotProduct}, 3);
  const Matrix<float> x = embed(text, c.width);
  std::printf("Attention maps of one head over \"%s\" (darker = more weight; rows are queries):\n", text.c_str());
  draw(text, {{"dense", dense.attention_weights(x)[0]},
              {"random", random.attention_weights(x)[0]},
              {"vanilla", vanilla.attention_weights(x)[0]}});

  std::printf("\nWhat each map depends on:\n");
  const Matrix<float> y = embed(other.substr(0, text.size()), c.width);
  check(random.attention_weights(x)[0] == random.attention_weights(y)[0],
        "Random: the same map for another sentence (B = R, no input)");
  Matrix<float> changed = x;
  changed.row(5) = embed("z", c.width);  // replace token 5
  const auto rows_but_5_equal = [&](const Matrix<float>& a, const Matrix<float>& b, float tol) {
    for (Index i = 0; i < a.rows(); ++i)
      if (i != 5 && (a.row(i) - b.row(i)).cwiseAbs().maxCoeff() > tol) return false;
    return true;
  };
  check(rows_but_5_equal(dense.attention_weights(x)[0], dense.attention_weights(changed)[0], 0),
        "Dense: changing token 5 changes only row 5 (row i is a function of x_i alone)");
  check(!rows_but_5_equal(vanilla.attention_weights(x)[0], vanilla.attention_weights(changed)[0], 1e-4f),
        "vanilla: changing token 5 changes other rows too (they compare against key 5)");
  const Matrix<float> p = dense.attention_weights(x)[0];
  check((p.rowwise().sum().array() - 1).abs().maxCoeff() < 1e-5f, "every row of weights sums to 1");
  {
    attnkit::MultiHeadConfig mc;
    mc.width = c.width, mc.heads = c.heads;
    const attnkit::MultiHeadAttention<float> mha(mc, 4);
    attnkit::MixtureSynthesizer<float> as_mha(c, {SynthesizerKind::kDotProduct}, 5);
    as_mha.dot_product->w_q = mha.w_q, as_mha.dot_product->w_k = mha.w_k, as_mha.w_v = mha.w_v, as_mha.w_o = mha.w_o;
    check((as_mha.forward(x) - mha.forward(x)).cwiseAbs().maxCoeff() < 1e-5f,
          "a mixture of the dot product alone is multi-head attention (same weights, same output)");
  }

  // 2. Parameter counts (SPEC section 4) at d = 256, l = 1024, H = 4, next to MHA's 4 d^2.
  SynthesizerConfig big;
  big.width = 256, big.max_length = 1024, big.heads = 4, big.a = 32, big.b = 32, big.k = 8;
  const Index d = big.width;
  std::printf("\nParameters at d = %ld, l = %ld, H = %ld (synthesizer logits; value and output projections add %ld):\n",
              long(d), long(big.max_length), long(big.heads), long(2 * d * d));
  std::printf("  %-22s %12ld  (total %ld: W_q, W_k make the logits)\n", "multi-head attention", long(2 * d * d),
              long(4 * d * d));
  for (const auto& [name, layer] : every_variant(big))
    std::printf("  %-22s %12ld  (total %ld)\n", name, long(layer->logit_parameter_count()),
                long(layer->parameter_count()));

  // 3. Speed against MHA of the same width and heads, one thread, at n = timing_n (l = n).
  big.max_length = timing_n;
  big.a = 1, big.b = timing_n;  // a * b = l for any n
  attnkit::MultiHeadConfig mc;
  mc.width = d, mc.heads = big.heads;
  const attnkit::MultiHeadAttention<float> mha(mc, 1);
  const Matrix<float> xt = Matrix<float>::Random(timing_n, d);
  attnkit::AttentionOptions one;
  one.threads = 1;
  const double mha_ms = best_ms([&] { mha.forward(xt, one); }, 3);
  std::printf("\nForward at n = %ld, d = %ld, H = %ld, one thread (Random kinds: probabilities kept after the first"
              " call):\n  %-22s %9.2f ms\n", long(timing_n), long(d), long(big.heads), "multi-head attention", mha_ms);
  for (const auto& [name, layer] : every_variant(big)) {
    layer->forward(xt, one);  // keeps the probabilities of the Random kinds
    const double ms = best_ms([&] { layer->forward(xt, one); }, 3);
    std::printf("  %-22s %9.2f ms   %5.2fx MHA's speed\n", name, ms, mha_ms / ms);
  }
  if (failures > 0) std::printf("\n%d check(s) FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
