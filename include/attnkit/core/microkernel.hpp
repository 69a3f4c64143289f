// attnkit: the register-blocked micro-kernel behind every fused product (S = Q K^T and O = alpha O + P V), written
// once over Eigen's packet math so it runs on AVX-512, AVX2, SSE, NEON or plain scalars alike.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

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

/// a * b + c for the micro-kernel. Packets go through Eigen's pmadd (one FMA instruction where the CPU has them).
/// Scalars (EIGEN_DONT_VECTORIZE) are fused by std::fma where the CPU fuses them fast (FP_FAST_FMA / FP_FAST_FMAF):
/// left to the compiler, `acc = beta * c` followed by `acc = a * b + acc` may be contracted either way round
/// (fma(a, b, beta * c) or fma(beta, c, a * b): GCC's default -ffp-contract=fast with -march=native did both, in
/// different instantiations), so a row's result depended on the shape of its strip, and so on the thread count.
template <class Packet>
inline Packet madd(const Packet& a, const Packet& b, const Packet& c) {
#if defined(FP_FAST_FMAF)
  if constexpr (std::is_same_v<Packet, float>) return std::fma(a, b, c);
#endif
#if defined(FP_FAST_FMA)
  if constexpr (std::is_same_v<Packet, double>) return std::fma(a, b, c);
#endif
  return Eigen::internal::pmadd(a, b, c);
}

/// A packet loaded once into a register for the several FMAs that use it. GCC otherwise may fold the load into each of
/// them as a memory operand: lane_block's 4 x 6 block took 25 loads for its 24 FMAs (10 needed) and weighted_rows'
/// 4 x 4 took 20 (8), and Zen 4 loads one 64-byte packet a cycle, so those kernels ran at the loads' pace. Held in
/// registers, atrous(128) on one thread took 0.84 / 0.89 / 0.82 / 0.84x the time at n = 1024 / 2048 / 4096 / 8192
/// (AVX2 build: 0.91-0.95x). An empty asm statement that "changes" the register is the only way to say so; elsewhere
/// (other compilers, other targets) it is a plain load.
template <class Packet>
EIGEN_ALWAYS_INLINE Packet load_to_register(const typename Eigen::internal::unpacket_traits<Packet>::type* from) {
  Packet x = Eigen::internal::ploadu<Packet>(from);
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (!std::is_arithmetic_v<Packet>) __asm__("" : "+v"(x));
#endif
  return x;
}

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
      for (int p = 0; p < NP; ++p) acc[r][p] = madd(av, bk[p], acc[r][p]);
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

/// Prefetches the `count` scalars from `p` (one row) for reading (or, kForWrite, for writing): into L2 (and L3) with
/// the default locality 2, into L1 as well with 3.
template <int kLocality = 2, bool kForWrite = false, class S>
inline void prefetch_row(const S* p, Index count) {
#if defined(__GNUC__)
  for (Index c = 0; c < count; c += 64 / Index(sizeof(S))) __builtin_prefetch(p + c, kForWrite ? 1 : 0, kLocality);
#else
  (void)p, (void)count;
#endif
}

/// Rows of matrices to bring into L2 (or L1) a few cache lines at a time while other work runs: the next chunk's inputs
/// while this chunk computes (linear attention's chunk loops). Rows read from beyond the caches stall the loop that
/// first touches them, and prefetching a whole chunk in one burst stalls it too, as soon as the core's line-fill
/// buffers are all busy; spread over the micro-kernel calls of the current chunk (tile_product calls step() before
/// each), the next chunk's loads overlap this chunk's arithmetic. Only a hint: results never depend on it. Views whose
/// rows are not contiguous are not prefetched. The fused tile loop uses it only for calls that stream past the caches
/// (streams_past_cache, or kFetchRows query rows and more over keys and values beyond the usable cache: the next key
/// tile's keys and values, or the next query tile's new ones): for rows that are in the caches anyway it measured
/// 2-6% slower.
class Lookahead {
 public:
  /// Where the lines go: L2 (prefetcht1, the default) or L1 (prefetcht0).
  enum class Into { kL2, kL1 };

  /// Where step() puts the queued lines (kept by clear()).
  void target(Into into) { into_ = into; }

  /// Forgets what is queued.
  void clear() { count_ = current_ = 0, total_lines_ = per_step_ = issued_ = 0; }

