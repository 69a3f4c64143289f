// The gated attention unit at initialisation (Hua et al. 2022; Su's analysis of GAU, SPEC section 6): with LeCun
// normal weights and X ~ N(0, 1), the attention matrix is strongly diagonal and GAU's output is tiny next to its input,
// so a stack of post-norm GAU layers starts close to the identity. Measures each claim next to the value SPEC states
// and exits non-zero when a measurement leaves its stated range.
//
// usage: gau_init
#include <attnkit/attnkit.hpp>

#include "claims.hpp"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using attnkit::GatedAttentionUnit;
using attnkit::GauConfig;
using attnkit::GauInit;
using attnkit::GauNormalization;
using attnkit::GauOptions;
using attnkit::Index;
using attnkit::Matrix;

namespace {

Claims claims;

double rms(const Matrix<float>& x) { return std::sqrt(double(x.squaredNorm()) / double(x.size())); }

/// Layer norm without parameters: each row to mean 0, variance 1.
Matrix<float> layer_norm(const Matrix<float>& x) {
  Matrix<float> y = x;
  for (Index i = 0; i < y.rows(); ++i) {
    const float mean = y.row(i).mean();
    y.row(i).array() -= mean;
    y.row(i) /= std::sqrt(y.row(i).squaredNorm() / float(y.cols()) + 1e-6f);
  }
  return y;
}

struct Diagonal {
  double diag, off;
};

Diagonal diagonal(const Matrix<float>& a) {
  const double n = double(a.rows()), trace = a.diagonal().template cast<double>().sum();
  return {trace / n, (a.template cast<double>().sum() - trace) / (n * (n - 1))};
}

}  // namespace

int main() {
  constexpr Index n = 512, d = 768;
  GauConfig c;
  c.width = d, c.expansion = 1536, c.shared = 128;  // LeCun normal by default
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  Matrix<float> x(n, d);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = normal(gen);

  // SiLU moments of N(0, 1), from a million samples.
  double m1 = 0, m2 = 0;
  constexpr int kSamples = 1000000;
  for (int t = 0; t < kSamples; ++t) {
    const double g = normal(gen), phi = g / (1 + std::exp(-g));
    m1 += phi / kSamples, m2 += phi * phi / kSamples;
  }
  std::printf("SiLU of N(0, 1):\n");
  claims.check("E[phi]", m1, "0.2066", 0.2036, 0.2096);
  claims.check("E[phi^2]", m2, "0.3557", 0.3507, 0.3607);

  std::printf("\nGAU at initialisation, n = %ld, d = %ld, e = %ld, s = %ld, X ~ N(0, 1):\n", long(n), long(d),
              long(c.expansion), long(c.shared));
  const GatedAttentionUnit<float> lecun(c, 1);
  for (GauNormalization norm : {GauNormalization::kRelu2, GauNormalization::kSoftmaxPlus}) {
    const bool relu = norm == GauNormalization::kRelu2;
    GauOptions o;
    o.normalization = norm;
    const Diagonal a = diagonal(lecun.attention_weights(x, o));
    const double ratio = rms(lecun.forward(x, o)) / rms(x);
    std::printf(" LeCun normal, %s:\n", relu ? "relu2 / n (= relu2 / (n s))" : "softmax_plus");
    Claims::show("mean diagonal attention weight", a.diag);
    Claims::show("mean off-diagonal attention weight", a.off);
    if (relu) {
      claims.check("diagonal / off-diagonal", a.diag / a.off, "about 46", 30, 65);
      claims.check("RMS(GAU(X)) / RMS(X)", ratio, "0.06", 0.04, 0.08);
    } else {
      claims.check("diagonal / off-diagonal", a.diag / a.off, "diag.dom", 10, 100);
      claims.check("RMS(GAU(X)) / RMS(X)", ratio, "0.13", 0.09, 0.17);
    }
  }
  c.init = GauInit::kNormal, c.init_std = 0.02;
  const GatedAttentionUnit<float> paper(c, 1);
  for (GauNormalization norm : {GauNormalization::kRelu2, GauNormalization::kSoftmaxPlus}) {
    GauOptions o;
    o.normalization = norm;
    const Diagonal a = diagonal(paper.attention_weights(x, o));
    std::printf(" N(0, 0.02^2) (SPEC states no values), %s:\n",
                norm == GauNormalization::kRelu2 ? "relu2" : "softmax_plus");
    Claims::show("mean diagonal attention weight", a.diag);
    Claims::show("mean off-diagonal attention weight", a.off);
    Claims::show("diagonal / off-diagonal", a.diag / a.off);
    Claims::show("RMS(GAU(X)) / RMS(X)", rms(paper.forward(x, o)) / rms(x));
  }

  // 24 post-norm layers x <- LayerNorm(x + GAU_l(x)), each with its own LeCun weights: each step barely moves x.
  std::printf("\n24 post-norm GAU layers (relu2, LeCun), relative change |x_{l+1} - x_l| / |x_l| per layer:\n");
  c.init = GauInit::kLecunNormal;
  Matrix<float> h = layer_norm(x);
  double largest = 0;
  for (int l = 0; l < 24; ++l) {
    const GatedAttentionUnit<float> layer(c, std::uint64_t(100 + l));
    const Matrix<float> next = layer_norm(h + layer.forward(h));
    const double change = double((next - h).norm() / h.norm());
    largest = std::max(largest, change);
    std::printf("  layer %2d: %.4f%s", l + 1, change, (l + 1) % 4 == 0 ? "\n" : "   ");
    h = next;
  }
  claims.check("largest relative change per layer", largest, "small", 0, 0.12);
  return claims.exit_code();
}
