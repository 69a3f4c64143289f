// attnkit: multi-head attention (Vaswani et al. 2017) with grouped-query (Ainslie et al. 2023) and multi-query
// (Shazeer 2019) sharing, cross-attention, RoPE, per-head ALiBi and a KV cache for incremental decoding. Every head
// runs the fused scaled dot-product attention of sdpa.hpp on column blocks of the projections, in place.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/dense.hpp"
#include "core/error.hpp"
#include "core/options.hpp"
#include "core/positions.hpp"
#include "core/random.hpp"
#include "core/threading.hpp"
#include "core/types.hpp"
#include "sdpa.hpp"

namespace attnkit {

namespace detail {

/// The key (or value) heads of one sequence, read in place: head g is the view `first` moved by g * stride scalars.
/// Projected keys, m x (H_kv d) with heads as consecutive column blocks, have stride d * col_stride; a KVCache keeps
/// each head's rows apart (stride: its rows per head times d), so that a decoding step reads each head's keys and
/// values as one contiguous stream.
template <class S>
struct HeadBlocks {
  StridedView<S> first;
  Index stride;

  StridedView<S> head(Index g) const {
    StridedView<S> h = first;
    h.data += g * stride;
    return h;
  }
  /// The `heads` consecutive column blocks of x.
  static HeadBlocks columns(const StridedView<S>& x, Index heads) {
    StridedView<S> h = x;
    h.cols = x.cols / heads;
    return {h, h.cols * x.col_stride};
  }
};

/// One sequence's projected heads: q (n x H d) and out (n x H d), heads as consecutive column blocks, and the H_kv
/// key and value heads (m x d each), read and written in place through strided views.
template <class S>
struct HeadsJob {
  StridedView<S> q;
  HeadBlocks<S> k, v;
  S* out;
  Index out_stride;
};

/// Runs every (job, key/value head) pair as one attention call whose query rows stack the H / H_kv query heads that
/// share that key/value head (GQA, MQA): K and V are packed and read once per group, not once per query head. The
/// stacking is a grouped view, not a copy. Scheduling (parallel calls, or split-K for decoding) is run_attention's.
/// With `slopes`, head h adds ALiBi with slope slopes[h]. Inputs have been validated: nothing here throws.
template <class S>
void attend_heads(const std::vector<HeadsJob<S>>& jobs, Index heads, Index kv_heads, const std::vector<double>& slopes,
                  const AttentionOptions& options) {
  const Index group = heads / kv_heads;
  const auto columns = [](const StridedView<S>& x, Index first, Index count) {
    StridedView<S> c = x;
    c.data = x.data + first * x.col_stride, c.cols = count;
    return c;
  };
  std::vector<AttentionCall<S, MaskModel<S>>> calls;
  calls.reserve(jobs.size() * size_t(kv_heads));
  for (const HeadsJob<S>& job : jobs)
    for (Index g = 0; g < kv_heads; ++g) {
      const Index n = job.q.rows, dk = job.k.first.cols, dv = job.v.first.cols, period = std::max<Index>(n, 1);
      StridedView<S> q = columns(job.q, g * group * dk, dk);
      q.rows = group * n, q.group_rows = period, q.group_stride = dk * job.q.col_stride;
      calls.push_back({q, job.k.head(g), job.v.head(g),
                       MaskModel<S>(group * n, job.k.first.rows, options, {},
                                    {period, slopes.empty() ? nullptr : slopes.data() + g * group}),
                       resolve_scale<S>(options, dk),
                       AttentionOutput<S>{job.out + g * group * dv, job.out_stride, nullptr, period, dv}});
    }
  run_attention(calls, options);
}

}  // namespace detail

/// \brief The attention part of multi-head attention, on inputs already projected: q is n x (H d_k), k is
/// m x (H_kv d_k), v is m x (H_kv d_v), heads as consecutive column blocks; writes out, n x (H d_v). Query head h
/// reads key/value head h / (H / H_kv) in place (MHA: H_kv = H, MQA: H_kv = 1). With `slopes` (one per head, e.g.
/// alibi_slopes(H)), head h adds ALiBi with its own slope. Heads run in parallel; the result does not depend on the
/// thread count.
template <class DQ, class DK, class DV>
void multi_head_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                          const Eigen::MatrixBase<DV>& v, Eigen::Ref<Matrix<typename DQ::Scalar>> out, Index heads,
                          Index kv_heads, const AttentionOptions& options = {},
                          const std::vector<double>& slopes = {}) {
  using S = typename DQ::Scalar;
  constexpr const char* kWhere = "multi_head_attention";
  detail::check_scalars<DQ, DK, DV>();
  if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0)
    detail::fail(kWhere, "heads must be a multiple of kv_heads (H % H_kv == 0), got H = ", heads,
                 ", H_kv = ", kv_heads);
  if (q.cols() % heads != 0 || k.cols() % kv_heads != 0 || v.cols() % kv_heads != 0 ||
      q.cols() / heads != k.cols() / kv_heads)
    detail::fail(kWhere, "q must be n x (H d_k), k m x (H_kv d_k), v m x (H_kv d_v); got q ",
                 detail::shape_str(q.rows(), q.cols()), ", k ", detail::shape_str(k.rows(), k.cols()), ", v ",
                 detail::shape_str(v.rows(), v.cols()), " with H = ", heads, ", H_kv = ", kv_heads);
  detail::check_attention_shapes(kWhere, q.rows(), q.cols() / heads, k.rows(), k.cols() / kv_heads, v.rows(),
                                 v.cols() / kv_heads);
  detail::validate_options(kWhere, options, k.rows());
  if (!slopes.empty() && (Index(slopes.size()) != heads || options.alibi_slope != 0))
    detail::fail(kWhere, "slopes must hold one ALiBi slope per head (", heads, "), got ", slopes.size(),
                 ", and options.alibi_slope must then be 0");
  for (double slope : slopes) detail::check_non_negative_finite(kWhere, "slopes[h]", slope);
  const Index out_cols = heads * (v.cols() / kv_heads);
  if (out.rows() != q.rows() || out.cols() != out_cols)
    detail::fail(kWhere, "out is ", detail::shape_str(out.rows(), out.cols()),
                 " but must be n x (H d_v) = ", detail::shape_str(q.rows(), out_cols));
  const detail::ViewOf<DQ> qv(q);
  const detail::ViewOf<DK> kv(k);
  const detail::ViewOf<DV> vv(v);
  detail::attend_heads<S>({{qv.view(), detail::HeadBlocks<S>::columns(kv.view(), kv_heads),
                            detail::HeadBlocks<S>::columns(vv.view(), kv_heads), out.data(), out.outerStride()}},
                          heads, kv_heads, slopes, options);
}

