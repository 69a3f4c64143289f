// attnkit: linear attention (Katharopoulos et al. 2020; Shen et al., "Efficient Attention"; Choromanski et al. 2020,
// Performer FAVOR+), SPEC section 3:
//
//     O_i = phi(q_i)^T (sum_j psi(k_j) v_j^T) / (phi(q_i)^T sum_j psi(k_j) + eps)
//
// with the sums over all keys (non-causal) or over j <= i (causal). Cost O(n r d_v) for r features; memory O(r d_v)
// state plus O(chunk r) scratch, never n x m. Three forms compute the same thing:
//  - non-causal: the state S = psi(K)^T V, z = psi(K)^T 1 in one pass over the keys, then one pass over the queries;
//  - causal, chunked: within a chunk of c rows the masked quadratic form tril(phi psi^T), across chunks the running
//    state;
//  - recurrent: LinearAttentionState takes a token (or a block) at a time, O(r d_v) memory whatever the length.
//
// A feature map is a small type with `Index features(Index d) const` (r) and
// `void map(const S* x, Index rows, Index d, FeatureRole role, S* out, Index ld) const`, writing the r features of
// each of `rows` contiguous input rows (row stride d) to out (row stride ld). EluPlusOne, Relu, Taylor and
// PerformerFeatures<S> below are the built-in ones; any type with these two members works.
//
// Denominators. With non-negative features (a map declaring `static constexpr bool kNonNegative = true`: EluPlusOne,
// Relu, Performer) every score is >= 0 and each output row is a weighted mean of value rows, accurate to a few
// rounding units. Features that may be negative (Taylor's 1 + cos, user maps) can cancel: a query opposite to all its
// keys has a true denominator near 0 that rounding can make tiny or negative, and num / den would then be noise of
// any size. For such maps a row whose denominator is within its own rounding error (see drop_rounding_level_rows)
// gets no weight and a zero output, as a fully masked row does. A denominator <= 0 always gives a zero row; a NaN in
// the features gives NaN.
#pragma once

#include <Eigen/QR>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/error.hpp"
#include "core/microkernel.hpp"
#include "core/options.hpp"
#include "core/random.hpp"
#include "core/stores.hpp"
#include "core/threading.hpp"
#include "core/types.hpp"
#include "core/view.hpp"

namespace attnkit {

/// Which side a feature map is applied to: some maps stabilise queries and keys differently.
enum class FeatureRole { kQuery, kKey };

/// \brief Options of linear attention.
struct LinearOptions {
  bool causal = false;  ///< O_i sums over keys j <= i only (requires n == m)
  Index chunk = 0;      ///< rows per chunk; 0 = auto: 16 causal, 16-64 non-causal by the shape (linear_chunk)
  double eps = 1e-6;    ///< added to every denominator; >= 0
  int threads = 0;      ///< 0 = all; results are the same for any thread count
};

/// \brief phi(x) = elu(x) + 1 (Katharopoulos et al.): positive, r = d.
struct EluPlusOne {
  static constexpr bool kNonNegative = true;  ///< features >= 0: scores cannot cancel (see "Denominators" above)
  Index features(Index d) const { return d; }
  template <class S>
  void map(const S* x, Index rows, Index d, FeatureRole, S* out, Index ld) const {
    for (Index i = 0; i < rows; ++i) {  // max(x, 0) + exp(min(x, 0)): one vectorised expression, no branch
      const Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>> xr(x + i * d, d);
      Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>(out + i * ld, d) = xr.max(S(0)) + xr.min(S(0)).exp();
    }
  }
};

/// \brief phi(x) = max(x, 0) + floor: r = d. The floor (default 1e-3) keeps every row's denominator positive.
struct Relu {
  static constexpr bool kNonNegative = true;
  double floor = 1e-3;
  Index features(Index d) const { return d; }
  template <class S>
  void map(const S* x, Index rows, Index d, FeatureRole, S* out, Index ld) const {
    for (Index i = 0; i < rows; ++i) {
      const Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>> xr(x + i * d, d);
      Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>(out + i * ld, d) = xr.max(S(0)) + static_cast<S>(floor);
    }
  }
};

/// \brief Taylor ("1 + cos"): sim(q, k) = 1 + (q / |q|) . (k / |k|), features [1, x / |x|], r = d + 1. A zero row
/// maps to [1, 0, ..., 0].
struct Taylor {
  Index features(Index d) const { return d + 1; }
  template <class S>
  void map(const S* x, Index rows, Index d, FeatureRole, S* out, Index ld) const {
    for (Index i = 0; i < rows; ++i) {
      S norm2 = 0;
      for (Index c = 0; c < d; ++c) norm2 += x[i * d + c] * x[i * d + c];
      const S inv = norm2 > S(0) ? S(1) / std::sqrt(norm2) : S(0);
      out[i * ld] = S(1);
      for (Index c = 0; c < d; ++c) out[i * ld + 1 + c] = x[i * d + c] * inv;
    }
  }
};

/// \brief Performer FAVOR+ positive random features (Choromanski et al. 2020): phi(x) = m^-1/2 exp(W x' - |x'|^2/2)
/// with x' = x d^-1/4, so that E[phi(q) . phi(k)] = exp(q . k / sqrt(d)).
///
/// W (m x d, public via projection()) has N(0, I) rows, or, with `orthogonal`, rows orthogonal within blocks of d
/// whose norms are drawn from the chi distribution with d degrees of freedom. Drawn from `seed` by a generator fixed
/// here (SplitMix64 + Box-Muller), so the same seed gives the same W on every platform; redraw() draws anew.
///
/// Stabilisation (never Inf, whatever the inputs): queries subtract their row's largest exponent (it cancels between
/// numerator and denominator); keys subtract one constant, max(0, max_l |w_l|^2 / 2 - 50), chosen from W alone, which
/// bounds every key feature by e^50 (the exponent w.x' - |x'|^2/2 never exceeds |w|^2/2). Being data-independent, it
/// is the same in every form, so non-causal, chunked and recurrent results agree. Features of very large keys
/// underflow to 0 rather than overflow.
template <class S>
class PerformerFeatures {
 public:
  static constexpr bool kNonNegative = true;
  /// default_features(d) random features for inputs of d columns, seed 0, orthogonal blocks.
  explicit PerformerFeatures(Index d) : PerformerFeatures(d, default_features(d)) {}