  /// Queues rows [r0, r1) of x (nothing for empty rows).
  template <class S>
  void add(const StridedView<S>& x, Index r0, Index r1) {
    if (!x.row_contiguous() || x.data == nullptr || x.cols == 0 || r0 >= r1 || count_ == kMaxRanges) return;
    Range& r = ranges_[count_++];
    r = {reinterpret_cast<const char*>(x.data),
         x.row_stride * Index(sizeof(S)),
         x.group_rows,
         x.group_stride * Index(sizeof(S)),
         x.cols * Index(sizeof(S)),
         r0,
         r1,
         0};
    total_lines_ += lines(r1 - r0, r.row_bytes);
  }

  /// The cache lines add() queues for `rows` rows of `row_bytes` bytes each (one more per row: a row may straddle a
  /// line).
  static constexpr Index lines(Index rows, Index row_bytes) { return rows * ((row_bytes + kLine - 1) / kLine + 1); }

  /// Spreads what is queued evenly over the next `steps` calls of step().
  void pace(Index steps) { per_step_ = (total_lines_ + std::max<Index>(steps, 1) - 1) / std::max<Index>(steps, 1); }

  /// Cache lines prefetched since clear() (each line of each queued row once).
  Index issued() const { return issued_; }

  /// Prefetches the next few queued cache lines.
  void step() {
    if (into_ == Into::kL1)
      step_into<3>();
    else
      step_into<2>();  // into L2 (and L3): the next tile is packed or read once from there
  }

 private:
  static constexpr Index kLine = 64;
  static constexpr int kMaxRanges = 4;

  /// step() with prefetches of this locality (3: L1, 2: L2).
  template <int kLocality>
  void step_into() {
    for (Index left = per_step_; left > 0 && current_ < count_;) {
      Range& r = ranges_[current_];
      if (r.row == r.end) {
        ++current_;
        continue;
      }
      const char* p = r.address(r.row);
      const char* first = align_down(p);
      const char* last = align_down(p + r.row_bytes - 1);
      for (; first + r.offset <= last && left > 0; r.offset += kLine, --left, ++issued_)
        prefetch_row<kLocality>(first + r.offset, 1);  // one line
      if (first + r.offset > last) r.offset = 0, ++r.row;
    }
  }
  struct Range {
    const char* data;
    Index row_stride, group_rows, group_stride, row_bytes, row, end, offset;
    const char* address(Index i) const {
      return group_rows > 0 ? data + (i / group_rows) * group_stride + (i % group_rows) * row_stride
                            : data + i * row_stride;
    }
  };
  static const char* align_down(const char* p) {
    return reinterpret_cast<const char*>(reinterpret_cast<std::uintptr_t>(p) & ~std::uintptr_t(kLine - 1));
  }
  Into into_ = Into::kL2;
  Range ranges_[kMaxRanges] = {};
  int count_ = 0, current_ = 0;
  Index total_lines_ = 0, per_step_ = 0, issued_ = 0;
};

/// Where the non-zero work of each strip of kRows rows lies in a tile product (banded and diagonal tiles): strip s
/// needs only columns [cols[s].begin, cols[s].end) of C, and only depth [depth[s].begin, depth[s].end) of A (the rest
/// of its A row is zero). Either pointer may be null (no limit). Columns outside the limit are left unwritten.
struct StripLimits {
  const KeyRange* cols = nullptr;
  const KeyRange* depth = nullptr;
};

/// C[rows x cols] = beta .* C + A[rows x depth] B[depth x cols], cols a multiple of kPacket. A last block of fewer
/// than kRows rows gets a smaller kernel, so short tiles (a decoding query) do no padded work. `ahead`, if given, is
/// stepped before each micro-kernel call (tile_steps of them at most).
template <class S, bool kSkipZeros>
void tile_product(const S* a, Index lda, Index rows, const RhsPanels<S>& b, Index depth, Index cols, S* c, Index ldc,
                  const S* beta, StripLimits limits = {}, Lookahead* ahead = nullptr) {
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
      if (ahead) ahead->step();
      micro_kernel_block<S, kSkipZeros>(static_cast<int>(std::min<Index>(K::kRows, rows - r)), int(p1 - p0),
                                        a + r * lda + k0, lda, panel + k0 * ldb + p0 * K::kPacket, ldb, k1 - k0,
                                        c + r * ldc + col + p0 * K::kPacket, ldc, beta ? beta + r : nullptr);
    }
  }
}

/// The number of micro-kernel calls of a tile_product of rows x cols (without strip limits): the steps over which a
/// Lookahead can be paced.
template <class S>
constexpr Index tile_steps(Index rows, Index cols) {
  using K = KernelShape<S>;
  return (rows + K::kRows - 1) / K::kRows * ((cols + K::kCols - 1) / K::kCols);
}