/// \brief Bytes of heap one multi_head_attention call allocates at most: the list of per-group calls and a few tiles
/// of workspace per thread (split-K partial outputs when a few query rows meet many keys). Never n x m.
template <class S>
Index multi_head_attention_workspace_bytes(Index n, Index m, Index heads, Index kv_heads, Index d_k, Index d_v,
                                           const AttentionOptions& options = {}) {
  constexpr const char* kWhere = "multi_head_attention_workspace_bytes";
  detail::check_sizes(kWhere, n, m, d_k, d_v);
  if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0)
    detail::fail(kWhere, "heads must be a multiple of kv_heads (H % H_kv == 0), got H = ", heads,
                 ", H_kv = ", kv_heads);
  detail::validate_options(kWhere, options, m);
  return detail::heap_bytes<detail::AttentionCall<S, detail::MaskModel<S>>>(kv_heads) +
         detail::attention_calls_workspace_bytes<S>(kv_heads, heads / kv_heads * n, m, d_k, d_v, options);
}

/// \brief Shape and features of a MultiHeadAttention layer. Zero means "derive it" where noted.
struct MultiHeadConfig {
  Index width = 0;                ///< model width: columns of the query input and of the output
  Index heads = 1;                ///< H query heads
  Index kv_heads = 0;             ///< H_kv key/value heads, H % H_kv == 0; 0 means H (MHA), 1 is MQA
  Index head_dim = 0;             ///< d_head; 0 means width / H
  Index key_width = 0;            ///< columns of the key input (cross-attention); 0 means width
  Index value_width = 0;          ///< columns of the value input; 0 means key_width
  bool projection_bias = false;   ///< biases b_q, b_k, b_v
  bool output_projection = true;  ///< multiply the concatenated heads by w_o; otherwise the output is n x H d_head
  bool output_bias = false;       ///< bias b_o (needs output_projection)
  bool rope = false;              ///< rotary embedding on each head of Q and K (d_head must be even)
  RopeOptions rope_options{};
  bool alibi = false;  ///< ALiBi with the per-head slopes alibi_slopes(H)
};

