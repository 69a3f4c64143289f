// attnkit: the gated attention unit (GAU) and FLASH mixed-chunk attention (Hua et al. 2022, "Transformer Quality in
// Linear Time"; Su's analysis of GAU), SPEC section 5.
//
// GAU is one head of attention with a shared small dimension s, gated by U: O = (U .* (A V)) W_o. Its squared-ReLU
// attention runs on the fused tile loop of core/tiling.hpp with the softmax replaced by relu(s)^2 (no running max is
// needed, so every key tile is one pass), and its softmax_plus attention is the fused SDPA loop with a log-length
// factor per row. FLASH runs the same squared-ReLU loop inside chunks of c tokens and adds linear attention across
// chunks, so its cost is linear in n.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "core/dense.hpp"
#include "core/error.hpp"
#include "core/mask.hpp"
#include "core/options.hpp"
#include "core/positions.hpp"
#include "core/random.hpp"
#include "core/softmax.hpp"
#include "core/threading.hpp"
#include "core/tiling.hpp"
#include "core/types.hpp"
#include "core/view.hpp"

namespace attnkit {

/// \brief How GAU normalises Q K^T (SPEC section 5). n_i is the number of keys row i may see (n; i + 1 when causal;
/// the unpadded keys with key padding).
enum class GauNormalization {
  kRelu2,        ///< relu(Q K^T / sqrt(s))^2 / n_i (the FLASH paper)
  kRelu2Shared,  ///< relu(Q K^T)^2 / (n_i s) (Su's preferred form)
  kSoftmaxPlus,  ///< softmax(log(max(n_i, 16)) / log(512) * Q K^T / sqrt(s))
};

/// \brief How a layer's weight matrices are initialised (biases are zero, gamma 1, beta 0).
enum class GauInit {
  kLecunNormal,  ///< N(0, 1 / fan_in), as in Su's analysis
  kNormal,       ///< N(0, init_std^2), e.g. 0.02 as in the paper
};

/// \brief Shape and initialisation of a GatedAttentionUnit or FlashAttentionLayer. Zero means "derive it".
struct GauConfig {
  Index width = 0;        ///< d: columns of the input and output
  Index expansion = 0;    ///< e: columns of U and V; 0 means 2 d
  Index shared = 128;     ///< s: columns of Z, Q and K
  Index chunk = 256;      ///< FLASH only: c, tokens per chunk
  bool bias = false;      ///< biases b_u, b_v, b_z and b_o
  bool rope = false;      ///< GAU only: rotary position embedding on Q and K (s must be even)
  RopeOptions rope_options{};
  GauInit init = GauInit::kLecunNormal;
  double init_std = 0.02;  ///< with GauInit::kNormal
};

/// \brief Options of a GAU or FLASH forward.
struct GauOptions {
  GauNormalization normalization = GauNormalization::kRelu2;  ///< GAU only; FLASH's chunks are always relu2 / c
  bool causal = false;    ///< token i sees tokens j <= i
  Index key_length = -1;  ///< GAU only: tokens at index >= key_length are padding, seen by no query; -1 means none
  int threads = 0;        ///< 0 means all; the result is the same for any thread count
};

namespace detail {

/// Squared-ReLU attention weights for the fused loop: relu(s)^2, then row i is multiplied by inverse(i). A NaN logit
/// stays NaN (max(NaN, 0) must not quietly give 0); masked logits are -inf and give 0.
template <class Inverse>
struct SquaredReluWeights {
  Inverse inverse;