/// Transposes a block of kPacket x kPacket in registers. Eigen's ptranspose, except for AVX-512 floats, where its
/// 16 x 16 takes about 110 shuffles: here two stages within 128-bit lanes (unpack, shuffle) and two across them
/// (shuffle_f32x4), 64 in all, on the one port that runs them. Always inlined: pack_lanes called it (10% of the samples
/// of atrous(128) at n = 1024), its block going through memory both ways.
template <class Packet>
EIGEN_ALWAYS_INLINE void transpose_block(
    Eigen::internal::PacketBlock<Packet, Eigen::internal::unpacket_traits<Packet>::size>& b) {
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<Packet, Eigen::internal::Packet16f>) {
    __m512 t[16], s[16];
    for (int g = 0; g < 4; ++g) {
      const __m512* r = b.packet + 4 * g;
      t[4 * g] = _mm512_unpacklo_ps(r[0], r[1]), t[4 * g + 1] = _mm512_unpackhi_ps(r[0], r[1]);
      t[4 * g + 2] = _mm512_unpacklo_ps(r[2], r[3]), t[4 * g + 3] = _mm512_unpackhi_ps(r[2], r[3]);
      // s[4 g + c], lane L: column 4 L + c of rows 4 g .. 4 g + 3.
      s[4 * g] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(1, 0, 1, 0));
      s[4 * g + 1] = _mm512_shuffle_ps(t[4 * g], t[4 * g + 2], _MM_SHUFFLE(3, 2, 3, 2));
      s[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(1, 0, 1, 0));
      s[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int c = 0; c < 4; ++c) {  // row 4 L + c of the result: lane L of s[c], s[4 + c], s[8 + c], s[12 + c]
      const __m512 u0 = _mm512_shuffle_f32x4(s[c], s[4 + c], 0x44), u1 = _mm512_shuffle_f32x4(s[c], s[4 + c], 0xEE);
      const __m512 u2 = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0x44);
      const __m512 u3 = _mm512_shuffle_f32x4(s[8 + c], s[12 + c], 0xEE);
      b.packet[c] = _mm512_shuffle_f32x4(u0, u2, 0x88), b.packet[4 + c] = _mm512_shuffle_f32x4(u0, u2, 0xDD);
      b.packet[8 + c] = _mm512_shuffle_f32x4(u1, u3, 0x88), b.packet[12 + c] = _mm512_shuffle_f32x4(u1, u3, 0xDD);
    }
    return;
  }
#endif
  Eigen::internal::ptranspose(b);
}

#if defined(EIGEN_VECTORIZE_AVX512)
/// Lane j of the result is the sum of the lanes of a[j]: sixteen dot products folded at once by a shuffle tree
/// (pairs within 128-bit lanes, then across them): 30 shuffles and 15 adds, where sixteen reductions take 128.
inline __m512 fold_sums(const __m512 (&a)[16]) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // lane L: [a_2i, a_2i+1] x [elements 0+2, 1+3] of L
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // lane L: keys 4i .. 4i+3, each summed over the elements of L
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 f0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 f1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(f0, f1, 0x88), _mm512_shuffle_f32x4(f0, f1, 0xDD));
}

/// Lane j of the result: q . k_j for 16 keys, over the d = whole + popcount(tail) values of q and of the key rows
/// key(0), ..., key(15), one packet of partial products per key, folded by fold_sums. `key` returns a row's address:
/// keys at a constant stride let the compiler address them from one register.
template <class KeyRow>
inline __m512 dot_keys(const float* q, const KeyRow& key, Index whole, __mmask16 tail) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (Index p = 0; p < whole; p += 16) {
    const __m512 qv = _mm512_loadu_ps(q + p);
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(key(j) + p), acc[j]);
  }
  if (tail) {
    const __m512 qv = _mm512_maskz_loadu_ps(tail, q + whole);
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(tail, key(j) + whole), acc[j]);
  }
  return fold_sums(acc);
}
#endif

/// Whether short_query_scores serves this call: at most a micro-kernel's rows of queries (decoding), keys with
/// contiguous rows. It depends on the call's shape only, so results never depend on the thread count.
template <class S>
bool use_short_query_scores(Index n, const StridedView<S>& k) {
  return n <= KernelShape<S>::kRows && k.row_contiguous();
}