template <class S>
class MultiHeadAttention;

/// \brief Keys and values of past tokens for incremental decoding with MultiHeadAttention::forward_step.
///
/// Holds at most capacity() tokens; storage grows geometrically as tokens arrive, so appending is amortised O(1)
/// per token and never reallocates per token. Appending past the capacity throws attnkit::Error.
///
/// Each of the kv_heads heads keeps its rows (kv_width / kv_heads values per token) in a block of its own, so a
/// decoding step reads every head's keys and values as one contiguous stream. With the heads side by side in each
/// token's row (1 KiB per token, 256 bytes per head for a 1024 / 16 / 4 layer), a step over 16384 cached tokens took
/// 1.1-1.6x the time (Zen 5, two threads).
template <class S>
class KVCache {
 public:
  /// A cache for up to `capacity` tokens of kv_width keys (and values) each, in kv_heads heads of kv_width / kv_heads
  /// (MultiHeadAttention::make_cache fills these in from the layer).
  KVCache(Index capacity, Index kv_width, Index kv_heads = 1)
      : capacity_(capacity), kv_width_(kv_width), kv_heads_(kv_heads) {
    if (capacity < 1 || kv_width < 1 || kv_heads < 1 || kv_width % kv_heads != 0)
      detail::fail("KVCache", "capacity and kv_width must be >= 1 and kv_width a multiple of kv_heads >= 1, got ",
                   capacity, ", ", kv_width, " and ", kv_heads);
    keys_.resize(0, head_width()), values_.resize(0, head_width());
  }

  Index size() const { return size_; }
  Index capacity() const { return capacity_; }
  Index kv_width() const { return kv_width_; }
  Index kv_heads() const { return kv_heads_; }
  bool full() const { return size_ == capacity_; }
  void clear() { size_ = 0; }
  /// Forgets every token past the first `size` (rolling back a speculative or beam-search step); keeps the storage.
  void truncate(Index size) {
    if (size < 0 || size > size_) detail::fail("KVCache::truncate", "size must be in [0, ", size_, "], got ", size);
    size_ = size;
  }

  /// The cached keys (values) of head h, size() x (kv_width / kv_heads), in place; RoPE already applied.
  auto keys(Index h) const { return keys_.middleRows(head_row(h), size_); }
  auto values(Index h) const { return values_.middleRows(head_row(h), size_); }
  /// A copy of all cached keys (values), size() x kv_width, heads as consecutive column blocks.
  Matrix<S> keys() const { return gather(keys_); }
  Matrix<S> values() const { return gather(values_); }

 private:
  friend class MultiHeadAttention<S>;

  Index head_width() const { return kv_width_ / kv_heads_; }
  Index head_row(Index h) const {
    if (h < 0 || h >= kv_heads_) detail::fail("KVCache", "head must be in [0, ", kv_heads_, "), got ", h);
    return h * rows_;
  }
  // Head g of the keys (values) as one view over the cached tokens, the others `stride` scalars apart.
  detail::HeadBlocks<S> heads(const Matrix<S>& store) const {
    return {{store.data(), size_, head_width(), head_width(), 1}, rows_ * head_width()};
  }
  Matrix<S> gather(const Matrix<S>& store) const {
    Matrix<S> all(size_, kv_width_);
    for (Index h = 0; h < kv_heads_; ++h)
      all.middleCols(h * head_width(), head_width()) = store.middleRows(h * rows_, size_);
    return all;
  }

