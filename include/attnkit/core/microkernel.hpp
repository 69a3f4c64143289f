// attnkit: the register-blocked micro-kernel behind every fused product (S = Q K^T and O = alpha O + P V), written
// once over Eigen's packet math so it runs on AVX-512, AVX2, SSE, NEON or plain scalars alike.
#pragma once

#include <algorithm>

#include "mask.hpp"
#include "types.hpp"
#include "view.hpp"

#if defined(__clang__)
#define ATTNKIT_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define ATTNKIT_UNROLL _Pragma("GCC unroll 16")
#else
#define ATTNKIT_UNROLL
#endif

// Packet types carry vector attributes that GCC drops, with a warning, when they are template arguments (as in
// PacketBlock<Packet, N>); Eigen silences the same warning in its own headers.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

namespace attnkit::detail {

/// Register blocking: kRows rows x kPackets packets of accumulators, sized to the vector register file.
template <class S>
struct KernelShape {
  using Packet = typename Eigen::internal::packet_traits<S>::type;
  static constexpr int kPacket = Eigen::internal::packet_traits<S>::size;
#if defined(EIGEN_VECTORIZE_AVX512)
  static constexpr int kRows = 6, kPackets = 4;  // 24 accumulators + 4 loads + 1 broadcast of 32 zmm registers
#elif defined(EIGEN_VECTORIZE)
  static constexpr int kRows = 6, kPackets = 2;  // 12 accumulators + 2 loads + 1 broadcast of 16 registers
#else
  static constexpr int kRows = 4, kPackets = 4;
#endif
  static constexpr int kCols = kPackets * kPacket;  // width of a packed panel
};

constexpr Index round_up(Index x, Index to) { return (x + to - 1) / to * to; }

/// C = beta .* C + A B for one R x (NP packets) block (R <= kRows): A is R rows at stride lda, B is depth rows of
/// NP * kPacket contiguous values at stride ldb. beta == nullptr means C = A B (C is not read). With kSkipZeros, a zero
/// a(r, k) contributes nothing even when row k of B holds NaN or Inf: that is how masked values stay unread in spirit.
template <class S, int kRows, int NP, bool kSkipZeros>
inline void micro_kernel(const S* a, Index lda, const S* b, Index ldb, Index depth, S* c, Index ldc, const S* beta) {
  using namespace Eigen::internal;
  using K = KernelShape<S>;
  using Packet = typename K::Packet;
  constexpr int P = K::kPacket;
  Packet acc[kRows][NP];
  ATTNKIT_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const Packet scale = pset1<Packet>(beta ? beta[r] : S(0));
    ATTNKIT_UNROLL
    for (int p = 0; p < NP; ++p) acc[r][p] = beta ? pmul(scale, ploadu<Packet>(c + r * ldc + p * P)) : pset1<Packet>(0);
  }
  for (Index k = 0; k < depth; ++k, b += ldb) {
    Packet bk[NP];
    ATTNKIT_UNROLL
    for (int p = 0; p < NP; ++p) bk[p] = ploadu<Packet>(b + p * P);
    ATTNKIT_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const S ark = a[r * lda + k];
      if constexpr (kSkipZeros) {
        if (ark == S(0)) continue;
      }
      const Packet av = pset1<Packet>(ark);
      ATTNKIT_UNROLL
      for (int p = 0; p < NP; ++p) acc[r][p] = pmadd(av, bk[p], acc[r][p]);
    }
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < kRows; ++r) {
    ATTNKIT_UNROLL
    for (int p = 0; p < NP; ++p) pstoreu(c + r * ldc + p * P, acc[r][p]);
  }
}

/// Dispatches a block of `rows` (1..kRows) rows and `packets` (1..kPackets) packets to its unrolled micro-kernel.
template <class S, bool kSkipZeros, int R = KernelShape<S>::kRows, int NP = KernelShape<S>::kPackets>
inline void micro_kernel_block(int rows, int packets, const S* a, Index lda, const S* b, Index ldb, Index depth, S* c,
                               Index ldc, const S* beta) {
  if constexpr (R > 1) {
    if (rows < R)
      return micro_kernel_block<S, kSkipZeros, R - 1, NP>(rows, packets, a, lda, b, ldb, depth, c, ldc, beta);
  }
  if constexpr (NP > 1) {
    if (packets < NP)
      return micro_kernel_block<S, kSkipZeros, R, NP - 1>(rows, packets, a, lda, b, ldb, depth, c, ldc, beta);
  }
  micro_kernel<S, R, NP, kSkipZeros>(a, lda, b, ldb, depth, c, ldc, beta);
}

/// The right-hand side B of a tile product, as panels of kCols columns: panel p starts at data + p * panel_stride
/// and its rows are row_stride apart, or, with row_stride == 0 (packed), as far apart as the panel is wide.
template <class S>
struct RhsPanels {
  const S* data;
  Index panel_stride;
  Index row_stride;
};

