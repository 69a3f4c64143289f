#include <attnkit/attnkit.hpp>

attnkit::Matrix<float> odr_second_unit() {
  const attnkit::Matrix<float> x = attnkit::Matrix<float>::Ones(3, 4);
  return attnkit::reference::scaled_dot_product_attention(x, x, x);
}
