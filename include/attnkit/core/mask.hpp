// attnkit: the mask model shared by every family. Which (i, j) pairs are allowed, and what happens to a logit.
//
// A mask is split in two parts so tiles can be classified cheaply:
//  - an interval [begin, end) of keys per query row, from causal, sliding window and key padding
//    (neighbouring rows have neighbouring intervals, so most tiles are wholly empty or wholly full);
//  - an optional element-wise part: a boolean matrix and/or a user predicate allowed(i, j).
// Score modifiers (a user score(s, i, j), softcap, additive bias, ALiBi) change allowed logits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "error.hpp"
#include "options.hpp"
#include "types.hpp"
#include "view.hpp"

namespace attnkit {
namespace detail {

struct NoAllowedFn {};
struct NoScoreFn {};

/// The optional element-wise parts of a mask, collected from the extra arguments of a kernel call.
template <class S, class AllowedFn = NoAllowedFn, class ScoreFn = NoScoreFn>
struct MaskExtras {
  const StridedView<S>* bias = nullptr;     // n x m, added to the logits
  const StridedView<bool>* mask = nullptr;  // n x m, true = allowed
  AllowedFn allowed{};                      // bool(Index i, Index j)
  ScoreFn score{};                          // S(S s, Index i, Index j)
};

struct KeyRange {
  Index begin = 0;
  Index end = 0;
  bool empty() const { return end <= begin; }
  Index size() const { return empty() ? 0 : end - begin; }
  static KeyRange all() { return {0, std::numeric_limits<Index>::max()}; }
};

inline KeyRange intersect(KeyRange a, KeyRange b) {
  const Index begin = std::max(a.begin, b.begin);
  return {begin, std::max(begin, std::min(a.end, b.end))};
}

enum class TileKind { kEmpty, kFull, kPartial };

/// Query rows that fold several heads over the same keys (grouped-query attention): row i is token
/// i % rows_per_group of head i / rows_per_group, and that head's ALiBi slope is slopes[i / rows_per_group].
/// rows_per_group == 0 means one group of all rows.
struct RowGroups {
  Index rows_per_group = 0;
  const double* slopes = nullptr;  // one per group, or null for options.alibi_slope
};

/// The mask and logit transform of one attention call over n queries and m keys.
template <class S, class AllowedFn = NoAllowedFn, class ScoreFn = NoScoreFn>
class MaskModel {
 public:
  static constexpr bool kHasAllowedFn = !std::is_same_v<AllowedFn, NoAllowedFn>;
  static constexpr bool kHasScoreFn = !std::is_same_v<ScoreFn, NoScoreFn>;

  /// With row groups, positions and alignment are those of a group's rows; element-wise extras see raw row indices.
  MaskModel(Index n, Index m, const AttentionOptions& o, const MaskExtras<S, AllowedFn, ScoreFn>& extras,
            RowGroups groups = {})
      : m_(m),
        period_(groups.rows_per_group > 0 ? groups.rows_per_group : std::max<Index>(n, 1)),
        offset_(alignment_offset(o, period_, m)),
        slopes_(groups.slopes),
        o_(o),
        extras_(extras) {}

  /// Row i's position on the key axis (after alignment): causal, window and ALiBi compare it with key indices.
  Index position(Index i) const { return i % period_ + offset_; }

  /// The contiguous part of row i's allowed keys: causal, window and key padding.
  KeyRange row_range(Index i) const {
    const Index a = position(i);
    Index begin = 0, end = o_.key_length >= 0 ? o_.key_length : m_;
    if (o_.causal) end = std::min(end, a + 1);
    if (o_.window_left >= 0) begin = std::max(begin, a - o_.window_left);
    if (o_.window_right >= 0) end = std::min(end, a + o_.window_right + 1);
    return {begin, std::max(begin, end)};
  }

  /// Whether causal and the window allow a key `delta` positions before its query (delta = position(i) - j; key
  /// padding aside): row_range's rule for the keys that move with the row, for kernels that index keys by their
  /// distance from the query (sparse attention's residue lanes).
  bool allows_offset(Index delta) const {
    return (!o_.causal || delta >= 0) && (o_.window_left < 0 || delta <= o_.window_left) &&
           (o_.window_right < 0 || -delta <= o_.window_right);
  }

