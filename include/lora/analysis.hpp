// lora.hpp: the analysis of Hu et al. 2021 (LoRA, Section 7) as functions of an adapter's A [r x in] and
// B [out x r], or of a LoraLinear and an adapter name.
//
//   subspace similarity (Section 7.2, eq. 4), of two adapters' A over the same in_features:
//     phi(A1, A2, i, j) = ||V1_i^T V2_j||_F^2 / min(i, j)                            in [0, 1]
//     V1_i: the top-i right singular vectors of A1 (the first i columns of V in A1 = U S V^T, vectors in
//     R^in), V2_j the same for A2. 1 when one subspace contains the other, 0 when they are orthogonal. The
//     paper finds the top direction of an r = 8 and an r = 64 adapter shared (phi > 0.5) and the rest
//     mostly not: a very low rank already holds the useful directions.
//
//   amplification factor (Section 7.3, Table 7), of dW = s B A against the frozen W0 [out x in]:
//     ||dW||_F / ||U^T W0 V||_F                 U, V: the top singular vectors of dW (r of them)
//     How much dW amplifies directions that W0 already has but does not emphasise. For GPT-3's W_q at
//     layer 48 the paper reports about 21.5 (6.91 / 0.32) at r = 4 and about 1.9 at r = 64.
//
//   rank of dW: its singular values, the count above tol * sigma_max (numerical rank, < r when B or A
//     is rank-deficient, or r > min(out, in)), and the entropy effective rank of Roy & Vetterli 2007,
//     exp(-sum p_k log p_k) with p_k = sigma_k / sum sigma: a real number in [1, rank], equal to the rank
//     when the nonzero singular values are equal, smaller when a few dominate.
//
// dW is never formed: with thin QRs B = Q_B R_B and A^T = Q_A R_A, dW = Q_B (s R_B R_A^T) Q_A^T, and the
// SVD of that core [<= r x <= r] gives dW's singular values, U = Q_B U_c and V = Q_A V_c. W0 is read a
// block of rows at a time (FrozenBase::dense_rows for a layer, quantized bases included). Everything is
// computed in double whatever the input scalar; results are double.
#pragma once

#include <lora/common.hpp>
#include <lora/linear.hpp>

#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

