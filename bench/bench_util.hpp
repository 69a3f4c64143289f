// Shared benchmark machinery: heap accounting (a MemoryManager over the counting malloc), the machine's FMA peak
// measured in the same binary, FLOP formulas, and the counters every benchmark reports.
#pragma once

#include <benchmark/benchmark.h>

#include <attnkit/attnkit.hpp>

#include "../support/counting_malloc.hpp"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <map>
#include <new>
#include <random>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace attnkit::bench {

/// Google Benchmark's MemoryManager over the counting malloc (its figures appear in the JSON output).
class HeapManager : public benchmark::MemoryManager {
 public:
  void Start() override {
    heap::reset_peak();
    start_ = heap::stats();
  }
  void Stop(Result* result) override {
    const heap::Stats end = heap::stats();
    result->num_allocs = end.allocs - start_.allocs;
    result->max_bytes_used = end.peak - start_.current;
    result->total_allocated_bytes = end.total - start_.total;
    result->net_heap_growth = end.current - start_.current;
  }

 private:
  heap::Stats start_{};
};

/// fp32 FMA throughput of one core in FLOP/s: 12 independent chains of packet FMAs, enough to cover the latency of
/// two FMA pipes. Measured once per process, before the benchmarks, so percentages come from the same run.
double fma_peak_flops_per_core();

/// Bytes per second a plain streaming read (a vectorised sum) gets over a buffer of `bytes` on `threads` threads,
/// each summing its share (sweeping it again up to 256 MiB in all, so that starting threads does not count): best of
/// five passes, the buffer staying in whatever cache level holds it, as a decoding
/// step's K and V do when it runs again and again. Measured once per (bytes, threads), outside any timing. Decoding
/// benchmarks report their K/V rate against it (pct_read_bw): 100% is the most the memory system gives a plain read.
double read_bytes_per_second(Index bytes, int threads);

/// Reports `rate` (GB/s of `bytes` read per call) and `pct` (percent of the streaming read of as many bytes).
inline void report_read_rate(benchmark::State& state, double bytes, int threads, const char* rate, const char* pct) {
  state.counters[rate] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters[pct] = benchmark::Counter(100.0 * bytes / read_bytes_per_second(Index(bytes), threads),
                                           benchmark::Counter::kIsIterationInvariantRate);
}

/// Reports KV_GBps (`bytes` of K and V per call) and pct_read_bw against the streaming read of as many bytes.
inline void report_kv_rate(benchmark::State& state, double bytes, int threads) {
  report_read_rate(state, bytes, threads, "KV_GBps", "pct_read_bw");
}

/// The memory system's part in a growth figure (time at 65536 rows over time at 4096: 16 for linear cost).
/// BM_StreamFloor times passes over rows of kFloorWidth floats that read a row of each of three inputs and write an
/// output row, as attention reads q, k and v and writes its output once, with `work` micro-kernel steps per row in
/// between over a panel of `panel` KiB that stays in the cache (as a tiled kernel's packed operands and scores do). At
/// kFloorSmall rows its 4 MiB stay in the caches from one call to the next; at kFloorLarge (64 MiB) every row comes
/// from memory and goes back. The rows are read in order, where the hardware prefetcher does best, so floor_growth (the
/// ratio of the two sizes' fastest passes) at a given pace (ns_per_row, at the small size) is what the memory adds to a
/// kernel that moves those bytes at that pace with such a working set. It falls as the pace slows, and moves with the
/// working set and the host: on the Zen 5 VM of 2026-12-05, 16.8-19 at about 150 ns per row and 16.3-17.7 at 450 ns,
/// from run to run. bench/plot.py reads it at each sparse and linear kernel's own pace.
constexpr Index kFloorWidth = 64, kFloorSmall = 4096, kFloorLarge = 65536;
void BM_StreamFloor(benchmark::State& state);  // args: work, panel (KiB)

