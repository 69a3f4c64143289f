// Perturbed Masking (Wu et al. 2020; SPEC section 6): reading structure out of an encoder without training a probe.
//
//     impact(i, j) = | H(x \ i)_i - H(x \ {i, j})_i |_2
//
// where x \ S replaces the tokens in S by a mask embedding and H is the encoder: how much token j still tells the
// encoder about token i once i itself is hidden. Neighbours whose mean impact exceeds a threshold form a segment; a
// binary parse splits each span where the mean impact within the two parts most exceeds the impact across them.
//
// Two small attnkit encoders whose structure is known, so the recovered structure can be checked:
//   1. two layers of sliding-window attention (window 1 on each side): token j can reach token i only when
//      |i - j| <= 2, so impact is exactly 0 beyond distance 2 and falls with distance inside it;
//   2. one attention layer whose additive bias favours pairs by the depth of their lowest common ancestor in a
//      given tree, alpha * depth(lca(i, j)): the parse of its impact matrix recovers that tree, and a threshold
//      between the impact levels of shallow and deep neighbours recovers its phrases as segments.
//      The criterion pools the pairs within both parts, and a part of one token has none, so it tends to keep a lone
//      token with its neighbour rather than split it off a longer span: built from (sat (on ((the warm) mat))), the
//      bias gives the parse ((sat on) ((the warm) mat)). The tree below is one the criterion can express.
// Exits non-zero when a check fails.
//
// usage: perturbed_masking
#include <attnkit/attnkit.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "claims.hpp"

using attnkit::AttentionOptions;
using attnkit::Index;
using attnkit::Matrix;

namespace {

constexpr Index kDim = 16;

/// One attention layer with a residual: H(x) = x + attention(x W_q, x W_k, x W_v, options, extras...).
struct AttentionLayer {
  Matrix<double> w_q, w_k, w_v;

  explicit AttentionLayer(Gaussian& normal)
      : w_q(normal(kDim, kDim, 1 / std::sqrt(double(kDim)))),
        w_k(normal(kDim, kDim, 1 / std::sqrt(double(kDim)))),
        w_v(normal(kDim, kDim, 1 / std::sqrt(double(kDim)))) {}

  template <class... Extras>
  Matrix<double> operator()(const Matrix<double>& x, const AttentionOptions& options, const Extras&... extras) const {
    return x + attnkit::scaled_dot_product_attention(x * w_q, x * w_k, x * w_v, options, extras...);
  }
};

/// Leaves of a bracketed tree such as "((a b) c)", each with its path of node ids from the root.
struct Tree {
  std::vector<std::string> tokens;
  std::vector<std::vector<int>> paths;

  explicit Tree(const std::string& text) {
    std::vector<int> path;
    int next_node = 0;
    std::istringstream in(text);
    char ch;
    std::string word;
    const auto flush = [&] {
      if (!word.empty()) tokens.push_back(word), paths.push_back(path), word.clear();
    };
    while (in.get(ch)) {
      if (ch == '(') flush(), path.push_back(next_node++);
      else if (ch == ')') flush(), path.pop_back();
      else if (ch == ' ') flush();
      else word += ch;
    }
  }

  /// Depth of the lowest common ancestor of leaves i and j (the root has depth 1; a leaf with itself, its own depth).
  int lca_depth(size_t i, size_t j) const {
    size_t d = 0;
    while (d < paths[i].size() && d < paths[j].size() && paths[i][d] == paths[j][d]) ++d;
    return int(d);
  }
};

/// Distinct embeddings per distinct word (a repeated word gets the same row).
Matrix<double> embed(const std::vector<std::string>& words, Gaussian& normal) {
  std::map<std::string, Eigen::RowVectorXd> table;
  Matrix<double> x(Index(words.size()), kDim);
  for (size_t i = 0; i < words.size(); ++i) {
    if (!table.count(words[i])) table[words[i]] = normal(1, kDim).row(0);
    x.row(Index(i)) = table[words[i]];
  }
  return x;
}

void print_impact(const Matrix<double>& impact, const std::vector<std::string>& words) {
  std::printf("  %8s", "");
  for (const std::string& w : words) std::printf(" %6.6s", w.c_str());
  std::printf("\n");
  for (Index i = 0; i < impact.rows(); ++i) {
    std::printf("  %8.8s", words[size_t(i)].c_str());
    for (Index j = 0; j < impact.cols(); ++j) std::printf(" %6.3f", impact(i, j));
    std::printf("\n");
  }
}

std::string segments_text(const std::vector<Index>& starts, const std::vector<std::string>& words) {
  std::string text;
  for (size_t s = 0; s < starts.size(); ++s) {
    const Index end = s + 1 < starts.size() ? starts[s + 1] : Index(words.size());
    text += "[";
    for (Index i = starts[s]; i < end; ++i) text += (i > starts[s] ? " " : "") + words[size_t(i)];
    text += "] ";
  }
  return text;
}

}  // namespace

