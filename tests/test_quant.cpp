// The quantized frozen base (lora/quant): codes and scales against an independent implementation
// (tests/data/make_quant_fixture.py, checked against bitsandbytes), products against a dense reference over
// the dequantized matrix, LoRA training over it (central differences), and the merge rules.
#include <lora/lora.hpp>
#include <lora/quant/merge.hpp>
#include <lora/quant/quant.hpp>

#include "gradient_check.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

using lora::Index;
using lora::LoraConfig;
using lora::LoraLinear;
using lora::Matrix;
using lora::Vector;
using lora::testing::contains;
using lora::testing::message_of;
using lora::testing::numerical_gradient;
using lora::testing::random_matrix;
using lora::testing::relative_error;
namespace quant = lora::quant;
using nlohmann::json;

namespace {

// The fixture's weights: integer arithmetic, one division and one product in double, rounded to float.
Matrix<float> fixture_weights(Index rows, Index cols) {
  Matrix<float> W(rows, cols);
  for (Index i = 0; i < rows * cols; ++i) {
    const double v = static_cast<double>((i * 7919) % 2001 - 1000) / 1000.0 * (1.0 + static_cast<double>((i / 64) % 17) / 4.0);
    W(i / cols, i % cols) = static_cast<float>(v);
  }
  return W;
}

std::vector<std::uint8_t> from_hex(const std::string& s) {
  std::vector<std::uint8_t> out(s.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<std::uint8_t>(std::stoi(s.substr(2 * i, 2), nullptr, 16));
  return out;
}

std::vector<float> floats(const json& j) { return j.get<std::vector<float>>(); }

template <class Scalar>
Matrix<Scalar> dequantized(const quant::QuantizedWeight& q) {
  Matrix<Scalar> D(q.out, q.in);
  q.dequantize_rows(0, q.out, D.data());
  return D;
}

// Dequantized values agree with the fixture's (float32, computed separately) to a float rounding or two:
// a compiler may fuse the absmax's multiply-add.
void check_dequantized(const quant::QuantizedWeight& q, const json& c, Index stride) {
  const Matrix<double> D = dequantized<double>(q);
  const std::vector<float> sample = floats(c["dequantized_sample"]);
  for (std::size_t k = 0; k < sample.size(); ++k) {
    const Index i = static_cast<Index>(k) * stride;
    INFO("element " << i);
    CHECK(std::abs(D.data()[i] - sample[k]) <= 1e-6 * std::max(1.0, std::abs(static_cast<double>(sample[k]))));
  }
  CHECK(std::abs(D.sum() - c["dequantized_sum"].get<double>()) <= 1e-6 * D.cwiseAbs().sum());
}

LoraConfig config(int rank) {
  LoraConfig c;
  c.rank = rank;
  c.alpha = 2 * rank;
  c.seed = 3;
  return c;
}

}  // namespace

TEST_CASE("NF4, NF4 with double quantization and int8 give the independent implementation's codes", "[quant]") {
  const std::string path = std::string(LORA_TEST_DATA_DIR) + "/quant_fixture.json";
  std::ifstream in(path);
  REQUIRE(in.good());
  const json fixture = json::parse(in);
  REQUIRE(fixture["cases"].size() == 3);
  for (const json& c : fixture["cases"]) {
    const Index rows = c["rows"], cols = c["cols"], stride = c["sample_stride"];
    INFO(rows << " x " << cols);
    const Matrix<float> W = fixture_weights(rows, cols);

    const quant::QuantizedWeight dq = quant::quantize_nf4(W);
    CHECK(dq.codes == from_hex(c["nf4_dq"]["codes"]));
    CHECK(dq.qabsmax == from_hex(c["nf4_dq"]["qabsmax"]));
    CHECK(dq.absmax2 == floats(c["nf4_dq"]["absmax2"]));
    CHECK(dq.offset == c["nf4_dq"]["offset"].get<float>());
    CHECK(dq.absmax.empty());
    check_dequantized(dq, c["nf4_dq"], stride);

    quant::Nf4Options plain;
    plain.double_quant = false;
    const quant::QuantizedWeight q4 = quant::quantize_nf4(W, plain);
    CHECK(q4.codes == from_hex(c["nf4"]["codes"]));
    CHECK(q4.absmax == floats(c["nf4"]["absmax"]));
    check_dequantized(q4, c["nf4"], stride);

    const quant::QuantizedWeight q8 = quant::quantize_int8(W);
    CHECK(q8.codes == from_hex(c["int8"]["codes"]));
    CHECK(q8.absmax == floats(c["int8"]["absmax"]));
    check_dequantized(q8, c["int8"], stride);

    // The same codes from a double matrix holding the same values.
    CHECK(quant::quantize_nf4(W.cast<double>()).codes == dq.codes);
  }
}

TEST_CASE("quantization error and storage per format", "[quant]") {
  const Matrix<float> W = random_matrix<float>(256, 512, 5);
  const double bits_dq = 8.0 * static_cast<double>(quant::quantize_nf4(W).bytes()) / static_cast<double>(W.size());
  quant::Nf4Options plain;
  plain.double_quant = false;
  const double bits_nf4 = 8.0 * static_cast<double>(quant::quantize_nf4(W, plain).bytes()) / static_cast<double>(W.size());
  const double bits_int8 = 8.0 * static_cast<double>(quant::quantize_int8(W).bytes()) / static_cast<double>(W.size());
  CHECK(bits_dq == Approx(4.127).epsilon(1e-3));
  CHECK(bits_nf4 == Approx(4.5));
  CHECK(bits_int8 == Approx(8.0 + 32.0 / 512));
  const double e_dq = relative_error(dequantized<float>(quant::quantize_nf4(W)), W);
  const double e_nf4 = relative_error(dequantized<float>(quant::quantize_nf4(W, plain)), W);
  const double e_int8 = relative_error(dequantized<float>(quant::quantize_int8(W)), W);
  WARN("relative Frobenius error on uniform(-1, 1) weights: nf4+dq " << e_dq << ", nf4 " << e_nf4 << ", int8 " << e_int8);
  CHECK(e_nf4 < 0.12);
  CHECK(e_dq < e_nf4 * 1.01);
  CHECK(e_int8 < 0.01);
}

TEMPLATE_TEST_CASE("QuantizedBase products equal a dense product over the dequantized W0", "[quant]", float, double) {
  using Scalar = TestType;
  const double tol = 1e-5;
  lora::testing::ThreadSmallWork small_work;  // the 2-thread splits run at these sizes too
  for (const bool int8 : {false, true}) {
    for (const Index in : {Index(70), Index(128)}) {
      const Index out = 45;
      const Matrix<float> W = random_matrix<float>(out, in, 11);
      const quant::QuantizedWeight q = int8 ? quant::quantize_int8(W) : quant::quantize_nf4(W);
      const Vector<Scalar> bias = random_matrix<Scalar>(out, 1, 12);
      const quant::QuantizedBase<Scalar> base(q, bias);
      const Matrix<Scalar> D = dequantized<Scalar>(q);
      CHECK(base.dense_weight() == nullptr);
      CHECK(base.max_abs() == Approx(static_cast<double>(D.cwiseAbs().maxCoeff())).epsilon(1e-6));
      lora::BaseWorkspace<Scalar> work;
      for (const int threads : {1, 2}) {
        lora::set_num_threads(threads);
        for (const Index n : {Index(1), Index(3), Index(8), Index(17), Index(64)}) {
          INFO((int8 ? "int8" : "nf4") << ", in " << in << ", n " << n << ", threads " << threads);
          const Matrix<Scalar> X = random_matrix<Scalar>(n, in, 13);
          Matrix<Scalar> Y(n, out), dX(n, in);
          base.forward(X.data(), n, Y.data(), work, true);
          Matrix<Scalar> ref = X * D.transpose();
          ref.rowwise() += bias.transpose();
          CHECK(relative_error(Y, ref) < tol);
          base.forward(X.data(), n, Y.data(), work, false);
          CHECK(relative_error(Y, Matrix<Scalar>(X * D.transpose())) < tol);
          const Matrix<Scalar> dY = random_matrix<Scalar>(n, out, 14);
          base.backward_input(dY.data(), n, dX.data(), work);
          CHECK(relative_error(dX, Matrix<Scalar>(dY * D)) < tol);
        }
      }
      lora::set_num_threads(1);
      Matrix<Scalar> rows(3, in);
      base.dense_rows(40, 3, rows.data());
      CHECK(rows == D.middleRows(40, 3));
    }
  }
}

TEST_CASE("LoRA over a quantized base trains as over the dense dequantized base, gradients by central differences", "[quant]") {
  const Matrix<float> W = random_matrix<float>(20, 72, 21);
  const quant::QuantizedWeight q = quant::quantize_nf4(W);
  const Matrix<double> D = dequantized<double>(q);
  LoraLinear<double> layer(quant::make_quantized_base<double>(q), config(3));
  LoraLinear<double> dense(D, config(3));
  const Matrix<double> A = random_matrix<double>(3, 72, 22), B = random_matrix<double>(20, 3, 23);
  layer.set_adapter_weights("default", A, B);
  dense.set_adapter_weights("default", A, B);
  CHECK(contains(layer.base().describe(), "nf4"));
  CHECK(contains(message_of([&] { layer.base_weight(); }), "not stored as dense values"));
  for (const Index n : {Index(4), Index(12)}) {  // the fused n <= 8 pass and the tiled one
    INFO("n " << n);
    const Matrix<double> X = random_matrix<double>(n, 72, 24);
    const Matrix<double> R = random_matrix<double>(n, 20, 25);
    CHECK(relative_error(layer.forward(X), dense.forward(X)) < 1e-12);
    layer.zero_grad();
    dense.zero_grad();
    layer.forward(X);
    const Matrix<double> dX = layer.backward(R);
    dense.forward(X);
    CHECK(relative_error(dX, dense.backward(R)) < 1e-12);
    CHECK(relative_error(layer.grad_A(), dense.grad_A()) < 1e-12);
    CHECK(relative_error(layer.grad_B(), dense.grad_B()) < 1e-12);
    Matrix<double> Xv = X;
    auto loss = [&] { return layer.forward(Xv).cwiseProduct(R).sum(); };
    CHECK(relative_error(dX, numerical_gradient(Xv, loss)) < 1e-7);
    const Matrix<double> gA = layer.grad_A(), gB = layer.grad_B();
    auto A_view = layer.A();
    Matrix<double> Av = A_view;
    auto loss_A = [&] {
      layer.A() = Av;
      return layer.forward(X).cwiseProduct(R).sum();
    };
    CHECK(relative_error(gA, numerical_gradient(Av, loss_A)) < 1e-7);
    layer.A() = A;
    Matrix<double> Bv = layer.B();
    auto loss_B = [&] {
      layer.B() = Bv;
      return layer.forward(X).cwiseProduct(R).sum();
    };
    CHECK(relative_error(gB, numerical_gradient(Bv, loss_B)) < 1e-7);
    layer.B() = B;
  }
}

TEST_CASE("merging into a quantized base: refused, merge_and_dequantize, merge_and_requantize on request", "[quant]") {
  const Matrix<float> W = random_matrix<float>(64, 128, 31);
  const quant::QuantizedWeight q = quant::quantize_nf4(W);
  const Vector<float> bias = random_matrix<float>(64, 1, 32);
  LoraLinear<float> layer(quant::make_quantized_base<float>(q, bias), config(4));
  // A delta far below the NF4 step: requantizing loses most of it.
  layer.set_adapter_weights("default", Matrix<float>(1e-3f * random_matrix<float>(4, 128, 33)),
                            Matrix<float>(1e-3f * random_matrix<float>(64, 4, 34)));
  const Matrix<float> X = random_matrix<float>(16, 128, 35);
  const Matrix<float> Y = layer.forward(X);

  const std::string refused = message_of([&] { layer.merge(); });
  CHECK(contains(refused, "LoraLinear::merge"));
  CHECK(contains(refused, "quantization step"));
  CHECK(contains(refused, "merge_and_dequantize"));
  CHECK_FALSE(layer.merged());
  CHECK(layer.forward(X) == Y);  // nothing changed

  const auto dense = quant::merge_and_dequantize(layer);
  Matrix<float> Yd = X * dense->weight().transpose();
  Yd.rowwise() += dense->bias().transpose();
  CHECK(relative_error(Yd, Y) < 1e-5);
  CHECK(dense->bias() == bias);

  const quant::Requantized<float> r = quant::merge_and_requantize(layer, X);
  WARN("requantized merge of a small delta (1e-6 times the weights): weight change " << r.report.weight_change << ", output change "
                                                                 << r.report.output_change << ", delta retained "
                                                                 << r.report.delta_retained);
  CHECK(r.report.weight_change > 0);
  CHECK(r.report.output_change > 0);
  CHECK(std::abs(r.report.delta_retained) < 0.5);  // most of a delta below the step is lost
  // A delta as large as the weights survives requantization.
  LoraLinear<float> big(quant::make_quantized_base<float>(q, bias), config(4));
  big.set_adapter_weights("default", random_matrix<float>(4, 128, 36), random_matrix<float>(64, 4, 37));
  const quant::Requantized<float> rb = quant::merge_and_requantize(big, X);
  WARN("requantized merge of a delta as large as W0: delta retained " << rb.report.delta_retained);
  CHECK(rb.report.delta_retained > 0.9);
  CHECK(r.base->weight().format == quant::Format::nf4);
  CHECK(contains(message_of([&] { quant::merge_and_requantize(layer, Matrix<float>(3, 5)); }), "probe must be m x 128"));
  LoraLinear<float> plain(W, config(2));
  CHECK(contains(message_of([&] { quant::merge_and_requantize(plain, X); }), "is not a QuantizedBase"));
}

TEST_CASE("quantizers and QuantizedBase: bad input", "[quant]") {
  const Matrix<float> W = random_matrix<float>(4, 8, 41);
  quant::Nf4Options odd;
  odd.block_size = 63;
  CHECK(contains(message_of([&] { quant::quantize_nf4(W, odd); }), "quantize_nf4: block_size must be even"));
  quant::Nf4Options zero2;
  zero2.absmax_block_size = 0;
  CHECK(contains(message_of([&] { quant::quantize_nf4(W, zero2); }), "absmax_block_size must be >= 1"));
  CHECK(contains(message_of([&] { quant::quantize_nf4(Matrix<float>(0, 3)); }), "W0 is empty"));
  CHECK(contains(message_of([&] { quant::quantize_int8(Matrix<float>(2, 0)); }), "quantize_int8: W0 is empty"));
  Matrix<float> bad = W;
  bad(1, 2) = std::nanf("");
  CHECK(contains(message_of([&] { quant::quantize_nf4(bad); }), "quantize_nf4"));
  CHECK(contains(message_of([&] { quant::quantize_int8(bad); }), "quantize_int8"));
  CHECK(contains(message_of([&] { quant::QuantizedBase<float>(quant::quantize_int8(W), Vector<float>::Ones(3)); }),
                 "bias has 3 entries, expected out_features = 4"));
  // An all-zero block quantizes to zeros (no division by zero).
  const Matrix<float> Z = Matrix<float>::Zero(2, 64);
  CHECK(dequantized<float>(quant::quantize_nf4(Z)).isZero(0));
  CHECK(dequantized<float>(quant::quantize_int8(Z)).isZero(0));
}