  /// m >= 1 random features for inputs of d columns, drawn from `seed`.
  PerformerFeatures(Index d, Index m, std::uint64_t seed = 0, bool orthogonal = true) : d_(d), orthogonal_(orthogonal) {
    if (d < 1) detail::fail("PerformerFeatures", "d must be >= 1, got ", d);
    if (m < 1)
      detail::fail("PerformerFeatures", "m (the number of random features) must be >= 1, got ", m,
                   " (default_features(d) = round(d ln d))");
    m_ = m;
    redraw(seed);
  }

  /// The SPEC's default feature count, round(d ln d), at least 1.
  static Index default_features(Index d) {
    return std::max<Index>(1, Index(std::lround(double(d) * std::log(double(std::max<Index>(d, 1))))));
  }

  /// Draws a new W from `seed`.
  void redraw(std::uint64_t seed) {
    detail::Rng rng(seed);
    Eigen::MatrixXd w(m_, d_);
    for (Index i = 0; i < w.size(); ++i) w.data()[i] = rng.normal();
    if (orthogonal_) {
      for (Index b0 = 0; b0 < m_; b0 += d_) {
        const Index rows = std::min(d_, m_ - b0);
        Eigen::MatrixXd g(d_, d_);
        for (Index i = 0; i < g.size(); ++i) g.data()[i] = rng.normal();
        const Eigen::MatrixXd q = Eigen::HouseholderQR<Eigen::MatrixXd>(g).householderQ();
        for (Index r = 0; r < rows; ++r) {
          double chi2 = 0;  // the norm of an independent Gaussian vector: chi with d degrees of freedom
          for (Index c = 0; c < d_; ++c) chi2 += w(b0 + r, c) * w(b0 + r, c);
          w.row(b0 + r) = std::sqrt(chi2) * q.col(r).transpose();
        }
      }
    }
    w_ = w.cast<S>();
    w_t_ = Matrix<S>::Zero(d_, detail::round_up(m_, detail::KernelShape<S>::kPacket));
    w_t_.leftCols(m_) = w_.transpose();
    const double largest = 0.5 * w.rowwise().squaredNorm().maxCoeff();
    key_shift_ = std::max(0.0, largest - 50.0);
  }

  Index features(Index d) const {
    if (d != d_) detail::fail("PerformerFeatures", "built for d = ", d_, " columns but applied to d = ", d);
    return m_;
  }
  Index dimension() const { return d_; }
  bool orthogonal() const { return orthogonal_; }
  /// W, m x d.
  const Matrix<S>& projection() const { return w_; }
  /// The constant subtracted from every key exponent.
  double key_shift() const { return key_shift_; }

  void map(const S* x, Index rows, Index d, FeatureRole role, S* out, Index ld) const {
    using K = detail::KernelShape<S>;
    features(d);
    const S scale = static_cast<S>(std::pow(double(d), -0.25)), norm = static_cast<S>(1.0 / std::sqrt(double(m_)));
    // Scratch that only grows: calls come a few rows at a time, with a shorter last call.
    thread_local Vector<S> scaled, proj;
    if (scaled.size() < rows * d) scaled.resize(rows * d);
    for (Index i = 0; i < rows * d; ++i) scaled[i] = x[i] * scale;
    const Index m_pad = detail::round_up(m_, K::kPacket);
    if (proj.size() < rows * m_pad) proj.resize(rows * m_pad);
    // proj = x' W^T on the core micro-kernel (W^T row-major, read in place).
    detail::tile_product<S, false>(scaled.data(), d, rows, detail::RhsPanels<S>{w_t_.data(), K::kCols, m_pad}, d, m_pad,
                                   proj.data(), m_pad, nullptr);
    for (Index i = 0; i < rows; ++i) {
      const S* p = proj.data() + i * m_pad;
      S shift;
      if (role == FeatureRole::kQuery) {
        shift = *std::max_element(p, p + m_);
      } else {
        S norm2 = 0;
        for (Index c = 0; c < d; ++c) norm2 += scaled[i * d + c] * scaled[i * d + c];
        shift = norm2 / S(2) + static_cast<S>(key_shift_);
      }
      Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>(out + i * ld, m_) =
          norm * (Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, 1>>(p, m_) - shift).exp();
    }
  }

