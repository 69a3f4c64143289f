// attnkit: sparse attention (Child et al. 2019, "Generating Long Sequences with Sparse Transformers"; Su, "saving-born"
// sparse attention), SPEC section 2. Each query attends to an index set A_i; the cost is O(sum_i |A_i| d), never n x m.
//
// How it runs on the core's tile loop. A pattern is a union of terms of two kinds:
//  - direct terms (local band, fixed's segment, block layout) are intervals or tiles in the original key order: one
//    fused call walks, per query tile, only the key spans those terms touch; tiles are empty, full or partial, and
//    only partial tiles evaluate the per-element rule (a lone band is a sliding window: the dense mask model runs it);
//  - gathered terms (atrous residue classes, fixed's summary columns) are strided: their keys (and, for atrous, their
//    queries) are viewed as dense sub-problems through strided views, so the inner loop stays the dense micro-kernel
//    and nothing is copied. A gathered call masks out the keys an earlier term already counted.
// Each call after the first folds its keys into the rows the earlier calls wrote, through their log-sum-exps: one
// softmax over the union, each key once.
#pragma once

#include <algorithm>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "core/mask.hpp"
#include "core/options.hpp"
#include "core/tiling.hpp"
#include "core/types.hpp"
#include "core/view.hpp"
#include "reference.hpp"
#include "sdpa.hpp"

namespace attnkit {
namespace detail {

inline Index floor_div(Index a, Index b) { return a / b - ((a % b != 0) && ((a < 0) != (b < 0)) ? 1 : 0); }
inline Index floor_mod(Index a, Index b) { return a - floor_div(a, b) * b; }

/// How much of a contiguous key range [j0, j1) a term allows for one query row.
enum class Cover { kNone, kSome, kAll };

inline Cover cover_of(KeyRange allowed, Index j0, Index j1) {
  if (allowed.empty() || allowed.end <= j0 || allowed.begin >= j1) return Cover::kNone;
  return allowed.begin <= j0 && allowed.end >= j1 ? Cover::kAll : Cover::kSome;
}

inline Cover cover_union(Cover a, Cover b) {
  if (a == Cover::kAll || b == Cover::kAll) return Cover::kAll;
  return a == Cover::kSome || b == Cover::kSome ? Cover::kSome : Cover::kNone;
}

/// A block layout with, per query block, the runs of consecutive allowed key blocks (in key-block units).
struct BlockLayout {
  Index rows = 0, cols = 0, size = 1;
  std::vector<unsigned char> allowed;  // rows x cols
  std::vector<Index> run_offsets;      // rows + 1
  std::vector<KeyRange> runs;

  bool at(Index qb, Index kb) const { return allowed[size_t(qb * cols + kb)] != 0; }
};

/// An index map s -> first + (s / group) * stride + s % group: which original row a row of a gathered view is.
struct IndexMap {
  Index first = 0, group = 1, stride = 1;

  Index operator()(Index s) const { return group == 1 ? first + s * stride : first + (s / group) * stride + s % group; }
  /// Number of s >= 0 with map(s) < x.
  Index count_below(Index x) const {
    if (x <= first) return 0;
    const Index u = x - first, full = u / stride;
    return full * group + std::min(u - full * stride, group);
  }
};

}  // namespace detail

/// \brief Which keys each query attends to (SPEC section 2). Build one with the factories and combine with `|`.
///
/// Positions are aligned like the other masks: query i sits at a = i + m - n (CausalAlign::kBottomRight, the default)
/// or a = i (kTopLeft). Sets, for query position a and key j:
///  - local(w): |a - j| <= w
///  - atrous(k, window): (a - j) mod k == 0, and |a - j| <= window unless window is -1
///  - local_atrous(k): |a - j| <= k, union (a - j) mod k == 0 (Su's combination; one softmax, no duplicate keys)
///  - strided(l): max(0, a - l) <= j <= a, union j <= a with (a - j) mod l == 0. This set is causal by definition
///    (SPEC), so options.causal changes nothing; it equals local_atrous(l) with causal attention.
///  - fixed(l, c): floor(j / l) == floor(a / l), union j mod l >= l - c
///  - block(layout, b): layout(i / b, j / b) on raw indices; layout is ceil(n / b) x ceil(m / b) (checked per call)
/// AttentionOptions then intersect: causal keeps j <= a, the window and key padding apply as in dense attention.
class SparsePattern {
 public:
  enum class Kind { kBand, kResidue, kSegment, kColumns, kBlocks };
  /// One term of the union. Band: a - left <= j <= a + right. Residue: (a - j) mod rate == 0 and, where left / right
  /// are >= 0, a - left <= j <= a + right. Segment: floor(j / rate) == floor(a / rate) and j mod rate < rate - count
  /// (count is 0 from the factories; see SparseProblem). Columns: j mod rate >= rate - count. Blocks: layout.
  struct Term {
    Kind kind;
    Index rate = 1, left = -1, right = -1, count = 0;
    std::shared_ptr<const detail::BlockLayout> layout;

    /// Direct terms run in the original key order; gathered ones (residue, columns) through strided views.
    bool gathered() const { return kind == Kind::kResidue || kind == Kind::kColumns; }
  };

  /// The empty pattern (no key for any query); combine with `|`. sparse_attention rejects it.
  SparsePattern() = default;

  static SparsePattern local(Index w) {
    if (w < 0) detail::fail("SparsePattern::local", "w must be >= 0, got ", w);
    return SparsePattern(term(Kind::kBand, 1, w, w));
  }
  static SparsePattern atrous(Index k, Index window = -1) {
    if (k < 1) detail::fail("SparsePattern::atrous", "k (the dilation rate) must be >= 1, got ", k);
    if (window < -1) detail::fail("SparsePattern::atrous", "window must be >= 0, or -1 for unbounded, got ", window);
    return SparsePattern(term(Kind::kResidue, k, window, window));
  }
  static SparsePattern local_atrous(Index k) {
    if (k < 1) detail::fail("SparsePattern::local_atrous", "k must be >= 1, got ", k);
    return SparsePattern(term(Kind::kBand, 1, k, k)) | SparsePattern(term(Kind::kResidue, k, -1, -1));
  }
  static SparsePattern strided(Index l) {
    if (l < 1) detail::fail("SparsePattern::strided", "l (the stride) must be >= 1, got ", l);
    return SparsePattern(term(Kind::kBand, 1, l, 0)) | SparsePattern(term(Kind::kResidue, l, -1, 0));
  }
  static SparsePattern fixed(Index l, Index c) {
    if (l < 1) detail::fail("SparsePattern::fixed", "l (the block length) must be >= 1, got ", l);
    if (c < 0 || c > l)
      detail::fail("SparsePattern::fixed", "c (summary columns per block) must be in [0, l = ", l, "], got ", c);
    SparsePattern p(term(Kind::kSegment, l));
    if (c > 0) p |= SparsePattern(term(Kind::kColumns, l, -1, -1, c));
    return p;
  }
  /// `layout` is any boolean (or 0/1 numeric) Eigen matrix over (query block, key block) tiles of block_size rows.
  template <class Derived>
  static SparsePattern block(const Eigen::MatrixBase<Derived>& layout, Index block_size) {
    if (block_size < 1) detail::fail("SparsePattern::block", "block_size must be >= 1, got ", block_size);
    auto b = std::make_shared<detail::BlockLayout>();
    b->rows = layout.rows();
    b->cols = layout.cols();
    b->size = block_size;
    b->allowed.resize(size_t(b->rows * b->cols));
    b->run_offsets.push_back(0);
    for (Index qb = 0; qb < b->rows; ++qb) {
      for (Index kb = 0; kb < b->cols; ++kb) {
        const bool on = layout(qb, kb) != typename Derived::Scalar(0);
        b->allowed[size_t(qb * b->cols + kb)] = on;
        if (!on) continue;
        if (Index(b->runs.size()) > b->run_offsets.back() && b->runs.back().end == kb)
          ++b->runs.back().end;
        else
          b->runs.push_back({kb, kb + 1});
      }
      b->run_offsets.push_back(Index(b->runs.size()));
    }
    Term t = term(Kind::kBlocks, block_size);
    t.layout = std::move(b);
    return SparsePattern(std::move(t));
  }

  /// The union: each query attends to the keys of either pattern, once.
  SparsePattern& operator|=(const SparsePattern& other) {
    terms_.insert(terms_.end(), other.terms_.begin(), other.terms_.end());
    return *this;
  }
  friend SparsePattern operator|(SparsePattern a, const SparsePattern& b) { return a |= b; }

  const std::vector<Term>& terms() const { return terms_; }
  bool empty() const { return terms_.empty(); }

  /// Whether query i may attend to key j in an n x m problem with these options (mask included). O(terms).
  bool allows(Index i, Index j, Index n, Index m, const AttentionOptions& o = {}) const {
    check_problem("SparsePattern::allows", n, m, o);
    if (i < 0 || i >= n || j < 0 || j >= m)
      detail::fail("SparsePattern::allows", "(i, j) = (", i, ", ", j, ") is outside the ", detail::shape_str(n, m),
                   " problem");
    return allows(detail::MaskModel<double>(n, m, o, {}), i, j);
  }

