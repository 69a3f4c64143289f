// attnkit: scaled dot-product attention (Vaswani et al. 2017), fused: tiled, streaming softmax, O(tile) memory.
#pragma once

#include <type_traits>

#include "core/error.hpp"
#include "core/mask.hpp"
#include "core/options.hpp"
#include "core/tiling.hpp"
#include "core/types.hpp"
#include "core/view.hpp"

namespace attnkit {
namespace detail {

template <class DQ, class DK, class DV>
void check_scalars() {
  using S = typename DQ::Scalar;
  static_check_scalar<S>();
  static_assert(std::is_same_v<S, typename DK::Scalar> && std::is_same_v<S, typename DV::Scalar>,
                "q, k and v must share one scalar type");
}

template <class DQ, class DK, class DV, class... Extras>
void sdpa_into(const char* where, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
               const Eigen::MatrixBase<DV>& v, const AttentionOutput<typename DQ::Scalar>& out,
               const AttentionOptions& o, const Extras&... extras) {
  using S = typename DQ::Scalar;
  const ViewOf<DQ> qv(q);
  const ViewOf<DK> kv(k);
  const ViewOf<DV> vv(v);
  const S scale = resolve_scale<S>(o, q.cols());
  with_mask_model(
      where, q.rows(), k.rows(), o, MaskExtras<S>{},
      [&](const auto& mask) {
        using Mask = std::decay_t<decltype(mask)>;
        run_attention<S, Mask>({{qv.view(), kv.view(), vv.view(), mask, scale, out}}, o);
      },
      extras...);
}

template <class DQ, class DK, class DV>
void check_sdpa_call(const char* where, const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                     const Eigen::MatrixBase<DV>& v, const AttentionOptions& o) {
  check_scalars<DQ, DK, DV>();
  check_attention_shapes(where, q.rows(), q.cols(), k.rows(), k.cols(), v.rows(), v.cols());
  validate_options(where, o, k.rows());
}

}  // namespace detail

/// \brief Exact attention softmax(scale * Q K^T + modifiers, masked) V, fused (SPEC section 1).
///
/// \param q n x d_k queries, \param k m x d_k keys, \param v m x d_v values: any Eigen expression, any storage order;
/// Matrix, Map, Ref and Block are read in place, other expressions are evaluated once.
/// \param options scale, causal / window / key padding, ALiBi, softcap, log-n scaling, threads, tile sizes.
/// \param extras optional, in any order, at most one of each: an n x m additive bias matrix (same scalar), an n x m
/// bool mask (true = allowed), a callable `bool allowed(Index i, Index j)`, a callable
/// `Scalar score(Scalar s, Index i, Index j)`. Callables are inlined and must be safe to call from several threads.
/// \return the n x d_v output. A row with no allowed key is zero. A key outside every row's causal / window / padding
/// range is never read; a key masked for some rows only is read but cannot reach those rows, even if NaN.
///
/// Cost O(n m d) time and O(tile) workspace per thread; never an n x m matrix.
/// \throws attnkit::Error on mismatched shapes or invalid options, naming the argument and the shapes.
/// \sa reference::scaled_dot_product_attention, the materialising oracle.
template <class DQ, class DK, class DV, class... Extras>
Matrix<typename DQ::Scalar> scaled_dot_product_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                                         const Eigen::MatrixBase<DV>& v,
                                                         const AttentionOptions& options = {},
                                                         const Extras&... extras) {
  constexpr const char* kWhere = "scaled_dot_product_attention";
  detail::check_sdpa_call(kWhere, q, k, v, options);
  Matrix<typename DQ::Scalar> out(q.rows(), v.cols());
  detail::sdpa_into(kWhere, q, k, v, {out.data(), out.cols(), nullptr}, options, extras...);
  return out;
}

/// \brief As above, writing into a caller's n x d_v `out`; allocates nothing but the per-thread tile workspace.
template <class DQ, class DK, class DV, class... Extras>
void scaled_dot_product_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                  const Eigen::MatrixBase<DV>& v, Eigen::Ref<Matrix<typename DQ::Scalar>> out,
                                  const AttentionOptions& options = {}, const Extras&... extras) {
  constexpr const char* kWhere = "scaled_dot_product_attention";
  detail::check_sdpa_call(kWhere, q, k, v, options);
  detail::check_out_shape(kWhere, out.rows(), out.cols(), q.rows(), v.cols());
  detail::sdpa_into(kWhere, q, k, v, {out.data(), out.outerStride(), nullptr}, options, extras...);
}

/// \brief As above, also writing each row's log-sum-exp of its (scaled, modified, masked) logits into `lse` (length
/// n): -inf for a row with no allowed key. With it, any attention weight is exp(s_ij - lse_i), no n x m needed.
template <class DQ, class DK, class DV, class... Extras>
void scaled_dot_product_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                  const Eigen::MatrixBase<DV>& v, Eigen::Ref<Matrix<typename DQ::Scalar>> out,
                                  Eigen::Ref<Vector<typename DQ::Scalar>> lse, const AttentionOptions& options = {},
                                  const Extras&... extras) {
  constexpr const char* kWhere = "scaled_dot_product_attention";
  detail::check_sdpa_call(kWhere, q, k, v, options);
  detail::check_out_shape(kWhere, out.rows(), out.cols(), q.rows(), v.cols());
  if (lse.size() != q.rows())
    detail::fail(kWhere, "lse has ", lse.size(), " entries but must have one per query row, n = ", q.rows());
  detail::sdpa_into(kWhere, q, k, v, {out.data(), out.outerStride(), lse.data()}, options, extras...);
}

/// \brief Bytes of workspace one thread of the fused kernel allocates for this problem. Times the number of threads
/// it is the heap cost of a call with a caller-provided `out`, apart from about 1 KiB of bookkeeping (allocator
/// rounding, the thread pool's) per call. Each thread keeps its tile workspace between calls (it grows to the largest
/// the thread has needed, and a later call that fits allocates nothing); release_cached_workspaces() frees them.
/// A few query rows over many keys (at most a micro-kernel's rows over at least 1024 keys, or at most 64 rows over at
/// least 8192) run split-K and also keep partial outputs: multi_head_attention_workspace_bytes with one head counts the
/// whole call.
template <class S>
Index scaled_dot_product_attention_workspace_bytes(Index n, Index m, Index d_k, Index d_v,
                                                   const AttentionOptions& options = {}) {
  detail::check_sizes("scaled_dot_product_attention_workspace_bytes", n, m, d_k, d_v);
  return detail::AttentionWorkspace<S>::bytes(detail::plan_tiles<S>(n, m, d_k, d_v, options), d_k, d_v);
}

/// \brief Frees the tile workspaces that the fused tile loop keeps per thread between calls (SDPA, multi-head, sparse,
/// and the families built on them) and linear attention's chunk scratch, except those a call is using at that moment,
/// which stay for their thread's next call. Safe to call from any thread at any time; the next call simply allocates
/// again.
inline void release_cached_workspaces() { detail::WorkspaceRegistry::instance().release_idle(); }

}  // namespace attnkit
