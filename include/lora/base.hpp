// lora.hpp: FrozenBase, the frozen linear layer y = x W0^T + b that LoRA adapts, as an object of its own.
//
// A base is immutable once built and held through std::shared_ptr<const FrozenBase>, so one base can serve
// several LoRA layers, models and threads at once with no copy of W0. It either owns its values
// (make_base copies them in) or borrows them (borrow_base: a read-only view over memory the caller owns
// and keeps alive and unchanged, for example a memory-mapped checkpoint). FrozenBase is the small
// interface a LoRA layer needs from its base (the forward product, the dX product, rows for merge);
// DenseBase is the dense kind, and quantized kinds implement the same interface.
#pragma once

#include <lora/common.hpp>
#include <lora/detail/gemm.hpp>
#include <lora/detail/kernels.hpp>

#include <memory>
#include <string>

namespace lora {

// What a base's products keep between calls: the block sizes of each thread's part (the pack buffers
// themselves are the thread's, detail::PackArena) and the decoding rows, so that a steady-state loop
// allocates nothing.
template <class Scalar>
struct BaseWorkspace {
  detail::GemmBuffers<Scalar> forward, backward;
  // The <= 8 activation rows a quantized base's decoding GEMV reads reordered (lora/quant/quant.hpp), kept
  // at its size.
  Matrix<Scalar> decode_x;
};

template <class Scalar>
class FrozenBase {
  static_assert(is_supported_scalar_v<Scalar>, "FrozenBase<Scalar> supports float and double only.");

 public:
  using VectorMap = Eigen::Map<const Vector<Scalar>>;

  virtual ~FrozenBase() = default;
  FrozenBase(const FrozenBase&) = delete;
  FrozenBase& operator=(const FrozenBase&) = delete;

  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  bool has_bias() const { return bias_ != nullptr; }
  // The bias [out] (empty without one).
  VectorMap bias() const { return VectorMap(bias_, bias_ ? out_ : 0); }

  // Y = X W0^T (+ b when add_bias). X [n x in] and Y [n x out] are row-major with packed rows and must not
  // overlap. Thread-safe: the base is only read; `work` belongs to the calling thread.
  virtual void forward(const Scalar* X, Index n, Scalar* Y, BaseWorkspace<Scalar>& work, bool add_bias) const = 0;
  // The LoRA forward fused into the base's product, where the base can run it:
  //   Y = X W0^T + T V + 1 bias^T, T = X U (U = low.u, [in x r]) from the same packed panels of X, or T given
  // (low.u == nullptr); see detail::GemmLowRank. Returns false, having written nothing, where it cannot
  // (the caller then runs forward() and the rank-r terms on their own): the BLAS build, decoding-sized n.
  virtual bool forward_low_rank(const Scalar* X, Index n, Scalar* Y, const detail::GemmLowRank<Scalar>& low,
                                BaseWorkspace<Scalar>& work) const {
    (void)X, (void)n, (void)Y, (void)low, (void)work;
    return false;
  }
  // dX = dY W0, dY [n x out], dX [n x in] (assigned), same layout rules.
  virtual void backward_input(const Scalar* dY, Index n, Scalar* dX, BaseWorkspace<Scalar>& work) const = 0;
  // The same with the adapters' part fused in: dX = dY W0 + T V, T = low.t given ([n x r], low.u is
  // nullptr), V = low.v [r x in]. Returns false, having written nothing, where the base cannot.
  virtual bool backward_input_low_rank(const Scalar* dY, Index n, Scalar* dX, const detail::GemmLowRank<Scalar>& low,
                                       BaseWorkspace<Scalar>& work) const {
    (void)dY, (void)n, (void)dX, (void)low, (void)work;
    return false;
  }
  // Rows [first, first + count) of W0 as dense values, into dst (count x in, row-major).
  virtual void dense_rows(Index first, Index count, Scalar* dst) const = 0;
  // W0 as dense row-major values when it is stored that way, else nullptr.
  virtual const Scalar* dense_weight() const = 0;
  // max |W0| (merge bounds its result with it).
  virtual Scalar max_abs() const = 0;
  // Bytes of weight storage this object owns (0 for a borrowed view).
  virtual std::size_t owned_bytes() const = 0;
  virtual std::string describe() const = 0;