  /// A_i, ascending: the keys query i attends to. O(m); meant for tests, examples and inspection.
  std::vector<Index> keys(Index i, Index n, Index m, const AttentionOptions& o = {}) const {
    check_problem("SparsePattern::keys", n, m, o);
    if (i < 0 || i >= n) detail::fail("SparsePattern::keys", "query ", i, " is outside [0, n) with n = ", n);
    const detail::MaskModel<double> base(n, m, o, {});
    std::vector<Index> out;
    for (Index j = 0; j < m; ++j)
      if (allows(base, i, j)) out.push_back(j);
    return out;
  }

  /// The n x m boolean mask of the pattern (true = allowed). O(n m): for references and pictures, not for kernels.
  BoolMatrix mask(Index n, Index m, const AttentionOptions& o = {}) const {
    check_problem("SparsePattern::mask", n, m, o);
    const detail::MaskModel<double> base(n, m, o, {});
    BoolMatrix b(n, m);
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < m; ++j) b(i, j) = allows(base, i, j);
    return b;
  }

  /// Whether term t holds (i, j), query i at position a; the mask's ranges are applied elsewhere.
  static bool contains(const Term& t, Index a, Index i, Index j) {
    using detail::floor_div;
    switch (t.kind) {
      case Kind::kBand:
        return j >= a - t.left && j <= a + t.right;
      case Kind::kResidue:
        return detail::floor_mod(a - j, t.rate) == 0 && (t.left < 0 || j >= a - t.left) &&
               (t.right < 0 || j <= a + t.right);
      case Kind::kSegment:
        return floor_div(j, t.rate) == floor_div(a, t.rate) && detail::floor_mod(j, t.rate) < t.rate - t.count;
      case Kind::kColumns:
        return j % t.rate >= t.rate - t.count;
      case Kind::kBlocks:
        return i / t.rate < t.layout->rows && j / t.rate < t.layout->cols && t.layout->at(i / t.rate, j / t.rate);
    }
    return false;
  }

 private:
  explicit SparsePattern(Term t) { terms_.push_back(std::move(t)); }
  static void check_problem(const char* where, Index n, Index m, const AttentionOptions& o) {
    if (n < 0 || m < 0) detail::fail(where, "n and m must be >= 0, got n = ", n, ", m = ", m);
    detail::validate_options(where, o, m);
  }
  /// Widths beyond any sequence mean "unbounded"; they are capped so that position +- width cannot overflow.
  bool allows(const detail::MaskModel<double>& base, Index i, Index j) const {
    const detail::KeyRange r = base.row_range(i);
    if (j < r.begin || j >= r.end) return false;
    for (const Term& t : terms_)
      if (contains(t, base.position(i), i, j)) return true;
    return false;
  }

  static Term term(Kind kind, Index rate, Index left = -1, Index right = -1, Index count = 0) {
    constexpr Index kWidest = Index(1) << 48;
    Term t{kind,   std::min(rate, kWidest), std::min(left, kWidest), std::min(right, kWidest), std::min(count, kWidest),
           nullptr};
    return t;
  }
  std::vector<Term> terms_;
};

namespace detail {

/// Everything one sparse_attention call shares between its fused sub-calls: the pattern's terms split into direct
/// and gathered, the options' mask model (causal, window, padding, ALiBi, softcap) and optional per-row log-n scales.
template <class S>
struct SparseProblem {
  using Term = SparsePattern::Term;
  using Kind = SparsePattern::Kind;

  SparseProblem(const char* where, const SparsePattern& p, Index n, Index m, const AttentionOptions& o)
      : n(n), m(m), base(n, m, o, {}) {
    if (p.empty())
      fail(where, "the pattern is empty (no key for any query); build it with the SparsePattern factories");
    for (const Term& t : p.terms()) {
      if (t.kind == Kind::kBlocks) {
        const Index rows = (n + t.rate - 1) / t.rate, cols = (m + t.rate - 1) / t.rate;
        if (t.layout->rows != rows || t.layout->cols != cols)
          fail(where, "the block layout is ", shape_str(t.layout->rows, t.layout->cols), " but with block_size ",
               t.rate, ", q of ", n, " rows and k of ", m,
               " rows it must be ceil(n/b) x ceil(m/b) = ", shape_str(rows, cols));
      }
      (t.gathered() ? gathered : direct).push_back(t);
    }
    // A segment's last keys that summary columns of its length also hold (fixed(l, c): the c columns closing each
    // segment) are left to the columns' call: the union is the same, but the segment's call then walks l - c keys a
    // row and the columns' call masks none of its own (fixed(128, 16) at n = 1024: every tile of both calls full,
    // where the columns' tiles were all partial).
    for (Term& t : direct) {
      if (t.kind != Kind::kSegment) continue;
      for (const Term& c : gathered)
        if (c.kind == Kind::kColumns && c.rate == t.rate && c.count < t.rate) t.count = std::max(t.count, c.count);
    }
    for (const Term& t : direct) ordered.push_back(&t);
    for (const Term& t : gathered) ordered.push_back(&t);
  }

  SparseProblem(const SparseProblem&) = delete;  // `ordered` points into this object's own term lists
  SparseProblem& operator=(const SparseProblem&) = delete;

  /// The smallest interval holding every key of term t for query row i (position a).
  KeyRange term_hull(const Term& t, Index a, Index i) const {
    constexpr Index kMax = std::numeric_limits<Index>::max();
    switch (t.kind) {
      case Kind::kBand:
        return {a - t.left, a + t.right + 1};
      case Kind::kResidue:
        return {t.left < 0 ? 0 : a - t.left, t.right < 0 ? kMax : a + t.right + 1};
      case Kind::kSegment:
        return {floor_div(a, t.rate) * t.rate, floor_div(a, t.rate) * t.rate + t.rate - t.count};
      case Kind::kColumns:
        return KeyRange::all();
      case Kind::kBlocks: {
        const Index qb = i / t.rate, first = t.layout->run_offsets[size_t(qb)],
                    last = t.layout->run_offsets[size_t(qb) + 1];
        if (first == last) return {0, 0};
        return {t.layout->runs[size_t(first)].begin * t.rate, t.layout->runs[size_t(last - 1)].end * t.rate};
      }
    }
    return {0, 0};
  }

  /// How much of the keys [j0, j1) term t allows for query row i (position a).
  Cover term_cover(const Term& t, Index a, Index i, Index j0, Index j1) const {
    switch (t.kind) {
      case Kind::kBand:
      case Kind::kSegment:
        return cover_of(term_hull(t, a, i), j0, j1);
      case Kind::kResidue: {
        const KeyRange r = intersect(term_hull(t, a, i), {j0, j1});
        if (r.empty()) return Cover::kNone;
        if (r.begin + floor_mod(a - r.begin, t.rate) >= r.end) return Cover::kNone;
        return t.rate == 1 ? cover_of(r, j0, j1) : Cover::kSome;
      }
      case Kind::kColumns: {
        if (t.count == t.rate) return Cover::kAll;
        const Index off = j0 % t.rate, first = off >= t.rate - t.count ? j0 : j0 + (t.rate - t.count - off);
        return first < j1 ? Cover::kSome : Cover::kNone;
      }
      case Kind::kBlocks: {
        bool any = false, all = true;
        const Index qb = i / t.rate;
        for (Index kb = j0 / t.rate; kb <= (j1 - 1) / t.rate; ++kb) {
          const bool on = t.layout->at(qb, kb);
          any = any || on;
          all = all && on;
        }
        return !any ? Cover::kNone : all ? Cover::kAll : Cover::kSome;
      }
    }
    return Cover::kSome;
  }

  /// Calls f(j) for every key j of term t for row i (position a) inside `within`, ascending.
  template <class F>
  void for_each_key(const Term& t, Index a, Index i, KeyRange within, F&& f) const {
    const KeyRange r = intersect(term_hull(t, a, i), within);
    if (r.empty()) return;
    switch (t.kind) {
      case Kind::kBand:
      case Kind::kSegment:
        for (Index j = r.begin; j < r.end; ++j) f(j);
        return;
      case Kind::kResidue:
        for (Index j = r.begin + floor_mod(a - r.begin, t.rate); j < r.end; j += t.rate) f(j);
        return;
      case Kind::kColumns: {
        const IndexMap map{t.rate - t.count, t.count, t.rate};
        for (Index s = map.count_below(r.begin), e = map.count_below(r.end); s < e; ++s) f(map(s));
        return;
      }
      case Kind::kBlocks: {
        const Index qb = i / t.rate;
        for (Index u = t.layout->run_offsets[size_t(qb)]; u < t.layout->run_offsets[size_t(qb) + 1]; ++u) {
          const KeyRange run =
              intersect({t.layout->runs[size_t(u)].begin * t.rate, t.layout->runs[size_t(u)].end * t.rate}, r);
          for (Index j = run.begin; j < run.end; ++j) f(j);
        }
        return;
      }
    }
  }

  /// |A_i| exactly: each term's keys inside the row's mask range, not counted by an earlier term. O(sum of the terms'
  /// sizes), for log-n scaling.
  /// Whether some term continues rows another wrote (it reads their log-sum-exps): a gathered term after a direct one
  /// or after another gathered term.
  bool continues_rows() const { return gathered.size() > 1 || (!gathered.empty() && !direct.empty()); }

