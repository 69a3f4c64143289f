// attnkit: the options every exact-attention kernel takes, and their validation.
#pragma once

#include <cmath>
#include <string>

#include "error.hpp"
#include "types.hpp"

namespace attnkit {

/// \brief How query row i lines up with key row j when n != m. Applies to causal, window and ALiBi alike.
/// kBottomRight: the last query sees the last key (i is shifted by m - n); right for decoding with a KV cache.
/// kTopLeft: query i sees keys j <= i.
enum class CausalAlign { kBottomRight, kTopLeft };

/// \brief Options of scaled dot-product attention (SPEC section 1). The defaults give plain softmax(QK^T/sqrt(d))V.
///
/// Order of operations on a logit: scale (times the log-n factor) -> score callable -> softcap -> bias and ALiBi
/// -> mask -> softmax.
struct AttentionOptions {
  double scale = 0;     ///< 0 means 1/sqrt(d_k)
  bool causal = false;  ///< allow j <= i (after alignment)
  CausalAlign align = CausalAlign::kBottomRight;
  Index window_left = -1;    ///< allow j >= i - window_left (after alignment); -1 means unbounded
  Index window_right = -1;   ///< allow j <= i + window_right (after alignment); -1 means unbounded
  Index key_length = -1;     ///< keys at index >= key_length are padding and never read; -1 means none
  double alibi_slope = 0;    ///< adds -slope * |i - j| (after alignment)
  double softcap = 0;        ///< s -> c * tanh(s / c); 0 means off
  bool log_n_scale = false;  ///< multiply logits by log(n_i) / log(512), n_i = allowed keys of row i

  // Execution. None of these changes the result: output is bit-for-bit identical for any thread count.
  int threads = 0;       ///< 0 means every thread OpenMP (or the hardware) offers; 1 runs on the caller's thread
  Index query_tile = 0;  ///< rows of a query tile; 0 chooses from the cache sizes. Changes float rounding only.
  Index key_tile = 0;    ///< keys of a key tile; 0 chooses from the cache sizes. Changes float rounding only.
};

namespace detail {

/// Row i of the queries sits at position i + offset on the key axis.
inline Index alignment_offset(const AttentionOptions& o, Index n, Index m) {
  return o.align == CausalAlign::kBottomRight ? m - n : 0;
}

/// Checks every option against the problem size m (number of keys). Throws attnkit::Error naming the option.
inline void validate_options(const char* where, const AttentionOptions& o, Index m) {
  check_non_negative_finite(where, "options.scale", o.scale);
  check_non_negative_finite(where, "options.alibi_slope", o.alibi_slope);
  check_non_negative_finite(where, "options.softcap", o.softcap);
  if (o.window_left < -1) fail(where, "options.window_left must be >= -1 (-1 = unbounded), got ", o.window_left);
  if (o.window_right < -1) fail(where, "options.window_right must be >= -1 (-1 = unbounded), got ", o.window_right);
  if (o.key_length < -1 || o.key_length > m)
    fail(where, "options.key_length must be -1 or in [0, m] with m = ", m, " keys, got ", o.key_length);
  if (o.threads < 0) fail(where, "options.threads must be >= 0 (0 = all), got ", o.threads);
  if (o.query_tile < 0) fail(where, "options.query_tile must be >= 0 (0 = auto), got ", o.query_tile);
  if (o.key_tile < 0) fail(where, "options.key_tile must be >= 0 (0 = auto), got ", o.key_tile);
}

}  // namespace detail
}  // namespace attnkit

namespace attnkit::detail {

/// Shape rules of attention: q is n x d_k, k is m x d_k, v is m x d_v, d_k >= 1.
inline void check_attention_shapes(const char* where, Index n, Index dq, Index m, Index dk, Index mv, Index dv) {
  const auto shapes = [&] {
    return std::string(" (q is ") + shape_str(n, dq) + ", k is " + shape_str(m, dk) + ", v is " + shape_str(mv, dv) +
           ")";
  };
  if (dq < 1) fail(where, "q must have d_k >= 1 columns", shapes());
  if (dk != dq) fail(where, "k must have as many columns as q (d_k)", shapes());
  if (mv != m) fail(where, "v must have as many rows as k (one value per key)", shapes());
}

/// Sizes given as numbers (the *_workspace_bytes functions): n, m, d_v >= 0 and d_k >= 1.
inline void check_sizes(const char* where, Index n, Index m, Index dk, Index dv) {
  if (n < 0 || m < 0 || dk < 1 || dv < 0)
    fail(where, "needs n >= 0, m >= 0, d_k >= 1 and d_v >= 0; got n = ", n, ", m = ", m, ", d_k = ", dk,
         ", d_v = ", dv);
}

/// A caller's output buffer must be n x d_v.
inline void check_out_shape(const char* where, Index rows, Index cols, Index n, Index dv) {
  if (rows != n || cols != dv)
    fail(where, "out is ", shape_str(rows, cols), " but must be n x d_v = ", shape_str(n, dv));
}

/// A layer's weight matrix must have the shape its configuration implies.
template <class S>
void check_shape(const char* where, const char* name, const Matrix<S>& w, Index rows, Index cols) {
  if (w.rows() != rows || w.cols() != cols)
    fail(where, name, " is ", shape_str(w.rows(), w.cols()), " but the configuration needs ", shape_str(rows, cols));
}

/// The logit scale: options.scale, or 1/sqrt(d_k) when it is 0.
template <class S>
S resolve_scale(const AttentionOptions& o, Index d_k) {
  return static_cast<S>(o.scale > 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(d_k)));
}

}  // namespace attnkit::detail