  template <class S>
  S step(S* logits, Index count, SoftmaxState<S>&) const {
    using namespace Eigen::internal;
    using Packet = typename packet_traits<S>::type;
    constexpr Index P = packet_traits<S>::size;
    const Packet zero = pset1<Packet>(S(0));
    Index c = 0;
    for (; c + P <= count; c += P) {
      const Packet r = pmax<Eigen::PropagateNaN>(ploadu<Packet>(logits + c), zero);
      pstoreu(logits + c, pmul(r, r));
    }
    for (; c < count; ++c) logits[c] = std::isnan(logits[c]) || logits[c] > 0 ? logits[c] * logits[c] : S(0);
    return S(1);
  }
  template <class S>
  S finish(Index i, const SoftmaxState<S>&) const {
    return static_cast<S>(inverse(i));
  }
};

/// SDPA's mask model with softmax_plus's factor log(max(n_i, 16)) / log(512) in each row's scale.
template <class S>
class SoftmaxPlusMask : public MaskModel<S> {
 public:
  explicit SoftmaxPlusMask(const MaskModel<S>& base) : MaskModel<S>(base) {}
  S row_scale(Index i, S scale) const {
    const double n_i = double(std::max<Index>(this->allowed_count(i), 16));
    return static_cast<S>(scale * std::log(n_i) / std::log(512.0));
  }
};

/// SiLU, x * sigmoid(x), in place.
template <class S>
void silu(Matrix<S>& x) {
  x.array() = x.array() / (S(1) + (-x.array()).exp());
}

template <class S>
Matrix<S> init_matrix(Index rows, Index cols, const GauConfig& c, Rng& rng) {
  const double stddev = c.init == GauInit::kNormal ? c.init_std : 1.0 / std::sqrt(double(rows));  // fan_in = rows
  return normal_matrix<S>(rows, cols, stddev, rng);
}

/// Validates a config and fills derived fields; `where` names the layer.
inline GauConfig resolve(GauConfig c, const char* where, bool flash) {
  if (c.width < 1) fail(where, "config.width (d) must be >= 1, got ", c.width);
  if (c.expansion == 0) c.expansion = 2 * c.width;
  if (c.expansion < 1) fail(where, "config.expansion (e) must be >= 1 (0 = 2 d), got ", c.expansion);
  if (c.shared < 1) fail(where, "config.shared (s) must be >= 1, got ", c.shared);
  if (flash && c.chunk < 1) fail(where, "config.chunk (c) must be >= 1, got ", c.chunk);
  if (c.rope && flash) fail(where, "config.rope is not supported by FLASH");
  if (c.rope && c.shared % 2 != 0) fail(where, "RoPE needs an even config.shared (s), got ", c.shared);
  if (c.init == GauInit::kNormal && !(c.init_std > 0 && std::isfinite(c.init_std)))
    fail(where, "config.init_std must be finite and > 0, got ", c.init_std);
  return c;
}

/// The projections both layers share: U = phi(X W_u + b_u), V = phi(X W_v + b_v), Z = phi(X W_z + b_z).
template <class S>
struct GatedProjections {
  Matrix<S> u, v, z;
};

}  // namespace detail

/// \brief Weights and projections shared by GatedAttentionUnit and FlashAttentionLayer.
template <class S>
class GatedLayerBase {
 public:
  Matrix<S> w_u;  ///< d x e
  Matrix<S> w_v;  ///< d x e
  Matrix<S> w_z;  ///< d x s
  Matrix<S> w_o;  ///< e x d
  Matrix<S> b_u;  ///< 1 x e, or 0 x 0 without config.bias
  Matrix<S> b_v;  ///< 1 x e, or 0 x 0
  Matrix<S> b_z;  ///< 1 x s, or 0 x 0
  Matrix<S> b_o;  ///< 1 x d, or 0 x 0
  Matrix<S> gamma;  ///< heads x s per-dimension scales of Z (GAU: Q, K; FLASH: Q_quad, K_quad, Q_lin, K_lin)
  Matrix<S> beta;   ///< heads x s per-dimension offsets of Z

  virtual ~GatedLayerBase() = default;

  const GauConfig& config() const { return c_; }

  /// \brief O for x (n x d): n x d.
  template <class D>
  Matrix<S> forward(const Eigen::MatrixBase<D>& x, const GauOptions& options = {}) const {
    Matrix<S> out(x.rows(), c_.width);
    forward_into(x, out, options);
    return out;
  }

