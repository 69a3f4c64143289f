// attnkit: small functions for analysing attention (SPEC section 6): row entropy, the concentration metric, the
// largest weight bounded logits allow, and the weights of chosen rows recomputed from the log-sum-exp the fused kernel
// stores, without an n x m matrix.
#pragma once

#include <cmath>
#include <vector>

#include "core/error.hpp"
#include "core/mask.hpp"
#include "core/options.hpp"
#include "core/types.hpp"
#include "sdpa.hpp"

namespace attnkit {

/// \brief The entropy -sum_j p_ij log p_ij (natural log, 0 log 0 = 0) of every row of attention weights (n x m).
/// \throws attnkit::Error when a weight is negative or not finite.
template <class D>
Vector<double> row_entropy(const Eigen::MatrixBase<D>& weights) {
  Vector<double> h(weights.rows());
  for (Index i = 0; i < weights.rows(); ++i) {
    double sum = 0;
    for (Index j = 0; j < weights.cols(); ++j) {
      const double p = static_cast<double>(weights(i, j));
      if (!(p >= 0) || !std::isfinite(p))
        detail::fail("row_entropy", "weights must be finite and >= 0; weight (", i, ", ", j, ") of ",
                     detail::shape_str(weights.rows(), weights.cols()), " is ", p);
      if (p > 0) sum -= p * std::log(p);
    }
    h(i) = sum;
  }
  return h;
}

/// \brief The concentration S(a) = |a|_1 / (sqrt(m) |a|_2) of every row a (length m): 1 for a uniform row, 1/sqrt(m)
/// for a one-hot row, smaller = more concentrated. A row of zeros, where S is undefined, gives 0.
template <class D>
Vector<double> concentration(const Eigen::MatrixBase<D>& weights) {
  Vector<double> s(weights.rows());
  const double root_m = std::sqrt(double(weights.cols()));
  for (Index i = 0; i < weights.rows(); ++i) {
    const Eigen::VectorXd a = weights.row(i).transpose().template cast<double>();
    const double l2 = a.norm();
    s(i) = l2 > 0 ? a.cwiseAbs().sum() / (root_m * l2) : 0.0;
  }
  return s;
}

/// \brief The largest weight softmax can give one of n keys when every logit lies in [-bound, bound]:
/// 1 / (1 + (n - 1) e^(-2 bound)), reached with that key at +bound and the others at -bound.
inline double max_attainable_weight(Index n, double bound) {
  if (n < 1) detail::fail("max_attainable_weight", "n must be >= 1, got ", n);
  if (!(bound >= 0) || !std::isfinite(bound))
    detail::fail("max_attainable_weight", "bound must be finite and >= 0, got ", bound);
  return 1.0 / (1.0 + double(n - 1) * std::exp(-2.0 * bound));
}

/// \brief The attention weights of the query rows `rows` (each in [0, n)), recomputed from the per-row log-sum-exp
/// that scaled_dot_product_attention(q, k, v, out, lse, options) wrote: p_ij = exp(s_ij - lse_i), with s_ij the row's
/// scaled, modified and masked logits. Returns rows.size() x m; costs O(rows m d) time and O(rows m) memory, never the
/// n x m matrix. Same options as the kernel (no extras).
template <class DQ, class DK>
Matrix<typename DQ::Scalar> attention_weights_from_lse(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                                       const Vector<typename DQ::Scalar>& lse,
                                                       const std::vector<Index>& rows,
                                                       const AttentionOptions& options = {}) {
  using S = typename DQ::Scalar;
  constexpr const char* kWhere = "attention_weights_from_lse";
  detail::check_scalars<DQ, DK, DK>();
  detail::check_attention_shapes(kWhere, q.rows(), q.cols(), k.rows(), k.cols(), k.rows(), 0);
  detail::validate_options(kWhere, options, k.rows());
  const Index n = q.rows(), m = k.rows();
  if (lse.size() != n) detail::fail(kWhere, "lse has ", lse.size(), " entries but q has n = ", n, " rows");
  for (Index i : rows)
    if (i < 0 || i >= n) detail::fail(kWhere, "row ", i, " is outside [0, n) with n = ", n);
  const detail::MaskModel<S> mask(n, m, options, {});
  const S scale = detail::resolve_scale<S>(options, q.cols());
  Matrix<S> p(Index(rows.size()), m);
  for (Index r = 0; r < Index(rows.size()); ++r) {
    const Index i = rows[size_t(r)];
    p.row(r).noalias() = q.row(i) * k.transpose();
    detail::finish_logit_row(mask, i, scale, p.data() + r * m, m);
    const S shift = lse(i);
    for (Index j = 0; j < m; ++j) p(r, j) = std::isinf(shift) && shift < 0 ? S(0) : std::exp(p(r, j) - shift);
  }
  return p;
}

}  // namespace attnkit