  Index allowed_count(Index i) const {
    const Index a = base.position(i);
    const KeyRange range = base.row_range(i);
    Index count = 0;
    const std::vector<const Term*>& all = ordered;
    for (size_t t = 0; t < all.size(); ++t)
      for_each_key(*all[t], a, i, range, [&](Index j) {
        for (size_t u = 0; u < t; ++u)
          if (SparsePattern::contains(*all[u], a, i, j)) return;
        ++count;
      });
    return count;
  }

  Index n, m;
  MaskModel<S> base;
  std::vector<Term> direct, gathered;
  std::vector<const Term*> ordered;  // direct terms, then gathered ones: the order in which calls exclude keys
  const S* row_scales = nullptr;     // n entries with log-n scaling, else null
};

/// The mask of one fused sub-call of sparse attention, in the sub-call's own row and key indices: query row s is
/// original row qmap(s) and key t is original key kmap(t). `term` is -1 for the direct call, else the index of its
/// gathered term: that call keeps the keys no direct term and no earlier gathered term holds.
template <class S>
class SparseMask {
 public:
  SparseMask(const SparseProblem<S>* p, Index term, IndexMap qmap, IndexMap kmap)
      : p_(p), term_(term), qmap_(qmap), kmap_(kmap), runs_only_(term == 0) {
    for (const auto& t : p->direct)
      runs_only_ = runs_only_ && (t.kind == SparsePattern::Kind::kBand || t.kind == SparsePattern::Kind::kSegment);
  }

  KeyRange row_range(Index s) const {
    const Index i = qmap_(s), a = p_->base.position(i);
    KeyRange hull = {0, 0};
    if (term_ < 0) {
      for (const auto& t : p_->direct) {
        const KeyRange h = p_->term_hull(t, a, i);
        if (h.empty()) continue;
        hull = hull.empty() ? h : KeyRange{std::min(hull.begin, h.begin), std::max(hull.end, h.end)};
      }
    } else {
      hull = p_->term_hull(p_->gathered[size_t(term_)], a, i);
    }
    return call_keys(intersect(p_->base.row_range(i), hull));
  }

  const IndexMap& query_map() const { return qmap_; }

  S row_scale(Index s, S scale) const { return p_->row_scales ? p_->row_scales[qmap_(s)] : scale; }

  /// Direct call: the union of the spans each direct term touches for rows [s0, s0 + rows), so keys between blocks or
  /// between a segment and a band are never visited. Gathered calls walk the hull.
  void key_spans(Index s0, Index rows, KeyRange hull, std::vector<KeyRange>& spans) const {
    spans.clear();
    if (term_ >= 0) {
      spans.push_back(hull);
      return;
    }
    const Index i0 = qmap_(s0), i1 = qmap_(s0 + rows - 1);
    const Index a0 = p_->base.position(i0), a1 = p_->base.position(i1);
    for (const auto& t : p_->direct) {
      if (t.kind == SparsePattern::Kind::kBlocks) {
        for (Index qb = i0 / t.rate; qb <= i1 / t.rate; ++qb)
          for (Index u = t.layout->run_offsets[size_t(qb)]; u < t.layout->run_offsets[size_t(qb) + 1]; ++u)
            spans.push_back({t.layout->runs[size_t(u)].begin * t.rate, t.layout->runs[size_t(u)].end * t.rate});
      } else {
        const KeyRange first = p_->term_hull(t, a0, i0), last = p_->term_hull(t, a1, i1);
        spans.push_back({first.begin, last.end});
      }
    }
    std::sort(spans.begin(), spans.end(), [](KeyRange x, KeyRange y) { return x.begin < y.begin; });
    size_t kept = 0;
    for (const KeyRange r : spans) {
      const KeyRange c = intersect(r, hull);
      if (c.empty()) continue;
      if (kept > 0 && c.begin <= spans[kept - 1].end)
        spans[kept - 1].end = std::max(spans[kept - 1].end, c.end);
      else
        spans[kept++] = c;
    }
    spans.resize(kept);
  }

  TileKind classify(Index s0, const KeyRange* ranges, Index rows, Index t0, Index count) const {
    bool any = false, all = true;
    Index seen = -1;  // the last row whose pattern cover was computed; rows with its key set reuse it
    Cover seen_cover = Cover::kNone;
    for (Index r = 0; r < rows; ++r) {
      const Cover range = cover_of(ranges[r], t0, t0 + count);
      if (range == Cover::kNone) {
        all = false;
        continue;
      }
      const Index i = qmap_(s0 + r);
      if (seen < 0 || !same_pattern_keys(seen, i)) seen = i, seen_cover = pattern_cover(i, t0, t0 + count);
      const Cover pattern = seen_cover;
      if (pattern == Cover::kNone) {
        all = false;
        continue;
      }
      any = true;
      all = all && range == Cover::kAll && pattern == Cover::kAll;
    }
    if (!any) return TileKind::kEmpty;
    return all ? TileKind::kFull : TileKind::kPartial;
  }

  bool modifies_scores() const { return p_->base.modifies_scores(); }

  void modify_row(Index s, Index t0, S* row, Index count) const {
    p_->base.modify_row(qmap_(s), row, count, [&](Index c) { return kmap_(t0 + c); });
  }

  void mask_row(Index s, Index t0, S* row, Index count, KeyRange range) const {
    constexpr S kNegInf = -std::numeric_limits<S>::infinity();
    const Index lo = std::clamp<Index>(range.begin - t0, 0, count);
    const Index hi = std::clamp<Index>(range.end - t0, lo, count);
    std::fill(row, row + lo, kNegInf);
    std::fill(row + hi, row + count, kNegInf);
    if (lo >= hi) return;
    const Index i = qmap_(s), a = p_->base.position(i);
    if (!runs_only_) {  // (the runs below are the whole story otherwise: no need to classify the row first)
      const Cover cover = pattern_cover(i, t0 + lo, t0 + hi);
      if (cover == Cover::kAll) return;  // e.g. a band: the row's range is the whole story
      if (cover == Cover::kNone) return std::fill(row + lo, row + hi, kNegInf);
    }
    bool elementwise = term_ < 0 || term_ > 0;
    if (term_ >= 0) {
      // A gathered call excludes the keys of interval-shaped direct terms (band, segment): one run per term.
      for (const auto& t : p_->direct) {
        if (t.kind != SparsePattern::Kind::kBand && t.kind != SparsePattern::Kind::kSegment) {
          elementwise = true;
          continue;
        }
        const KeyRange h = call_keys(p_->term_hull(t, a, i));
        const Index x0 = std::clamp<Index>(h.begin - t0, lo, hi), x1 = std::clamp<Index>(h.end - t0, x0, hi);
        std::fill(row + x0, row + x1, kNegInf);
      }
    }
    if (!elementwise) return;
    for (Index c = lo; c < hi; ++c)
      if (row[c] != kNegInf && !keeps(a, i, kmap_(t0 + c))) row[c] = kNegInf;
  }

 private:
  /// The call's keys t whose original key kmap(t) lies in the interval h of original keys.
  KeyRange call_keys(KeyRange h) const { return {kmap_.count_below(h.begin), kmap_.count_below(h.end)}; }

  /// Whether this call counts key j for row i (inside the row's range).
  bool keeps(Index a, Index i, Index j) const {
    bool earlier = false;
    for (const auto& t : p_->direct) earlier = earlier || SparsePattern::contains(t, a, i, j);
    if (term_ < 0) return earlier;
    for (Index g = 0; g < term_; ++g) earlier = earlier || SparsePattern::contains(p_->gathered[size_t(g)], a, i, j);
    return !earlier;
  }

  /// Whether the terms pattern_cover reads give rows i and i2 the same keys: a block layout's rows in one block row,
  /// a segment's rows, and summary columns for every row. Bands and windowed residue classes move with the row; an
  /// unwindowed residue class matches only every rate-th row, so it is not worth testing. Lets classify compute one
  /// cover per block row (a block pattern's query tiles are whole block rows) instead of one per row.
  bool same_pattern_keys(Index i, Index i2) const {
    const auto same = [&](const SparsePattern::Term& t) {
      switch (t.kind) {
        case SparsePattern::Kind::kBlocks:
          return i / t.rate == i2 / t.rate;
        case SparsePattern::Kind::kSegment:
          return floor_div(p_->base.position(i), t.rate) == floor_div(p_->base.position(i2), t.rate);
        case SparsePattern::Kind::kColumns:
          return true;
        default:
          return false;
      }
    };
    for (const auto& t : p_->direct)
      if (!same(t)) return false;
    for (Index g = 0; g < term_; ++g)
      if (!same(p_->gathered[size_t(g)])) return false;
    return true;
  }

