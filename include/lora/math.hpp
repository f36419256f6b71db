// lora.hpp: the LoRA math: forward, backward and merge as functions of (base, adapter terms, input,
// workspace), with no registry or layer state around them. LoraLinear calls these.
//
//   forward:   Y  = X W0^T + b + sum_i s_i (X_i A_i^T) B_i^T                 X_i = X, or X * mask_i (dropout)
//   backward:  dT_i = s_i dY B_i         dB_i += s_i dY^T T_i     (T_i = X_i A_i^T, kept by forward)
//              dA_i += dT_i^T X_i        dX    = dY W0 + sum_i (dT_i A_i) * mask_i
//   merge:     W  += sign sum_i s_i B_i A_i
//
// The product B A is never formed except by the merge. Matrices are row-major with packed rows
// (leading dimension = columns); inputs and outputs of one call must not overlap.
#pragma once

#include <lora/base.hpp>
#include <lora/common.hpp>
#include <lora/detail/kernels.hpp>

#include <algorithm>
#include <vector>

namespace lora {

// One adapter as the math sees it.
template <class Scalar>
struct AdapterTerm {
  const Scalar* A = nullptr;      // [r x in]
  const Scalar* B = nullptr;      // [out x r]
  Index rank = 0;                 // r
  Scalar scaling = 1;             // s_i: alpha / r (or alpha / sqrt(r)) times the runtime scale
  const Scalar* input = nullptr;  // X_i [n x in] when it differs from X (dropout), else nullptr
  const Scalar* mask = nullptr;   // the dropout mask [n x in] that made X_i, else nullptr
};

// The buffers of forward(), per thread. T = [T_1 | T_2 | ...] is what backward needs from the forward.
template <class Scalar>
struct ForwardWorkspace {
  Matrix<Scalar> T;          // n x R, R = sum r_i
  Matrix<Scalar> scaled_Bt;  // R x out: [s_1 B_1^T; s_2 B_2^T; ...]
  Matrix<Scalar> stacked_A;  // R x in: [A_1; A_2; ...] for a fused forward of several adapters
  detail::PackBuffer<Scalar> pack;
  BaseWorkspace<Scalar> base;
};

template <class Scalar>
struct BackwardWorkspace {
  Matrix<Scalar> dT, dBt, scaled_Bt, masked_grad, stacked_A;
  detail::PackBuffer<Scalar> pack;
  BaseWorkspace<Scalar> base;
};

// Where backward accumulates each term's gradients: grad_A [r x in], grad_B [out x r].
template <class Scalar>
struct GradientTerm {
  Scalar* grad_A = nullptr;
  Scalar* grad_B = nullptr;
};

namespace detail {
template <class Scalar>
Index total_rank(const std::vector<AdapterTerm<Scalar>>& terms) {
  Index R = 0;
  for (const auto& t : terms) R += t.rank;
  return R;
}

// [A_1; A_2; ...] (R x in): the terms' A, in place when there is one term, else stacked into `dst`.
template <class Scalar>
const Scalar* stacked_A(const std::vector<AdapterTerm<Scalar>>& terms, Index in, Matrix<Scalar>& dst) {
  if (terms.size() == 1) return terms.front().A;
  resize_workspace(dst, total_rank(terms), in);
  Index row = 0;
  for (const auto& t : terms) {
    dst.middleRows(row, t.rank) = Eigen::Map<const Matrix<Scalar>>(t.A, t.rank, in);
    row += t.rank;
  }
  return dst.data();
}

template <class Scalar>
void stack_scaled_Bt(const std::vector<AdapterTerm<Scalar>>& terms, Index out, Matrix<Scalar>& dst) {
  resize_workspace(dst, total_rank(terms), out);
  Index row = 0;
  for (const auto& t : terms) {
    dst.middleRows(row, t.rank) = t.scaling * Eigen::Map<const Matrix<Scalar>>(t.B, out, t.rank).transpose();
    row += t.rank;
  }
}
}  // namespace detail

// forward
//   requires: X [n x in], Y [n x out], n >= 1; bias [out] or nullptr; every term's input (if any) [n x in].
//   ensures:  Y = X W0^T + bias + sum_i s_i (X_i A_i^T) B_i^T; work.T holds [X_1 A_1^T | ...].
// Where every adapter reads X itself (no dropout) and the base can (FrozenBase::forward_low_rank), T and
// T [s_i B_i^T] + bias ride in the base's product: T from the packed panels of X, the update on each output
// tile in registers. Otherwise the big product, T and one pass over the output run one after the other.
template <class Scalar>
void lora_forward(const FrozenBase<Scalar>& base, const std::vector<AdapterTerm<Scalar>>& terms, const Scalar* bias,
                  const Scalar* X, Index n, Scalar* Y, ForwardWorkspace<Scalar>& work) {
  const Index in = base.in_features(), out = base.out_features(), R = detail::total_rank(terms);
  if (R == 0) {
    base.forward(X, n, Y, work.base, false);
    if (bias) Eigen::Map<Matrix<Scalar>>(Y, n, out).rowwise() += Eigen::Map<const Vector<Scalar>>(bias, out).transpose();
    return;
  }
  detail::resize_workspace(work.T, n, R);
  detail::stack_scaled_Bt(terms, out, work.scaled_Bt);
  const bool reads_x = std::all_of(terms.begin(), terms.end(), [](const AdapterTerm<Scalar>& t) { return !t.input; });
  if (reads_x) {
    detail::GemmLowRank<Scalar> low;
    low.r = R;
    low.u = detail::stacked_A(terms, in, work.stacked_A);  // U = A^T: U(p, q) = A(q, p)
    low.u_rs = 1;
    low.u_cs = in;
    low.t = work.T.data();
    low.ldt = R;
    low.v = work.scaled_Bt.data();
    low.ldv = out;
    low.bias = bias;
    if (base.forward_low_rank(X, n, Y, low, work.base)) return;
  }
  base.forward(X, n, Y, work.base, false);  // Y0 = X W0^T, the big product, straight into the output
  Index col = 0;
  for (const auto& t : terms) {  // T_i = X_i A_i^T by the rank-r kernel
    detail::row_dots(n, t.rank, in, t.input ? t.input : X, in, t.A, in, work.T.data() + col, R);
    col += t.rank;
  }
  // Y = Y0 + bias + T [s_i B_i^T] in one pass over the output.
  auto epilogue = detail::in_place_update(n, out, R, work.T.data(), R, Index(1), work.scaled_Bt.data(), out, Y, out);
  epilogue.col_add = bias;
  detail::rank_update(epilogue, work.pack);
}

// backward
//   requires: the terms, X and T (n x R) of a forward; dY [n x out]; dX [n x in]; grads per term.
//   ensures:  dX = dY W0 + sum_i (dT_i A_i) * mask_i (assigned); grad_A_i += dT_i^T X_i and
//             grad_B_i += s_i dY^T T_i (accumulated), with dT_i = s_i dY B_i.
// dT = [dT_1 | ...] comes first (n x R x out); then, with no dropout mask, dX = dY W0 + dT [A_1; ...] is
// one product (FrozenBase::forward_low_rank's fusion: the dT A update rides on each tile of dX), and the
// rank-r gradients run in one parallel region over columns (dB^T = s T^T dY, dA += dT^T X).
template <class Scalar>
void lora_backward(const FrozenBase<Scalar>& base, const std::vector<AdapterTerm<Scalar>>& terms,
                   const std::vector<GradientTerm<Scalar>>& grads, const Scalar* X, const Matrix<Scalar>& T,
                   const Scalar* dy, Index n, Scalar* dX, BackwardWorkspace<Scalar>& work) {
  using MatrixType = Matrix<Scalar>;
  const Index in = base.in_features(), out = base.out_features(), R = detail::total_rank(terms);
  // T is only read when some adapter is active (R > 0): with none, the forward leaves it as it was.
  LORA_ASSERT(grads.size() == terms.size() && (R == 0 || (T.rows() == n && T.cols() == R)));
  if (R == 0) {
    base.backward_input(dy, n, dX, work.base);
    return;
  }
  detail::stack_scaled_Bt(terms, out, work.scaled_Bt);
  detail::resize_workspace(work.dT, n, R);
  detail::resize_workspace(work.dBt, R, out);
  detail::row_dots(n, R, out, dy, out, work.scaled_Bt.data(), out, work.dT.data(), R);  // dT = dY [s_i B_i^T]^T
  const bool masked = std::any_of(terms.begin(), terms.end(), [](const AdapterTerm<Scalar>& t) { return t.mask; });
  bool fused = false;
  if (!masked) {
    detail::GemmLowRank<Scalar> low;
    low.r = R;
    low.t = work.dT.data();
    low.ldt = R;
    low.v = detail::stacked_A(terms, in, work.stacked_A);
    low.ldv = in;
    fused = base.backward_input_low_rank(dy, n, dX, low, work.base);
  }
  if (!fused) base.backward_input(dy, n, dX, work.base);  // the one big product: dY W0
  Index col = 0;
  for (std::size_t k = 0; k < terms.size(); ++k) {
    const AdapterTerm<Scalar>& t = terms[k];
    const Index r = t.rank;
    const Scalar* Xi = t.input ? t.input : X;
    //   columns of dY: dB^T = s T^T dY;   columns of X: dA += dT^T X_i;   rows: dX += dT A (not fused)
    auto db = detail::in_place_update(r, out, n, T.data() + col, Index(1), R, dy, out, work.dBt.data() + col * out, out,
                                      t.scaling);
    db.base = nullptr;
    const auto da = detail::in_place_update(r, in, n, work.dT.data() + col, Index(1), R, Xi, in, grads[k].grad_A, in);
    const auto dx = detail::in_place_update(n, in, r, work.dT.data() + col, R, Index(1), t.A, in, dX, in);
    const bool row_dx = !fused && t.mask == nullptr;
    constexpr Index nr = detail::kernel::nr<Scalar>;
    const int threads = detail::threads_for(static_cast<double>(n) * static_cast<double>(r) *
                                            static_cast<double>(in + out + (row_dx ? in : 0)));
    // pack: A's panels for dX (shared), then one block per thread for dB and dA
    const Index a_panels = row_dx ? detail::kernel::panel_size<Scalar>(r, in) : 0;
    const Index per_thread = detail::kernel::columns_pack_size<Scalar>();
    if (work.pack.size() < a_panels + threads * per_thread) work.pack.resize(a_panels + threads * per_thread);
    if (row_dx) detail::kernel::pack_panels(t.A, in, r, Index(0), in, work.pack.data());
    Scalar* pack_base = work.pack.data();
    detail::parallel_region(threads, [&](int th, int nt) {
      Scalar* pack = pack_base + a_panels + th * per_thread;
      if (row_dx) {
        const auto rows = detail::split(n, detail::kernel::MR, th, nt);
        if (rows.first < rows.second)
          detail::kernel::rank_update_panels<false>(dx, pack_base, 0, 0, r, true, rows.first, rows.second, 0, in);
      }
      const auto out_cols = detail::split(out, nr, th, nt);
      if (out_cols.first < out_cols.second)
        detail::kernel::rank_update_columns<false>(db, pack, out_cols.first, out_cols.second);
      const auto in_cols = detail::split(in, nr, th, nt);
      if (in_cols.first < in_cols.second)
        detail::kernel::rank_update_columns<false>(da, pack, in_cols.first, in_cols.second);
    });
    Eigen::Map<MatrixType>(grads[k].grad_B, out, r).noalias() += work.dBt.middleRows(col, r).transpose();
    if (t.mask) {  // through the mask: dX += (dT A) * mask, by the rank-r kernel (no Eigen temporary)
      detail::resize_workspace(work.masked_grad, n, in);
      auto masked_dx = detail::in_place_update(n, in, r, work.dT.data() + col, R, Index(1), t.A, in,
                                               work.masked_grad.data(), in);
      masked_dx.base = nullptr;
      detail::rank_update(masked_dx, work.pack);
      Eigen::Map<MatrixType>(dX, n, in).array() +=
          work.masked_grad.array() * Eigen::Map<const MatrixType>(t.mask, n, in).array();
    }
    col += r;
  }
}

// merge
//   requires: W [out x in] dense, row-major; the terms' A and B finite.
//   ensures:  W += sign sum_i s_i B_i A_i in one pass over W (a rank-(sum r_i) update); returns max |W|
//             after the update. U and V are workspaces ([out x R] and [R x in]).
template <class Scalar>
Scalar lora_add_delta(Scalar* W, Index out, Index in, const std::vector<AdapterTerm<Scalar>>& terms, Scalar sign,
                      Matrix<Scalar>& U, Matrix<Scalar>& V, detail::PackBuffer<Scalar>& pack) {
  const Index R = detail::total_rank(terms);
  detail::resize_workspace(U, out, R);
  detail::resize_workspace(V, R, in);
  Index k = 0;
  for (const auto& t : terms) {
    U.middleCols(k, t.rank) = (sign * t.scaling) * Eigen::Map<const Matrix<Scalar>>(t.B, out, t.rank);
    V.middleRows(k, t.rank) = Eigen::Map<const Matrix<Scalar>>(t.A, t.rank, in);
    k += t.rank;
  }
  return detail::rank_update<true>(
      detail::in_place_update(out, in, R, U.data(), R, Index(1), V.data(), in, W, in), pack);
}

}  // namespace lora