/// Registers BM_StreamFloor in a benchmark binary (bench_sparse and bench_linear, once each, at static initialisation)
/// and returns true. Work levels (micro-kernel steps per row) give paces from about 30 ns to 1.7 us per row on that
/// VM, beyond the slowest kernel's (Performer, about 1.3 us per row at n = 4096); at least 2 s each.
inline bool register_stream_floor() {
  benchmark::RegisterBenchmark("BM_StreamFloor", BM_StreamFloor)
      ->ArgNames({"work", "panel"})
      ->ArgsProduct({{16, 32, 64, 128, 256, 512, 1024}, {16, 256}})
      ->MinTime(2.0)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond);
  return true;
}

/// FLOPs of exact attention over `pairs` allowed (query, key) pairs: 2 d for q.k plus 2 d_v for p v.
inline double attention_flops(double pairs, Index d, Index dv) { return pairs * 2.0 * double(d + dv); }

/// Adds the standard counters: GFLOP/s by the family's FLOP count, percent of the FMA peak of `threads` cores (of the
/// mean call, and, after run_timed, pct_peak_best of its fastest call: the peak is the best of its trials, and on a
/// shared host other tenants only slow a call down, so the two bracket the kernel's own rate), and the peak heap of
/// one call.
inline void report(benchmark::State& state, double flops, int threads, int64_t heap_bytes) {
  state.counters["GFLOPs"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pct_peak"] = benchmark::Counter(100.0 * flops / (fma_peak_flops_per_core() * threads),
                                                  benchmark::Counter::kIsIterationInvariantRate);
  const auto best = state.counters.find("best_ms");
  if (best != state.counters.end() && best->second.value > 0)
    state.counters["pct_peak_best"] = 100.0 * flops / (best->second.value * 1e-3 * fma_peak_flops_per_core() * threads);
  state.counters["heap_MiB"] = double(heap_bytes) / (1024.0 * 1024.0);
}

/// The library's documented workspace of the call (its *_workspace_bytes function), next to the measured heap.
inline void report_workspace(benchmark::State& state, Index bytes) {
  state.counters["workspace_MiB"] = double(bytes) / (1024.0 * 1024.0);
}