 private:
  Index d_ = 0, m_ = 0;
  bool orthogonal_ = true;
  Matrix<S> w_, w_t_;
  double key_shift_ = 0;
};

namespace detail {

/// Rows [r0, r0 + rows) of x packed contiguously (row stride x.cols).
template <class S>
void pack_input_rows(const StridedView<S>& x, Index r0, Index rows, S* dst) {
  for (Index i = 0; i < rows; ++i) x.copy_row(r0 + i, dst + i * x.cols);
}

/// C (rows x cols) = [C +] A (rows x depth, row stride lda) B (depth x cols, row stride ldb), cols a multiple of the
/// packet size, on the core micro-kernel: deterministic, and the same for any thread count. Steps `ahead`.
template <class S>
void small_gemm(const S* a, Index lda, Index rows, const S* b, Index ldb, Index depth, Index cols, S* c, Index ldc,
                bool accumulate, Lookahead* ahead = nullptr) {
  using K = KernelShape<S>;
  thread_local Vector<S> ones;
  if (accumulate && ones.size() < rows) ones = Vector<S>::Ones(rows);
  tile_product<S, false>(a, lda, rows, RhsPanels<S>{b, K::kCols, ldb}, depth, cols, c, ldc,
                         accumulate ? ones.data() : nullptr, {}, ahead);
}

/// Whether Map declares `static constexpr bool kNonNegative = true` (its features are never negative).
template <class Map, class = void>
struct NonNegativeFeatures : std::false_type {};
template <class Map>
struct NonNegativeFeatures<Map, std::void_t<decltype(Map::kNonNegative)>> : std::bool_constant<Map::kNonNegative> {};

/// The linear-attention state of one sequence: S = sum_j psi(k_j) v_j^T (r x dv, padded), z = sum_j psi(k_j), and,
/// for maps whose features may be negative, z_abs = sum_j |psi(k_j)| and the number of keys (the rounding guard).
template <class S>
struct LinearState {
  Matrix<S> s;      // r_pad x dv_pad
  Vector<S> z;      // r_pad
  Vector<S> z_abs;  // r_pad
  Index keys = 0;
  void reset(Index r_pad, Index dv_pad) {
    s = Matrix<S>::Zero(r_pad, dv_pad);
    z = Vector<S>::Zero(r_pad);
    z_abs = Vector<S>::Zero(r_pad);
    keys = 0;
  }
  void add(const LinearState& other) { s += other.s, z += other.z, z_abs += other.z_abs, keys += other.keys; }
};

/// Scratch of one chunk: features, transposed key features, values, products; and the next chunk's rows to fetch
/// while this one computes. Kept per thread between calls (CachedScratch): allocated afresh by every call, its pages
/// cost a non-causal call at n = 1024 / 4096 / 65536 1.18-1.24 / 1.07-1.10 / 1.0-1.05x the time (elu+1, one thread).
/// Every user sizes and fills each buffer before reading it.
template <class S>
struct LinearScratch {
  Matrix<S> x, phi, psi, psi_t, values, num, scores;
  Vector<S> den, seen_abs;
  Lookahead ahead;
};

template <class S>
using CachedLinearScratch = CachedScratch<LinearScratch<S>>;  // kept per thread between calls

/// Shapes shared by the passes of one call, how it writes its output (streaming: past the caches), and where its
/// Lookahead puts the next chunk's rows.
struct LinearShape {
  Index d, dv, r, r_pad, dv_pad;
  bool stream_out = false;
  Lookahead::Into fetch = Lookahead::Into::kL2;
};

/// The next chunk's rows go into L1 when the map has at most 2 d features, into L2 (as before) for wider maps.
/// Measured on the Zen 4 machine of 2026-12-07 (bench/README), one thread, 4 KiB pages: into L1 (prefetcht0), elu+1,
/// relu, Taylor and Efficient Attention grew 16.3-17.3x from n = 4096 to 65536, against 16.3-17.7 into L2
/// (prefetcht1), with the same times at 4096 (in 2 MiB pages 16.2-16.4 either way). A wider map's chunk of features
/// (Performer: 266 a row at d = 64, 68 KiB a chunk) leaves L1 no room for the next chunk's rows; Performer grew
/// 16.0-16.6 into L2 and stays there.
template <class S, class Map>
LinearShape linear_shape(const Map& map, Index d, Index dv) {
  using K = KernelShape<S>;
  const Index r = map.features(d);
  LinearShape sh{d, dv, r, round_up(r, K::kPacket), round_up(dv, K::kPacket)};
  sh.fetch = r <= 2 * d ? Lookahead::Into::kL1 : Lookahead::Into::kL2;
  return sh;
}

/// Rows per call of a feature map, four micro-kernel strips: the Lookahead steps between calls (a map's rows are
/// independent), and a map built on a product (Performer) still reuses its weights across them (12 rows measured 7%
/// slower for it).
template <class S>
constexpr Index kMapRows = 4 * KernelShape<S>::kRows;

/// The Lookahead steps of one chunk of `rows` rows: its feature-map calls (for keys and for queries, causal) and the
/// micro-kernel calls of its products.
template <class S>
Index chunk_steps(const LinearShape& sh, Index rows, bool keys, bool queries, bool causal) {
  const Index map_calls = (rows + kMapRows<S> - 1) / kMapRows<S>;
  Index steps = 0;
  if (keys) steps += map_calls + tile_steps<S>(sh.r_pad, sh.dv_pad);
  if (queries) steps += map_calls + tile_steps<S>(rows, sh.dv_pad);
  if (causal) steps += tile_steps<S>(rows, round_up(rows, KernelShape<S>::kPacket)) + tile_steps<S>(rows, sh.dv_pad);
  return steps;
}

/// Queues rows [r0, r0 + rows) of each view (the next chunk's) in w.ahead, paced over `steps`.
template <class S>
void look_ahead(LinearScratch<S>& w, const LinearShape& sh, std::initializer_list<StridedView<S>> views, Index r0,
                Index rows, Index steps) {
  w.ahead.clear();
  w.ahead.target(sh.fetch);
  for (const StridedView<S>& x : views) w.ahead.add(x, r0, std::min(x.rows, r0 + rows));
  w.ahead.pace(steps);
}

/// Features of rows [r0, r0 + rows) of x into f (rows x r_pad, zero padded), kMapRows rows per map call.
template <class S, class Map>
void chunk_features(const Map& map, const StridedView<S>& x, Index r0, Index rows, FeatureRole role,
                    const LinearShape& sh, Matrix<S>& buffer, Matrix<S>& f, Lookahead* ahead = nullptr) {
  buffer.resize(rows, sh.d);
  pack_input_rows(x, r0, rows, buffer.data());
  f.resize(rows, sh.r_pad);
  if (sh.r_pad > sh.r) f.rightCols(sh.r_pad - sh.r).setZero();
  for (Index i = 0; i < rows; i += kMapRows<S>) {
    if (ahead) ahead->step();
    map.map(buffer.data() + i * sh.d, std::min(kMapRows<S>, rows - i), sh.d, role, f.data() + i * sh.r_pad, sh.r_pad);
  }
}

/// Key features psi (rows x r_pad) and psi^T (r_pad x rows, padded to whole packets of rows) and the values
/// (rows x dv_pad) of keys [j0, j0 + rows), into the scratch.
template <class S, class Map>
void prepare_keys(const Map& map, const StridedView<S>& k, const StridedView<S>& v, Index j0, Index rows,
                  const LinearShape& sh, LinearScratch<S>& w) {
  chunk_features(map, k, j0, rows, FeatureRole::kKey, sh, w.x, w.psi, &w.ahead);
  const Index cols = round_up(rows, KernelShape<S>::kPacket);
  if (cols <= KernelShape<S>::kCols) {
    // One panel of pack_transposed is psi^T row-major, its rows cols apart: in-register transposes, where Eigen's
    // transpose moved two scalars at a time.
    w.psi_t.resize(sh.r_pad, cols);
    pack_transposed(StridedView<S>{w.psi.data(), rows, sh.r_pad, sh.r_pad, 1}, 0, rows, cols, w.psi_t.data());
  } else {
    w.psi_t = Matrix<S>::Zero(sh.r_pad, cols);
    w.psi_t.leftCols(rows) = w.psi.transpose();
  }
  w.values.resize(rows, sh.dv_pad);
  for (Index i = 0; i < rows; ++i) {
    S* dst = w.values.data() + i * sh.dv_pad;
    v.copy_row(j0 + i, dst);
    std::fill(dst + sh.dv, dst + sh.dv_pad, S(0));
  }
}

/// Adds the prepared keys to the state: S += psi^T V, z += psi^T 1 (and the guard's z_abs and key count).
template <class Map, class S>
void absorb_keys(const LinearShape& sh, LinearScratch<S>& w, LinearState<S>& state) {
  const Index rows = w.psi.rows();
  small_gemm(w.psi_t.data(), w.psi_t.cols(), sh.r_pad, w.values.data(), sh.dv_pad, rows, sh.dv_pad, state.s.data(),
             sh.dv_pad, true, &w.ahead);
  state.z += w.psi.colwise().sum().transpose();
  if constexpr (!NonNegativeFeatures<Map>::value) state.z_abs += w.psi.cwiseAbs().colwise().sum().transpose();
  state.keys += rows;
}

/// out rows = num / den row by row, den = phi . z (+ extra) + eps. A row whose denominator is <= 0 has no weight
/// and is zero; a NaN denominator stays NaN.
template <class S>
void write_normalised(const Matrix<S>& num, const Vector<S>& den, Index dv, S* out, Index out_stride, bool streaming) {
  for (Index i = 0; i < num.rows(); ++i) {
    const S inv = den[i] > S(0) ? S(1) / den[i] : den[i] <= S(0) ? S(0) : den[i];
    store_scaled(num.data() + i * num.cols(), inv, dv, out + i * out_stride, streaming);
  }
}

/// The rounding guard for maps whose features may be negative (Taylor, user maps). A score phi . psi is then
/// computed with an error of about a rounding unit times |phi| . |psi|, so a denominator that is no larger than its
/// summed errors, 2 u (r + c + keys / c + 4) |phi_i| . sum_j |psi_j| (sums over a chunk of c keys, then across
/// chunks), carries no weight that can be told from zero: it can even come out negative. Such a row (for Taylor, a
/// query opposite to all its keys, where 1 + cos cancels) is given no weight, like a fully masked row, instead of
/// num / den with both at the rounding level. Marks it with den = -inf (the caller's write_normalised then writes 0).
template <class S>
void drop_rounding_level_rows(const LinearShape& sh, const LinearState<S>& state, bool with_chunk_keys,
                              LinearScratch<S>& w, Index c) {
  const Index rows = w.phi.rows();
  const Index keys = state.keys + (with_chunk_keys ? w.psi.rows() : 0);
  const S units = S(2) * std::numeric_limits<S>::epsilon() * S(sh.r + c + keys / std::max<Index>(c, 1) + 4);
  // |phi_i| . sum_j |psi_j| over the row's keys: the state's, plus the chunk's own keys j <= i (a running sum).
  Vector<S>& seen = w.seen_abs;
  seen = state.z_abs;
  for (Index i = 0; i < rows; ++i) {
    if (with_chunk_keys) seen += w.psi.row(i).cwiseAbs().transpose();
    const S bound = w.phi.row(i).cwiseAbs().dot(seen.transpose());
    if (w.den[i] <= units * bound && bound > S(0)) w.den[i] = -std::numeric_limits<S>::infinity();
  }
}

/// num += tril(scores) V for the chunk's own keys. In the product, row i meets the values of the later keys j > i with
/// a zero score, and 0 * NaN is NaN: a NaN or Inf value would reach earlier rows. Value rows that are not finite
/// (rare; one vectorised sum per chunk finds them) are left out of the product and added to the rows j.. that see
/// them.
template <class S>
void masked_chunk_product(LinearScratch<S>& w, Index rows, Index dv_pad) {
  const Index cols = w.scores.cols();
  if (std::isfinite(w.values.sum())) {  // every value finite (a huge but finite sum only takes the slow path)
    small_gemm(w.scores.data(), cols, rows, w.values.data(), dv_pad, rows, dv_pad, w.num.data(), dv_pad, true,
               &w.ahead);
    return;
  }
  Matrix<S> finite = w.values;
  std::vector<Index> rows_out;
  for (Index j = 0; j < rows; ++j)
    if (!w.values.row(j).allFinite()) finite.row(j).setZero(), rows_out.push_back(j);
  small_gemm(w.scores.data(), cols, rows, finite.data(), dv_pad, rows, dv_pad, w.num.data(), dv_pad, true);
  for (const Index j : rows_out)
    for (Index i = j; i < rows; ++i) w.num.row(i) += w.scores(i, j) * w.values.row(j);
}

/// Queries [i0, i0 + rows) against a state (all earlier keys), plus, for causal chunks, the prepared keys of the same
/// chunk (j <= i within the chunk) by the masked quadratic form tril(phi psi^T).
template <class S, class Map>
void chunk_output(const Map& map, const StridedView<S>& q, Index i0, Index rows, const LinearShape& sh,
                  const LinearState<S>& state, bool with_chunk_keys, Index c, S eps, LinearScratch<S>& w, S* out,
                  Index out_stride) {
  chunk_features(map, q, i0, rows, FeatureRole::kQuery, sh, w.x, w.phi, &w.ahead);
  w.num.resize(rows, sh.dv_pad);
  small_gemm(w.phi.data(), sh.r_pad, rows, state.s.data(), sh.dv_pad, sh.r_pad, sh.dv_pad, w.num.data(), sh.dv_pad,
             false, &w.ahead);
  // den = phi z one row at a time: Eigen's matrix-vector product blocks rows by 8, 4, 2 and 1, and with scalar
  // packets and -ffp-contract=fast each block's loop was contracted differently, so a row's denominator (and so its
  // output) changed in the last bits with its place in the chunk, i.e. with the rows it was called with.
  Vector<S>& den = w.den;
  den.resize(rows);
  for (Index i = 0; i < rows; ++i) den[i] = w.phi.row(i).dot(state.z);
  if (with_chunk_keys) {
    const Index cols = w.psi_t.cols();
    w.scores.resize(rows, cols);
    small_gemm(w.phi.data(), sh.r_pad, rows, w.psi_t.data(), cols, sh.r_pad, cols, w.scores.data(), cols, false,
               &w.ahead);
    for (Index i = 0; i < rows; ++i) {
      for (Index j = i + 1; j < cols; ++j) w.scores(i, j) = S(0);  // causal inside the chunk
      den[i] += w.scores.row(i).head(i + 1).sum();
    }
    masked_chunk_product(w, rows, sh.dv_pad);
  }
  if constexpr (!NonNegativeFeatures<Map>::value) drop_rounding_level_rows(sh, state, with_chunk_keys, w, c);
  den.array() += eps;
  write_normalised(w.num, den, sh.dv, out, out_stride, sh.stream_out);
}

/// Causal linear attention of rows [0, n) continuing `state` (keys before row 0), chunk by chunk: the masked quadratic
/// form inside a chunk of c rows, the running state across chunks. Leaves the state after the last row.
template <class S, class Map>
void causal_chunks(const Map& map, const StridedView<S>& q, const StridedView<S>& k, const StridedView<S>& v,
                   const LinearShape& sh, Index c, S eps, LinearState<S>& state, LinearScratch<S>& w, S* out,
                   Index out_stride) {
  for (Index i0 = 0; i0 < q.rows; i0 += c) {
    const Index rows = std::min(c, q.rows - i0);
    look_ahead(w, sh, {q, k, v}, i0 + rows, c, chunk_steps<S>(sh, rows, true, true, true));
    prepare_keys(map, k, v, i0, rows, sh, w);
    chunk_output(map, q, i0, rows, sh, state, true, c, eps, w, out + i0 * out_stride, out_stride);
    absorb_keys<Map>(sh, w, state);
  }
}

inline void check_linear_options(const char* where, const LinearOptions& o) {
  if (o.chunk < 0) fail(where, "options.chunk must be >= 0 (0 = auto), got ", o.chunk);
  check_non_negative_finite(where, "options.eps", o.eps);
  if (o.threads < 0) fail(where, "options.threads must be >= 0 (0 = all), got ", o.threads);
}

/// Bounds of the default non-causal chunk: a key chunk's Lookahead issues at most kChunkFetchLines cache lines per
/// step, and its product psi^T V has at least kChunkProductMin multiply-adds (r_pad x d_v,pad x c).
constexpr Index kChunkFetchLines = 16, kChunkProductMin = Index(1) << 16;

/// Rows per chunk: options.chunk, else by measurement (bench/README.md). Causal: 16, as its in-chunk quadratic part
/// grows with the chunk. Non-causal: the largest of 64, 32 and 16 rows whose key pass fetches the next chunk's key and
/// value rows at most kChunkFetchLines lines per Lookahead step (a core tracks only about 16 misses at once; a longer
/// burst of prefetches waits for the earlier ones, and past the caches each takes a memory latency), raised to the
/// smallest whose product psi^T V still has kChunkProductMin multiply-adds (a shorter one spends the chunk on fixed
/// costs). At d = 64 that is 16 rows for elu+1, relu, Taylor and Efficient Attention, which took 0.85-0.95x the time
/// of 64 at n = 65536 (0.94-1.01x at 4096); 64 for Performer's 266 features; 32 at d = 128; 64 at d = 32.
template <class S>
Index linear_chunk(const LinearOptions& o, const LinearShape& sh) {
  if (o.chunk > 0) return o.chunk;
  if (o.causal) return 16;
  const Index row_lines = Lookahead::lines(1, sh.d * Index(sizeof(S))) + Lookahead::lines(1, sh.dv * Index(sizeof(S)));
  Index c = 64;
  while (c > 16 && c * row_lines > kChunkFetchLines * chunk_steps<S>(sh, c, true, false, false)) c /= 2;
  while (c < 64 && sh.r_pad * sh.dv_pad * c < kChunkProductMin) c *= 2;
  return c;
}

/// Keys are split into a fixed number of parts, whatever the thread count, and their states summed in order.
constexpr Index kLinearKeyParts = 8;

/// The non-causal query pass: chunks of c rows, body(i0, rows, scratch) for each, in runs of consecutive chunks (a few
/// per worker, so each fetches its next chunk ahead: the scratch's Lookahead has it queued when body runs).
template <class S, class Body>
void query_runs(const LinearShape& sh, const StridedView<S>& q, Index c, int threads, const Body& body) {
  const Index n = q.rows, chunks = (n + c - 1) / c;
  const Index run = std::clamp<Index>(chunks / (4 * resolve_threads(threads)), 1, 16), runs = (chunks + run - 1) / run;
  parallel_for(
      runs, threads, [] { return CachedLinearScratch<S>(); },
      [&](Index g, CachedLinearScratch<S>& cached) {
        LinearScratch<S>& w = cached.get();
        const Index end = std::min(chunks, (g + 1) * run);
        for (Index t = g * run; t < end; ++t) {
          const Index rows = std::min(c, n - t * c);
          look_ahead(w, sh, {q}, t + 1 < end ? (t + 1) * c : n, c, chunk_steps<S>(sh, rows, false, true, false));
          body(t * c, rows, w);
        }
        if (sh.stream_out) stream_fence();
      });
}

template <class S, class Map>
void linear_into(const char* where, const Map& map, const StridedView<S>& q, const StridedView<S>& k,
                 const StridedView<S>& v, const LinearOptions& o, S* out, Index out_stride) {
  const Index n = q.rows, m = k.rows;
  LinearShape sh = linear_shape<S>(map, q.cols, v.cols);
  sh.stream_out = streams_past_cache<S>(n, m, q.cols, v.cols);
  if (sh.r < 1) fail(where, "the feature map gives r = ", sh.r, " features; it must give at least 1");
  const Index c = linear_chunk<S>(o, sh);
  const S eps = static_cast<S>(o.eps);
  if (o.causal) {
    LinearState<S> state;
    state.reset(sh.r_pad, sh.dv_pad);
    CachedLinearScratch<S> cached;
    causal_chunks(map, q, k, v, sh, c, eps, state, cached.get(), out, out_stride);
    if (sh.stream_out) stream_fence();
    return;
  }
  // Non-causal: the keys' state in kLinearKeyParts fixed parts (in parallel), summed in order; then the queries.
  const Index chunks = (m + c - 1) / c, parts = std::min(kLinearKeyParts, std::max<Index>(chunks, 1));
  std::vector<LinearState<S>> partial(static_cast<size_t>(parts));
  parallel_for(
      parts, o.threads, [] { return CachedLinearScratch<S>(); },
      [&](Index p, CachedLinearScratch<S>& cached) {
        LinearScratch<S>& w = cached.get();
        LinearState<S>& state = partial[size_t(p)];
        state.reset(sh.r_pad, sh.dv_pad);
        const Index end = (p + 1) * chunks / parts;
        for (Index t = p * chunks / parts; t < end; ++t) {
          const Index rows = std::min(c, m - t * c);
          look_ahead(w, sh, {k, v}, t + 1 < end ? (t + 1) * c : m, c, chunk_steps<S>(sh, rows, true, false, false));
          prepare_keys(map, k, v, t * c, rows, sh, w);
          absorb_keys<Map>(sh, w, state);
        }
      });
  LinearState<S> total = partial[0];
  for (Index p = 1; p < parts; ++p) total.add(partial[size_t(p)]);
  query_runs(sh, q, c, o.threads, [&](Index i0, Index rows, LinearScratch<S>& w) {
    chunk_output(map, q, i0, rows, sh, total, false, c, eps, w, out + i0 * out_stride, out_stride);
  });
}

template <class DQ, class DK, class DV>
void check_linear_call(const char* where, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                       const Eigen::MatrixBase<DV>& v, const LinearOptions& o) {
  using S = typename DQ::Scalar;
  static_check_scalar<S>();
  static_assert(std::is_same_v<S, typename DK::Scalar> && std::is_same_v<S, typename DV::Scalar>,
                "q, k and v must share one scalar type");
  check_attention_shapes(where, q.rows(), q.cols(), k.rows(), k.cols(), v.rows(), v.cols());
  if (o.causal && q.rows() != k.rows())
    fail(where, "causal linear attention needs n == m (use LinearAttentionState to continue a sequence); q is ",
         shape_str(q.rows(), q.cols()), ", k is ", shape_str(k.rows(), k.cols()));
  check_linear_options(where, o);
}

}  // namespace detail

/// \brief Linear attention with feature map `map` (SPEC section 3), written into a caller's n x d_v `out`.
/// \throws attnkit::Error on mismatched shapes, causal with n != m, or invalid options.
template <class DQ, class DK, class DV, class Map>
void linear_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
                      Eigen::Ref<Matrix<typename DQ::Scalar>> out, const Map& map, const LinearOptions& options = {}) {
  constexpr const char* kWhere = "linear_attention";
  detail::check_linear_call(kWhere, q, k, v, options);
  detail::check_out_shape(kWhere, out.rows(), out.cols(), q.rows(), v.cols());
  const detail::ViewOf<DQ> qv(q);
  const detail::ViewOf<DK> kv(k);
  const detail::ViewOf<DV> vv(v);
  detail::linear_into(kWhere, map, qv.view(), kv.view(), vv.view(), options, out.data(), out.outerStride());
}