  bool elementwise() const { return kHasAllowedFn || extras_.mask != nullptr; }

  /// The element-wise part only; callers have already restricted j to row_range(i).
  bool allowed(Index i, Index j) const {
    if (extras_.mask && !(*extras_.mask)(i, j)) return false;
    if constexpr (kHasAllowedFn) return static_cast<bool>(extras_.allowed(i, j));
    return true;
  }

  Index allowed_count(Index i) const {
    const KeyRange r = row_range(i);
    if (!elementwise()) return r.size();
    Index count = 0;
    for (Index j = r.begin; j < r.end; ++j) count += allowed(i, j) ? 1 : 0;
    return count;
  }

  /// scale, times log(n_i)/log(512) with log-n scaling: folded into the query row by the kernels.
  S row_scale(Index i, S scale) const {
    if (!o_.log_n_scale) return scale;
    const Index count = allowed_count(i);
    return count > 0 ? static_cast<S>(scale * std::log(static_cast<double>(count)) / std::log(512.0)) : scale;
  }

  bool modifies_scores() const {
    return kHasScoreFn || o_.softcap > 0 || extras_.bias != nullptr || o_.alibi_slope > 0 || slopes_ != nullptr;
  }

  /// score callable -> softcap -> bias + ALiBi, on the scaled logits row[c] = s(i, j0 + c), c < count.
  void modify_row(Index i, Index j0, S* row, Index count) const {
    modify_row(i, row, count, [j0](Index c) { return j0 + c; });
  }

  /// As above for keys that are not contiguous: row[c] is the logit of key key_of(c) (gathered sparse tiles).
  template <class KeyOf>
  void modify_row(Index i, S* row, Index count, KeyOf key_of) const {
    Eigen::Map<Eigen::Array<S, 1, Eigen::Dynamic>> r(row, count);
    if constexpr (kHasScoreFn) {
      for (Index c = 0; c < count; ++c) row[c] = static_cast<S>(extras_.score(row[c], i, key_of(c)));
    }
    if (o_.softcap > 0) {
      const S cap = static_cast<S>(o_.softcap);
      r = cap * (r / cap).tanh();
    }
    if (extras_.bias) {
      const StridedView<S>& b = *extras_.bias;
      for (Index c = 0; c < count; ++c) row[c] += b(i, key_of(c));
    }
    const double alibi = slopes_ ? slopes_[i / period_] : o_.alibi_slope;
    if (alibi > 0) {
      const S slope = static_cast<S>(alibi);
      const Index a = position(i);
      for (Index c = 0; c < count; ++c) row[c] -= slope * static_cast<S>(std::abs(a - key_of(c)));
    }
  }

  /// Sets row[c] = -inf for every key j0 + c that row i may not see; `range` is row_range(i).
  void mask_row(Index i, Index j0, S* row, Index count, KeyRange range) const {
    constexpr S kNegInf = -std::numeric_limits<S>::infinity();
    const Index lo = std::clamp<Index>(range.begin - j0, 0, count);
    const Index hi = std::clamp<Index>(range.end - j0, lo, count);
    for (Index c = 0; c < lo; ++c) row[c] = kNegInf;
    for (Index c = hi; c < count; ++c) row[c] = kNegInf;
    if (elementwise()) {
      for (Index c = lo; c < hi; ++c)
        if (!allowed(i, j0 + c)) row[c] = kNegInf;
    }
  }

  /// Classifies keys [j0, j0 + count) against the rows whose ranges are given. A full tile needs no mask work.
  TileKind classify(const KeyRange* ranges, Index rows, Index j0, Index count) const {
    bool any = false, all = !elementwise();
    for (Index r = 0; r < rows; ++r) {
      const KeyRange& g = ranges[r];
      const bool overlaps = !g.empty() && g.begin < j0 + count && g.end > j0;
      any = any || overlaps;
      all = all && g.begin <= j0 && g.end >= j0 + count;
    }
    if (!any) return TileKind::kEmpty;
    return all ? TileKind::kFull : TileKind::kPartial;
  }
  TileKind classify(Index /*i0*/, const KeyRange* ranges, Index rows, Index j0, Index count) const {
    return classify(ranges, rows, j0, count);
  }