/// s[r * lds + c] = q_r . k_{j0 + c} for r < rows, c < cols (up to round_up(cols, kPacket), the rest 0): the score
/// tile of a few queries (a decoding step) read straight from the key rows, without packing K^T. Packing a tile costs
/// more than a few rows' products with it, so decoding spent most of its time there. Each row takes the keys kPacket
/// at a time, one packet of partial products per key, folded into one packet of sums: by fold_sums for AVX-512
/// floats, elsewhere by an in-register transpose and kPacket - 1 adds. q is rows x d at stride d. With `ahead` (keys
/// streamed from memory), the key rows kAheadKeys past each block are prefetched into L2 before the block, and with
/// `values` too (rows in place, which the P V product reads next) the value rows of the block itself. For one query
/// at m = 65536 on Zen 4 (minima): 16 keys ahead into L1 took 0.67-0.69x the time of no prefetch at d = 64; 64 keys
/// ahead into L2 with the values then took 0.67-0.85x the time of that at d = 128 (one and two threads; the L1's few
/// outstanding misses had limited it), 0.88-1.0x at d = 64 (within this host's noise), and 0.76x for the decode step
/// of a 1024 / 16 / 4 layer over 16384 cached tokens. Keys in the caches are not fetched: 1.07-1.32x slower there.
template <class S>
void short_query_scores(const S* q, Index d, Index rows, const StridedView<S>& k, Index j0, Index cols, S* s, Index lds,
                        bool ahead = false, const StridedView<S>* values = nullptr) {
  // The rows to prefetch before the block of keys at c: keys [ahead_begin(c), ahead_begin(c + block)), values
  // [values_begin(c), values_begin(c + block)). The loops stay in the blocks' own loops: a helper made only of
  // prefetches is free of effects as far as GCC can tell, and GCC 12 dropped its calls when it was a lambda.
  constexpr Index kAheadKeys = 64;
  const Index ahead_rows = ahead ? k.rows : 0, values_end = ahead && values ? j0 + cols : j0;
  const auto ahead_begin = [&](Index c) { return std::min(ahead_rows, j0 + c + kAheadKeys); };
  const auto values_begin = [&](Index c) { return std::min(values_end, j0 + c); };
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<S, float>) {
    const Index whole = d / 16 * 16;
    const __mmask16 tail = __mmask16((1u << (d - whole)) - 1u);
    for (Index c = 0; c < cols; c += 16) {
      for (Index j = ahead_begin(c), end = ahead_begin(c + 16); j < end; ++j) prefetch_row(k.row(j), d);
      for (Index j = values_begin(c), end = values_begin(c + 16); j < end; ++j)
        prefetch_row(values->row(j), values->cols);
      const Index keys = std::min<Index>(16, cols - c);
      const float* kr[16];
      for (Index j = 0; j < 16; ++j) kr[j] = k.row(j0 + c + std::min(j, keys - 1));  // a short block repeats its last
      for (Index r = 0; r < rows; ++r) {
        const __m512 sums = dot_keys(
            q + r * d, [&](int j) { return kr[j]; }, whole, tail);
        _mm512_storeu_ps(s + r * lds + c, keys == 16 ? sums : _mm512_maskz_mov_ps(__mmask16((1u << keys) - 1u), sums));
      }
    }
    return;
  }
#endif
  using namespace Eigen::internal;
  using Packet = typename KernelShape<S>::Packet;
  constexpr int P = KernelShape<S>::kPacket;
  const Index whole = d / P * P;
  for (Index c = 0; c < cols; c += P) {
    for (Index j = ahead_begin(c), end = ahead_begin(c + P); j < end; ++j) prefetch_row(k.row(j), d);
    for (Index j = values_begin(c), end = values_begin(c + P); j < end; ++j) prefetch_row(values->row(j), values->cols);
    const Index keys = std::min<Index>(P, cols - c);
    const S* kr[P];
    for (Index j = 0; j < P; ++j) kr[j] = k.row(j0 + c + std::min(j, keys - 1));
    for (Index r = 0; r < rows; ++r) {
      const S* qr = q + r * d;
      PacketBlock<Packet, P> acc;
      for (int j = 0; j < P; ++j) acc.packet[j] = pset1<Packet>(S(0));
      for (Index p = 0; p < whole; p += P) {
        const Packet qv = ploadu<Packet>(qr + p);
        for (int j = 0; j < P; ++j) acc.packet[j] = pmadd(qv, ploadu<Packet>(kr[j] + p), acc.packet[j]);
      }
      transpose_block(acc);  // packet t holds lane t of every key's partial products: their sum is the dot products
      Packet sums = acc.packet[0];
      for (int t = 1; t < P; ++t) sums = padd(sums, acc.packet[t]);
      if (whole == d && keys == P) {
        pstoreu(s + r * lds + c, sums);
        continue;
      }
      S dots[P];
      pstoreu(dots, sums);
      for (Index j = 0; j < P; ++j) {
        S rest = S(0);  // the columns past the whole packets
        for (Index p = whole; p < d; ++p) rest += qr[p] * kr[j][p];
        s[r * lds + c + j] = j < keys ? dots[j] + rest : S(0);
      }
    }
  }
}

