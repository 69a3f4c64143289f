// attnkit: the one tiling loop of exact attention. Blocks of query tiles run in parallel; inside a block, key tiles
// stream through an online softmax, so the workspace is O(tile) and no n x m matrix ever exists.
#pragma once

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "mask.hpp"
#include "microkernel.hpp"
#include "options.hpp"
#include "softmax.hpp"
#include "stores.hpp"
#include "threading.hpp"
#include "types.hpp"
#include "view.hpp"

namespace attnkit::detail {

/// Tile sizes of one call: a query tile of `rows` rows meets key tiles of `cols` keys.
struct TilePlan {
  Index rows = 0;
  Index cols = 0;
  Index group = 1;    ///< query tiles of a block, which share each packed key tile (dense, causal and padding masks)
  int key_slots = 0;  ///< windows 1, explicit tiles (block layouts) 2: regions keeping packed keys (pack_key_tile)
};

/// Largest query tile: 32 micro-kernel strips. It amortises packing K^T and the per-key-tile work over more rows;
/// measured on 2 MiB of L2 (n = 2048, one thread), 192 rows ran 6-12% faster than 96 for d = 64 and 128.
template <class S>
constexpr Index kMaxQueryTile = 32 * KernelShape<S>::kRows;

/// Rows of a query tile for n queries: as even as possible, at most kMaxQueryTile, and with threads > 1 aiming at a
/// number of tiles that the threads share evenly (rounding the rows up to whole strips may leave fewer for small n). A
/// row's result never depends on its tile (each row's softmax and products are its own), so this may follow the thread
/// count; the key tile may not, since it orders the summation.
template <class S>
Index query_tile_rows(Index n, const AttentionOptions& o) {
  // An explicit query tile is kept as given (block-sparse patterns align tiles with their blocks).
  if (o.query_tile > 0) return std::min(o.query_tile, std::max<Index>(n, 1));
  constexpr Index kRows = KernelShape<S>::kRows;
  const Index threads = resolve_threads(o.threads), rows = std::max<Index>(n, 1);
  Index tiles = (rows + kMaxQueryTile<S> - 1) / kMaxQueryTile<S>;
  if (threads > 1) tiles = round_up(tiles, threads);
  return std::min(round_up((rows + tiles - 1) / tiles, kRows), rows);
}

/// Rows of a query tile for a plan that keeps packed keys (TilePlan::key_slots) and no explicit query tile:
/// query_tile_rows rounded up to a whole number of panels, so that consecutive query tiles' keys start a whole number
/// of panels apart (192 for floats with AVX-512), at most n. A caller sizing key tiles to hold a query tile's band
/// sizes them from this.
template <class S>
Index reuse_query_rows(Index n, const AttentionOptions& o) {
  const Index rows = query_tile_rows<S>(n, o);
  if (o.query_tile > 0 || rows <= KernelShape<S>::kRows) return rows;
  constexpr Index kStep = std::lcm(Index(KernelShape<S>::kRows), Index(KernelShape<S>::kCols));
  return std::min(round_up(rows, kStep), std::max<Index>(n, 1));
}

/// Keys of a key tile: the largest of 512, 256 and 128 that leaves at least two key tiles and whose packed keys (the
/// operand every strip of the block's query tiles reads again) fill at most half of L2. 512 from m = 1024 on, for
/// d = 64 to 256 with floats on a 1 MiB L2: on Zen 5 (1 MiB), one thread, n = 1024 to 8192, 512 keys took 0.96-0.98x
/// the time of 256 at d = 64 and 0.94-0.97x that of 128 at d = 128 (causal too), 0.98-1.0x at d = 256, where an
/// older budget (a query tile's queries, scores and accumulators and the tile's keys and values in 60% of L2) chose
/// 256 and 128; with 2 MiB of L2 it was 1-5% faster than 256 at n = 2048. Below m = 1024, 256 (512 keys in one tile
/// ran 5-15% slower at n = 512, causal most). Depends on the problem's shape and the cache only, never on the thread
/// count.
template <class S>
Index key_tile_cols(Index m, Index d, const AttentionOptions& o) {
  Index cols = o.key_tile;
  if (cols <= 0) {
    const Index budget = l2_cache_bytes() / 2 / Index(sizeof(S));
    for (cols = 512; cols > 128 && (2 * cols > m || cols * d > budget);) cols /= 2;
  }
  return round_up(std::min(cols, std::max<Index>(m, 1)), KernelShape<S>::kPacket);
}

/// Query tiles per block and their rows: packing a key tile's K^T costs about as much as a few strips' products with
/// it, so the query tiles of a block, whose rows see the same key tiles, share each packed tile (dense, causal and
/// key-padding masks; fused_attention checks). A block's queries and accumulators stay in L2 (at most 40% of it)
/// across its key tiles, while each query tile keeps its own scores. With threads > 1 the blocks aim at a multiple of
/// the thread count, and are as even as whole strips allow. Results never depend on it (a row's softmax and products
/// do not depend on its tile), so it may follow the thread count.
template <class S>
TilePlan plan_tiles(Index n, Index m, Index d, Index dv, const AttentionOptions& o) {
  constexpr Index kRows = KernelShape<S>::kRows;
  TilePlan plan{query_tile_rows<S>(n, o), key_tile_cols<S>(m, d, o), 1};
  // Windows (sparse bands come as one) walk key tiles that overlap from one query tile to the next, and explicit
  // tiles (block layouts) may also come back to a tile (a global key block): their packed panels are kept.
  const bool window = o.window_left >= 0 || o.window_right >= 0;
  plan.key_slots = o.query_tile > 0 && o.key_tile > 0 ? 2 : window ? 1 : 0;
  if (o.query_tile > 0 || plan.rows <= kRows) return plan;
  if (window) {  // a window's query tiles each walk their own keys: blocks of several would gain nothing
    plan.rows = reuse_query_rows<S>(n, o);
    return plan;
  }
  const Index tiles = (n + plan.rows - 1) / plan.rows, threads = resolve_threads(o.threads);
  const Index per_tile = plan.rows * (d + round_up(dv, KernelShape<S>::kPacket)) * Index(sizeof(S));
  Index most = std::clamp<Index>(l2_cache_bytes() * 4 / 10 / std::max<Index>(per_tile, 1), 1, 8);
  Index blocks = (tiles + most - 1) / most;
  if (threads > 1) blocks = round_up(blocks, threads);
  if (blocks >= tiles) return plan;
  const Index block_rows = round_up((n + blocks - 1) / blocks, kRows);
  plan.group = (block_rows + kMaxQueryTile<S> - 1) / kMaxQueryTile<S>;
  plan.rows = round_up((block_rows + plan.group - 1) / plan.group, kRows);
  return plan;
}

/// Packed K^T panels kept between the key tiles of one call: TilePlan::key_slots regions of ws.keys (at most kSlots),
/// each holding the whole panels (kCols keys, none of them padding) of the last tile packed there. Two let a block
/// layout's global key block and its band each keep theirs; a tile that starts on no kept panel replaces the slot the
/// previous tile did not use. A slot has room for two tiles: when a tile would run past it, its kept panels move to
/// the slot's start.
struct PackedKeySlots {
  static constexpr int kSlots = 2;
  struct Slot {
    Index key0 = 0, first = 0, count = 0;  // panels [first, first + count) of the slot hold keys from key0 on
  };
  Slot slot[kSlots];
  int last = 0;  // the slot of the last tile
  void clear() {
    for (Slot& s : slot) s = Slot{};
  }
};

/// Per-thread scratch of the fused loop. Not zero-filled: every value the loop reads it has written first (packing
/// zero-pads, scores and accumulators are produced before use). fit() only ever grows it, so one workspace serves a
/// worker's successive calls (split-K runs many small calls per worker).
template <class S>
struct AttentionWorkspace {
  using Buffer = Eigen::Matrix<S, Eigen::Dynamic, 1>;
  Buffer queries, keys, values, scores, acc, alpha;
  std::vector<KeyRange> ranges, spans, strips;
  std::vector<SoftmaxState<S>> stats;
  Lookahead ahead;               // rows the tile loop reads next: the next key tile's, or the next query tile's
  KeyRange finite_values{0, 0};  // value rows this call has found finite (read in place), see finite_value_rows
  PackedKeySlots kept;           // packed K^T panels of this call's earlier key tiles (plan.key_slots)