  /// \brief As forward(x), writing into a caller's n x d matrix.
  template <class D>
  void forward_into(const Eigen::MatrixBase<D>& x, Eigen::Ref<Matrix<S>> out, const GauOptions& options = {}) const {
    const std::string where = std::string(name()) + "::forward";
    check_input(where.c_str(), x, options);
    if (out.rows() != x.rows() || out.cols() != c_.width)
      detail::fail(where.c_str(), "out is ", detail::shape_str(out.rows(), out.cols()), " but must be n x d = ",
                   detail::shape_str(x.rows(), c_.width));
    const detail::ViewOf<D> xv(x);
    run(xv.view(), out.data(), out.outerStride(), options, detail::resolve_threads(options.threads));
  }

  /// \brief Heap bytes that forward_into over n tokens allocates at most with these options (forward() adds its
  /// n x d result). GatedAttentionUnit: U, V (n x e), Z, Q, K (n x s) and A V (n x e), plus the largest per-thread
  /// scratch of its products and of the tiled attention (never n x n). FlashAttentionLayer: the s x e state and one
  /// chunk's buffers (O(c (e + s))) when causal; non-causal also V and Z of every token (n x (e + s)) and one chunk
  /// per worker thread. An input whose rows are not contiguous in memory adds a copy of it.
  Index workspace_bytes(Index n, const GauOptions& options = {}) const {
    const std::string where = std::string(name()) + "::workspace_bytes";
    if (n < 0) detail::fail(where.c_str(), "n must be >= 0, got ", n);
    if (options.threads < 0)
      detail::fail(where.c_str(), "options.threads must be >= 0 (0 = all), got ", options.threads);
    check_options(where.c_str(), n, options);
    return heap(n, options, detail::resolve_threads(options.threads));
  }

  /// \brief Every parameter: W_u, W_v (d e each), W_z (d s), W_o (e d), gamma and beta, and the biases.
  Index parameter_count() const {
    const Index d = c_.width, e = c_.expansion, s = c_.shared;
    return 3 * d * e + d * s + 2 * gamma.rows() * s + (c_.bias ? 2 * e + s + d : 0);
  }

 protected:
  GatedLayerBase(const GauConfig& config, Index heads, std::uint64_t seed) : c_(config) {
    const Index d = c_.width, e = c_.expansion, s = c_.shared;
    detail::Rng rng(seed);
    w_u = detail::init_matrix<S>(d, e, c_, rng);
    w_v = detail::init_matrix<S>(d, e, c_, rng);
    w_z = detail::init_matrix<S>(d, s, c_, rng);
    w_o = detail::init_matrix<S>(e, d, c_, rng);
    if (c_.bias) b_u.setZero(1, e), b_v.setZero(1, e), b_z.setZero(1, s), b_o.setZero(1, d);
    gamma.setOnes(heads, s);
    beta.setZero(heads, s);
  }

  /// The layer's name, for messages.
  virtual const char* name() const = 0;
  /// Options the layer does not support throw here.
  virtual void check_options(const char* where, Index n, const GauOptions& o) const = 0;
  /// The forward over x (n x d) into out (n x d at row stride out_stride); x and the options are checked.
  virtual void run(const detail::StridedView<S>& x, S* out, Index out_stride, const GauOptions& options,
                   int threads) const = 0;
  /// What run() allocates for n tokens, at most; the options are checked.
  virtual Index heap(Index n, const GauOptions& options, int threads) const = 0;

  /// The scratch of one activate() or gate_and_project() product over n rows.
  Index projection_heap(Index n, int threads) const {
    const Index d = c_.width, e = c_.expansion, s = c_.shared;
    return std::max({detail::dense_workspace_bytes<S>(n, d, e, threads),
                     detail::dense_workspace_bytes<S>(n, d, s, threads),
                     detail::dense_workspace_bytes<S>(n, e, d, threads)});
  }

