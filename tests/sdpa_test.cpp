// Fused scaled dot-product attention against the independent double-precision loop oracle, and the materialising
// attnkit::reference against the same oracle. Sizes 1, odd primes and round numbers; every option alone and combined.
#include <attnkit/attnkit.hpp>

#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "test_util.hpp"

namespace attnkit {
namespace {

using testing::all_close;
using testing::MatD;
using testing::naive_attention;
using testing::NaiveExtras;
using testing::random_matrix;

const Index kSizes[] = {1, 3, 17, 64, 65, 129, 300};
const Index kDims[] = {1, 8, 64, 80, 128};

template <class S>
class SdpaTest : public ::testing::Test {
 protected:
  static double tol(Index m) { return testing::attention_tolerance<S>(m); }

  // Runs fused (returning and out-parameter forms) and reference on the same inputs and checks all three, plus the
  // log-sum-exp, against the oracle.
  template <class... Extras>
  void check(Index n, Index m, Index d, Index dv, const AttentionOptions& o, const NaiveExtras& x,
             const Extras&... extras) {
    SCOPED_TRACE("n=" + std::to_string(n) + " m=" + std::to_string(m) + " d=" + std::to_string(d) +
                 " dv=" + std::to_string(dv));
    const Matrix<S> q = random_matrix<S>(n, d, 1 + unsigned(n)), k = random_matrix<S>(m, d, 2 + unsigned(m));
    const Matrix<S> v = random_matrix<S>(m, dv, 3 + unsigned(d));
    const auto expected =
        naive_attention(q.template cast<double>(), k.template cast<double>(), v.template cast<double>(), o, x);
    const double vmax = m > 0 && dv > 0 ? v.cwiseAbs().maxCoeff() : 1.0;
    const Matrix<S> fused = scaled_dot_product_attention(q, k, v, o, extras...);
    EXPECT_TRUE(all_close(fused, expected.out, tol(m) * vmax)) << "fused";
    Matrix<S> out(n, dv);
    Vector<S> lse(n);
    scaled_dot_product_attention(q, k, v, out, lse, o, extras...);
    EXPECT_TRUE(all_close(out, expected.out, tol(m) * vmax)) << "fused into out";
    for (Index i = 0; i < n; ++i) {
      if (std::isinf(expected.lse(i))) {
        EXPECT_TRUE(std::isinf(lse(i)) && lse(i) < 0) << "row " << i << " has no key, lse " << lse(i);
      } else {
        EXPECT_NEAR(lse(i), expected.lse(i), tol(m) * (1 + std::abs(expected.lse(i)))) << "lse row " << i;
      }
    }
    const Matrix<S> ref = reference::scaled_dot_product_attention(q, k, v, o, extras...);
    EXPECT_TRUE(all_close(ref, expected.out, tol(m) * vmax)) << "reference";
  }
};

using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SdpaTest, Scalars, testing::ScalarName);

TYPED_TEST(SdpaTest, SizesSweep) {
  Index case_id = 0;
  for (Index n : kSizes)
    for (Index m : kSizes) {
      const Index d = kDims[case_id % 5], dv = kDims[(case_id + 2) % 5];
      ++case_id;
      this->check(n, m, d, dv, {}, {});
    }
}

TYPED_TEST(SdpaTest, EveryHeadDimension) {
  for (Index d : kDims) this->check(65, 129, d, d, {}, {});
}

// Packing K^T: key counts that end in a short block (fewer keys than a packet) with head dimensions that are not whole
// packets either (the transposed blocks plus their leftover columns), alone and as the last of several key tiles.
TYPED_TEST(SdpaTest, ShortKeyBlocksWithRaggedWidths) {
  for (Index m : {2, 7, 21, 37})
    for (Index d : {5, 20, 37}) this->check(23, m, d, 19, {}, {});
  AttentionOptions o;
  o.key_tile = 24;  // rounded up to whole packets: 101 keys leave a short last tile
  this->check(30, 101, 37, 16, o, {});
}

struct NamedOptions {
  const char* name;
  AttentionOptions options;
};

std::vector<NamedOptions> option_cases() {
  std::vector<NamedOptions> cases;
  auto add = [&](const char* name, auto set) {
    AttentionOptions o;
    set(o);
    cases.push_back({name, o});
  };
  add("causal bottom-right", [](auto& o) { o.causal = true; });
  add("causal top-left", [](auto& o) { o.causal = true, o.align = CausalAlign::kTopLeft; });
  add("window 5/3", [](auto& o) { o.window_left = 5, o.window_right = 3; });
  add("window 0/0", [](auto& o) { o.window_left = 0, o.window_right = 0; });
  add("window left 40, top-left", [](auto& o) { o.window_left = 40, o.align = CausalAlign::kTopLeft; });
  add("causal window 16", [](auto& o) { o.causal = true, o.window_left = 16; });
  add("key padding", [](auto& o) { o.key_length = 2; });
  add("alibi", [](auto& o) { o.alibi_slope = 0.25; });
  add("softcap", [](auto& o) { o.softcap = 0.5; });
  add("log-n", [](auto& o) { o.log_n_scale = true; });
  add("scale", [](auto& o) { o.scale = 0.9; });
  add("everything", [](auto& o) {
    o.causal = true, o.window_left = 20, o.key_length = 1, o.alibi_slope = 0.1, o.softcap = 3, o.log_n_scale = true,
    o.scale = 0.3;
  });
  add("everything top-left, small tiles", [](auto& o) {
    o.causal = true, o.align = CausalAlign::kTopLeft, o.window_left = 7, o.alibi_slope = 0.5, o.softcap = 2,
    o.log_n_scale = true, o.query_tile = 7, o.key_tile = 5;
  });
  return cases;
}

TYPED_TEST(SdpaTest, EveryOptionAloneAndCombined) {
  const std::pair<Index, Index> shapes[] = {{1, 1}, {3, 17}, {17, 3}, {65, 129}, {129, 65}, {64, 64}, {300, 17}};
  for (const auto& c : option_cases()) {
    SCOPED_TRACE(c.name);
    for (const auto& [n, m] : shapes) {
      AttentionOptions o = c.options;
      if (o.key_length >= 0) o.key_length = std::min<Index>(m, o.key_length == 1 ? (m + 1) / 2 : m - 1);
      this->check(n, m, 8, 80, o, {});
      this->check(n, m, 80, 8, o, {});
    }
  }
}

TYPED_TEST(SdpaTest, BiasMaskAndCallables) {
  using S = TypeParam;
  const Index n = 65, m = 129;
  const Matrix<S> bias = random_matrix<S>(n, m, 11);
  BoolMatrix mask(n, m);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < m; ++j) mask(i, j) = (i * 7 + j * 3) % 5 != 0;
  const auto allowed = [](Index i, Index j) { return (i + j) % 3 != 1; };
  const auto score = [](S s, Index i, Index j) { return s + S(0.01) * S((i * j) % 7); };
  const MatD bias_d = bias.template cast<double>();
  NaiveExtras x_bias{&bias_d, nullptr, {}, {}};
  NaiveExtras x_mask{nullptr, &mask, {}, {}};
  NaiveExtras x_allowed{nullptr, nullptr, allowed, {}};
  NaiveExtras x_score{nullptr, nullptr, {}, [](double s, Index i, Index j) { return s + 0.01 * double((i * j) % 7); }};
  NaiveExtras x_all{&bias_d, &mask, allowed, x_score.score};
  for (const auto& c : option_cases()) {
    SCOPED_TRACE(c.name);
    AttentionOptions o = c.options;
    if (o.key_length >= 0) o.key_length = 100;
    this->check(n, m, 17, 9, o, x_bias, bias);
    this->check(n, m, 17, 9, o, x_mask, mask);
    this->check(n, m, 17, 9, o, x_allowed, allowed);
    this->check(n, m, 17, 9, o, x_score, score);
    this->check(n, m, 17, 9, o, x_all, score, mask, allowed, bias);
  }
}

