// Multi-head attention: the whole layer (projections + attention), the attention part alone on projected heads
// (to compare with bench_sdpa's bare fused kernel), and one decoding step over a KV cache. Float, all threads.
//
// FLOPs of a forward over n tokens, width W, H heads of d, H_kv key/value heads:
//   projections 2 n W (2 H d + 2 H_kv d), attention 4 d H per allowed pair (n^2 here).
#include <string>
#include <vector>

#include "bench_util.hpp"

namespace attnkit::bench {
namespace {

struct Shape {
  Index width, heads, kv_heads;
};

MultiHeadConfig config_of(const Shape& s) {
  MultiHeadConfig c;
  c.width = s.width, c.heads = s.heads, c.kv_heads = s.kv_heads, c.rope = true;
  return c;
}

double projection_flops(const Shape& s, Index n) {
  const double d = double(s.width / s.heads);
  return 2.0 * double(n) * double(s.width) * (2.0 * double(s.heads) * d + 2.0 * double(s.kv_heads) * d);
}

void BM_MhaForward(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), state.range(2)};
  const Index n = state.range(3);
  const MultiHeadAttention<float> layer(config_of(s), 1);
  const Matrix<float> x = random_matrix<float>(n, s.width, 2);
  Matrix<float> out(n, s.width);
  const int64_t heap = run_timed(state, [&] { layer.forward_into(x, out); });
  const int threads = detail::resolve_threads(0);
  report(state,
         projection_flops(s, n) +
             attention_flops(double(n) * double(n), s.width / s.heads, s.width / s.heads) * double(s.heads),
         threads, heap);
  report_workspace(state, layer.workspace_bytes(n));
  report_error(state, std::to_string(s.width) + "/" + std::to_string(s.heads) + "/" + std::to_string(s.kv_heads),
               [&] { return layer_error<MultiHeadAttention>(config_of(s), 64, s.width, AttentionOptions{}); });
}

void BM_MhaAttentionOnly(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), state.range(2)};
  const Index n = state.range(3), d = s.width / s.heads;
  const Matrix<float> q = random_matrix<float>(n, s.heads * d, 1), k = random_matrix<float>(n, s.kv_heads * d, 2);
  const Matrix<float> v = random_matrix<float>(n, s.kv_heads * d, 3);
  Matrix<float> out(n, s.heads * d);
  const int64_t heap = run_timed(state, [&] { multi_head_attention(q, k, v, out, s.heads, s.kv_heads); });
  report(state, attention_flops(double(n) * double(n), d, d) * double(s.heads), detail::resolve_threads(0), heap);
  report_workspace(state, multi_head_attention_workspace_bytes<float>(n, n, s.heads, s.kv_heads, d, d));
  report_error(state, std::to_string(s.width) + "/" + std::to_string(s.heads) + "/" + std::to_string(s.kv_heads), [&] {
    const Index small = 64;
    const Matrix<float> sq = q.topRows(small), sk = k.topRows(small), sv = v.topRows(small);
    Matrix<float> f(small, s.heads * d);
    Matrix<double> e(small, s.heads * d);
    multi_head_attention(sq, sk, sv, f, s.heads, s.kv_heads);
    multi_head_attention(sq.cast<double>().eval(), sk.cast<double>().eval(), sv.cast<double>().eval(), e, s.heads,
                         s.kv_heads);
    return relative_error(f, e);
  });
}

/// One new token against a cache of `cached` tokens; the cache is rolled back after each step.
void BM_MhaDecodeStep(benchmark::State& state) {
  const Shape s{state.range(0), state.range(1), state.range(2)};
  const Index cached = state.range(3), d = s.width / s.heads;
  const MultiHeadAttention<float> layer(config_of(s), 1);
  KVCache<float> cache = layer.make_cache(cached + 1);
  layer.forward_step(random_matrix<float>(cached, s.width, 2), cache);
  const Matrix<float> token = random_matrix<float>(1, s.width, 3);
  // The first step grows the cache's storage to its capacity (once per cache, amortised); the heap is a later step's.
  layer.forward_step(token, cache);
  cache.truncate(cached);
  release_cached_workspaces();
  const int64_t heap = heap::peak_during([&] {
    layer.forward_step(token, cache);
    cache.truncate(cached);
  });
  for (auto _ : state) {
    benchmark::DoNotOptimize(layer.forward_step(token, cache).data());
    cache.truncate(cached);
  }
  report(state, projection_flops(s, 1) + attention_flops(double(cached + 1), d, d) * double(s.heads),
         detail::resolve_threads(0), heap);
  report_workspace(state, layer.step_workspace_bytes(1, cached));
  report_error(state, std::to_string(s.width) + "/" + std::to_string(s.heads) + "/" + std::to_string(s.kv_heads), [&] {
    // One step after 1500 cached tokens (split-K), float against double layers from the same seed.
    const MultiHeadAttention<float> lf(config_of(s), 1);
    const MultiHeadAttention<double> ld(config_of(s), 1);
    KVCache<float> cf = lf.make_cache(1501);
    KVCache<double> cd = ld.make_cache(1501);
    const Matrix<float> history = random_matrix<float>(1500, s.width, 5), next = random_matrix<float>(1, s.width, 6);
    lf.forward_step(history, cf);
    ld.forward_step(history.cast<double>().eval(), cd);
    return relative_error(lf.forward_step(next, cf), ld.forward_step(next.cast<double>().eval(), cd));
  });
  const double kv_bytes = 2.0 * double(cached + 1) * double(s.kv_heads * d) * sizeof(float);
  report_kv_rate(state, kv_bytes, detail::resolve_threads(0));
  // A step also reads every projection weight once: with them, the bytes it must bring in per step, against a plain
  // read of as many (step_GBps, pct_step_read_bw). Past the last-level cache that is the bound of a decoding step.
  const double weight_bytes =
      double(layer.w_q.size() + layer.w_k.size() + layer.w_v.size() + layer.w_o.size()) * sizeof(float);
  report_read_rate(state, kv_bytes + weight_bytes, detail::resolve_threads(0), "step_GBps", "pct_step_read_bw");
}

void layer_shapes(benchmark::internal::Benchmark* b, const std::vector<int64_t>& lengths) {
  b->ArgNames({"width", "heads", "kv_heads", "n"});
  for (const Shape& s : {Shape{512, 8, 8}, Shape{1024, 16, 4}})
    for (int64_t n : lengths) b->Args({s.width, s.heads, s.kv_heads, n});
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_MhaForward)->Apply([](auto* b) { layer_shapes(b, {128, 256, 512, 1024, 2048, 4096, 8192}); });
BENCHMARK(BM_MhaAttentionOnly)->Apply([](auto* b) { layer_shapes(b, {128, 256, 512, 1024, 2048, 4096, 8192}); });
BENCHMARK(BM_MhaDecodeStep)->Apply([](auto* b) {
  b->ArgNames({"width", "heads", "kv_heads", "m"});
  for (int64_t m : {128, 1024, 4096, 16384}) b->Args({1024, 16, 4, m});
  b->UseRealTime()->Unit(benchmark::kMicrosecond);
});

}  // namespace
}  // namespace attnkit::bench

ATTNKIT_BENCHMARK_MAIN()