  template <class D>
  void check_input(const char* where, const Eigen::MatrixBase<D>& x, const GauOptions& o) const {
    static_assert(std::is_same_v<typename D::Scalar, S>, "the input must have the layer's scalar type");
    const Index d = c_.width, e = c_.expansion, s = c_.shared, h = gamma.rows(), bias = c_.bias ? 1 : 0;
    const auto shape = [&](const char* name, const Matrix<S>& w, Index rows, Index cols) {
      detail::check_shape(where, name, w, rows, cols);
    };
    shape("w_u", w_u, d, e), shape("w_v", w_v, d, e), shape("w_z", w_z, d, s), shape("w_o", w_o, e, d);
    shape("b_u", b_u, bias, bias * e), shape("b_v", b_v, bias, bias * e), shape("b_z", b_z, bias, bias * s);
    shape("b_o", b_o, bias, bias * d), shape("gamma", gamma, h, s), shape("beta", beta, h, s);
    if (x.cols() != d)
      detail::fail(where, "input is ", detail::shape_str(x.rows(), x.cols()), " but the layer's width is d = ", d);
    if (o.threads < 0) detail::fail(where, "options.threads must be >= 0 (0 = all), got ", o.threads);
    check_options(where, x.rows(), o);
  }

  /// y = phi(x w + b), SiLU.
  static void activate(const detail::StridedView<S>& x, const Matrix<S>& w, const Matrix<S>& b, Matrix<S>& y,
                       int threads) {
    detail::dense(x, w, b, y, threads);
    detail::silu(y);
  }

  detail::GatedProjections<S> project(const detail::StridedView<S>& x, int threads) const {
    detail::GatedProjections<S> p;
    activate(x, w_u, b_u, p.u, threads);
    activate(x, w_v, b_v, p.v, threads);
    activate(x, w_z, b_z, p.z, threads);
    return p;
  }

  /// Q or K of head h: Z .* gamma_h + beta_h.
  template <class D>
  Matrix<S> scale_offset(const Eigen::MatrixBase<D>& z, Index h) const {
    return (z.array().rowwise() * gamma.row(h).array()).rowwise() + beta.row(h).array();
  }

  /// (U .* y) W_o + b_o, into out (rows of y, at row stride out_stride).
  void gate_and_project(const Matrix<S>& u, Matrix<S>& y, S* out, Index out_stride, int threads) const {
    y.array() *= u.array();
    detail::dense(detail::matrix_view(y), detail::matrix_view(w_o), b_o, out, out_stride, threads);
  }

  GauConfig c_;
};

/// \brief Gated attention unit (SPEC section 5): U = phi(X W_u), V = phi(X W_v), Z = phi(X W_z), Q and K = Z scaled
/// and offset per dimension (gamma, beta rows 0 and 1), A = normalise(Q K^T), O = (U .* (A V)) W_o, phi = SiLU.
///
/// Weights are public (shapes below and in GatedLayerBase) and checked on every forward. Memory is O(n (e + s)): the
/// attention is tiled, never n x n.
template <class S>
class GatedAttentionUnit : public GatedLayerBase<S> {
 public:
  /// Weights from `seed` by config.init; gamma = 1, beta = 0, biases 0.
  explicit GatedAttentionUnit(const GauConfig& config, std::uint64_t seed = 0)
      : GatedLayerBase<S>(detail::resolve(config, "GatedAttentionUnit", false), 2, seed) {}

  /// \brief The attention matrix A = normalise(Q K^T) for x (n x n), for inspection; forward() never forms it.
  template <class D>
  Matrix<S> attention_weights(const Eigen::MatrixBase<D>& x, const GauOptions& options = {}) const {
    this->check_input("GatedAttentionUnit::attention_weights", x, options);
    const Index n = x.rows();
    const int threads = detail::resolve_threads(options.threads);
    const detail::ViewOf<D> xv(x);
    const detail::GatedProjections<S> p = this->project(xv.view(), threads);
    const Matrix<S> q = query_key(p.z, 0), kt = query_key(p.z, 1).transpose();
    Matrix<S> a;
    detail::dense(detail::matrix_view(q), kt, Matrix<S>(), a, threads);
    const AttentionOptions o = attention_options(options);
    const detail::MaskModel<S> mask(n, n, o, {});
    const detail::SoftmaxPlusMask<S> plus(mask);
    for (Index i = 0; i < n; ++i) {
      S* row = a.data() + i * n;
      const Index count = mask.allowed_count(i);
      Eigen::Map<Eigen::Array<S, 1, Eigen::Dynamic>> r(row, n);
      detail::SoftmaxState<S> state;
      if (options.normalization == GauNormalization::kSoftmaxPlus) {
        detail::finish_logit_row(plus, i, scale(options), row, n);
        detail::SoftmaxWeights().step(row, n, state);
        r *= state.inverse_sum();
      } else {
        detail::finish_logit_row(mask, i, scale(options), row, n);
        weights(mask, options).step(row, n, state);
        r *= count > 0 ? static_cast<S>(weights(mask, options).finish(i, state)) : S(0);
      }
    }
    return a;
  }

