// attnkit: the one exception type, and the checks that raise it.
#pragma once

#include <cmath>
#include <sstream>
#include <stdexcept>
#include <string>

#include "types.hpp"

namespace attnkit {

/// \brief Thrown for every bad argument. The message names the function, the argument and the shapes involved.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

inline std::string shape_str(Index rows, Index cols) { return std::to_string(rows) + "x" + std::to_string(cols); }

template <class... Parts>
[[noreturn]] void fail(const char* where, const Parts&... parts) {
  std::ostringstream os;
  os << "attnkit::" << where << ": ";
  (os << ... << parts);
  throw Error(os.str());
}

/// Throws unless `value` is finite and >= 0; `name` is the option's name.
inline void check_non_negative_finite(const char* where, const char* name, double value) {
  if (!std::isfinite(value) || value < 0) fail(where, name, " must be finite and >= 0, got ", value);
}

}  // namespace detail
}  // namespace attnkit
