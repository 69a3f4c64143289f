// attnkit: Synthesizer attention (Tay et al. 2020, "Synthesizer: Rethinking Self-Attention in Transformer Models"),
// SPEC section 4. Each head attends with softmax(B) G(X), where the logits B are synthesized from each token alone
// (Dense, Factorized Dense), learned outright (Random, Factorized Random), or a softmax-weighted mixture of those and
// vanilla dot-product logits.
//
// How it runs. Logits that depend on the input go through the fused attention loop of core/tiling.hpp: their
// bilinear parts (Dense: relu(x W_1 + b_1) against the rows of W_2; Factorized Random: R_1 against R_2; dot product:
// Q against K) are the loop's Q K^T, and the rest (Random's R, Dense's b_2, Factorized Dense's tiled product) is
// added to each row of logits by a mask model wrapper, so the one online softmax and mask model of SDPA apply, in
// O(tile) memory. Logits that do not depend on the input (Random, Factorized Random, mixtures of the two) give
// probabilities that do not either: they are computed once per sequence length and options, kept, and each forward
// is then one product P G per head.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/dense.hpp"
#include "core/error.hpp"
#include "core/mask.hpp"
#include "core/options.hpp"
#include "core/random.hpp"
#include "core/softmax.hpp"
#include "core/threading.hpp"
#include "core/tiling.hpp"
#include "core/types.hpp"
#include "core/view.hpp"

namespace attnkit {

/// \brief Shape of a synthesizer layer and the parameters of its variants (SPEC section 4).
struct SynthesizerConfig {
  Index width = 0;                ///< d: columns of the input and of the output
  Index max_length = 0;           ///< l: the longest sequence; a forward over n <= l tokens uses the leading n x n block
  Index heads = 1;                ///< H: heads split the width like MHA (d_head = d / H), each with its own logits
  Index a = 0;                    ///< Factorized Dense: A has a entries per token, a * b = l
  Index b = 0;                    ///< Factorized Dense: C has b entries per token
  Index k = 8;                    ///< Factorized Random: R_1 and R_2 are l x k
  bool trainable = true;          ///< Random, Factorized Random: whether R is meant to be trained (metadata only)
  bool projection_bias = false;   ///< biases b_v and (with the output projection) b_o
  bool output_projection = true;  ///< multiply the concatenated heads by w_o
};

/// \brief The kinds of logits a synthesizer combines.
enum class SynthesizerKind { kDense, kRandom, kFactorizedDense, kFactorizedRandom, kDotProduct };

/// \brief Dense synthesizer logits of head h: B(i, :) = W_2 relu(W_1 x_i + b_1) + b_2, restricted to the first n keys.
template <class S>
struct DenseSynthesizerWeights {
  Matrix<S> w1;  ///< d x (H d): head h's W_1 in columns [h d, (h + 1) d)
  Matrix<S> b1;  ///< 1 x (H d)
  Matrix<S> w2;  ///< (H l) x d: row h l + j holds head h's weights of logit j (W_2 stored one row per key position)
  Matrix<S> b2;  ///< H x l
};

/// \brief Random synthesizer logits: B = R, learned and independent of the input.
template <class S>
struct RandomSynthesizerWeights {
  Matrix<S> r;  ///< (H l) x l: head h's R in rows [h l, (h + 1) l)
};

/// \brief Factorized Dense logits: A = x W_a + b_a (a values), C = x W_b + b_b (b values), a * b = l; logit j of
/// token i is A_i[j mod a] * C_i[j mod b] (A tiled b times times C tiled a times, as SPEC states; with gcd(a, b) = 1
/// every pair (A_p, C_q) appears exactly once in a row).
template <class S>
struct FactorizedDenseSynthesizerWeights {
  Matrix<S> w_a;  ///< d x (H a): head h's in columns [h a, (h + 1) a)
  Matrix<S> b_a;  ///< 1 x (H a)
  Matrix<S> w_b;  ///< d x (H b)
  Matrix<S> b_b;  ///< 1 x (H b)
};

/// \brief Factorized Random logits: B = R_1 R_2^T, independent of the input.
template <class S>
struct FactorizedRandomSynthesizerWeights {
  Matrix<S> r1;  ///< (H l) x k: head h's R_1 in rows [h l, (h + 1) l)
  Matrix<S> r2;  ///< (H l) x k
};

/// \brief Vanilla dot-product logits (a Mixture component): Q K^T * scale with Q = X w_q, K = X w_k.
template <class S>
struct DotProductWeights {
  Matrix<S> w_q;  ///< d x d: head h's query projection in columns [h d_head, (h + 1) d_head)
  Matrix<S> w_k;  ///< d x d
};

namespace detail {

/// The logits of every head of one forward over n tokens: a bilinear part q_h k_h^T (any scale folded into q) plus
/// additive terms, each with its mixture weight.
template <class S>
struct SynthesizedLogits {
  Index heads = 0, n = 0, l = 0;
  Index rank = 0;  // columns of q and k per head
  Matrix<S> q, k;  // n x (H rank): head h's factors in columns [h rank, (h + 1) rank)
  const Matrix<S>* random = nullptr;    // R, (H l) x l
  S random_weight = 0;
  const Matrix<S>* key_bias = nullptr;  // Dense b_2, H x l
  S key_bias_weight = 0;
  Matrix<S> fa, fb;  // Factorized Dense A (n x H a) and C (n x H b)
  Index a = 0, b = 0;
  S factorized_weight = 0;