  /// \brief O = (U .* (A V)) W_o with a given n x n attention matrix A instead of normalise(Q K^T): with A = I, GAU is
  /// the gated linear unit feed-forward (U .* V) W_o. For analysis; costs O(n^2 e).
  template <class D, class DA>
  Matrix<S> forward_with_attention(const Eigen::MatrixBase<D>& x, const Eigen::MatrixBase<DA>& a) const {
    constexpr const char* kWhere = "GatedAttentionUnit::forward_with_attention";
    this->check_input(kWhere, x, {});
    if (a.rows() != x.rows() || a.cols() != x.rows())
      detail::fail(kWhere, "attention is ", detail::shape_str(a.rows(), a.cols()), " but must be n x n = ",
                   detail::shape_str(x.rows(), x.rows()));
    const int threads = detail::resolve_threads(0);
    const detail::ViewOf<D> xv(x);
    const detail::GatedProjections<S> p = this->project(xv.view(), threads);
    const Matrix<S> dense_a = a;
    Matrix<S> av;
    detail::dense(detail::matrix_view(dense_a), p.v, Matrix<S>(), av, threads);
    Matrix<S> out(x.rows(), this->c_.width);
    this->gate_and_project(p.u, av, out.data(), out.cols(), threads);
    return out;
  }

 private:
  const char* name() const override { return "GatedAttentionUnit"; }
  void check_options(const char* where, Index n, const GauOptions& o) const override {
    if (o.key_length < -1 || o.key_length > n)
      detail::fail(where, "options.key_length must be -1 or in [0, n] with n = ", n, ", got ", o.key_length);
  }

  static AttentionOptions attention_options(const GauOptions& g) {
    AttentionOptions o;
    o.causal = g.causal, o.key_length = g.key_length, o.threads = g.threads;
    return o;
  }

  S scale(const GauOptions& o) const {
    return o.normalization == GauNormalization::kRelu2Shared ? S(1)
                                                             : static_cast<S>(1 / std::sqrt(double(this->c_.shared)));
  }

  /// relu(.)^2 divided by n_i (times s for kRelu2Shared).
  auto weights(const detail::MaskModel<S>& mask, const GauOptions& o) const {
    const double per_key = o.normalization == GauNormalization::kRelu2Shared ? double(this->c_.shared) : 1.0;
    const auto inverse = [&mask, per_key](Index i) {
      const Index count = mask.allowed_count(i);
      return count > 0 ? 1.0 / (per_key * double(count)) : 0.0;
    };
    return detail::SquaredReluWeights<decltype(inverse)>{inverse};
  }

  /// Q (head 0) or K (head 1), with RoPE at positions 0, 1, ... when configured.
  Matrix<S> query_key(const Matrix<S>& z, Index head) const {
    Matrix<S> x = this->scale_offset(z, head);
    if (this->c_.rope) apply_rope<S>(x, 0, this->c_.rope_options);
    return x;
  }

  void run(const detail::StridedView<S>& x, S* out, Index out_stride, const GauOptions& options,
           int threads) const override {
    detail::GatedProjections<S> p = this->project(x, threads);
    Matrix<S> av = attend(p, options, threads);
    this->gate_and_project(p.u, av, out, out_stride, threads);
  }