/// Where the non-zero work of each strip of kRows rows lies in a tile product (banded and diagonal tiles): strip s
/// needs only columns [cols[s].begin, cols[s].end) of C, and only depth [depth[s].begin, depth[s].end) of A (the rest
/// of its A row is zero). Either pointer may be null (no limit). Columns outside the limit are left unwritten.
struct StripLimits {
  const KeyRange* cols = nullptr;
  const KeyRange* depth = nullptr;
};

/// C[rows x cols] = beta .* C + A[rows x depth] B[depth x cols], cols a multiple of kPacket. A last block of fewer
/// than kRows rows gets a smaller kernel, so short tiles (a decoding query) do no padded work.
template <class S, bool kSkipZeros>
void tile_product(const S* a, Index lda, Index rows, const RhsPanels<S>& b, Index depth, Index cols, S* c, Index ldc,
                  const S* beta, StripLimits limits = {}) {
  using K = KernelShape<S>;
  const S* panel = b.data;
  for (Index col = 0; col < cols; col += K::kCols, panel += b.panel_stride) {
    const Index width = std::min<Index>(K::kCols, cols - col);
    const int packets = static_cast<int>(width / K::kPacket);
    const Index ldb = b.row_stride > 0 ? b.row_stride : width;
    for (Index r = 0, s = 0; r < rows; r += K::kRows, ++s) {
      Index p0 = 0, p1 = packets;  // packets of this panel the strip needs
      if (limits.cols) {
        p0 = std::clamp<Index>(limits.cols[s].begin - col, 0, width) / K::kPacket;
        p1 = (std::clamp<Index>(limits.cols[s].end - col, 0, width) + K::kPacket - 1) / K::kPacket;
        if (p1 <= p0) continue;
      }
      Index k0 = 0, k1 = depth;
      if (limits.depth)
        k0 = std::min(limits.depth[s].begin, depth), k1 = std::max(k0, std::min(limits.depth[s].end, depth));
      micro_kernel_block<S, kSkipZeros>(static_cast<int>(std::min<Index>(K::kRows, rows - r)), int(p1 - p0),
                                        a + r * lda + k0, lda, panel + k0 * ldb + p0 * K::kPacket, ldb, k1 - k0,
                                        c + r * ldc + col + p0 * K::kPacket, ldc, beta ? beta + r : nullptr);
    }
  }
}

/// Packs rows [j0, j0 + count) of x (count x width, width <= x.cols) as the right-hand side B = x^T of a product
/// (B is width x count_pad): panel p holds, for each of the `width` rows k, columns p*kCols.. of B. Zero padded.
/// Whole kPacket x kPacket blocks of row-contiguous x go through an in-register transpose.
template <class S>
void pack_transposed(const StridedView<S>& x, Index j0, Index count, Index count_pad, S* dst) {
  using namespace Eigen::internal;
  using K = KernelShape<S>;
  using Packet = typename K::Packet;
  constexpr Index P = K::kPacket;
  const Index width = x.cols;
  const Index width_blocked = x.row_contiguous() ? width / P * P : 0;
  for (Index col = 0; col < count_pad; col += K::kCols) {
    const Index w = std::min<Index>(K::kCols, count_pad - col);
    const Index full = std::clamp<Index>(count - col, 0, w) / P * P;  // keys in whole blocks of P
    for (Index c = 0; c < full; c += P) {
      for (Index k = 0; k < width_blocked; k += P) {
        PacketBlock<Packet, P> block;
        for (Index r = 0; r < P; ++r) block.packet[r] = ploadu<Packet>(x.row(j0 + col + c + r) + k);
        ptranspose(block);
        for (Index r = 0; r < P; ++r) pstoreu(dst + (k + r) * w + c, block.packet[r]);
      }
      for (Index r = 0; r < P; ++r) {
        const S* src = x.row(j0 + col + c + r);
        for (Index k = width_blocked; k < width; ++k) dst[k * w + c + r] = src[k * x.col_stride];
      }
    }
    for (Index c = full; c < w; ++c) {
      const bool valid = col + c < count;
      const S* src = valid ? x.row(j0 + col + c) : nullptr;
      for (Index k = 0; k < width; ++k) dst[k * w + c] = valid ? src[k * x.col_stride] : S(0);
    }
    dst += width * w;
  }
}

/// Packs rows [j0, j0 + count) of x as the right-hand side B = x (count x cols_pad, zero columns past x.cols), in
/// panels of kCols columns; panel p starts at dst + p * count * kCols.
template <class S>
void pack_rows(const StridedView<S>& x, Index j0, Index count, Index cols_pad, S* dst) {
  using K = KernelShape<S>;
  for (Index col = 0; col < cols_pad; col += K::kCols) {
    const Index w = std::min<Index>(K::kCols, cols_pad - col);
    const Index valid = std::clamp<Index>(x.cols - col, 0, w);
    S* d = dst + col * count;
    for (Index j = 0; j < count; ++j, d += w) {
      const S* src = x.row(j0 + j);
      for (Index c = 0; c < valid; ++c) d[c] = src[(col + c) * x.col_stride];
      for (Index c = valid; c < w; ++c) d[c] = S(0);
    }
  }
}

}  // namespace attnkit::detail

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