  bool adds() const { return random != nullptr || key_bias != nullptr || a > 0; }

  /// Appends a bilinear term: qc and kc are n x (H r), head-major column blocks like q and k.
  void add_factors(Matrix<S> qc, Matrix<S> kc, Index r) {
    if (rank == 0) {
      q = std::move(qc), k = std::move(kc), rank = r;
      return;
    }
    const auto join = [&](const Matrix<S>& old, const Matrix<S>& extra) {
      Matrix<S> joined(n, heads * (rank + r));
      for (Index h = 0; h < heads; ++h) {
        joined.middleCols(h * (rank + r), rank) = old.middleCols(h * rank, rank);
        joined.middleCols(h * (rank + r) + rank, r) = extra.middleCols(h * r, r);
      }
      return joined;
    };
    q = join(q, qc), k = join(k, kc), rank += r;
  }

  StridedView<S> q_view(Index h) const { return {q.data() + h * rank, n, rank, q.cols(), 1}; }
  StridedView<S> k_view(Index h) const { return {k.data() + h * rank, n, rank, k.cols(), 1}; }

  /// row[c] += factor * (additive logits of head h, query i, key j0 + c), c < count.
  void add(Index h, Index i, Index j0, S* row, Index count, S factor) const {
    using Row = Eigen::Map<Eigen::Array<S, 1, Eigen::Dynamic>>;
    using ConstRow = Eigen::Map<const Eigen::Array<S, 1, Eigen::Dynamic>>;
    Row out(row, count);
    if (random) out += (factor * random_weight) * ConstRow(random->data() + (h * l + i) * l + j0, count);
    if (key_bias) out += (factor * key_bias_weight) * ConstRow(key_bias->data() + h * l + j0, count);
    if (a > 0) {
      const S* ai = fa.data() + i * fa.cols() + h * a;
      const S* ci = fb.data() + i * fb.cols() + h * b;
      const S w = factor * factorized_weight;
      // Runs of keys over which neither tiled index wraps are plain vector products.
      for (Index c = 0, p = j0 % a, r = j0 % b; c < count;) {
        const Index run = std::min({count - c, a - p, b - r});
        out.segment(c, run) += w * ConstRow(ai + p, run) * ConstRow(ci + r, run);
        c += run, p += run, r += run;
        if (p == a) p = 0;
        if (r == b) r = 0;
      }
    }
  }
};

/// SDPA's mask model with the synthesized additive logits of head h added first, so that softcap, ALiBi, masking and
/// the online softmax treat synthesized and dot-product logits alike. Both parts get the log-n factor.
template <class S>
class SynthesizedMask : public MaskModel<S> {
 public:
  SynthesizedMask(const MaskModel<S>& base, const SynthesizedLogits<S>* logits, Index head)
      : MaskModel<S>(base), logits_(logits), head_(head) {}

  bool modifies_scores() const { return logits_->adds() || MaskModel<S>::modifies_scores(); }
  void modify_row(Index i, Index j0, S* row, Index count) const {
    if (logits_->adds()) logits_->add(head_, i, j0, row, count, this->row_scale(i, S(1)));
    MaskModel<S>::modify_row(i, j0, row, count);
  }

 private:
  const SynthesizedLogits<S>* logits_;
  Index head_;
};

/// Which option fields change synthesized probabilities (everything but execution).
inline bool same_logit_options(const AttentionOptions& x, const AttentionOptions& y) {
  return x.scale == y.scale && x.causal == y.causal && x.align == y.align && x.window_left == y.window_left &&
         x.window_right == y.window_right && x.key_length == y.key_length && x.alibi_slope == y.alibi_slope &&
         x.softcap == y.softcap && x.log_n_scale == y.log_n_scale;
}

/// P_h = softmax(mask(B_h)), n x n at p (row stride `stride`): the materialised attention weights of head h.
template <class S>
void synthesized_probabilities(const SynthesizedLogits<S>& logits, Index h, const MaskModel<S>& base, S* p,
                               Index stride, int threads) {
  const Index n = logits.n;
  if (n == 0) return;
  if (logits.rank > 0) {
    const Matrix<S> kt = logits.k.middleCols(h * logits.rank, logits.rank).transpose();
    dense(logits.q_view(h), matrix_view(kt), Matrix<S>(), p, stride,
          threads);
  } else {
    for (Index i = 0; i < n; ++i) std::fill(p + i * stride, p + i * stride + n, S(0));
  }
  const SynthesizedMask<S> mask(base, &logits, h);
  constexpr Index kRowsPerTask = 64;
  parallel_for(
      (n + kRowsPerTask - 1) / kRowsPerTask, threads, [] { return 0; },
      [&](Index t, int&) {
        for (Index i = t * kRowsPerTask; i < std::min(n, (t + 1) * kRowsPerTask); ++i) {
          S* row = p + i * stride;
          finish_logit_row(mask, i, S(1), row, n);
          SoftmaxState<S> state;
          online_softmax_step(row, n, state);
          Eigen::Map<Eigen::Array<S, 1, Eigen::Dynamic>>(row, n) *= state.inverse_sum();
        }
      });
}

/// Probabilities kept by a layer whose logits do not depend on the input. Copying a layer copies no cache.
template <class S>
class ProbabilityCache {
 public:
  struct Entry {
    Index n;
    AttentionOptions options;
    Matrix<S> p;  // (H n) x n: head h's probabilities in rows [h n, (h + 1) n)
  };