namespace lora::analysis {

// The default of `tol` for the numerical rank of dW: relative to sigma_max, far above double rounding
// (~1e-15 relative) and a little above float's (~1e-7), so exact rank deficiency counts as such.
inline constexpr double default_rank_tolerance = 1e-6;

// What amplification_factor() measures, all in the Frobenius norm.
struct Amplification {
  double factor = 0;           // delta_norm / projection_norm (+inf when projection_norm is 0)
  double delta_norm = 0;       // ||dW||, dW = s B A
  double projection_norm = 0;  // ||U^T W0 V||, U [out x k] and V [in x k] the top-k singular vectors of dW
  double base_norm = 0;        // ||W0||
  Index directions = 0;        // k: the singular values of dW above tol * sigma_max (r when dW has full rank r)
};

namespace detail {

using DenseMatrix = Eigen::MatrixXd;  // column-major: what Eigen's factorizations work in

// Rows of W0 read per block: about 256 KiB of doubles.
inline constexpr Index block_elements = Index(1) << 15;

template <class Derived>
void require_nonempty_finite(const char* where, const char* what, const Eigen::MatrixBase<Derived>& m) {
  if (m.rows() == 0 || m.cols() == 0) lora::detail::fail(where, what, " is empty (", m.rows(), " x ", m.cols(), ")");
  lora::detail::require_finite(where, what, m);
}

template <class DA, class DB>
void require_adapter(const char* where, const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B, double scaling) {
  require_nonempty_finite(where, "A", A);
  require_nonempty_finite(where, "B", B);
  if (B.cols() != A.rows())
    lora::detail::fail(where, "B has ", B.cols(), " columns and A has ", A.rows(),
                       " rows, expected B [out x r] and A [r x in] with the same r");
  if (!std::isfinite(scaling)) lora::detail::fail(where, "scaling must be finite, got ", scaling);
}

inline void require_tolerance(const char* where, double tol) {
  if (!(tol > 0 && tol < 1)) lora::detail::fail(where, "tol must be in (0, 1), got ", tol);
}

// The right singular vectors of A [r x in], as the columns of [in x min(r, in)], by descending singular value.
template <class Derived>
DenseMatrix right_singular_vectors(const Eigen::MatrixBase<Derived>& A) {
  const DenseMatrix a = A.template cast<double>();
  Eigen::JacobiSVD<DenseMatrix> svd(a, Eigen::ComputeThinV);
  return svd.matrixV();
}

// Checks A1 [r1 x in] and A2 [r2 x in] for the subspace similarity.
template <class D1, class D2>
void require_pair(const char* where, const Eigen::MatrixBase<D1>& A1, const Eigen::MatrixBase<D2>& A2) {
  require_nonempty_finite(where, "A1", A1);
  require_nonempty_finite(where, "A2", A2);
  if (A1.cols() != A2.cols())
    lora::detail::fail(where, "A1 has ", A1.cols(), " columns and A2 has ", A2.cols(),
                       ", expected both [r x in] over the same in_features");
}

// The thin SVD of dW = s B A, from the SVD of the core s R_B R_A^T: min(r, out, in) singular values,
// descending; U [out x k] and V [in x k] when asked for.
struct DeltaSvd {
  Vector<double> sigma;
  DenseMatrix U, V;
};

template <class DA, class DB>
DeltaSvd delta_svd(const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B, double scaling, bool vectors) {
  const Index r = A.rows(), in = A.cols(), out = B.rows();
  const Index kb = std::min(out, r), ka = std::min(in, r);
  const Eigen::HouseholderQR<DenseMatrix> qr_b(B.template cast<double>());
  const Eigen::HouseholderQR<DenseMatrix> qr_a(A.transpose().template cast<double>());
  const DenseMatrix Rb = qr_b.matrixQR().topRows(kb).template triangularView<Eigen::Upper>();  // kb x r
  const DenseMatrix Ra = qr_a.matrixQR().topRows(ka).template triangularView<Eigen::Upper>();  // ka x r
  DenseMatrix core(kb, ka);
  core.noalias() = scaling * (Rb * Ra.transpose());
  const unsigned options = vectors ? unsigned(Eigen::ComputeThinU | Eigen::ComputeThinV) : 0u;
  Eigen::JacobiSVD<DenseMatrix> svd(core, options);
  DeltaSvd result;
  result.sigma = svd.singularValues();
  if (vectors) {
    const Index k = result.sigma.size();
    // Q_B [U_c; 0] and Q_A [V_c; 0]: the thin factors padded to the Householder sequences' size.
    result.U = DenseMatrix::Zero(out, k);
    result.U.topRows(kb) = svd.matrixU();
    result.U.applyOnTheLeft(qr_b.householderQ());
    result.V = DenseMatrix::Zero(in, k);
    result.V.topRows(ka) = svd.matrixV();
    result.V.applyOnTheLeft(qr_a.householderQ());
  }
  return result;
}

inline Index count_above(const Vector<double>& sigma, double tol) {
  if (sigma.size() == 0 || sigma(0) == 0) return 0;
  Index k = 0;
  while (k < sigma.size() && sigma(k) > tol * sigma(0)) ++k;
  return k;
}

// The amplification given a reader of W0's rows: read(first, count, dst) fills dst [count x in] (double).
template <class DA, class DB, class ReadRows>
Amplification amplification(const char* where, const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B,
                            double scaling, double tol, ReadRows&& read) {
  const Index in = A.cols(), out = B.rows();
  DeltaSvd d = delta_svd(A, B, scaling, true);
  Amplification result;
  result.delta_norm = d.sigma.norm();
  result.directions = count_above(d.sigma, tol);
  const Index k = result.directions;
  if (k == 0) lora::detail::fail(where, "dW = s B A is zero (B is zero at initialization, or s = 0): nothing to measure");
  // P = U^T W0 [k x in], one block of rows at a time, then U^T W0 V [k x k].
  DenseMatrix P = DenseMatrix::Zero(k, in);
  Matrix<double> rows;
  double base_sq = 0;
  const Index block = std::max(Index(1), std::min(out, block_elements / in));
  for (Index first = 0; first < out; first += block) {
    const Index count = std::min(block, out - first);
    lora::detail::resize_workspace(rows, count, in);
    read(first, count, rows);
    lora::detail::require_finite(where, "W0", rows);
    base_sq += rows.squaredNorm();
    P.noalias() += d.U.block(first, 0, count, k).transpose() * rows;
  }
  DenseMatrix projection(k, k);
  projection.noalias() = P * d.V.leftCols(k);
  result.projection_norm = projection.norm();
  result.base_norm = std::sqrt(base_sq);
  result.factor = result.projection_norm > 0 ? result.delta_norm / result.projection_norm
                                             : std::numeric_limits<double>::infinity();
  return result;
}

template <class Scalar>
double layer_scaling(const LoraLinear<Scalar>& layer, const std::string& name) {
  return layer.scaling(name) * layer.adapter_scale(name);
}

}  // namespace detail

// ---- subspace similarity ---------------------------------------------------------------------------
// subspace_similarity(A1, A2, i, j)
//   requires: A1 [r1 x in], A2 [r2 x in] nonempty and finite; 1 <= i <= min(r1, in), 1 <= j <= min(r2, in).
//   ensures:  phi(A1, A2, i, j) in [0, 1] (clamped against rounding). phi(A1, A2, i, j) = phi(A2, A1, j, i).
//             Directions past rank(A) are arbitrary (any completion of the row space), and so is phi there;
//             the same holds inside a group of equal singular values.
template <class D1, class D2>
double subspace_similarity(const Eigen::MatrixBase<D1>& A1, const Eigen::MatrixBase<D2>& A2, Index i, Index j) {
  constexpr const char* where = "analysis::subspace_similarity";
  detail::require_pair(where, A1, A2);
  const Index k1 = std::min(A1.rows(), A1.cols()), k2 = std::min(A2.rows(), A2.cols());
  if (i < 1 || i > k1) lora::detail::fail(where, "i = ", i, " is out of range, expected 1 <= i <= min(r1, in) = ", k1);
  if (j < 1 || j > k2) lora::detail::fail(where, "j = ", j, " is out of range, expected 1 <= j <= min(r2, in) = ", k2);
  const detail::DenseMatrix V1 = detail::right_singular_vectors(A1), V2 = detail::right_singular_vectors(A2);
  detail::DenseMatrix overlap(i, j);
  overlap.noalias() = V1.leftCols(i).transpose() * V2.leftCols(j);
  return std::min(1.0, overlap.squaredNorm() / static_cast<double>(std::min(i, j)));
}

// subspace_similarity_grid(A1, A2): phi(A1, A2, i, j) for every i, j, from one SVD of each.
//   requires: as subspace_similarity.
//   ensures:  G [min(r1, in) x min(r2, in)] (r1 x r2 when r <= in, the usual case), G(i - 1, j - 1) = phi(i, j).
template <class D1, class D2>
Matrix<double> subspace_similarity_grid(const Eigen::MatrixBase<D1>& A1, const Eigen::MatrixBase<D2>& A2) {
  detail::require_pair("analysis::subspace_similarity_grid", A1, A2);
  const detail::DenseMatrix V1 = detail::right_singular_vectors(A1), V2 = detail::right_singular_vectors(A2);
  const Index k1 = V1.cols(), k2 = V2.cols();
  detail::DenseMatrix overlap(k1, k2);
  overlap.noalias() = V1.transpose() * V2;
  // ||V1_i^T V2_j||^2 is the sum of the squared overlaps in the top-left i x j block: 2-D prefix sums.
  Matrix<double> grid(k1, k2);
  Vector<double> column_sums = Vector<double>::Zero(k2);
  for (Index i = 0; i < k1; ++i) {
    double row_sum = 0;
    for (Index j = 0; j < k2; ++j) {
      row_sum += overlap(i, j) * overlap(i, j);
      column_sums(j) += row_sum;  // sum over rows <= i and columns <= j
      grid(i, j) = std::min(1.0, column_sums(j) / static_cast<double>(std::min(i, j) + 1));
    }
  }
  return grid;
}

// Over two layers' adapters (the same layer twice for two adapters of one layer).
template <class Scalar>
double subspace_similarity(const LoraLinear<Scalar>& layer1, const std::string& name1, const LoraLinear<Scalar>& layer2,
                           const std::string& name2, Index i, Index j) {
  return subspace_similarity(layer1.A(name1), layer2.A(name2), i, j);
}
template <class Scalar>
Matrix<double> subspace_similarity_grid(const LoraLinear<Scalar>& layer1, const std::string& name1,
                                        const LoraLinear<Scalar>& layer2, const std::string& name2) {
  return subspace_similarity_grid(layer1.A(name1), layer2.A(name2));
}

// ---- amplification factor --------------------------------------------------------------------------
// amplification_factor(A, B, scaling, W0, tol)
//   requires: A [r x in], B [out x r], W0 [out x in], all nonempty and finite; scaling finite; tol in (0, 1);
//             dW = scaling B A nonzero.
//   ensures:  the Amplification of dW against W0, with U, V the k = numerical rank of dW (singular values
//             above tol * sigma_max) top singular vectors: k = min(r, out, in) for a generic adapter. The
//             directions of zero singular values are left out: they are not determined by dW.
template <class DA, class DB, class DW>
Amplification amplification_factor(const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B, double scaling,
                                   const Eigen::MatrixBase<DW>& W0, double tol = default_rank_tolerance) {
  constexpr const char* where = "analysis::amplification_factor";
  detail::require_adapter(where, A, B, scaling);
  detail::require_tolerance(where, tol);
  lora::detail::require_shape(where, "W0", W0, B.rows(), A.cols());
  return detail::amplification(where, A, B, scaling, tol, [&](Index first, Index count, Matrix<double>& dst) {
    dst = W0.middleRows(first, count).template cast<double>();
  });
}

// Over a layer: dW = s B A with s = scaling(name) * adapter_scale(name), W0 = the layer's frozen base read
// through dense_rows (dense or quantized). Throws while the layer is merged (the base then holds W0 + dW).
template <class Scalar>
Amplification amplification_factor(const LoraLinear<Scalar>& layer, const std::string& name,
                                   double tol = default_rank_tolerance) {
  constexpr const char* where = "analysis::amplification_factor";
  if (layer.merged()) lora::detail::fail(where, "the layer is merged (its base may hold W0 + dW); call unmerge() first");
  const auto A = layer.A(name);
  const auto B = layer.B(name);
  const double scaling = detail::layer_scaling(layer, name);
  detail::require_adapter(where, A, B, scaling);
  detail::require_tolerance(where, tol);
  const FrozenBase<Scalar>& base = layer.base();
  Matrix<Scalar> staging;
  return detail::amplification(where, A, B, scaling, tol, [&](Index first, Index count, Matrix<double>& dst) {
    lora::detail::resize_workspace(staging, count, base.in_features());
    base.dense_rows(first, count, staging.data());
    dst = staging.template cast<double>();
  });
}

// ---- singular values and rank of dW ----------------------------------------------------------------
// delta_singular_values(A, B, scaling)
//   requires: A [r x in], B [out x r] nonempty and finite; scaling finite.
//   ensures:  the min(r, out, in) largest singular values of dW = scaling B A, descending (dW's others are 0).
template <class DA, class DB>
Vector<double> delta_singular_values(const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B, double scaling) {
  detail::require_adapter("analysis::delta_singular_values", A, B, scaling);
  return detail::delta_svd(A, B, scaling, false).sigma;
}

// effective_rank(A, B, scaling, tol): the numerical rank of dW, the number of singular values above
// tol * sigma_max (0 for dW = 0). tol in (0, 1).
template <class DA, class DB>
Index effective_rank(const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B, double scaling,
                     double tol = default_rank_tolerance) {
  constexpr const char* where = "analysis::effective_rank";
  detail::require_adapter(where, A, B, scaling);
  detail::require_tolerance(where, tol);
  return detail::count_above(detail::delta_svd(A, B, scaling, false).sigma, tol);
}

// entropy_effective_rank(A, B, scaling): Roy & Vetterli's exp(-sum p_k log p_k), p_k = sigma_k / sum sigma,
// over dW's singular values: in [1, effective_rank] (0 for dW = 0); no threshold.
template <class DA, class DB>
double entropy_effective_rank(const Eigen::MatrixBase<DA>& A, const Eigen::MatrixBase<DB>& B, double scaling) {
  detail::require_adapter("analysis::entropy_effective_rank", A, B, scaling);
  const Vector<double> sigma = detail::delta_svd(A, B, scaling, false).sigma;
  const double total = sigma.sum();
  if (total == 0) return 0;
  double entropy = 0;
  for (Index k = 0; k < sigma.size(); ++k) {
    const double p = sigma(k) / total;
    if (p > 0) entropy -= p * std::log(p);
  }
  return std::exp(entropy);
}

// Over a layer's adapter: s = scaling(name) * adapter_scale(name). Merged or not (only A and B are read).
template <class Scalar>
Vector<double> delta_singular_values(const LoraLinear<Scalar>& layer, const std::string& name) {
  return delta_singular_values(layer.A(name), layer.B(name), detail::layer_scaling(layer, name));
}
template <class Scalar>
Index effective_rank(const LoraLinear<Scalar>& layer, const std::string& name, double tol = default_rank_tolerance) {
  return effective_rank(layer.A(name), layer.B(name), detail::layer_scaling(layer, name), tol);
}
template <class Scalar>
double entropy_effective_rank(const LoraLinear<Scalar>& layer, const std::string& name) {
  return entropy_effective_rank(layer.A(name), layer.B(name), detail::layer_scaling(layer, name));
}

}  // namespace lora::analysis