/// Packs rows [j0, j0 + count) of x (count x width, width <= x.cols) as the right-hand side B = x^T of a product
/// (B is width x count_pad): panel p holds, for each of the `width` rows k, columns p*kCols.. of B. Zero padded.
/// Blocks of kPacket keys of row-contiguous x go through an in-register transpose, the rows of the next block fetched
/// meanwhile: the loads of K's rows were most of the packing's time (SDPA n = 4096, d = 128, Zen 5: packing 3.9% ->
/// 2.9% of the samples, 0.96-0.97x the time of the call). A last, short block goes through the same transpose, its
/// missing keys' lanes zeroed (element by element it was 36% of an 8 x 8 call's time).
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
    const Index keys = std::clamp<Index>(count - col, 0, w);  // keys of x in this panel, then zero columns
    const Index blocked = width_blocked > 0 ? std::min(round_up(keys, P), w / P * P) : 0;  // columns in blocks of P
    for (Index c = 0; c < blocked; c += P) {
      // A short last block (rows < P) reads its last key again in place of the missing ones, and zeroes their lanes
      // after the transpose: the loads stay unconditional, and the row addresses are found once per block.
      const Index rows = std::min(P, keys - c);
      const S* src[P];
      for (Index r = 0; r < P; ++r) src[r] = x.row(j0 + col + c + std::min(r, rows - 1));
      for (Index r = 0, ahead = std::clamp<Index>(keys - c - P, 0, P); r < ahead; ++r)
        prefetch_row(x.row(j0 + col + c + P + r), width);
      const Packet real_keys = pcmp_lt(plset<Packet>(S(0)), pset1<Packet>(S(rows)));  // lanes < rows
      for (Index k = 0; k < width_blocked; k += P) {
        PacketBlock<Packet, P> block;
        for (Index r = 0; r < P; ++r) block.packet[r] = ploadu<Packet>(src[r] + k);
        transpose_block(block);
        if (rows < P)
          for (Index r = 0; r < P; ++r) block.packet[r] = pand(block.packet[r], real_keys);
        for (Index r = 0; r < P; ++r) pstoreu(dst + (k + r) * w + c, block.packet[r]);
      }
      for (Index r = 0; r < P; ++r)
        for (Index k = width_blocked; k < width; ++k) dst[k * w + c + r] = r < rows ? src[r][k] : S(0);
    }
    for (Index c = blocked; c < w; ++c) {
      const bool valid = c < keys;
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

/// Lane-batched products: kPacket independent problems side by side, one per lane of a packet (sparse attention's
/// residue classes, whose rows are every k-th row: lanes over k consecutive rows turn their many small problems into
/// one of packets). Every element below is a packet; for r < rows, x < cols, t < depth,
///   c[r][x] = sum_t a[r][t] .* b[x][t]
/// with a[r][t] at a + (r lda + t) P, b[x][t] at b + (x ldb + t) P and c[r][x] at c + (r ldc + x) P (scalars;
/// P = kPacket). Lanes never meet: no transposes, no horizontal sums, whatever the problems' sizes.
template <class S>
struct LaneShape {
#if defined(EIGEN_VECTORIZE_AVX512)
  static constexpr int kRows = 4, kCols = 6;  // 24 accumulators + 4 rows of a + 1 of b, of 32 registers
#else
  static constexpr int kRows = 2, kCols = 6;  // 12 + 2 + 1 of 16
#endif
};

template <class S, int R, int X>
inline void lane_block(const S* a, Index lda, const S* b, Index ldb, Index depth, S* c, Index ldc) {
  using namespace Eigen::internal;
  using Packet = typename KernelShape<S>::Packet;
  constexpr Index P = KernelShape<S>::kPacket;
  Packet acc[R][X];
  ATTNKIT_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNKIT_UNROLL
    for (int x = 0; x < X; ++x) acc[r][x] = pset1<Packet>(0);
  }
  for (Index t = 0; t < depth; ++t) {
    Packet ar[R];
    ATTNKIT_UNROLL
    for (int r = 0; r < R; ++r) ar[r] = ploadu<Packet>(a + (r * lda + t) * P);
    ATTNKIT_UNROLL
    for (int x = 0; x < X; ++x) {
      const Packet bx = load_to_register<Packet>(b + (x * ldb + t) * P);
      ATTNKIT_UNROLL
      for (int r = 0; r < R; ++r) acc[r][x] = madd(ar[r], bx, acc[r][x]);
    }
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNKIT_UNROLL
    for (int x = 0; x < X; ++x) pstoreu(c + (r * ldc + x) * P, acc[r][x]);
  }
}