// A few queries over many keys take the split-K path (chunks of keys merged through their log-sum-exps): decoding
// shapes in chunks of 512 keys, up to 64 rows (a prefill's short chunk against a long cache) in chunks of 4096, the
// last one here 3 keys long.
TYPED_TEST(SdpaTest, FewQueriesOverManyKeysSplitAcrossKeyChunks) {
  using S = TypeParam;
  const Index wide_m = 2 * detail::kWideSplitKeys + 3;
  ASSERT_TRUE(detail::use_split_keys<S>(detail::kSplitRows, wide_m));
  ASSERT_FALSE(detail::use_split_keys<S>(detail::kSplitRows + 1, wide_m));
  ASSERT_FALSE(detail::use_split_keys<S>(detail::kSplitRows, wide_m - 4));
  for (const auto& c : option_cases()) {
    SCOPED_TRACE(c.name);
    const auto run = [&](Index n, Index m) {
      AttentionOptions o = c.options;
      if (o.key_length >= 0) o.key_length = o.key_length == 1 ? m / 3 : m - 700;
      this->check(n, m, 16, 24, o, {});
    };
    for (Index n : {1, 2, 5})
      for (Index m : {1024, 1537, 4099}) run(n, m);
    for (Index n : {7, 64}) run(n, wide_m);
  }
  // A bias, a boolean mask and callables, indexed by the keys' positions in the whole call, in every chunk.
  for (const auto& [n, m] : {std::pair<Index, Index>{3, 2100}, {9, wide_m}}) {
    ASSERT_TRUE(detail::use_split_keys<S>(n, m));
    const Matrix<S> bias = random_matrix<S>(n, m, 5);
    BoolMatrix mask(n, m);
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < m; ++j) mask(i, j) = (j * 7 + i) % 11 != 0 && j < m - 200 - 300 * i;
    const MatD bias_d = bias.template cast<double>();
    const auto allowed = [](Index i, Index j) { return (i + j) % 3 != 1; };
    const auto score = [](S s, Index i, Index j) { return s + S(0.01) * S((i * j) % 7); };
    const NaiveExtras x_all{&bias_d, &mask, allowed,
                            [](double s, Index i, Index j) { return s + 0.01 * double((i * j) % 7); }};
    AttentionOptions causal;
    causal.causal = true;
    this->check(n, m, 8, 8, causal, NaiveExtras{&bias_d, &mask, {}, {}}, bias, mask);
    this->check(n, m, 8, 8, AttentionOptions{}, x_all, score, mask, allowed, bias);
  }
}