  void check_room(Index count) const {
    if (size_ + count > capacity_)
      detail::fail("KVCache", "is full: capacity ", capacity_, " tokens, holds ", size_, ", cannot append ", count);
  }

  // Appends k and v (count x kv_width, heads as consecutive column blocks): head h's columns go to its own block.
  void append(const Matrix<S>& k, const Matrix<S>& v) {
    const Index count = k.rows(), w = head_width();
    check_room(count);
    if (size_ + count > rows_) {
      const Index rows = std::min(capacity_, std::max<Index>({size_ + count, 2 * rows_, 64}));
      for (Matrix<S>* store : {&keys_, &values_}) {
        Matrix<S> grown(kv_heads_ * rows, w);
        for (Index h = 0; h < kv_heads_; ++h) grown.middleRows(h * rows, size_) = store->middleRows(h * rows_, size_);
        store->swap(grown);
      }
      rows_ = rows;
    }
    for (Index h = 0; h < kv_heads_; ++h) {
      keys_.middleRows(h * rows_ + size_, count) = k.middleCols(h * w, w);
      values_.middleRows(h * rows_ + size_, count) = v.middleCols(h * w, w);
    }
    size_ += count;
  }

  Index capacity_, kv_width_, kv_heads_, size_ = 0, rows_ = 0;  // rows_: tokens each head's block has room for
  Matrix<S> keys_, values_;  // (kv_heads * rows_) x head_width(): head h's tokens from row h * rows_ on
};

/// \brief Multi-head attention layer: head_h = Attention(X_q W_q[h], X_k W_k[g(h)], X_v W_v[g(h)]), heads
/// concatenated along columns, then an optional output projection W_o (SPEC section 1).
///
/// Conventions: Q = X_q * w_q + b_q, with w_q of shape width x (H d_head) and head h in columns
/// [h d_head, (h + 1) d_head); likewise K = X_k * w_k + b_k and V = X_v * w_v + b_v with H_kv heads; query head h
/// reads key/value head g(h) = h / (H / H_kv), without copying K or V. Weights are public and may be replaced; their
/// shapes are checked on every forward.
template <class S>
class MultiHeadAttention {
 public:
  Matrix<S> w_q;  ///< width x (H d_head)
  Matrix<S> w_k;  ///< key_width x (H_kv d_head)
  Matrix<S> w_v;  ///< value_width x (H_kv d_head)
  Matrix<S> w_o;  ///< (H d_head) x width, or 0 x 0 without output projection
  Matrix<S> b_q;  ///< 1 x (H d_head), or 0 x 0 without projection biases
  Matrix<S> b_k;  ///< 1 x (H_kv d_head), or 0 x 0
  Matrix<S> b_v;  ///< 1 x (H_kv d_head), or 0 x 0
  Matrix<S> b_o;  ///< 1 x width, or 0 x 0 without output bias

  /// Builds the layer with Xavier-uniform weights drawn from `seed` (biases zero). Throws attnkit::Error for an
  /// inconsistent configuration (H % H_kv != 0, width not divisible by H without head_dim, odd d_head with RoPE, ...).
  explicit MultiHeadAttention(const MultiHeadConfig& config, std::uint64_t seed = 0) : c_(resolve(config)) {
    const Index qw = c_.heads * c_.head_dim, kvw = c_.kv_heads * c_.head_dim;
    detail::Rng rng(seed);
    w_q = detail::xavier_uniform<S>(c_.width, qw, rng);
    w_k = detail::xavier_uniform<S>(c_.key_width, kvw, rng);
    w_v = detail::xavier_uniform<S>(c_.value_width, kvw, rng);
    if (c_.output_projection) w_o = detail::xavier_uniform<S>(qw, c_.width, rng);
    if (c_.projection_bias) b_q.setZero(1, qw), b_k.setZero(1, kvw), b_v.setZero(1, kvw);
    if (c_.output_bias) b_o.setZero(1, c_.width);
    if (c_.alibi) slopes_ = alibi_slopes(c_.heads);
  }