/// \brief Linear attention, returning the n x d_v output. Cost O(n r d_v); memory O(r d_v + chunk r), never n x m.
template <class DQ, class DK, class DV, class Map>
Matrix<typename DQ::Scalar> linear_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                             const Eigen::MatrixBase<DV>& v, const Map& map,
                                             const LinearOptions& options = {}) {
  Matrix<typename DQ::Scalar> out(q.rows(), v.cols());
  linear_attention(q, k, v, out, map, options);
  return out;
}

namespace detail {

/// Upper bounds on the heap of one LinearState (r x d_v plus 2 r) and of one LinearScratch for chunks of c rows
/// (inputs, features, values, products and the c x c in-chunk scores), each buffer with its allocation overhead.
template <class S>
std::pair<Index, Index> linear_heap(const LinearShape& sh, Index c) {
  const Index c_pad = round_up(c, KernelShape<S>::kPacket);
  const Index state = heap_bytes<S>(sh.r_pad * sh.dv_pad) + 2 * heap_bytes<S>(sh.r_pad);
  const Index scratch = heap_bytes<S>(c * sh.d) + 4 * heap_bytes<S>(c * sh.r_pad) + heap_bytes<S>(sh.r_pad * c_pad) +
                        2 * heap_bytes<S>(c * sh.dv_pad) + 2 * heap_bytes<S>(c * c_pad) + 3 * heap_bytes<S>(c);
  return {state, scratch};
}

}  // namespace detail