// Decoding shapes (at most a micro-kernel's rows of queries) read the key rows in place for their scores (fold_sums
// for AVX-512 floats, a register transpose for every other packet): odd head dimensions (tails past the packets), key
// blocks ending mid-packet, one key tile or split-K, causal, and keys in a block of a wider matrix (row stride != d).
TYPED_TEST(SdpaTest, DecodingShapesOnOddHeadDimensionsAndStridedKeys) {
  using S = TypeParam;
  AttentionOptions causal;
  causal.causal = true;
  for (Index n : {1, 4, 6})
    for (Index m : {17, 1000, 1031})
      for (Index d : {1, 15, 17, 67, 200})
        this->check(n, m, d, d == 1 ? 3 : d, (n + m + d) % 2 ? causal : AttentionOptions{}, {});
  const Index n = 5, m = 1043, d = 37;
  const Matrix<S> q = random_matrix<S>(n, d, 1), v = random_matrix<S>(m, d, 3);
  Matrix<S> wide = random_matrix<S>(m, d + 9, 2);
  const Matrix<S> k = wide.middleCols(4, d);
  const auto expected =
      naive_attention(q.template cast<double>(), k.template cast<double>(), v.template cast<double>(), {});
  EXPECT_TRUE(all_close(scaled_dot_product_attention(q, wide.middleCols(4, d), v), expected.out,
                        this->tol(m) * v.cwiseAbs().maxCoeff()));
}

// Decoding shapes whose keys and values are whole packets of one width in rows of that width (a KV cache's heads):
// with AVX-512 floats, up to 4 query rows take each whole key tile in blocks of 16 keys (decode_tile: scores, softmax
// step and P V per block), fetching rows ahead when keys and values exceed L2 (m = 3001 at d = 128: 3 MiB); other
// shapes and tiles take the tile loop's path. Blocks ending mid-packet, causal rows whose last tile is partial,
// split-K.
TYPED_TEST(SdpaTest, DecodingShapesOfWholePacketsInTheirOwnRows) {
  AttentionOptions causal;
  causal.causal = true;
  for (Index n : {1, 2, 3, 4, 5})
    for (Index d : {16, 64, 80, 128})
      for (Index m : {1, 15, 16, 17, 529, 3001}) this->check(n, m, d, d, (n + m) % 2 ? causal : AttentionOptions{}, {});
}

// A NaN in a key or a value every row sees reaches every row, through any block of 16 keys.
TYPED_TEST(SdpaTest, NanInAKeyOrValueOfADecodingBlockReachesEveryRow) {
  using S = TypeParam;
  const Index n = 4, m = 3001, d = 64;
  const Matrix<S> q = random_matrix<S>(n, d, 1);
  for (const Index j : {0, 1500, 3000})
    for (const bool in_key : {true, false}) {
      Matrix<S> k = random_matrix<S>(m, d, 2), v = random_matrix<S>(m, d, 3);
      (in_key ? k : v)(j, 5) = std::numeric_limits<S>::quiet_NaN();
      const Matrix<S> out = scaled_dot_product_attention(q, k, v);
      EXPECT_TRUE(in_key ? out.array().isNaN().all() : out.col(5).array().isNaN().all())
          << "key " << j << (in_key ? " (in K)" : " (in V)");
    }
}

TYPED_TEST(SdpaTest, SplitKeysAreBitIdenticalForAnyThreadCount) {
  using S = TypeParam;
  for (const auto& [n, m] : {std::pair<Index, Index>{2, 5000}, {33, 9001}}) {  // decoding, and a prefill's chunk
    ASSERT_TRUE(detail::use_split_keys<S>(n, m));
    const Matrix<S> q = random_matrix<S>(n, 64, 1), k = random_matrix<S>(m, 64, 2), v = random_matrix<S>(m, 64, 3);
    AttentionOptions o;
    o.threads = 1;
    const Matrix<S> serial = scaled_dot_product_attention(q, k, v, o);
    for (int threads : {2, 3, 8}) {
      o.threads = threads;
      const Matrix<S> parallel = scaled_dot_product_attention(q, k, v, o);
      EXPECT_EQ(std::memcmp(serial.data(), parallel.data(), sizeof(S) * size_t(serial.size())), 0)
          << n << " rows, " << threads << " threads";
    }
  }
}

