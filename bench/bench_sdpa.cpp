// Scaled dot-product attention: fused attnkit kernel vs the careful hand-written Eigen version (preallocated n x n
// scores, .noalias() products) vs attnkit::reference, single head, float. FLOPs = 4 d per allowed (query, key)
// pair (n m for full attention, n (n + 1) / 2 causal), so causal and full rates are comparable.
#include <limits>
#include <string>

#include "bench_util.hpp"

namespace attnkit::bench {
namespace {

struct Problem {
  Index n, d;
  bool causal;
  Matrix<float> q, k, v;
  Problem(Index n_, Index d_, bool causal_)
      : n(n_),
        d(d_),
        causal(causal_),
        q(random_matrix<float>(n, d, 1)),
        k(random_matrix<float>(n, d, 2)),
        v(random_matrix<float>(n, d, 3)) {}
  double pairs() const { return causal ? 0.5 * double(n) * double(n + 1) : double(n) * double(n); }
  double flops() const { return attention_flops(pairs(), d, d); }
};

/// What a careful Eigen user writes: buffers allocated once, GEMMs without temporaries, a stable row softmax that
/// touches only the allowed part of each causal row.
struct CarefulEigen {
  Matrix<float> scores, out;
  CarefulEigen(Index n, Index dv) : scores(n, n), out(n, dv) {}
  void run(const Problem& p) {
    scores.noalias() = p.q * p.k.transpose();
    const float scale = 1.0f / std::sqrt(float(p.d));
    for (Index i = 0; i < p.n; ++i) {
      const Index allowed = p.causal ? i + 1 : p.n;
      auto row = scores.row(i).head(allowed).array();
      row = ((row - row.maxCoeff()) * scale).exp();
      row /= row.sum();
      scores.row(i).tail(p.n - allowed).setZero();
    }
    out.noalias() = scores * p.v;
  }
};

AttentionOptions options_of(const Problem& p, int threads) {
  AttentionOptions o;
  o.causal = p.causal;
  o.threads = threads;
  return o;
}
/// Error of `kernel` (float q, k, v -> float out) against the materialising oracle in double, on a 127 x 127 problem.
template <class Kernel>
double error_against_reference(Index d, bool causal, const Kernel& kernel) {
  const Problem p(127, d, causal);
  const AttentionOptions o = options_of(p, 1);
  const Matrix<double> expected = reference::scaled_dot_product_attention(
      p.q.cast<double>().eval(), p.k.cast<double>().eval(), p.v.cast<double>().eval(), o);
  return relative_error(kernel(p, o), expected);
}

std::string error_key(const benchmark::State& state) {
  return std::to_string(state.range(1)) + "/" + std::to_string(state.range(2));
}

void BM_Fused(benchmark::State& state) {
  const Problem p(state.range(0), state.range(1), state.range(2) != 0);
  const int threads = int(state.range(3));
  const AttentionOptions o = options_of(p, threads);
  Matrix<float> out(p.n, p.d);
  const int64_t heap = run_timed(state, [&] { scaled_dot_product_attention(p.q, p.k, p.v, out, o); });
  report(state, p.flops(), threads, heap);
  report_error(state, error_key(state), [&] {
    return error_against_reference(p.d, p.causal, [](const Problem& small, const AttentionOptions& so) {
      return scaled_dot_product_attention(small.q, small.k, small.v, so);
    });
  });
  report_workspace(state, threads * scaled_dot_product_attention_workspace_bytes<float>(p.n, p.n, p.d, p.d, o));
}

void BM_EigenCareful(benchmark::State& state) {
  const Problem p(state.range(0), state.range(1), state.range(2) != 0);
  int64_t heap = 0;
  {
    heap = heap::peak_during([&] { CarefulEigen(p.n, p.d).run(p); });
  }
  CarefulEigen eigen(p.n, p.d);
  for (auto _ : state) {
    eigen.run(p);
    benchmark::ClobberMemory();
  }
  report(state, p.flops(), 1, heap);
  report_workspace(state, Index(sizeof(float)) * (p.n * p.n + p.n * p.d));  // its n x n scores and the output
  report_error(state, error_key(state), [&] {
    return error_against_reference(p.d, p.causal, [](const Problem& small, const AttentionOptions&) {
      CarefulEigen careful(small.n, small.d);
      careful.run(small);
      return careful.out;
    });
  });
}

void BM_Reference(benchmark::State& state) {
  const Problem p(state.range(0), state.range(1), state.range(2) != 0);
  const AttentionOptions o = options_of(p, 1);
  const int64_t heap = heap::peak_during([&] { reference::scaled_dot_product_attention(p.q, p.k, p.v, o); });
  for (auto _ : state) benchmark::DoNotOptimize(reference::scaled_dot_product_attention(p.q, p.k, p.v, o).data());
  report(state, p.flops(), 1, heap);
  report_workspace(state, Index(sizeof(float)) * (p.n * p.n + p.n * p.d));  // the n x n weights and the output
  report_error(state, error_key(state), [&] {
    return error_against_reference(p.d, p.causal, [](const Problem& small, const AttentionOptions& so) {
      return reference::scaled_dot_product_attention(small.q, small.k, small.v, so);
    });
  });
}

/// Decoding: one query against m cached keys and values; bound by reading K and V, so the rate is in bytes/s.
/// With two threads the keys are split into chunks (split-K) whose results are merged by log-sum-exp.
void BM_Decode(benchmark::State& state) {
  const Index m = state.range(0), d = state.range(1);
  const Matrix<float> q = random_matrix<float>(1, d, 1), k = random_matrix<float>(m, d, 2);
  const Matrix<float> v = random_matrix<float>(m, d, 3);
  Matrix<float> out(1, d);
  AttentionOptions o;
  o.threads = int(state.range(2));
  const int64_t heap = run_timed(state, [&] { scaled_dot_product_attention(q, k, v, out, o); });
  report(state, attention_flops(double(m), d, d), o.threads, heap);
  // One query head: the same single call, with split-K's partial outputs counted.
  report_workspace(state, multi_head_attention_workspace_bytes<float>(1, m, 1, 1, d, d, o));
  report_error(state, std::to_string(d), [&] {  // 1 query over 1500 keys: the split-K path
    return fused_error(random_matrix<float>(1, d, 4), random_matrix<float>(1500, d, 5),
                       random_matrix<float>(1500, d, 6), o);
  });
  report_kv_rate(state, 2.0 * double(m * d) * sizeof(float), o.threads);
}

/// A chunk of query rows against a long cache of keys and values (chunked prefill, or cross-attention over a long
/// memory): at m = 65536 the keys and values (16 MiB each) come from memory, while the output is a few rows. Up to 64
/// rows split the keys into chunks that threads share (split-K); 256 rows run whole. FLOPs as for full attention, 4 d
/// per (query, key) pair.
void BM_Prefill(benchmark::State& state) {
  const Index rows = state.range(0), m = state.range(1), d = 64;
  const Matrix<float> q = random_matrix<float>(rows, d, 1), k = random_matrix<float>(m, d, 2);
  const Matrix<float> v = random_matrix<float>(m, d, 3);
  Matrix<float> out(rows, d);
  AttentionOptions o;
  o.threads = int(state.range(2));
  const int64_t heap = run_timed(state, [&] { scaled_dot_product_attention(q, k, v, out, o); });
  report(state, attention_flops(double(rows) * double(m), d, d), o.threads, heap);
  // One query head: the same single call, with split-K's partial outputs counted.
  report_workspace(state, multi_head_attention_workspace_bytes<float>(rows, m, 1, 1, d, d, o));
  report_error(state, std::to_string(d), [&] {  // 37 rows over 9001 keys: split-K's path
    return fused_error(random_matrix<float>(37, d, 4), random_matrix<float>(9001, d, 5),
                       random_matrix<float>(9001, d, 6), o);
  });
}

const std::vector<int64_t> kLengths = {256, 512, 1024, 2048, 4096, 8192, 16384};

BENCHMARK(BM_Fused)
    ->ArgNames({"n", "d", "causal", "threads"})
    ->ArgsProduct({{256, 512, 1024, 2048, 4096}, {64, 128}, {0, 1}, {1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
// A call takes 0.05-0.4 s from n = 8192 on, so `make bench`'s 0.2 s ran one or two of them: a single slow call on a
// shared host decided the cell (n = 16384, d = 64: 78% of peak from one call, 82% over seven). At least a second each.
BENCHMARK(BM_Fused)
    ->ArgNames({"n", "d", "causal", "threads"})
    ->ArgsProduct({{8192, 16384}, {64, 128}, {0, 1}, {1, 2}})
    ->MinTime(1.0)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EigenCareful)
    ->ArgNames({"n", "d", "causal"})
    ->ArgsProduct({kLengths, {64, 128}, {0, 1}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
// The oracle allocates n x m per call; it stops at 4096 to keep `make bench` short.
BENCHMARK(BM_Reference)
    ->ArgNames({"n", "d", "causal"})
    ->ArgsProduct({{256, 1024, 4096}, {64}, {0}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Decode)
    ->ArgNames({"m", "d", "threads"})
    ->ArgsProduct({{4096, 16384, 65536}, {64, 128}, {1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Prefill)
    ->ArgNames({"rows", "m", "threads"})
    ->ArgsProduct({{8, 32, 64, 256}, {65536}, {1, 2}})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace attnkit::bench

ATTNKIT_BENCHMARK_MAIN()
