// lora.hpp: labelled datasets, a seeded synthetic task pair for fine-tuning experiments, and shuffled
// mini-batches.
//
// The synthetic tasks (ClusterTask):
//   Task A. k classes in d dimensions. Each class is the union of m Gaussian blobs ("clusters") whose
//   centres are drawn in a random p-dimensional subspace of R^d (p = latent_dim); a sample is a centre plus
//   isotropic noise in all d dimensions. The blobs of different classes interleave, so the decision
//   boundaries are not linear: an MLP is needed.
//   Task B = A.shifted(...): the same blobs moved by a rigid motion and relabelled. The motion rotates
//   `rotated_planes` planes, each spanned by a random direction inside the subspace and one outside it (by
//   90 degrees, part of the class structure moves into input directions that carried only noise in A),
//   then translates by shift * spread * sqrt(p) inside the subspace. The relabelling cycles the first
//   `cycled_classes` classes (c -> c + 1) and gives the first `reassigned_clusters` blobs of every class
//   to another class.
// Why the frozen base does poorly on B: a model trained on A labels regions of input space; after the
// motion, B's blobs sit where A had other classes or no data at all, and even a blob that lands where A's
// blob was carries a new label. Why B is still easy to learn: the motion preserves distances, so B is as
// separable as A. Why retraining the head alone is not enough: the base's first layers were trained on
// inputs whose class information lay in the subspace, and learned to map the directions outside it (noise
// in A) to little of use; B puts part of its information there. Adapting those layers is a change of low
// rank (about rotated_planes new input directions), which is what LoRA learns.
#pragma once

#include <lora/common.hpp>
#include <lora/detail/random.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace lora::data {

// X [n x dim], one label per row in [0, num_classes).
template <class Scalar>
struct Dataset {
  Matrix<Scalar> X;
  std::vector<int> y;
  int num_classes = 0;

  Index size() const { return X.rows(); }
  Index dim() const { return X.cols(); }

  // Throws std::invalid_argument naming `where` if the rows and labels disagree, a label is out of
  // range, the set is empty or X holds NaN/Inf.
  void validate(const char* where) const {
    if (X.rows() == 0 || X.cols() == 0) detail::fail(where, "the dataset is empty (X is ", detail::shape_of(X), ")");
    if (static_cast<Index>(y.size()) != X.rows())
      detail::fail(where, "the dataset has ", X.rows(), " rows but ", y.size(), " labels");
    if (num_classes < 1) detail::fail(where, "num_classes must be >= 1, got ", num_classes);
    for (std::size_t i = 0; i < y.size(); ++i)
      if (y[i] < 0 || y[i] >= num_classes)
        detail::fail(where, "label ", y[i], " at row ", i, " is outside [0, ", num_classes, ")");
    detail::require_finite(where, "X", X);
  }
};

struct ClusterTaskConfig {
  int dim = 32;                // d, the input width
  int latent_dim = 8;          // p <= d: the blob centres live in a random p-dimensional subspace
  int num_classes = 10;        // k
  int clusters_per_class = 3;  // m blobs per class
  double spread = 1.0;         // std of the centres' coordinates inside the subspace
  double noise = 0.5;          // std of a sample around its centre, per input dimension
  std::uint64_t seed = 0;
};

// How task B is made from task A (see the file comment).
struct TaskShift {
  int rotated_planes = 4;       // planes (one direction in the subspace, one outside) rotated by `angle`;
                                // <= min(latent_dim, dim - latent_dim)
  double angle = 1.5707963267948966;  // radians
  double shift = 1.0;           // translation length, in units of spread * sqrt(latent_dim)
  int cycled_classes = 4;       // classes 0..c-1 relabelled c -> c + 1 (mod c); 0 or >= 2
  int reassigned_clusters = 1;  // per class, blobs given to another class; < clusters_per_class
  std::uint64_t seed = 1;
};

class ClusterTask {
 public:
  static ClusterTask make(const ClusterTaskConfig& config);

  // Task B: the same blobs moved and relabelled; the input width and classes stay the same.
  ClusterTask shifted(const TaskShift& shift) const;

  // n samples: a blob drawn uniformly, then its centre plus N(0, noise^2) per dimension. The same
  // (task, n, seed) gives bit-identical data on every platform.
  template <class Scalar>
  Dataset<Scalar> sample(Index n, std::uint64_t seed) const;

  int dim() const { return config_.dim; }
  int num_classes() const { return config_.num_classes; }
  const ClusterTaskConfig& config() const { return config_; }
  const Matrix<double>& centres() const { return centres_; }    // [k m x d]
  const std::vector<int>& cluster_labels() const { return labels_; }  // the class of each blob

 private:
  ClusterTaskConfig config_;
  Matrix<double> basis_;    // [d x d] orthonormal; the first p columns span the subspace of task A
  Matrix<double> centres_;  // [k m x d]
  std::vector<int> labels_;
};