TYPED_TEST(SdpaTest, FullyMaskedRowsAreZeroWithMinusInfinityLse) {
  using S = TypeParam;
  // Bottom-right causal with n > m: the first n - m queries precede every key.
  const Matrix<S> q = random_matrix<S>(10, 8, 1), k = random_matrix<S>(4, 8, 2), v = random_matrix<S>(4, 3, 3);
  AttentionOptions o;
  o.causal = true;
  Matrix<S> out(10, 3);
  Vector<S> lse(10);
  scaled_dot_product_attention(q, k, v, out, lse, o);
  for (Index i = 0; i < 6; ++i) {
    EXPECT_EQ(out.row(i).cwiseAbs().maxCoeff(), S(0)) << "row " << i;
    EXPECT_TRUE(std::isinf(lse(i)) && lse(i) < 0) << "row " << i;
  }
  EXPECT_TRUE(out.row(6).allFinite());
  EXPECT_GT(out.row(9).cwiseAbs().maxCoeff(), S(0));
  // A mask that rejects a whole row, and key_length = 0 that rejects everything.
  BoolMatrix mask = BoolMatrix::Constant(10, 4, true);
  mask.row(3).setConstant(false);
  const Matrix<S> masked = scaled_dot_product_attention(q, k, v, {}, mask);
  EXPECT_EQ(masked.row(3).cwiseAbs().maxCoeff(), S(0));
  AttentionOptions none;
  none.key_length = 0;
  EXPECT_EQ(scaled_dot_product_attention(q, k, v, none).cwiseAbs().maxCoeff(), S(0));
}

TYPED_TEST(SdpaTest, NanInMaskedKeysAndValuesNeverLeaks) {
  using S = TypeParam;
  const Index n = 70, m = 70, d = 16;
  const Matrix<S> q = random_matrix<S>(n, d, 1);
  Matrix<S> k = random_matrix<S>(m, d, 2), v = random_matrix<S>(m, d, 3);
  const Matrix<S> k_clean = k, v_clean = v;
  const S nan = std::numeric_limits<S>::quiet_NaN();
  // Padding: keys >= 50 hold NaN and are masked for every row.
  k.bottomRows(20).setConstant(nan);
  v.bottomRows(20).setConstant(nan);
  AttentionOptions pad;
  pad.key_length = 50;
  const double tol = this->tol(m);
  const auto clean =
      naive_attention(q.template cast<double>(), k_clean.template cast<double>(), v_clean.template cast<double>(), pad);
  EXPECT_TRUE(all_close(scaled_dot_product_attention(q, k, v, pad), clean.out, tol * 4));
  EXPECT_TRUE(all_close(reference::scaled_dot_product_attention(q, k, v, pad), clean.out, tol * 4));
  // Causal: key 60 is allowed for rows >= 60 only. NaN there must reach those rows and no other.
  k = k_clean, v = v_clean;
  k(60, 3) = nan;
  v(60, 1) = nan;
  AttentionOptions causal;
  causal.causal = true;
  for (Index tile : {0, 7, 64}) {
    causal.query_tile = causal.key_tile = tile;
    const Matrix<S> out = scaled_dot_product_attention(q, k, v, causal);
    const auto expected = naive_attention(q.template cast<double>(), k_clean.template cast<double>(),
                                          v_clean.template cast<double>(), causal);
    EXPECT_TRUE(all_close(out.topRows(60), expected.out.topRows(60), tol * 4)) << "tile " << tile;
    EXPECT_TRUE(out.row(60).hasNaN()) << "NaN in an allowed key propagates";
  }
  // An element-wise mask hiding a NaN value from some rows.
  k = k_clean, v = v_clean;
  v(5, 0) = nan;
  BoolMatrix mask = BoolMatrix::Constant(n, m, true);
  mask.col(5).setConstant(false);
  mask(40, 5) = true;
  NaiveExtras x{nullptr, &mask, {}, {}};
  const Matrix<S> out = scaled_dot_product_attention(q, k, v, {}, mask);
  const auto expected = naive_attention(q.template cast<double>(), k_clean.template cast<double>(),
                                        v_clean.template cast<double>(), {}, x);
  for (Index i = 0; i < n; ++i) {
    if (i == 40) {
      EXPECT_TRUE(out.row(i).hasNaN());
    } else {
      EXPECT_TRUE(all_close(out.row(i), expected.out.row(i), tol * 4)) << "row " << i;
    }
  }
}

TYPED_TEST(SdpaTest, NanInAQueryReachesItsRowOnly) {
  using S = TypeParam;
  const Index n = 40, m = 600, d = 16;
  Matrix<S> q = random_matrix<S>(n, d, 1);
  const Matrix<S> k = random_matrix<S>(m, d, 2), v = random_matrix<S>(m, d, 3);
  const Matrix<S> clean = scaled_dot_product_attention(q, k, v);
  q(7, 2) = std::numeric_limits<S>::quiet_NaN();  // every logit of row 7 is NaN: not a row with no allowed key
  Matrix<S> out(n, d);
  Vector<S> lse(n);
  scaled_dot_product_attention(q, k, v, out, lse);
  EXPECT_TRUE(out.row(7).array().isNaN().all());
  EXPECT_TRUE(std::isnan(lse(7)));
  EXPECT_EQ(out.topRows(7), clean.topRows(7));
  EXPECT_EQ(out.bottomRows(n - 8), clean.bottomRows(n - 8));
  // Split-K decoding (one query over many keys) merges the NaN row's parts into NaN too.
  EXPECT_TRUE(scaled_dot_product_attention(q.row(7), k, v).array().isNaN().all());
}