  /// The key spans the tile loop walks for query rows [i0, i0 + rows) whose ranges span `hull`: the hull itself.
  /// (Sparse patterns list several spans and skip the keys between them.)
  void key_spans(Index /*i0*/, Index /*rows*/, KeyRange hull, std::vector<KeyRange>& spans) const {
    spans.assign(1, hull);
  }

 private:
  Index m_, period_, offset_;
  const double* slopes_;
  AttentionOptions o_;
  MaskExtras<S, AllowedFn, ScoreFn> extras_;
};

/// Turns row i's raw dot products q_i . k_j (row[0..m)) into its final logits: scale (with the log-n factor), score
/// modifiers, then -inf for every key the mask hides. What the fused kernel does tile by tile, for a whole row (the
/// materialising oracles and the analysis functions).
template <class S, class Mask>
void finish_logit_row(const Mask& mask, Index i, S scale, S* row, Index m) {
  Eigen::Map<Eigen::Array<S, 1, Eigen::Dynamic>>(row, m) *= mask.row_scale(i, scale);
  if (mask.modifies_scores()) mask.modify_row(i, 0, row, m);
  mask.mask_row(i, 0, row, m, mask.row_range(i));
}

template <class T>
inline constexpr bool is_eigen_v = std::is_base_of_v<Eigen::EigenBase<T>, T>;

template <class>
inline constexpr bool dependent_false_v = false;

/// Turns the extra arguments of a kernel call (bias matrix, bool mask, allowed(i, j), score(s, i, j), in any order,
/// at most one of each) into a MaskModel and passes it to `cont`. Matrices are viewed without copying when they
/// have direct access; the views live until `cont` returns.
template <class S, class A, class F, class Cont>
void with_mask_model(const char* /*where*/, Index n, Index m, const AttentionOptions& o, const MaskExtras<S, A, F>& acc,
                     Cont&& cont) {
  cont(MaskModel<S, A, F>(n, m, o, acc));
}

template <class S, class A, class F, class Cont, class First, class... Rest>
void with_mask_model(const char* where, Index n, Index m, const AttentionOptions& o, const MaskExtras<S, A, F>& acc,
                     Cont&& cont, const First& first, const Rest&... rest) {
  if constexpr (is_eigen_v<First>) {
    using T = typename First::Scalar;
    static_assert(std::is_same_v<T, S> || std::is_same_v<T, bool>,
                  "an extra matrix is either an additive bias of the kernel's scalar type or a bool mask");
    const char* what = std::is_same_v<T, bool> ? "mask" : "bias";
    if (first.rows() != n || first.cols() != m)
      fail(where, what, " is ", shape_str(first.rows(), first.cols()), " but must be n x m = ", shape_str(n, m),
           " (one row per query, one column per key)");
    ViewOf<First> holder(first);
    MaskExtras<S, A, F> next = acc;
    if constexpr (std::is_same_v<T, bool>) {
      if (acc.mask) fail(where, "more than one bool mask given; combine them with && first");
      next.mask = &holder.view();
    } else {
      if (acc.bias) fail(where, "more than one bias matrix given; add them first");
      next.bias = &holder.view();
    }
    with_mask_model(where, n, m, o, next, cont, rest...);
  } else if constexpr (std::is_invocable_r_v<bool, const First&, Index, Index>) {
    static_assert(std::is_same_v<A, NoAllowedFn>, "at most one allowed(i, j) callable");
    const MaskExtras<S, First, F> next{acc.bias, acc.mask, first, acc.score};
    with_mask_model(where, n, m, o, next, cont, rest...);
  } else if constexpr (std::is_invocable_r_v<S, const First&, S, Index, Index>) {
    static_assert(std::is_same_v<F, NoScoreFn>, "at most one score(s, i, j) callable");
    const MaskExtras<S, A, First> next{acc.bias, acc.mask, acc.allowed, first};
    with_mask_model(where, n, m, o, next, cont, rest...);
  } else {
    static_assert(dependent_false_v<First>,
                  "extra arguments are: an n x m bias matrix, an n x m bool mask, bool allowed(Index i, Index j), "
                  "or Scalar score(Scalar s, Index i, Index j)");
  }
}

}  // namespace detail
}  // namespace attnkit
