// attnkit: the one parallel loop. OpenMP when the consumer compiles with it, else std::threads kept between calls.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "types.hpp"

#if !defined(_OPENMP) && (defined(__unix__) || defined(__APPLE__))
#include <pthread.h>
#define ATTNKIT_HAS_PTHREAD_ATFORK 1
#endif

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

/// The threads parallel_for borrows when OpenMP is not used, started once and kept (as OpenMP keeps its own). Starting
/// threads for every parallel loop, whose tile workspaces then started empty, made two-thread calls much slower than
/// with OpenMP (Zen 5, best calls, a noisy host): SDPA n = 256, d = 64 184 us against 56-74 with the pool (OpenMP
/// 56), n = 1024 1560 against 733-753 (733-744), a decoding step of a 1024 / 16 / 4 layer over 16384 cached tokens
/// 1265-1305 against 932-1136 (864-1111). One call uses the pool at a time; a call that finds it in use (another
/// thread's call, or a loop nested in a task) or wants more threads than it holds starts its own, as before. Every
/// helper a call asks for runs its work, as every thread of an OpenMP team does, even when the others have taken every
/// task: each then has its own workspace from the first call on, so a warm call allocates nothing. A forked child has
/// none of the pool's threads; its calls start their own. Never destroyed: its threads wait for work until the process
/// ends.
class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool* const pool =
        new ThreadPool(std::max(1, static_cast<int>(std::thread::hardware_concurrency())) - 1);
    return *pool;
  }

  /// Runs work(context) on the calling thread and on `helpers` of the pool's threads at once, and returns true when
  /// every run has returned; returns false, having run nothing, when the pool is in use or has fewer threads. (A
  /// function and its context rather than a std::function, which would allocate for parallel_for's lambda.)
  bool run(int helpers, void (*work)(const void*), const void* context) {
    bool idle = false;
    if (helpers > size_ || forked_ || !busy_.compare_exchange_strong(idle, true, std::memory_order_acquire))
      return false;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      work_ = work, context_ = context, open_ = helpers;
    }
    wake_.notify_all();
    work(context);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return open_ == 0 && running_ == 0; });
    work_ = nullptr, context_ = nullptr;
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  explicit ThreadPool(int size) : size_(size) {
    for (int t = 0; t < size; ++t) std::thread([this] { serve(); }).detach();
#ifdef ATTNKIT_HAS_PTHREAD_ATFORK
    pthread_atfork(nullptr, nullptr, [] { instance().forked_ = true; });
#endif
  }

  void serve() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return open_ > 0; });
      --open_, ++running_;
      void (*const work)(const void*) = work_;
      const void* const context = context_;
      lock.unlock();
      work(context);
      lock.lock();
      if (--running_ == 0 && open_ == 0) done_.notify_all();
    }
  }

  const int size_;
  bool forked_ = false;            // set in a forked child, whose pool has no threads
  std::atomic<bool> busy_{false};  // set by the one call using the pool (a flag: the call may nest on its thread)
  std::mutex mutex_;               // guards work_, context_, open_ and running_
  std::condition_variable wake_, done_;
  void (*work_)(const void*) = nullptr;
  const void* context_ = nullptr;
  int open_ = 0;     // helpers the current call still waits for to start
  int running_ = 0;  // helpers running its work
};

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
  const auto work = [&] {
    auto state = make_state();
    for (Index t = next++; t < count; t = next++) body(t, state);
  };
  using Work = decltype(work);
  if (ThreadPool::instance().run(
          workers - 1, [](const void* w) { (*static_cast<const Work*>(w))(); }, &work))
    return;
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

/// Every thread's cached scratch (CachedScratch: the fused loop's tile workspaces, linear attention's chunk scratch),
/// so that release_cached_workspaces() can free the ones not in use from any thread.
class WorkspaceRegistry {
 public:
  struct Slot {
    std::atomic<bool> busy{false};
    virtual void free_buffers() = 0;
    /// Frees the buffers unless a call is using them.
    void release_if_idle() {
      bool idle = false;
      if (!busy.compare_exchange_strong(idle, true, std::memory_order_acquire)) return;
      free_buffers();
      busy.store(false, std::memory_order_release);
    }

   protected:
    ~Slot() = default;
  };

  /// Never destroyed: a thread that exits after static destruction began (a detached one) still unregisters safely.
  static WorkspaceRegistry& instance() {
    static WorkspaceRegistry* const registry = new WorkspaceRegistry();
    return *registry;
  }
  void add(Slot* slot) {
    const std::lock_guard<std::mutex> lock(mutex_);
    slots_.push_back(slot);
  }
  void remove(Slot* slot) {
    const std::lock_guard<std::mutex> lock(mutex_);
    slots_.erase(std::remove(slots_.begin(), slots_.end(), slot), slots_.end());
  }
  void release_idle() {
    const std::lock_guard<std::mutex> lock(mutex_);
    for (Slot* slot : slots_) slot->release_if_idle();
  }

 private:
  std::mutex mutex_;
  std::vector<Slot*> slots_;
};

/// The calling thread's scratch of type W (default-constructible, its buffers grown by each user as needed), kept
/// between calls so that a call does not pay for fresh pages. A nested call on the same thread (from a user's mask,
/// score callable or feature map) finds the cache taken and gets a scratch of its own.
template <class W>
class CachedScratch {
 public:
  CachedScratch() {
    Slot& slot = this_thread_slot();
    if (!slot.busy.exchange(true, std::memory_order_acquire))
      slot_ = &slot;
    else
      own_ = std::make_unique<W>();
  }
  CachedScratch(CachedScratch&& other) noexcept : slot_(other.slot_), own_(std::move(other.own_)) {
    other.slot_ = nullptr;
  }
  CachedScratch(const CachedScratch&) = delete;
  CachedScratch& operator=(const CachedScratch&) = delete;
  CachedScratch& operator=(CachedScratch&&) = delete;
  ~CachedScratch() {
    if (slot_) slot_->busy.store(false, std::memory_order_release);
  }

  W& get() { return slot_ ? slot_->workspace : *own_; }

 private:
  struct Slot final : WorkspaceRegistry::Slot {
    W workspace;
    Slot() { WorkspaceRegistry::instance().add(this); }
    ~Slot() { WorkspaceRegistry::instance().remove(this); }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    void free_buffers() override { workspace = W(); }
  };
  static Slot& this_thread_slot() {
    thread_local Slot slot;
    return slot;
  }
  Slot* slot_ = nullptr;
  std::unique_ptr<W> own_;
};

}  // namespace attnkit::detail