int main() {
  Claims claims;
  Gaussian normal(3);
  const Matrix<double> mask = normal(1, kDim);

  // 1. Two layers of window-1 attention over 12 tokens.
  const std::vector<std::string> letters = {"a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"};
  const Matrix<double> x1 = embed(letters, normal);
  const AttentionLayer first(normal), second(normal);
  AttentionOptions local;
  local.window_left = local.window_right = 1;
  const auto windowed = [&](const Matrix<double>& x) { return second(first(x, local), local); };
  const Matrix<double> impact1 = attnkit::impact_matrix(windowed, x1, mask);
  std::printf("1. Two layers of window-1 attention; impact(i, j) (row i, column j):\n");
  print_impact(impact1, letters);
  double by_distance[4] = {0, 0, 0, 0};  // mean impact at |i - j| = 1, 2, and the largest beyond 2
  Index count[3] = {0, 0, 0};
  for (Index i = 0; i < impact1.rows(); ++i)
    for (Index j = 0; j < impact1.cols(); ++j) {
      const Index distance = std::abs(i - j);
      if (distance == 1 || distance == 2) by_distance[distance] += impact1(i, j), ++count[distance];
      if (distance > 2) by_distance[3] = std::max(by_distance[3], impact1(i, j));
    }
  by_distance[1] /= double(count[1]), by_distance[2] /= double(count[2]);
  claims.check("largest impact beyond distance 2", by_distance[3], 0.0, 0, 0);
  claims.check("mean impact at distance 2 / distance 1", by_distance[2] / by_distance[1], "< 1", 1e-6, 1);

  // 2. One layer biased by the depth of each pair's lowest common ancestor in a known tree.
  const std::string truth = "(((the old) cat) ((sat on) ((the warm) mat)))";
  const Tree tree(truth);
  const Index n = Index(tree.tokens.size());
  constexpr double kAlpha = 2;
  Matrix<double> bias(n, n);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < n; ++j) bias(i, j) = kAlpha * tree.lca_depth(size_t(i), size_t(j));
  const Matrix<double> x2 = embed(tree.tokens, normal);
  const AttentionLayer layer(normal);
  const auto biased = [&](const Matrix<double>& x) { return layer(x, AttentionOptions{}, bias); };
  const Matrix<double> impact2 = attnkit::impact_matrix(biased, x2, mask);
  std::printf("\n2. One layer with bias %.0f * depth(lca(i, j)) from the tree %s; impact(i, j):\n", kAlpha,
              truth.c_str());
  print_impact(impact2, tree.tokens);

  const std::string parsed = attnkit::bracketed(attnkit::parse_tree(impact2), tree.tokens);
  std::printf("\n  parse of the impact matrix: %s\n  the tree behind the bias:   %s\n", parsed.c_str(), truth.c_str());
  claims.check("parse equals the tree (1 = yes)", parsed == truth ? 1.0 : 0.0, 1.0, 1, 1);

  // Segments: neighbours whose lca lies at depth >= 3 (below the root's children). The threshold sits halfway
  // between the neighbours' impact levels on either side, so the check is that those levels do not overlap.
  double below = 0, above = 1e300;
  std::vector<Index> expected = {0};
  for (Index i = 0; i + 1 < n; ++i) {
    const double mean = (impact2(i, i + 1) + impact2(i + 1, i)) / 2;
    if (tree.lca_depth(size_t(i), size_t(i + 1)) >= 3)
      above = std::min(above, mean);
    else
      below = std::max(below, mean), expected.push_back(i + 1);
  }
  const std::vector<Index> segments = attnkit::segment(impact2, (below + above) / 2);
  std::printf("  segments at threshold %.4f: %s\n  phrases of the tree:        %s\n", (below + above) / 2,
              segments_text(segments, tree.tokens).c_str(), segments_text(expected, tree.tokens).c_str());
  claims.check("segments equal the tree's phrases (1 = yes)", segments == expected ? 1.0 : 0.0, 1.0, 1, 1);
  claims.check("neighbour impact, deep lca / shallow lca", above / below, "> 1", 1, 1e300);
  return claims.exit_code();
}