/// \brief An upper bound on the heap one linear_attention call with a caller-provided `out` allocates, for r =
/// map.features(d) features and chunks of c rows: the state (r x d_v plus 2 r) and one chunk's scratch (inputs,
/// features, values, products and the c x c in-chunk scores: O(c (d + r + d_v + c) + r d_v)); non-causal, the state
/// of each of up to 8 key parts plus one scratch per worker thread. Each thread keeps its chunk scratch between calls
/// (a later call that fits allocates only the states); release_cached_workspaces() frees it. Independent of n and m;
/// never n x m. Whatever the feature map allocates itself is not included (PerformerFeatures keeps, per thread,
/// scratch for the largest call it has served: the map is called 24 rows at a time, 16 with scalar packets, so 24 x
/// (d + features)).
template <class S, class Map>
Index linear_attention_workspace_bytes(Index n, Index m, Index d, Index d_v, const Map& map,
                                       const LinearOptions& options = {}) {
  constexpr const char* kWhere = "linear_attention_workspace_bytes";
  detail::check_sizes(kWhere, n, m, d, d_v);
  detail::check_linear_options(kWhere, options);
  const detail::LinearShape sh = detail::linear_shape<S>(map, d, d_v);
  const Index c = detail::linear_chunk<S>(options, sh);
  const auto [state, scratch] = detail::linear_heap<S>(sh, c);
  if (options.causal) return state + scratch;
  const Index chunks = (m + c - 1) / c, parts = std::min(detail::kLinearKeyParts, std::max<Index>(chunks, 1));
  const Index threads = detail::resolve_threads(options.threads);
  return (parts + 1) * state + threads * scratch + detail::heap_bytes<detail::LinearState<S>>(parts);
}

