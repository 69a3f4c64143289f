// attnkit: the streaming (online) softmax, the one softmax every family uses.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "types.hpp"

// Packet types carry vector attributes that GCC drops, with a warning, when they are template arguments (the mask
// types of the ragged row ends); as in microkernel.hpp, silenced for this header only.
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

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

/// 2^f for a packet of floats with |f| <= 1/2: the degree-6 polynomial of exp_below (Horner's scheme).
template <class Packet>
Packet exp2_reduced(const Packet& f) {
  using namespace Eigen::internal;
  Packet p = pset1<Packet>(1.5461444695632573e-4f);
  p = pmadd(p, f, pset1<Packet>(1.3400428177416093e-3f));
  p = pmadd(p, f, pset1<Packet>(9.618056678532360e-3f));
  p = pmadd(p, f, pset1<Packet>(5.550327226670846e-2f));
  p = pmadd(p, f, pset1<Packet>(2.402265092228873e-1f));
  p = pmadd(p, f, pset1<Packet>(6.931472067028324e-1f));
  return pmadd(p, f, pset1<Packet>(1.f));
}

/// exp(x - shift) for a packet of floats with x <= shift (or NaN), the softmax's exponential: 2^t with
/// t = (x - shift) log2(e), split as t = n + f (n = round(t), |f| <= 1/2), 2^f by a degree-6 polynomial (Chebyshev
/// interpolation, 2.6e-9 before rounding) and 2^n put in the exponent bits. Measured relative error: 1.03 ulp for
/// |x - shift| <= 1, and within |t| 2^-24 more beyond (the rounding of t itself; 4.4 ulp at 10).
/// Rounding adds t to 1.5 * 2^23 + 127 (round to nearest, the default mode), which leaves n + 127 in the low bits of
/// the sum, so 2^n is that sum shifted left by 23. t is clamped below at -127, where the exponent field is 0: every x
/// below shift - 87.7, -inf (a masked logit) included, gives exactly 0, never a denormal. A NaN x gives NaN: Eigen's
/// pmax returns its first argument when either is NaN, as std::max does. 14 vector instructions, against about 30
/// for Eigen's pexp, whose cost was most of the softmax's share of a tile.
/// AVX-512 floats take 12 for the same values bit for bit: n by one rounding instruction, 2^n applied by vscalefps,
/// and, instead of the clamp, a compare (true for t >= -126.5 and for NaN) whose mask zeroes the rest (-inf included,
/// whose f = -inf - -inf is NaN). Zen 5 issues about 2.5 of these 512-bit operations per cycle, whatever their kind,
/// so the count is the cost: the pass over a row took 0.90x the time (5.96-6.49 against 6.49-7.02 cycles a packet).
template <class Packet>
Packet exp_below(const Packet& x, const Packet& shift) {
  using namespace Eigen::internal;
#if defined(EIGEN_VECTORIZE_AVX512)
  if constexpr (std::is_same_v<Packet, Packet16f>) {
    const Packet t = pmul(psub(x, shift), pset1<Packet>(1.4426950408889634f));
    const __mmask16 normal = _mm512_cmp_ps_mask(t, pset1<Packet>(-126.5f), _CMP_NLT_UQ);
    const Packet n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = psub(t, n);
    return _mm512_maskz_scalef_ps(normal, exp2_reduced(f), n);
  }
#endif
  using PacketI = typename unpacket_traits<Packet>::integer_packet;
  const Packet magic = pset1<Packet>(12582912.f + 127.f);
  const Packet t = pmax(pmul(psub(x, shift), pset1<Packet>(1.4426950408889634f)), pset1<Packet>(-127.f));
  const Packet r = padd(t, magic), f = psub(t, psub(r, magic));
  return pmul(exp2_reduced(f), preinterpret<Packet>(plogical_shift_left<23>(preinterpret<PacketI>(r))));
}

/// exp(x - shift) for a packet, x <= shift: exp_below for floats; Eigen's pexp for doubles, with -inf forced to 0.
template <class Packet>
Packet exp_shifted(const Packet& x, const Packet& shift) {
  using namespace Eigen::internal;
  using S = typename unpacket_traits<Packet>::type;
  if constexpr (std::is_same_v<S, float>) {
    return exp_below(x, shift);
  } else {
    return pandnot(pexp(psub(x, shift)), pcmp_eq(x, pset1<Packet>(-std::numeric_limits<S>::infinity())));
  }
}