  /// The configuration with every derived field filled in.
  const MultiHeadConfig& config() const { return c_; }
  /// Columns of the output: width with the output projection, H d_head without.
  Index output_width() const { return c_.output_projection ? c_.width : c_.heads * c_.head_dim; }

  /// \brief Self-attention over x (n x width). RoPE positions are 0..n-1.
  template <class D>
  Matrix<S> forward(const Eigen::MatrixBase<D>& x, const AttentionOptions& options = {}) const {
    return forward(x, x, x, options);
  }
  /// \brief Cross-attention: queries from x_q (n x width), keys and values from x_kv (m x key_width).
  template <class DQ, class DKV>
  Matrix<S> forward(const Eigen::MatrixBase<DQ>& x_q, const Eigen::MatrixBase<DKV>& x_kv,
                    const AttentionOptions& options = {}) const {
    return forward(x_q, x_kv, x_kv, options);
  }
  /// \brief Cross-attention with separate key (m x key_width) and value (m x value_width) inputs.
  template <class DQ, class DK, class DV>
  Matrix<S> forward(const Eigen::MatrixBase<DQ>& x_q, const Eigen::MatrixBase<DK>& x_k,
                    const Eigen::MatrixBase<DV>& x_v, const AttentionOptions& options = {}) const {
    Matrix<S> out(x_q.rows(), output_width());
    forward_into(x_q, x_k, x_v, out, options);
    return out;
  }
  /// \brief As forward(x), writing into a caller's n x output_width() matrix.
  template <class D>
  void forward_into(const Eigen::MatrixBase<D>& x, Eigen::Ref<Matrix<S>> out,
                    const AttentionOptions& options = {}) const {
    forward_into(x, x, x, out, options);
  }
  template <class DQ, class DK, class DV>
  void forward_into(const Eigen::MatrixBase<DQ>& x_q, const Eigen::MatrixBase<DK>& x_k,
                    const Eigen::MatrixBase<DV>& x_v, Eigen::Ref<Matrix<S>> out,
                    const AttentionOptions& options = {}) const {
    constexpr const char* kWhere = "MultiHeadAttention::forward";
    check_inputs(kWhere, x_q, x_k, x_v, options);
    check_out(kWhere, out, x_q.rows());
    const int threads = detail::resolve_threads(options.threads);
    Sequence seq;
    project(x_q, x_k, x_v, seq, 0, threads);
    attend_all({job(seq)}, options);
    finish(seq.concat, out, threads);
  }

  /// \brief Variable-length batch: forward(x) for every sequence (each n_b x width), in parallel across sequences and
  /// heads. Equal to calling forward on each sequence alone.
  std::vector<Matrix<S>> forward(const std::vector<Matrix<S>>& batch, const AttentionOptions& options = {}) const {
    constexpr const char* kWhere = "MultiHeadAttention::forward (batch)";
    for (size_t b = 0; b < batch.size(); ++b) {
      if (batch[b].cols() != c_.width)
        detail::fail(kWhere, "sequence ", b, " is ", detail::shape_str(batch[b].rows(), batch[b].cols()),
                     " but the layer's width is ", c_.width);
      check_inputs(kWhere, batch[b], batch[b], batch[b], options);
    }
    std::vector<Sequence> seqs(batch.size());
    const Index count = Index(batch.size());
    detail::for_each_item(count, options.threads, [&](Index b, int threads) {
      project(batch[size_t(b)], batch[size_t(b)], batch[size_t(b)], seqs[size_t(b)], 0, threads);
    });
    std::vector<detail::HeadsJob<S>> jobs;
    for (auto& s : seqs) jobs.push_back(job(s));
    attend_all(jobs, options);
    std::vector<Matrix<S>> out(batch.size());
    detail::for_each_item(count, options.threads, [&](Index b, int threads) {
      out[size_t(b)].resize(batch[size_t(b)].rows(), output_width());
      finish(seqs[size_t(b)].concat, out[size_t(b)], threads);
    });
    return out;
  }

