// Linear attention: each feature map in each form vs the exact fused kernel, d = 64, float, one thread. FLOPs are
// not comparable across families (linear attention does O(n r d) work), so this benchmark reports time, heap and, in
// bench/plot.py's summary, the length where each linear form overtakes exact attention.
#include <string>
#include <vector>

#include "bench_util.hpp"

namespace attnkit::bench {
namespace {

constexpr Index kD = 64;

enum MapId { kElu, kRelu, kTaylor, kPerformer, kEfficient };
const char* const kMapNames[] = {"elu+1", "relu", "taylor", "performer", "efficient"};

/// Runs `body(map)` with the feature map `id` (Efficient Attention has none: body gets nullptr_t).
template <class S, class Body>
void with_map(int id, const Body& body) {
  switch (id) {
    case kElu:
      return body(EluPlusOne{});
    case kRelu:
      return body(Relu{});
    case kTaylor:
      return body(Taylor{});
    case kPerformer:
      return body(PerformerFeatures<S>(kD));
    default:
      return body(nullptr);
  }
}

/// Linear attention with `map`, or Efficient Attention when there is none.
template <class S, class Map>
Matrix<S> attend(const Matrix<S>& q, const Matrix<S>& k, const Matrix<S>& v, const Map& map, const LinearOptions& o) {
  if constexpr (std::is_same_v<Map, std::nullptr_t>)
    return efficient_attention(q, k, v, o);
  else
    return linear_attention(q, k, v, map, o);
}

void BM_Linear(benchmark::State& state) {
  const int id = int(state.range(0));
  const Index n = state.range(2);
  const Matrix<float> q = random_matrix<float>(n, kD, 1), k = random_matrix<float>(n, kD, 2),
                      v = random_matrix<float>(n, kD, 3);
  Matrix<float> out(n, kD);
  LinearOptions o;
  o.causal = state.range(1) != 0;
  o.threads = int(state.range(3));
  with_map<float>(id, [&](const auto& map) {
    const auto call = [&] {
      if constexpr (std::is_same_v<std::decay_t<decltype(map)>, std::nullptr_t>)
        efficient_attention(q, k, v, out, o);
      else
        linear_attention(q, k, v, out, map, o);
    };
    const int64_t heap = run_timed(state, call);
    state.counters["heap_MiB"] = double(heap) / (1024.0 * 1024.0);
    if constexpr (!std::is_same_v<std::decay_t<decltype(map)>, std::nullptr_t>)
      report_workspace(state, linear_attention_workspace_bytes<float>(n, n, kD, kD, map, o));
    else
      report_workspace(state, efficient_attention_workspace_bytes<float>(n, n, kD, kD, o));
  });
  report_error(state, std::to_string(id) + "/" + std::to_string(state.range(1)), [&] {  // n = 200, same map in double
    const Matrix<float> sq = q.topRows(200), sk = k.topRows(200), sv = v.topRows(200);
    Matrix<float> f;
    Matrix<double> e;
    with_map<float>(id, [&](const auto& map) { f = attend(sq, sk, sv, map, o); });
    with_map<double>(id, [&](const auto& map) {
      e = attend(sq.cast<double>().eval(), sk.cast<double>().eval(), sv.cast<double>().eval(), map, o);
    });
    return relative_error(f, e);
  });
  state.SetLabel(kMapNames[id]);
}

/// elu+1 at n = 4096 and 65536, its rows (q, k, v, out) in 4 KiB or 2 MiB pages (PagedRows, placed alike): what the
/// pages of the caller's rows add to the growth past the caches.
void BM_LinearPages(benchmark::State& state) {
  const Index n = state.range(1);
  PagedProblem x(n, kD, state.range(2) == 2048);
  auto out = x.out.map();
  LinearOptions o;
  o.causal = state.range(0) != 0;
  o.threads = 1;
  const int64_t heap =
      run_timed(state, [&] { linear_attention(x.q.map(), x.k.map(), x.v.map(), out, EluPlusOne{}, o); });
  state.counters["heap_MiB"] = double(heap) / (1024.0 * 1024.0);
  state.SetLabel(kMapNames[kElu]);
}

/// Exact attention at the same sizes, for the speed-ups and the crossover.
void BM_Exact(benchmark::State& state) {
  const Index n = state.range(1);
  const Matrix<float> q = random_matrix<float>(n, kD, 1), k = random_matrix<float>(n, kD, 2),
                      v = random_matrix<float>(n, kD, 3);
  Matrix<float> out(n, kD);
  AttentionOptions o;
  o.causal = state.range(0) != 0;
  o.threads = int(state.range(2));
  const int64_t heap = run_timed(state, [&] { scaled_dot_product_attention(q, k, v, out, o); });
  state.counters["heap_MiB"] = double(heap) / (1024.0 * 1024.0);
  report_workspace(
      state, detail::resolve_threads(o.threads) * scaled_dot_product_attention_workspace_bytes<float>(n, n, kD, kD, o));
  report_error(state, std::to_string(state.range(0)),
               [&] { return fused_error(q.topRows(200), k.topRows(200), v.topRows(200), o); });
}

/// One decoding step of the recurrent form after `length` tokens: should not depend on the length.
void BM_RecurrentStep(benchmark::State& state) {
  const int id = int(state.range(0));
  const Index length = state.range(1);
  const Matrix<float> q = random_matrix<float>(1, kD, 1), k = random_matrix<float>(1, kD, 2),
                      v = random_matrix<float>(1, kD, 3);
  with_map<float>(id, [&](const auto& map) {
    using Map = std::decay_t<decltype(map)>;
    if constexpr (!std::is_same_v<Map, std::nullptr_t>) {
      LinearAttentionState<float, Map> s(map, kD, kD);
      const Matrix<float> prefix = random_matrix<float>(length, kD, 4);
      s.step(prefix, prefix, prefix);  // the history, processed once, outside the timing
      const int64_t heap = heap::peak_during([&] { benchmark::DoNotOptimize(s.step(q, k, v).data()); });
      for (auto _ : state) benchmark::DoNotOptimize(s.step(q, k, v).data());
      state.counters["heap_MiB"] = double(heap) / (1024.0 * 1024.0);
      report_workspace(state, s.step_workspace_bytes(1));
    }
  });
  report_error(state, std::to_string(id), [&] {  // a step after 100 tokens, float against double
    const Matrix<float> history = random_matrix<float>(100, kD, 5);
    Matrix<float> f;
    Matrix<double> e;
    with_map<float>(id, [&](const auto& map) {
      if constexpr (!std::is_same_v<std::decay_t<decltype(map)>, std::nullptr_t>) {
        LinearAttentionState<float, std::decay_t<decltype(map)>> s(map, kD, kD);
        s.step(history, history, history);
        f = s.step(q, k, v);
      }
    });
    with_map<double>(id, [&](const auto& map) {
      if constexpr (!std::is_same_v<std::decay_t<decltype(map)>, std::nullptr_t>) {
        LinearAttentionState<double, std::decay_t<decltype(map)>> s(map, kD, kD);
        const Matrix<double> h = history.cast<double>();
        s.step(h, h, h);
        e = s.step(q.cast<double>().eval(), k.cast<double>().eval(), v.cast<double>().eval());
      }
    });
    return relative_error(f, e);
  });
  state.SetLabel(kMapNames[id]);
}

const std::vector<int64_t> kLengths = {256, 1024, 4096, 16384, 65536};

// Growth from 4096 to 65536 is a target: at least a second per size, so that its best calls (best_ms) come from
// enough calls for a burst of the host's other tenants not to decide it.
BENCHMARK(BM_Linear)
    ->ArgNames({"map", "causal", "n", "threads"})
    ->ArgsProduct({{kElu, kRelu, kTaylor, kPerformer}, {0, 1}, kLengths, {1}})
    ->MinTime(1.0)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Linear)
    ->ArgNames({"map", "causal", "n", "threads"})
    ->ArgsProduct({{kEfficient}, {0}, kLengths, {1}})
    ->MinTime(1.0)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_LinearPages)
    ->ArgNames({"causal", "n", "page_KiB"})
    ->ArgsProduct({{0, 1}, {4096, 65536}, {4, 2048}})
    ->MinTime(1.0)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Exact)
    ->ArgNames({"causal", "n", "threads"})
    ->ArgsProduct({{0, 1}, kLengths, {1}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RecurrentStep)
    ->ArgNames({"map", "length"})
    ->ArgsProduct({{kElu, kPerformer}, {1024, 16384, 65536}})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

// The memory's share of the growth targets, measured in the same run (bench_util.hpp).
[[maybe_unused]] const bool kStreamFloor = register_stream_floor();

}  // namespace
}  // namespace attnkit::bench

ATTNKIT_BENCHMARK_MAIN()
