// Shared by the examples that time kernels: the best wall-clock time of a few calls, in milliseconds.
#pragma once

#include <algorithm>
#include <chrono>

template <class F>
double best_ms(const F& f, int calls) {
  double best = 1e300;
  for (int c = 0; c < calls; ++c) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}