  /// \brief Heap bytes that forward_into over n query rows and m key/value rows (m = -1: self-attention, m = n)
  /// allocates at most: Q (n x H d_head), K and V (m x H_kv d_head) and the concatenated heads (n x H d_head), plus
  /// the largest per-thread scratch of the projections and of the attention (a few tiles per thread, never n x m;
  /// the attention's tile workspaces, which each thread keeps for its next call, together with the output
  /// projection's). forward() adds its n x output_width() result. Inputs whose rows are not contiguous (column-major
  /// storage, expressions) add a copy of them or of a block of their rows per thread.
  Index workspace_bytes(Index n, Index m = -1, const AttentionOptions& options = {}) const {
    constexpr const char* kWhere = "MultiHeadAttention::workspace_bytes";
    if (m == -1) m = n;
    if (n < 0 || m < 0) detail::fail(kWhere, "needs n >= 0 and m >= 0 (or -1 for m = n); got n = ", n, ", m = ", m);
    return forward_heap(kWhere, n, m, m, options);
  }

  /// \brief Heap bytes of one forward_step of t new tokens over a cache holding `cached` tokens, at most: the
  /// forward's buffers for t queries over t new keys, the attention over all cached + t keys (split-K partial
  /// outputs when decoding) and the returned t x output_width() result. A step that grows the cache's storage also
  /// allocates that storage (the cache's memory, amortised, not counted here).
  Index step_workspace_bytes(Index t, Index cached, const AttentionOptions& options = {}) const {
    constexpr const char* kWhere = "MultiHeadAttention::step_workspace_bytes";
    if (t < 0 || cached < 0) detail::fail(kWhere, "needs t >= 0 and cached >= 0; got t = ", t, ", cached = ", cached);
    return forward_heap(kWhere, t, t, cached + t, options) + detail::heap_bytes<S>(t * output_width());
  }

  /// \brief A cache sized for this layer's keys and values, holding up to `capacity` tokens.
  KVCache<S> make_cache(Index capacity) const { return KVCache<S>(capacity, c_.kv_heads * c_.head_dim, c_.kv_heads); }

  /// \brief Incremental decoding: appends the keys and values of the new tokens x_new (t x width) to `cache` (RoPE
  /// at their absolute positions cache.size() ..), then attends from the new tokens over the whole cache, causal and
  /// bottom-right aligned whatever `options` says. Feeding a sequence token by token gives the rows of one causal
  /// forward over the whole sequence. Throws attnkit::Error, leaving the cache unchanged, when it would overflow.
  template <class D>
  Matrix<S> forward_step(const Eigen::MatrixBase<D>& x_new, KVCache<S>& cache,
                         const AttentionOptions& options = {}) const {
    constexpr const char* kWhere = "MultiHeadAttention::forward_step";
    if (cache.kv_width_ != c_.kv_heads * c_.head_dim || cache.kv_heads_ != c_.kv_heads)
      detail::fail(kWhere, "cache holds rows of ", cache.kv_width_, " values in ", cache.kv_heads_,
                   " heads but the layer's keys have H_kv = ", c_.kv_heads, " heads of d_head = ", c_.head_dim);
    AttentionOptions o = options;
    o.causal = true;
    o.align = CausalAlign::kBottomRight;
    check_inputs(kWhere, x_new, x_new, x_new, o, cache.size() + x_new.rows());
    cache.check_room(x_new.rows());
    const int threads = detail::resolve_threads(o.threads);
    Sequence seq;
    project(x_new, x_new, x_new, seq, cache.size(), threads);
    cache.append(seq.k, seq.v);
    Matrix<S> out(x_new.rows(), output_width());
    attend_all({{detail::matrix_view(seq.q), cache.heads(cache.keys_), cache.heads(cache.values_), seq.concat.data(),
                 seq.concat.cols()}},
               o);
    finish(seq.concat, out, threads);
    return out;
  }

 private:
  struct Sequence {
    Matrix<S> q, k, v, concat;
  };
  // The attention of one sequence over its own keys and values.
  detail::HeadsJob<S> job(Sequence& seq) const {
    return {detail::matrix_view(seq.q), detail::HeadBlocks<S>::columns(detail::matrix_view(seq.k), c_.kv_heads),
            detail::HeadBlocks<S>::columns(detail::matrix_view(seq.v), c_.kv_heads), seq.concat.data(),
            seq.concat.cols()};
  }