template <class S, int R = LaneShape<S>::kRows, int X = LaneShape<S>::kCols>
inline void lane_block_of(int rows, int cols, const S* a, Index lda, const S* b, Index ldb, Index depth, S* c,
                          Index ldc) {
  if constexpr (R > 1) {
    if (rows < R) return lane_block_of<S, R - 1, X>(rows, cols, a, lda, b, ldb, depth, c, ldc);
  }
  if constexpr (X > 1) {
    if (cols < X) return lane_block_of<S, R, X - 1>(rows, cols, a, lda, b, ldb, depth, c, ldc);
  }
  lane_block<S, R, X>(a, lda, b, ldb, depth, c, ldc);
}

/// The whole lane-batched product (see LaneShape), block by register block.
template <class S>
void lane_product(const S* a, Index lda, const S* b, Index ldb, Index depth, S* c, Index ldc, Index rows, Index cols) {
  constexpr Index P = KernelShape<S>::kPacket, R = LaneShape<S>::kRows, X = LaneShape<S>::kCols;
  for (Index r = 0; r < rows; r += R)
    for (Index x = 0; x < cols; x += X)
      lane_block_of<S>(int(std::min(R, rows - r)), int(std::min(X, cols - x)), a + r * lda * P, lda, b + x * ldb * P,
                       ldb, depth, c + (r * ldc + x) * P, ldc);
}

/// Products with P problems' rows in the lanes of b and the other side's rows broadcast (sparse attention's residue
/// classes one at a time: the class's queries in the lanes, its keys in their own rows): for r < rows and the packet
/// dst + r P,
///   dst[r] = sum_t keys[r][t] .* b[t]   (b[t] the packet at b + t P, keys[r][t] broadcast to every lane)
/// Four rows at a time: their lines then take at most four ways of an L1 set even when the rows are a multiple of
/// 4 KiB apart, as a residue class's are (sixteen such rows at once thrashed it: 1.3x the time). Eight at a time
/// halves the loads of b, but gained at most 4% for 8-lane packets (doubles under AVX-512; Zen 5).
template <class S, int R>
void broadcast_rows(const S* const* keys, const S* b, Index depth, S* dst) {
  using namespace Eigen::internal;
  using Packet = typename KernelShape<S>::Packet;
  constexpr Index P = KernelShape<S>::kPacket;
#if defined(EIGEN_VECTORIZE_AVX512)
  constexpr int T = 4;  // independent sums per row, against the FMA latency: 16 accumulators of 32 registers
#else
  constexpr int T = 2;                        // 8 of 16
#endif
  Packet acc[R][T];
  ATTNKIT_UNROLL
  for (int r = 0; r < R; ++r) {
    ATTNKIT_UNROLL
    for (int u = 0; u < T; ++u) acc[r][u] = pset1<Packet>(S(0));
  }
  Index t = 0;
  for (; t + T <= depth; t += T) {
    ATTNKIT_UNROLL
    for (int u = 0; u < T; ++u) {
      const Packet x = ploadu<Packet>(b + (t + u) * P);
      ATTNKIT_UNROLL
      for (int r = 0; r < R; ++r) acc[r][u] = madd(pset1<Packet>(keys[r][t + u]), x, acc[r][u]);
    }
  }
  for (; t < depth; ++t) {
    const Packet x = ploadu<Packet>(b + t * P);
    ATTNKIT_UNROLL
    for (int r = 0; r < R; ++r) acc[r][0] = madd(pset1<Packet>(keys[r][t]), x, acc[r][0]);
  }
  ATTNKIT_UNROLL
  for (int r = 0; r < R; ++r) {
    Packet sum = acc[r][0];
    ATTNKIT_UNROLL
    for (int u = 1; u < T; ++u) sum = padd(sum, acc[r][u]);
    pstoreu(dst + r * P, sum);
  }
}