TYPED_TEST(SdpaTest, BitIdenticalForAnyThreadCount) {
  using S = TypeParam;
  const Matrix<S> q = random_matrix<S>(300, 64, 1), k = random_matrix<S>(1000, 64, 2);
  const Matrix<S> v = random_matrix<S>(1000, 80, 3);
  // query_tile 0: the automatic query tile follows the thread count (the key tile must not).
  for (Index query_tile : {12, 0})
    for (bool causal : {false, true}) {
      AttentionOptions o;
      o.causal = causal;
      o.query_tile = query_tile;
      o.threads = 1;
      const Matrix<S> serial = scaled_dot_product_attention(q, k, v, o);
      for (int threads : {2, 3, 4, 7, 0}) {
        o.threads = threads;
        const Matrix<S> parallel = scaled_dot_product_attention(q, k, v, o);
        EXPECT_EQ(std::memcmp(serial.data(), parallel.data(), sizeof(S) * size_t(serial.size())), 0)
            << "threads " << threads << " causal " << causal << " query_tile " << query_tile;
      }
    }
}

// Blocks of query tiles share each packed key tile when their rows walk the same key tiles (dense, causal, key
// padding, a bias); a window walks tile by tile. Either way every row is bit for bit what one query tile of the same
// rows gives walking alone (an explicit query_tile never groups), and matches the double-precision loops: odd and
// round sizes, ragged key tiles, keys and values holding NaN that no row may see, and a short last block.
TYPED_TEST(SdpaTest, QueryTilesSharingPackedKeyTilesGiveTheirOwnResults) {
  using S = TypeParam;
  const S nan = std::numeric_limits<S>::quiet_NaN();
  for (const Index n : {1000, 997, 389})
    for (const Index d : {13, 64}) {
      const Index m = n + 11, dv = 16;
      const Matrix<S> q = random_matrix<S>(n, d, 1), k_clean = random_matrix<S>(m, d, 2);
      const Matrix<S> v_clean = random_matrix<S>(m, dv, 3), bias = random_matrix<S>(n, m, 4);
      const MatD bias_d = bias.template cast<double>();
      std::vector<AttentionOptions> cases(6);
      cases[1].causal = true;
      cases[2].key_length = m - 11;  // the last 11 keys and values are NaN: padding must hide them
      cases[3].causal = true, cases[3].key_length = m - 11;
      cases[4].key_tile = 80;      // ragged key tiles, and the bias below
      cases[5].window_left = 100;  // query tiles of a window see different key tiles: no sharing
      for (size_t c = 0; c < cases.size(); ++c) {
        AttentionOptions o = cases[c];
        o.threads = 1;
        SCOPED_TRACE("n " + std::to_string(n) + " d " + std::to_string(d) + " case " + std::to_string(c));
        const detail::TilePlan plan = detail::plan_tiles<S>(n, m, d, dv, o);
        // d = 13: a block's queries and accumulators fit in 40% of any L2 of 256 KiB or more, so blocks exist; a
        // window's query tiles walk their own keys one tile at a time, whole panels apart.
        if (o.window_left >= 0) {
          ASSERT_EQ(plan.group, 1);
          ASSERT_EQ(plan.key_slots, 1);
          ASSERT_EQ(plan.rows % std::lcm(Index(detail::KernelShape<S>::kRows), Index(detail::KernelShape<S>::kCols)),
                    0);
        } else if (d == 13 && n > 2 * detail::kMaxQueryTile<S>) {
          ASSERT_GT(plan.group, 1);
        }
        Matrix<S> k = k_clean, v = v_clean;
        if (o.key_length > 0) k.bottomRows(11).setConstant(nan), v.bottomRows(11).setConstant(nan);
        const bool biased = c == 4;
        const Matrix<S> grouped =
            biased ? scaled_dot_product_attention(q, k, v, o, bias) : scaled_dot_product_attention(q, k, v, o);
        AttentionOptions alone = o;
        alone.query_tile = plan.rows;
        const Matrix<S> single =
            biased ? scaled_dot_product_attention(q, k, v, alone, bias) : scaled_dot_product_attention(q, k, v, alone);
        EXPECT_EQ(std::memcmp(grouped.data(), single.data(), sizeof(S) * size_t(grouped.size())), 0);
        NaiveExtras x{biased ? &bias_d : nullptr, nullptr, {}, {}};
        const auto expected = naive_attention(q.template cast<double>(), k_clean.template cast<double>(),
                                              v_clean.template cast<double>(), o, x);
        EXPECT_TRUE(all_close(grouped, expected.out, this->tol(m)));
      }
    }
}