  /// What the pattern keeps of the call's keys [t0, t1) (original keys kmap(t0) .. kmap(t1 - 1)) for row i: for the
  /// direct call, the union of the direct terms; for a gathered call, the complement of what earlier terms hold (its
  /// own keys are the view's keys). An interval term (band, segment) is judged by the call's own keys inside it, so a
  /// segment that lies between a gathered call's keys (fixed's columns) leaves its tiles full.
  Cover pattern_cover(Index i, Index t0, Index t1) const {
    const Index a = p_->base.position(i), j0 = kmap_(t0), j1 = kmap_(t1 - 1) + 1;
    Cover earlier = Cover::kNone;
    for (const auto& t : p_->direct) {
      if (earlier == Cover::kAll) break;
      if (t.kind == SparsePattern::Kind::kBand || t.kind == SparsePattern::Kind::kSegment) {
        earlier = cover_union(earlier, cover_of(call_keys(p_->term_hull(t, a, i)), t0, t1));
      } else {
        earlier = cover_union(earlier, p_->term_cover(t, a, i, j0, j1));
      }
    }
    if (term_ < 0) return earlier;
    for (Index g = 0; g < term_ && earlier != Cover::kAll; ++g)
      earlier = cover_union(earlier, p_->term_cover(p_->gathered[size_t(g)], a, i, j0, j1));
    return earlier == Cover::kAll ? Cover::kNone : earlier == Cover::kNone ? Cover::kAll : Cover::kSome;
  }

  const SparseProblem<S>* p_;
  Index term_;
  IndexMap qmap_, kmap_;
  bool runs_only_;  // the first gathered call after interval-shaped direct terms only: it masks their runs, no more
};

/// Query rows of one gathered call at most: a long residue class (or fixed's summary columns over every query) is cut
/// into calls that threads can share.
constexpr Index kSparseRows = 4096;

/// A view of rows map(0), map(1), ... (count of them) of x, without copying.
template <class S>
StridedView<S> gather_rows(const StridedView<S>& x, const IndexMap& map, Index count) {
  StridedView<S> g = x;
  g.rows = count;
  if (count == 0) return g;
  g.data = x.row(map.first);
  if (map.group == 1) {
    g.row_stride = x.row_stride * map.stride;
  } else {
    g.group_rows = map.group;
    g.group_stride = x.row_stride * map.stride;
  }
  return g;
}

/// The calls of gathered term g: per atrous residue class (or once, for summary columns), the queries in blocks of
/// at most kSparseRows rows. Calls of one term touch disjoint query rows. A residue term's calls can be limited to
/// the classes [first_class, end_class).
template <class S>
std::vector<AttentionCall<S, SparseMask<S>>> gathered_calls(const SparseProblem<S>& p, Index g, const StridedView<S>& q,
                                                            const StridedView<S>& k, const StridedView<S>& v,
                                                            Index offset, S scale, Index first_class = 0,
                                                            Index end_class = std::numeric_limits<Index>::max()) {
  const SparsePattern::Term& t = p.gathered[size_t(g)];
  std::vector<AttentionCall<S, SparseMask<S>>> calls;
  const auto add = [&](IndexMap queries, Index query_count, IndexMap keys) {
    const Index key_count = keys.count_below(p.m);
    for (Index s0 = 0; s0 < query_count; s0 += kSparseRows) {
      const IndexMap block{queries.first + s0 * queries.stride, 1, queries.stride};
      calls.push_back({gather_rows(q, block, std::min(kSparseRows, query_count - s0)), gather_rows(k, keys, key_count),
                       gather_rows(v, keys, key_count), SparseMask<S>(&p, g, block, keys), scale,
                       AttentionOutput<S>{nullptr, 0, nullptr}});
    }
  };
  if (t.kind == SparsePattern::Kind::kColumns) {
    add(IndexMap{}, p.n, IndexMap{t.rate - t.count, t.count, t.rate});
  } else {  // residue class c: keys c, c + k, ..., and the queries at positions a = c (mod k)
    for (Index c = first_class; c < std::min({t.rate, p.m, end_class}); ++c) {
      const IndexMap queries{floor_mod(c - offset, t.rate), 1, t.rate};
      add(queries, queries.count_below(p.n), IndexMap{c, 1, t.rate});
    }
  }
  return calls;
}

/// Residue lanes, the fast path of an atrous term with short classes. Query position a and key j of residue class c
/// sit at a = c + A k and j = c + B k, so a - j = (A - B) k: whether the pair is kept (the term's window, the keys of
/// earlier terms when those are bands or residue classes, causal, the options' window) and its ALiBi bias depend on
/// A - B alone, the same in every class. Classes c0 .. c0 + P - 1 then run side by side, one per lane of a packet:
/// their queries and keys at one position are P consecutive rows, transposed in registers into lanes (pack_lanes), so
/// the logits of P classes are one lane-batched product (lane_product) and their softmax is lane by lane
/// (softmax_lanes), whatever the classes' length. Class by class, atrous(128) at n = 1024 was 128 calls of 8 queries
/// and 8 keys, each a padded tile with its own bookkeeping. The weights then multiply the values row by row
/// (weighted_rows), as the tile loop's P V does, so values and outputs are never transposed. Only the ends of the
/// sequence and key padding (key_length) differ between lanes: rows past them are not packed (zero lanes), such keys'
/// logits are -inf, and their values are not read.
///
/// All of a class's keys make one chunk (at most kKeys of them), so each query's softmax is taken once over all of
/// them, with no rescaling. Longer classes gain nothing: an earlier version that took them in chunks, with an online
/// softmax, ran atrous(128) at n = 8192 (64 keys a class) in 1.00x the general calls' time and at 16384 in 1.2x,
/// packing 16 rows every k from beyond the caches costing more than the tile loop's strided reads.
template <class S>
class ResidueLanes {
 public:
  static constexpr Index kP = KernelShape<S>::kPacket;
  static constexpr Index kQueries = 128;                // positions A of one query block (packed together)
  static constexpr Index kKeys = 64;                    // positions B of a class at most
  static constexpr Index kGroup = LaneShape<S>::kRows;  // query positions whose logits are computed together

  struct Workspace {
    Vector<S> qt, kt, logits, stats, values;
    std::vector<char> keeps;
    std::vector<Index> kept_below;
    std::vector<S> bias;
  };

  /// Whether gathered term g of p runs this way with these options: a residue class of at most kKeys keys and at
  /// least P rows' stride, every earlier term a band or a residue class, no softcap, and vector packets.
  static bool applies(const SparseProblem<S>& p, Index g, const AttentionOptions& o) {
    if constexpr (kP == 1) {
      return false;
    } else {
      const SparsePattern::Term& t = p.gathered[size_t(g)];
      if (t.kind != SparsePattern::Kind::kResidue || t.rate < kP || (p.m + t.rate - 1) / t.rate > kKeys ||
          o.softcap > 0)
        return false;
      const auto uniform = [](const SparsePattern::Term& u) {
        return u.kind == SparsePattern::Kind::kBand || u.kind == SparsePattern::Kind::kResidue;
      };
      return std::all_of(p.direct.begin(), p.direct.end(), uniform) &&
             std::all_of(p.gathered.begin(), p.gathered.begin() + g, uniform);
    }
  }

  /// ... and over these views: rows of q, k and v contiguous.
  static bool applies(const SparseProblem<S>& p, Index g, const AttentionOptions& o, const StridedView<S>& q,
                      const StridedView<S>& k, const StridedView<S>& v) {
    for (const StridedView<S>* x : {&q, &k, &v})
      if (!x->row_contiguous() || x->group_rows > 0) return false;
    return applies(p, g, o);
  }

  /// Whether a lane's value rows, k rows of row_stride scalars apart, are copied next to each other for queries
  /// enough to read them several times (run): rows a multiple of 1 KiB apart fall in a few sets of the L1 cache (4
  /// for k = 128 and d = 64), which cannot hold them from one group of queries to the next. atrous(128), one thread,
  /// paired: 0.95-0.97x the time at n = 2048 and 4096, 0.93x at 8192. Since lane_block and weighted_rows keep their
  /// packets in registers, a lane of 16 queries (n = 2048) no longer repays the copy (1.04x the time copied): run
  /// copies for more than 7 groups of queries (n = 4096: 32 queries, as fast either way; 8192: copied).
  static bool copies_values(Index k, Index row_stride) { return rows_alias_in_l1(k * row_stride * Index(sizeof(S))); }

  /// Heap bytes of one worker's Workspace for an n x m problem at rate k.
  static Index workspace_bytes(Index n, Index m, Index dk, Index dv, Index k) {
    const Index queries = std::min(kQueries, n / k + 2), keys = std::min(kKeys, m / k + 2), table = n / k + m / k + 4;
    // Each buffer as large as the lanes or run_classes (P classes' q^T and logits, a table P longer) grow it.
    return heap_bytes<S>(std::max(queries * (dk + 1), kP * dk) * kP) + heap_bytes<S>(keys * (dk + 1) * kP) +
           heap_bytes<S>(std::max(queries * (keys + 1), kP * keys) * kP) + heap_bytes<S>(3 * queries * kP) +
           heap_bytes<S>(keys * dv) + heap_bytes<char>(table) + heap_bytes<Index>(table + 1) +
           heap_bytes<S>(std::max(table, keys + kP));
  }