/// \brief The recurrent form of causal linear attention: the state of one sequence, fed a token or a block of tokens
/// at a time. O(r d_v) memory whatever the length; feeding a sequence in any blocks equals causal linear_attention.
template <class S, class Map>
class LinearAttentionState {
 public:
  /// options.eps and options.chunk apply (a block longer than a chunk is processed chunk by chunk).
  LinearAttentionState(Map map, Index d, Index dv, const LinearOptions& options = {})
      : map_(std::move(map)), d_(d), dv_(dv), eps_(options.eps) {
    constexpr const char* kWhere = "LinearAttentionState";
    if (d < 1 || dv < 0) detail::fail(kWhere, "d must be >= 1 and d_v >= 0, got d = ", d, ", d_v = ", dv);
    detail::check_linear_options(kWhere, options);
    shape_ = detail::linear_shape<S>(map_, d, dv);
    chunk_ = detail::linear_chunk<S>(causal(options), shape_);
    reset();
  }

  /// Forgets every token.
  void reset() {
    state_.reset(shape_.r_pad, shape_.dv_pad);
    length_ = 0;
  }
  Index length() const { return length_; }

  /// \brief An upper bound on the heap of one step of t tokens: its t x d_v result and, while the state's own
  /// scratch grows to the largest block it has seen (at most one chunk), that scratch. Independent of length().
  Index step_workspace_bytes(Index t) const {
    if (t < 0) detail::fail("LinearAttentionState::step_workspace_bytes", "t must be >= 0, got ", t);
    return detail::heap_bytes<S>(t * dv_) +
           detail::linear_heap<S>(shape_, std::max<Index>(std::min(t, chunk_), 1)).second;
  }