TYPED_TEST(SdpaTest, MapsBlocksExpressionsAndStorageOrders) {
  using S = TypeParam;
  using ColMajor = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;
  const Index n = 33, m = 47, d = 24, dv = 19;
  const Matrix<S> q = random_matrix<S>(n, d, 1), k = random_matrix<S>(m, d, 2), v = random_matrix<S>(m, dv, 3);
  const auto expected =
      naive_attention(q.template cast<double>(), k.template cast<double>(), v.template cast<double>(), {});
  const double tol = this->tol(m) * v.cwiseAbs().maxCoeff();
  const ColMajor qc = q, kc = k, vc = v;
  EXPECT_TRUE(all_close(scaled_dot_product_attention(qc, kc, vc), expected.out, tol)) << "column-major";
  // Maps over padded buffers (outer stride > cols), either storage order.
  std::vector<S> qbuf(size_t(n * (d + 5))), kbuf(size_t(d * (m + 3)));
  Eigen::Map<Matrix<S>, 0, Eigen::OuterStride<>> qmap(qbuf.data(), n, d, Eigen::OuterStride<>(d + 5));
  Eigen::Map<ColMajor, 0, Eigen::OuterStride<>> kmap(kbuf.data(), m, d, Eigen::OuterStride<>(m + 3));
  qmap = q;
  kmap = k;
  EXPECT_TRUE(all_close(scaled_dot_product_attention(qmap, kmap, v), expected.out, tol)) << "maps";
  // Blocks of larger matrices and lazy expressions.
  Matrix<S> big = Matrix<S>::Zero(n + 4, d + 6);
  big.block(2, 3, n, d) = q;
  EXPECT_TRUE(all_close(scaled_dot_product_attention(big.block(2, 3, n, d), k, v), expected.out, tol)) << "block";
  EXPECT_TRUE(all_close(scaled_dot_product_attention(q * S(1), (k.array() + S(0)).matrix(), vc.transpose().transpose()),
                        expected.out, tol))
      << "expressions";
  // Output into a block of a larger row-major matrix.
  Matrix<S> canvas = Matrix<S>::Constant(n + 2, dv + 7, S(42));
  scaled_dot_product_attention(q, k, v, canvas.block(1, 2, n, dv));
  EXPECT_TRUE(all_close(canvas.block(1, 2, n, dv), expected.out, tol)) << "out block";
  EXPECT_EQ(canvas(0, 0), S(42));
  EXPECT_EQ(canvas(n + 1, dv + 6), S(42));
}

// Value rows 1 KiB apart (a head of a wider matrix: a multi-head layer's values, a sparse residue class) alias in
// L1 and are packed per key tile instead of read in place (reads_values_in_place). The results are bit for bit those
// of the same values stored contiguously, match the oracle, and a NaN in masked value rows (key padding, causal)
// stays out of the rows that do not see it.
TYPED_TEST(SdpaTest, ValueRowsThatAliasInL1ArePackedWithTheSameResults) {
  using S = TypeParam;
  const Index width = 1024 / Index(sizeof(S)), dv = 16, d = 12;  // rows of the wide matrix 1 KiB apart
  for (const auto& [n, m] : {std::pair<Index, Index>{7, 17}, {65, 100}, {130, 129}, {300, 257}}) {
    SCOPED_TRACE("n=" + std::to_string(n) + " m=" + std::to_string(m));
    const Matrix<S> q = random_matrix<S>(n, d, 1), k = random_matrix<S>(m, d, 2);
    Matrix<S> wide = random_matrix<S>(m, width, 3);
    const auto v = wide.middleCols(5 * dv, dv);
    const Matrix<S> v_dense = v;
    // Packed unless the call is a decoding step, the rows are not whole packets or the tile's values exceed L1.
    const detail::ViewOf<std::decay_t<decltype(v)>> view(v);
    const bool short_queries = detail::use_short_query_scores(n, detail::matrix_view(k));
    const Index cols = detail::plan_tiles<S>(n, m, d, dv, {}).cols;
    EXPECT_EQ(view.view().row_stride, width);
    EXPECT_EQ(detail::reads_values_in_place(view.view(), cols, short_queries),
              short_queries || dv % detail::KernelShape<S>::kPacket != 0 ||
                  cols * dv * Index(sizeof(S)) > detail::kL1ValueBytes);
    EXPECT_TRUE(detail::reads_values_in_place(detail::matrix_view(v_dense), cols, short_queries) ==
                (dv % detail::KernelShape<S>::kPacket == 0));
    for (const bool causal : {false, true}) {
      AttentionOptions o;
      o.causal = causal;
      o.key_length = m - m / 4;
      // Rows past key_length hold NaN: masked for every query, they must not reach any row.
      wide.middleRows(o.key_length, m - o.key_length).setConstant(std::numeric_limits<S>::quiet_NaN());
      Matrix<S> clean = v;
      clean.middleRows(o.key_length, m - o.key_length).setZero();
      const auto expected =
          naive_attention(q.template cast<double>(), k.template cast<double>(), clean.template cast<double>(), o);
      const Matrix<S> out = scaled_dot_product_attention(q, k, v, o);
      EXPECT_TRUE(all_close(out, expected.out, this->tol(m) * clean.cwiseAbs().maxCoeff())) << causal;
      EXPECT_TRUE(out == scaled_dot_product_attention(q, k, Matrix<S>(v), o)) << "packed == contiguous, " << causal;
    }
  }
}