  Index heap(Index n, const GauOptions& options, int threads) const override {
    const Index e = this->c_.expansion, s = this->c_.shared;
    AttentionOptions o = attention_options(options);
    o.threads = threads;
    const Index buffers = 3 * detail::heap_bytes<S>(n * e) + 3 * detail::heap_bytes<S>(n * s);
    const Index attention = detail::attention_calls_workspace_bytes<S>(1, n, n, s, e, o);
    // The attention's tile workspaces stay with their threads (for the next call) while the output projection runs.
    return buffers + this->projection_heap(n, threads) + attention;
  }

  /// A V, n x e.
  Matrix<S> attend(const detail::GatedProjections<S>& p, const GauOptions& options, int threads) const {
    const Matrix<S> q = query_key(p.z, 0), k = query_key(p.z, 1);
    Matrix<S> av(p.z.rows(), this->c_.expansion);
    AttentionOptions o = attention_options(options);
    o.threads = threads;
    const Index n = q.rows();
    const detail::MaskModel<S> mask(n, n, o, {});
    const detail::AttentionOutput<S> out{av.data(), av.cols(), nullptr};
    const auto qv = detail::matrix_view(q), kv = detail::matrix_view(k), vv = detail::matrix_view(p.v);
    if (options.normalization == GauNormalization::kSoftmaxPlus)
      detail::fused_attention(qv, kv, vv, detail::SoftmaxPlusMask<S>(mask), scale(options), o, out);
    else
      detail::fused_attention(qv, kv, vv, mask, scale(options), o, out, detail::KeyRange::all(),
                              static_cast<detail::AttentionWorkspace<S>*>(nullptr),
                              weights(mask, options));
    return av;
  }
};

/// \brief The two attention terms of a FLASH forward, before gating: each n x e.
template <class S>
struct FlashParts {
  Matrix<S> quadratic;  ///< relu2 attention inside each chunk
  Matrix<S> linear;     ///< linear attention across chunks
};

/// \brief FLASH mixed-chunk attention (SPEC section 5): Z's four scale/offset heads (gamma, beta rows 0..3) give
/// Q_quad, K_quad, Q_lin, K_lin; within each chunk of c tokens, relu(Q_quad K_quad^T / sqrt(s))^2 / c times V (lower
/// triangle when causal); across chunks, linear attention Q_lin (sum_h K_lin,h^T V_h) / n, or causally over the
/// chunks before, divided by the g c tokens they hold (0 for the first chunk); O = (U .* (V_quad + V_lin)) W_o.
///
/// A last chunk shorter than c is divided by c like the others: the result equals zero-padding the sequence to a
/// multiple of c with the padding tokens seen by nobody (the paper pads). Time is linear in n. Memory besides input and
/// output: O(c (e + s) + s e) causal (one pass, chunk by chunk), O(n (e + s)) non-causal (V and Z are kept between the
/// pass that sums the linear state and the chunks, which then run in parallel).
template <class S>
class FlashAttentionLayer : public GatedLayerBase<S> {
 public:
  /// Weights from `seed` by config.init; gamma = 1, beta = 0, biases 0.
  explicit FlashAttentionLayer(const GauConfig& config, std::uint64_t seed = 0)
      : GatedLayerBase<S>(detail::resolve(config, "FlashAttentionLayer", true), 4, seed) {}

  /// \brief V_quad and V_lin for x, before gating, for inspection.
  template <class D>
  FlashParts<S> attention_parts(const Eigen::MatrixBase<D>& x, const GauOptions& options = {}) const {
    this->check_input("FlashAttentionLayer::attention_parts", x, options);
    const detail::ViewOf<D> xv(x);
    FlashParts<S> parts{Matrix<S>(x.rows(), this->c_.expansion), Matrix<S>(x.rows(), this->c_.expansion)};
    stream(xv.view(), options, detail::resolve_threads(options.threads), [&](Index r0, Chunk& ch, int) {
      parts.quadratic.middleRows(r0, ch.quad.rows()) = ch.quad;
      parts.linear.middleRows(r0, ch.lin.rows()) = ch.lin;
    });
    return parts;
  }

