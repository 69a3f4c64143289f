// attnkit: writing results past the caches. A call whose inputs and output together are larger than the part of the
// last-level cache it can count on has evicted its first output rows before it returns, so writing them with
// non-temporal (streaming) stores loses nothing, and saves the read an ordinary store makes of each line before it
// overwrites it: a quarter of the memory traffic of linear attention, which reads q, k and v once and writes the
// output once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>
#include <thread>

#if defined(__SSE2__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#include "types.hpp"

namespace attnkit::detail {

/// The caches of cpu0 as Linux's sysfs describes them: {level, bytes} of each data or unified cache (none elsewhere).
struct CacheLevels {
  Index bytes[8] = {};  // bytes[level], 0 where sysfs did not say
  Index highest = 0;    // the highest level found, 0 for none

  static const CacheLevels& read() {
    static const CacheLevels levels = [] {
      CacheLevels c;
      for (int index = 0; index < 8; ++index) {
        const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
        std::ifstream level_file(dir + "level"), size_file(dir + "size"), type_file(dir + "type");
        Index level = 0, size = 0;
        std::string unit, type;
        if (!(level_file >> level) || !(size_file >> size) || level < 1 || level > 7) continue;
        if (type_file >> type && type == "Instruction") continue;
        size_file >> unit;
        size *= unit == "K" ? 1024 : unit == "M" ? 1024 * 1024 : 1;
        c.bytes[level] = size, c.highest = std::max(c.highest, level);
      }
      return c;
    }();
    return levels;
  }
};

/// The C library's size of a cache level (2 or 3), 0 where it does not say.
inline Index reported_cache_bytes(int level) {
  long bytes = 0;
#if defined(_SC_LEVEL2_CACHE_SIZE)
  if (level == 2) bytes = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
#if defined(_SC_LEVEL3_CACHE_SIZE)
  if (level == 3) bytes = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
  return bytes > 0 ? Index(bytes) : 0;
}

/// Bytes of the last-level cache one core reaches: sysfs's highest level, else the C library's L3 (else L2) size,
/// else 8 MiB. (sysfs first: glibc reports the L3 of all of an EPYC's core complexes together, 384 MiB where one
/// core reaches 32.)
inline Index last_level_cache_bytes() {
  static const Index bytes = [] {
    const CacheLevels& c = CacheLevels::read();
    if (c.highest > 0) return c.bytes[c.highest];
    if (const Index l3 = reported_cache_bytes(3)) return l3;
    if (const Index l2 = reported_cache_bytes(2)) return l2;
    return Index(8) << 20;
  }();
  return bytes;
}

/// Bytes of one core's L2 cache: sysfs's, else the C library's, else 1 MiB.
inline Index l2_cache_bytes() {
  static const Index bytes = [] {
    if (const Index b = CacheLevels::read().bytes[2]) return b;
    if (const Index b = reported_cache_bytes(2)) return b;
    return Index(1) << 20;
  }();
  return bytes;
}

/// Last-level cache per logical CPU that a call may count on keeping its rows in: 4 MiB, about what a server core
/// gets of its socket's L3 (Zen 4 / Zen 5: 32 MiB per complex of 8 cores; Xeon: 1.9-5 MiB per core).
constexpr Index kCachePerCpu = Index(4) << 20;

/// Bytes of the last-level cache that a call can count on keeping its rows in: last_level_cache_bytes(), but at most
/// kCachePerCpu per logical CPU of this machine. A virtual machine reports its host socket's whole L3 as its own (480
/// MiB on a 2-CPU Granite Rapids guest, 508 MiB on a Zen 5 one) while other guests share it.
inline Index usable_cache_bytes() {
  static const Index bytes = [] {
    const Index cpus = std::max<Index>(1, Index(std::thread::hardware_concurrency()));
    return std::min(last_level_cache_bytes(), cpus * kCachePerCpu);
  }();
  return bytes;
}

/// Whether a call that reads and writes `bytes` in all (inputs and output), `out_bytes` of them its output, exceeds
/// a cache of `cache` bytes: the bytes cannot all stay in it, and the output is large enough to matter (an eighth of
/// it; a few rows, such as a decoding step's partial results that are merged right away, stay in the caches).
inline bool exceeds_cache(Index bytes, Index out_bytes, Index cache) { return bytes > cache && out_bytes > cache / 8; }

/// Whether such a call streams past the caches, exceeding usable_cache_bytes(): its rows come from memory, so it
/// writes its output with streaming stores and the tile loop fetches its next rows ahead. Sized so, against the whole
/// reported L3 of a 2-CPU guest, linear attention (elu+1, d = 64) at n = 16384 / 65536 took 0.95 / 0.90x the time with
/// the stores, 0.96 / 0.94x with a projection that reads the output after it; local(128) at n = 32768 / 65536
/// 0.95-0.96x with the fetches (Granite Rapids).
inline bool streams_past_cache(Index bytes, Index out_bytes) {
  return exceeds_cache(bytes, out_bytes, usable_cache_bytes());
}

/// Bytes an attention call of n queries over m keys (key width d, value width dv, scalars S) reads and writes: q, k, v
/// and its n x dv output.
template <class S>
Index attention_call_bytes(Index n, Index m, Index d, Index dv) {
  return Index(sizeof(S)) * (n + m) * (d + dv);
}

/// streams_past_cache for such a call.
template <class S>
bool streams_past_cache(Index n, Index m, Index d, Index dv) {
  return streams_past_cache(attention_call_bytes<S>(n, m, d, dv), Index(sizeof(S)) * n * dv);
}

/// Streaming stores of one packet to a packet-aligned address, where the CPU has them (x86: SSE2, AVX, AVX-512).
template <class S>
struct StreamingStore {
  static constexpr bool kAvailable = false;
};
#if defined(EIGEN_VECTORIZE_AVX512)
template <>
struct StreamingStore<float> {
  static constexpr bool kAvailable = true;
  static void store(float* p, const Eigen::internal::Packet16f& x) { _mm512_stream_ps(p, x); }
};
template <>
struct StreamingStore<double> {
  static constexpr bool kAvailable = true;
  static void store(double* p, const Eigen::internal::Packet8d& x) { _mm512_stream_pd(p, x); }
};
#elif defined(EIGEN_VECTORIZE_AVX)
template <>
struct StreamingStore<float> {
  static constexpr bool kAvailable = true;
  static void store(float* p, const Eigen::internal::Packet8f& x) { _mm256_stream_ps(p, x); }
};
template <>
struct StreamingStore<double> {
  static constexpr bool kAvailable = true;
  static void store(double* p, const Eigen::internal::Packet4d& x) { _mm256_stream_pd(p, x); }
};
#elif defined(EIGEN_VECTORIZE_SSE2)
template <>
struct StreamingStore<float> {
  static constexpr bool kAvailable = true;
  static void store(float* p, const Eigen::internal::Packet4f& x) { _mm_stream_ps(p, x); }
};
template <>
struct StreamingStore<double> {
  static constexpr bool kAvailable = true;
  static void store(double* p, const Eigen::internal::Packet2d& x) { _mm_stream_pd(p, x); }
};
#endif

/// dst[c] = src[c] * scale for c < count. With `streaming` (and the CPU's streaming stores), the packet-aligned part
/// of dst is written past the caches; a thread that streamed must call stream_fence() before its results are read
/// by another thread.
/// Both paths multiply packet by packet (the same products either way, so the results are identical): without
/// packets here, a compiler at -O2 wrote the plain path one scalar at a time.
template <class S>
void store_scaled(const S* src, S scale, Index count, S* dst, bool streaming) {
  using P = typename Eigen::internal::packet_traits<S>::type;
  constexpr Index kPacket = Eigen::internal::packet_traits<S>::size;
  const P s = Eigen::internal::pset1<P>(scale);
  Index c = 0;
  if constexpr (StreamingStore<S>::kAvailable) {
    if (streaming) {
      constexpr std::uintptr_t kAlign = kPacket * sizeof(S);
      for (; c < count && reinterpret_cast<std::uintptr_t>(dst + c) % kAlign != 0; ++c) dst[c] = src[c] * scale;
      for (; c + kPacket <= count; c += kPacket)
        StreamingStore<S>::store(dst + c, Eigen::internal::pmul(Eigen::internal::ploadu<P>(src + c), s));
    }
  }
  for (; c + kPacket <= count; c += kPacket)
    Eigen::internal::pstoreu(dst + c, Eigen::internal::pmul(Eigen::internal::ploadu<P>(src + c), s));
  for (; c < count; ++c) dst[c] = src[c] * scale;
}

/// Orders this thread's streaming stores before its later stores (and so before the end of a parallel region).
inline void stream_fence() {
#if defined(__SSE2__) || defined(_M_X64)
  _mm_sfence();
#endif
}

}  // namespace attnkit::detail