  /// Appends t tokens (rows of k and v) and returns the outputs of their queries (t x d_v): row i attends to every
  /// earlier token and to tokens 0..i of this block.
  template <class DQ, class DK, class DV>
  Matrix<S> step(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v) {
    constexpr const char* kWhere = "LinearAttentionState::step";
    if (q.cols() != d_ || k.cols() != d_ || v.cols() != dv_ || k.rows() != q.rows() || v.rows() != q.rows())
      detail::fail(kWhere, "expects t x d queries and keys and t x d_v values with d = ", d_, ", d_v = ", dv_,
                   "; got q ", detail::shape_str(q.rows(), q.cols()), ", k ", detail::shape_str(k.rows(), k.cols()),
                   ", v ", detail::shape_str(v.rows(), v.cols()));
    const detail::ViewOf<DQ> qv(q);
    const detail::ViewOf<DK> kv(k);
    const detail::ViewOf<DV> vv(v);
    Matrix<S> out(q.rows(), dv_);
    if (q.rows() == 0) return out;
    detail::causal_chunks(map_, qv.view(), kv.view(), vv.view(), shape_, chunk_, static_cast<S>(eps_), state_, scratch_,
                          out.data(), dv_);
    length_ += q.rows();
    return out;
  }

 private:
  static LinearOptions causal(LinearOptions o) {
    o.causal = true;
    return o;
  }

  Map map_;
  Index d_, dv_;
  double eps_;
  Index chunk_ = 0;  // linear_chunk's, set by the constructor
  detail::LinearShape shape_{};
  detail::LinearState<S> state_;
  detail::LinearScratch<S> scratch_;
  Index length_ = 0;
};

namespace detail {

/// Efficient Attention's key features: exp(k - shift), the shift being the running column max (0 until a column has
/// a finite key).
template <class S>
struct ColumnExp {
  static constexpr bool kNonNegative = true;
  const S* col_max;
  Index features(Index d) const { return d; }
  void map(const S* x, Index rows, Index d, FeatureRole, S* out, Index ld) const {
    const Eigen::Map<const Eigen::Array<S, 1, Eigen::Dynamic>> shift(col_max, d);
    for (Index i = 0; i < rows; ++i)
      Eigen::Map<Eigen::Array<S, 1, Eigen::Dynamic>>(out + i * ld, d) =
          (Eigen::Map<const Eigen::Array<S, 1, Eigen::Dynamic>>(x + i * d, d) - shift).exp();
  }
};

/// Efficient Attention's query features: softmax over d of each row.
struct RowSoftmax;

/// Raises Efficient Attention's running column maxima over keys [j0, j0 + rows), and rescales the state's rows whose
/// maximum rose (row t of S and z_t by exp(old - new)): the state always holds sum_j exp(k_j - max) v_j^T over the
/// keys so far, in one pass over the keys. `shift` is what ColumnExp subtracts: the max, or 0 while it is -inf (a
/// column with no finite key yet, whose features are then 0, not NaN).
template <class S>
void raise_column_max(const StridedView<S>& k, Index j0, Index rows, Vector<S>& col_max, Vector<S>& shift,
                      Vector<S>& chunk, LinearState<S>& state) {
  using Row = Eigen::Array<S, 1, Eigen::Dynamic>;
  const Index d = k.cols;
  chunk.setConstant(d, -std::numeric_limits<S>::infinity());
  for (Index j = j0; j < j0 + rows; ++j) {
    if (k.row_contiguous())
      chunk.array() = chunk.array().max(Eigen::Map<const Row>(k.row(j), d).transpose());
    else
      for (Index t = 0; t < d; ++t) chunk[t] = std::max(chunk[t], k(j, t));
  }
  for (Index t = 0; t < d; ++t) {
    if (!(chunk[t] > col_max[t])) continue;
    if (col_max[t] > -std::numeric_limits<S>::infinity()) {
      const S factor = std::exp(shift[t] - chunk[t]);
      state.s.row(t) *= factor;
      state.z[t] *= factor;
    }
    col_max[t] = chunk[t];
    shift[t] = chunk[t];
  }
}

struct RowSoftmax {
  Index features(Index d) const { return d; }
  template <class S>
  void map(const S* x, Index rows, Index d, FeatureRole, S* out, Index ld) const {
    for (Index i = 0; i < rows; ++i) {
      const Eigen::Map<const Eigen::Array<S, 1, Eigen::Dynamic>> xr(x + i * d, d);
      Eigen::Map<Eigen::Array<S, 1, Eigen::Dynamic>> o(out + i * ld, d);
      o = (xr - xr.maxCoeff()).exp();
      o /= o.sum();
    }
  }
};

}  // namespace detail