  ProbabilityCache() = default;
  ProbabilityCache(const ProbabilityCache&) {}
  ProbabilityCache& operator=(const ProbabilityCache&) {
    clear();
    return *this;
  }

  /// The entry for (n, options), made by build() if it is not the one kept. Safe to call from several threads.
  template <class Build>
  std::shared_ptr<const Entry> get(Index n, const AttentionOptions& options, const Build& build) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!entry_ || entry_->n != n || !same_logit_options(entry_->options, options)) {
      auto made = std::make_shared<Entry>(Entry{n, options, Matrix<S>()});
      build(made->p);
      entry_ = std::move(made);
    }
    return entry_;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entry_.reset();
  }

 private:
  std::mutex mutex_;
  std::shared_ptr<const Entry> entry_;
};

// Per kind of logits: initial weights, shape checks, SPEC's parameter count (all heads), and the logits of a forward.
// x is the n x d input; `alpha` is the component's mixture weight (1 alone).

template <class S>
void init_weights(DenseSynthesizerWeights<S>& w, const SynthesizerConfig& c, Rng& rng) {
  const Index d = c.width, h = c.heads, l = c.max_length;
  w.w1 = xavier_uniform<S>(d, h * d, rng, d, d);
  w.b1.setZero(1, h * d);
  w.w2 = xavier_uniform<S>(h * l, d, rng, d, l);
  w.b2.setZero(h, l);
}
template <class S>
void check_weights(const DenseSynthesizerWeights<S>& w, const SynthesizerConfig& c, const char* where) {
  const Index d = c.width, h = c.heads, l = c.max_length;
  check_shape(where, "w1", w.w1, d, h * d);
  check_shape(where, "b1", w.b1, 1, h * d);
  check_shape(where, "w2", w.w2, h * l, d);
  check_shape(where, "b2", w.b2, h, l);
}
inline Index logit_parameters(SynthesizerKind kind, const SynthesizerConfig& c) {
  const Index d = c.width, l = c.max_length, dh = c.width / c.heads;
  switch (kind) {
    case SynthesizerKind::kDense: return c.heads * (d * d + d + d * l + l);
    case SynthesizerKind::kRandom: return c.heads * l * l;
    case SynthesizerKind::kFactorizedDense: return c.heads * (d * (c.a + c.b) + c.a + c.b);
    case SynthesizerKind::kFactorizedRandom: return c.heads * 2 * l * c.k;
    case SynthesizerKind::kDotProduct: return c.heads * 2 * d * dh;
  }
  return 0;
}
/// Columns per head of a kind's bilinear factors (the Q K^T part of its logits): 0 for Random and Factorized Dense,
/// whose logits are all additive.
inline Index factor_rank(SynthesizerKind kind, const SynthesizerConfig& c) {
  switch (kind) {
    case SynthesizerKind::kDense: return c.width;
    case SynthesizerKind::kFactorizedRandom: return c.k;
    case SynthesizerKind::kDotProduct: return c.width / c.heads;
    default: return 0;
  }
}

/// Heap of synthesize() over n tokens for `kinds` at most: the factor matrices (n x H rank for Q and K; a mixture
/// joins them, briefly holding old and joined copies), Factorized Dense's A and C, and the projections' scratch.
template <class S>
Index logits_heap(const std::vector<SynthesizerKind>& kinds, const SynthesizerConfig& c, Index n, int threads) {
  Index rank = 0, bilinear_kinds = 0, additive = 0, scratch = 0;
  for (SynthesizerKind kind : kinds) {
    const Index r = factor_rank(kind, c);
    rank += r, bilinear_kinds += r > 0 ? 1 : 0;
    if (kind == SynthesizerKind::kDense)
      scratch = std::max(scratch, dense_workspace_bytes<S>(n, c.width, c.heads * c.width, threads));
    if (kind == SynthesizerKind::kDotProduct)
      scratch = std::max(scratch, dense_workspace_bytes<S>(n, c.width, c.width, threads));
    if (kind == SynthesizerKind::kFactorizedDense) {
      additive += heap_bytes<S>(n * c.heads * c.a) + heap_bytes<S>(n * c.heads * c.b);
      scratch = std::max({scratch, dense_workspace_bytes<S>(n, c.width, c.heads * c.a, threads),
                          dense_workspace_bytes<S>(n, c.width, c.heads * c.b, threads)});
    }
  }
  const Index factors = 2 * heap_bytes<S>(n * c.heads * rank);
  return (bilinear_kinds > 1 ? 2 : 1) * factors + additive + scratch;
}

template <class S>
void add_logits(const DenseSynthesizerWeights<S>& w, const SynthesizerConfig& c, const StridedView<S>& x, S alpha,
                const AttentionOptions&, int threads, SynthesizedLogits<S>& out) {
  const Index d = c.width, n = x.rows;
  Matrix<S> hidden, keys(n, c.heads * d);
  dense(x, w.w1, w.b1, hidden, threads);
  hidden = alpha * hidden.cwiseMax(S(0));
  for (Index h = 0; h < c.heads; ++h) keys.middleCols(h * d, d) = w.w2.middleRows(h * c.max_length, n);
  out.add_factors(std::move(hidden), std::move(keys), d);
  out.key_bias = &w.b2, out.key_bias_weight = alpha;
}

