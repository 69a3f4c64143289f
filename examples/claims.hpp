// Shared by the examples that reproduce SPEC section 6's numerical claims: print each measurement next to the value
// SPEC (or a formula) predicts, check it against a stated range, and turn any miss into a non-zero exit status.
#pragma once

#include <attnkit/core/types.hpp>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>

class Claims {
 public:
  /// Prints a measurement next to its predicted value and checks it lies in [lo, hi].
  void check(const char* what, double measured, double predicted, double lo, double hi) {
    const bool ok = measured >= lo && measured <= hi;
    std::printf("  %-46s %10.4g   predicted %10.4g   range [%.4g, %.4g]  %s\n", what, measured, predicted, lo, hi,
                ok ? "ok" : "OUT");
    failures_ += ok ? 0 : 1;
  }

  /// As check, with the prediction given as text (SPEC's wording, for example "about 46").
  void check(const char* what, double measured, const char* stated, double lo, double hi) {
    const bool ok = measured >= lo && measured <= hi;
    std::printf("  %-46s %10.4g   expected %-8s range [%.4g, %.4g]  %s\n", what, measured, stated, lo, hi,
                ok ? "ok" : "OUT");
    failures_ += ok ? 0 : 1;
  }

  /// Checks a measurement within a relative tolerance of its prediction.
  void check_near(const char* what, double measured, double predicted, double relative) {
    const double slack = relative * (predicted < 0 ? -predicted : predicted);
    check(what, measured, predicted, predicted - slack, predicted + slack);
  }

  /// Prints a measurement that has no stated range.
  static void show(const char* what, double measured) { std::printf("  %-46s %10.4g\n", what, measured); }

  /// The process exit status: 0 when every check passed.
  int exit_code() const {
    if (failures_ > 0) std::printf("\n%d measurement(s) out of range\n", failures_);
    return failures_ == 0 ? 0 : 1;
  }

 private:
  int failures_ = 0;
};

/// The program's optional first argument as a number >= minimum (fallback when absent); prints the usage line and
/// exits with status 2 otherwise.
inline long argument_or(int argc, char** argv, long fallback, long minimum, const char* usage) {
  const long value = argc > 1 ? std::atol(argv[1]) : fallback;
  if (value < minimum) {
    std::fprintf(stderr, "usage: %s\n", usage);
    std::exit(2);
  }
  return value;
}

/// Matrices of iid N(0, sigma^2) entries from one seeded stream.
class Gaussian {
 public:
  explicit Gaussian(std::uint64_t seed) : gen_(seed) {}

  template <class S = double>
  attnkit::Matrix<S> operator()(attnkit::Index rows, attnkit::Index cols, double sigma = 1) {
    attnkit::Matrix<S> m(rows, cols);
    for (attnkit::Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(sigma * normal_(gen_));
    return m;
  }

 private:
  std::mt19937_64 gen_;
  std::normal_distribution<double> normal_;
};
