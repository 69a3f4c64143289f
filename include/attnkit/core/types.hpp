// attnkit: shared types.
#pragma once

#include <Eigen/Core>

#include <cstddef>
#include <type_traits>

namespace attnkit {

using Index = Eigen::Index;

/// \brief A sequence: one row per position, row-major, as every attnkit kernel expects.
template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// \brief A column vector, used for per-row statistics such as the log-sum-exp.
template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// \brief A boolean mask, `true` = the (query, key) pair is allowed.
using BoolMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

namespace detail {

template <class S>
inline constexpr bool is_supported_scalar_v = std::is_same_v<S, float> || std::is_same_v<S, double>;

template <class S>
void static_check_scalar() {
  static_assert(is_supported_scalar_v<S>, "attnkit supports float and double");
}

/// What one heap allocation may cost beyond its data: Eigen's alignment padding (up to 64 bytes when malloc aligns
/// less than a packet) and the allocator's rounding. The *_workspace_bytes functions count it once per buffer.
inline constexpr Index kAllocationOverhead = 128;

/// Heap bytes of one buffer of `count` objects of type T (none for an empty buffer).
template <class T>
constexpr Index heap_bytes(Index count) {
  return count > 0 ? count * Index(sizeof(T)) + kAllocationOverhead : 0;
}

}  // namespace detail
}  // namespace attnkit