/// Whether S's packets load and store their first lanes under a mask (AVX and AVX-512 floats).
template <class S>
constexpr bool kMaskedTail =
    Eigen::internal::unpacket_traits<typename Eigen::internal::packet_traits<S>::type>::masked_load_available&&
        Eigen::internal::unpacket_traits<typename Eigen::internal::packet_traits<S>::type>::masked_store_available;

/// The first `count` lanes (count < the packet size) of a packet of S: as a load/store mask, and as a packet whose
/// lanes are all ones there and zero elsewhere.
template <class S>
auto tail_mask(Index count) {
  using Packet = typename Eigen::internal::packet_traits<S>::type;
  return static_cast<typename Eigen::internal::unpacket_traits<Packet>::mask_t>((1u << count) - 1u);
}
template <class S>
auto tail_lanes(Index count) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<S>::type;
  return pcmp_lt(plset<Packet>(S(0)), pset1<Packet>(S(count)));
}

/// x[c] = exp(x[c] - shift) for c < count, returning the sum. A -inf logit (masked) becomes exactly 0: a vectorised
/// exp that clamped its argument would give a tiny denormal, and a masked NaN value times a denormal is still NaN.
/// One pass, packet by packet; a ragged end (a diagonal tile's or a band's rows) is one more packet, not count % P
/// scalar exps (each as dear as a packet): a masked load and store where the CPU has them (the rows of a band were
/// 13-28% faster, 129 and 100 keys, than through a copy padded with -inf), else that padded copy. Its lanes past
/// the end add exactly 0 to the sum either way.
template <class S>
S exp_shifted_sum(S* x, Index count, S shift) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<S>::type;
  constexpr Index P = packet_traits<S>::size;
  constexpr S kNegInf = -std::numeric_limits<S>::infinity();
  if constexpr (P == 1) {
    S total = 0;
    for (Index c = 0; c < count; ++c) total += x[c] = x[c] == kNegInf ? S(0) : std::exp(x[c] - shift);
    return total;
  } else {
    const Packet m = pset1<Packet>(shift);
    Packet sum = pset1<Packet>(S(0)), sum2 = sum;  // two sums: the adds' latency stays off the critical path
    Index c = 0;
    for (; c + 2 * P <= count; c += 2 * P) {
      const Packet e = exp_shifted(ploadu<Packet>(x + c), m), e2 = exp_shifted(ploadu<Packet>(x + c + P), m);
      pstoreu(x + c, e);
      pstoreu(x + c + P, e2);
      sum = padd(sum, e), sum2 = padd(sum2, e2);
    }
    sum = padd(sum, sum2);
    for (; c + P <= count; c += P) {
      const Packet e = exp_shifted(ploadu<Packet>(x + c), m);
      pstoreu(x + c, e);
      sum = padd(sum, e);
    }
    if (c < count) {
      if constexpr (kMaskedTail<S>) {
        const auto mask = tail_mask<S>(count - c);
        const Packet e = pand(exp_shifted(ploadu<Packet>(x + c, mask), m), tail_lanes<S>(count - c));
        pstoreu(x + c, e, mask);
        sum = padd(sum, e);
      } else {
        S tail[P];
        std::fill(std::copy(x + c, x + count, tail), tail + P, kNegInf);
        const Packet e = exp_shifted(ploadu<Packet>(tail), m);
        pstoreu(tail, e);
        std::copy(tail, tail + (count - c), x + c);
        sum = padd(sum, e);
      }
    }
    return predux(sum);
  }
}