/// \brief Efficient Attention (Shen et al.): softmax over d of each query row, softmax over the n keys of each key
/// column, O = softmax_d(Q) (softmax_n(K)^T V). Each row of the implied n x m attention matrix sums to 1; there is no
/// denominator. Cost O((n + m) d d_v), memory O(d d_v + chunk d). Non-causal only: options.causal throws.
template <class DQ, class DK, class DV>
void efficient_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
                         Eigen::Ref<Matrix<typename DQ::Scalar>> out, const LinearOptions& options = {}) {
  using S = typename DQ::Scalar;
  constexpr const char* kWhere = "efficient_attention";
  if (options.causal)
    detail::fail(kWhere, "Efficient Attention normalises each key column over all n keys, so it has no causal form");
  detail::check_linear_call(kWhere, q, k, v, options);
  detail::check_out_shape(kWhere, out.rows(), out.cols(), q.rows(), v.cols());
  const detail::ViewOf<DQ> qv(q);
  const detail::ViewOf<DK> kv(k);
  const detail::ViewOf<DV> vv(v);
  const Index n = q.rows(), m = k.rows(), d = q.cols();
  Vector<S> col_max = Vector<S>::Constant(d, -std::numeric_limits<S>::infinity()), shift = Vector<S>::Zero(d),
            chunk_max(d);
  const detail::ColumnExp<S> keys{shift.data()};
  detail::LinearShape sh = detail::linear_shape<S>(keys, d, v.cols());
  const Index c = detail::linear_chunk<S>(options, sh);
  sh.stream_out = detail::streams_past_cache<S>(n, m, d, v.cols());
  detail::LinearState<S> state;  // S = exp(K - max)^T V, z = column sums; then row l of S divided by z_l
  state.reset(sh.r_pad, sh.dv_pad);
  {  // the key pass; the query pass takes the thread's cached scratch again
    detail::CachedLinearScratch<S> cached;
    detail::LinearScratch<S>& w = cached.get();
    for (Index j0 = 0; j0 < m; j0 += c) {
      const Index rows = std::min(c, m - j0);
      detail::look_ahead(w, sh, {kv.view(), vv.view()}, j0 + c, c,
                         detail::chunk_steps<S>(sh, rows, true, false, false));
      detail::raise_column_max(kv.view(), j0, rows, col_max, shift, chunk_max, state);
      detail::prepare_keys(keys, kv.view(), vv.view(), j0, rows, sh, w);
      detail::absorb_keys<detail::ColumnExp<S>>(sh, w, state);
    }
  }
  for (Index t = 0; t < d; ++t)
    if (state.z[t] > S(0)) state.s.row(t) /= state.z[t];
  detail::query_runs(sh, qv.view(), c, options.threads, [&](Index i0, Index rows, detail::LinearScratch<S>& w) {
    detail::chunk_features(detail::RowSoftmax{}, qv.view(), i0, rows, FeatureRole::kQuery, sh, w.x, w.phi, &w.ahead);
    w.num.resize(rows, sh.dv_pad);
    detail::small_gemm(w.phi.data(), sh.r_pad, rows, state.s.data(), sh.dv_pad, sh.r_pad, sh.dv_pad, w.num.data(),
                       sh.dv_pad, false, &w.ahead);
    for (Index i = 0; i < rows; ++i)
      detail::store_scaled(w.num.data() + i * sh.dv_pad, S(1), v.cols(), out.data() + (i0 + i) * out.outerStride(),
                           sh.stream_out);
  });
}

/// \brief An upper bound on the heap of one efficient_attention call with a caller-provided `out`: the d x d_v state,
/// the running column maxima, the keys' chunk scratch and one query chunk's scratch per worker thread (chunks of
/// options.chunk rows, or linear_chunk's default). Independent of n and m.
template <class S>
Index efficient_attention_workspace_bytes(Index n, Index m, Index d, Index d_v, const LinearOptions& options = {}) {
  constexpr const char* kWhere = "efficient_attention_workspace_bytes";
  detail::check_sizes(kWhere, n, m, d, d_v);
  detail::check_linear_options(kWhere, options);
  if (options.causal) detail::fail(kWhere, "Efficient Attention has no causal form");
  using detail::heap_bytes;
  const detail::LinearShape sh = detail::linear_shape<S>(detail::ColumnExp<S>{nullptr}, d, d_v);
  const Index c = detail::linear_chunk<S>(options, sh), r_pad = sh.r_pad, dv_pad = sh.dv_pad;
  const Index packet = detail::KernelShape<S>::kPacket;
  const Index state = heap_bytes<S>(r_pad * dv_pad) + 2 * heap_bytes<S>(r_pad);
  // A chunk of keys: inputs, features, transposed features, values; of queries: inputs, features, products.
  const Index ck = std::min(c, m), cq = std::min(c, n);
  const Index keys = heap_bytes<S>(ck * d) + heap_bytes<S>(ck * r_pad) +
                     heap_bytes<S>(r_pad * detail::round_up(ck, packet)) + heap_bytes<S>(ck * dv_pad);
  const Index queries = heap_bytes<S>(cq * d) + heap_bytes<S>(cq * r_pad) + heap_bytes<S>(cq * dv_pad);
  const Index workers = std::max<Index>(1, std::min<Index>(detail::resolve_threads(options.threads), (n + c - 1) / c));
  return 3 * heap_bytes<S>(d) + state + keys + workers * queries;  // the running column maxima, shifts, chunk's maxima
}

/// \brief As above, returning the n x d_v output.
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> efficient_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                                const Eigen::MatrixBase<DV>& v, const LinearOptions& options = {}) {
  Matrix<typename DQ::Scalar> out(q.rows(), v.cols());
  efficient_attention(q, k, v, out, options);
  return out;
}

}  // namespace attnkit