/// broadcast_rows over any number of rows.
template <class S>
void broadcast_product(const S* const* keys, Index rows, const S* b, Index depth, S* dst) {
  constexpr Index P = KernelShape<S>::kPacket;
  Index r = 0;
  for (; r + 4 <= rows; r += 4) broadcast_rows<S, 4>(keys + r, b, depth, dst + r * P);
  switch (rows - r) {
    case 3:
      return broadcast_rows<S, 3>(keys + r, b, depth, dst + r * P);
    case 2:
      return broadcast_rows<S, 2>(keys + r, b, depth, dst + r * P);
    case 1:
      return broadcast_rows<S, 1>(keys + r, b, depth, dst + r * P);
    default:
      return;
  }
}

/// Weighted sums with the weights in lanes (the other half of broadcast_product): for the lanes x in [first, last),
///   row c_x = beta[x] * c_x + sum_t w[t P + x] b_t   (beta == nullptr: c_x is not read)
/// with b_t the row at b + t ldb and c_x the row at c + x ldc, `cols` wide. One packet of columns of all P lanes at a
/// time (P accumulators), so each line of b is loaded once, wherever its rows lie. A softmax's normaliser goes into w
/// and beta beforehand, a multiply a weight packet instead of one an output packet. Every weight multiplies its row
/// of b: the caller keeps NaN and Inf out of b's rows where a weight is 0.
template <class S>
void weighted_lanes(const S* w, Index depth, const S* b, Index ldb, S* c, Index ldc, Index first, Index last,
                    const S* beta, Index cols) {
  using namespace Eigen::internal;
  using Packet = typename KernelShape<S>::Packet;
  constexpr int P = KernelShape<S>::kPacket;
  // Output rows that start up to two lines past the value rows (modulo 4 KiB: in the L1 sets of the values' next
  // packet) take their packets from the last down: stored in the sets of packets already read, not of the next
  // one, which a residue class's value rows (4 KiB apart or a multiple) fill (atrous(128), out one line ahead of v:
  // 1.08-1.21x the time upwards at n = 1024 and 2048, 0.98-1.0x downwards; upwards is 0.97x in other placements).
  const std::uintptr_t gap = (reinterpret_cast<std::uintptr_t>(c) - reinterpret_cast<std::uintptr_t>(b)) % 4096;
  const Index whole = cols / P * P, step = gap > 0 && gap < 128 ? -P : P;
  for (Index col = step > 0 ? 0 : whole - P; col >= 0 && col < whole; col += step) {
    Packet acc[P];
    ATTNKIT_UNROLL
    for (int x = 0; x < P; ++x) acc[x] = pset1<Packet>(S(0));
    for (Index t = 0; t < depth; ++t) {
      const Packet bt = ploadu<Packet>(b + t * ldb + col);
      ATTNKIT_UNROLL
      for (int x = 0; x < P; ++x) acc[x] = madd(pset1<Packet>(w[t * P + x]), bt, acc[x]);
    }
    ATTNKIT_UNROLL
    for (int x = 0; x < P; ++x) {
      if (x < first || x >= last) continue;
      S* row = c + x * ldc + col;
      pstoreu(row, beta ? madd(pset1<Packet>(beta[x]), ploadu<Packet>(row), acc[x]) : acc[x]);
    }
  }
  for (Index x = first; x < last; ++x)  // then scalars
    for (Index k = whole; k < cols; ++k) {
      S sum = S(0);
      for (Index t = 0; t < depth; ++t) sum += w[t * P + x] * b[t * ldb + k];
      S* at = c + x * ldc + k;
      *at = beta ? beta[x] * *at + sum : sum;
    }
}

