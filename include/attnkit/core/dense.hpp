// attnkit: y = x W + b, the projection every layer needs, on the core micro-kernel. One pass over the depth per
// output element and fixed blocks of rows make the result identical for any thread count (a library GEMM may
// re-block its depth when it runs threads of its own).
#pragma once

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "mask.hpp"
#include "microkernel.hpp"
#include "threading.hpp"
#include "types.hpp"
#include "view.hpp"

namespace attnkit::detail {

/// Every row of x may be non-zero over its whole depth (a plain product).
struct FullDepth {
  KeyRange operator()(Index /*r0*/, Index /*rows*/) const { return KeyRange::all(); }
};

/// The blocks of dense(): tasks of kRows rows by kCols columns, each over the depth kDepth rows of w at a time. A depth
/// block's panel of w (128 rows of 64 columns with AVX-512, 32 KiB) stays in cache across the task's strips; over a
/// whole depth of 512 or 1024 (a 1024-column w at a row stride of 4 KiB) it did not, and 256 x 512 x 1024 and
/// 256 x 1024 x 512 ran at 87-90 GFLOP/s against 143-157 in depth blocks (64 to 256 measured alike).
template <class S>
struct DenseBlock {
  static constexpr Index kRows = 16 * KernelShape<S>::kRows, kCols = 8 * KernelShape<S>::kCols, kDepth = 128;
};

/// Fewer rows of x than a micro-kernel strip (decoding a token) stream w instead: the depth in fixed parts, each a
/// contiguous block of w's rows read once from start to end, so that the hardware prefetcher follows it and the parts
/// run on every thread (tasks of 512 columns over half-page rows, one per 256-column projection, had two threads read
/// w at 1.1x one thread's rate). The parts depend on the depth only, never on the thread count.
struct StreamParts {
  Index parts, rows;  // parts of `rows` rows of w each (the last one shorter)
  static StreamParts of(Index depth) {
    const Index parts = std::clamp<Index>((depth + 127) / 128, 1, 16);
    return {parts, std::max<Index>(1, (depth + parts - 1) / parts)};
  }
};

/// acc[c] += x[0] w[0][c] + ... + x[R-1] w[R-1][c] (in that order) for c < width: up to four rows of w per load and
/// store of the partial sums.
template <class S, int R>
inline void add_rows(S* acc, const S* x, const S* const* w, Index width) {
  using namespace Eigen::internal;
  using Packet = typename KernelShape<S>::Packet;
  constexpr Index P = KernelShape<S>::kPacket;
  Packet xr[R];
  for (int r = 0; r < R; ++r) xr[r] = pset1<Packet>(x[r]);
  Index c = 0;
  for (; c + P <= width; c += P) {
    Packet a = ploadu<Packet>(acc + c);
    for (int r = 0; r < R; ++r) a = pmadd(xr[r], ploadu<Packet>(w[r] + c), a);
    pstoreu(acc + c, a);
  }
  for (; c < width; ++c)
    for (int r = 0; r < R; ++r) acc[c] += x[r] * w[r][c];
}

/// y (n x c at row stride y_stride) = x (n x k, any strides) * w (k x c, rows contiguous) + b (1 x c, or empty), in
/// parallel over tasks of (kDenseRows rows) x (kDenseCols columns). A block of at least kRows rows runs the
/// micro-kernel (w read in place when its rows are whole packets, otherwise packed once per call), one depth block
/// after another, each continuing the block's sums where the last one stored them: every output element is one pass
/// over k in order. Fewer rows, as when decoding a token, stream w in the fixed depth parts of StreamParts, each
/// into a partial sum (y_r += x_rk w_k, four rows of w at a time), and add the parts in order. Which path, which
/// blocks and which parts depend on the shapes only, so the result is the same for any thread count.
///
/// `row_depth(r0, rows)` may say that rows [r0, r0 + rows) of x are zero outside a range of columns (attention
/// probabilities under a causal or banded mask): the product then skips the rest of the depth, and skips zeros inside
/// it, so a NaN or Inf in a row of w that those rows cannot see never reaches them.
template <class S, class RowDepth = FullDepth>
void dense(const StridedView<S>& x, const StridedView<S>& w, const Matrix<S>& b, S* y, Index y_stride, int threads,
           const RowDepth& row_depth = {}) {
  using K = KernelShape<S>;
  constexpr bool kLimited = !std::is_same_v<RowDepth, FullDepth>;
  constexpr Index kDenseRows = DenseBlock<S>::kRows, kDenseCols = DenseBlock<S>::kCols, kDepth = DenseBlock<S>::kDepth;
  constexpr Index kStrips = kDenseRows / K::kRows;
  const Index n = x.rows, depth = w.rows, cols = w.cols;
  if (n == 0 || cols == 0) return;
  const auto depth_of = [&](Index r0, Index rows) {
    const KeyRange r = intersect(row_depth(r0, rows), {0, depth});
    return r.empty() ? KeyRange{0, 0} : r;
  };
  if (n < K::kRows) {
    const StreamParts sp = StreamParts::of(depth);
    const Index width_blocks = (cols + kDenseCols - 1) / kDenseCols;
    Eigen::Matrix<S, Eigen::Dynamic, 1> partial(sp.parts * n * cols);  // part p, row r at (p * n + r) * cols
    parallel_for(sp.parts * width_blocks, threads, [] { return 0; }, [&](Index task, int&) {
      const Index p = task / width_blocks, c0 = task % width_blocks * kDenseCols;
      const Index width = std::min(kDenseCols, cols - c0);
      for (Index r = 0; r < n; ++r) {
        S* acc = partial.data() + (p * n + r) * cols + c0;
        std::fill(acc, acc + width, S(0));
        const KeyRange ks = intersect(depth_of(r, 1), {p * sp.rows, std::min(depth, (p + 1) * sp.rows)});
        if (ks.empty()) continue;
        S xs[4];
        const S* ws[4];
        int f = 0;
        for (Index k = ks.begin; k < ks.end; ++k) {
          const S xk = x(r, k);
          if (kLimited && xk == S(0)) continue;  // a zero weight never meets w's row (it may hold NaN)
          xs[f] = xk, ws[f] = w.row(k) + c0;
          if (++f == 4) add_rows<S, 4>(acc, xs, ws, width), f = 0;
        }
        if (f == 3) add_rows<S, 3>(acc, xs, ws, width);
        if (f == 2) add_rows<S, 2>(acc, xs, ws, width);
        if (f == 1) add_rows<S, 1>(acc, xs, ws, width);
      }
    });
    for (Index r = 0; r < n; ++r) {
      Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>> out(y + r * y_stride, cols);
      out = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>(partial.data() + r * cols, cols);
      for (Index p = 1; p < sp.parts; ++p)
        out += Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>(partial.data() + (p * n + r) * cols, cols);
      if (b.size() > 0) out += b.row(0);
    }
    return;
  }
  const Index row_blocks = (n + kDenseRows - 1) / kDenseRows, col_blocks = (cols + kDenseCols - 1) / kDenseCols;
  Eigen::Matrix<S, Eigen::Dynamic, 1> packed_w;
  RhsPanels<S> rhs{w.data, K::kCols, w.row_stride};
  if (cols % K::kPacket != 0 || !w.row_contiguous()) {
    const Index cols_pad = round_up(cols, K::kPacket);
    packed_w.resize(round_up(cols_pad, K::kCols) * depth);
    pack_rows(w, 0, depth, cols_pad, packed_w.data());
    rhs = {packed_w.data(), depth * K::kCols, 0};
  }
  struct Scratch {
    Eigen::Matrix<S, Eigen::Dynamic, 1> a, c;
    KeyRange strips[kStrips], block_strips[kStrips];
  };
  static const std::array<S, kDenseRows> ones = [] {  // beta for the depth blocks after the first: continue the sums
    std::array<S, kDenseRows> o;
    o.fill(S(1));
    return o;
  }();
  parallel_for(
      row_blocks * col_blocks, threads,
      [&] {
        Scratch s;
        if (!x.row_contiguous()) s.a.resize(kDenseRows * depth);
        s.c.resize(kDenseRows * round_up(kDenseCols, K::kPacket));
        return s;
      },
      [&](Index task, Scratch& s) {
        const Index r0 = task / col_blocks * kDenseRows, rows = std::min(kDenseRows, n - r0);
        const Index c0 = task % col_blocks * kDenseCols, width = std::min(kDenseCols, cols - c0);
        const Index width_pad = round_up(width, K::kPacket);
        const auto bias = [&](Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>> out) {
          if (b.size() > 0) out += b.row(0).segment(c0, width);
        };
        const S* a = x.row(r0);
        Index lda = x.row_stride;
        if (!x.row_contiguous()) {
          for (Index r = 0; r < rows; ++r)
            for (Index k = 0; k < depth; ++k) s.a[r * depth + k] = x(r0 + r, k);
          a = s.a.data(), lda = depth;
        }
        const RhsPanels<S> panels{rhs.data + c0 / K::kCols * rhs.panel_stride, rhs.panel_stride, rhs.row_stride};
        const Index strips = (rows + K::kRows - 1) / K::kRows;
        if constexpr (kLimited) {
          for (Index r = 0, t = 0; r < rows; r += K::kRows, ++t)
            s.strips[t] = depth_of(r0 + r, std::min<Index>(K::kRows, rows - r));
        }
        for (Index k0 = 0; k0 < std::max<Index>(depth, 1); k0 += kDepth) {
          const KeyRange block{k0, std::min(depth, k0 + kDepth)};
          for (Index t = 0; t < strips; ++t) {  // the block, or the part of it a strip's rows reach
            const KeyRange g = kLimited ? intersect(s.strips[t], block) : block;
            s.block_strips[t] = g.empty() ? KeyRange{0, 0} : g;
          }
          const S* beta = k0 == 0 ? nullptr : ones.data();
          tile_product<S, kLimited>(a, lda, rows, panels, depth, width_pad, s.c.data(), width_pad, beta,
                                    {nullptr, s.block_strips});
        }
        for (Index r = 0; r < rows; ++r) {
          Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>> out(y + (r0 + r) * y_stride + c0, width);
          out = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>(s.c.data() + r * width_pad, width);
          bias(out);
        }
      });
}

/// Heap bytes dense() allocates for x (n x depth) times w (depth x cols) on `threads` threads: a packed copy of w
/// when its columns are not whole packets or its rows are strided, one result block per worker, and per worker a
/// copy of a block of x's rows when they are strided. For fewer than KernelShape::kRows rows, the partial sums of the
/// depth parts (StreamParts).
template <class S>
Index dense_workspace_bytes(Index n, Index depth, Index cols, int threads, bool x_rows_contiguous = true,
                            bool w_rows_contiguous = true) {
  using K = KernelShape<S>;
  using B = DenseBlock<S>;
  if (n == 0 || cols == 0) return 0;
  if (n < K::kRows) return heap_bytes<S>(StreamParts::of(depth).parts * n * cols);  // the parts' partial sums
  Index bytes = 0;
  if (cols % K::kPacket != 0 || !w_rows_contiguous)
    bytes += heap_bytes<S>(round_up(round_up(cols, K::kPacket), K::kCols) * depth);
  const Index tasks = ((n + B::kRows - 1) / B::kRows) * ((cols + B::kCols - 1) / B::kCols);
  const Index workers = std::max<Index>(1, std::min<Index>(resolve_threads(threads), tasks));
  const Index per_worker = heap_bytes<S>(B::kRows * round_up(B::kCols, K::kPacket)) +
                           (x_rows_contiguous ? 0 : heap_bytes<S>(B::kRows * depth));
  return bytes + workers * per_worker;
}

/// y (resized to n x c) = x * w + b for a whole row-major w: the projections of every layer.
template <class S>
void dense(const StridedView<S>& x, const Matrix<S>& w, const Matrix<S>& b, Matrix<S>& y, int threads) {
  y.resize(x.rows, w.cols());
  dense(x, matrix_view(w), b, y.data(), y.cols(), threads);
}

}  // namespace attnkit::detail
