// The FMA-peak probe of bench_util.hpp, in its own translation unit so its loop is compiled exactly once.
#include <chrono>

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

}  // namespace

double fma_peak_flops_per_core() {
  static const double peak = measure();
  return peak;
}

}  // namespace attnkit::bench
