// The machine probes of bench_util.hpp (FMA peak, streaming read, the memory floor under growth figures), in their
// own translation unit so their loops are compiled exactly once.
#include <chrono>
#include <limits>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "bench_util.hpp"

namespace attnkit::bench {
namespace {

template <int kChains>
__attribute__((noinline)) float fma_chains(long iterations) {
  using namespace Eigen::internal;
  using Packet = packet_traits<float>::type;
  Packet acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = pset1<Packet>(1e-3f * float(i));
  const Packet a = pset1<Packet>(0.999999f), b = pset1<Packet>(1e-7f);
  for (long it = 0; it < iterations; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kChains; ++i) acc[i] = pmadd(acc[i], a, b);
  }
  Packet sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = padd(sum, acc[i]);
  return predux(sum);
}

double measure() {
  constexpr int kChains = 12, kLanes = Eigen::internal::packet_traits<float>::size;
  const long iterations = 20'000'000;
  double best = 0;
  for (int trial = 0; trial < 3; ++trial) {
    const auto t0 = std::chrono::steady_clock::now();
    benchmark::DoNotOptimize(fma_chains<kChains>(iterations));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * kLanes * kChains * double(iterations) / seconds);
  }
  return best;
}

__attribute__((noinline)) float stream_sum(const float* x, Index count) {
  using namespace Eigen::internal;
  using Packet = packet_traits<float>::type;
  constexpr Index P = packet_traits<float>::size;
  Packet a0 = pset1<Packet>(0.f), a1 = a0, a2 = a0, a3 = a0;
  for (Index i = 0; i + 4 * P <= count; i += 4 * P) {
    a0 = padd(a0, ploadu<Packet>(x + i)), a1 = padd(a1, ploadu<Packet>(x + i + P));
    a2 = padd(a2, ploadu<Packet>(x + i + 2 * P)), a3 = padd(a3, ploadu<Packet>(x + i + 3 * P));
  }
  return predux(padd(padd(a0, a1), padd(a2, a3)));
}

double measure_read(Index bytes, int threads) {
  const Index count = std::max<Index>(bytes / Index(sizeof(float)), 64 * threads);
  std::vector<float> data(size_t(count), 1.f);
  const Index share = count / threads;
  // Each thread sweeps its share `sweeps` times, so that starting the threads (tens of us) stays out of the rate.
  const Index sweeps = std::max<Index>(1, (Index(256) << 20) / (count * Index(sizeof(float))));
  const auto sweep = [&](Index t) {
    float sum = 0;
    for (Index s = 0; s < sweeps; ++s) {
      sum += stream_sum(data.data() + t * share, share);
      benchmark::ClobberMemory();  // each sweep reads again: the compiler may not reuse a call of a pure function
    }
    return sum;
  };
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    std::vector<float> sums(static_cast<size_t>(threads), 0.f);
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back([&, t] { sums[size_t(t)] = sweep(t); });
    sums[0] = sweep(0);
    for (auto& th : pool) th.join();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    benchmark::DoNotOptimize(sums.data());
    best = std::max(best, double(sweeps * share * threads) * sizeof(float) / seconds);
  }
  return best;
}

/// One pass of BM_StreamFloor: per row, the sum of the three input rows folded into eight accumulator packets, then
/// `work` steps shaped like a micro-kernel's (four packets of the panel, two broadcasts from it, eight FMAs), walking
/// the panel from where the last row left it, and the accumulators' halves summed into the output row.
__attribute__((noinline)) void stream_floor_pass(const float* a, const float* b, const float* c, float* out, Index rows,
                                                 int work, const float* panel, Index panel_size) {
  using namespace Eigen::internal;
  using Packet = packet_traits<float>::type;
  constexpr Index P = packet_traits<float>::size, kStep = 4 * P;
  Index at = 0;
  for (Index r = 0; r < rows; ++r) {
    const Index base = r * kFloorWidth;
    Packet acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = pset1<Packet>(0.f);
    for (Index j = 0; j < kFloorWidth; j += P) {
      Packet& x = acc[(j / P) % 8];
      x = padd(x, padd(padd(ploadu<Packet>(a + base + j), ploadu<Packet>(b + base + j)), ploadu<Packet>(c + base + j)));
    }
    for (int w = 0; w < work; ++w) {
      const float* p = panel + at;
      at = at + 2 * kStep <= panel_size ? at + kStep : 0;
      const Packet b0 = ploadu<Packet>(p), b1 = ploadu<Packet>(p + P), b2 = ploadu<Packet>(p + 2 * P),
                   b3 = ploadu<Packet>(p + 3 * P), s0 = pset1<Packet>(p[w % kStep]),
                   s1 = pset1<Packet>(p[(w + 1) % kStep]);
      acc[0] = pmadd(s0, b0, acc[0]), acc[1] = pmadd(s0, b1, acc[1]), acc[2] = pmadd(s0, b2, acc[2]);
      acc[3] = pmadd(s0, b3, acc[3]), acc[4] = pmadd(s1, b0, acc[4]), acc[5] = pmadd(s1, b1, acc[5]);
      acc[6] = pmadd(s1, b2, acc[6]), acc[7] = pmadd(s1, b3, acc[7]);
    }
    for (Index j = 0; j < kFloorWidth; j += P) {
      const int i = int((j / P) % 4);
      pstoreu(out + base + j, padd(acc[i], acc[i + 4]));
    }
  }
}

}  // namespace

void BM_StreamFloor(benchmark::State& state) {
  const int work = int(state.range(0));
  const Index panel_size = state.range(1) * 1024 / Index(sizeof(float));
  const size_t size = size_t(kFloorLarge * kFloorWidth);
  // Small values: the accumulators stay far from overflow whatever the work (1e-4 per step at most).
  std::vector<float> a(size, 0.5f), b(size, 0.25f), c(size, 0.125f), out(size), panel(size_t(panel_size), 1e-3f);
  // The two sizes alternate, so that both see the same minutes of a shared host; the small pass runs twice, so that
  // its rows are in the caches as they are for a kernel called again and again on the same inputs.
  const auto pass = [&](Index rows) {
    const auto start = std::chrono::steady_clock::now();
    stream_floor_pass(a.data(), b.data(), c.data(), out.data(), rows, work, panel.data(), panel_size);
    benchmark::ClobberMemory();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  double small = std::numeric_limits<double>::infinity(), large = small;
  for (auto _ : state) {
    pass(kFloorSmall);
    small = std::min(small, pass(kFloorSmall));
    large = std::min(large, pass(kFloorLarge));
  }
  state.counters["floor_growth"] = large / small;                    // best calls, as the growth targets are read
  state.counters["ns_per_row"] = small * 1e9 / double(kFloorSmall);  // the pace at the small size
}

double read_bytes_per_second(Index bytes, int threads) {
  static std::mutex mutex;
  static std::map<std::pair<Index, int>, double> measured;
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = measured.find({bytes, threads});
  if (it == measured.end()) it = measured.emplace(std::make_pair(bytes, threads), measure_read(bytes, threads)).first;
  return it->second;
}

double fma_peak_flops_per_core() {
  static const double peak = measure();
  return peak;
}

}  // namespace attnkit::bench
