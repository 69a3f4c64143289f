// attnkit: the one parallel loop. OpenMP when the consumer compiles with it, std::thread otherwise.
#pragma once

#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "types.hpp"

namespace attnkit::detail {

/// Threads to use for `requested` (0 = all available).
inline int resolve_threads(int requested) {
  if (requested > 0) return requested;
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
#endif
}

/// Runs body(task, state) for task in [0, count) on up to `threads` threads. Each worker makes its own state with
/// make_state() once (its workspace). A task's result never depends on which worker runs it or on the thread count,
/// so outputs are bit-for-bit identical for any `threads`. Neither callable may throw.
template <class MakeState, class Body>
void parallel_for(Index count, int threads, const MakeState& make_state, const Body& body) {
  const int workers = static_cast<int>(std::min<Index>(resolve_threads(threads), count));
  if (workers <= 1) {
    if (count <= 0) return;
    auto state = make_state();
    for (Index t = 0; t < count; ++t) body(t, state);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(workers)
  {
    auto state = make_state();
#pragma omp for schedule(dynamic, 1)
    for (Index t = 0; t < count; ++t) body(t, state);
  }
#else
  std::atomic<Index> next{0};
  auto work = [&] {
    auto state = make_state();
    for (Index t = next++; t < count; t = next++) body(t, state);
  };
  std::vector<std::thread> pool;
  pool.reserve(workers - 1);
  for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
#endif
}

/// Runs body(item, inner_threads) for every item: in parallel across items, one thread each, when there are at least
/// as many items as threads; otherwise one item after another, each with every thread. Items whose results do not
/// depend on inner_threads (every attnkit kernel) give the same output either way.
/// With make_state, body(item, inner_threads, state) also gets per-worker scratch made by make_state().
template <class MakeState, class Body>
void for_each_item(Index count, int threads, const MakeState& make_state, const Body& body) {
  threads = resolve_threads(threads);
  if (count >= threads && threads > 1) {
    parallel_for(count, threads, make_state, [&](Index i, auto& state) { body(i, 1, state); });
  } else if (count > 0) {
    auto state = make_state();
    for (Index i = 0; i < count; ++i) body(i, threads, state);
  }
}

template <class Body>
void for_each_item(Index count, int threads, const Body& body) {
  for_each_item(
      count, threads, [] { return 0; }, [&](Index i, int inner, int&) { body(i, inner); });
}

}  // namespace attnkit::detail