/// Measures the peak heap of one warm `call` (after a first one, so that one-time set-up such as the thread pool's
/// is not counted), then times it in the benchmark loop; returns the heap bytes. Also reports `best_ms`, the fastest
/// call of the loop: on a shared host other tenants only ever slow a call down, so growth targets (time at the
/// largest n over time at a smaller one) are read from the best calls as well as from the means.
template <class F>
int64_t run_timed(benchmark::State& state, const F& call) {
  call();
  release_cached_workspaces();  // the heap a call allocates (later calls reuse their thread's workspace)
  const int64_t heap = heap::peak_during(call);
  double best = std::numeric_limits<double>::infinity();
  for (auto _ : state) {
    const auto start = std::chrono::steady_clock::now();
    call();
    benchmark::ClobberMemory();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  state.counters["best_ms"] = best;
  return heap;
}

/// The largest |actual - expected| over the largest |expected|: a float kernel's error against double precision.
inline double relative_error(const Matrix<float>& actual, const Matrix<double>& expected) {
  if (expected.size() == 0) return 0;
  const double scale = std::max(expected.cwiseAbs().maxCoeff(), 1e-300);
  return (actual.cast<double>() - expected).cwiseAbs().maxCoeff() / scale;
}

/// The fused kernel's error on (q, k, v) against the materialising oracle in double.
inline double fused_error(const Matrix<float>& q, const Matrix<float>& k, const Matrix<float>& v,
                          const AttentionOptions& o = {}) {
  return relative_error(scaled_dot_product_attention(q, k, v, o),
                        reference::scaled_dot_product_attention(q.cast<double>().eval(), k.cast<double>().eval(),
                                                                v.cast<double>().eval(), o));
}

/// Reports `max_err`: the benchmarked kernel's relative error against double precision on a small problem of the same
/// kind, so that a fast but wrong kernel shows in the table. check() computes it once per distinct key.
template <class F>
void report_error(benchmark::State& state, const std::string& key, const F& check) {
  static std::map<std::string, double> errors;
  auto it = errors.find(key);
  if (it == errors.end()) it = errors.emplace(key, check()).first;
  state.counters["max_err"] = it->second;
}

/// The error of a layer: L<float> against L<double> built from the same configuration and seed (the double weights
/// are the float ones before rounding), on the same n x width input.
template <template <class> class L, class Config, class Options>
double layer_error(const Config& config, Index n, Index width, const Options& options) {
  const L<float> f(config, 1);
  const L<double> d(config, 1);
  std::mt19937 gen(11);
  std::normal_distribution<float> dist(0.f, 1.f);
  Matrix<float> x(n, width);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = dist(gen);
  return relative_error(f.forward(x, options), d.forward(Matrix<double>(x.cast<double>()), options));
}

template <class S>
Matrix<S> random_matrix(Index rows, Index cols, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  Matrix<S> x(rows, cols);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<S>(dist(gen));
  return x;
}

/// A rows x cols float matrix in memory of its own (mmap, not the counted heap), 2 MiB-aligned plus `offset` bytes, in
/// 4 KiB pages or, with `huge`, marked for transparent huge pages (madvise(MADV_HUGEPAGE), what the THP setting
/// "madvise" of this machine requires). Both kinds are placed alike, so a pair of benchmarks differs in its pages
/// alone. What the caller's pages cost a kernel past the caches: README, "Large inputs". Elsewhere than Linux, or where
/// the kernel declines, the pages stay 4 KiB.
class PagedRows {
 public:
  PagedRows(Index rows, Index cols, bool huge, Index offset, unsigned seed) : rows_(rows), cols_(cols) {
    constexpr size_t kHuge = size_t(2) << 20;
    bytes_ = (size_t(rows * cols) * sizeof(float) + size_t(offset) + 2 * kHuge - 1) / kHuge * kHuge + kHuge;
#if defined(__linux__)
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base_ = static_cast<char*>(p);
    char* aligned = base_ + (kHuge - reinterpret_cast<std::uintptr_t>(base_) % kHuge) % kHuge;
    madvise(aligned, bytes_ - size_t(aligned - base_), huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
#else
    (void)huge;
    base_ = static_cast<char*>(::operator new(bytes_));
    char* aligned = base_ + (kHuge - reinterpret_cast<std::uintptr_t>(base_) % kHuge) % kHuge;
#endif
    data_ = reinterpret_cast<float*>(aligned + offset);
    map() = random_matrix<float>(rows, cols, seed);  // first touch: the pages are allocated here
  }
  PagedRows(const PagedRows&) = delete;
  PagedRows& operator=(const PagedRows&) = delete;
  ~PagedRows() {
#if defined(__linux__)
    munmap(base_, bytes_);
#else
    ::operator delete(base_);
#endif
  }
  Eigen::Map<Matrix<float>> map() { return {data_, rows_, cols_}; }

 private:
  Index rows_, cols_;
  size_t bytes_ = 0;
  char* base_ = nullptr;
  float* data_ = nullptr;
};

/// Four such inputs (q, k, v and the output) at offsets 17 x 64 bytes apart: rows i of different matrices then do not
/// share their address's low 12 bits, which 2 MiB alignment alone would give them.
struct PagedProblem {
  PagedProblem(Index n, Index d, bool huge)
      : q(n, d, huge, 0, 1), k(n, d, huge, 1088, 2), v(n, d, huge, 2176, 3), out(n, d, huge, 3264, 4) {}
  PagedRows q, k, v, out;
};

}  // namespace attnkit::bench

/// main() of every benchmark binary: single-threaded Eigen for baselines, heap accounting, the FMA peak in the
/// JSON context, then the benchmarks.
#define ATTNKIT_BENCHMARK_MAIN()                                                                   \
  int main(int argc, char** argv) {                                                                \
    Eigen::setNbThreads(1);                                                                        \
    benchmark::Initialize(&argc, argv);                                                            \
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;                              \
    attnkit::bench::HeapManager heap;                                                              \
    benchmark::RegisterMemoryManager(&heap);                                                       \
    benchmark::AddCustomContext("fma_peak_gflops_per_core",                                        \
                                std::to_string(attnkit::bench::fma_peak_flops_per_core() * 1e-9)); \
    benchmark::RunSpecifiedBenchmarks();                                                           \
    benchmark::Shutdown();                                                                         \
    return 0;                                                                                      \
  }