template <class S>
void init_weights(RandomSynthesizerWeights<S>& w, const SynthesizerConfig& c, Rng& rng) {
  w.r = xavier_uniform<S>(c.heads * c.max_length, c.max_length, rng, c.max_length, c.max_length);
}
template <class S>
void check_weights(const RandomSynthesizerWeights<S>& w, const SynthesizerConfig& c, const char* where) {
  check_shape(where, "r", w.r, c.heads * c.max_length, c.max_length);
}
template <class S>
void add_logits(const RandomSynthesizerWeights<S>& w, const SynthesizerConfig&, const StridedView<S>&, S alpha,
                const AttentionOptions&, int, SynthesizedLogits<S>& out) {
  out.random = &w.r, out.random_weight = alpha;
}

template <class S>
void init_weights(FactorizedDenseSynthesizerWeights<S>& w, const SynthesizerConfig& c, Rng& rng) {
  w.w_a = xavier_uniform<S>(c.width, c.heads * c.a, rng, c.width, c.a);
  w.b_a.setZero(1, c.heads * c.a);
  w.w_b = xavier_uniform<S>(c.width, c.heads * c.b, rng, c.width, c.b);
  w.b_b.setZero(1, c.heads * c.b);
}
template <class S>
void check_weights(const FactorizedDenseSynthesizerWeights<S>& w, const SynthesizerConfig& c, const char* where) {
  check_shape(where, "w_a", w.w_a, c.width, c.heads * c.a);
  check_shape(where, "b_a", w.b_a, 1, c.heads * c.a);
  check_shape(where, "w_b", w.w_b, c.width, c.heads * c.b);
  check_shape(where, "b_b", w.b_b, 1, c.heads * c.b);
}
template <class S>
void add_logits(const FactorizedDenseSynthesizerWeights<S>& w, const SynthesizerConfig& c, const StridedView<S>& x,
                S alpha, const AttentionOptions&, int threads, SynthesizedLogits<S>& out) {
  dense(x, w.w_a, w.b_a, out.fa, threads);
  dense(x, w.w_b, w.b_b, out.fb, threads);
  out.a = c.a, out.b = c.b, out.factorized_weight = alpha;
}

template <class S>
void init_weights(FactorizedRandomSynthesizerWeights<S>& w, const SynthesizerConfig& c, Rng& rng) {
  w.r1 = xavier_uniform<S>(c.heads * c.max_length, c.k, rng, c.max_length, c.k);
  w.r2 = xavier_uniform<S>(c.heads * c.max_length, c.k, rng, c.max_length, c.k);
}
template <class S>
void check_weights(const FactorizedRandomSynthesizerWeights<S>& w, const SynthesizerConfig& c, const char* where) {
  check_shape(where, "r1", w.r1, c.heads * c.max_length, c.k);
  check_shape(where, "r2", w.r2, c.heads * c.max_length, c.k);
}
template <class S>
void add_logits(const FactorizedRandomSynthesizerWeights<S>& w, const SynthesizerConfig& c, const StridedView<S>& x,
                S alpha, const AttentionOptions&, int, SynthesizedLogits<S>& out) {
  const Index n = x.rows, k = c.k;
  Matrix<S> q(n, c.heads * k), kk(n, c.heads * k);
  for (Index h = 0; h < c.heads; ++h) {
    q.middleCols(h * k, k) = alpha * w.r1.middleRows(h * c.max_length, n);
    kk.middleCols(h * k, k) = w.r2.middleRows(h * c.max_length, n);
  }
  out.add_factors(std::move(q), std::move(kk), k);
}

template <class S>
void init_weights(DotProductWeights<S>& w, const SynthesizerConfig& c, Rng& rng) {
  w.w_q = xavier_uniform<S>(c.width, c.width, rng);
  w.w_k = xavier_uniform<S>(c.width, c.width, rng);
}
template <class S>
void check_weights(const DotProductWeights<S>& w, const SynthesizerConfig& c, const char* where) {
  check_shape(where, "w_q", w.w_q, c.width, c.width);
  check_shape(where, "w_k", w.w_k, c.width, c.width);
}
template <class S>
void add_logits(const DotProductWeights<S>& w, const SynthesizerConfig& c, const StridedView<S>& x, S alpha,
                const AttentionOptions& o, int threads, SynthesizedLogits<S>& out) {
  Matrix<S> q, k;
  dense(x, w.w_q, Matrix<S>(), q, threads);
  dense(x, w.w_k, Matrix<S>(), k, threads);
  q *= alpha * resolve_scale<S>(o, c.width / c.heads);
  out.add_factors(std::move(q), std::move(k), c.width / c.heads);
}

}  // namespace detail

/// \brief What every synthesizer layer shares: the value projection G(X) = X w_v + b_v, heads as column blocks of
/// d_head = d / H, Y = concat_h(softmax(B_h) G_h) and the optional output projection Y w_o + b_o.
///
/// Weights are public and may be replaced or changed in place; their shapes are checked on every forward. A layer
/// whose logits do not depend on the input keeps its attention probabilities for the last sequence length and options
/// it ran with (H n^2 scalars): call weights_changed() after changing its logit weights. forward() is safe to call
/// from several threads at once.
template <class S>
class SynthesizerLayer {
 public:
  Matrix<S> w_v;  ///< d x d: the value projection G; head h reads columns [h d_head, (h + 1) d_head)
  Matrix<S> b_v;  ///< 1 x d, or 0 x 0 without projection_bias
  Matrix<S> w_o;  ///< d x d, or 0 x 0 without output_projection
  Matrix<S> b_o;  ///< 1 x d, or 0 x 0 without projection_bias and output_projection