  /// Term g of p over the views (applies() holds); out rows and lse (n entries, may be null) as the gathered calls'.
  ResidueLanes(const SparseProblem<S>& p, Index g, const AttentionOptions& o, const StridedView<S>& q,
               const StridedView<S>& k, const StridedView<S>& v, Index offset, S scale, S* out, Index out_stride,
               S* lse, bool continues, bool keeps_lse)
      : p_(p),
        g_(g),
        o_(o),
        q_(q),
        k_(k),
        v_(v),
        offset_(offset),
        scale_(scale),
        out_(out),
        out_stride_(out_stride),
        lse_(lse),
        continues_(continues),
        keeps_lse_(keeps_lse),
        rate_(p.gathered[size_t(g)].rate),
        key_bound_(o.key_length >= 0 ? std::min(o.key_length, p.m) : p.m) {}

  /// Blocks of P classes: the work items.
  Index blocks() const { return (std::min(rate_, p_.m) + kP - 1) / kP; }

  /// Runs the classes of block b and returns true; or returns false when a query or key row of theirs holds NaN or Inf
  /// (or a value row does, where some pair is masked), and the caller runs their general calls, which keep those from
  /// reaching rows that do not see them. Rows it wrote by then (of earlier query blocks) are ones those calls write
  /// afresh: rows that continue earlier terms' are all checked before the first is written.
  bool run(Index b, Workspace& ws) const {
    using namespace Eigen::internal;
    using Packet = typename KernelShape<S>::Packet;
    constexpr Index P = kP;
    constexpr S kNegInf = -std::numeric_limits<S>::infinity();
    const Index k = rate_, c0 = b * P, lanes = std::min(P, k - c0), dk = q_.cols, dv = v_.cols;
    const Index a_first = -floor_div(c0 + lanes - 1 - offset_, k), a_last = floor_div(offset_ + p_.n - 1 - c0, k);
    const Index key_count = key_bound_ > c0 ? floor_div(key_bound_ - 1 - c0, k) + 1 : 0;
    if (a_last < a_first || (continues_ && key_count == 0)) return true;
    // Lanes [first, last) of the rows c0 + pos k - shift hold rows of [0, bound).
    const auto row_lanes = [&](Index pos, Index shift, Index bound) {
      const Index row0 = c0 + pos * k - shift, first = std::clamp<Index>(-row0, 0, lanes);
      return std::pair<Index, Index>{first, std::clamp<Index>(bound - row0, first, lanes)};
    };
    // Packing finds NaN and Inf before a query block's rows are written. Rows that continue earlier terms' cannot be
    // written twice, so when a later query block could still find one, its queries are checked first.
    if (continues_ && a_last - a_first >= kQueries) {
      for (Index a = a_first; a <= a_last; ++a) {
        const auto [first, last] = row_lanes(a, offset_, p_.n);
        if (first < last && !all_finite(q_.row(c0 + first + a * k - offset_), last - first, dk, q_.row_stride))
          return false;
      }
    }

    // Which differences A - B keep their pair, and their ALiBi bias.
    const Index d0 = a_first - std::max<Index>(key_count - 1, 0);
    ws.keeps.assign(size_t(a_last - d0 + 1), 0);
    ws.bias.assign(ws.keeps.size(), S(0));
    for (Index d = d0; d <= a_last; ++d) {
      ws.keeps[size_t(d - d0)] = keeps(d * k);
      if (o_.alibi_slope > 0)
        ws.bias[size_t(d - d0)] = static_cast<S>(o_.alibi_slope) * static_cast<S>(std::abs(d * k));
    }
    // kept_in(x, y): how many differences in [x, y] keep their pair (prefix counts of keeps).
    ws.kept_below.assign(ws.keeps.size() + 1, 0);
    for (size_t d = 0; d < ws.keeps.size(); ++d) ws.kept_below[d + 1] = ws.kept_below[d] + ws.keeps[d];
    const auto kept_in = [&](Index x, Index y) {
      const Index size = Index(ws.keeps.size());
      return ws.kept_below[size_t(std::clamp<Index>(y - d0 + 1, 0, size))] -
             ws.kept_below[size_t(std::clamp<Index>(x - d0, 0, size))];
    };
    // Keys [0, full_keys) exist in every lane; later ones are past the keys (or key_length) in some lanes.
    const Index full_keys = std::clamp<Index>(-floor_div(c0 + lanes - 1 - key_bound_, k), 0, key_count);

    if (by_class(a_last - a_first + 1)) {
      // ... and most of the classes' (query, key) pairs are kept: class by class computes them all, where the lanes
      // skip a causal triangle's empty half (strided(128) at n = 2048: 1.03x the time class by class).
      Index kept = 0;
      for (Index a = a_first; a <= a_last; ++a) kept += kept_in(a - key_count + 1, a);
      if (4 * kept > 3 * (a_last - a_first + 1) * key_count) {
        return run_classes(c0, lanes, a_first, d0, key_count, ws);
      }
    }

    // Rows of the packed buffers are one packet longer than they need: at d = 64 they would be 4 KiB apart, and the
    // products' ten streams would share one set of the L1 cache (1.4x the time of padded rows).
    const Index ldk = dk + 1, ldl = key_count + 1, query_rows = std::min(kQueries, a_last - a_first + 1);
    grow(ws.qt, query_rows * ldk * P);
    grow(ws.kt, std::max<Index>(key_count, 1) * ldk * P);
    grow(ws.logits, query_rows * ldl * P);
    grow(ws.stats, 3 * query_rows * P);
    grow(ws.values, std::max<Index>(key_count, 1) * dv);
    S *qt = ws.qt.data(), *kt = ws.kt.data(), *logits = ws.logits.data();
    S *lse = ws.stats.data(), *earlier = lse + query_rows * P, *inverse = earlier + query_rows * P;
    // Per lane: its keys (those before key_length), and its positions [a_lo, a_hi] that are query rows.
    Index lane_keys[P], a_lo[P], a_hi[P];
    for (Index l = 0; l < P; ++l) {
      lane_keys[l] = l < lanes ? std::clamp<Index>(floor_div(key_bound_ - 1 - c0 - l, k) + 1, 0, key_count) : 0;
      a_lo[l] = -floor_div(c0 + l - offset_, k);
      a_hi[l] = floor_div(p_.n - 1 + offset_ - c0 - l, k);
    }
    const S* rows[P];
    const Packet one = pset1<Packet>(S(1)), none = pset1<Packet>(kNegInf);

    // Keys packed. Every weight multiplies its value row (weighted_rows), so where some pair is masked (weight 0) the
    // values are checked too: a NaN or Inf value would reach rows for which its key is masked.
    const bool masked = ws.kept_below.back() < Index(ws.keeps.size());
    bool finite = true;
    for (Index j = 0; j < key_count; ++j) {
      const Index last = row_lanes(j, 0, key_bound_).second;
      for (Index l = 0; l < P; ++l) rows[l] = l < last ? k_.row(c0 + l + j * k) : nullptr;
      finite = pack_lanes<S>(rows, dk, kt + j * ldk * P, P, one) && finite;
      finite = finite && (!masked || all_finite(v_.row(c0 + j * k), last, dv, v_.row_stride));
    }
    if (!finite) return false;

    const bool compact_values = copies_values(k, v_.row_stride);
    Index group_lo[kQueries], group_width[kQueries];  // by a group's first row: the keys [lo, lo + width) it weighs
    for (Index a0 = a_first; a0 <= a_last; a0 += kQueries) {
      const Index block = std::min(kQueries, a_last - a0 + 1);
      for (Index r = 0; r < block; ++r) {  // the block's queries, scaled
        const auto [first, last] = row_lanes(a0 + r, offset_, p_.n);
        S scales[P];
        for (Index l = 0; l < P; ++l) {
          const Index i = c0 + l + (a0 + r) * k - offset_;
          const bool real = l >= first && l < last;
          rows[l] = real ? q_.row(i) : nullptr;
          scales[l] = real && p_.row_scales ? p_.row_scales[i] : scale_;
        }
        const Packet scale = p_.row_scales ? ploadu<Packet>(scales) : pset1<Packet>(scale_);
        finite = pack_lanes<S>(rows, dk, qt + r * ldk * P, P, scale) && finite;
      }
      if (!finite) return false;
      // The block's weights, a group of queries at a time: row r's for keys lo + j at logits + (r ldl + j) P.
      for (Index r0 = 0; r0 < block; r0 += kGroup) {
        const Index group = std::min(kGroup, block - r0), a_group = a0 + r0;
        // The keys [lo, hi) that some query of the group keeps, and whether every query keeps all of them.
        const auto some = [&](Index j) { return kept_in(a_group - j, a_group + group - 1 - j) > 0; };
        Index lo = 0, hi = key_count;
        while (lo < hi && !some(lo)) ++lo;
        while (hi > lo && !some(hi - 1)) --hi;
        const Index width = std::max<Index>(hi - lo, 0);
        group_lo[r0] = lo, group_width[r0] = width;
        bool whole = o_.alibi_slope <= 0 && hi <= full_keys;
        for (Index r = 0; r < group && whole; ++r) whole = kept_in(a_group + r - hi + 1, a_group + r - lo) == width;
        if (width > 0)
          lane_product<S>(qt + r0 * ldk * P, ldk, kt + lo * ldk * P, ldk, dk, logits + r0 * ldl * P, ldl, group, width);
        for (Index r = r0; r < r0 + group; ++r) {
          const Index a = a0 + r;
          S* row = logits + r * ldl * P;
          for (Index j = 0; j < width && !whole; ++j) {
            const Index key = lo + j, d = a - key - d0;
            Packet x = none;
            if (ws.keeps[size_t(d)]) {
              x = psub(ploadu<Packet>(row + j * P), pset1<Packet>(ws.bias[size_t(d)]));
              if (key >= full_keys) x = pselect(tail_lanes<S>(row_lanes(key, 0, key_bound_).second), x, none);
            }
            pstoreu(row + j * P, x);
          }
          // The earlier terms' part of the row, by its log-sum-exp: one more "key", whose value is the row so far.
          const auto [first, last] = row_lanes(a, offset_, p_.n);
          // Not one conditional copy: GCC made that a masked load from lse_, which is null when nothing continues,
          // and a masked load from an unmapped page takes a microcode assist even with every lane masked off (92 ns
          // against 0.8 on Zen 5; atrous(128) at n = 4096 took 1.15x the time).
          pstoreu(lse + r * P, none);
          if (continues_)
            for (Index l = first; l < last; ++l) lse[r * P + l] = lse_[c0 + l + a * k - offset_];
          softmax_lanes(row, width, lse + r * P, earlier + r * P, inverse + r * P, lse_ && keeps_lse_);
          if (lse_ && keeps_lse_)
            for (Index l = first; l < last; ++l) lse_[c0 + l + a * k - offset_] = lse[r * P + l];
        }
      }
      // Output rows, lane by lane (so that a lane's value rows, k rows apart, stay in L1 for all of its queries): the
      // lane's weights times its value rows, plus the row's earlier part.
      for (Index l = 0; l < lanes; ++l) {
        const Index r_first = std::clamp<Index>(a_lo[l] - a0, 0, block);  // the block's rows in this lane
        const Index r_last = std::clamp<Index>(a_hi[l] + 1 - a0, r_first, block);
        if (r_first >= r_last) continue;
        // The lane's value rows that its groups weigh, copied next to each other when they alias in L1
        // (copies_values) and eight or more groups of queries read them.
        const bool copy = compact_values && r_last - r_first > 7 * kGroup;
        Index used_lo = key_count, used_hi = 0;
        for (Index r0 = r_first - r_first % kGroup; copy && r0 < r_last; r0 += kGroup) {
          const Index hi = std::min(group_lo[r0] + group_width[r0], lane_keys[l]);
          if (group_lo[r0] < hi) used_lo = std::min(used_lo, group_lo[r0]), used_hi = std::max(used_hi, hi);
        }
        for (Index j = used_lo; copy && j < used_hi; ++j) {
          const S* src = v_.row(c0 + l + j * k);
          std::copy(src, src + dv, ws.values.data() + j * dv);
        }
        const S* const values = copy ? ws.values.data() : v_.data + (c0 + l) * v_.row_stride;
        const Index ldv = copy ? dv : k * v_.row_stride;
        for (Index r0 = r_first - r_first % kGroup; r0 < r_last; r0 += kGroup) {
          const Index lo = group_lo[r0], width = group_width[r0];
          if (continues_ && width == 0) continue;  // the rows stay as they are
          const Index r1 = std::max(r0, r_first), r2 = std::min(r0 + kGroup, r_last), at = r1 * P + l;
          if (r1 >= r2) continue;
          const Index depth = std::clamp<Index>(lane_keys[l] - lo, 0, width);
          const Index i = c0 + l + (a0 + r1) * k - offset_;
          weighted_rows_of<S, P>(int(r2 - r1), logits + r1 * ldl * P + l, ldl * P, values + lo * ldv, ldv, depth,
                                 out_ + i * out_stride_, k * out_stride_, continues_ ? earlier + at : nullptr,
                                 inverse + at, dv);
        }
      }
    }
    return true;
  }

