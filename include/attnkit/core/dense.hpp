// attnkit: y = x W + b, the projection every layer needs, on the core micro-kernel. One pass over the depth per
// output element and fixed blocks of rows make the result identical for any thread count (a library GEMM may
// re-block its depth when it runs threads of its own).
#pragma once

#include <algorithm>

#include "microkernel.hpp"
#include "threading.hpp"
#include "types.hpp"
#include "view.hpp"

namespace attnkit::detail {

/// y (n x c, resized) = x (n x k, any strides) * w (k x c, row-major) + b (1 x c, or empty), in parallel over tasks
/// of (kDenseRows rows) x (kDenseCols columns). A block of at least kRows rows runs the micro-kernel (w read in place
/// when its rows are whole packets, otherwise packed once per call); fewer rows, as when decoding a token, stream the
/// rows of w instead (y_r += x_rk w_k). Which path and which blocks depend on the shapes only, never on the thread
/// count, and every output element is one pass over k in order, so the result is the same for any thread count.
template <class S>
void dense(const StridedView<S>& x, const Matrix<S>& w, const Matrix<S>& b, Matrix<S>& y, int threads) {
  using K = KernelShape<S>;
  constexpr Index kDenseRows = 16 * K::kRows, kDenseCols = 8 * K::kCols;
  const Index n = x.rows, depth = w.rows(), cols = w.cols();
  y.resize(n, cols);
  if (n == 0 || cols == 0) return;
  const Index row_blocks = (n + kDenseRows - 1) / kDenseRows, col_blocks = (cols + kDenseCols - 1) / kDenseCols;
  Eigen::Matrix<S, Eigen::Dynamic, 1> packed_w;
  RhsPanels<S> rhs{w.data(), K::kCols, cols};
  if (cols % K::kPacket != 0 && n >= K::kRows) {
    const Index cols_pad = round_up(cols, K::kPacket);
    packed_w.resize(round_up(cols_pad, K::kCols) * depth);
    pack_rows(StridedView<S>{w.data(), depth, cols, cols, 1}, 0, depth, cols_pad, packed_w.data());
    rhs = {packed_w.data(), depth * K::kCols, 0};
  }
  struct Scratch {
    Eigen::Matrix<S, Eigen::Dynamic, 1> a, c;
  };
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
        if (rows < K::kRows) {
          for (Index r = 0; r < rows; ++r) {
            auto out = y.row(r0 + r).segment(c0, width);
            out.setZero();
            for (Index k = 0; k < depth; ++k) out += x(r0 + r, k) * w.row(k).segment(c0, width);
            if (b.size() > 0) out += b.row(0).segment(c0, width);
          }
          return;
        }
        const S* a = x.row(r0);
        Index lda = x.row_stride;
        if (!x.row_contiguous()) {
          for (Index r = 0; r < rows; ++r)
            for (Index k = 0; k < depth; ++k) s.a[r * depth + k] = x(r0 + r, k);
          a = s.a.data(), lda = depth;
        }
        const RhsPanels<S> panels{rhs.data + c0 / K::kCols * rhs.panel_stride, rhs.panel_stride, rhs.row_stride};
        tile_product<S, false>(a, lda, rows, panels, depth, width_pad, s.c.data(), width_pad, nullptr);
        for (Index r = 0; r < rows; ++r) {
          auto out = y.row(r0 + r).segment(c0, width);
          out = Eigen::Map<const Eigen::Matrix<S, 1, Eigen::Dynamic>>(s.c.data() + r * width_pad, width);
          if (b.size() > 0) out += b.row(0).segment(c0, width);
        }
      });
}

}  // namespace attnkit::detail