// Shuffled mini-batches over a dataset (held by reference: it must outlive this object).
//   MiniBatches<float> batches(train, 128, seed);
//   for (epoch ...) { batches.shuffle(); for (Index b = 0; b < batches.size(); ++b) { auto& batch = batches.load(b); ... } }
// The batch buffers are reused: a fixed batch size allocates nothing after the first epoch.
template <class Scalar>
class MiniBatches {
 public:
  struct Batch {
    Matrix<Scalar> X;
    std::vector<int> y;
  };

  // drop_last drops the final, smaller batch. Without shuffle() the order is the dataset's.
  MiniBatches(const Dataset<Scalar>& data, Index batch_size, std::uint64_t seed = 0, bool drop_last = false);

  // A new random order (a seeded stream: the k-th shuffle is the same in every run).
  void shuffle();
  Index size() const { return num_batches_; }
  Index batch_size() const { return batch_size_; }
  const Dataset<Scalar>& dataset() const { return *data_; }
  // Gathers batch b of the current order; the reference is valid until the next load().
  const Batch& load(Index b);

 private:
  const Dataset<Scalar>* data_;
  Index batch_size_, num_batches_;
  std::vector<Index> order_;
  detail::Random rng_;
  Batch full_, tail_;
};

// ===================================================================================================
// Implementation

}  // namespace lora::data

namespace lora::detail {

// Orthonormal columns from Gaussian draws by modified Gram-Schmidt (re-drawing a column in the
// practically impossible case that it is dependent).
inline Matrix<double> random_orthonormal(Index rows, Index cols, Random& rng) {
  Matrix<double> Q(rows, cols);
  for (Index j = 0; j < cols; ++j) {
    for (;;) {
      for (Index i = 0; i < rows; ++i) Q(i, j) = rng.normal();
      for (Index k = 0; k < j; ++k) Q.col(j) -= Q.col(k).dot(Q.col(j)) * Q.col(k);
      const double norm = Q.col(j).norm();
      if (norm > 1e-6) {
        Q.col(j) /= norm;
        break;
      }
    }
  }
  return Q;
}

}  // namespace lora::detail