  void attend_all(const std::vector<detail::HeadsJob<S>>& jobs, const AttentionOptions& options) const {
    detail::attend_heads(jobs, c_.heads, c_.kv_heads, slopes_, options);
  }

  static MultiHeadConfig resolve(MultiHeadConfig c) {
    constexpr const char* kWhere = "MultiHeadAttention";
    if (c.width < 1) detail::fail(kWhere, "config.width must be >= 1, got ", c.width);
    if (c.heads < 1) detail::fail(kWhere, "config.heads must be >= 1, got ", c.heads);
    if (c.kv_heads == 0) c.kv_heads = c.heads;
    if (c.kv_heads < 1 || c.heads % c.kv_heads != 0)
      detail::fail(kWhere, "config.kv_heads must divide heads (H % H_kv == 0), got H = ", c.heads,
                   ", H_kv = ", c.kv_heads);
    if (c.head_dim == 0) {
      if (c.width % c.heads != 0)
        detail::fail(kWhere, "config.width = ", c.width, " is not divisible by heads = ", c.heads,
                     "; set config.head_dim");
      c.head_dim = c.width / c.heads;
    }
    if (c.head_dim < 1) detail::fail(kWhere, "config.head_dim must be >= 1, got ", c.head_dim);
    if (c.key_width == 0) c.key_width = c.width;
    if (c.value_width == 0) c.value_width = c.key_width;
    if (c.key_width < 1 || c.value_width < 1)
      detail::fail(kWhere, "config.key_width and value_width must be >= 1, got ", c.key_width, " and ", c.value_width);
    if (c.rope && c.head_dim % 2 != 0) detail::fail(kWhere, "RoPE needs an even head_dim, got ", c.head_dim);
    if (c.rope && !(c.rope_options.base > 1 && std::isfinite(c.rope_options.base)))
      detail::fail(kWhere, "config.rope_options.base must be finite and > 1, got ", c.rope_options.base);
    if (c.output_bias && !c.output_projection) detail::fail(kWhere, "config.output_bias needs output_projection");
    return c;
  }

  template <class DQ, class DK, class DV>
  void check_inputs(const char* where, const Eigen::MatrixBase<DQ>& x_q, const Eigen::MatrixBase<DK>& x_k,
                    const Eigen::MatrixBase<DV>& x_v, const AttentionOptions& o, Index keys = -1) const {
    static_assert(std::is_same_v<typename DQ::Scalar, S> && std::is_same_v<typename DK::Scalar, S> &&
                      std::is_same_v<typename DV::Scalar, S>,
                  "inputs must have the layer's scalar type");
    const Index qw = c_.heads * c_.head_dim, kvw = c_.kv_heads * c_.head_dim;
    detail::check_shape(where, "w_q", w_q, c_.width, qw);
    detail::check_shape(where, "w_k", w_k, c_.key_width, kvw);
    detail::check_shape(where, "w_v", w_v, c_.value_width, kvw);
    detail::check_shape(where, "w_o", w_o, c_.output_projection ? qw : 0, c_.output_projection ? c_.width : 0);
    detail::check_shape(where, "b_q", b_q, c_.projection_bias ? 1 : 0, c_.projection_bias ? qw : 0);
    detail::check_shape(where, "b_k", b_k, c_.projection_bias ? 1 : 0, c_.projection_bias ? kvw : 0);
    detail::check_shape(where, "b_v", b_v, c_.projection_bias ? 1 : 0, c_.projection_bias ? kvw : 0);
    detail::check_shape(where, "b_o", b_o, c_.output_bias ? 1 : 0, c_.output_bias ? c_.width : 0);
    if (x_q.cols() != c_.width)
      detail::fail(where, "query input is ", detail::shape_str(x_q.rows(), x_q.cols()), " but needs width = ", c_.width,
                   " columns");
    if (x_k.cols() != c_.key_width)
      detail::fail(where, "key input is ", detail::shape_str(x_k.rows(), x_k.cols()),
                   " but needs key_width = ", c_.key_width, " columns");
    if (x_v.cols() != c_.value_width)
      detail::fail(where, "value input is ", detail::shape_str(x_v.rows(), x_v.cols()),
                   " but needs value_width = ", c_.value_width, " columns");
    if (x_k.rows() != x_v.rows())
      detail::fail(where, "key input has ", x_k.rows(), " rows but value input has ", x_v.rows(),
                   " (one value per key)");
    if (c_.alibi && o.alibi_slope != 0)
      detail::fail(where, "ALiBi is on in the config (per-head slopes); leave options.alibi_slope at 0");
    detail::validate_options(where, o, keys >= 0 ? keys : x_k.rows());
  }

