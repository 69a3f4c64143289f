// attnkit: the streaming (online) softmax, the one softmax every family uses.
#pragma once

#include <cmath>
#include <limits>

#include "types.hpp"

namespace attnkit::detail {

/// Running statistics of one softmax row over the keys seen so far: max m and sum l = sum_j exp(s_j - m).
template <class S>
struct SoftmaxState {
  S max = -std::numeric_limits<S>::infinity();
  S sum = 0;

  /// log-sum-exp of the row; -inf when no key was allowed, NaN when a logit was NaN.
  S log_sum_exp() const { return sum == S(0) ? -std::numeric_limits<S>::infinity() : max + std::log(sum); }
  /// 1 / sum, or 0 for a row with no allowed key, so such rows output zeros rather than NaN (NaN stays NaN).
  S inverse_sum() const { return sum == S(0) ? S(0) : S(1) / sum; }
};

/// x[c] = exp(x[c] - shift) for c < count, returning the sum. A -inf logit (masked) becomes exactly 0: a vectorised
/// exp clamps its argument, so exp(-inf) alone would come out as a tiny denormal, and a masked NaN value times a
/// denormal is still NaN. One pass, packet by packet.
template <class S>
S exp_shifted_sum(S* x, Index count, S shift) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<S>::type;
  constexpr Index P = packet_traits<S>::size;
  constexpr S kNegInf = -std::numeric_limits<S>::infinity();
  const Packet neg_inf = pset1<Packet>(kNegInf), m = pset1<Packet>(shift);
  Packet sum = pset1<Packet>(S(0));
  Index c = 0;
  for (; c + P <= count; c += P) {
    const Packet v = ploadu<Packet>(x + c);
    const Packet e = pandnot(pexp(psub(v, m)), pcmp_eq(v, neg_inf));
    pstoreu(x + c, e);
    sum = padd(sum, e);
  }
  S total = predux(sum);
  for (; c < count; ++c) {
    x[c] = x[c] == kNegInf ? S(0) : std::exp(x[c] - shift);
    total += x[c];
  }
  return total;
}

/// One step of the online softmax (Milakov & Gimelshein 2018; FlashAttention): takes the next logits of the row
/// (masked ones are -inf), overwrites them with exp(s - m_new), folds their sum into `state`, and returns the factor
/// exp(m_old - m_new) by which the caller must rescale its accumulated output. A row whose keys so far are all masked
/// gets zeros and factor 1: exp(-inf - -inf) is never evaluated. A NaN logit makes the whole row's result NaN.
template <class S>
S online_softmax_step(S* logits, Index count, SoftmaxState<S>& state) {
  Eigen::Map<Eigen::Array<S, 1, Eigen::Dynamic>> row(logits, count);
  const S tile_max = count > 0 ? row.maxCoeff() : -std::numeric_limits<S>::infinity();
  const S new_max = std::max(state.max, tile_max);
  if (new_max == -std::numeric_limits<S>::infinity()) {
    // No allowed key so far, or NaN logits (std::max drops a NaN): NaN must reach the output, not turn into zeros.
    if (row.isNaN().any()) {
      row.setConstant(std::numeric_limits<S>::quiet_NaN());
      state.max = state.sum = std::numeric_limits<S>::quiet_NaN();
      return state.sum;
    }
    row.setZero();
    return S(1);
  }
  const S row_sum = exp_shifted_sum(logits, count, new_max);
  const S alpha = std::exp(state.max - new_max);
  state.sum = state.sum * alpha + row_sum;
  state.max = new_max;
  return alpha;
}

}  // namespace attnkit::detail