/// The largest of x[0..count), -inf for none; with a NaN the result may or may not be NaN (the caller checks). Four
/// packet accumulators, so the max's latency does not bound the pass.
template <class S>
S row_max(const S* x, Index count) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<S>::type;
  constexpr Index P = packet_traits<S>::size;
  constexpr S kNegInf = -std::numeric_limits<S>::infinity();
  Index c = 0;
  S best = kNegInf;
  if constexpr (P > 1) {
    Packet m0 = pset1<Packet>(kNegInf), m1 = m0, m2 = m0, m3 = m0;
    for (; c + 4 * P <= count; c += 4 * P) {
      m0 = pmax(m0, ploadu<Packet>(x + c)), m1 = pmax(m1, ploadu<Packet>(x + c + P));
      m2 = pmax(m2, ploadu<Packet>(x + c + 2 * P)), m3 = pmax(m3, ploadu<Packet>(x + c + 3 * P));
    }
    for (; c + P <= count; c += P) m0 = pmax(m0, ploadu<Packet>(x + c));
    if constexpr (kMaskedTail<S>) {
      if (c < count) {  // the lanes past the end are -inf
        m1 = pmax(m1, pselect(tail_lanes<S>(count - c), ploadu<Packet>(x + c, tail_mask<S>(count - c)),
                              pset1<Packet>(kNegInf)));
        c = count;
      }
    }
    best = predux_max(pmax(pmax(m0, m1), pmax(m2, m3)));
  }
  for (; c < count; ++c) best = std::max(best, x[c]);
  return best;
}

/// One step of the online softmax (Milakov & Gimelshein 2018; FlashAttention): takes the next logits of the row
/// (masked ones are -inf), overwrites them with exp(s - m_new), folds their sum into `state`, and returns the factor
/// exp(m_old - m_new) by which the caller must rescale its accumulated output. A row whose keys so far are all masked
/// gets zeros and factor 1: exp(-inf - -inf) is never evaluated. A NaN logit makes the whole row's result NaN.
template <class S>
S online_softmax_step(S* logits, Index count, SoftmaxState<S>& state) {
  Eigen::Map<Eigen::Array<S, 1, Eigen::Dynamic>> row(logits, count);
  const S new_max = std::max(state.max, row_max(logits, count));
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
  const S alpha = state.max == new_max ? S(1) : std::exp(state.max - new_max);  // the max often stays
  state.sum = state.sum * alpha + row_sum;
  state.max = new_max;
  return alpha;
}

/// The softmax of P rows side by side, one per lane of a packet of P scalars (lane-batched problems: sparse
/// attention's residue classes), over all of their keys at once and merged with an earlier part of each row.
/// logits holds count packets, the P rows' logits for one key each (masked ones -inf), and becomes exp(s - M); the
/// earlier part, log-sum-exp in lse (-inf for none), weighs exp(lse - M), stored in `earlier`; `inverse` gets 1 / the
/// sum of all those weights (0 for a row with none), by which the caller scales its weighted sum, and lse becomes the
/// whole row's log-sum-exp (unless keep_lse is false: a caller that reads no log-sum-exp saves the logarithm). M is
/// the row's largest logit (or 0 when it has none, so that exp(-inf - M) is exactly 0). Every operation is lane by
/// lane, so no row sees another. The caller keeps NaN and Inf out of the logits (a lane's max would drop NaN).
template <class S>
void softmax_lanes(S* logits, Index count, S* lse, S* earlier, S* inverse, bool keep_lse = true) {
  using namespace Eigen::internal;
  using Packet = typename packet_traits<S>::type;
  constexpr Index P = packet_traits<S>::size;
  const Packet before = ploadu<Packet>(lse), none = pset1<Packet>(-std::numeric_limits<S>::infinity());
  Packet max = before;
  for (Index c = 0; c < count; ++c) max = pmax(max, ploadu<Packet>(logits + c * P));
  const Packet shift = pandnot(max, pcmp_eq(max, none));
  const Packet old = exp_shifted(before, shift);
  Packet total = old;
  for (Index c = 0; c < count; ++c) {
    const Packet e = exp_shifted(ploadu<Packet>(logits + c * P), shift);
    pstoreu(logits + c * P, e);
    total = padd(total, e);
  }
  const Packet some = pcmp_lt(pset1<Packet>(S(0)), total);
  pstoreu(earlier, old);
  pstoreu(inverse, pand(pdiv(pset1<Packet>(S(1)), total), some));
  if (!keep_lse) return;
  // log(total) only where there is a total: -inf elsewhere, whatever plog makes of 0.
  pstoreu(lse, pselect(some, padd(shift, plog(pselect(some, total, pset1<Packet>(S(1))))), none));
}

}  // namespace attnkit::detail

#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
