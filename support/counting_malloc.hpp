// Heap accounting (support/counting_malloc.cpp interposes malloc): the benchmarks' memory figures and the
// large-input test's bound check.
#pragma once

#include <cstdint>

namespace attnkit::heap {

struct Stats {
  int64_t current, peak, allocs, total;  ///< bytes live, their high-water mark, allocations and bytes ever allocated
};
Stats stats();
/// Restarts the high-water mark from the bytes live now.
void reset_peak();

/// Peak heap bytes above the starting level while `call` runs once.
template <class F>
int64_t peak_during(const F& call) {
  reset_peak();
  const int64_t before = stats().current;
  call();
  return stats().peak - before;
}

}  // namespace attnkit::heap
