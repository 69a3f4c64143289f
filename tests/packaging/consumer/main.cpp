#include <attnkit/attnkit.hpp>

#include <cstdio>

int main() {
  const attnkit::Matrix<float> x = attnkit::Matrix<float>::Random(5, 8);
  attnkit::AttentionOptions options;
  options.causal = true;
  const attnkit::Matrix<float> y = attnkit::scaled_dot_product_attention(x, x, x, options);
  const bool ok = y.rows() == 5 && y.cols() == 8 && y.allFinite() && (y.row(0) - x.row(0)).norm() < 1e-5f;
  std::printf("consumer: %s\n", ok ? "ok" : "wrong result");
  return ok ? 0 : 1;
}
