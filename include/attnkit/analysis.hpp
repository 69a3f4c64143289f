// attnkit: small functions for analysing attention (SPEC section 6): row entropy, the concentration metric, the
// largest weight bounded logits allow, the weights of chosen rows recomputed from the log-sum-exp the fused kernel
// stores (without an n x m matrix), and Perturbed Masking's impact matrix, segmentation and parse.
#pragma once

#include <cmath>
#include <limits>
#include <string>
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

/// \brief Perturbed Masking (Wu et al. 2020): impact(i, j) = |H(x \\ i)_i - H(x \\ {i, j})_i|_2, how much token j
/// matters to token i's encoding once i itself is masked; `\\` replaces tokens by `mask_embedding` (1 x d). The
/// encoder is any callable mapping an n x d matrix to an n x d' matrix (n rows out). The diagonal is 0. Costs n^2
/// encoder calls.
template <class Encoder, class D, class DM>
Matrix<double> impact_matrix(const Encoder& encoder, const Eigen::MatrixBase<D>& x,
                             const Eigen::MatrixBase<DM>& mask_embedding) {
  using S = typename D::Scalar;
  constexpr const char* kWhere = "impact_matrix";
  if (mask_embedding.rows() != 1 || mask_embedding.cols() != x.cols())
    detail::fail(kWhere, "mask_embedding is ", detail::shape_str(mask_embedding.rows(), mask_embedding.cols()),
                 " but must be 1 x d = ", detail::shape_str(1, x.cols()));
  const Index n = x.rows();
  Matrix<double> impact = Matrix<double>::Zero(n, n);
  const auto encode = [&](const Matrix<S>& input) {
    Matrix<S> h = encoder(input);
    if (h.rows() != n)
      detail::fail(kWhere, "the encoder returned ", detail::shape_str(h.rows(), h.cols()), " for an input of ",
                   detail::shape_str(n, x.cols()), "; it must return one row per token");
    return h;
  };
  for (Index i = 0; i < n; ++i) {
    Matrix<S> without_i = x;
    without_i.row(i) = mask_embedding;
    const Matrix<S> h_i = encode(without_i);
    for (Index j = 0; j < n; ++j) {
      if (j == i) continue;
      Matrix<S> without_ij = without_i;
      without_ij.row(j) = mask_embedding;
      impact(i, j) = (h_i.row(i) - encode(without_ij).row(i)).template cast<double>().norm();
    }
  }
  return impact;
}

/// \brief Segments tokens by an impact matrix: neighbours i and i + 1 share a segment when their mean impact
/// (impact(i, i + 1) + impact(i + 1, i)) / 2 exceeds `threshold`. Returns the first token of every segment (0 first).
inline std::vector<Index> segment(const Matrix<double>& impact, double threshold) {
  if (impact.rows() != impact.cols())
    detail::fail("segment", "impact must be square, got ", detail::shape_str(impact.rows(), impact.cols()));
  if (std::isnan(threshold)) detail::fail("segment", "threshold must not be NaN");
  std::vector<Index> starts;
  for (Index i = 0; i < impact.rows(); ++i)
    if (i == 0 || (impact(i - 1, i) + impact(i, i - 1)) / 2 <= threshold) starts.push_back(i);
  return starts;
}

/// \brief One node of a parse tree over tokens [begin, end); children index into the tree, -1 for a leaf.
struct ParseNode {
  Index begin, end;
  int left = -1, right = -1;
};

/// \brief Unlabelled binary parse of tokens [0, n) from an impact matrix (Wu et al. 2020): a span [b, e) splits at the
/// k in (b, e) that maximises the mean impact within the two parts minus the mean impact across them, recursively,
/// down to single tokens. Node 0 is the root. O(n^3) time.
inline std::vector<ParseNode> parse_tree(const Matrix<double>& impact) {
  if (impact.rows() != impact.cols())
    detail::fail("parse_tree", "impact must be square, got ", detail::shape_str(impact.rows(), impact.cols()));
  std::vector<ParseNode> tree;
  if (impact.rows() == 0) return tree;
  // Sum of impact over ordered pairs (i, j), i != j, with i in [a, b) and j in [c, e).
  const auto block_sum = [&](Index a, Index b, Index c, Index e) { return impact.block(a, c, b - a, e - c).sum(); };
  const auto mean = [](double sum, double pairs) { return pairs > 0 ? sum / pairs : 0.0; };
  const auto build = [&](auto&& self, Index b, Index e) -> int {
    const int node = int(tree.size());
    tree.push_back({b, e});
    if (e - b < 2) return node;
    Index best = b + 1;
    double best_score = -std::numeric_limits<double>::infinity();
    for (Index k = b + 1; k < e; ++k) {
      const double l = double(k - b), r = double(e - k);
      const double within = mean(block_sum(b, k, b, k) + block_sum(k, e, k, e), l * (l - 1) + r * (r - 1));
      const double across = mean(block_sum(b, k, k, e) + block_sum(k, e, b, k), 2 * l * r);
      if (within - across > best_score) best_score = within - across, best = k;
    }
    const int left = self(self, b, best);
    const int right = self(self, best, e);
    tree[size_t(node)].left = left, tree[size_t(node)].right = right;
    return node;
  };
  build(build, 0, impact.rows());
  return tree;
}

/// \brief The tree as brackets over the tokens' names, e.g. "((the cat) sat)".
inline std::string bracketed(const std::vector<ParseNode>& tree, const std::vector<std::string>& tokens, int node = 0) {
  if (tree.empty()) return "";
  if (node < 0 || size_t(node) >= tree.size())
    detail::fail("bracketed", "node ", node, " is outside the tree of ", tree.size(), " nodes");
  if (Index(tokens.size()) < tree.front().end)
    detail::fail("bracketed", "the tree covers ", tree.front().end, " tokens but ", tokens.size(),
                 " token names were given");
  const ParseNode& t = tree[size_t(node)];
  if (t.left < 0) return tokens.at(size_t(t.begin));
  return "(" + bracketed(tree, tokens, t.left) + " " + bracketed(tree, tokens, t.right) + ")";
}

}  // namespace attnkit