 protected:
  FrozenBase(Index out, Index in, const Scalar* bias) : out_(out), in_(in), bias_(bias) {}
  void set_bias_pointer(const Scalar* bias) { bias_ = bias; }

 private:
  Index out_ = 0, in_ = 0;
  const Scalar* bias_ = nullptr;
};

// A dense W0 [out x in] (row-major) and optional bias, owned or borrowed.
template <class Scalar>
class DenseBase final : public FrozenBase<Scalar> {
 public:
  using MatrixType = Matrix<Scalar>;
  using VectorType = Vector<Scalar>;

  // Owning: copies W0 (and the bias, when it has entries). Throws for an empty or non-finite W0 or bias,
  // or a bias whose length is not out_features.
  DenseBase(MatrixType W0, VectorType bias)
      : FrozenBase<Scalar>(W0.rows(), W0.cols(), nullptr), owned_W_(std::move(W0)), owned_b_(std::move(bias)) {
    W_ = owned_W_.data();
    if (owned_b_.size() > 0) this->set_bias_pointer(owned_b_.data());
    check("make_base", owned_b_.size() > 0 ? owned_b_.size() : -1);
  }

  // Borrowing: reads W0 [out x in] at W (row-major, packed rows) and the bias at `bias` (nullptr: none).
  DenseBase(const Scalar* W, Index out, Index in, const Scalar* bias)
      : FrozenBase<Scalar>(out, in, bias), W_(W), borrowed_(true) {
    if (!W) detail::fail("borrow_base", "W0 is a null pointer");
    check("borrow_base", bias ? out : -1);
  }

  void forward(const Scalar* X, Index n, Scalar* Y, BaseWorkspace<Scalar>& work, bool add_bias) const override {
    const Index in = this->in_features(), out = this->out_features();
    if (n <= small_batch) {
      // matrix-vector-like: one row-parallel pass over W0 on all threads
      detail::row_dots(n, out, in, X, in, W_, in, Y, out);
    } else {
      Eigen::Map<MatrixType> Ym(Y, n, out);
      detail::gemm_parallel(work.forward, Eigen::Map<const MatrixType>(X, n, in), ColMajorMap(W_, in, out), Ym);
    }
    if (add_bias && this->has_bias()) Eigen::Map<MatrixType>(Y, n, out).rowwise() += this->bias().transpose();
  }

  bool forward_low_rank(const Scalar* X, Index n, Scalar* Y, const detail::GemmLowRank<Scalar>& low,
                        BaseWorkspace<Scalar>& work) const override {
#ifdef EIGEN_USE_BLAS
    (void)X, (void)n, (void)Y, (void)low, (void)work;
    return false;  // the BLAS runs the big product
#else
    if (n <= small_batch) return false;  // the row-parallel pass of forward()
    const Index in = this->in_features();
    auto g = detail::row_major_operands(n, this->out_features(), in, X, Y);
    g.b = W_;  // B = W0^T: B(p, j) = W0(j, p)
    g.b_rs = 1;
    g.b_cs = in;
    detail::packed_gemm_parallel(work.forward, g, &low);
    return true;
#endif
  }

  void backward_input(const Scalar* dY, Index n, Scalar* dX, BaseWorkspace<Scalar>& work) const override {
    const Index in = this->in_features(), out = this->out_features();
    Eigen::Map<MatrixType> dXm(dX, n, in);
    detail::gemm_parallel(work.backward, Eigen::Map<const MatrixType>(dY, n, out),
                      Eigen::Map<const MatrixType>(W_, out, in), dXm);
  }

  bool backward_input_low_rank(const Scalar* dY, Index n, Scalar* dX, const detail::GemmLowRank<Scalar>& low,
                               BaseWorkspace<Scalar>& work) const override {
#ifdef EIGEN_USE_BLAS
    (void)dY, (void)n, (void)dX, (void)low, (void)work;
    return false;  // the BLAS runs the big product
#else
    if (n <= small_batch) return false;  // few rows: Eigen's matrix-vector-like product of backward_input()
    const Index in = this->in_features();
    auto g = detail::row_major_operands(n, in, this->out_features(), dY, dX);
    g.b = W_;  // B = W0
    g.b_rs = in;
    g.b_cs = 1;
    detail::packed_gemm_parallel(work.backward, g, &low);
    return true;
#endif
  }