  virtual ~SynthesizerLayer() = default;

  const SynthesizerConfig& config() const { return c_; }
  Index head_dim() const { return c_.width / c_.heads; }

  /// \brief Y for x (n x d, n <= l): n x d. Options: causal (j <= i), window, key padding, ALiBi, softcap, log-n
  /// scaling, threads. options.scale is the scale of dot-product logits (default 1/sqrt(d_head)) and may only be set
  /// when there are some; synthesized logits are used as they are.
  template <class D>
  Matrix<S> forward(const Eigen::MatrixBase<D>& x, const AttentionOptions& options = {}) const {
    Matrix<S> out(x.rows(), c_.width);
    forward_into(x, out, options);
    return out;
  }

  /// \brief As forward(x), writing into a caller's n x d matrix.
  template <class D>
  void forward_into(const Eigen::MatrixBase<D>& x, Eigen::Ref<Matrix<S>> out,
                    const AttentionOptions& options = {}) const {
    constexpr const char* kWhere = "Synthesizer::forward";
    check_inputs(kWhere, x, options);
    if (out.rows() != x.rows() || out.cols() != c_.width)
      detail::fail(kWhere, "out is ", detail::shape_str(out.rows(), out.cols()), " but must be n x d = ",
                   detail::shape_str(x.rows(), c_.width));
    const Index n = x.rows(), dh = head_dim();
    const int threads = detail::resolve_threads(options.threads);
    const detail::ViewOf<D> xv(x);
    Matrix<S> g, concat(n, c_.width);
    detail::dense(xv.view(), w_v, b_v, g, threads);
    const detail::MaskModel<S> mask(n, n, options, {});
    if (!depends_on_input()) {
      const auto entry = cache_.get(n, options, [&](Matrix<S>& p) { probabilities(xv.view(), options, p, threads); });
      for (Index h = 0; h < c_.heads; ++h) {
        const auto row_depth = [&](Index r0, Index rows) {
          detail::KeyRange hull{n, 0};
          for (Index i = r0; i < r0 + rows; ++i) {
            const detail::KeyRange r = mask.row_range(i);
            if (!r.empty()) hull = {std::min(hull.begin, r.begin), std::max(hull.end, r.end)};
          }
          return hull;
        };
        detail::dense(detail::StridedView<S>{entry->p.data() + h * n * n, n, n, n, 1},
                      detail::StridedView<S>{g.data() + h * dh, n, dh, c_.width, 1}, Matrix<S>(),
                      concat.data() + h * dh, c_.width, threads, row_depth);
      }
    } else {
      detail::SynthesizedLogits<S> logits = synthesize(xv.view(), options, threads);
      std::vector<detail::AttentionCall<S, detail::SynthesizedMask<S>>> calls;
      for (Index h = 0; h < c_.heads; ++h)
        calls.push_back({logits.q_view(h), logits.k_view(h), {g.data() + h * dh, n, dh, c_.width, 1},
                         detail::SynthesizedMask<S>(mask, &logits, h), S(1),
                         detail::AttentionOutput<S>{concat.data() + h * dh, c_.width, nullptr}});
      detail::run_attention(calls, options);
    }
    if (!c_.output_projection) {
      out = concat;
      return;
    }
    detail::dense(detail::matrix_view(concat), detail::matrix_view(w_o), b_o, out.data(), out.outerStride(), threads);
  }

  /// \brief Heap bytes that forward_into over n tokens allocates at most with these options, once the probabilities
  /// of a layer whose logits do not depend on the input are kept: G and the concatenated heads (n x d each), plus
  /// the larger of the projections' scratch and the attention's (input-dependent logits: their factors, n x H rank
  /// for Q and K, and a few tiles per thread; kept probabilities: one product's scratch per head). Never n x n per
  /// call. forward() adds its n x d result. The kept probabilities themselves (H n^2 scalars, built by the first call
  /// for a length and options) are kept_bytes(n).
  Index workspace_bytes(Index n, const AttentionOptions& options = {}) const {
    constexpr const char* kWhere = "Synthesizer::workspace_bytes";
    if (n < 0 || n > c_.max_length) detail::fail(kWhere, "n must be in [0, l] with l = ", c_.max_length, ", got ", n);
    detail::validate_options(kWhere, options, n);
    const Index d = c_.width, dh = head_dim();
    const int threads = detail::resolve_threads(options.threads);
    const Index buffers = 2 * detail::heap_bytes<S>(n * d);
    const Index project = detail::dense_workspace_bytes<S>(n, d, d, threads);  // G, and the output projection
    if (!depends_on_input()) return buffers + std::max(project, detail::dense_workspace_bytes<S>(n, n, dh, threads));
    const std::vector<SynthesizerKind> kinds = logit_kinds();
    Index rank = 0;
    for (SynthesizerKind kind : kinds) rank += detail::factor_rank(kind, c_);
    const Index attention =
        detail::heap_bytes<detail::AttentionCall<S, detail::SynthesizedMask<S>>>(c_.heads) +
        detail::attention_calls_workspace_bytes<S>(c_.heads, n, n, std::max<Index>(rank, 1), dh, options);
    return buffers + std::max(project, detail::logits_heap<S>(kinds, c_, n, threads) + attention);
  }