  void check_out(const char* where, const Eigen::Ref<Matrix<S>>& out, Index n) const {
    if (out.rows() != n || out.cols() != output_width())
      detail::fail(where, "out is ", detail::shape_str(out.rows(), out.cols()), " but must be ",
                   detail::shape_str(n, output_width()));
  }

  template <class D>
  static void dense(const Eigen::MatrixBase<D>& x, const Matrix<S>& w, const Matrix<S>& b, Matrix<S>& y, int threads) {
    const detail::ViewOf<D> view(x);
    detail::dense(view.view(), w, b, y, threads);
  }

  // Projections of one sequence; RoPE with queries and keys at positions first, first + 1, ...
  template <class DQ, class DK, class DV>
  void project(const Eigen::MatrixBase<DQ>& x_q, const Eigen::MatrixBase<DK>& x_k, const Eigen::MatrixBase<DV>& x_v,
               Sequence& s, Index first, int threads) const {
    dense(x_q, w_q, b_q, s.q, threads);
    dense(x_k, w_k, b_k, s.k, threads);
    dense(x_v, w_v, b_v, s.v, threads);
    if (c_.rope) {
      const Index dh = c_.head_dim;
      for (Index h = 0; h < c_.heads; ++h) apply_rope<S>(s.q.middleCols(h * dh, dh), first, c_.rope_options);
      for (Index h = 0; h < c_.kv_heads; ++h) apply_rope<S>(s.k.middleCols(h * dh, dh), first, c_.rope_options);
    }
    s.concat.resize(x_q.rows(), c_.heads * c_.head_dim);
  }

  void finish(const Matrix<S>& concat, Eigen::Ref<Matrix<S>> out, int threads) const {
    if (!c_.output_projection) {
      out = concat;
      return;
    }
    detail::dense(detail::matrix_view(concat), detail::matrix_view(w_o), b_o, out.data(), out.outerStride(), threads);
  }

  // Heap of one forward of n query rows and m projected key/value rows attending over `keys` keys: Q, K, V and the
  // concatenated heads live through the call; the projections' and the attention's scratch come and go, so only the
  // largest counts.
  Index forward_heap(const char* where, Index n, Index m, Index keys, const AttentionOptions& options) const {
    detail::validate_options(where, options, keys);
    const Index qw = c_.heads * c_.head_dim, kvw = c_.kv_heads * c_.head_dim;
    const int t = options.threads;
    const Index buffers = 2 * detail::heap_bytes<S>(n * qw) + 2 * detail::heap_bytes<S>(m * kvw);
    const Index project = std::max({detail::dense_workspace_bytes<S>(n, c_.width, qw, t),
                                    detail::dense_workspace_bytes<S>(m, c_.key_width, kvw, t),
                                    detail::dense_workspace_bytes<S>(m, c_.value_width, kvw, t)});
    const Index attend =
        multi_head_attention_workspace_bytes<S>(n, keys, c_.heads, c_.kv_heads, c_.head_dim, c_.head_dim, options);
    const Index output = c_.output_projection ? detail::dense_workspace_bytes<S>(n, qw, c_.width, t) : 0;
    // The attention's tile workspaces stay with their threads (for the next call) while the output projection runs.
    return buffers + std::max(project, attend + output);
  }

  MultiHeadConfig c_;
  std::vector<double> slopes_;
};

}  // namespace attnkit