 private:
  /// One chunk's scratch: its projections, heads and the two attention terms (c x e at most). Reused chunk after
  /// chunk, so a forward touches O(c (e + s)) memory besides its input and output (and V, Z when non-causal).
  struct Chunk {
    Matrix<S> u, v, z, q_quad, k_quad, q_lin, k_lin, quad, lin, step;
  };

  const char* name() const override { return "FlashAttentionLayer"; }
  void check_options(const char* where, Index, const GauOptions& o) const override {
    if (o.key_length != -1) detail::fail(where, "options.key_length is not supported by FLASH; leave it -1");
    if (o.normalization != GauNormalization::kRelu2)
      detail::fail(where, "FLASH's chunks use relu2 / c; leave options.normalization at kRelu2");
  }

  void run(const detail::StridedView<S>& x, S* out, Index out_stride, const GauOptions& options,
           int threads) const override {
    stream(x, options, threads, [&](Index r0, Chunk& ch, int inner) {
      ch.quad += ch.lin;
      this->gate_and_project(ch.u, ch.quad, out + r0 * out_stride, out_stride, inner);
    });
  }

  Index heap(Index n, const GauOptions& options, int threads) const override {
    const Index e = this->c_.expansion, s = this->c_.shared, c = this->c_.chunk, len = std::min(c, n);
    if (n == 0) return 0;
    // K_lin^T of the keys summed into the state (the chunk's when causal, every token's otherwise) and the K_lin it is
    // transposed from.
    const Index state = detail::heap_bytes<S>(s * e), k_lin = 2 * detail::heap_bytes<S>(s * (options.causal ? len : n));
    // One chunk on `inner` threads: U, quad, lin (and V when causal; len x e), Z, Q_quad, K_quad, Q_lin (len x s),
    // the causal state step (s x e), and the largest scratch of its products and of its relu2 attention.
    const auto chunk = [&](int inner) {
      AttentionOptions o;
      o.causal = options.causal, o.threads = inner;
      // (the relu2 attention's tile workspaces stay with their threads while the later products run)
      const Index products =
          std::max({this->projection_heap(len, inner), detail::dense_workspace_bytes<S>(len, s, e, inner),
                    detail::dense_workspace_bytes<S>(s, len, e, inner)}) +
          detail::attention_calls_workspace_bytes<S>(1, len, len, s, e, o);
      return (options.causal ? 4 : 3) * detail::heap_bytes<S>(len * e) + 4 * detail::heap_bytes<S>(len * s) +
             (options.causal ? detail::heap_bytes<S>(s * e) : 0) + products;
    };
    if (options.causal) return state + k_lin + chunk(threads);
    // Non-causal: V and Z of every token and K_lin^T stay while the chunks run, in parallel one thread each when
    // there are enough of them.
    const Index chunks = (n + c - 1) / c;
    const Index kept = detail::heap_bytes<S>(n * e) + detail::heap_bytes<S>(n * s) + k_lin;
    const Index first = std::max(this->projection_heap(n, threads), detail::dense_workspace_bytes<S>(s, n, e, threads));
    const Index chunked =
        chunks >= threads && threads > 1 ? std::min<Index>(threads, chunks) * chunk(1) : chunk(threads);
    return state + kept + std::max(first, chunked);
  }

  static detail::StridedView<S> rows_of(const detail::StridedView<S>& m, Index r0, Index count) {
    detail::StridedView<S> v = m;
    v.data = m.row(r0), v.rows = count;
    return v;
  }