TYPED_TEST(SdpaTest, EmptyInputs) {
  using S = TypeParam;
  const Matrix<S> q = random_matrix<S>(5, 8, 1);
  const Matrix<S> none(0, 8), v_none(0, 3);
  const Matrix<S> zeros = scaled_dot_product_attention(q, none, v_none);
  ASSERT_EQ(zeros.rows(), 5);
  ASSERT_EQ(zeros.cols(), 3);
  EXPECT_EQ(zeros.cwiseAbs().maxCoeff(), S(0));
  EXPECT_EQ(reference::scaled_dot_product_attention(q, none, v_none).cwiseAbs().maxCoeff(), S(0));
  const Matrix<S> k = random_matrix<S>(4, 8, 2), v = random_matrix<S>(4, 3, 3);
  const Matrix<S> empty = scaled_dot_product_attention(none, k, v);
  EXPECT_EQ(empty.rows(), 0);
  EXPECT_EQ(empty.cols(), 3);
}

TYPED_TEST(SdpaTest, TileSizesDoNotChangeTheResultBeyondRounding) {
  for (Index qt : {1, 5, 13, 96})
    for (Index kt : {1, 7, 64, 1000}) {
      AttentionOptions o;
      o.query_tile = qt, o.key_tile = kt, o.causal = (qt + kt) % 2 == 0;
      SCOPED_TRACE("query_tile=" + std::to_string(qt) + " key_tile=" + std::to_string(kt));
      this->check(67, 131, 8, 24, o, {});
    }
}

using testing::expect_error;

// A call larger than the cache an output counts on writes it past the caches (streaming stores): its rows equal, bit
// for bit, those of a call on a slice of the queries, small enough to write through the caches (a row's result does
// not depend on its query tile). Odd head sizes leave rows that start mid-packet.
TEST(SdpaFloat, OutputWrittenPastTheCachesEqualsTheCachedPath) {
  using S = float;
  for (const auto& [d, dv] : {std::pair<Index, Index>{8, 16}, {5, 7}}) {
    const Index m = 40;
    const Index n = detail::usable_cache_bytes() / ((d + dv) * Index(sizeof(S))) * 5 / 4;
    ASSERT_TRUE(detail::streams_past_cache((n + m) * (d + dv) * Index(sizeof(S)), n * dv * Index(sizeof(S))));
    const Matrix<S> q = random_matrix<S>(n, d, 1), k = random_matrix<S>(m, d, 2), v = random_matrix<S>(m, dv, 3);
    const Matrix<S> full = scaled_dot_product_attention(q, k, v);
    for (const Index s0 : {Index(0), n / 2 + 3, n - 77}) {
      const Index rows = std::min<Index>(77, n - s0);
      EXPECT_TRUE(full.middleRows(s0, rows) == scaled_dot_product_attention(q.middleRows(s0, rows), k, v))
          << "d " << d << " d_v " << dv << " rows from " << s0;
    }
    EXPECT_TRUE(full.allFinite());
  }
}

// A chunk of query rows over keys and values larger than the usable cache, its output small (chunked prefill against
// a long cache): the tile loop fetches key tiles ahead without streaming the output, in each split-K chunk (33 rows)
// or over all the keys (65 rows, a whole call). The rows still equal the double reference, causal (rows aligned to the
// last keys) and not, with one thread and two.
TEST(SdpaFloat, FewRowsOverKeysPastTheCacheFetchAhead) {
  using S = float;
  const Index d = 16, dv = 8;
  const Index m = detail::usable_cache_bytes() / ((d + dv) * Index(sizeof(S))) * 9 / 8 + 3;
  const Matrix<S> k = random_matrix<S>(m, d, 2), v = random_matrix<S>(m, dv, 3);
  for (const Index n : {detail::kFetchRows + 1, detail::kSplitRows + 1}) {
    const Index bytes = (n + m) * (d + dv) * Index(sizeof(S));
    ASSERT_GT(bytes, detail::usable_cache_bytes());
    ASSERT_FALSE(detail::streams_past_cache(bytes, n * dv * Index(sizeof(S))));  // the output goes through the caches
    EXPECT_EQ(detail::use_split_keys<S>(n, m), n <= detail::kSplitRows);
    const Matrix<S> q = random_matrix<S>(n, d, 1);
    for (const bool causal : {false, true})
      for (const int threads : {1, 2}) {
        AttentionOptions o;
        o.causal = causal, o.threads = threads;
        const Matrix<S> out = scaled_dot_product_attention(q, k, v, o);
        EXPECT_TRUE(all_close(
            out, naive_attention(q.cast<double>().eval(), k.cast<double>().eval(), v.cast<double>().eval(), o).out,
            testing::attention_tolerance<S>(m)))
            << n << " rows, causal " << causal << " threads " << threads;
      }
  }
}