  /// Whether a block whose classes span this many query positions may run class by class (run_classes): positions
  /// that fill most of a packet (and, checked in run(), pairs most of which are kept). Shorter classes stay in the
  /// lanes. Class by class in half packets, atrous(128) took 1.27x the lanes' time at n = 1024 (8 floats a class) on
  /// Zen 5, whose FMAs do half the work on a half packet; 1.24x in doubles at n = 512, 1.38x in an AVX2 build at 512.
  /// (Zen 4 had measured 0.86-0.88x, against lanes that still lost time to a masked load: see run().)
  static bool by_class(Index positions) { return positions <= kP && 4 * positions > 3 * kP; }

 private:
  /// One class at a time, its queries in the lanes of a packet, for classes of at most P queries (by_class): the
  /// class's q rows transposed into lanes (pack_lanes, one transpose per P columns), its keys broadcast from their own
  /// rows (broadcast_product), the softmax lane by lane down the keys (softmax_lanes), then the output rows a packet
  /// of columns at a time (weighted_lanes). Only q is transposed, where the lanes transpose q and k, and no value row
  /// is copied. atrous(128) at n = 2048 (16 queries and 16 keys a class): 0.86-0.92x the time of the lanes on Zen 4,
  /// 0.84-0.86x on Zen 5 (a standalone prototype without masks and checks, 0.77x). Masks and ALiBi come from one table
  /// over the difference A - B, read as a packet per key; rows of a lane past the class's queries are computed but
  /// never stored. Returns false as run() does, before writing a row.
  bool run_classes(Index c0, Index lanes, Index a_first, Index d0, Index key_count, Workspace& ws) const {
    using namespace Eigen::internal;
    using Packet = typename KernelShape<S>::Packet;
    constexpr Index P = kP;
    constexpr S kNegInf = -std::numeric_limits<S>::infinity();
    const Index k = rate_, dk = q_.cols, dv = v_.cols;
    // Values first, where some pair is masked (a weight of 0 must not meet NaN or Inf), as run() checks them.
    const bool masked = ws.kept_below.back() < Index(ws.keeps.size());
    for (Index j = 0; j < key_count && masked; ++j) {
      const Index row0 = c0 + j * k;
      if (!all_finite(v_.row(row0), std::clamp<Index>(key_bound_ - row0, 0, lanes), dv, v_.row_stride)) return false;
    }
    // Every class's queries packed, then every class's logits checked, before any row is written: a NaN or Inf in a
    // key row makes its logits NaN or Inf in every lane (zero lanes included), one in a query row its lane's (a query
    // with no key meets none, here or in the general calls). Lane x of class l is position a_first + x, query row
    // c0 + l + (a_first + x) k - offset.
    const Index ldq = dk * P, ldl = std::max<Index>(key_count, 1) * P;
    grow(ws.qt, lanes * ldq);
    grow(ws.logits, lanes * ldl);
    grow(ws.stats, 3 * P);
    S *logits = ws.logits.data(), *lse = ws.stats.data(), *earlier = lse + P, *inverse = earlier + P;
    const S* rows[P];
    S scales[P];
    for (Index l = 0; l < lanes; ++l) {
      for (Index x = 0, i = c0 + l + a_first * k - offset_; x < P; ++x, i += k) {
        const bool real = i >= 0 && i < p_.n;
        rows[x] = real ? q_.row(i) : nullptr;
        scales[x] = real && p_.row_scales ? p_.row_scales[i] : scale_;
      }
      pack_lanes<S, false>(rows, dk, ws.qt.data() + l * ldq, P, ploadu<Packet>(scales));
    }
    // Class l's keys: [0, width(l)).
    const auto width_of = [&](Index l) {
      return std::clamp<Index>(floor_div(key_bound_ - 1 - c0 - l, k) + 1, 0, key_count);
    };
    const Packet zero = pset1<Packet>(S(0));
    Packet check = zero;
    for (Index l = 0; l < lanes; ++l) {
      const Index width = width_of(l);
      const S* keys[kKeys];
      for (Index j = 0; j < width; ++j) keys[j] = k_.row(c0 + l + j * k);
      S* at = logits + l * ldl;
      broadcast_product<S>(keys, width, ws.qt.data() + l * ldq, dk, at);
      for (Index j = 0; j < width; ++j) check = por(check, pmul(ploadu<Packet>(at + j * P), zero));
    }
    S bits[P];
    pstoreu(bits, check);
    if (!std::all_of(bits, bits + P, [](S x) { return x == S(0); })) return false;

    // What the logit of a pair A - B = d0 + x gains, at add[x]: minus its ALiBi bias when kept, -inf when masked
    // (and past the table's differences, which only lanes past a class's queries read).
    std::vector<S>& add = ws.bias;
    add.resize(size_t(key_count + P), kNegInf);
    for (size_t x = 0; x < ws.keeps.size(); ++x) add[x] = ws.keeps[x] ? -add[x] : kNegInf;
    const bool plain = o_.alibi_slope <= 0 && !masked;
    for (Index l = 0; l < lanes; ++l) {
      const Index c = c0 + l, width = width_of(l);
      // The class's real query lanes [first, last).
      const Index first = std::clamp<Index>(-floor_div(c + a_first * k - offset_, k), 0, P);
      const Index last = std::clamp<Index>(floor_div(p_.n - 1 + offset_ - c, k) - a_first + 1, first, P);
      if (first == last || (continues_ && width == 0)) continue;
      S* at = logits + l * ldl;
      if (!plain)
        for (Index j = 0; j < width; ++j)  // lane x: A - B = a_first + x - j
          pstoreu(at + j * P, padd(ploadu<Packet>(at + j * P), ploadu<Packet>(add.data() + (a_first - j - d0))));
      const Index i0 = c + a_first * k - offset_;  // lane x's row: i0 + x k
      pstoreu(lse, pset1<Packet>(kNegInf));
      if (continues_)
        for (Index x = first; x < last; ++x) lse[x] = lse_[i0 + x * k];
      softmax_lanes<S>(at, width, lse, earlier, inverse, lse_ && keeps_lse_);
      if (lse_ && keeps_lse_)
        for (Index x = first; x < last; ++x) lse_[i0 + x * k] = lse[x];
      // The normaliser into the weights (and the earlier part's weight), once a key rather than once an output packet.
      const Packet norm = ploadu<Packet>(inverse);
      for (Index j = 0; j < width; ++j) pstoreu(at + j * P, pmul(ploadu<Packet>(at + j * P), norm));
      if (continues_) pstoreu(earlier, pmul(ploadu<Packet>(earlier), norm));
      weighted_lanes<S>(at, width, width > 0 ? v_.row(c) : nullptr, k * v_.row_stride, out_ + i0 * out_stride_,
                        k * out_stride_, first, last, continues_ ? earlier : nullptr, dv);
    }
    return true;
  }