/// Packs kPacket rows into lanes: the packet at dst + t * step holds column t (t < cols) of the rows, lane l from
/// rows[l] (zeros for a null row), times lane l of `scale`. Whole blocks of P columns go through the in-register
/// transpose. Rows are contiguous. Returns whether every value packed is finite: 0 * x is +-0 for finite x and NaN
/// for NaN and Inf, and the bits of those products are or-ed (one multiply and a one-cycle or a packet, where a
/// separate pass over the rows cost a sixth of atrous(128) at n = 1024). Without kCheck it returns true: for a caller
/// whose products show NaN and Inf anyway.
template <class S, bool kCheck = true>
bool pack_lanes(const S* const* rows, Index cols, S* dst, Index step, const typename KernelShape<S>::Packet& scale) {
  using namespace Eigen::internal;
  using Packet = typename KernelShape<S>::Packet;
  constexpr Index P = KernelShape<S>::kPacket;
  const Packet zero = pset1<Packet>(S(0));
  Packet check = zero;
  const Index blocked = cols / P * P;
  for (Index t = 0; t < blocked; t += P) {
    PacketBlock<Packet, P> block;
    for (Index l = 0; l < P; ++l) block.packet[l] = rows[l] ? ploadu<Packet>(rows[l] + t) : zero;
    transpose_block(block);
    for (Index x = 0; x < P; ++x) {
      if constexpr (kCheck) check = por(check, pmul(block.packet[x], zero));
      pstoreu(dst + (t + x) * step, pmul(block.packet[x], scale));
    }
  }
  S column[P];
  for (Index t = blocked; t < cols; ++t) {
    for (Index l = 0; l < P; ++l) column[l] = rows[l] ? rows[l][t] : S(0);
    const Packet x = ploadu<Packet>(column);
    if constexpr (kCheck) check = por(check, pmul(x, zero));
    pstoreu(dst + t * step, pmul(x, scale));
  }
  if constexpr (!kCheck) return true;
  S lanes[P];
  pstoreu(lanes, check);
  return std::all_of(lanes, lanes + P, [](S x) { return x == S(0); });
}

/// C = scale .* (beta .* C + A B) over rows that are not packed: a(r, t) = a[r * lda + t * kStep] (R rows of depth
/// weights), beta[r * kStep] and scale[r * kStep] (beta == nullptr: C is not read), B's depth rows ldb apart and C's R
/// rows ldc apart, `cols` wide (blocks of kPackets packets, then a scalar tail). Every weight multiplies its row of B,
/// zero or not: the caller keeps NaN and Inf out of B's rows (micro_kernel's kSkipZeros tested each weight, a compare
/// and a branch per row of B; here the broadcasts come straight from memory).
template <class S, int R, int kStep>
void weighted_rows(const S* a, Index lda, const S* b, Index ldb, Index depth, S* c, Index ldc, const S* beta,
                   const S* scale, Index cols) {
  using namespace Eigen::internal;
  using Packet = typename KernelShape<S>::Packet;
  constexpr int P = KernelShape<S>::kPacket, NP = KernelShape<S>::kPackets;
  Index x = 0;
  for (; x + NP * P <= cols; x += NP * P) {
    Packet acc[R][NP];
    ATTNKIT_UNROLL
    for (int r = 0; r < R; ++r) {
      ATTNKIT_UNROLL
      for (int p = 0; p < NP; ++p)
        acc[r][p] =
            beta ? pmul(pset1<Packet>(beta[r * kStep]), ploadu<Packet>(c + r * ldc + x + p * P)) : pset1<Packet>(0);
    }
    for (Index t = 0; t < depth; ++t) {
      Packet bt[NP];
      ATTNKIT_UNROLL
      for (int p = 0; p < NP; ++p) bt[p] = load_to_register<Packet>(b + t * ldb + x + p * P);
      ATTNKIT_UNROLL
      for (int r = 0; r < R; ++r) {
        const Packet w = pset1<Packet>(a[r * lda + t * kStep]);
        ATTNKIT_UNROLL
        for (int p = 0; p < NP; ++p) acc[r][p] = madd(w, bt[p], acc[r][p]);
      }
    }
    ATTNKIT_UNROLL
    for (int r = 0; r < R; ++r) {
      const Packet f = pset1<Packet>(scale[r * kStep]);
      ATTNKIT_UNROLL
      for (int p = 0; p < NP; ++p) pstoreu(c + r * ldc + x + p * P, pmul(f, acc[r][p]));
    }
  }
  for (; x < cols; ++x)
    for (int r = 0; r < R; ++r) {
      S acc = beta ? beta[r * kStep] * c[r * ldc + x] : S(0);
      for (Index t = 0; t < depth; ++t) acc = madd(a[r * lda + t * kStep], b[t * ldb + x], acc);
      c[r * ldc + x] = scale[r * kStep] * acc;
    }
}

/// weighted_rows for 1 <= rows <= R rows.
template <class S, int kStep, int R = LaneShape<S>::kRows>
void weighted_rows_of(int rows, const S* a, Index lda, const S* b, Index ldb, Index depth, S* c, Index ldc,
                      const S* beta, const S* scale, Index cols) {
  if constexpr (R > 1) {
    if (rows < R) return weighted_rows_of<S, kStep, R - 1>(rows, a, lda, b, ldb, depth, c, ldc, beta, scale, cols);
  }
  weighted_rows<S, R, kStep>(a, lda, b, ldb, depth, c, ldc, beta, scale, cols);
}

}  // namespace attnkit::detail

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
