// Sparse attention: each pattern vs the dense fused kernel, single head, d = 64, float, one thread. FLOPs = 4 d per
// allowed (query, key) pair, counted exactly, so GFLOP/s compare the kernels' efficiency on the work they must do;
// time ratios to BM_Dense at the same n are the speed-ups (bench/plot.py tabulates both).
#include <string>
#include <vector>

#include "bench_util.hpp"

namespace attnkit::bench {
namespace {

constexpr Index kD = 64;
constexpr Index kBlock = 64;

/// A BigBird-like layout: a band of three blocks, a global first key block every query sees, and a global first
/// query block that sees every key. Allowed pairs grow like n.
BoolMatrix band_and_global_layout(Index n) {
  const Index blocks = (n + kBlock - 1) / kBlock;
  BoolMatrix layout = BoolMatrix::Constant(blocks, blocks, false);
  for (Index b = 0; b < blocks; ++b)
    for (Index c = std::max<Index>(0, b - 1); c <= std::min(blocks - 1, b + 1); ++c) layout(b, c) = true;
  layout.col(0).setConstant(true);
  layout.row(0).setConstant(true);
  return layout;
}

enum PatternId { kLocal, kAtrous, kLocalAtrous, kStrided, kFixed, kBlockSparse };
const char* const kPatternNames[] = {"local(128)",   "atrous(128)",   "local_atrous(128)",
                                     "strided(128)", "fixed(128,16)", "block(64,band+global)"};

SparsePattern make_pattern(int id, Index n) {
  switch (id) {
    case kLocal:
      return SparsePattern::local(128);
    case kAtrous:
      return SparsePattern::atrous(128);
    case kLocalAtrous:
      return SparsePattern::local_atrous(128);
    case kStrided:
      return SparsePattern::strided(128);
    case kFixed:
      return SparsePattern::fixed(128, 16);
    default:
      return SparsePattern::block(band_and_global_layout(n), kBlock);
  }
}

/// sum_i |A_i|, counted exactly in O(sum_i |A_i|) by the same rule log-n scaling uses.
double allowed_pairs(const SparsePattern& p, Index n) {
  const detail::SparseProblem<float> problem("bench", p, n, n, {});
  double pairs = 0;
  for (Index i = 0; i < n; ++i) pairs += double(problem.allowed_count(i));
  return pairs;
}

void BM_Sparse(benchmark::State& state) {
  const Index n = state.range(1);
  const SparsePattern p = make_pattern(int(state.range(0)), n);
  const Matrix<float> q = random_matrix<float>(n, kD, 1), k = random_matrix<float>(n, kD, 2),
                      v = random_matrix<float>(n, kD, 3);
  Matrix<float> out(n, kD);
  AttentionOptions o;
  o.threads = int(state.range(2));
  const int64_t heap = run_timed(state, [&] { sparse_attention(q, k, v, out, p, o); });
  const double pairs = allowed_pairs(p, n);
  report(state, attention_flops(pairs, kD, kD), o.threads, heap);
  report_error(state, std::to_string(state.range(0)), [&] {  // n = 1000 against dense attention with the mask
    const Index small = 1000;
    const SparsePattern sp = make_pattern(int(state.range(0)), small);
    const Matrix<float> sq = q.topRows(small), sk = k.topRows(small), sv = v.topRows(small);
    return relative_error(
        sparse_attention(sq, sk, sv, sp),
        reference::sparse_attention(sq.cast<double>().eval(), sk.cast<double>().eval(), sv.cast<double>().eval(), sp));
  });
  report_workspace(state, sparse_attention_workspace_bytes<float>(n, n, kD, kD, p, o));
  state.counters["keys_per_query"] = pairs / double(n);
  state.SetLabel(kPatternNames[state.range(0)]);
}

/// local(128) and the block layout at n = 4096 and 65536, their rows (q, k, v, out) in 4 KiB or 2 MiB pages
/// (PagedRows, placed alike): what the pages of the caller's rows add to the growth past the caches.
void BM_SparsePages(benchmark::State& state) {
  const Index n = state.range(1);
  const SparsePattern p = make_pattern(int(state.range(0)), n);
  PagedProblem x(n, kD, state.range(2) == 2048);
  auto out = x.out.map();
  AttentionOptions o;
  o.threads = 1;
  const int64_t heap = run_timed(state, [&] { sparse_attention(x.q.map(), x.k.map(), x.v.map(), out, p, o); });
  report(state, attention_flops(allowed_pairs(p, n), kD, kD), o.threads, heap);
  state.SetLabel(kPatternNames[state.range(0)]);
}

void BM_Dense(benchmark::State& state) {
  const Index n = state.range(0);
  const Matrix<float> q = random_matrix<float>(n, kD, 1), k = random_matrix<float>(n, kD, 2),
                      v = random_matrix<float>(n, kD, 3);
  Matrix<float> out(n, kD);
  AttentionOptions o;
  o.threads = int(state.range(1));
  const int64_t heap = run_timed(state, [&] { scaled_dot_product_attention(q, k, v, out, o); });
  report(state, attention_flops(double(n) * double(n), kD, kD), o.threads, heap);
  report_workspace(
      state, detail::resolve_threads(o.threads) * scaled_dot_product_attention_workspace_bytes<float>(n, n, kD, kD, o));
  report_error(state, "dense", [&] { return fused_error(q.topRows(1000), k.topRows(1000), v.topRows(1000)); });
  state.counters["keys_per_query"] = double(n);
}

const std::vector<int64_t> kLengths = {1024, 2048, 4096, 8192, 16384, 32768, 65536};

// Growth from 4096 to 65536 is a target: at least a second per size, so that its best calls (best_ms) come from
// enough calls for a burst of the host's other tenants not to decide it.
BENCHMARK(BM_Sparse)
    ->ArgNames({"pattern", "n", "threads"})
    ->ArgsProduct({{kLocal, kAtrous, kLocalAtrous, kStrided, kFixed, kBlockSparse}, kLengths, {1}})
    ->MinTime(1.0)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
// Two threads at two lengths: the direct call splits its query tiles, gathered calls run side by side.
BENCHMARK(BM_Sparse)
    ->ArgNames({"pattern", "n", "threads"})
    ->ArgsProduct({{kLocal, kAtrous, kLocalAtrous, kStrided, kFixed, kBlockSparse}, {16384, 65536}, {2}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SparsePages)
    ->ArgNames({"pattern", "n", "page_KiB"})
    ->ArgsProduct({{kLocal, kBlockSparse}, {4096, 65536}, {4, 2048}})
    ->MinTime(1.0)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Dense)
    ->ArgNames({"n", "threads"})
    ->ArgsProduct({kLengths, {1}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

// The memory's share of the growth targets, measured in the same run (bench_util.hpp).
[[maybe_unused]] const bool kStreamFloor = register_stream_floor();

}  // namespace
}  // namespace attnkit::bench

ATTNKIT_BENCHMARK_MAIN()