 private:
  static void grow(Vector<S>& x, Index size) {
    if (x.size() < size) x.resize(size);
  }

  /// Whether the term keeps key j = a - delta of query position a (both in the same class): its own window, no
  /// earlier term holding it, and the mask model's causal and window rule.
  bool keeps(Index delta) const {
    if (!SparsePattern::contains(p_.gathered[size_t(g_)], delta, 0, 0)) return false;
    for (const auto& t : p_.direct)
      if (SparsePattern::contains(t, delta, 0, 0)) return false;
    for (Index h = 0; h < g_; ++h)
      if (SparsePattern::contains(p_.gathered[size_t(h)], delta, 0, 0)) return false;
    return p_.base.allows_offset(delta);
  }

  const SparseProblem<S>& p_;
  Index g_;
  const AttentionOptions& o_;
  const StridedView<S>&q_, &k_, &v_;
  Index offset_;
  S scale_;
  S* out_;
  Index out_stride_;
  S* lse_;
  bool continues_, keeps_lse_;
  Index rate_, key_bound_;
};

/// Blocks (of a layout, or fixed's segments) of at most this many rows get query and key tiles aligned with them.
constexpr Index kMaxAlignedBlock = 512;

/// Tile shapes for the direct call, unless the caller chose. Block layouts and segments: tiles aligned with the blocks
/// (fixed(128, 16)'s segments at n = 1024: one 128-row tile a segment, full, against 174-row tiles over two or three
/// segments, partial, that packed their keys and masked their rows: 0.87x the time of its segment call). Bands: a
/// key tile that holds a whole query tile's band (query rows + band width), so each query tile is one key tile whose
/// ragged edges the strip limits trim (measured: local(128) at n = 16384 is 10% faster than with 256-key tiles).
template <class S>
AttentionOptions sparse_tile_options(const SparseProblem<S>& p, const AttentionOptions& options) {
  AttentionOptions o = options;
  const Index default_rows = query_tile_rows<S>(p.n, options);
  for (const auto& t : p.direct) {
    // Blocks longer than kMaxAlignedBlock keep the default tiles: a tile of a whole block would hold block^2 scores.
    if ((t.kind == SparsePattern::Kind::kBlocks || t.kind == SparsePattern::Kind::kSegment) &&
        t.rate <= kMaxAlignedBlock && o.query_tile == 0 && o.key_tile == 0) {
      // At most 96 rows: a tile over several block rows of a banded layout is partial almost everywhere (192-row
      // tiles over three 64-row blocks ran 2.2x slower than one block row per tile).
      o.query_tile = t.rate * std::max<Index>(1, std::min<Index>(default_rows, 16 * KernelShape<S>::kRows) / t.rate);
      o.key_tile = t.rate * std::max<Index>(1, 256 / t.rate);
    }
    if (t.kind == SparsePattern::Kind::kBand && options.key_tile == 0) {
      // The band runs as a window, on query tiles of reuse_query_rows (with log-n scaling, on tiles no larger).
      const Index rows = o.query_tile > 0 ? o.query_tile : reuse_query_rows<S>(p.n, options);
      o.key_tile = std::clamp<Index>(rows + t.left + t.right + 1, o.key_tile, 1024);
    }
  }
  return o;
}

/// When the direct terms are a single band and rows are not scaled by their key counts (which count every term's
/// keys): the options with the band folded into their window. Otherwise nothing.
template <class S>
std::optional<AttentionOptions> band_as_window(const SparseProblem<S>& p, const AttentionOptions& o) {
  if (p.direct.size() != 1 || p.direct.front().kind != SparsePattern::Kind::kBand || o.log_n_scale) return {};
  const SparsePattern::Term& band = p.direct.front();
  const auto narrower = [](Index window, Index width) { return window < 0 ? width : std::min(window, width); };
  AttentionOptions w = o;
  w.window_left = narrower(o.window_left, band.left);
  w.window_right = narrower(o.window_right, band.right);
  return w;
}

template <class S>
void sparse_into(const char* where, const StridedView<S>& q, const StridedView<S>& k, const StridedView<S>& v,
                 const SparsePattern& pattern, const AttentionOptions& options, const AttentionOutput<S>& out) {
  using Call = AttentionCall<S, SparseMask<S>>;
  const Index n = q.rows, m = k.rows, dv = v.cols;
  SparseProblem<S> p(where, pattern, n, m, options);
  const S scale = resolve_scale<S>(options, q.cols);
  AttentionOptions o = sparse_tile_options<S>(p, options);

  Vector<S> row_scales;
  if (o.log_n_scale) {
    row_scales.resize(n);
    const double log512 = std::log(512.0);
    for (Index i = 0; i < n; ++i) {
      const Index c = p.allowed_count(i);
      row_scales[i] = c > 0 ? static_cast<S>(scale * std::log(double(c)) / log512) : scale;
    }
    p.row_scales = row_scales.data();
  }

  // The direct terms write out and its log-sum-exps; each gathered term's calls then fold their keys into those rows
  // in place (AttentionOutput::continues), in term order: a gathered call has already excluded the keys of the terms
  // before it, and the rows of one term's calls are disjoint (k apart for a residue class). With no direct term the
  // first gathered term writes its rows afresh. So no partial rows, no separate merge, and no log-sum-exp that no
  // later term or caller reads (atrous(128) at n = 4096: 0.9x the time of partial rows merged afterwards): local
  // and block patterns have none (an n-entry vector and a log per row fewer), the last gathered term only reads it.
  const bool need_lse = out.lse != nullptr || p.continues_rows();
  Vector<S> lse(need_lse ? n : 0);
  // Rows that a later term continues are written through the caches. A lone gathered term's calls (atrous), each
  // small, write rows nothing reads back: past the caches when the whole call is larger than the cache an output can
  // count on (atrous(128) at n = 16384 / 65536: 0.76-0.87 / 0.86-0.93x the time between other calls, 0.89-0.97 /
  // 0.93-1.0x repeating one call; causal alike). Calls that continue rows have just read them: streaming them back out
  // measured no gain (strided(128) 0.96-1.04x).
  AttentionOutput<S> direct_out{out.data, out.stride, need_lse ? lse.data() : nullptr};
  if (!p.gathered.empty()) direct_out.write = OutputWrite::kCached;
  const OutputWrite fresh_write = streams_past_cache<S>(n, m, q.cols, dv) ? OutputWrite::kStreamed : OutputWrite::kAuto;
  if (p.direct.empty()) {
    // A residue term's calls cover every query row when every residue class has a key; summary columns, all rows.
    const bool covered =
        p.gathered.empty() || p.gathered.front().kind == SparsePattern::Kind::kColumns || m >= p.gathered.front().rate;
    if (!covered) {
      for (Index i = 0; i < n; ++i) std::fill(out.row(i), out.row(i) + dv, S(0));
      lse.setConstant(-std::numeric_limits<S>::infinity());
    }
  } else if (const std::optional<AttentionOptions> window = band_as_window(p, o)) {
    // One band and nothing else direct: the band is a sliding window, and the dense kernel's own mask model runs it
    // on the same tiles, without the pattern's per-row bookkeeping (local(128) at n = 16384: 0.93-0.97x the time).
    run_attention<S, MaskModel<S>>({{q, k, v, MaskModel<S>(n, m, *window, {}), scale, direct_out}}, *window);
  } else {
    run_attention<S, SparseMask<S>>({Call{q, k, v, SparseMask<S>(&p, -1, {}, {}), scale, direct_out}}, o);
  }
  const Index offset = alignment_offset(o, n, m);
  for (Index g = 0; g < Index(p.gathered.size()); ++g) {
    const bool continues = g > 0 || !p.direct.empty(), last = g + 1 == Index(p.gathered.size());
    const bool keeps_lse = out.lse != nullptr || !last;  // read by a later term or the caller
    const auto run_call = [&](const Call& call, int threads, CachedWorkspace<S>& workspace) {
      const IndexMap& rows_of = call.mask.query_map();  // rows first, first + stride, ... (never grouped)
      AttentionOutput<S> dst{out.row(rows_of.first), out.stride * rows_of.stride,
                             need_lse ? lse.data() + rows_of.first : nullptr};
      dst.lse_stride = rows_of.stride;
      dst.continues = continues;
      dst.keeps_lse = keeps_lse;
      dst.write = !last ? OutputWrite::kCached : continues ? OutputWrite::kAuto : fresh_write;
      AttentionOptions inner = options;  // the caller's tiles, not the direct call's band / block shapes
      inner.threads = threads;
      // On one thread, one worker's workspace serves all its calls (no fresh pages per call). A few rows over
      // many keys go through run_attention's split-K whatever the thread count, so results never depend on it.
      if (threads == 1 && !use_split_keys<S>(call.q.rows, call.k.rows))
        fused_attention(call.q, call.k, call.v, call.mask, scale, inner, dst, KeyRange::all(), &workspace.get());
      else
        run_attention<S, SparseMask<S>>({Call{call.q, call.k, call.v, call.mask, scale, dst}}, inner);
    };
    if constexpr (ResidueLanes<S>::kP > 1) {  // (scalar packets: no lanes)
      if (ResidueLanes<S>::applies(p, g, options, q, k, v)) {
        using Lanes = ResidueLanes<S>;
        const Lanes lanes(p, g, options, q, k, v, offset, scale, out.data, out.stride, need_lse ? lse.data() : nullptr,
                          continues, keeps_lse);
        struct Scratch {
          CachedScratch<typename Lanes::Workspace> lanes;
          CachedWorkspace<S> calls;
        };
        for_each_item(
            lanes.blocks(), o.threads, [] { return Scratch(); },
            [&](Index b, int threads, Scratch& scratch) {
              if (lanes.run(b, scratch.lanes.get())) return;
              // A row of these classes holds NaN or Inf: their calls, class by class, keep it where it belongs.
              for (const Call& call : gathered_calls(p, g, q, k, v, offset, scale, b * Lanes::kP, (b + 1) * Lanes::kP))
                run_call(call, threads, scratch.calls);
            });
        continue;
      }
    }
    const std::vector<Call> calls = gathered_calls(p, g, q, k, v, offset, scale);
    for_each_item(
        Index(calls.size()), o.threads, [] { return CachedWorkspace<S>(); },
        [&](Index c, int threads, CachedWorkspace<S>& workspace) { run_call(calls[size_t(c)], threads, workspace); });
  }
  if (out.lse)
    for (Index i = 0; i < n; ++i) out.lse[i * out.lse_stride] = lse[i];
}

}  // namespace detail

