// The smallest useful attnkit program: causal self-attention over a random sequence, checked against the
// materialising reference, with the per-row log-sum-exp the fused kernel can return.
#include <attnkit/attnkit.hpp>

#include <cstdio>

int main() {
  using attnkit::Matrix;
  const attnkit::Index n = 128, d = 64;
  const Matrix<float> q = Matrix<float>::Random(n, d), k = Matrix<float>::Random(n, d), v = Matrix<float>::Random(n, d);

  attnkit::AttentionOptions options;
  options.causal = true;  // row i attends to keys 0..i

  Matrix<float> out(n, d);
  attnkit::Vector<float> lse(n);
  attnkit::scaled_dot_product_attention(q, k, v, out, lse, options);  // fused: tiled, O(tile) memory

  const Matrix<float> expected = attnkit::reference::scaled_dot_product_attention(q, k, v, options);
  const float error = (out - expected).cwiseAbs().maxCoeff();
  std::printf("out is %ldx%ld, max |fused - reference| = %.2e, lse[0] = %.4f (one key: its own logit)\n",
              static_cast<long>(out.rows()), static_cast<long>(out.cols()), error, lse[0]);
  return error < 1e-5f ? 0 : 1;
}
