// attnkit: plain materialising implementations, the oracles of tests and benchmarks. They build the whole n x m
// matrix of weights with Eigen's products, reusing the core's mask model and softmax so that they mean the same
// thing as the fused kernels; the tests check them in turn against independent double-precision loops.
#pragma once

#include "core/mask.hpp"
#include "core/options.hpp"
#include "core/softmax.hpp"
#include "core/types.hpp"
#include "sdpa.hpp"

namespace attnkit {
namespace reference {

/// \brief The n x m attention weights softmax(mask(scale * Q K^T + modifiers)); rows with no allowed key are zero.
/// Same options and extras as attnkit::scaled_dot_product_attention. Memory O(n m).
template <class DQ, class DK, class... Extras>
Matrix<typename DQ::Scalar> attention_weights(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                              const AttentionOptions& options = {}, const Extras&... extras) {
  using S = typename DQ::Scalar;
  constexpr const char* kWhere = "reference::attention_weights";
  detail::check_scalars<DQ, DK, DK>();
  detail::check_attention_shapes(kWhere, q.rows(), q.cols(), k.rows(), k.cols(), k.rows(), 0);
  detail::validate_options(kWhere, options, k.rows());
  const Index n = q.rows(), m = k.rows();
  Matrix<S> p(n, m);
  p.noalias() = q * k.transpose();
  const S scale = detail::resolve_scale<S>(options, q.cols());
  detail::with_mask_model(
      kWhere, n, m, options, detail::MaskExtras<S>{},
      [&](const auto& mask) {
        for (Index i = 0; i < n; ++i) {
          S* row = p.data() + i * m;
          detail::finish_logit_row(mask, i, scale, row, m);
          detail::SoftmaxState<S> state;
          detail::online_softmax_step(row, m, state);
          p.row(i) *= state.inverse_sum();
        }
      },
      extras...);
  return p;
}

/// \brief attention_weights(q, k) * v, the materialising oracle of scaled dot-product attention. A zero weight never
/// multiplies its value row, so NaN or Inf in masked values cannot reach the output, as in the fused kernel.
template <class DQ, class DK, class DV, class... Extras>
Matrix<typename DQ::Scalar> scaled_dot_product_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                                         const Eigen::MatrixBase<DV>& v,
                                                         const AttentionOptions& options = {},
                                                         const Extras&... extras) {
  using S = typename DQ::Scalar;
  detail::check_sdpa_call("reference::scaled_dot_product_attention", q, k, v, options);
  const Matrix<S> p = attention_weights(q, k, options, extras...);
  Matrix<S> out = Matrix<S>::Zero(q.rows(), v.cols());
  if (v.allFinite()) {
    out.noalias() = p * v;
    return out;
  }
  for (Index i = 0; i < p.rows(); ++i)
    for (Index j = 0; j < p.cols(); ++j)
      if (p(i, j) != S(0)) out.row(i) += p(i, j) * v.row(j);
  return out;
}

}  // namespace reference
}  // namespace attnkit
