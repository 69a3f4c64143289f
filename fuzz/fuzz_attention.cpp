// libFuzzer target: bytes -> a kernel family, shapes, options and data. Each input either is rejected with
// attnkit::Error or gives, in float and in double, what a double-precision reference gives within a tolerance that
// follows from the size of the logits. Anything else (another exception, a crash, a sanitizer report, a mismatch)
// is a finding. Families: fused SDPA (with a bias or a bool mask) against attnkit::reference, sparse attention
// against the reference under the pattern's dense mask, linear attention (non-causal, chunked causal, and the
// recurrent state fed in blocks) against the quadratic formula of SPEC section 3.
//
// Build and run: make fuzz (FUZZ_SECONDS=60 by default); see the README.
#include <attnkit/attnkit.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <vector>

namespace {

using attnkit::AttentionOptions;
using attnkit::Index;
using attnkit::LinearOptions;
using attnkit::Matrix;
using attnkit::SparsePattern;
using MatD = Matrix<double>;

/// Reads the fuzzer's bytes front to back; zeros once they run out.
class Bytes {
 public:
  Bytes(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  int byte() { return at_ < size_ ? data_[at_++] : 0; }
  /// An integer in [lo, hi].
  Index in(Index lo, Index hi) { return lo + Index(byte()) % (hi - lo + 1); }
  bool flag() { return byte() & 1; }
  /// A value in [-8, 8) on a 1/16 grid: exactly representable in float, so float and double see the same input.
  double value() { return (byte() - 128) / 16.0; }
  MatD matrix(Index rows, Index cols) {
    MatD m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = value();
    return m;
  }

 private:
  const uint8_t* data_;
  size_t size_, at_ = 0;
};

/// max |x|, 0 for an empty matrix.
double max_abs(const MatD& x) { return x.size() > 0 ? x.cwiseAbs().maxCoeff() : 0.0; }

[[noreturn]] void finding(const char* what, double error, double tolerance) {
  std::fprintf(stderr, "fuzz finding: %s: error %.3g exceeds tolerance %.3g\n", what, error, tolerance);
  std::abort();
}

/// Mostly sensible options, sometimes invalid ones (which must be rejected with attnkit::Error).
AttentionOptions attention_options(Bytes& b, Index m) {
  AttentionOptions o;
  const int bad = b.byte();
  o.causal = b.flag();
  o.align = b.flag() ? attnkit::CausalAlign::kTopLeft : attnkit::CausalAlign::kBottomRight;
  if (b.flag()) o.window_left = b.in(0, m);
  if (b.flag()) o.window_right = b.in(0, m);
  if (b.flag()) o.key_length = b.in(0, m);
  if (b.flag()) o.alibi_slope = b.in(1, 8) / 8.0;
  if (b.flag()) o.softcap = double(b.in(1, 64));
  o.log_n_scale = b.flag();
  if (b.flag()) o.scale = b.in(1, 64) / 16.0;
  o.threads = int(b.in(1, 2));
  switch (bad % 16) {  // one invalid field now and then
    case 1: o.window_left = -2; break;
    case 2: o.key_length = m + 1; break;
    case 3: o.scale = -1; break;
    case 4: o.softcap = std::numeric_limits<double>::quiet_NaN(); break;
    case 5: o.alibi_slope = std::numeric_limits<double>::infinity(); break;
    case 6: o.threads = -1; break;
    default: break;
  }
  return o;
}

/// A bound on |logit| after scale, bias and ALiBi, for the tolerance: float rounds each logit to about 6e-8 of it.
double logit_bound(const MatD& q, const MatD& k, const AttentionOptions& o, double bias) {
  const double scale = o.scale > 0 ? o.scale : 1 / std::sqrt(double(q.cols()));
  const double log_n = o.log_n_scale ? std::log(double(std::max<Index>(k.rows(), 16))) / std::log(512.0) : 1;
  double dot = scale * log_n * max_abs(q) * max_abs(k) * double(q.cols());
  if (o.softcap > 0) dot = std::min(dot, o.softcap);
  return dot + bias + o.alibi_slope * double(k.rows() + q.rows());
}

/// Above this condition a row's weights are at the rounding level of its scores; linear attention then gives the row
/// no weight (a zero row), which is accepted too.
constexpr double kZeroAllowed = 1e3;

/// got against want row by row: row i within unit * scale(i).
void expect_close(const char* what, const MatD& got, const MatD& want, const Eigen::VectorXd& scale, double unit,
                  const Eigen::VectorXd* kappa) {
  if (got.rows() != want.rows() || got.cols() != want.cols()) finding(what, 1e300, 0);
  for (Index i = 0; i < got.rows(); ++i) {
    if (got.cols() == 0) continue;
    const double error = (got.row(i) - want.row(i)).cwiseAbs().maxCoeff();
    if (kappa && (*kappa)(i) >= kZeroAllowed && got.row(i).isZero(0)) continue;
    if (!(error <= unit * scale(i))) finding(what, error, unit * scale(i));
  }
}

/// Float and double results of `run` against `want`, row i within (16 + terms) and (64 + terms) rounding units times
/// scale(i): the row's condition, (1 + its largest |logit|) (1 + max |v|) for softmax attention. `terms` is the
/// length of the longest sum behind an output (keys plus features): a float sum of k terms may be off by up to
/// k - 1 units of its terms' magnitudes, and numerator and denominator need not be summed in the same order. (A
/// fixed 16 units was too tight: 48 keys with one feature and constant values gave 16.0 units, and failed CI.)
template <class Run>
void check_both(const char* what, const Run& run, const MatD& want, const Eigen::VectorXd& scale, Index terms,
                const Eigen::VectorXd* kappa = nullptr) {
  expect_close(what, run(double()), want, scale, double(64 + terms) * 1.1e-16, kappa);
  expect_close(what, run(float()), want, scale, double(16 + terms) * 6e-8, kappa);
}

/// The same condition for every row of an n-row softmax problem.
Eigen::VectorXd softmax_condition(Index n, double logits, double values) {
  return Eigen::VectorXd::Constant(n, (1 + logits) * (1 + values));
}

void sdpa_case(Bytes& b) {
  const Index n = b.in(0, 40), m = b.in(0, 40), d = b.in(0, 17), dv = b.in(0, 17);
  const AttentionOptions o = attention_options(b, m);
  const int extra = b.in(0, 2);  // none, an additive bias, a bool mask
  const MatD q = b.matrix(n, d), k = b.matrix(m, d), v = b.matrix(m, dv), bias = b.matrix(n, m);
  attnkit::BoolMatrix mask(n, m);
  for (Index i = 0; i < mask.size(); ++i) mask.data()[i] = b.flag();
  const auto run = [&](auto scalar) {
    using S = decltype(scalar);
    const Matrix<S> qs = q.cast<S>(), ks = k.cast<S>(), vs = v.cast<S>(), bs = bias.cast<S>();
    Matrix<S> out;
    if (extra == 0) out = attnkit::scaled_dot_product_attention(qs, ks, vs, o);
    if (extra == 1) out = attnkit::scaled_dot_product_attention(qs, ks, vs, o, bs);
    if (extra == 2) out = attnkit::scaled_dot_product_attention(qs, ks, vs, o, mask);
    return MatD(out.template cast<double>());
  };
  const MatD first = run(double());  // invalid input is rejected here, by the kernel under test
  MatD want;
  if (extra == 0) want = attnkit::reference::scaled_dot_product_attention(q, k, v, o);
  if (extra == 1) want = attnkit::reference::scaled_dot_product_attention(q, k, v, o, bias);
  if (extra == 2) want = attnkit::reference::scaled_dot_product_attention(q, k, v, o, mask);
  if (want.size() == 0 && first.size() == 0) return;
  check_both("sdpa", run, want, softmax_condition(n, logit_bound(q, k, o, 8), max_abs(v)), m + d);
}

SparsePattern pattern(Bytes& b, Index n) {
  const Index p = b.in(-1, 8), q = b.in(-1, 8);  // -1 and 0 are invalid for most factories
  switch (b.in(0, 5)) {
    case 0: return SparsePattern::local(p);
    case 1: return SparsePattern::atrous(p, b.flag() ? q : -1);
    case 2: return SparsePattern::local_atrous(p);
    case 3: return SparsePattern::strided(p);
    case 4: return SparsePattern::fixed(p, q);
    default: {
      const Index size = std::max<Index>(p, 1), blocks = (n + size - 1) / size + b.in(0, 1);
      attnkit::BoolMatrix layout(blocks, blocks);
      for (Index i = 0; i < layout.size(); ++i) layout.data()[i] = b.flag();
      return SparsePattern::block(layout, p);
    }
  }
}

void sparse_case(Bytes& b) {
  const Index n = b.in(0, 40), d = b.in(1, 17), dv = b.in(0, 17);
  const Index m = b.flag() ? n : b.in(0, 40);
  SparsePattern sparse = pattern(b, std::max(n, m));
  if (b.flag()) sparse = sparse | pattern(b, std::max(n, m));
  const AttentionOptions o = attention_options(b, m);
  const MatD q = b.matrix(n, d), k = b.matrix(m, d), v = b.matrix(m, dv);
  const auto run = [&](auto scalar) {
    using S = decltype(scalar);
    return MatD(attnkit::sparse_attention(Matrix<S>(q.cast<S>()), Matrix<S>(k.cast<S>()), Matrix<S>(v.cast<S>()),
                                          sparse, o)
                    .template cast<double>());
  };
  const MatD first = run(double());  // rejects bad patterns and options before the O(n m) mask is built
  const MatD want = attnkit::reference::scaled_dot_product_attention(q, k, v, o, sparse.mask(n, m, o));
  if (want.size() == 0 && first.size() == 0) return;
  check_both("sparse", run, want, softmax_condition(n, logit_bound(q, k, o, 0), max_abs(v)), m + d);
}

/// O_i = sum_j A_ij v_j / (sum_j A_ij + eps), A = phi(Q) phi(K)^T over j <= i when causal, in double; and each row's
/// condition (1 + kappa_i) (1 + max |v|), kappa_i = sum_j |phi(q_i)| |phi(k_j)| / (sum_j A_ij + eps): rounding
/// each score costs about a unit of |phi(q_i)| |phi(k_j)|, which the denominator then divides. It is small for
/// positive features; Taylor's 1 + cos cancels for a query opposite to its keys, and kappa_i grows with it.
struct LinearReference {
  MatD out;
  Eigen::VectorXd condition, kappa;
};

template <class Map>
LinearReference linear_reference(const Map& map, const MatD& q, const MatD& k, const MatD& v, bool causal,
                                 double eps) {
  const Index r = map.features(q.cols());
  MatD fq(q.rows(), r), fk(k.rows(), r);
  map.map(q.data(), q.rows(), q.cols(), attnkit::FeatureRole::kQuery, fq.data(), r);
  map.map(k.data(), k.rows(), k.cols(), attnkit::FeatureRole::kKey, fk.data(), r);
  MatD a = fq * fk.transpose();
  MatD size = fq.rowwise().norm() * fk.rowwise().norm().transpose();
  if (causal) a = a.triangularView<Eigen::Lower>(), size = size.triangularView<Eigen::Lower>();
  LinearReference ref{a * v, Eigen::VectorXd(q.rows()), Eigen::VectorXd(q.rows())};
  for (Index i = 0; i < q.rows(); ++i) {
    const double den = a.row(i).sum() + eps;
    ref.out.row(i) /= den;
    ref.kappa(i) = size.row(i).sum() / den;
    ref.condition(i) = (1 + ref.kappa(i)) * (1 + max_abs(v));
  }
  return ref;
}

template <class Map>
void linear_with(const Map& map, Bytes& b) {
  const Index n = b.in(0, 48), d = b.in(0, 12), dv = b.in(0, 12);
  LinearOptions o;
  o.causal = b.flag();
  o.chunk = b.in(0, 9);
  o.threads = int(b.in(1, 2));
  if (b.byte() % 16 == 1) o.eps = -1;  // invalid
  const Index m = o.causal || b.flag() ? n : b.in(0, 48);
  const MatD q = b.matrix(n, d), k = b.matrix(m, d), v = b.matrix(m, dv);
  const bool recurrent = o.causal && b.flag();
  const Index block = b.in(1, 7);
  const auto run = [&](auto scalar) {
    using S = decltype(scalar);
    const Matrix<S> qs = q.cast<S>(), ks = k.cast<S>(), vs = v.cast<S>();
    if (!recurrent) return MatD(attnkit::linear_attention(qs, ks, vs, map, o).template cast<double>());
    attnkit::LinearAttentionState<S, Map> state(map, d, dv, o);
    MatD out(n, dv);
    for (Index t = 0; t < n; t += block) {
      const Index rows = std::min(block, n - t);
      out.middleRows(t, rows) =
          state.step(qs.middleRows(t, rows), ks.middleRows(t, rows), vs.middleRows(t, rows)).template cast<double>();
    }
    return out;
  };
  const MatD first = run(double());
  if (first.size() == 0) return;
  char what[160];
  std::snprintf(what, sizeof what, "linear%s: n %ld m %ld d %ld dv %ld causal %d chunk %ld block %ld eps %g threads %d",
                recurrent ? " (recurrent)" : "", long(n), long(m), long(d), long(dv), int(o.causal), long(o.chunk),
                long(block), o.eps, o.threads);
  const LinearReference want = linear_reference(map, q, k, v, o.causal, o.eps);
  check_both(what, run, want.out, want.condition, m + map.features(d), &want.kappa);
}

void linear_case(Bytes& b) {
  switch (b.in(0, 2)) {
    case 0: return linear_with(attnkit::EluPlusOne{}, b);
    case 1: return linear_with(attnkit::Relu{}, b);
    default: return linear_with(attnkit::Taylor{}, b);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Bytes b(data, size);
  try {
    switch (b.in(0, 2)) {
      case 0: sdpa_case(b); break;
      case 1: sparse_case(b); break;
      default: linear_case(b); break;
    }
  } catch (const attnkit::Error&) {
    // Rejected with a clear error: an accepted outcome. Any other exception escapes and is a finding.
  }
  return 0;
}