  /// \brief Bytes of the probabilities kept for length n (H n^2 scalars) by a layer whose logits do not depend on
  /// the input; 0 for the others.
  Index kept_bytes(Index n) const { return depends_on_input() ? 0 : c_.heads * n * n * Index(sizeof(S)); }

  /// \brief The attention weights softmax(mask(B_h)) of every head for input x: H matrices of n x n (rows of masked
  /// or padded keys are zero where the mask says so). For inspection; forward() never forms them for input-dependent
  /// logits.
  template <class D>
  std::vector<Matrix<S>> attention_weights(const Eigen::MatrixBase<D>& x, const AttentionOptions& options = {}) const {
    check_inputs("Synthesizer::attention_weights", x, options);
    const Index n = x.rows();
    const detail::ViewOf<D> xv(x);
    Matrix<S> p;
    probabilities(xv.view(), options, p, detail::resolve_threads(options.threads));
    std::vector<Matrix<S>> heads(size_t(c_.heads));
    for (Index h = 0; h < c_.heads; ++h) heads[size_t(h)] = p.middleRows(h * n, n);
    return heads;
  }

  /// \brief Whether the logits depend on the input (false for Random, Factorized Random and their mixtures, whose
  /// probabilities are kept between calls).
  virtual bool depends_on_input() const = 0;

  /// \brief Forgets the kept probabilities; call it after changing logit weights in place.
  void weights_changed() { cache_.clear(); }

  /// \brief Every parameter: the logits' (SPEC section 4, per head times H), the value projection d^2 (+ d with
  /// bias) and the output projection d^2 (+ d with bias).
  Index parameter_count() const {
    const Index d = c_.width, bias = c_.projection_bias ? d : 0;
    return logit_parameter_count() + d * d + bias + (c_.output_projection ? d * d + bias : 0);
  }
  /// \brief The logits' parameters alone: the SPEC's per-head count times H (plus the mixture weights).
  virtual Index logit_parameter_count() const = 0;
  /// \brief The kinds of logits this layer synthesizes, in order (one, or a mixture's components).
  virtual std::vector<SynthesizerKind> logit_kinds() const = 0;

 protected:
  explicit SynthesizerLayer(const SynthesizerConfig& config) : c_(config) {
    constexpr const char* kWhere = "Synthesizer";
    if (c_.width < 1) detail::fail(kWhere, "config.width must be >= 1, got ", c_.width);
    if (c_.max_length < 1) detail::fail(kWhere, "config.max_length (l) must be >= 1, got ", c_.max_length);
    if (c_.heads < 1 || c_.width % c_.heads != 0)
      detail::fail(kWhere, "config.heads must divide config.width (d_head = d / H), got d = ", c_.width,
                   ", H = ", c_.heads);
  }
  SynthesizerLayer(const SynthesizerLayer&) = default;
  SynthesizerLayer& operator=(const SynthesizerLayer&) = default;

  /// Draws the projections: first of every layer's draws, so a seed fixes them whatever the variant.
  void init_projections(detail::Rng& rng) {
    const Index d = c_.width;
    w_v = detail::xavier_uniform<S>(d, d, rng);
    if (c_.output_projection) w_o = detail::xavier_uniform<S>(d, d, rng);
    if (c_.projection_bias) b_v.setZero(1, d);
    if (c_.projection_bias && c_.output_projection) b_o.setZero(1, d);
  }

  /// Checks the variant's parameters (SynthesizerConfig fields it reads).
  static void check_factors(const SynthesizerConfig& c, SynthesizerKind kind) {
    constexpr const char* kWhere = "Synthesizer";
    if (kind == SynthesizerKind::kFactorizedDense && (c.a < 1 || c.b < 1 || c.a * c.b != c.max_length))
      detail::fail(kWhere, "Factorized Dense needs config.a >= 1 and config.b >= 1 with a * b = l = ", c.max_length,
                   ", got a = ", c.a, ", b = ", c.b);
    if (kind == SynthesizerKind::kFactorizedRandom && c.k < 1)
      detail::fail(kWhere, "Factorized Random needs config.k >= 1, got ", c.k);
  }

  /// Shapes of the variant's logit weights.
  virtual void check_logit_weights(const char* where) const = 0;
  /// Whether some logits are dot products (options.scale applies to them).
  virtual bool has_dot_product() const { return false; }
  /// The logits of every head for input x (n x d).
  virtual detail::SynthesizedLogits<S> synthesize(const detail::StridedView<S>& x, const AttentionOptions& options,
                                                  int threads) const = 0;

  detail::SynthesizedLogits<S> empty_logits(Index n) const {
    detail::SynthesizedLogits<S> logits;
    logits.heads = c_.heads, logits.n = n, logits.l = c_.max_length;
    return logits;
  }

