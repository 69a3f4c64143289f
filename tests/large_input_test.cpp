// Large inputs: n = 65536, d = 128 through fused SDPA, sparse local attention and linear attention. Each call
// completes, is finite, matches a double-precision row check, and its heap growth (counted by the malloc interposer
// in support/counting_malloc.cpp) stays within the workspace the library documents for it: an n x n matrix would be
// 16 GiB. Built only without sanitizers, which replace malloc themselves.
#include <gtest/gtest.h>

#include <attnkit/attnkit.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

#include "../support/counting_malloc.hpp"
#include "test_util.hpp"

namespace attnkit::testing {
namespace {

constexpr Index kN = 65536, kD = 128;
/// Allocations a call may make besides its workspace: the thread pool's bookkeeping, allocator rounding.
constexpr int64_t kSlack = 64 * 1024;

struct Inputs {
  Matrix<float> q = random_matrix<float>(kN, kD, 1), k = random_matrix<float>(kN, kD, 2),
                v = random_matrix<float>(kN, kD, 3);
  Matrix<float> out = Matrix<float>(kN, kD);
};

const Inputs& inputs() {
  static const Inputs in;
  return in;
}

/// Rows of softmax attention recomputed in double: row i over the keys `keys(i)` (ascending), 1/sqrt(d) scale.
template <class Keys>
void expect_rows_match_softmax(const Matrix<float>& out, const Keys& keys, const char* what) {
  const Inputs& in = inputs();
  for (const Index i : {Index(0), Index(1), Index(4099), Index(40001), kN - 1}) {
    const std::vector<Index> js = keys(i);
    Eigen::VectorXd s(Index(js.size()));
    for (size_t t = 0; t < js.size(); ++t)
      s(Index(t)) = in.q.row(i).cast<double>().dot(in.k.row(js[t]).cast<double>()) / std::sqrt(double(kD));
    const Eigen::VectorXd p = (s.array() - s.maxCoeff()).exp();
    Eigen::RowVectorXd want = Eigen::RowVectorXd::Zero(kD);
    for (size_t t = 0; t < js.size(); ++t) want += p(Index(t)) * in.v.row(js[t]).cast<double>();
    want /= p.sum();
    EXPECT_LT((out.row(i).cast<double>() - want).cwiseAbs().maxCoeff(), 2e-5) << what << ", row " << i;
  }
}

/// Runs `call` once on a small problem first (thread pool and thread_local buffers exist before counting), then
/// measures the peak heap of the large call.
template <class Warm, class Call>
int64_t measured_heap(const Warm& warm, const Call& call) {
  warm();
  return heap::peak_during(call);
}

/// Prints a measurement next to its bound (the test log then shows how tight the documented figure is).
void show(const char* what, int64_t heap, int64_t bound) {
  std::printf("  %s: heap %.1f KiB, documented bound %.1f KiB (incl. %lld KiB slack)\n", what, double(heap) / 1024,
              double(bound) / 1024, static_cast<long long>(kSlack / 1024));
}

TEST(LargeInput, FusedSdpaWithinItsWorkspace) {
  const Inputs& in = inputs();
  Matrix<float> out(kN, kD);
  AttentionOptions o;
  o.causal = true;  // half the FLOPs of the full problem keeps the test under a minute on portable flags
  const int64_t heap =
      measured_heap([&] { scaled_dot_product_attention(in.q.topRows(300), in.k.topRows(300), in.v.topRows(300), o); },
                    [&] { scaled_dot_product_attention(in.q, in.k, in.v, out, o); });
  const int64_t bound = int64_t(detail::resolve_threads(o.threads)) *
                            scaled_dot_product_attention_workspace_bytes<float>(kN, kN, kD, kD, o) +
                        kSlack;
  show("sdpa causal", heap, bound);
  EXPECT_LE(heap, bound) << "measured " << heap << " bytes";
  EXPECT_LT(bound, int64_t(8) << 20);  // the documented workspace itself is a few MiB, not O(n^2)
  EXPECT_TRUE(out.allFinite());
  expect_rows_match_softmax(
      out,
      [](Index i) {
        std::vector<Index> js;
        for (Index j = 0; j <= i; ++j) js.push_back(j);
        return js;
      },
      "sdpa");
}

TEST(LargeInput, SparseLocalWithinItsWorkspace) {
  const Inputs& in = inputs();
  Matrix<float> out(kN, kD);
  const SparsePattern local = SparsePattern::local(256);
  const int64_t heap =
      measured_heap([&] { sparse_attention(in.q.topRows(600), in.k.topRows(600), in.v.topRows(600), local); },
                    [&] { sparse_attention(in.q, in.k, in.v, out, local); });
  const int64_t bound = sparse_attention_workspace_bytes<float>(kN, kN, kD, kD, local) + kSlack;
  show("sparse local(256)", heap, bound);
  EXPECT_LE(heap, bound) << "measured " << heap << " bytes";
  EXPECT_LT(bound, int64_t(8) << 20);
  EXPECT_TRUE(out.allFinite());
  expect_rows_match_softmax(
      out,
      [](Index i) {
        std::vector<Index> js;
        for (Index j = std::max<Index>(0, i - 256); j <= std::min(kN - 1, i + 256); ++j) js.push_back(j);
        return js;
      },
      "sparse local");
}

TEST(LargeInput, LinearAttentionWithinItsWorkspace) {
  const Inputs& in = inputs();
  for (const bool causal : {false, true}) {
    Matrix<float> out(kN, kD);
    LinearOptions o;
    o.causal = causal;
    const int64_t heap = measured_heap(
        [&] { linear_attention(in.q.topRows(300), in.k.topRows(300), in.v.topRows(300), EluPlusOne{}, o); },
        [&] { linear_attention(in.q, in.k, in.v, out, EluPlusOne{}, o); });
    const int64_t bound = linear_attention_workspace_bytes<float>(kN, kN, kD, kD, EluPlusOne{}, o) + kSlack;
    show(causal ? "linear elu+1 causal" : "linear elu+1", heap, bound);
    EXPECT_LE(heap, bound) << "causal " << causal << ": measured " << heap << " bytes";
    EXPECT_LT(bound, int64_t(4) << 20);
    EXPECT_TRUE(out.allFinite());
    // Row 40001 against the formula in double: sum_j phi(q).phi(k_j) v_j / (sum_j phi(q).phi(k_j) + eps).
    const Index i = 40001, keys = causal ? i + 1 : kN;
    const auto phi = [](const Eigen::RowVectorXd& x) -> Eigen::RowVectorXd {
      return x.unaryExpr([](double t) { return t > 0 ? t + 1 : std::exp(t); });
    };
    const Eigen::RowVectorXd fq = phi(in.q.row(i).cast<double>());
    Eigen::RowVectorXd num = Eigen::RowVectorXd::Zero(kD);
    double den = o.eps;
    for (Index j = 0; j < keys; ++j) {
      const double a = fq.dot(phi(in.k.row(j).cast<double>()));
      num += a * in.v.row(j).cast<double>(), den += a;
    }
    EXPECT_LT((out.row(i).cast<double>() - num / den).cwiseAbs().maxCoeff(), 1e-5) << "causal " << causal;
  }
}

// The documented bounds hold for every pattern and map, not only the large cases above (odd sizes, gathered terms).
TEST(WorkspaceBound, EverySparsePatternAndLinearForm) {
  const Inputs& in = inputs();
  const Index n = 3001, d = 40, dv = 24;
  const auto q = in.q.topLeftCorner(n, d), k = in.k.topLeftCorner(n, d), v = in.v.topLeftCorner(n, dv);
  Matrix<float> out(n, dv);
  BoolMatrix layout = BoolMatrix::Constant((n + 63) / 64, (n + 63) / 64, false);
  for (Index b = 0; b < layout.rows(); ++b) layout(b, b) = layout(b, 0) = true;
  AttentionOptions causal;
  causal.causal = true, causal.log_n_scale = true;
  for (const AttentionOptions& o : {AttentionOptions{}, causal})
    for (const SparsePattern& p :
         {SparsePattern::local(17), SparsePattern::atrous(7), SparsePattern::local_atrous(9),
          SparsePattern::strided(55), SparsePattern::fixed(64, 3), SparsePattern::block(layout, 64),
          SparsePattern::atrous(64), SparsePattern::local_atrous(100),  // short classes, as lanes
          // classes of 16 (4) queries: class by class with 16-lane (4-lane) packets, when not causal
          SparsePattern::atrous(200), SparsePattern::atrous(751)}) {
      const int64_t heap =
          measured_heap([&] { sparse_attention(q, k, v, out, p, o); }, [&] { sparse_attention(q, k, v, out, p, o); });
      EXPECT_LE(heap, sparse_attention_workspace_bytes<float>(n, n, d, dv, p, o) + kSlack)
          << p.terms().size() << " terms, causal " << o.causal;
    }
  // Blocks as long as the sequence: tiles aligned with them would hold n^2 scores (36 MB here); default tiles do not.
  const BoolMatrix one = BoolMatrix::Constant(1, 1, true);
  for (const SparsePattern& p : {SparsePattern::fixed(n, 16), SparsePattern::block(one, n)}) {
    const int64_t heap =
        measured_heap([&] { sparse_attention(q, k, v, out, p); }, [&] { sparse_attention(q, k, v, out, p); });
    EXPECT_LE(heap, sparse_attention_workspace_bytes<float>(n, n, d, dv, p) + kSlack) << p.terms().size() << " terms";
    EXPECT_LE(sparse_attention_workspace_bytes<float>(n, n, d, dv, p), Index(8) << 20) << p.terms().size() << " terms";
  }
  // Decoding shapes: a few queries over many keys, each residue class a split-K call with its partial outputs.
  for (const int threads : {1, 2})
    for (const SparsePattern& p : {SparsePattern::atrous(7), SparsePattern::strided(9), SparsePattern::fixed(64, 3)}) {
      AttentionOptions o;
      o.threads = threads;
      const Index m = 20000;
      const auto q3 = in.q.topLeftCorner(3, d), km = in.k.topLeftCorner(m, d), vm = in.v.topLeftCorner(m, dv);
      Matrix<float> out3(3, dv);
      const int64_t heap = measured_heap(  // a cold call: the thread pool set up, no tile workspace cached
          [&] {
            sparse_attention(q3, km, vm, out3, p, o);
            release_cached_workspaces();
          },
          [&] { sparse_attention(q3, km, vm, out3, p, o); });
      EXPECT_LE(heap, sparse_attention_workspace_bytes<float>(3, m, d, dv, p, o) + kSlack)
          << p.terms().size() << " terms, decoding, threads " << threads;
    }
  for (const bool is_causal : {false, true}) {
    LinearOptions o;
    o.causal = is_causal;
    const auto check = [&](const auto& map, const char* name) {
      const int64_t heap = measured_heap([&] { linear_attention(q, k, v, out, map, o); },
                                         [&] { linear_attention(q, k, v, out, map, o); });
      EXPECT_LE(heap, linear_attention_workspace_bytes<float>(n, n, d, dv, map, o) + kSlack)
          << name << ", causal " << is_causal;
    };
    check(EluPlusOne{}, "elu+1");
    check(Relu{}, "relu");
    check(Taylor{}, "taylor");
  }
}

}  // namespace
}  // namespace attnkit::testing