namespace lora::data {

inline ClusterTask ClusterTask::make(const ClusterTaskConfig& c) {
  constexpr const char* where = "ClusterTask::make";
  if (c.dim < 1) detail::fail(where, "dim must be >= 1, got ", c.dim);
  if (c.latent_dim < 1 || c.latent_dim > c.dim)
    detail::fail(where, "latent_dim must be in [1, dim = ", c.dim, "], got ", c.latent_dim);
  if (c.num_classes < 2) detail::fail(where, "num_classes must be >= 2, got ", c.num_classes);
  if (c.clusters_per_class < 1) detail::fail(where, "clusters_per_class must be >= 1, got ", c.clusters_per_class);
  if (!(c.spread > 0) || !std::isfinite(c.spread)) detail::fail(where, "spread must be finite and > 0, got ", c.spread);
  if (!(c.noise >= 0) || !std::isfinite(c.noise)) detail::fail(where, "noise must be finite and >= 0, got ", c.noise);
  ClusterTask t;
  t.config_ = c;
  detail::Random rng(c.seed);
  t.basis_ = detail::random_orthonormal(c.dim, c.dim, rng);
  const Index clusters = static_cast<Index>(c.num_classes) * c.clusters_per_class;
  Matrix<double> latent(clusters, c.latent_dim);
  for (Index i = 0; i < clusters; ++i)
    for (Index j = 0; j < c.latent_dim; ++j) latent(i, j) = c.spread * rng.normal();
  t.centres_ = latent * t.basis_.leftCols(c.latent_dim).transpose();
  t.labels_.resize(static_cast<std::size_t>(clusters));
  for (Index i = 0; i < clusters; ++i) t.labels_[static_cast<std::size_t>(i)] = static_cast<int>(i / c.clusters_per_class);
  return t;
}

inline ClusterTask ClusterTask::shifted(const TaskShift& s) const {
  constexpr const char* where = "ClusterTask::shifted";
  const int d = config_.dim, p = config_.latent_dim, k = config_.num_classes, m = config_.clusters_per_class;
  const int max_planes = std::min(p, d - p);
  if (s.rotated_planes < 0 || s.rotated_planes > max_planes)
    detail::fail(where, "rotated_planes must be in [0, min(latent_dim, dim - latent_dim) = ", max_planes, "], got ",
                 s.rotated_planes);
  if (!std::isfinite(s.angle)) detail::fail(where, "angle must be finite, got ", s.angle);
  if (!std::isfinite(s.shift) || s.shift < 0) detail::fail(where, "shift must be finite and >= 0, got ", s.shift);
  if (s.cycled_classes == 1 || s.cycled_classes < 0 || s.cycled_classes > k)
    detail::fail(where, "cycled_classes must be 0 or in [2, num_classes = ", k, "], got ", s.cycled_classes);
  if (s.reassigned_clusters < 0 || s.reassigned_clusters >= m)
    detail::fail(where, "reassigned_clusters must be in [0, clusters_per_class = ", m, "), got ",
                 s.reassigned_clusters);

  detail::Random rng(s.seed);
  // Plane i is spanned by u_i (random, inside the subspace) and w_i (basis column p + i, outside it); the
  // planes are mutually orthogonal, so the rotations commute. u_i -> cos u_i + sin w_i.
  const auto inside = basis_.leftCols(p);
  const Matrix<double> U = inside * detail::random_orthonormal(p, p, rng);
  ClusterTask b = *this;
  const double cs = std::cos(s.angle), sn = std::sin(s.angle);
  for (int plane = 0; plane < s.rotated_planes; ++plane) {
    const auto u = U.col(plane);
    const auto w = basis_.col(p + plane);
    for (Index i = 0; i < b.centres_.rows(); ++i) {
      const double a = b.centres_.row(i).dot(u.transpose()), c = b.centres_.row(i).dot(w.transpose());
      b.centres_.row(i) += ((cs - 1) * a - sn * c) * u.transpose() + (sn * a + (cs - 1) * c) * w.transpose();
    }
  }
  Vector<double> t(p);
  for (int j = 0; j < p; ++j) t(j) = rng.normal();
  t *= s.shift * config_.spread * std::sqrt(static_cast<double>(p)) / t.norm();
  b.centres_.rowwise() += (inside * t).transpose();
  for (int c = 0; c < k; ++c) {
    const int cycled = c < s.cycled_classes ? (c + 1) % s.cycled_classes : c;
    for (int j = 0; j < m; ++j)
      b.labels_[static_cast<std::size_t>(c * m + j)] = j < s.reassigned_clusters ? (cycled + 1 + j) % k : cycled;
  }
  return b;
}

template <class Scalar>
Dataset<Scalar> ClusterTask::sample(Index n, std::uint64_t seed) const {
  if (n < 1) detail::fail("ClusterTask::sample", "n must be >= 1, got ", n);
  Dataset<Scalar> data;
  data.num_classes = config_.num_classes;
  data.X.resize(n, config_.dim);
  data.y.resize(static_cast<std::size_t>(n));
  detail::Random rng(seed);
  const Index clusters = centres_.rows();
  for (Index i = 0; i < n; ++i) {
    const Index c = std::min<Index>(clusters - 1, static_cast<Index>(rng.uniform() * static_cast<double>(clusters)));
    for (Index j = 0; j < config_.dim; ++j)
      data.X(i, j) = static_cast<Scalar>(centres_(c, j) + config_.noise * rng.normal());
    data.y[static_cast<std::size_t>(i)] = labels_[static_cast<std::size_t>(c)];
  }
  return data;
}

template <class Scalar>
MiniBatches<Scalar>::MiniBatches(const Dataset<Scalar>& data, Index batch_size, std::uint64_t seed, bool drop_last)
    : data_(&data), batch_size_(batch_size), rng_(seed) {
  constexpr const char* where = "MiniBatches::MiniBatches";
  data.validate(where);
  if (batch_size < 1) detail::fail(where, "batch_size must be >= 1, got ", batch_size);
  const Index n = data.size();
  num_batches_ = drop_last ? n / batch_size : (n + batch_size - 1) / batch_size;
  if (num_batches_ == 0)
    detail::fail(where, "drop_last with batch_size ", batch_size, " > dataset size ", n, " leaves no batch");
  order_.resize(static_cast<std::size_t>(n));
  std::iota(order_.begin(), order_.end(), Index(0));
}

template <class Scalar>
void MiniBatches<Scalar>::shuffle() {
  // Fisher-Yates with the portable stream (std::shuffle's result differs between standard libraries).
  for (std::size_t i = order_.size(); i > 1; --i) {
    const auto j = static_cast<std::size_t>(rng_.next_u64() % i);
    std::swap(order_[i - 1], order_[j]);
  }
}

template <class Scalar>
const typename MiniBatches<Scalar>::Batch& MiniBatches<Scalar>::load(Index b) {
  if (b < 0 || b >= num_batches_) detail::fail("MiniBatches::load", "batch ", b, " is outside [0, ", num_batches_, ")");
  const Index begin = b * batch_size_;
  const Index rows = std::min(batch_size_, data_->size() - begin);
  Batch& batch = rows == batch_size_ ? full_ : tail_;
  batch.X.resize(rows, data_->dim());
  batch.y.resize(static_cast<std::size_t>(rows));
  for (Index i = 0; i < rows; ++i) {
    const Index src = order_[static_cast<std::size_t>(begin + i)];
    batch.X.row(i) = data_->X.row(src);
    batch.y[static_cast<std::size_t>(i)] = data_->y[static_cast<std::size_t>(src)];
  }
  return batch;
}

}  // namespace lora::data