/// \brief Sparse attention (SPEC section 2): softmax over each query's key set A_i only, equal to dense attention
/// with every pair outside A_i masked.
///
/// \param q n x d_k, \param k m x d_k, \param v m x d_v: any Eigen expression (read in place when possible).
/// \param pattern the key sets; \param options scale, causal (intersects every set with j <= a), window, key
/// padding, ALiBi, softcap, log-n scaling (n_i = |A_i| after the options), threads, tiles.
/// \return n x d_v; a row with no allowed key is zero. Keys no row of a tile may see are never read.
///
/// Cost O(sum_i |A_i| d) time; workspace O(tile) per thread and n log-sum-exps (gathered terms write into the output
/// in place). Never an n x m matrix. The result is the same for any thread count.
/// \throws attnkit::Error on mismatched shapes, invalid options, an empty pattern or a block layout of the wrong shape.
template <class DQ, class DK, class DV>
void sparse_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k, const Eigen::MatrixBase<DV>& v,
                      Eigen::Ref<Matrix<typename DQ::Scalar>> out, const SparsePattern& pattern,
                      const AttentionOptions& options = {}) {
  constexpr const char* kWhere = "sparse_attention";
  detail::check_sdpa_call(kWhere, q, k, v, options);
  detail::check_out_shape(kWhere, out.rows(), out.cols(), q.rows(), v.cols());
  const detail::ViewOf<DQ> qv(q);
  const detail::ViewOf<DK> kv(k);
  const detail::ViewOf<DV> vv(v);
  detail::sparse_into(kWhere, qv.view(), kv.view(), vv.view(), pattern, options,
                      {out.data(), out.outerStride(), nullptr});
}

/// \brief As above, returning the n x d_v output.
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> sparse_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                             const Eigen::MatrixBase<DV>& v, const SparsePattern& pattern,
                                             const AttentionOptions& options = {}) {
  Matrix<typename DQ::Scalar> out(q.rows(), v.cols());
  sparse_attention(q, k, v, out, pattern, options);
  return out;
}

namespace reference {

/// \brief Dense attention with the pattern's n x m boolean mask: the materialising oracle of sparse_attention.
template <class DQ, class DK, class DV>
Matrix<typename DQ::Scalar> sparse_attention(const Eigen::MatrixBase<DQ>& q, const Eigen::MatrixBase<DK>& k,
                                             const Eigen::MatrixBase<DV>& v, const SparsePattern& pattern,
                                             const AttentionOptions& options = {}) {
  if (pattern.empty())
    detail::fail("reference::sparse_attention",
                 "the pattern is empty (no key for any query); build it with the SparsePattern factories");
  return reference::scaled_dot_product_attention(q, k, v, options, pattern.mask(q.rows(), k.rows(), options));
}

}  // namespace reference

/// \brief An upper bound on the heap one sparse_attention call with a caller-provided `out` allocates: per worker
/// thread the fused tile workspace of the pattern's tile shapes (and n row scales with log-n scaling), n log-sum-exps
/// when a term continues another's rows, and, when the pattern has atrous or summary-column terms, the tile workspaces
/// of its gathered calls (with split-K's partial outputs for a few rows over many keys), the list of gathered calls
/// and, for short residue classes, the lanes' packed queries and keys.
/// Independent of n apart from the O(n) vectors; never n x m. \throws attnkit::Error as sparse_attention does for the
/// pattern and options.
template <class S>
Index sparse_attention_workspace_bytes(Index n, Index m, Index d_k, Index d_v, const SparsePattern& pattern,
                                       const AttentionOptions& options = {}) {
  constexpr const char* kWhere = "sparse_attention_workspace_bytes";
  detail::check_sizes(kWhere, n, m, d_k, d_v);
  detail::validate_options(kWhere, options, m);
  const detail::SparseProblem<S> p(kWhere, pattern, n, m, options);
  const Index threads = detail::resolve_threads(options.threads), scalar = Index(sizeof(S));
  const auto workspace = [&](Index rows, Index keys, const AttentionOptions& o) {
    return detail::AttentionWorkspace<S>::bytes(detail::plan_tiles<S>(rows, keys, d_k, d_v, o), d_k, d_v);
  };
  constexpr Index kBookkeeping = 4096;  // the problem's term lists and the allocator's rounding, per thread and call
  // The direct call's tiles: a lone band runs as a window (sparse_into).
  const AttentionOptions direct = detail::sparse_tile_options<S>(p, options);
  const std::optional<AttentionOptions> window = detail::band_as_window(p, direct);
  Index bytes = threads * workspace(n, m, window ? *window : direct) + (threads + 1) * kBookkeeping;
  if (options.log_n_scale) bytes += n * scalar;
  if (p.continues_rows()) bytes += n * scalar;  // the log-sum-exps a gathered term continues from
  for (Index g = 0; g < Index(p.gathered.size()); ++g) {
    const SparsePattern::Term& t = p.gathered[size_t(g)];
    // Short residue classes run as lanes, one workspace per thread; inputs with NaN or Inf, or whose rows are not
    // contiguous, take the general calls counted below.
    if (detail::ResidueLanes<S>::applies(p, g, options))
      bytes += threads * detail::ResidueLanes<S>::workspace_bytes(n, m, d_k, d_v, t.rate);
    // A residue class holds about n / k queries and m / k keys; summary columns all n queries and their columns.
    const bool columns = t.kind == SparsePattern::Kind::kColumns;
    const Index queries = columns ? n : n / t.rate + 1, keys = columns ? t.count * (m / t.rate + 1) : m / t.rate + 1;
    const Index rows = std::min(queries, detail::kSparseRows);
    const Index calls = (columns ? 1 : t.rate) * ((queries + rows - 1) / rows);
    // Calls spread one per thread run on one thread each, in their worker's tile workspace; fewer calls than threads
    // run one after another on all of them. Either way a call of a few rows over many keys goes split-K (partial
    // outputs).
    AttentionOptions inner = options;
    if (calls >= threads) inner.threads = 1;
    const Index per_call = detail::attention_calls_workspace_bytes<S>(1, rows, std::min(keys, m), d_k, d_v, inner);
    bytes += (calls >= threads ? threads : 1) * per_call +
             calls * Index(sizeof(detail::AttentionCall<S, detail::SparseMask<S>>));
  }
  return bytes;
}

}  // namespace attnkit
