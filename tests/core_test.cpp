// The shared core on its own: mask model intervals and tile classes, the online softmax, the parallel loop.
#include <attnkit/core/dense.hpp>
#include <attnkit/core/mask.hpp>
#include <attnkit/core/softmax.hpp>
#include <attnkit/core/stores.hpp>
#include <attnkit/core/threading.hpp>
#include <attnkit/core/tiling.hpp>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "test_util.hpp"

namespace attnkit::detail {
namespace {

MaskModel<float> model(Index n, Index m, const AttentionOptions& o) { return MaskModel<float>(n, m, o, {}); }

TEST(MaskModel, RowRangesFollowSpecForBothAlignments) {
  AttentionOptions o;
  o.causal = true;
  // Bottom-right, n = 3, m = 5: row i sees j <= i + 2.
  const auto br = model(3, 5, o);
  EXPECT_EQ(br.row_range(0).begin, 0);
  EXPECT_EQ(br.row_range(0).end, 3);
  EXPECT_EQ(br.row_range(2).end, 5);
  o.align = CausalAlign::kTopLeft;
  const auto tl = model(3, 5, o);
  EXPECT_EQ(tl.row_range(0).end, 1);
  EXPECT_EQ(tl.row_range(2).end, 3);
  // Bottom-right with n > m leaves the first n - m rows empty.
  o.align = CausalAlign::kBottomRight;
  const auto tall = model(5, 2, o);
  EXPECT_TRUE(tall.row_range(2).empty());
  EXPECT_EQ(tall.row_range(3).size(), 1);
  EXPECT_EQ(tall.row_range(4).size(), 2);
  // Window and padding intersect.
  AttentionOptions w;
  w.window_left = 2, w.window_right = 1, w.key_length = 6, w.align = CausalAlign::kTopLeft;
  const auto win = model(10, 10, w);
  EXPECT_EQ(win.row_range(0).begin, 0);
  EXPECT_EQ(win.row_range(0).end, 2);
  EXPECT_EQ(win.row_range(4).begin, 2);
  EXPECT_EQ(win.row_range(4).end, 6);
  EXPECT_EQ(win.row_range(9).begin, 7);
  EXPECT_TRUE(win.row_range(9).empty());
  // allows_offset is the same rule by distance: within the keys and key_length, j is in row i's range exactly when
  // position(i) - j is allowed.
  for (const bool causal : {false, true})
    for (const Index left : {-1, 0, 3})
      for (const Index right : {-1, 0, 2})
        for (const CausalAlign align : {CausalAlign::kBottomRight, CausalAlign::kTopLeft}) {
          AttentionOptions x;
          x.causal = causal, x.window_left = left, x.window_right = right, x.align = align, x.key_length = 9;
          const auto mm = model(7, 11, x);
          for (Index i = 0; i < 7; ++i)
            for (Index j = 0; j < 9; ++j) {
              const KeyRange r = mm.row_range(i);
              EXPECT_EQ(j >= r.begin && j < r.end, mm.allows_offset(mm.position(i) - j))
                  << "i " << i << " j " << j << " causal " << causal << " left " << left << " right " << right;
            }
        }
}

TEST(MaskModel, TilesAreEmptyFullOrPartial) {
  AttentionOptions o;
  o.causal = true, o.align = CausalAlign::kTopLeft;
  const auto mask = model(16, 16, o);
  std::vector<KeyRange> ranges;
  for (Index i = 8; i < 12; ++i) ranges.push_back(mask.row_range(i));  // query rows 8..11
  EXPECT_EQ(mask.classify(ranges.data(), 4, 0, 8), TileKind::kFull);
  EXPECT_EQ(mask.classify(ranges.data(), 4, 8, 4), TileKind::kPartial);
  EXPECT_EQ(mask.classify(ranges.data(), 4, 12, 4), TileKind::kEmpty);
  // An element-wise mask makes every non-empty tile partial.
  BoolMatrix b = BoolMatrix::Constant(16, 16, true);
  StridedView<bool> view{b.data(), 16, 16, 16, 1};
  MaskExtras<float> extras;
  extras.mask = &view;
  const MaskModel<float> with_mask(16, 16, o, extras);
  EXPECT_EQ(with_mask.classify(ranges.data(), 4, 0, 8), TileKind::kPartial);
}

TEST(OnlineSoftmax, StreamingEqualsOneShot) {
  const Matrix<double> logits = testing::random_matrix<double>(1, 37, 5, 4.0);
  std::vector<double> one(logits.data(), logits.data() + 37);
  SoftmaxState<double> whole;
  online_softmax_step(one.data(), 37, whole);
  // Stream in chunks of 1, 5 and 31, rescaling an accumulated weighted sum like the kernels do.
  std::vector<double> chunked(logits.data(), logits.data() + 37);
  SoftmaxState<double> state;
  double acc = 0;
  for (Index begin = 0, step = 1; begin < 37; begin += step, step = step == 1 ? 5 : 31) {
    const Index count = std::min<Index>(step, 37 - begin);
    const double alpha = online_softmax_step(chunked.data() + begin, count, state);
    acc *= alpha;
    for (Index j = begin; j < begin + count; ++j) acc += chunked[j] * double(j);
  }
  double expect = 0, total = 0;
  for (Index j = 0; j < 37; ++j) expect += one[j] * double(j), total += one[j];
  EXPECT_NEAR(state.sum, whole.sum, 1e-12 * whole.sum);
  EXPECT_NEAR(state.max, whole.max, 0);
  EXPECT_NEAR(acc * state.inverse_sum(), expect / total, 1e-12);
  EXPECT_NEAR(state.log_sum_exp(), std::log(total) + whole.max, 1e-12);
}

TEST(OnlineSoftmax, AllMaskedRowGivesZerosNotNan) {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> row = {-inf, -inf, -inf};
  SoftmaxState<double> s;
  EXPECT_EQ(online_softmax_step(row.data(), 3, s), 1.0);
  EXPECT_EQ(row[0], 0.0);
  EXPECT_EQ(s.inverse_sum(), 0.0);
  EXPECT_TRUE(std::isinf(s.log_sum_exp()) && s.log_sum_exp() < 0);
}

// The float softmax's exponential (exp_below) against std::exp in double: within 1.3 ulp where |x - shift| <= 1 and
// within the rounding of t = (x - shift) log2(e) beyond; exactly 0 at and below shift - 87.7 (a masked -inf
// included), NaN for NaN, exactly 1 at x = shift. Odd shifts and every lane of the packet.
TEST(OnlineSoftmax, FloatExponentialIsAccurateAndExactAtTheEnds) {
  using namespace Eigen::internal;
  using Packet = packet_traits<float>::type;
  constexpr int P = packet_traits<float>::size;
  if constexpr (P > 1) {
    const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
    for (float shift : {0.f, 3.7f, -41.25f}) {
      double worst_near = 0, worst_far = 0;
      for (Index b = 0; b < 4096; ++b) {
        float x[P], e[P];
        for (int l = 0; l < P; ++l) {
          const double w = (double((b % 2048) * P + l) + 0.37) / double(2048 * P);  // a sweep of (0, 1)
          x[l] = shift - float(b < 2048 ? w : 87.0 * w);
        }
        pstoreu(e, attnkit::detail::exp_below(ploadu<Packet>(x), pset1<Packet>(shift)));
        for (int l = 0; l < P; ++l) {
          const double t = double(x[l]) - double(shift), expect = std::exp(t);
          const double rel = std::abs(double(e[l]) - expect) / expect;
          if (-t <= 1) {
            worst_near = std::max(worst_near, rel);
          } else {
            const double allowed = 1.3 * 0x1p-23 + std::abs(t) * 1.4427 * 0x1p-24 + std::abs(t) * 0x1p-24;
            worst_far = std::max(worst_far, rel / allowed);
          }
        }
      }
      EXPECT_LE(worst_near, 1.3 * 0x1p-23) << "shift " << shift;
      EXPECT_LE(worst_far, 1.0) << "shift " << shift;
    }
    float x[P], e[P];
    for (int l = 0; l < P; ++l) x[l] = l % 4 == 0 ? -inf : l % 4 == 1 ? nan : l % 4 == 2 ? -88.f : 0.f;
    pstoreu(e, attnkit::detail::exp_below(ploadu<Packet>(x), pset1<Packet>(0.f)));
    for (int l = 0; l < P; ++l) {
      if (l % 4 == 1) {
        EXPECT_TRUE(std::isnan(e[l])) << "lane " << l;
      } else {
        EXPECT_EQ(e[l], l % 4 == 3 ? 1.f : 0.f) << "lane " << l;
      }
    }
  }
}

// exp_shifted_sum and row_max on every length of a few packets, at every offset within a packet: each ragged end
// (a masked packet where the CPU has masked loads, else a padded copy) gives what the whole packets give, -inf gives
// exactly 0, NaN stays NaN, and nothing past the end is read into the result or written.
TEST(OnlineSoftmax, RaggedEndsEqualWholePacketsAndLeaveWhatFollowsAlone) {
  constexpr Index P = Eigen::internal::packet_traits<float>::size;
  const float inf = std::numeric_limits<float>::infinity(), sentinel = 1e30f;
  const Matrix<float> logits = testing::random_matrix<float>(1, 4 * P + 8, 11, 3.0);
  for (Index offset = 0; offset < P; ++offset)
    for (Index count = 1; count <= 3 * P + 1; ++count) {
      std::vector<float> row(size_t(offset + count + P), sentinel);
      for (Index c = 0; c < count; ++c) row[size_t(offset + c)] = c % 7 == 3 ? -inf : logits(0, c);
      float* x = row.data() + offset;
      double best = -inf;
      for (Index c = 0; c < count; ++c) best = std::max(best, double(x[c]));
      ASSERT_EQ(row_max(x, count), float(best)) << "count " << count << " offset " << offset;
      const float shift = row_max(x, count) + 0.5f;
      std::vector<float> before(x, x + count);
      // exp_below's documented accuracy (see FloatExponentialIsAccurateAndExactAtTheEnds), and a rounding per add.
      const auto bound = [](double t) { return 1.3 * 0x1p-23 + std::abs(t) * 2.5 * 0x1p-24; };
      double expect = 0, sum_bound = 0;
      for (float v : before) {
        const double t = double(v) - double(shift), e = v == -inf ? 0.0 : std::exp(t);
        expect += e, sum_bound += v == -inf ? 0.0 : bound(t) * e;
      }
      const float sum = exp_shifted_sum(x, count, shift);
      EXPECT_NEAR(sum, expect, sum_bound + double(count) * 0x1p-24 * expect)
          << "count " << count << " offset " << offset;
      for (Index c = 0; c < count; ++c) {
        if (before[size_t(c)] == -inf) {
          EXPECT_EQ(x[c], 0.f) << "count " << count << " c " << c;
        } else {
          const double t = double(before[size_t(c)]) - double(shift), e = std::exp(t);
          EXPECT_NEAR(x[c], e, bound(t) * e) << "count " << count << " c " << c;
        }
      }
      for (Index c = count; c < count + P; ++c) EXPECT_EQ(x[c], sentinel) << "count " << count << " past " << c;
      for (Index c = 0; c < offset; ++c) EXPECT_EQ(row[size_t(c)], sentinel);
    }
  // A NaN in the ragged end reaches the sum; the max of a row whose last, ragged element is the largest finds it.
  std::vector<float> row(size_t(P + 3), -1.f);
  row[size_t(P + 2)] = 5.f;
  EXPECT_EQ(row_max(row.data(), P + 3), 5.f);
  row[size_t(P + 2)] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(exp_shifted_sum(row.data(), P + 3, 0.f)));
}

// Normal samples for the lane-batched pieces' inputs, and their tolerance against double-precision loops.
struct NormalFill {
  explicit NormalFill(unsigned seed) : gen(seed) {}
  double operator()() { return dist(gen); }
  template <class S>
  void operator()(std::vector<S>& x) {
    for (S& e : x) e = S(dist(gen));
  }
  std::mt19937 gen;
  std::normal_distribution<double> dist;
};
template <class S>
constexpr double kLaneTolerance = std::is_same_v<S, float> ? 2e-5 : 1e-13;

// Lane-batched pieces (sparse attention's residue lanes): every lane is a problem of its own, against plain loops in
// double precision. Packing transposes rows into lanes (a null row gives zeros) and reports NaN and Inf; the product
// and the weighted rows handle every block shape and ragged edge; the softmax merges an earlier part and leaves a
// lane with nothing at all at zero weights and a log-sum-exp of -inf.
template <class S>
void check_lane_pieces() {
  using namespace Eigen::internal;
  using Packet = typename KernelShape<S>::Packet;
  constexpr Index P = KernelShape<S>::kPacket;
  const double tol = kLaneTolerance<S>;
  NormalFill fill(11);
  for (const Index cols : {Index(1), Index(3), P, P + 1, 3 * P + 5}) {
    SCOPED_TRACE("pack_lanes, cols " + std::to_string(cols));
    std::vector<std::vector<S>> data(P, std::vector<S>(size_t(cols)));
    for (auto& row : data) fill(row);
    const S* rows[P];
    S scale[P];
    for (Index l = 0; l < P; ++l) rows[l] = l % 3 == 2 ? nullptr : data[size_t(l)].data(), scale[l] = S(0.5 + l);
    const Index step = P + 3;
    std::vector<S> dst(size_t(cols * step + P), S(-7));
    EXPECT_TRUE(pack_lanes<S>(rows, cols, dst.data(), step, ploadu<Packet>(scale)));
    for (Index t = 0; t < cols; ++t)
      for (Index l = 0; l < P; ++l)
        ASSERT_EQ(dst[size_t(t * step + l)], rows[l] ? data[size_t(l)][size_t(t)] * scale[l] : S(0))
            << "column " << t << " lane " << l;
    for (const S bad : {std::numeric_limits<S>::quiet_NaN(), -std::numeric_limits<S>::infinity()}) {
      const Index l = P > 1 ? 1 : 0, t = cols - 1;
      const S kept = data[size_t(l)][size_t(t)];
      data[size_t(l)][size_t(t)] = bad;
      EXPECT_FALSE(pack_lanes<S>(rows, cols, dst.data(), step, ploadu<Packet>(scale)));
      data[size_t(l)][size_t(t)] = kept;
    }
  }
  for (const Index rows : {Index(1), Index(2), Index(LaneShape<S>::kRows), Index(LaneShape<S>::kRows + 3)})
    for (const Index cols : {1, 5, 6, 13})
      for (const Index depth : {0, 1, 7, 64}) {
        SCOPED_TRACE("lane_product " + std::to_string(rows) + " x " + std::to_string(cols) + ", depth " +
                     std::to_string(depth));
        const Index lda = depth + 2, ldb = depth + 1, ldc = cols + 1;
        std::vector<S> a(size_t(rows * lda * P)), b(size_t(cols * ldb * P)), c(size_t(rows * ldc * P));
        fill(a), fill(b), fill(c);
        const std::vector<S> c0 = c;
        lane_product<S>(a.data(), lda, b.data(), ldb, depth, c.data(), ldc, rows, cols);
        for (Index r = 0; r < rows; ++r)
          for (Index x = 0; x < cols + 1; ++x)
            for (Index l = 0; l < P; ++l) {
              const size_t at = size_t((r * ldc + x) * P + l);
              if (x == cols) {
                ASSERT_EQ(c[at], c0[at]) << "wrote past its columns";
                continue;
              }
              double want = 0;
              for (Index t = 0; t < depth; ++t)
                want += double(a[size_t((r * lda + t) * P + l)]) * double(b[size_t((x * ldb + t) * P + l)]);
              ASSERT_NEAR(c[at], want, tol * (1 + depth)) << "row " << r << " col " << x << " lane " << l;
            }
      }
  for (const Index rows : {Index(1), Index(LaneShape<S>::kRows)})
    for (const Index cols : {Index(1), Index(7), Index(KernelShape<S>::kCols), Index(2 * KernelShape<S>::kCols + 3)})
      for (const Index depth : {0, 1, 9})
        for (const bool with_beta : {false, true}) {
          SCOPED_TRACE("weighted_rows " + std::to_string(rows) + " x " + std::to_string(cols) + ", depth " +
                       std::to_string(depth) + (with_beta ? ", beta" : ""));
          // Weights and factors interleaved P apart (a lane of the packets), rows of B and C with gaps.
          const Index lda = (depth + 1) * P, ldb = cols + 2, ldc = cols + 3;
          std::vector<S> a(size_t(rows * lda)), b(size_t(std::max<Index>(depth, 1) * ldb)), c(size_t(rows * ldc)),
              beta(size_t(rows * P)), scale(size_t(rows * P));
          fill(a), fill(b), fill(c), fill(beta), fill(scale);
          const std::vector<S> c0 = c;
          weighted_rows_of<S, P>(int(rows), a.data(), lda, b.data(), ldb, depth, c.data(), ldc,
                                 with_beta ? beta.data() : nullptr, scale.data(), cols);
          for (Index r = 0; r < rows; ++r)
            for (Index x = 0; x < cols + 3; ++x) {
              const size_t at = size_t(r * ldc + x);
              if (x >= cols) {
                ASSERT_EQ(c[at], c0[at]) << "wrote past its columns";
                continue;
              }
              double want = with_beta ? double(beta[size_t(r * P)]) * double(c0[at]) : 0;
              for (Index t = 0; t < depth; ++t)
                want += double(a[size_t(r * lda + t * P)]) * double(b[size_t(t * ldb + x)]);
              ASSERT_NEAR(c[at], double(scale[size_t(r * P)]) * want, tol * (1 + depth)) << "row " << r << " col " << x;
            }
        }
  const S inf = std::numeric_limits<S>::infinity();
  for (const Index count : {0, 1, 5, 20}) {
    SCOPED_TRACE("softmax_lanes, " + std::to_string(count) + " keys");
    std::vector<S> logits(size_t(count * P)), lse(P), earlier(P), inverse(P);
    fill(logits);
    for (S& x : logits) x *= 4;
    for (Index l = 0; l < P; ++l) {
      lse[size_t(l)] = l % 2 ? S(fill()) : -inf;  // odd lanes continue an earlier part
      for (Index c = 0; c < count; ++c)
        if ((c + l) % 3 == 0 || l == P - 1) logits[size_t(c * P + l)] = -inf;  // masked; the last lane has nothing
    }
    if (P > 1) lse[size_t(P - 1)] = -inf;
    const std::vector<S> logits0 = logits, lse0 = lse;
    softmax_lanes(logits.data(), count, lse.data(), earlier.data(), inverse.data());
    for (Index l = 0; l < P; ++l) {
      double max = double(lse0[size_t(l)]);
      for (Index c = 0; c < count; ++c) max = std::max(max, double(logits0[size_t(c * P + l)]));
      if (std::isinf(max)) {  // nothing at all
        EXPECT_EQ(inverse[size_t(l)], S(0)) << "lane " << l;
        EXPECT_EQ(lse[size_t(l)], -inf) << "lane " << l;
        for (Index c = 0; c < count; ++c) EXPECT_EQ(logits[size_t(c * P + l)], S(0));
        continue;
      }
      const double old = std::exp(double(lse0[size_t(l)]) - max);
      double total = old;
      for (Index c = 0; c < count; ++c) {
        const double e = std::exp(double(logits0[size_t(c * P + l)]) - max);
        total += e;
        EXPECT_NEAR(logits[size_t(c * P + l)], e, tol * e + 1e-30) << "lane " << l << " key " << c;
      }
      EXPECT_NEAR(earlier[size_t(l)], old, tol * old) << "lane " << l;
      EXPECT_NEAR(inverse[size_t(l)], 1 / total, tol / total) << "lane " << l;
      EXPECT_NEAR(lse[size_t(l)], max + std::log(total), tol * (1 + std::abs(max))) << "lane " << l;
    }
  }
}

// The class-by-class pieces (a residue class's queries in the lanes of a packet): the products with broadcast rows
// for every count of rows (blocks of 4 and the rest), and the weighted sums over every lane range, with and without
// an earlier part, for widths of one or more packets and a scalar tail, their output rows placed just past the rows
// they read (mod 4 KiB: packets taken from the last down) and further (upwards); against plain loops in double
// precision, and never writing outside their lanes and columns.
template <class S>
void check_class_pieces() {
  constexpr Index P = KernelShape<S>::kPacket;
  const double tol = kLaneTolerance<S>;
  NormalFill fill(13);
  for (const Index rows : {1, 3, 4, 7, 8, 9, 13})
    for (const Index depth : {0, 1, 7, 64}) {
      SCOPED_TRACE("broadcast_product " + std::to_string(rows) + " rows, depth " + std::to_string(depth));
      std::vector<std::vector<S>> keys(size_t(rows), std::vector<S>(size_t(depth) + 1));
      const S* ptrs[16];
      for (Index r = 0; r < rows; ++r) fill(keys[size_t(r)]), ptrs[r] = keys[size_t(r)].data();
      std::vector<S> b(size_t(std::max<Index>(depth, 1) * P)), dst(size_t((rows + 1) * P), S(-3));
      fill(b);
      broadcast_product<S>(ptrs, rows, b.data(), depth, dst.data());
      for (Index r = 0; r <= rows; ++r)
        for (Index l = 0; l < P; ++l) {
          if (r == rows) {
            ASSERT_EQ(dst[size_t(r * P + l)], S(-3)) << "wrote past its rows";
            continue;
          }
          double want = 0;
          for (Index t = 0; t < depth; ++t) want += double(keys[size_t(r)][size_t(t)]) * double(b[size_t(t * P + l)]);
          ASSERT_NEAR(dst[size_t(r * P + l)], want, tol * (1 + depth)) << "row " << r << " lane " << l;
        }
    }
  for (const Index cols : {Index(1), P, 2 * P, 2 * P + 3, 4 * P + 1})
    for (const Index depth : {0, 1, 9})
      for (const bool with_beta : {false, true})
        for (const auto& [first, last] : {std::pair<Index, Index>{0, P}, {P / 2, P}, {0, P - P / 3}})
          for (const Index gap : {64, 256}) {  // bytes from the values' rows to the outputs', modulo 4 KiB
            SCOPED_TRACE("weighted_lanes " + std::to_string(cols) + " cols, depth " + std::to_string(depth) +
                         (with_beta ? ", beta" : "") + ", lanes " + std::to_string(first) + ".." +
                         std::to_string(last) + ", gap " + std::to_string(gap));
            const Index ldb = cols + 2, ldc = cols + 3, values = std::max<Index>(depth, 1) * ldb;
            const Index out_at = (round_up(values * Index(sizeof(S)), 4096) + gap) / Index(sizeof(S));
            std::vector<S> w(size_t(std::max<Index>(depth, 1) * P)), beta(static_cast<size_t>(P));
            Matrix<S> buffer(1, out_at + P * ldc + 4096);  // (aligned to 64 bytes)
            buffer.setRandom();
            fill(w), fill(beta);
            S *b = buffer.data(), *c = b + out_at;
            const Matrix<S> before = buffer;
            weighted_lanes<S>(w.data(), depth, b, ldb, c, ldc, first, last, with_beta ? beta.data() : nullptr, cols);
            for (Index x = 0; x < P; ++x)
              for (Index col = 0; col < ldc; ++col) {
                const Index at = out_at + x * ldc + col;
                if (x < first || x >= last || col >= cols) {
                  ASSERT_EQ(buffer(0, at), before(0, at)) << "wrote outside its lanes and columns";
                  continue;
                }
                double want = with_beta ? double(beta[size_t(x)]) * double(before(0, at)) : 0;
                for (Index t = 0; t < depth; ++t) want += double(w[size_t(t * P + x)]) * double(b[t * ldb + col]);
                ASSERT_NEAR(buffer(0, at), want, tol * (2 + depth)) << "lane " << x << " col " << col;
              }
          }
}

TEST(LaneBatched, EachLaneIsItsOwnProblemInFloat) {
  check_lane_pieces<float>();
  check_class_pieces<float>();
}
TEST(LaneBatched, EachLaneIsItsOwnProblemInDouble) {
  check_lane_pieces<double>();
  check_class_pieces<double>();
}

// The tile plan: the key tile (summation order) depends on the shape only, never on the thread count; the automatic
// query tiles cover n in whole micro-kernel strips, at most kMaxQueryTile rows, with a tile for every thread.
TEST(TilePlan, KeyTileIgnoresThreadsAndQueryTilesShareEvenly) {
  for (Index n : {1, 7, 96, 257, 512, 2048, 4099})
    for (Index d : {8, 64, 128}) {
      AttentionOptions o;
      o.threads = 1;
      const TilePlan serial = plan_tiles<float>(n, n, d, d, o);
      EXPECT_GE(serial.cols, 1);
      EXPECT_LE(serial.cols, std::max<Index>(512, n));
      for (int threads : {1, 2, 3, 8}) {
        o.threads = threads;
        const TilePlan plan = plan_tiles<float>(n, n, d, d, o);
        EXPECT_EQ(plan.cols, serial.cols) << "n " << n << " d " << d << " threads " << threads;
        EXPECT_LE(plan.rows, kMaxQueryTile<float>);
        EXPECT_TRUE(plan.rows == n || plan.rows % KernelShape<float>::kRows == 0) << "rows " << plan.rows;
        // Blocks of plan.group query tiles are the parallel work, each block's queries and accumulators in 40% of L2.
        const Index block = plan.rows * plan.group, blocks = (n + block - 1) / block;
        EXPECT_GE(plan.group, 1);
        EXPECT_LE(plan.group, 8);
        if (plan.group > 1) {
          EXPECT_LE(plan.group * plan.rows * (d + d) * Index(sizeof(float)), l2_cache_bytes() * 4 / 10 + 1024)
              << "n " << n << " d " << d << " threads " << threads;
          EXPECT_GT(n, (blocks - 1) * block + (plan.group - 1) * plan.rows / 2) << "the last block is not a stub";
        }
        if (n >= threads * 16 * KernelShape<float>::kRows) {  // 16 strips per thread or more: every thread has a block
          EXPECT_GE(blocks, threads) << "n " << n << " threads " << threads;
        }
      }
    }
  AttentionOptions fixed;
  fixed.query_tile = 7, fixed.key_tile = 5;
  const TilePlan plan = plan_tiles<float>(100, 100, 64, 64, fixed);
  EXPECT_EQ(plan.rows, 7);
  EXPECT_EQ(plan.cols, round_up(5, KernelShape<float>::kPacket));
}

// Packed key tiles kept between tiles (windows, block layouts): whatever the sequence of key tiles (sliding by whole
// panels or not, shorter than a panel, coming back to a global block, running past a slot's room), every tile's
// panels equal packing it afresh; a tile starting a whole panel after the last one reuses its panels in place.
TEST(PackKeyTile, KeptPanelsEqualPackingAfreshAndAreReusedInPlace) {
  constexpr Index P = KernelShape<float>::kCols;
  for (int slots : {1, 2})
    for (Index d : {1, 8, 67}) {
      const Matrix<float> k = Matrix<float>::Random(60 * P + 7, d);
      const StridedView<float> kv{k.data(), k.rows(), d, d, 1};
      TilePlan plan{6, 5 * P + 3, 1};
      plan.key_slots = slots;
      AttentionWorkspace<float> ws;
      ws.fit(plan, d, d);
      std::vector<float> fresh;
      const auto check = [&](Index j0, Index cols) {
        EXPECT_LE(j0 + cols, k.rows());
        const Index cols_pad = round_up(cols, KernelShape<float>::kPacket);
        const float* got = pack_key_tile(kv, j0, cols, cols_pad, plan, ws);
        fresh.assign(size_t(round_up(cols_pad, P) * d), -1.0f);
        pack_transposed(kv, j0, cols, cols_pad, fresh.data());
        const Index filled = (cols_pad / P) * P * d + (cols_pad % P) * d;  // whole panels, then the narrower last one
        EXPECT_EQ(std::memcmp(got, fresh.data(), size_t(filled) * sizeof(float)), 0)
            << "slots " << slots << " d " << d << " tile [" << j0 << ", " << j0 + cols << ")";
        return got;
      };
      // A band sliding by whole panels: each tile starts where the last one's second panel was packed.
      const float* first = check(0, 4 * P + 5);
      EXPECT_EQ(check(P, 4 * P + 5), first + P * d) << "the second tile reuses the first one's panels in place";
      for (Index t = 2; t <= 3; ++t) check(t * P, 4 * P + 5);
      for (Index t = 4; t < 20; ++t) check(t * P, 5 * P + 3);  // past the slot's room: kept panels move to its start
      // A block layout's global block and a band, in turn; tiles shorter than a panel; starts off the panels.
      for (Index b = 2; b < 12; ++b) {
        check(0, P);
        check((b - 1) * P, 3 * P);
      }
      for (const auto& [j0, cols] : std::vector<std::pair<Index, Index>>{{3, 2 * P},
                                                                         {3 + P, 2 * P},
                                                                         {5, 1},
                                                                         {5 + P, 7},
                                                                         {40 * P, 5 * P + 3},
                                                                         {41 * P + 1, 2 * P},
                                                                         {45 * P, 5 * P + 3},
                                                                         {45 * P, 5 * P + 3},
                                                                         {46 * P, 2 * P - 1},
                                                                         {46 * P, 5 * P + 3},
                                                                         {20 * P, 5 * P + 3},
                                                                         {23 * P, 4 * P},
                                                                         {25 * P, 5 * P + 3},
                                                                         {0, 5 * P + 3}})
        check(j0, cols);
    }
}

// The Lookahead (a prefetch hint, so only its bookkeeping can be checked): paced over `steps` calls it issues every
// cache line of every queued row exactly once within those calls, for plain, strided, offset and grouped rows; rows
// that are not contiguous, or empty, are skipped; clear() forgets the rest.
TEST(Lookahead, IssuesEveryLineOfTheQueuedRowsWithinThePacedSteps) {
  std::vector<float> buffer(40000);
  const auto lines_of = [](const float* p, Index count) {  // distinct 64-byte lines of [p, p + count)
    if (count == 0) return Index(0);
    const auto first = reinterpret_cast<std::uintptr_t>(p) / 64,
               last = reinterpret_cast<std::uintptr_t>(p + count - 1) / 64;
    return Index(last - first + 1);
  };
  struct Case {
    StridedView<float> view;
    Index r0, r1;
  };
  const StridedView<float> dense{buffer.data(), 300, 64, 64, 1};
  const StridedView<float> strided{buffer.data() + 3, 100, 17, 53, 1};          // odd widths, rows mid-line
  const StridedView<float> grouped{buffer.data() + 1, 90, 20, 20, 1, 30, 700};  // three groups of 30 rows
  const StridedView<float> column_major{buffer.data(), 50, 40, 1, 50};
  const StridedView<float> no_columns{nullptr, 30, 0, 0, 1};  // d = 0: nothing to fetch (nor address)
  for (const Index steps : {1, 3, 7, 64, 1000}) {
    Lookahead ahead;
    Index expected = 0;
    for (const Case& c : {Case{dense, 0, 64}, Case{strided, 5, 71}, Case{grouped, 17, 88}, Case{column_major, 0, 50},
                          Case{no_columns, 0, 30}}) {
      ahead.add(c.view, c.r0, c.r1);
      if (c.view.row_contiguous())
        for (Index i = c.r0; i < c.r1; ++i) expected += lines_of(c.view.row(i), c.view.cols);
    }
    ahead.pace(steps);
    for (Index s = 0; s < steps; ++s) ahead.step();
    EXPECT_EQ(ahead.issued(), expected) << "steps " << steps;
    ahead.step();  // nothing left
    EXPECT_EQ(ahead.issued(), expected);
    ahead.clear();
    ahead.step();
    EXPECT_EQ(ahead.issued(), 0);
  }
  Lookahead empty;
  empty.add(dense, 10, 10);
  empty.pace(4);
  empty.step();
  EXPECT_EQ(empty.issued(), 0);
}

// store_scaled writes exactly src * scale, streaming or not (the streaming path only changes how the aligned middle
// of the row reaches memory): every count up to a few packets, every start offset within a line, nothing outside.
template <class S>
void check_store_scaled() {
  std::vector<S> src(80), dst(120);
  for (size_t i = 0; i < src.size(); ++i) src[i] = S(0.37) * S(i) - S(7.1);
  const S scale = S(1) / S(3);
  for (const bool streaming : {false, true})
    for (Index offset = 0; offset < 18; ++offset)
      for (Index count = 0; count <= 70; ++count) {
        std::fill(dst.begin(), dst.end(), S(-99));
        store_scaled(src.data(), scale, count, dst.data() + offset, streaming);
        stream_fence();
        for (Index i = 0; i < Index(dst.size()); ++i) {
          const S want = i >= offset && i < offset + count ? src[size_t(i - offset)] * scale : S(-99);
          ASSERT_EQ(dst[size_t(i)], want)
              << "streaming " << streaming << " offset " << offset << " count " << count << " at " << i;
        }
      }
}

// The decoding score kernel (a few queries, key rows read in place), with and without fetching the key rows ahead:
// the same scores bit for bit, equal to double dot products, zeros past the keys up to a whole packet; blocks that end
// mid-packet, the last keys of the matrix (nothing is fetched past them) and keys in a wider matrix.
TEST(ShortQueryScores, FetchingKeysAheadChangesNothingAndScoresEqualDoubleDots) {
  for (const Index d : {1, 16, 37, 64})
    for (const Index rows : {1, 4, 6}) {
      const Index m = 203, wide = d + 5, lds = 224;
      std::vector<float> q(size_t(rows * d)), keys(size_t(m * wide)), vals(size_t(m * 9));
      for (size_t i = 0; i < q.size(); ++i) q[i] = std::sin(0.37f * float(i) + 1.f);
      for (size_t i = 0; i < keys.size(); ++i) keys[i] = std::cos(0.23f * float(i));
      const StridedView<float> k{keys.data() + 2, m, d, wide, 1}, v{vals.data(), m, 7, 9, 1};
      for (const auto& [j0, cols] : {std::pair<Index, Index>{0, 203}, {5, 37}, {160, 43}, {190, 13}}) {
        std::vector<float> plain(size_t(rows * lds), -1.f), ahead(plain), with_values(plain);
        short_query_scores(q.data(), d, rows, k, j0, cols, plain.data(), lds, false);
        short_query_scores(q.data(), d, rows, k, j0, cols, ahead.data(), lds, true);
        short_query_scores(q.data(), d, rows, k, j0, cols, with_values.data(), lds, true, &v);
        EXPECT_EQ(plain, ahead) << "d " << d << " rows " << rows << " j0 " << j0;
        EXPECT_EQ(plain, with_values) << "d " << d << " rows " << rows << " j0 " << j0;
        for (Index r = 0; r < rows; ++r) {
          for (Index c = 0; c < cols; ++c) {
            double dot = 0;
            for (Index t = 0; t < d; ++t) dot += double(q[size_t(r * d + t)]) * double(k(j0 + c, t));
            EXPECT_NEAR(ahead[size_t(r * lds + c)], dot, 1e-5 * (1 + std::abs(dot))) << "r " << r << " c " << c;
          }
          for (Index c = cols; c < round_up(cols, KernelShape<float>::kPacket); ++c)
            EXPECT_EQ(ahead[size_t(r * lds + c)], 0.f);
        }
      }
    }
}

// AttentionOutput::continues: a call over keys B started from attention over keys A (out and lse as an earlier call
// left them) ends with attention over A and B, on the fused path and on split-K's (a few rows over many keys). Rows
// with no key in A take B's attention alone; rows with no key in B keep what they held, bit for bit.
TEST(ContinuingCall, FoldsItsKeysIntoWhatTheOutputHolds) {
  using testing::MatD;
  const auto view = [](const Matrix<float>& x, Index r0, Index rows) {
    return StridedView<float>{x.data() + r0 * x.cols(), rows, x.cols(), x.cols(), 1};
  };
  for (const auto& [n, a, m] : {std::tuple<Index, Index, Index>{37, 101, 257}, {3, 700, 2300}, {1, 1, 1030}}) {
    SCOPED_TRACE("n=" + std::to_string(n) + " keys " + std::to_string(a) + " then " + std::to_string(m - a));
    const Index d = 13, dv = 7;
    const Matrix<float> q = testing::random_matrix<float>(n, d, 1), k = testing::random_matrix<float>(m, d, 2),
                        v = testing::random_matrix<float>(m, dv, 3);
    const float scale = 1.f / std::sqrt(float(d));
    const auto run = [&](Index r0, Index rows, const AttentionOptions& o, const AttentionOutput<float>& out) {
      const MaskModel<float> mask(n, rows, o, {});
      run_attention<float, MaskModel<float>>({{view(q, 0, n), view(k, r0, rows), view(v, r0, rows), mask, scale, out}},
                                             o);
    };
    AttentionOptions all, none;
    none.key_length = 0;  // no key at all: every row's lse is -inf
    for (const bool first_empty : {false, true}) {
      SCOPED_TRACE(first_empty ? "no key in A" : "keys in A and B");
      Matrix<float> out = Matrix<float>::Constant(n, dv, 5.f);
      Vector<float> lse(n);
      run(0, a, first_empty ? none : all, {out.data(), dv, lse.data()});
      const Matrix<float> held = out;
      const Vector<float> held_lse = lse;
      AttentionOutput<float> dst{out.data(), dv, lse.data()};
      dst.continues = true;
      run(a, m - a, all, dst);
      const Index from = first_empty ? a : 0;
      const testing::NaiveResult expected = testing::naive_attention(
          q.cast<double>(), k.bottomRows(m - from).cast<double>(), v.bottomRows(m - from).cast<double>(), all);
      EXPECT_TRUE(testing::all_close(out, expected.out, testing::attention_tolerance<float>(m) * 4));
      for (Index i = 0; i < n; ++i) EXPECT_NEAR(lse[i], expected.lse[i], 1e-5 * (1 + std::abs(expected.lse[i])));
      // keeps_lse false: the same rows, the lse only read.
      Matrix<float> rows_only = held;
      Vector<float> read_lse = held_lse;
      AttentionOutput<float> last{rows_only.data(), dv, read_lse.data()};
      last.continues = true;
      last.keeps_lse = false;
      run(a, m - a, all, last);
      EXPECT_TRUE(rows_only == out);
      EXPECT_TRUE(read_lse == held_lse);
      // No key in B: the rows keep what they held.
      Matrix<float> again = held;
      Vector<float> again_lse = held_lse;
      AttentionOutput<float> keep{again.data(), dv, again_lse.data()};
      keep.continues = true;
      run(a, m - a, none, keep);
      EXPECT_TRUE(again == held);
      EXPECT_TRUE(again_lse == held_lse);
      if (first_empty) {
        EXPECT_TRUE(held.isZero(0));
      }
    }
  }
}

// A band's key tiles overlap: finite_value_rows reads only the value rows past what the call already found finite,
// never trusts a row it has not read, and forgets nothing it has not re-read.
TEST(FiniteValueRows, ReadsOnlyNewRowsAndNeverPassesANonFiniteOne) {
  Matrix<float> values = testing::random_matrix<float>(200, 5, 3);
  values(70, 2) = std::numeric_limits<float>::quiet_NaN();
  values(150, 4) = std::numeric_limits<float>::infinity();
  const StridedView<float> v{values.data(), 200, 5, 5, 1};
  KeyRange known{0, 0};
  EXPECT_TRUE(finite_value_rows(v, 0, 64, known));
  EXPECT_EQ(known.begin, 0);
  EXPECT_EQ(known.end, 64);
  EXPECT_FALSE(finite_value_rows(v, 32, 64, known));  // rows 64..95 hold the NaN
  EXPECT_EQ(known.end, 64);
  EXPECT_TRUE(finite_value_rows(v, 10, 50, known));   // inside what is known
  EXPECT_FALSE(finite_value_rows(v, 60, 11, known));  // rows 64..70: the NaN is the last
  EXPECT_TRUE(finite_value_rows(v, 60, 10, known));   // rows 64..69
  EXPECT_EQ(known.end, 70);
  EXPECT_TRUE(finite_value_rows(v, 71, 79, known));  // past a gap: starts afresh
  EXPECT_EQ(known.begin, 71);
  EXPECT_EQ(known.end, 150);
  EXPECT_FALSE(finite_value_rows(v, 100, 51, known));  // the Inf in row 150
  EXPECT_FALSE(finite_value_rows(v, 65, 10, known));   // before what is known: read again, the NaN
  // A NaN inside the known range can only come from a change of v between calls: fit() starts each call afresh.
  AttentionWorkspace<float> ws;
  ws.finite_values = {0, 200};
  TilePlan plan;
  plan.rows = 6, plan.cols = 16, plan.group = 1;
  ws.fit(plan, 4, 5);
  EXPECT_TRUE(ws.finite_values.empty());
}

TEST(StoreScaled, WritesExactlyTheScaledRowAtAnyOffsetStreamingOrNot) {
  check_store_scaled<float>();
  check_store_scaled<double>();
}

TEST(StoreScaled, StreamsOnlyLargeOutputsOfCallsLargerThanTheCacheTheyCountOn) {
  const Index llc = last_level_cache_bytes();
  EXPECT_GE(llc, Index(64) << 10);  // a real cache size, read once
  EXPECT_EQ(llc, last_level_cache_bytes());
  const Index l2 = l2_cache_bytes();  // the tile plans' budget: a real size, no larger than the last level
  EXPECT_GE(l2, Index(64) << 10);
  EXPECT_LE(l2, llc);
  if (CacheLevels::read().bytes[2] > 0) {  // sysfs first, as for the last level
    EXPECT_EQ(l2, CacheLevels::read().bytes[2]);
  }
  EXPECT_TRUE(exceeds_cache(llc + 1, llc / 8 + 1, llc));
  EXPECT_FALSE(exceeds_cache(llc, llc / 2, llc));      // fits in the cache
  EXPECT_FALSE(exceeds_cache(4 * llc, llc / 8, llc));  // a small output (a decoding step's partial rows)
  // Streaming stores and the tile loop's fetch-ahead: past the part of the last-level cache a call counts on, at most
  // kCachePerCpu per CPU.
  const Index usable = usable_cache_bytes(), cpus = std::max<Index>(1, Index(std::thread::hardware_concurrency()));
  EXPECT_EQ(usable, std::min(llc, cpus * kCachePerCpu));
  EXPECT_TRUE(streams_past_cache(usable + 1, usable / 8 + 1));
  EXPECT_FALSE(streams_past_cache(usable, usable / 2));
  EXPECT_FALSE(streams_past_cache(4 * usable, usable / 8));
}

TEST(ParallelFor, RunsEveryTaskOnceWithOneStatePerWorker) {
  for (int threads : {1, 2, 3, 8}) {
    std::vector<std::atomic<int>> hits(101);
    std::atomic<int> states{0};
    parallel_for(
        101, threads, [&] { return ++states; }, [&](Index t, int&) { ++hits[size_t(t)]; });
    for (auto& h : hits) EXPECT_EQ(h.load(), 1);
    EXPECT_LE(states.load(), std::max(threads, 1));
    EXPECT_GE(states.load(), 1);
  }
  parallel_for(
      0, 4, [] { return 0; }, [](Index, int&) { ADD_FAILURE() << "no task expected"; });
}

TEST(Dense, EqualsADoubleProductOnAwkwardShapesAndLayouts) {
  using ColMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  // Rows below and above one micro-kernel block and one task; columns that are not whole packets or chunks.
  for (Index n : {1, 3, 7, 97, 200})
    for (Index depth : {1, 17, 64})
      for (Index cols : {1, 5, 16, 67, 600}) {
        SCOPED_TRACE("n=" + std::to_string(n) + " depth=" + std::to_string(depth) + " cols=" + std::to_string(cols));
        const Matrix<float> x = testing::random_matrix<float>(n, depth, 1),
                            w = testing::random_matrix<float>(depth, cols, 2);
        const Matrix<float> b = testing::random_matrix<float>(1, cols, 3);
        testing::MatD expected = x.cast<double>() * w.cast<double>();
        expected.rowwise() += b.cast<double>().row(0);
        const double tol = 1e-5 * std::sqrt(double(depth)) * (1 + expected.cwiseAbs().maxCoeff());
        Matrix<float> y;
        dense(StridedView<float>{x.data(), n, depth, depth, 1}, w, b, y, 2);
        EXPECT_TRUE(testing::all_close(y, expected, tol)) << "row-major x";
        const ColMajor xc = x;  // rows not contiguous: packed per block
        dense(StridedView<float>{xc.data(), n, depth, 1, n}, w, b, y, 3);
        EXPECT_TRUE(testing::all_close(y, expected, tol)) << "column-major x";
        Matrix<float> no_bias;
        dense(StridedView<float>{x.data(), n, depth, depth, 1}, w, Matrix<float>(), no_bias, 1);
        EXPECT_TRUE(testing::all_close(no_bias, x.cast<double>() * w.cast<double>(), tol)) << "no bias";
      }
}

TEST(Dense, FewRowsStreamTheDepthInPartsAndEqualADoubleProduct) {
  // Decoding shapes (fewer rows than a micro-kernel strip): depths of one part, several (300 = 3 parts, the last
  // shorter), the 16-part cap (2100) and a row count that is not a multiple of four per part; columns ragged and wider
  // than a task. Bit for bit the same on any thread count.
  for (Index n : {1, 2, 5})
    for (Index depth : {1, 7, 300, 2100})
      for (Index cols : {3, 16, 67, 1030}) {
        SCOPED_TRACE("n=" + std::to_string(n) + " depth=" + std::to_string(depth) + " cols=" + std::to_string(cols));
        const Matrix<float> x = testing::random_matrix<float>(n, depth, 4),
                            w = testing::random_matrix<float>(depth, cols, 5);
        const Matrix<float> b = testing::random_matrix<float>(1, cols, 6);
        testing::MatD expected = x.cast<double>() * w.cast<double>();
        expected.rowwise() += b.cast<double>().row(0);
        const double tol = 1e-5 * std::sqrt(double(depth)) * (1 + expected.cwiseAbs().maxCoeff());
        Matrix<float> serial, parallel;
        dense(StridedView<float>{x.data(), n, depth, depth, 1}, w, b, serial, 1);
        EXPECT_TRUE(testing::all_close(serial, expected, tol));
        for (int threads : {2, 3}) {
          dense(StridedView<float>{x.data(), n, depth, depth, 1}, w, b, parallel, threads);
          EXPECT_EQ(std::memcmp(serial.data(), parallel.data(), sizeof(float) * size_t(serial.size())), 0) << threads;
        }
      }
}

TEST(Dense, FewRowsWithALimitedDepthNeverReadTheRowsOfWTheyCannotSee) {
  // x's rows are zero outside [lo, hi) and say so; w's rows outside hold NaN, and so does one row inside it that
  // meets a zero weight. The result is the product over the visible rows only.
  const Index n = 3, depth = 700, cols = 40, lo = 130, hi = 555;
  Matrix<float> x = Matrix<float>::Zero(n, depth), w = testing::random_matrix<float>(depth, cols, 8);
  x.middleCols(lo, hi - lo) = testing::random_matrix<float>(n, hi - lo, 7);
  x.col(300).setZero();
  w.topRows(lo).setConstant(std::numeric_limits<float>::quiet_NaN());
  w.bottomRows(depth - hi).setConstant(std::numeric_limits<float>::infinity());
  w.row(300).setConstant(std::numeric_limits<float>::quiet_NaN());
  Matrix<float> clean = w;
  clean.topRows(lo).setZero(), clean.bottomRows(depth - hi).setZero(), clean.row(300).setZero();
  const testing::MatD expected = x.cast<double>() * clean.cast<double>();
  Matrix<float> y(n, cols);
  const auto visible = [&](Index, Index) { return KeyRange{lo, hi}; };
  for (int threads : {1, 2}) {
    dense(StridedView<float>{x.data(), n, depth, depth, 1}, matrix_view(w), Matrix<float>(), y.data(), cols, threads,
          visible);
    EXPECT_TRUE(y.allFinite());
    EXPECT_TRUE(testing::all_close(y, expected, 1e-4 * (1 + expected.cwiseAbs().maxCoeff()))) << threads;
  }
}

TEST(Dense, BitIdenticalForAnyThreadCount) {
  const Matrix<float> x = testing::random_matrix<float>(300, 257, 1), w = testing::random_matrix<float>(257, 1030, 2);
  Matrix<float> serial, parallel;
  dense(StridedView<float>{x.data(), 300, 257, 257, 1}, w, Matrix<float>(), serial, 1);
  for (int threads : {2, 3, 0}) {
    dense(StridedView<float>{x.data(), 300, 257, 257, 1}, w, Matrix<float>(), parallel, threads);
    EXPECT_EQ(std::memcmp(serial.data(), parallel.data(), sizeof(float) * size_t(serial.size())), 0) << threads;
  }
}

}  // namespace
}  // namespace attnkit::detail
