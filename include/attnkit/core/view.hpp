// attnkit: a read-only strided view over any Eigen matrix, so kernels are written once, not per storage order.
#pragma once

#include "types.hpp"

namespace attnkit::detail {

/// Element (i, j) lives at row(i)[j * col_stride]; without groups row(i) is data + i * row_stride. Row-major storage
/// has col_stride == 1.
///
/// Optionally the rows fold groups: with group_rows > 0, row i is row i % group_rows of group i / group_rows, and
/// groups are group_stride apart. Grouped-query attention stacks the query heads that share one key/value head this
/// way; sparse attention gathers every l-th run of c keys (fixed pattern) or every k-th row (atrous) without copying.
template <class S>
struct StridedView {
  const S* data = nullptr;
  Index rows = 0;
  Index cols = 0;
  Index row_stride = 0;
  Index col_stride = 1;
  Index group_rows = 0;
  Index group_stride = 0;

  const S& operator()(Index i, Index j) const { return row(i)[j * col_stride]; }
  const S* row(Index i) const {
    return group_rows > 0 ? data + (i / group_rows) * group_stride + (i % group_rows) * row_stride
                          : data + i * row_stride;
  }
  bool row_contiguous() const { return col_stride == 1; }
  /// Copies row i (cols scalars) to dst; a contiguous row by a loop of its own, which the compiler vectorises without
  /// having to test the stride.
  void copy_row(Index i, S* dst) const {
    const S* src = row(i);
    if (col_stride == 1) {
      for (Index c = 0; c < cols; ++c) dst[c] = src[c];
    } else {
      for (Index c = 0; c < cols; ++c) dst[c] = src[c * col_stride];
    }
  }
};

/// A whole row-major matrix as a view.
template <class S>
StridedView<S> matrix_view(const Matrix<S>& x) {
  return {x.data(), x.rows(), x.cols(), x.cols(), 1};
}

/// Binds to the storage of `x` when it has direct access (Matrix, Map, Ref, Block, any storage order), and
/// otherwise evaluates the expression once into an owned row-major matrix. Keep it alive while the view is used.
template <class Derived>
class ViewOf {
 public:
  using Scalar = typename Derived::Scalar;

  explicit ViewOf(const Eigen::MatrixBase<Derived>& x) {
    if constexpr (static_cast<bool>(Derived::Flags & Eigen::DirectAccessBit)) {
      const Derived& d = x.derived();
      view_.data = d.data();
      view_.rows = d.rows();
      view_.cols = d.cols();
      const Index inner = d.innerStride(), outer = d.outerStride();
      view_.row_stride = Derived::IsRowMajor ? outer : inner;
      view_.col_stride = Derived::IsRowMajor ? inner : outer;
    } else {
      owned_ = x;
      view_ = {owned_.data(), owned_.rows(), owned_.cols(), owned_.cols(), 1};
    }
  }
  ViewOf(const ViewOf&) = delete;
  ViewOf& operator=(const ViewOf&) = delete;

  const StridedView<Scalar>& view() const { return view_; }

 private:
  Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> owned_;
  StridedView<Scalar> view_;
};

}  // namespace attnkit::detail
