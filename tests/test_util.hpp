// Test helpers: an independent double-precision loop oracle written straight from SPEC section 1 (it shares no
// code with the library), seeded inputs, and comparisons that print shape, index, expected and actual on failure.
#pragma once

#include <gtest/gtest.h>

#include <attnkit/core/error.hpp>
#include <attnkit/core/options.hpp>
#include <attnkit/core/types.hpp>

#include <cmath>
#include <functional>
#include <initializer_list>
#include <limits>
#include <random>
#include <sstream>
#include <string>

namespace attnkit::testing {

using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Names typed tests by scalar: SdpaTest/float, SdpaTest/double.
struct ScalarName {
  template <class S>
  static std::string GetName(int) {
    return std::is_same_v<S, float> ? "float" : "double";
  }
};

template <class S>
Matrix<S> random_matrix(Index rows, Index cols, unsigned seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  Matrix<S> x(rows, cols);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<S>(dist(gen));
  return x;
}

/// A float or double matrix in double, for the references.
template <class S>
MatD as_double(const Matrix<S>& m) {
  return m.template cast<double>();
}

/// Everything the loop oracle needs besides q, k, v: options plus the optional element-wise parts.
struct NaiveExtras {
  const MatD* bias = nullptr;
  const BoolMatrix* mask = nullptr;
  std::function<bool(Index, Index)> allowed;
  std::function<double(double, Index, Index)> score;
};

struct NaiveResult {
  MatD out;
  Eigen::VectorXd lse;
};

/// softmax(scale * q k^T ...) v by plain loops in double, one (i, j) pair at a time.
inline NaiveResult naive_attention(const MatD& q, const MatD& k, const MatD& v, const AttentionOptions& o,
                                   const NaiveExtras& x = {}) {
  const Index n = q.rows(), m = k.rows(), d = q.cols();
  const double scale = o.scale > 0 ? o.scale : 1.0 / std::sqrt(double(d));
  const Index shift = o.align == CausalAlign::kBottomRight ? m - n : 0;
  NaiveResult r{MatD::Zero(n, v.cols()), Eigen::VectorXd::Constant(n, -std::numeric_limits<double>::infinity())};
  for (Index i = 0; i < n; ++i) {
    const Index a = i + shift;
    std::vector<bool> ok(m);
    Index count = 0;
    for (Index j = 0; j < m; ++j) {
      bool allowed = true;
      if (o.causal && j > a) allowed = false;
      if (o.window_left >= 0 && j < a - o.window_left) allowed = false;
      if (o.window_right >= 0 && j > a + o.window_right) allowed = false;
      if (o.key_length >= 0 && j >= o.key_length) allowed = false;
      if (x.mask && !(*x.mask)(i, j)) allowed = false;
      if (x.allowed && !x.allowed(i, j)) allowed = false;
      ok[j] = allowed;
      count += allowed;
    }
    if (count == 0) continue;
    const double factor = o.log_n_scale ? std::log(double(count)) / std::log(512.0) : 1.0;
    std::vector<double> s(m, -std::numeric_limits<double>::infinity());
    double mx = -std::numeric_limits<double>::infinity();
    for (Index j = 0; j < m; ++j) {
      if (!ok[j]) continue;
      double dot = 0;
      for (Index c = 0; c < d; ++c) dot += q(i, c) * k(j, c);
      double t = scale * factor * dot;
      if (x.score) t = x.score(t, i, j);
      if (o.softcap > 0) t = o.softcap * std::tanh(t / o.softcap);
      if (x.bias) t += (*x.bias)(i, j);
      t -= o.alibi_slope * std::abs(double(a - j));
      s[j] = t;
      mx = std::max(mx, t);
    }
    double sum = 0;
    for (Index j = 0; j < m; ++j)
      if (ok[j]) sum += std::exp(s[j] - mx);
    for (Index j = 0; j < m; ++j)
      if (ok[j]) r.out.row(i) += std::exp(s[j] - mx) / sum * v.row(j);
    r.lse(i) = mx + std::log(sum);
  }
  return r;
}

/// Tolerance of a float/double kernel against the double oracle, relative to the largest |v| (outputs are convex
/// combinations of value rows): a few hundred ulps, growing like sqrt(m) for the sums.
template <class S>
double attention_tolerance(Index m) {
  return 256 * std::numeric_limits<S>::epsilon() * std::sqrt(double(std::max<Index>(m, 1)));
}

/// Runs `call` and expects attnkit::Error whose message contains every one of `needles`.
template <class F>
void expect_error(const F& call, std::initializer_list<const char*> needles) {
  try {
    call();
    ADD_FAILURE() << "no attnkit::Error thrown; expected one mentioning " << *needles.begin();
  } catch (const Error& e) {
    const std::string what = e.what();
    for (const char* needle : needles) EXPECT_NE(what.find(needle), std::string::npos) << "message: " << what;
  }
}

/// Expects |actual - expected| <= tol elementwise (NaN equal to NaN), reporting the first bad element.
template <class DA>
::testing::AssertionResult all_close(const Eigen::MatrixBase<DA>& actual, const MatD& expected, double tol) {
  if (actual.rows() != expected.rows() || actual.cols() != expected.cols())
    return ::testing::AssertionFailure() << "shape " << actual.rows() << "x" << actual.cols() << ", expected "
                                         << expected.rows() << "x" << expected.cols();
  double worst = 0;
  Index wi = -1, wj = -1;
  for (Index i = 0; i < expected.rows(); ++i)
    for (Index j = 0; j < expected.cols(); ++j) {
      const double a = static_cast<double>(actual(i, j)), e = expected(i, j);
      if (std::isnan(a) && std::isnan(e)) continue;
      const double err = (std::isnan(a) || std::isnan(e)) ? std::numeric_limits<double>::infinity() : std::abs(a - e);
      if (err > worst) worst = err, wi = i, wj = j;
    }
  if (worst <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "shape " << expected.rows() << "x" << expected.cols() << ": at (" << wi
                                       << ", " << wj << ") expected " << expected(wi, wj) << ", got "
                                       << static_cast<double>(actual(wi, wj)) << ", |error| " << worst
                                       << " > tolerance " << tol;
}

}  // namespace attnkit::testing