  void dense_rows(Index first, Index count, Scalar* dst) const override {
    const Index in = this->in_features();
    std::copy(W_ + first * in, W_ + (first + count) * in, dst);
  }
  const Scalar* dense_weight() const override { return W_; }
  Scalar max_abs() const override { return max_abs_; }
  std::size_t owned_bytes() const override {
    return static_cast<std::size_t>(owned_W_.size() + owned_b_.size()) * sizeof(Scalar);
  }
  std::string describe() const override {
    return detail::concat(borrowed_ ? "DenseBase(borrowed, " : "DenseBase(", this->in_features(), " -> ",
                          this->out_features(), this->has_bias() ? ", bias)" : ")");
  }
  bool borrowed() const { return borrowed_; }

  // W0 as an Eigen view.
  Eigen::Map<const MatrixType> weight() const {
    return Eigen::Map<const MatrixType>(W_, this->out_features(), this->in_features());
  }

 private:
  template <class S>
  friend class LoraLinear;

  // Below this batch size X W0^T is matrix-vector-like.
  static constexpr Index small_batch = 8;
  using ColMajorMap = Eigen::Map<const Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>>;

  void check(const char* where, Index bias_size) {
    const Index out = this->out_features(), in = this->in_features();
    if (out == 0 || in == 0) detail::fail(where, "W0 is empty (", out, " x ", in, ")");
    if (bias_size >= 0 && bias_size != out)
      detail::fail(where, "bias has ", bias_size, " entries, expected out_features = ", out);
    const auto W = weight();
    detail::require_finite(where, "W0", W);
    if (this->has_bias()) detail::require_finite(where, "bias", this->bias());
    max_abs_ = W.cwiseAbs().maxCoeff();
  }

  // For a LoraLinear that is the only holder of an owned base: merge writes W0 in place.
  Scalar* mutable_weight() { return borrowed_ ? nullptr : owned_W_.data(); }
  void set_max_abs(Scalar m) { max_abs_ = m; }

  MatrixType owned_W_;
  VectorType owned_b_;
  const Scalar* W_ = nullptr;
  bool borrowed_ = false;
  Scalar max_abs_ = 0;
};

// A base that owns a copy of W0 [out x in] (any Eigen expression; cast to Scalar) and, optionally, a bias
// [out] given as a row or column vector.
template <class Scalar, class DerivedW>
std::shared_ptr<const DenseBase<Scalar>> make_base(const Eigen::MatrixBase<DerivedW>& W0) {
  return std::make_shared<DenseBase<Scalar>>(Matrix<Scalar>(W0.template cast<Scalar>()), Vector<Scalar>());
}

template <class Scalar, class DerivedW, class DerivedB>
std::shared_ptr<const DenseBase<Scalar>> make_base(const Eigen::MatrixBase<DerivedW>& W0,
                                                   const Eigen::MatrixBase<DerivedB>& bias) {
  if (bias.rows() != 1 && bias.cols() != 1)
    detail::fail("make_base", "bias must be a vector, got shape ", detail::shape_of(bias));
  if (bias.size() == 0) detail::fail("make_base", "bias is empty; build the base without a bias instead");
  Vector<Scalar> b(bias.size());
  for (Index i = 0; i < bias.size(); ++i) b(i) = static_cast<Scalar>(bias.derived().reshaped()(i));
  return std::make_shared<DenseBase<Scalar>>(Matrix<Scalar>(W0.template cast<Scalar>()), std::move(b));
}

// A base that reads W0 [out x in] (row-major, packed rows) and the bias [out] (or nullptr) where they are:
// nothing is copied. The caller keeps that memory alive and unchanged while any layer uses the base.
template <class Scalar>
std::shared_ptr<const DenseBase<Scalar>> borrow_base(const Scalar* W0, Index out_features, Index in_features,
                                                     const Scalar* bias = nullptr) {
  return std::make_shared<DenseBase<Scalar>>(W0, out_features, in_features, bias);
}

template <class Scalar>
std::shared_ptr<const DenseBase<Scalar>> borrow_base(const Eigen::Map<const Matrix<Scalar>>& W0,
                                                     const Scalar* bias = nullptr) {
  return borrow_base<Scalar>(W0.data(), W0.rows(), W0.cols(), bias);
}

}  // namespace lora