  // Scalars of each buffer, in member order: queries, keys, values, scores, acc, alpha.
  static std::array<Index, 6> sizes(const TilePlan& plan, Index d, Index dv) {
    using K = KernelShape<S>;
    const Index cols = round_up(plan.cols, K::kPacket), dv_pad = round_up(dv, K::kPacket);
    const Index block = plan.rows * plan.group;
    const Index key_copies = plan.key_slots > 0 ? 2 * Index(plan.key_slots) : 1;
    return {block * d,
            key_copies * round_up(cols, K::kCols) * d,
            plan.cols * round_up(dv_pad, K::kCols),
            plan.rows * cols,
            block * dv_pad,
            block};
  }

  /// Grows the buffers to the plan's needs. A call that reads key rows in place (decoding) leaves the packed-K^T
  /// buffer as it is, and one that reads value rows in place the packed-V buffer; bytes() bounds every call.
  AttentionWorkspace& fit(const TilePlan& plan, Index d, Index dv, bool pack_keys = true, bool pack_values = true) {
    finite_values = {0, 0};  // each call starts knowing nothing about its values
    kept.clear();
    std::array<Index, 6> need = sizes(plan, d, dv);
    if (!pack_keys) need[1] = 0;
    if (!pack_values) need[2] = 0;
    Buffer* buffers[] = {&queries, &keys, &values, &scores, &acc, &alpha};
    for (size_t b = 0; b < need.size(); ++b)
      if (buffers[b]->size() < need[b]) buffers[b]->resize(need[b]);
    const Index block = plan.rows * plan.group;
    if (Index(ranges.size()) < block) ranges.resize(size_t(block)), stats.resize(size_t(block));
    const Index strip_count = (plan.rows + KernelShape<S>::kRows - 1) / KernelShape<S>::kRows;
    if (Index(strips.size()) < strip_count) strips.resize(size_t(strip_count));
    return *this;
  }

  static Index bytes(const TilePlan& plan, Index d, Index dv) {
    Index scalars = 0;
    for (Index size : sizes(plan, d, dv)) scalars += size;
    const Index strips = (plan.rows + KernelShape<S>::kRows - 1) / KernelShape<S>::kRows;
    return scalars * Index(sizeof(S)) + plan.rows * plan.group * Index(sizeof(KeyRange) + sizeof(SoftmaxState<S>)) +
           strips * Index(sizeof(KeyRange));
  }
};

/// K^T of keys [j0, j0 + cols) of k packed for the micro-kernel (pack_transposed), in ws.keys; returns its first
/// panel. With plan.key_slots, the whole panels of earlier tiles that this one starts on are reused as they are (a
/// panel's layout depends on its keys only) and only the keys past them are packed (PackedKeySlots): a band's query
/// tile of 192 rows packs 192 new keys instead of 192 + its width, a block row the band's new block instead of the
/// global and band blocks again. Measured with windows' query tiles walking alone (paired medians, one thread, d = 64,
/// Granite Rapids guest): local(128) 0.96x the time at n = 4096 and 0.97x at 65536, block(64, band + global) 0.97x
/// and 0.95x, strided(128) 0.96-0.98x at 4096-16384. Few instructions go (0.2% of local's, 1.4% of block's in an AVX2
/// build), so the time saved is memory traffic: packing's reads of K rows, and for windows a smaller working set (one
/// query tile's queries and accumulators, not a block's). Apart, for local(128): its tiles walking alone without kept
/// panels took 0.98x the time at both n (paired medians), the kept panels another 0.98x at 65536 and none at 4096.
template <class S>
const S* pack_key_tile(const StridedView<S>& k, Index j0, Index cols, Index cols_pad, const TilePlan& plan,
                       AttentionWorkspace<S>& ws) {
  using K = KernelShape<S>;
  constexpr Index P = K::kCols;
  if (plan.key_slots == 0) {
    pack_transposed(k, j0, cols, cols_pad, ws.keys.data());
    return ws.keys.data();
  }
  const Index panel = k.cols * P, capacity = 2 * (round_up(plan.cols, P) / P);
  PackedKeySlots& kept = ws.kept;
  int s = -1;
  const int slots = std::min(plan.key_slots, PackedKeySlots::kSlots);
  for (int t = 0; t < slots && s < 0; ++t) {
    const PackedKeySlots::Slot& sl = kept.slot[t];
    if (sl.count > 0 && j0 >= sl.key0 && (j0 - sl.key0) % P == 0 && j0 < sl.key0 + sl.count * P) s = t;
  }
  Index start = 0, reuse = 0;
  if (s >= 0) {
    const PackedKeySlots::Slot& sl = kept.slot[s];
    const Index skip = (j0 - sl.key0) / P;
    start = sl.first + skip;
    reuse = std::min(sl.count - skip, cols / P);
  } else {
    s = (kept.last + 1) % slots;
  }
  S* const base = ws.keys.data() + Index(s) * capacity * panel;
  const Index panels = (cols_pad + P - 1) / P;
  if (start + panels > capacity) {
    if (reuse > 0) std::memmove(base, base + start * panel, size_t(reuse * panel) * sizeof(S));
    start = 0;
  }
  S* const dst = base + start * panel;
  if (reuse * P < cols) pack_transposed(k, j0 + reuse * P, cols - reuse * P, cols_pad - reuse * P, dst + reuse * panel);
  kept.slot[s] = {j0, start, cols / P};
  kept.last = s;
  return dst;
}

/// The fused loop's tile workspace, kept per thread between calls (CachedScratch): a call that allocated and freed its
/// buffers each time paid for fresh pages on every call, 18-22% of the time of n = 256-512 SDPA.
template <class S>
using CachedWorkspace = CachedScratch<AttentionWorkspace<S>>;

/// How a fused call stores its output rows. kAuto: with streaming stores when the call is larger than the cache an
/// output can count on (streams_past_cache). kCached: through the caches, because a later call continues the rows
/// (streaming them out made strided(128) at n = 16384 and 65536 1.05-1.09x slower). kStreamed: past the caches, because
/// the call is one of many whose rows together exceed that cache (a sparse pattern's residue classes).
enum class OutputWrite { kAuto, kCached, kStreamed };

/// The destination of a fused call: out (n x dv, row stride `stride`) and, optionally, the per-row log-sum-exp.
/// Rows may fold groups like StridedView (group_rows > 0: row i is row i % group_rows of group i / group_rows).
/// With `continues`, out and lse already hold attention over other keys (normalised over them; lse -inf where there
/// were none): the call folds its own keys into them, as merge_into would fold in its separate result (the same up to
/// rounding), and leaves the attention over both and its log-sum-exp. Softmax weights only; lse must be given.
/// `keeps_lse` false: lse is only read (a last continuing call whose caller wants the rows alone). `write` says how the
/// rows are stored (OutputWrite).
template <class S>
struct AttentionOutput {
  S* data;
  Index stride;
  S* lse;  // may be null; row i's entry is lse[i * lse_stride]
  Index group_rows = 0;
  Index group_stride = 0;
  Index lse_stride = 1;
  bool continues = false;
  bool keeps_lse = true;
  OutputWrite write = OutputWrite::kAuto;

