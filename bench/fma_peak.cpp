// The machine probes of bench_util.hpp (FMA peak, streaming read), in their own translation unit so their loops are
// compiled exactly once.
#include <chrono>
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

}  // namespace

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
