// Two translation units include every header; linking them catches non-inline definitions (ODR violations).
#include <attnkit/attnkit.hpp>

attnkit::Matrix<float> odr_second_unit();

int main() {
  const attnkit::Matrix<float> x = attnkit::Matrix<float>::Ones(3, 4);
  const attnkit::Matrix<float> a = attnkit::scaled_dot_product_attention(x, x, x);
  const attnkit::Matrix<float> b = odr_second_unit();
  return (a - b).cwiseAbs().maxCoeff() < 1e-6f ? 0 : 1;
}