  bool writes_lse() const { return lse != nullptr && keeps_lse; }

  S* row(Index i) const {
    return group_rows > 0 ? data + (i / group_rows) * group_stride + (i % group_rows) * stride : data + i * stride;
  }
};

/// Whether the first `width` scalars of each of `rows` rows, `stride` apart, are all finite.
template <class S>
bool all_finite(const S* data, Index rows, Index width, Index stride) {
  using Rows =
      Eigen::Map<const Eigen::Array<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0, Eigen::OuterStride<>>;
  // 0 * x is 0 for finite x and NaN for NaN or Inf: one vectorised sum (Eigen's isFinite is scalar).
  return (Rows(data, rows, width, Eigen::OuterStride<>(std::max(stride, width))) * S(0)).sum() == S(0);
}

/// Whether value rows [j0, j0 + cols) of v (rows contiguous) are all finite, reading only those past `known`, the rows
/// found finite earlier in the call, which it extends: a band's key tiles overlap by most of their rows, so each row
/// is checked about once per call instead of once per query tile (local(128): every tile is partial).
template <class S>
bool finite_value_rows(const StridedView<S>& v, Index j0, Index cols, KeyRange& known) {
  const bool extends = known.begin <= j0 && j0 <= known.end;
  const Index from = extends ? std::max(j0, known.end) : j0, end = j0 + cols;
  if (from >= end) return true;
  if (!all_finite(v.row(from), end - from, v.cols, v.row_stride)) return false;
  known = {extends ? known.begin : j0, end};
  return true;
}

/// How the fused loop turns a row's logits into attention weights: the online softmax of SPEC section 1. step()
/// overwrites the logits of the next keys of row i with their unnormalised weights and returns the factor by which the
/// row's accumulated output must be rescaled; finish() returns the factor that normalises the row at the end.
/// (GAU's squared-ReLU attention is another such policy: gau.hpp.)
struct SoftmaxWeights {
  template <class S>
  S step(S* logits, Index count, SoftmaxState<S>& state) const {
    return online_softmax_step(logits, count, state);
  }
  template <class S>
  S finish(Index /*i*/, const SoftmaxState<S>& state) const {
    return state.inverse_sum();
  }
};

#if defined(EIGEN_VECTORIZE_AVX512)
/// A decoding step's pass over a key tile that each of its R query rows sees whole (floats, AVX-512, unmodified
/// scores; keys and values of D = 16 NP values in rows D apart, read in place): blocks of 16 keys, each taken through
/// its scores (dot_keys), one online-softmax step per row and its P V product before the next block, with the rows'
/// outputs in registers across the tile. A block's keys and values are so read together, and with `ahead` > 0 the key
/// and value rows `ahead` keys further on are fetched into L1, a share of them before each row's products. The tile
/// loop's path (scores of the whole tile, then its softmax step, then P V through the micro-kernel) read the keys and
/// the values in two passes, each stalling on its own misses.
/// q: R x D (scaled); acc: R rows at stride ldacc, and stats, the rows' running output and softmax state as the tile
/// loop keeps them. A block whose scores are all -inf or hold a NaN takes online_softmax_step's rules.
template <int R, int NP>
void decode_tile(const float* q, const float* keys, const float* values, Index key_rows, Index j0, Index cols,
                 SoftmaxState<float>* stats, float* acc, Index ldacc, Index ahead) {
  constexpr Index D = 16 * NP;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const Index fetch_end = ahead > 0 ? key_rows : 0;
  __m512 o[R][NP], sums[R];  // each row's output, and its sum of weights in this tile by lane
  for (int r = 0; r < R; ++r) {
    sums[r] = _mm512_setzero_ps();
    for (int p = 0; p < NP; ++p) o[r][p] = _mm512_loadu_ps(acc + r * ldacc + 16 * p);
  }
  const auto rescale = [&](int r, float alpha) {
    const __m512 a = _mm512_set1_ps(alpha);
    for (int p = 0; p < NP; ++p) o[r][p] = _mm512_mul_ps(o[r][p], a);
    sums[r] = _mm512_mul_ps(sums[r], a);
  };
  alignas(64) float w[R][16];
  for (Index c = 0; c < cols; c += 16) {
    const Index count = std::min<Index>(16, cols - c);
    const float* const kb = keys + (j0 + c) * D;
    const float* const vb = values + (j0 + c) * D;
    const __mmask16 real = __mmask16((1u << count) - 1u);
    for (int r = 0; r < R; ++r) {
      for (Index j = std::min(fetch_end, j0 + c + ahead + r * 16 / R),
                 end = std::min(fetch_end, j0 + c + ahead + (r + 1) * 16 / R);
           j < end; ++j) {
        prefetch_row<3>(keys + j * D, D);
        prefetch_row<3>(values + j * D, D);
      }
      // A short block (a tile's last) reads its last key again in place of the missing ones, whose lanes become -inf.
      const __m512 dots = count == 16
                              ? dot_keys(
                                    q + r * D, [&](int j) { return kb + j * D; }, D, 0)
                              : dot_keys(
                                    q + r * D, [&](int j) { return kb + std::min<Index>(j, count - 1) * D; }, D, 0);
      const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(kNegInf), real, dots);
      SoftmaxState<float>& state = stats[r];
      const float block_max = _mm512_reduce_max_ps(s);
      if (!(block_max > kNegInf)) {
        _mm512_store_ps(w[r], s);
        state.sum += _mm512_reduce_add_ps(sums[r]), sums[r] = _mm512_setzero_ps();
        rescale(r, online_softmax_step(w[r], count, state));
        continue;
      }
      if (!(block_max <= state.max)) {  // a new maximum (or a row already NaN, whose max stays NaN)
        const float new_max = std::max(state.max, block_max), alpha = std::exp(state.max - new_max);
        state.sum *= alpha, state.max = new_max;
        rescale(r, alpha);
      }
      const __m512 e = exp_below(s, _mm512_set1_ps(state.max));  // the lanes past the block's keys: exactly 0
      sums[r] = _mm512_add_ps(sums[r], e);
      _mm512_store_ps(w[r], e);
    }
    for (Index j = 0; j < count; ++j) {
      __m512 vv[NP];
      for (int p = 0; p < NP; ++p) vv[p] = _mm512_loadu_ps(vb + j * D + 16 * p);
      for (int r = 0; r < R; ++r) {
        const __m512 wj = _mm512_set1_ps(w[r][j]);
        for (int p = 0; p < NP; ++p) o[r][p] = _mm512_fmadd_ps(wj, vv[p], o[r][p]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    stats[r].sum += _mm512_reduce_add_ps(sums[r]);
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(acc + r * ldacc + 16 * p, o[r][p]);
  }
}

/// Rows (queries) of a decode_tile at most, and values (rows x d_v) it keeps in registers at most: 16 packets, half of
/// the 32 registers (4 rows of 128 values spilled them, and took 1.15x the time of the tile loop's path).
constexpr int kDecodeTileRows = 4;
constexpr Index kDecodeTileValues = 256;

/// decode_tile for 1..R rows and 1..NP packets per row; false (and nothing done) for a shape it has no kernel for
/// (R x NP x 16 > kDecodeTileValues), which the caller then computes on the tile loop's path.
template <int R = kDecodeTileRows, int NP = 8>
bool decode_tile_of(int rows, int packets, const float* q, const float* keys, const float* values, Index key_rows,
                    Index j0, Index cols, SoftmaxState<float>* stats, float* acc, Index ldacc, Index ahead) {
  if constexpr (R > 1) {
    if (rows < R)
      return decode_tile_of<R - 1, NP>(rows, packets, q, keys, values, key_rows, j0, cols, stats, acc, ldacc, ahead);
  }
  if constexpr (NP > 1) {
    if (packets < NP)
      return decode_tile_of<R, NP - 1>(rows, packets, q, keys, values, key_rows, j0, cols, stats, acc, ldacc, ahead);
  }
  if constexpr (R * NP * 16 <= kDecodeTileValues) {
    decode_tile<R, NP>(q, keys, values, key_rows, j0, cols, stats, acc, ldacc, ahead);
    return true;
  } else {
    return false;
  }
}
#endif

/// The bytes of a key tile's values that the L1 cache holds for a query tile's strips (two thirds of 48 KiB).
constexpr Index kL1ValueBytes = 32 * 1024;

/// Whether rows `row_bytes` apart fall in a few sets of the L1 cache: a multiple of 1 KiB puts them in at most four
/// 64-set groups (a sparse residue class's rows k apart, a head of a multi-head layer's values).
constexpr bool rows_alias_in_l1(Index row_bytes) { return row_bytes % 1024 == 0; }

/// Whether the fused loop reads a call's value rows in place (else it packs them per key tile of `cols` keys): when
/// they are whole packets, unless the tile's values would fit in L1 but for their rows being a multiple of 1 KiB apart
/// (a sparse residue class, rows k apart; a head of a multi-head layer's values), which puts them all in a few of its
/// sets, so that every strip of a query tile reads them from L2. A decoding step (short_queries) reads them in place
/// whatever their stride: packing costs more than its few rows' products. atrous(128) at n = 16384 (classes of 128
/// keys, rows 32 KiB apart) took 0.94x the time packed; multi-head attention (8 heads of 64, n = 128 and 256) 0.94x.
template <class S>
bool reads_values_in_place(const StridedView<S>& v, Index cols, bool short_queries) {
  const Index dv = v.cols, bytes = Index(sizeof(S));
  const bool alias = !short_queries && v.row_stride != dv && rows_alias_in_l1(v.row_stride * bytes) &&
                     cols * dv * bytes <= kL1ValueBytes;
  return v.row_contiguous() && v.group_rows == 0 && dv % KernelShape<S>::kPacket == 0 && !alias;
}

/// Query rows from which a call whose keys and values exceed the usable cache fetches its next key tiles ahead even
/// when its output is small (streams_past_cache asks for a large output as well). Measured on Zen 4, one thread,
/// d = 64, m = 65536, best calls against no fetching: a driver alternating the two, 32 / 64 / 128 / 256 rows 0.91-0.95
/// / 0.95 / 0.97 / 0.98x the time (0.96x at 64 rows in 2 MiB pages); bench_sdpa's BM_Prefill, four rounds, 0.95-1.0 /
/// 0.97-0.99 / - / 0.975-0.996x. Fewer rows spend too little time on a key tile to hide its fetches: 8 rows took up to
/// 1.4x the time at m = 32768, whose keys and values the host's L3 still held.
constexpr Index kFetchRows = 32;

/// out = softmax(mask(scale * Q K^T)) V, SPEC section 1, for any mask model (`Mask` provides row_range, key_spans,
/// classify, modifies_scores, modify_row, mask_row and row_scale, like MaskModel). Inputs have been validated.
///
/// Per block of query tiles (plan.group of them): pack Q (scaled per row), then for each key tile that is not empty:
/// pack K^T and V once, and for each query tile S = Q K^T by the micro-kernel, apply score modifiers (all tiles) and
/// the mask (partial tiles only), one online-softmax step per row, and acc = alpha .* acc + P V. Masks whose query
/// tiles would walk different key tiles (windows, sparse patterns) walk them tile by tile. Keys outside every row's
/// range (padding, causal future) are never packed nor read. `keys` restricts the call to keys [keys.begin, keys.end)
/// (split-K decoding); the output is then normalised over those keys alone and the log-sum-exp says how to merge it
/// with other ranges (merge_key_ranges). With `workspace`, the blocks run one after another on the caller's thread, in
/// that workspace. `weights` may replace the softmax (the log-sum-exp output is then meaningless and must not be asked
/// for).
template <class S, class Mask, class Weights = SoftmaxWeights>
void fused_attention(const StridedView<S>& q, const StridedView<S>& k, const StridedView<S>& v, const Mask& mask,
                     S scale, const AttentionOptions& o, const AttentionOutput<S>& out, KeyRange keys = KeyRange::all(),
                     AttentionWorkspace<S>* workspace = nullptr, const Weights& weights = {}) {
  using K = KernelShape<S>;
  const Index n = q.rows, m = k.rows, d = q.cols, dv = v.cols;
  if (n == 0) return;
  const TilePlan plan = plan_tiles<S>(n, m, d, dv, o);
  const Index dv_pad = round_up(dv, K::kPacket);
  const Index block_rows = plan.rows * plan.group, blocks = (n + block_rows - 1) / block_rows;
  const bool short_queries = use_short_query_scores(n, k);
  const bool values_in_place = reads_values_in_place(v, plan.cols, short_queries);
  // A call larger than the part of the last-level cache it can count on reads its rows from memory: it fetches its
  // next keys and values ahead, and, when its output is large as well, writes it past the caches. (Fetching ahead
  // rows that are in the caches anyway measured 2-6% slower.) A few query rows over many keys (chunked prefill
  // against a long cache) fetch too: see kFetchRows.
  const Index bytes = attention_call_bytes<S>(n, m, d, dv), out_bytes = Index(sizeof(S)) * n * dv;
  const bool streams = streams_past_cache(bytes, out_bytes);
  const bool from_memory = streams || (n >= kFetchRows && bytes > usable_cache_bytes());
  const bool stream_out = out.write == OutputWrite::kStreamed || (out.write == OutputWrite::kAuto && streams);
  // A decoding step whose keys and values (the memory their rows span: a KV cache's rows hold every head) exceed
  // 3/4 of the last-level cache reads its keys ahead of its scores, and its values (in place) while the scores run
  // (short_query_scores); for keys in the caches that measured slower (1.07-1.32x at m = 4096), from DRAM faster.
  const bool keys_ahead =
      short_queries && Index(sizeof(S)) * (k.rows * std::max(k.row_stride, d) + v.rows * std::max(v.row_stride, dv)) >
                           last_level_cache_bytes() / 4 * 3;

#if defined(EIGEN_VECTORIZE_AVX512)
  // A decoding step's whole tiles go through decode_tile when their scores are unmodified and their keys and values
  // are rows of one width d <= 128 (whole packets), d apart (a single head's, or a KV cache's head), and at most
  // kDecodeTileValues outputs. Its rows fetch the key and value rows 8 KiB (of keys) ahead when the keys and values
  // do not fit in L2; for keys in L2 that cost more than it saved (one row, m = 2048, d = 64: 1.3x the time).
  const bool decode_tiles = std::is_same_v<S, float> && std::is_same_v<Weights, SoftmaxWeights> && short_queries &&
                            values_in_place && !mask.modifies_scores() && d == dv && dv <= 128 && k.group_rows == 0 &&
                            k.row_stride == d && v.row_stride == dv && n <= kDecodeTileRows &&
                            n * dv <= kDecodeTileValues;
  const Index decode_ahead = Index(sizeof(S)) * (k.rows * d + v.rows * dv) > l2_cache_bytes()
                                 ? std::max<Index>(8192 / (Index(sizeof(S)) * d), 1)
                                 : 0;
#endif

  // Queues the rows the loop reads next and has not read lately, to be fetched a few lines per micro-kernel call of
  // the current key tile (cols keys): the next key tile's keys and values from seen_end on (the keys before it were
  // read by the previous query tile), or after the last key tile the keys and values the next query tile reaches
  // beyond this tile's key_end. For a band those are exactly the new rows; for dense attention, none. Key ranges are
  // taken from a tile's last (and first) rows: exact for bands, only a hint otherwise. The next tile's queries are
  // not queued: run_block fetches them 16 rows ahead as it copies them, and queued as well they took the line-fill
  // buffers from the keys and values (at n = 65536, 1.02-1.03x the time of fetching keys and values alone for
  // block(64, band + global), 1.07-1.09x for its band alone).
  const auto fetch_next = [&](const KeyRange* next_keys, Index n0, Index rows, Index seen_end, Index key_end,
                              Index cols, AttentionWorkspace<S>& ws) {
    ws.ahead.clear();
    if (short_queries || !from_memory) return;  // decoding: its short products leave no time to hide loads behind
    if (next_keys) {
      const Index from = std::max(next_keys->begin, seen_end);
      if (from < next_keys->end) {
        ws.ahead.add(k, from, next_keys->end);
        if (values_in_place) ws.ahead.add(v, from, next_keys->end);
      }
    } else if (n0 < n) {
      const Index next_rows = std::min(plan.rows, n - n0);
      KeyRange next{m, 0};
      for (const Index r : {n0, n0 + next_rows - 1}) {
        const KeyRange g = intersect(mask.row_range(r), keys);
        if (!g.empty()) next = {std::min(next.begin, g.begin), std::max(next.end, g.end)};
      }
      const Index from = std::max(next.begin, key_end);
      if (from < next.end) {
        ws.ahead.add(k, from, next.end);
        if (values_in_place) ws.ahead.add(v, from, next.end);
      }
    }
    // Paced at the rate of the larger of the two key tiles: a short tile (a global column block before a band) leaves
    // part of a long next tile to ordinary loads rather than fetching it in a burst.
    const Index span = next_keys ? std::max(cols, next_keys->size()) : cols;
    ws.ahead.pace(tile_steps<S>(rows, round_up(span, K::kPacket)) / 2 + tile_steps<S>(rows, dv_pad));
  };

  // One block of query tiles (plan.group of them, rows [b0, b0 + block_rows)): each row's range, scaled query,
  // softmax state and accumulator live for the block's whole walk over its key tiles.
  auto run_block = [&](Index b, AttentionWorkspace<S>& ws) {
    const Index b0 = b * block_rows, brows = std::min(block_rows, n - b0);
    // The query rows of a gathered view (a sparse residue class: rows k apart) come from wherever they are, one row's
    // loads after another: fetching 16 rows ahead took 0.93-0.99x the time of atrous(128) at n = 65536 (strided(128)
    // 0.95-0.97x), and changed nothing for rows the hardware prefetcher follows.
    constexpr Index kQueriesAhead = 16;
    for (Index r = 0; r < brows; ++r) {
      if (q.row_contiguous() && r + kQueriesAhead < brows) prefetch_row(q.row(b0 + r + kQueriesAhead), d);
      ws.ranges[r] = intersect(mask.row_range(b0 + r), keys);
      const S row_scale = mask.row_scale(b0 + r, scale);
      S* qrow = ws.queries.data() + r * d;
      const S* src = q.row(b0 + r);
      for (Index c = 0; c < d; ++c) qrow[c] = row_scale * src[c * q.col_stride];
    }
    std::fill(ws.stats.begin(), ws.stats.begin() + brows, SoftmaxState<S>{});
    if (!out.continues)
      ws.acc.head(brows * dv_pad).setZero();
    else  // a row holding attention over other keys starts from it: max = its lse, sum = 1, acc = it (written once)
      for (Index r = 0; r < brows; ++r) {
        if (r + kQueriesAhead < brows) prefetch_row<2, true>(out.row(b0 + r + kQueriesAhead), dv);  // rows k apart
        S* acc = ws.acc.data() + r * dv_pad;
        const S lse = out.lse[(b0 + r) * out.lse_stride];
        if (lse == -std::numeric_limits<S>::infinity()) {
          std::fill(acc, acc + dv_pad, S(0));
          continue;
        }
        ws.stats[size_t(r)] = SoftmaxState<S>{lse, S(1)};
        const S* held = out.row(b0 + r);
        std::copy(held, held + dv, acc);
        std::fill(acc + dv, acc + dv_pad, S(0));
      }
    // The hull of the keys seen by the query tile of rows [r0, r0 + rows) of the block.
    const auto hull_of = [&](Index r0, Index rows) {
      KeyRange h{m, 0};
      for (Index r = r0; r < r0 + rows; ++r)
        if (!ws.ranges[r].empty()) h = {std::min(h.begin, ws.ranges[r].begin), std::max(h.end, ws.ranges[r].end)};
      return h;
    };

    // One key tile [j0, j0 + cols) for the query tile of rows [r0, r0 + rows) of the block, its K^T packed in
    // ws.keys unless `packed`: S = Q K^T, modifiers and mask, online softmax, acc = alpha .* acc + P V.
    const auto run_key_tile = [&](Index r0, Index rows, Index j0, Index cols, const S* packed) {
      const Index i0 = b0 + r0, cols_pad = round_up(cols, K::kPacket);
      const KeyRange* ranges = ws.ranges.data() + r0;
      const TileKind kind = mask.classify(i0, ranges, rows, j0, cols);
      if (kind == TileKind::kEmpty) return;
      // In a partial tile each strip of kRows rows works only on the keys its rows' ranges reach (bands, diagonals).
      StripLimits limits;
      if (kind == TileKind::kPartial) {
        for (Index s0 = 0, s = 0; s0 < rows; s0 += K::kRows, ++s) {
          KeyRange u{cols, 0};
          for (Index r = s0; r < std::min(rows, s0 + K::kRows); ++r) {
            const KeyRange g = intersect(ranges[r], {j0, j0 + cols});
            if (!g.empty()) u = {std::min(u.begin, g.begin - j0), std::max(u.end, g.end - j0)};
          }
          ws.strips[size_t(s)] = u;
        }
        limits = {ws.strips.data(), ws.strips.data()};
      }
      S* const qrows = ws.queries.data() + r0 * d;
      S* const acc = ws.acc.data() + r0 * dv_pad;
      S* const alpha = ws.alpha.data() + r0;
#if defined(EIGEN_VECTORIZE_AVX512)
      if constexpr (std::is_same_v<S, float>) {
        if (decode_tiles && kind == TileKind::kFull &&
            decode_tile_of(int(rows), int(dv / 16), qrows, k.data, v.data, k.rows, j0, cols, ws.stats.data() + r0, acc,
                           dv_pad, decode_ahead))
          return;
      }
#endif
      // The P V product reads these rows in place: fetch them while Q K^T runs. Not in one burst for a decoding step
      // (1.3x slower ahead of its short products): short_query_scores spreads them over its blocks of keys.
      if (values_in_place && !short_queries && !packed)
        for (Index j = j0; j < j0 + cols; ++j) prefetch_row(v.row(j), dv);
      if (short_queries) {
        short_query_scores(qrows, d, rows, k, j0, cols, ws.scores.data(), cols_pad, keys_ahead,
                           values_in_place ? &v : nullptr);
      } else {
        const S* const keys_t = packed ? packed : pack_key_tile(k, j0, cols, cols_pad, plan, ws);
        tile_product<S, false>(qrows, d, rows, RhsPanels<S>{keys_t, d * K::kCols, 0}, d, cols_pad, ws.scores.data(),
                               cols_pad, nullptr, {limits.cols, nullptr}, &ws.ahead);
      }
      for (Index r = 0; r < rows; ++r) {
        S* row = ws.scores.data() + r * cols_pad;
        SoftmaxState<S>& state = ws.stats[size_t(r0 + r)];
        if (mask.modifies_scores()) mask.modify_row(i0 + r, j0, row, cols);
        if (kind == TileKind::kFull) {
          alpha[r] = weights.step(row, cols, state);
          continue;
        }
        // Partial: the softmax runs over the row's own range only (masked there element by element, if the mask
        // has elements); the rest of its strip's keys get weight 0.
        const KeyRange strip = ws.strips[size_t(r / K::kRows)];
        const KeyRange g = intersect(ranges[r], {j0, j0 + cols});
        const Index lo = g.empty() ? strip.begin : g.begin - j0, hi = g.empty() ? strip.begin : g.end - j0;
        if (lo < hi) mask.mask_row(i0 + r, j0 + lo, row + lo, hi - lo, ranges[r]);
        alpha[r] = weights.step(row + lo, hi - lo, state);
        if (strip.begin < lo) std::fill(row + strip.begin, row + lo, S(0));
        if (hi < strip.end) std::fill(row + hi, row + strip.end, S(0));
      }
      // Values are read in place when their rows are whole packets; otherwise packed (zero padded) per key tile.
      RhsPanels<S> values{v.row(j0), K::kCols, v.row_stride};
      if (!values_in_place) {
        if (!packed) pack_rows(v, j0, cols, dv_pad, ws.values.data());
        values = {ws.values.data(), cols * K::kCols, 0};
      }
      // A partial tile's zero weights must not meet a NaN or Inf value (0 * NaN), so they are skipped, which costs
      // a compare per weight; when the tile's values are all finite, 0 * v adds exactly nothing and the plain
      // kernel does (measured 1.5x faster for P V). One check per key tile: 1 / rows of the product's work.
      const bool skip_zeros =
          kind == TileKind::kPartial && !(values_in_place ? finite_value_rows(v, j0, cols, ws.finite_values)
                                                          : all_finite(ws.values.data(), 1, cols * dv_pad, 0));
      if (skip_zeros)
        tile_product<S, true>(ws.scores.data(), cols_pad, rows, values, cols, dv_pad, acc, dv_pad, alpha,
                              {nullptr, limits.depth}, &ws.ahead);
      else
        tile_product<S, false>(ws.scores.data(), cols_pad, rows, values, cols, dv_pad, acc, dv_pad, alpha,
                               {nullptr, limits.depth}, &ws.ahead);
    };

    // Walks the key tiles of rows [r0, r0 + rows) (several query tiles when `shared`, each key tile then packed
    // once for all of them): the tiles of each key span, cols at a time from the span's start.
    const auto walk = [&](Index r0, Index rows, bool shared) {
      const KeyRange hull = hull_of(r0, rows);
      ws.spans.clear();
      if (!hull.empty()) mask.key_spans(b0 + r0, rows, hull, ws.spans);
      const Index i0 = b0 + r0;
      const KeyRange before = i0 > 0 ? intersect(mask.row_range(i0 - 1), keys) : KeyRange{0, 0};
      const Index seen_end = before.empty() ? 0 : before.end;
      for (size_t s = 0; s < ws.spans.size(); ++s)
        for (Index j0 = ws.spans[s].begin; j0 < ws.spans[s].end; j0 += plan.cols) {
          const Index cols = std::min(plan.cols, ws.spans[s].end - j0);
          KeyRange next{j0 + cols, std::min(ws.spans[s].end, j0 + cols + plan.cols)};  // the next key tile, if any
          if (next.empty() && s + 1 < ws.spans.size())
            next = {ws.spans[s + 1].begin, std::min(ws.spans[s + 1].end, ws.spans[s + 1].begin + plan.cols)};
          fetch_next(next.empty() ? nullptr : &next, i0 + rows, rows, seen_end, hull.end, cols, ws);
          if (!shared) {
            run_key_tile(r0, rows, j0, cols, nullptr);
            continue;
          }
          if (values_in_place)  // as in run_key_tile, for the first query tile
            for (Index j = j0; j < j0 + cols; ++j) prefetch_row(v.row(j), dv);
          const S* const keys_t = pack_key_tile(k, j0, cols, round_up(cols, K::kPacket), plan, ws);
          if (!values_in_place) pack_rows(v, j0, cols, dv_pad, ws.values.data());
          for (Index t0 = r0; t0 < r0 + rows; t0 += plan.rows)
            run_key_tile(t0, std::min(plan.rows, r0 + rows - t0), j0, cols, keys_t);
        }
    };
    // The query tiles share the block's key tiles when every one of them walks the same tiles as the block, cut
    // short: all their key ranges start at one key and the mask walks each hull as one span (dense, causal, key
    // padding). Then a tile's results are bit for bit those of its own walk (a key tile past a tile's keys is empty
    // for it, and the one holding its last keys gives them the same products and sums); otherwise each walks alone.
    const KeyRange block_hull = hull_of(0, brows);
    const auto walks_its_hull = [&](Index r0, Index rows, KeyRange h) {  // one span from block_hull's first key
      ws.spans.clear();
      mask.key_spans(b0 + r0, rows, h, ws.spans);
      return h.begin == block_hull.begin && ws.spans.size() == 1 && ws.spans[0].begin == h.begin &&
             ws.spans[0].end == h.end;
    };
    bool shared = brows > plan.rows && !short_queries && !block_hull.empty() && walks_its_hull(0, brows, block_hull);
    for (Index t0 = 0; shared && t0 < brows; t0 += plan.rows) {
      const Index rows = std::min(plan.rows, brows - t0);
      const KeyRange h = hull_of(t0, rows);
      shared = h.empty() || walks_its_hull(t0, rows, h);
    }
    if (shared)
      walk(0, brows, true);
    else
      for (Index t0 = 0; t0 < brows; t0 += plan.rows) walk(t0, std::min(plan.rows, brows - t0), false);

    for (Index r = 0; r < brows; ++r) {
      const S inv = weights.finish(b0 + r, ws.stats[size_t(r)]);
      const S* a = ws.acc.data() + r * dv_pad;
      S* dst = out.row(b0 + r);
      store_scaled(a, inv, dv, dst, stream_out);
      if (out.writes_lse()) out.lse[(b0 + r) * out.lse_stride] = ws.stats[size_t(r)].log_sum_exp();
    }
    if (stream_out) stream_fence();
  };
  if (workspace) {
    workspace->fit(plan, d, dv, !short_queries, !values_in_place);
    for (Index t = 0; t < blocks; ++t) run_block(t, *workspace);
    return;
  }
  const auto make_workspace = [&] {
    CachedWorkspace<S> ws;
    ws.get().fit(plan, d, dv, !short_queries, !values_in_place);
    return ws;
  };
  parallel_for(blocks, o.threads, make_workspace, [&](Index t, CachedWorkspace<S>& ws) { run_block(t, ws.get()); });
}

/// Folds a partial result (part, part_lse) over more keys into (out, lse), both normalised over their own keys: with
/// w = exp(min - max) of the two log-sum-exps, the weights are 1 / (1 + w) and w / (1 + w). One exp, one log1p.
template <class S>
void merge_into(S* out, S& lse, const S* part, S part_lse, Index dv) {
  constexpr S kNegInf = -std::numeric_limits<S>::infinity();
  if (part_lse == kNegInf) return;
  if (lse == kNegInf) {  // nothing yet: take the part as it is
    std::copy(part, part + dv, out);
    lse = part_lse;
    return;
  }
  const bool part_larger = part_lse > lse;
  const S w = std::exp(part_larger ? lse - part_lse : part_lse - lse), big = S(1) / (S(1) + w), small = w * big;
  const S a = part_larger ? small : big, b = part_larger ? big : small;
  for (Index c = 0; c < dv; ++c) out[c] = a * out[c] + b * part[c];
  lse = std::max(lse, part_lse) + std::log1p(w);
}

/// Combines attention computed separately over `parts` disjoint key ranges into attention over their union, row by
/// row, folding the parts in order with merge_into. Part p of row i is at outputs + (p * rows + i) * dv and
/// lses[p * rows + i]. Rows with no key in any range get zeros (and lse -inf). With out.continues, into what out holds.
template <class S>
void merge_key_ranges(const S* outputs, const S* lses, Index parts, Index rows, Index dv,
                      const AttentionOutput<S>& out) {
  for (Index i = 0; i < rows; ++i) {
    S* dst = out.row(i);
    S lse = out.continues ? out.lse[i * out.lse_stride] : -std::numeric_limits<S>::infinity();
    if (lse == -std::numeric_limits<S>::infinity()) std::fill(dst, dst + dv, S(0));
    for (Index p = 0; p < parts; ++p) merge_into(dst, lse, outputs + (p * rows + i) * dv, lses[p * rows + i], dv);
    if (out.writes_lse()) out.lse[i * out.lse_stride] = lse;
  }
}

/// One attention problem of a batch: queries, keys, values, its mask model and logit scale, and its destination.
template <class S, class Mask>
struct AttentionCall {
  StridedView<S> q, k, v;
  Mask mask;
  S scale;
  AttentionOutput<S> out;
};

/// Split-K ("flash decoding", Dao et al. 2023) pays when a few query rows meet many keys: their one or few query tiles
/// would leave threads idle. Which calls split, and into which chunks, depends on the shapes alone, so the result
/// never depends on the thread count. Decoding shapes (at most a micro-kernel's rows) take chunks of kSplitKeys keys
/// from 1024 keys on. Up to kSplitRows rows (a prefill's short chunk against a long cache, cross-attention over a long
/// memory) take chunks of kWideSplitKeys from 8192 keys on. Whole, such a call has one or two query tiles for all the
/// threads: two threads ran 8 / 32 / 64 rows over 65536 keys (d = 64, Zen 4, bench_sdpa's BM_Prefill) at 1.1-1.4 /
/// 1.4-1.7 / 1.5-1.8x one thread's speed, split at 2.2-2.4 / 2.0-2.1 / 2.0x. One thread's time moved within the
/// noise (0.97-1.04x in a driver alternating the two). From 96 rows on the query tiles keep two threads busy (split:
/// 0.95-0.99x the time); with more threads than that the limit would lie higher.
constexpr Index kSplitKeys = 512, kSplitRows = 64, kWideSplitKeys = 4096;

/// Keys per split-K chunk for calls of `rows` query rows.
template <class S>
Index split_chunk_keys(Index rows) {
  return rows <= KernelShape<S>::kRows ? kSplitKeys : kWideSplitKeys;
}

template <class S>
bool use_split_keys(Index rows, Index m) {
  return rows <= kSplitRows && m >= 2 * split_chunk_keys<S>(rows);
}

/// Runs `calls` with the same number of query rows, keys and values columns split-K: each task takes one chunk of
/// keys through every call while the chunk is in cache (one reused workspace per worker), and the chunks are merged
/// exactly through their log-sum-exps.
template <class S, class Mask>
void split_key_attention(const AttentionCall<S, Mask>* calls, Index count, const AttentionOptions& o) {
  const Index rows = calls[0].q.rows, m = calls[0].k.rows, dv = calls[0].v.cols;
  const Index chunk = split_chunk_keys<S>(rows), chunks = (m + chunk - 1) / chunk;
  AttentionOptions serial = o;
  serial.threads = 1;
  Eigen::Matrix<S, Eigen::Dynamic, 1> partial(count * chunks * rows * dv), lse(count * chunks * rows);
  parallel_for(
      chunks, o.threads, [] { return CachedWorkspace<S>(); },
      [&](Index c, CachedWorkspace<S>& cached) {
        AttentionWorkspace<S>& ws = cached.get();
        const KeyRange keys{c * chunk, std::min(m, (c + 1) * chunk)};
        for (Index i = 0; i < count; ++i) {
          const AttentionCall<S, Mask>& call = calls[i];
          const Index first = (i * chunks + c) * rows;
          fused_attention(call.q, call.k, call.v, call.mask, call.scale, serial,
                          AttentionOutput<S>{partial.data() + first * dv, dv, lse.data() + first}, keys, &ws);
        }
      });
  for (Index i = 0; i < count; ++i)
    merge_key_ranges(partial.data() + i * chunks * rows * dv, lse.data() + i * chunks * rows, chunks, rows, dv,
                     calls[i].out);
}

/// Heap bytes run_attention allocates for `count` calls shaped alike (`rows` query rows over m keys, key width dk,
/// value width dv): one tile workspace per worker, and split-K's partial outputs when the calls split their keys
/// (use_split_keys). Each workspace buffer is counted with its allocation overhead.
template <class S>
Index attention_calls_workspace_bytes(Index count, Index rows, Index m, Index dk, Index dv, const AttentionOptions& o) {
  if (count == 0 || rows == 0) return 0;
  const Index threads = resolve_threads(o.threads);
  // Split-K chunks and calls spread one per thread run with one thread each, and their query tiles follow that.
  const bool one_thread_each = use_split_keys<S>(rows, m) || (count >= threads && threads > 1);
  AttentionOptions per_call = o;
  if (one_thread_each) per_call.threads = 1;
  const TilePlan plan = plan_tiles<S>(rows, m, dk, dv, per_call);
  const Index workspace = AttentionWorkspace<S>::bytes(plan, dk, dv) + 10 * kAllocationOverhead;
  if (use_split_keys<S>(rows, m)) {
    const Index chunk = split_chunk_keys<S>(rows), chunks = (m + chunk - 1) / chunk;
    return heap_bytes<S>(count * chunks * rows * dv) + heap_bytes<S>(count * chunks * rows) +
           std::min(threads, chunks) * workspace;
  }
  const Index blocks = (rows + plan.rows * plan.group - 1) / (plan.rows * plan.group);
  const Index workers = one_thread_each ? std::min(threads, count) : std::min(threads, blocks);
  return heap_bytes<const void*>(count) + std::max<Index>(workers, 1) * workspace;
}

/// The one entry point of exact attention: runs every call. Runs of consecutive calls of a few query rows over many
/// keys (use_split_keys, same shapes) go split-K; the others run whole, in parallel one thread each when there
/// are at least as many of them as threads, otherwise one after another with every thread on its query tiles. Which
/// path a call takes depends on the shapes only, so results are the same for any thread count.
template <class S, class Mask>
void run_attention(const std::vector<AttentionCall<S, Mask>>& calls, const AttentionOptions& o) {
  const auto same_shape = [](const AttentionCall<S, Mask>& a, const AttentionCall<S, Mask>& b) {
    return a.q.rows == b.q.rows && a.k.rows == b.k.rows && a.v.cols == b.v.cols;
  };
  std::vector<const AttentionCall<S, Mask>*> whole;
  for (size_t i = 0; i < calls.size();) {
    if (!use_split_keys<S>(calls[i].q.rows, calls[i].k.rows)) {
      whole.push_back(&calls[i++]);
      continue;
    }
    size_t end = i + 1;
    while (end < calls.size() && same_shape(calls[i], calls[end])) ++end;
    split_key_attention(&calls[i], Index(end - i), o);
    i = end;
  }
  for_each_item(Index(whole.size()), o.threads, [&](Index i, int threads) {
    const AttentionCall<S, Mask>& c = *whole[size_t(i)];
    AttentionOptions per_call = o;
    per_call.threads = threads;
    fused_attention(c.q, c.k, c.v, c.mask, c.scale, per_call, c.out);
  });
}

}  // namespace attnkit::detail