 private:
  template <class D>
  void check_inputs(const char* where, const Eigen::MatrixBase<D>& x, const AttentionOptions& options) const {
    static_assert(std::is_same_v<typename D::Scalar, S>, "the input must have the layer's scalar type");
    const Index d = c_.width;
    detail::check_shape(where, "w_v", w_v, d, d);
    detail::check_shape(where, "b_v", b_v, c_.projection_bias ? 1 : 0, c_.projection_bias ? d : 0);
    detail::check_shape(where, "w_o", w_o, c_.output_projection ? d : 0, c_.output_projection ? d : 0);
    const bool has_b_o = c_.projection_bias && c_.output_projection;
    detail::check_shape(where, "b_o", b_o, has_b_o ? 1 : 0, has_b_o ? d : 0);
    check_logit_weights(where);
    if (x.cols() != d)
      detail::fail(where, "input is ", detail::shape_str(x.rows(), x.cols()), " but the layer's width is d = ", d);
    if (x.rows() > c_.max_length)
      detail::fail(where, "input has n = ", x.rows(), " tokens (", detail::shape_str(x.rows(), x.cols()),
                   ") but the layer's maximum length is l = ", c_.max_length);
    detail::validate_options(where, options, x.rows());
    if (options.scale != 0 && !has_dot_product())
      detail::fail(where, "options.scale applies to dot-product logits only, and this layer has none; leave it 0");
  }

  void probabilities(const detail::StridedView<S>& x, const AttentionOptions& options, Matrix<S>& p,
                     int threads) const {
    const Index n = x.rows;
    const detail::SynthesizedLogits<S> logits = synthesize(x, options, threads);
    const detail::MaskModel<S> mask(n, n, options, {});
    p.resize(c_.heads * n, n);
    for (Index h = 0; h < c_.heads; ++h)
      detail::synthesized_probabilities(logits, h, mask, p.data() + h * n * n, n, threads);
  }

  SynthesizerConfig c_;
  mutable detail::ProbabilityCache<S> cache_;
};

namespace detail {

/// Random and Factorized Random logits do not depend on the input.
constexpr bool depends_on_input(SynthesizerKind kind) {
  return kind != SynthesizerKind::kRandom && kind != SynthesizerKind::kFactorizedRandom;
}

/// A synthesizer with one kind of logits, whose weights are public members of the layer.
template <class S, class Weights, SynthesizerKind kKind>
class SingleSynthesizer : public SynthesizerLayer<S>, public Weights {
 public:
  bool depends_on_input() const override { return detail::depends_on_input(kKind); }
  Index logit_parameter_count() const override { return logit_parameters(kKind, this->config()); }
  std::vector<SynthesizerKind> logit_kinds() const override { return {kKind}; }

 protected:
  SingleSynthesizer(const SynthesizerConfig& config, std::uint64_t seed) : SynthesizerLayer<S>(config) {
    this->check_factors(config, kKind);
    Rng rng(seed);
    this->init_projections(rng);
    init_weights<S>(static_cast<Weights&>(*this), config, rng);
  }
  void check_logit_weights(const char* where) const override {
    check_weights<S>(static_cast<const Weights&>(*this), this->config(), where);
  }
  SynthesizedLogits<S> synthesize(const StridedView<S>& x, const AttentionOptions& o, int threads) const override {
    SynthesizedLogits<S> logits = this->empty_logits(x.rows);
    add_logits<S>(static_cast<const Weights&>(*this), this->config(), x, S(1), o, threads, logits);
    return logits;
  }
};

}  // namespace detail

/// \brief Dense Synthesizer: B_h(i, :) = W_2 relu(W_1 x_i + b_1) + b_2 per head (SPEC section 4). Weights are
/// Xavier-uniform from `seed`, biases zero.
template <class S>
class DenseSynthesizer
    : public detail::SingleSynthesizer<S, DenseSynthesizerWeights<S>, SynthesizerKind::kDense> {
 public:
  explicit DenseSynthesizer(const SynthesizerConfig& config, std::uint64_t seed = 0)
      : detail::SingleSynthesizer<S, DenseSynthesizerWeights<S>, SynthesizerKind::kDense>(config, seed) {}
};

/// \brief Random Synthesizer: B_h = R_h, an l x l matrix learned (config.trainable) or fixed, whatever the input.
/// Its probabilities are computed once per sequence length and options, then kept (see weights_changed()).
template <class S>
class RandomSynthesizer
    : public detail::SingleSynthesizer<S, RandomSynthesizerWeights<S>, SynthesizerKind::kRandom> {
 public:
  explicit RandomSynthesizer(const SynthesizerConfig& config, std::uint64_t seed = 0)
      : detail::SingleSynthesizer<S, RandomSynthesizerWeights<S>, SynthesizerKind::kRandom>(config, seed) {}
  bool trainable() const { return this->config().trainable; }
};

/// \brief Factorized Dense Synthesizer: logit j of token i is A_i[j mod a] * C_i[j mod b], A = x W_a + b_a,
/// C = x W_b + b_b, a * b = l (config.a, config.b).
template <class S>
class FactorizedDenseSynthesizer
    : public detail::SingleSynthesizer<S, FactorizedDenseSynthesizerWeights<S>, SynthesizerKind::kFactorizedDense> {
 public:
  explicit FactorizedDenseSynthesizer(const SynthesizerConfig& config, std::uint64_t seed = 0)
      : detail::SingleSynthesizer<S, FactorizedDenseSynthesizerWeights<S>, SynthesizerKind::kFactorizedDense>(config,
                                                                                                            seed) {}
};