  /// Chunk by chunk: U, the heads, ch.quad = the chunk's relu2 attention / c and ch.lin = Q_lin state * lin_scale,
  /// then sink(first row, chunk, threads). v and z are the chunk's rows of V and Z.
  template <class Sink>
  void chunk_terms(const detail::StridedView<S>& x, Index r0, const detail::StridedView<S>& v, const Matrix<S>& z,
                   const Matrix<S>& state, S lin_scale, bool causal, Chunk& ch, int threads, const Sink& sink) const {
    const Index len = v.rows, c = this->c_.chunk;
    this->activate(rows_of(x, r0, len), this->w_u, this->b_u, ch.u, threads);
    ch.q_quad = this->scale_offset(z, 0), ch.k_quad = this->scale_offset(z, 1), ch.q_lin = this->scale_offset(z, 2);
    ch.quad.resize(len, this->c_.expansion);
    AttentionOptions o;
    o.causal = causal, o.threads = threads;
    const S inv_c = S(1) / S(c);
    const auto inverse = [inv_c](Index) { return inv_c; };
    detail::fused_attention(detail::matrix_view(ch.q_quad), detail::matrix_view(ch.k_quad), v,
                            detail::MaskModel<S>(len, len, o, {}), static_cast<S>(1 / std::sqrt(double(z.cols()))), o,
                            detail::AttentionOutput<S>{ch.quad.data(), ch.quad.cols(), nullptr},
                            detail::KeyRange::all(), static_cast<detail::AttentionWorkspace<S>*>(nullptr),
                            detail::SquaredReluWeights<decltype(inverse)>{inverse});
    if (lin_scale == S(0)) {
      ch.lin.setZero(len, this->c_.expansion);
    } else {
      detail::dense(detail::matrix_view(ch.q_lin), state, Matrix<S>(), ch.lin, threads);
      ch.lin *= lin_scale;
    }
    sink(r0, ch, threads);
  }

  template <class Sink>
  void stream(const detail::StridedView<S>& x, const GauOptions& options, int threads, const Sink& sink) const {
    const Index n = x.rows, e = this->c_.expansion, s = this->c_.shared, c = this->c_.chunk;
    const Index chunks = (n + c - 1) / c;
    if (n == 0) return;
    Matrix<S> state = Matrix<S>::Zero(s, e);
    if (!options.causal) {
      // Every chunk needs sum_h K_lin,h^T V_h over the whole sequence: V and Z of every token first (kept), the state
      // as one product over all n tokens, then the chunks in parallel.
      Matrix<S> v, z;
      this->activate(x, this->w_v, this->b_v, v, threads);
      this->activate(x, this->w_z, this->b_z, z, threads);
      const Matrix<S> k_lin_t = this->scale_offset(z, 3).transpose();
      detail::dense(detail::matrix_view(k_lin_t), detail::matrix_view(v), Matrix<S>(), state.data(), e, threads);
      const S inv_n = S(1) / S(n);
      detail::for_each_item(chunks, threads, [] { return Chunk(); }, [&](Index g, int inner, Chunk& ch) {
        const Index r0 = g * c, len = std::min(c, n - r0);
        ch.z = z.middleRows(r0, len);
        chunk_terms(x, r0, rows_of(detail::matrix_view(v), r0, len), ch.z, state, inv_n, false, ch, inner, sink);
      });
      return;
    }
    // Causal: one pass, the state of the chunks before g carried along.
    Chunk ch;
    for (Index g = 0; g < chunks; ++g) {
      const Index r0 = g * c, len = std::min(c, n - r0);
      const detail::StridedView<S> xg = rows_of(x, r0, len);
      this->activate(xg, this->w_v, this->b_v, ch.v, threads);
      this->activate(xg, this->w_z, this->b_z, ch.z, threads);
      chunk_terms(x, r0, detail::matrix_view(ch.v), ch.z, state, g == 0 ? S(0) : S(1) / S(g * c), true, ch, threads,
                  sink);
      if (g + 1 < chunks) {  // state += K_lin,g^T V_g
        const Matrix<S> k_lin_t = this->scale_offset(ch.z, 3).transpose();
        ch.step.resize(s, e);
        detail::dense(detail::matrix_view(k_lin_t), detail::matrix_view(ch.v), Matrix<S>(), ch.step.data(), e,
                      threads);
        state += ch.step;
      }
    }
  }
};

}  // namespace attnkit
