// Heap accounting for the benchmarks and the large-input test: interposes glibc's malloc family so every allocation
// (Eigen's aligned_malloc, operator new, std containers) is counted. Linked into those binaries, never into the
// library, and never into sanitizer builds (which replace malloc themselves).
#include <malloc.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "counting_malloc.hpp"

extern "C" {
void* __libc_malloc(size_t);
void* __libc_calloc(size_t, size_t);
void* __libc_realloc(void*, size_t);
void* __libc_memalign(size_t, size_t);
void __libc_free(void*);
}

namespace {
std::atomic<int64_t> g_current{0}, g_peak{0}, g_allocs{0}, g_total{0};

void on_alloc(void* p) {
  if (!p) return;
  const auto size = static_cast<int64_t>(malloc_usable_size(p));
  const int64_t now = g_current.fetch_add(size, std::memory_order_relaxed) + size;
  g_allocs.fetch_add(1, std::memory_order_relaxed);
  g_total.fetch_add(size, std::memory_order_relaxed);
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

void on_free(void* p) {
  if (p) g_current.fetch_sub(static_cast<int64_t>(malloc_usable_size(p)), std::memory_order_relaxed);
}
}  // namespace

extern "C" {
void* malloc(size_t size) {
  void* p = __libc_malloc(size);
  on_alloc(p);
  return p;
}
void* calloc(size_t count, size_t size) {
  void* p = __libc_calloc(count, size);
  on_alloc(p);
  return p;
}
void* realloc(void* old, size_t size) {
  on_free(old);
  void* p = __libc_realloc(old, size);
  if (p) {
    on_alloc(p);
  } else if (old && size != 0) {
    on_alloc(old);  // the old block is still live
  }
  return p;
}
void free(void* p) {
  on_free(p);
  __libc_free(p);
}
void* memalign(size_t alignment, size_t size) {
  void* p = __libc_memalign(alignment, size);
  on_alloc(p);
  return p;
}
void* aligned_alloc(size_t alignment, size_t size) { return memalign(alignment, size); }
int posix_memalign(void** out, size_t alignment, size_t size) {
  void* p = memalign(alignment, size);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}
}

namespace attnkit::heap {
Stats stats() { return {g_current.load(), g_peak.load(), g_allocs.load(), g_total.load()}; }
void reset_peak() { g_peak.store(g_current.load()); }
}  // namespace attnkit::heap