// A score callable that itself runs attention (on the same thread, while the outer call holds the thread's cached
// tile workspace) gets a workspace of its own: both results match the reference, and a call after it still does.
TEST(SdpaFloat, NestedCallsFromACallableUseTheirOwnWorkspace) {
  using S = float;
  const Index n = 37, m = 53, d = 16;
  const Matrix<S> q = random_matrix<S>(n, d, 1), k = random_matrix<S>(m, d, 2), v = random_matrix<S>(m, d, 3);
  const Matrix<S> iq = random_matrix<S>(9, 8, 4), ik = random_matrix<S>(11, 8, 5), iv = random_matrix<S>(11, 3, 6);
  const Matrix<S> inner_expected = scaled_dot_product_attention(iq, ik, iv);
  int nested = 0;
  bool inner_ok = true;
  const auto score = [&](S s, Index i, Index j) {
    if (i == 5 && j == 7) {
      ++nested;
      inner_ok = inner_ok && scaled_dot_product_attention(iq, ik, iv) == inner_expected;
    }
    return s;
  };
  AttentionOptions o;
  o.threads = 1;  // the callable runs on the caller's thread, which holds the cached workspace
  const Matrix<S> out = scaled_dot_product_attention(q, k, v, o, score);
  EXPECT_GE(nested, 1);
  EXPECT_TRUE(inner_ok);
  EXPECT_TRUE(
      all_close(out, naive_attention(q.cast<double>().eval(), k.cast<double>().eval(), v.cast<double>().eval(), o).out,
                testing::attention_tolerance<S>(m)));
  EXPECT_TRUE(scaled_dot_product_attention(iq, ik, iv) == inner_expected);
}

TEST(SdpaErrors, BadInputsThrowErrorsNamingArgumentAndShapes) {
  const Matrix<float> q = Matrix<float>::Ones(4, 8), k = Matrix<float>::Ones(6, 8), v = Matrix<float>::Ones(6, 5);
  const Matrix<float> k_bad = Matrix<float>::Ones(6, 7), v_bad = Matrix<float>::Ones(5, 5);
  expect_error([&] { scaled_dot_product_attention(q, k_bad, v); }, {"k", "4x8", "6x7"});
  expect_error([&] { scaled_dot_product_attention(q, k, v_bad); }, {"v", "6x8", "5x5"});
  expect_error([&] { reference::scaled_dot_product_attention(q, k_bad, v); }, {"k", "6x7"});
  expect_error([&] { scaled_dot_product_attention(Matrix<float>(4, 0), Matrix<float>(6, 0), v); }, {"d_k", "4x0"});
  expect_error([&] { scaled_dot_product_attention(q, k, v, {}, Matrix<float>::Zero(4, 5)); }, {"bias", "4x5", "4x6"});
  expect_error([&] { scaled_dot_product_attention(q, k, v, {}, BoolMatrix::Constant(3, 6, true)); },
               {"mask", "3x6", "4x6"});
  expect_error([&] { scaled_dot_product_attention(q, k, v, {}, Matrix<float>::Zero(4, 6), Matrix<float>::Zero(4, 6)); },
               {"more than one bias"});
  Matrix<float> out(4, 4);
  expect_error([&] { scaled_dot_product_attention(q, k, v, out); }, {"out", "4x4", "4x5"});
  Matrix<float> out_ok(4, 5);
  Vector<float> lse(3);
  expect_error([&] { scaled_dot_product_attention(q, k, v, out_ok, lse); }, {"lse", "3"});
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  const auto with = [&](auto set) {
    AttentionOptions o;
    set(o);
    return [&, o] { scaled_dot_product_attention(q, k, v, o); };
  };
  expect_error(with([](auto& o) { o.window_left = -2; }), {"window_left", "-2"});
  expect_error(with([](auto& o) { o.window_right = -5; }), {"window_right"});
  expect_error(with([](auto& o) { o.scale = -1; }), {"scale"});
  expect_error(with([&](auto& o) { o.scale = nan; }), {"scale"});
  expect_error(with([&](auto& o) { o.scale = inf; }), {"scale"});
  expect_error(with([](auto& o) { o.alibi_slope = -0.5; }), {"alibi_slope"});
  expect_error(with([&](auto& o) { o.alibi_slope = nan; }), {"alibi_slope"});
  expect_error(with([](auto& o) { o.softcap = -3; }), {"softcap"});
  expect_error(with([&](auto& o) { o.softcap = inf; }), {"softcap"});
  expect_error(with([](auto& o) { o.key_length = 7; }), {"key_length", "6"});
  expect_error(with([](auto& o) { o.key_length = -3; }), {"key_length"});
  expect_error(with([](auto& o) { o.threads = -1; }), {"threads"});
  expect_error(with([](auto& o) { o.query_tile = -1; }), {"query_tile"});
  expect_error(with([](auto& o) { o.key_tile = -4; }), {"key_tile"});
  static_assert(std::is_base_of_v<std::invalid_argument, Error>);
}

TEST(SdpaReference, WeightsAreADistributionPerRow) {
  const Matrix<double> q = random_matrix<double>(31, 16, 1), k = random_matrix<double>(37, 16, 2);
  AttentionOptions o;
  o.causal = true, o.align = CausalAlign::kTopLeft, o.window_left = 9;
  const Matrix<double> p = reference::attention_weights(q, k, o);
  for (Index i = 0; i < p.rows(); ++i) {
    EXPECT_NEAR(p.row(i).sum(), 1.0, 1e-12) << "row " << i;
    for (Index j = 0; j < p.cols(); ++j) {
      if (j > i || j < i - 9) {
        EXPECT_EQ(p(i, j), 0.0) << "(" << i << ", " << j << ")";
      }
    }
  }
}

}  // namespace
}  // namespace attnkit