/// \brief Factorized Random Synthesizer: B_h = R_1 R_2^T with R_1, R_2 of l x k (config.k), whatever the input. Its
/// probabilities are computed once per sequence length and options, then kept (see weights_changed()).
template <class S>
class FactorizedRandomSynthesizer
    : public detail::SingleSynthesizer<S, FactorizedRandomSynthesizerWeights<S>, SynthesizerKind::kFactorizedRandom> {
 public:
  explicit FactorizedRandomSynthesizer(const SynthesizerConfig& config, std::uint64_t seed = 0)
      : detail::SingleSynthesizer<S, FactorizedRandomSynthesizerWeights<S>, SynthesizerKind::kFactorizedRandom>(
            config, seed) {}
  bool trainable() const { return this->config().trainable; }
};

/// \brief Mixture Synthesizer: B = sum_t alpha_t B_t over its components (each kind at most once, vanilla dot
/// product included), alpha = softmax(mixture_logits). A component's weights live in the member of its kind; the
/// others are empty.
template <class S>
class MixtureSynthesizer : public SynthesizerLayer<S> {
 public:
  std::optional<DenseSynthesizerWeights<S>> dense;
  std::optional<RandomSynthesizerWeights<S>> random;
  std::optional<FactorizedDenseSynthesizerWeights<S>> factorized_dense;
  std::optional<FactorizedRandomSynthesizerWeights<S>> factorized_random;
  std::optional<DotProductWeights<S>> dot_product;
  Matrix<S> mixture_logits;  ///< 1 x T, in the order of components(); zero (equal weights) at construction

  MixtureSynthesizer(const SynthesizerConfig& config, std::vector<SynthesizerKind> components,
                     std::uint64_t seed = 0)
      : SynthesizerLayer<S>(config), components_(std::move(components)) {
    if (components_.empty()) detail::fail("MixtureSynthesizer", "needs at least one component");
    for (size_t t = 0; t < components_.size(); ++t) {
      this->check_factors(config, components_[t]);
      if (std::count(components_.begin(), components_.end(), components_[t]) > 1)
        detail::fail("MixtureSynthesizer", "component ", t, " appears more than once; give each kind at most once");
    }
    detail::Rng rng(seed);
    this->init_projections(rng);
    for (SynthesizerKind kind : components_)
      visit(kind, [&](auto& slot) {
        slot.emplace();
        detail::init_weights<S>(*slot, config, rng);
      });
    mixture_logits.setZero(1, Index(components_.size()));
  }

  const std::vector<SynthesizerKind>& components() const { return components_; }
  std::vector<SynthesizerKind> logit_kinds() const override { return components_; }
  /// alpha_t = softmax(mixture_logits)_t.
  std::vector<double> mixture_weights() const {
    const Eigen::ArrayXd z = mixture_logits.row(0).transpose().template cast<double>().array();
    const Eigen::ArrayXd e = (z - z.maxCoeff()).exp();
    const Eigen::ArrayXd alpha = e / e.sum();
    return std::vector<double>(alpha.data(), alpha.data() + alpha.size());
  }
  bool depends_on_input() const override {
    return std::any_of(components_.begin(), components_.end(),
                       [](SynthesizerKind kind) { return detail::depends_on_input(kind); });
  }
  Index logit_parameter_count() const override {
    Index total = Index(components_.size());
    for (SynthesizerKind kind : components_) total += detail::logit_parameters(kind, this->config());
    return total;
  }

 protected:
  void check_logit_weights(const char* where) const override {
    detail::check_shape(where, "mixture_logits", mixture_logits, 1, Index(components_.size()));
    if (!mixture_logits.allFinite()) detail::fail(where, "mixture_logits must be finite");
    for (SynthesizerKind kind : components_)
      visit(kind, [&](const auto& slot) {
        if (!slot) detail::fail(where, "a component's weights were reset; it is listed in components()");
        detail::check_weights<S>(*slot, this->config(), where);
      });
  }
  bool has_dot_product() const override {
    return std::find(components_.begin(), components_.end(), SynthesizerKind::kDotProduct) != components_.end();
  }
  detail::SynthesizedLogits<S> synthesize(const detail::StridedView<S>& x, const AttentionOptions& o,
                                          int threads) const override {
    detail::SynthesizedLogits<S> logits = this->empty_logits(x.rows);
    const std::vector<double> alpha = mixture_weights();
    for (size_t t = 0; t < components_.size(); ++t)
      visit(components_[t], [&](const auto& slot) {
        detail::add_logits<S>(*slot, this->config(), x, static_cast<S>(alpha[t]), o, threads, logits);
      });
    return logits;
  }

 private:
  template <class Self, class F>
  static void visit_in(Self& self, SynthesizerKind kind, const F& f) {
    switch (kind) {
      case SynthesizerKind::kDense: return f(self.dense);
      case SynthesizerKind::kRandom: return f(self.random);
      case SynthesizerKind::kFactorizedDense: return f(self.factorized_dense);
      case SynthesizerKind::kFactorizedRandom: return f(self.factorized_random);
      case SynthesizerKind::kDotProduct: return f(self.dot_product);
    }
  }
  template <class F>
  void visit(SynthesizerKind kind, const F& f) {
    visit_in(*this, kind, f);
  }
  template <class F>
  void visit(SynthesizerKind kind, const F& f) const {
    visit_in(*this, kind, f);
  }

  std::vector<SynthesizerKind> components_;
};

}  // namespace attnkit
