// The quantized frozen base (lora/quant): codes and scales against an independent implementation
// (tests/data/make_quant_fixture.py, checked against bitsandbytes), products against a dense reference over
// the dequantized matrix, LoRA training over it (central differences), the merge rules, and the
// quantized-base files (lora/io/quantized.hpp): bit-for-bit round trips and one test per refusal.
#include <lora/io.hpp>
#include <lora/lora.hpp>
#include <lora/quant/merge.hpp>
#include <lora/quant/model.hpp>
#include <lora/quant/quant.hpp>

#include "instances.hpp"
#include "gradient_check.hpp"
#include "temp_files.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <utility>
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
    for (const Index in : {Index(70), Index(71), Index(128)}) {
      const Index out = 45;
      const Matrix<float> W = random_matrix<float>(out, in, 11);
      const quant::QuantizedWeight q = int8 ? quant::quantize_int8(W) : quant::quantize_nf4(W);
      const Vector<Scalar> bias = random_matrix<Scalar>(out, 1, 12);
      const quant::QuantizedBase<Scalar> base(q, bias);
      const Matrix<Scalar> D = dequantized<Scalar>(q);
      CHECK(base.dense_weight() == nullptr);
      CHECK(base.max_abs() == Approx(static_cast<double>(D.cwiseAbs().maxCoeff())).epsilon(1e-6));
      using Blocking = lora::detail::GemmBlocking<Scalar>;
      for (const int threads : {1, 2}) for (const bool small_blocks : {false, true}) {
        lora::set_num_threads(threads);
        // Small block sizes put every panel and block edge inside these products: an odd kc starts the
        // dequantized segments at odd codes, and nc cuts W0's rows (forward) and columns (dX) mid-panel.
        lora::BaseWorkspace<Scalar> work;
        if (small_blocks) {
          work.forward.resize(2);
          work.backward.resize(2);
          for (auto* buffers : {&work.forward, &work.backward})
            for (Blocking& b : *buffers) b.set_block_sizes(Blocking::MR, 13, 2 * Blocking::NR);
        }
        for (const Index n : {Index(1), Index(3), Index(8), Index(9), Index(17), Index(64)}) {
          INFO((int8 ? "int8" : "nf4") << ", in " << in << ", n " << n << ", threads " << threads
                                       << (small_blocks ? ", small blocks" : ""));
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

TEST_CASE("nn::Linear over a quantized base: the products, a frozen weight, the bias its own", "[quant][nn]") {
  const Matrix<float> W = random_matrix<float>(24, 80, 41);
  const Vector<double> bias = random_matrix<double>(24, 1, 42);
  for (const quant::Format format : {quant::Format::nf4, quant::Format::int8}) {
    INFO(quant::format_name(format));
    const quant::QuantizedWeight q = format == quant::Format::nf4 ? quant::quantize_nf4(W) : quant::quantize_int8(W);
    const Matrix<double> D = dequantized<double>(q);
    lora::nn::Linear<double> layer(quant::make_quantized_base<double>(q, bias));
    lora::nn::Linear<double> dense(D, bias);
    dense.set_trainable(false, false);
    CHECK(layer.weight_values() == D);
    CHECK(layer.num_parameters() == 24 * 80 + 24);
    CHECK(layer.num_trainable_parameters() == 0);
    CHECK(contains(layer.describe(), quant::format_name(format)));
    for (const Index n : {Index(3), Index(17)}) {  // the fused pass and the packed product
      INFO("n " << n);
      const Matrix<double> X = random_matrix<double>(n, 80, 43);
      const Matrix<double> R = random_matrix<double>(n, 24, 44);
      layer.train();
      dense.train();
      CHECK(relative_error(layer.forward(X), dense.forward(X)) < 1e-12);
      CHECK(relative_error(layer.backward(R), dense.backward(R)) < 1e-12);
      lora::nn::InferenceContext<double> ctx;
      CHECK(relative_error(layer.infer(X, ctx), dense.forward(X)) < 1e-12);
      // A strided input (a column block of a wider matrix) is read through a packed copy.
      const Matrix<double> wide = random_matrix<double>(n, 100, 45);
      const Matrix<double> expect = dense.forward(wide.leftCols(80));
      CHECK(relative_error(layer.forward(wide.leftCols(80)), expect) < 1e-12);
    }
    // The weight never trains; the bias does on request, with its gradient checked.
    CHECK(contains(message_of([&] { layer.set_trainable(true, true); }), "cannot train"));
    CHECK(contains(message_of([&] { layer.weight(); }), "read-only"));
    CHECK(contains(message_of([&] { std::as_const(layer).weight(); }), "weight_values()"));
    CHECK(contains(message_of([&] { layer.set_weight(D); }), "Linear::set_weight"));
    layer.set_requires_grad(true);
    CHECK_FALSE(layer.weight_trainable());
    CHECK(layer.bias_trainable());
    lora::testing::check_module_gradients(layer, random_matrix<double>(5, 80, 46), 47);
    lora::nn::Linear<double> copy = layer;  // shares the base
    CHECK(copy.frozen_base() == layer.frozen_base());
  }
  CHECK(contains(message_of([] { lora::nn::Linear<double>(std::shared_ptr<const lora::FrozenBase<double>>()); }),
                 "null pointer"));
}

namespace {

// 20 -> 32 -> Tanh -> 32 -> Tanh -> 6, Linear layers at layers.0, layers.2 (hidden) and layers.4 (head).
lora::nn::Sequential<double> small_mlp() {
  lora::nn::Sequential<double> m;
  m.add(lora::nn::Linear<double>(20, 32, true, 51));
  m.add(lora::nn::Tanh<double>());
  m.add(lora::nn::Linear<double>(32, 32, true, 52));
  m.add(lora::nn::Tanh<double>());
  m.add(lora::nn::Linear<double>(32, 6, true, 53));
  return m;
}

lora::nn::LoraInjectConfig qlora_config() {
  lora::nn::LoraInjectConfig c;
  c.target_modules = {"layers.0", "layers.2"};
  c.modules_to_save = {"layers.4"};
  c.rank = 3;
  c.alpha = 6;
  c.init = lora::InitMethod::random;  // B drawn too: the adapters change the output from the start
  c.seed = 54;
  return c;
}

}  // namespace

TEST_CASE("QLoRA on a model: quantize_model, inject_lora over the shared bases, gradients, merge_and_dequantize", "[quant][nn]") {
  for (const quant::Format format : {quant::Format::nf4, quant::Format::int8}) {
    INFO(quant::format_name(format));
    lora::nn::Sequential<double> model = small_mlp();
    quant::QuantizeModelConfig qc;
    qc.format = format;
    qc.nf4.block_size = 16;  // 32-wide rows: blocks end inside and at row ends
    qc.skip_modules = {"layers.4"};
    CHECK(quant::quantize_model(model, qc) == std::vector<std::string>{"layers.0", "layers.2"});
    CHECK(model.num_trainable_parameters() == 6 * 32 + 6 + 64);  // the head, and the hidden biases kept trainable
    // The reference: the same model in float with the dequantized weights.
    lora::nn::Sequential<double> dense = small_mlp();
    for (const char* name : {"layers.0.weight", "layers.2.weight"}) dense.set_base_tensor(name, model.base_tensor(name));
    CHECK(contains(message_of([&] { model.set_base_tensor("layers.0.weight", model.base_tensor("layers.0.weight")); }),
                   "read-only"));
    const std::size_t float_bytes = quant::base_bytes(dense);
    CHECK(float_bytes == static_cast<std::size_t>(dense.num_parameters()) * sizeof(double));
    const std::size_t q_bytes = quant::base_bytes(model);
    CHECK(q_bytes < float_bytes / 3);

    const auto* base0 = dynamic_cast<const lora::nn::Linear<double>&>(model.module("layers.0")).frozen_base().get();
    lora::nn::inject_lora(model, qlora_config());
    lora::nn::inject_lora(dense, qlora_config());
    CHECK(model.lora_layers()[0].second->shared_base().get() == base0);  // no copy of the quantized base
    CHECK(model.num_trainable_parameters() == dense.num_trainable_parameters());
    const Matrix<double> X = random_matrix<double>(11, 20, 55);
    CHECK(relative_error(model.forward(X), dense.forward(X)) < 1e-12);
    lora::testing::check_module_gradients(model, X, 56);

    // merge() is refused and changes nothing; merge_and_dequantize exports the same function in float.
    model.eval();
    const Matrix<double> Y = model.forward(X);
    CHECK(contains(message_of([&] { model.merge(); }), "quantization step"));
    CHECK_FALSE(model.merged());
    CHECK(model.forward(X) == Y);
    lora::nn::Sequential<double> exported = model;
    quant::merge_and_dequantize(exported);
    CHECK(exported.lora_layers().empty());
    CHECK(exported.saved_modules().empty());
    for (const auto& entry : exported.named_modules())
      if (auto* l = dynamic_cast<const lora::nn::Linear<double>*>(entry.second)) CHECK_FALSE(l->frozen_base());
    exported.eval();
    CHECK(relative_error(exported.forward(X), Y) < 1e-12);
    CHECK(quant::base_bytes(exported) == float_bytes);
  }
}

TEST_CASE("quantize_model: LoRA layers and nested modules, skip by sub-tree, refusals that change nothing", "[quant][nn]") {
  // Nested: the attention's four projections are quantized under their dotted paths.
  lora::nn::Sequential<double> model;
  model.add(lora::nn::MultiHeadSelfAttention<double>(8, 2, false, 61));
  model.add(lora::nn::Linear<double>(8, 3, true, 62));
  dynamic_cast<lora::nn::MultiHeadSelfAttention<double>&>(model[0]).set_layout(2, 3, {3, 2});
  const Matrix<double> X = random_matrix<double>(6, 8, 63);
  lora::nn::Sequential<double> reference = model;
  dynamic_cast<lora::nn::MultiHeadSelfAttention<double>&>(reference[0]).set_layout(2, 3, {3, 2});

  quant::QuantizeModelConfig qc;
  qc.nf4.block_size = 8;
  qc.skip_modules = {"layers.1"};
  CHECK(quant::quantize_model(model, qc) ==
        std::vector<std::string>{"layers.0.query", "layers.0.key", "layers.0.value", "layers.0.dense"});
  for (const std::string p : {"query", "key", "value", "dense"})
    reference.set_base_tensor("layers.0." + p + ".weight", model.base_tensor("layers.0." + p + ".weight"));
  CHECK(relative_error(model.forward(X), reference.forward(X)) < 1e-12);

  // Refusals: the model is as it was.
  const Matrix<double> Y = model.forward(X);
  CHECK(contains(message_of([&] { quant::quantize_model(model, qc); }), "'layers.0.query' is already quantized"));
  quant::QuantizeModelConfig typo = qc;
  typo.skip_modules = {"layers.9"};
  CHECK(contains(message_of([&] { quant::quantize_model(model, typo); }), "skip_modules entry 'layers.9' matches no module"));
  quant::QuantizeModelConfig all = qc;
  all.skip_modules = {"layers.0", "layers.1"};  // a sub-tree and a module: nothing left
  CHECK(contains(message_of([&] { quant::quantize_model(model, all); }), "no Linear or LoRA layer is left"));
  all.skip_modules = {"layers"};  // the prefix of every path: the whole model
  CHECK(contains(message_of([&] { quant::quantize_model(model, all); }), "no Linear or LoRA layer is left"));
  quant::QuantizeModelConfig odd = qc;
  odd.nf4.block_size = 7;
  CHECK(contains(message_of([&] { quant::quantize_model(reference, odd); }), "block_size must be even"));
  CHECK(model.forward(X) == Y);

  // After inject_lora: the LoRA layers' bases are quantized in place and the adapters kept.
  lora::nn::Sequential<double> late = small_mlp();
  lora::nn::inject_lora(late, qlora_config());
  const Matrix<double> A = late.lora_layers()[1].second->A();
  quant::QuantizeModelConfig int8;
  int8.format = quant::Format::int8;
  int8.skip_modules = {"layers.4"};
  CHECK(quant::quantize_model(late, int8) == std::vector<std::string>{"layers.0", "layers.2"});
  CHECK(contains(late.lora_layers()[1].second->base().describe(), "int8"));
  CHECK(late.lora_layers()[1].second->A() == A);
  CHECK(contains(message_of([&] { late.set_base_tensor("layers.2.weight", Matrix<double>::Zero(32, 32)); }),
                 "not stored as dense values"));
  // A quantized Linear cannot be a module to save (it could not train).
  lora::nn::Sequential<double> head = small_mlp();
  quant::QuantizeModelConfig none;
  quant::quantize_model(head, none);
  CHECK(contains(message_of([&] { lora::nn::inject_lora(head, qlora_config()); }),
                 "modules_to_save: 'layers.4' reads its weight from the frozen base"));
  CHECK(head.lora_layers().empty());
  lora::nn::Sequential<double> plain = small_mlp();
  CHECK(contains(message_of([&] { quant::merge_and_dequantize(plain); }), "no LoRA layer and no quantized Linear"));
}

TEST_CASE("QLoRA on a BertLayer: the encoder block's Linear leaves quantized under Hugging Face's paths", "[quant][nn]") {
  auto encoder = [] {
    lora::nn::Sequential<double> e("encoder");
    lora::nn::Sequential<double> layers("layer");
    layers.add(lora::nn::BertLayer<double>(8, 2, 16, 1e-12, 71));
    e.add("layer", std::move(layers));
    return e;
  };
  auto block = [](lora::nn::Sequential<double>& e) -> lora::nn::BertLayer<double>& {
    return dynamic_cast<lora::nn::BertLayer<double>&>(dynamic_cast<lora::nn::Sequential<double>&>(e[0])[0]);
  };
  lora::nn::Sequential<double> model = encoder(), dense = encoder();
  quant::QuantizeModelConfig qc;
  qc.nf4.block_size = 8;
  const std::vector<std::string> paths = quant::quantize_model(model, qc);
  CHECK(paths == std::vector<std::string>{"encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
                                          "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense",
                                          "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"});
  for (const std::string& p : paths) dense.set_base_tensor(p + ".weight", model.base_tensor(p + ".weight"));
  lora::nn::LoraInjectConfig c;
  c.target_modules = {"query", "value"};
  c.rank = 2;
  c.alpha = 4;
  c.init = lora::InitMethod::random;
  c.seed = 72;
  lora::nn::inject_lora(model, c);
  lora::nn::inject_lora(dense, c);
  CHECK(model.num_trainable_parameters() == 2 * 2 * (8 + 8));
  CHECK(contains(model.lora_layers()[1].second->base().describe(), "nf4"));
  block(model).set_layout(2, 3, {3, 1});
  block(dense).set_layout(2, 3, {3, 1});
  const Matrix<double> X = random_matrix<double>(6, 8, 73);
  CHECK(relative_error(model.forward(X), dense.forward(X)) < 1e-12);
  const Matrix<double> R = random_matrix<double>(6, 8, 74);
  model.zero_grad();
  dense.zero_grad();
  model.forward(X);
  dense.forward(X);
  CHECK(relative_error(model.backward(R), dense.backward(R)) < 1e-12);
  const auto mp = model.parameters(), dp = dense.parameters();
  REQUIRE(mp.size() == dp.size());
  for (std::size_t k = 0; k < mp.size(); ++k) {
    INFO(mp[k].name);
    CHECK(relative_error(Matrix<double>(mp[k].grad), Matrix<double>(dp[k].grad)) < 1e-12);
  }
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

namespace {

void check_same_weight(const quant::QuantizedWeight& a, const quant::QuantizedWeight& b) {
  CHECK(a.format == b.format);
  CHECK(a.out == b.out);
  CHECK(a.in == b.in);
  CHECK(a.codes == b.codes);
  CHECK(a.qabsmax == b.qabsmax);
  auto same_bits = [](const std::vector<float>& x, const std::vector<float>& y) {
    return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * 4) == 0);
  };
  CHECK(same_bits(a.absmax, b.absmax));
  CHECK(same_bits(a.absmax2, b.absmax2));
  CHECK(std::memcmp(&a.offset, &b.offset, 4) == 0);
  if (a.format == quant::Format::nf4) {
    CHECK(a.options.block_size == b.options.block_size);
    CHECK(a.options.double_quant == b.options.double_quant);
    if (a.options.double_quant) CHECK(a.options.absmax_block_size == b.options.absmax_block_size);
  }
  const Matrix<float> Da = dequantized<float>(a), Db = dequantized<float>(b);
  CHECK(std::memcmp(Da.data(), Db.data(), static_cast<std::size_t>(Da.size()) * 4) == 0);
}

// A safetensors file as editable parts, to build the bad files of the refusal tests from a good one.
struct RawFile {
  struct Tensor {
    lora::Dtype dtype;
    std::vector<std::uint64_t> shape;
    std::vector<unsigned char> bytes;
  };
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;

  explicit RawFile(const lora::SafetensorsReader& r) {
    for (const auto& t : r.tensors()) {
      std::vector<unsigned char> b(static_cast<std::size_t>(t.end - t.begin));
      r.read_bytes(t, b.data());
      tensors[t.name] = {t.dtype, t.shape, b};
    }
    for (const auto& kv : r.metadata()) metadata[kv.first] = kv.second;
  }
  void write(const std::string& path) const {
    lora::SafetensorsWriter w;
    for (const auto& kv : tensors) w.add_raw(kv.first, kv.second.dtype, kv.second.shape, kv.second.bytes);
    for (const auto& kv : metadata) w.set_metadata(kv.first, kv.second);
    w.save(path);
  }
};

std::string io_message_of(const std::string& path) {
  try {
    lora::load_quantized(path);
  } catch (const lora::io_error& e) {
    return e.what();
  }
  return "(no io_error)";
}

}  // namespace

TEST_CASE("quantized base files: bit-for-bit round trips, NF4 with and without double quantization, int8", "[quant][io]") {
  lora::testing::TempDir dir;
  quant::Nf4Options plain;
  plain.double_quant = false;
  quant::Nf4Options small;  // several absmax2 blocks and a short last one
  small.block_size = 6;
  small.absmax_block_size = 3;
  lora::QuantizedWeights weights;
  for (const auto& [out, in] : std::vector<std::pair<Index, Index>>{{7, 9}, {45, 70}, {1, 1}, {3, 128}}) {
    const Matrix<float> W = random_matrix<float>(out, in, static_cast<unsigned>(out * 131 + in));
    const std::string shape = std::to_string(out) + "x" + std::to_string(in);
    weights["nf4dq." + shape + ".weight"] = quant::quantize_nf4(W);
    weights["nf4." + shape + ".weight"] = quant::quantize_nf4(W, plain);
    weights["nf4small." + shape + ".weight"] = quant::quantize_nf4(W, small);
    weights["int8." + shape + ".weight"] = quant::quantize_int8(W);
  }
  const std::string path = dir / "base.safetensors";
  lora::save_quantized(path, weights);
  const lora::QuantizedWeights loaded = lora::load_quantized(path);
  REQUIRE(loaded.size() == weights.size());
  for (const auto& kv : weights) {
    INFO(kv.first);
    REQUIRE(loaded.count(kv.first) == 1);
    check_same_weight(kv.second, loaded.at(kv.first));
  }
  // Saved again, the same bytes; one weight alone reads back too.
  const std::string again = dir / "again.safetensors";
  lora::save_quantized(again, loaded);
  CHECK(lora::testing::read_file(path) == lora::testing::read_file(again));
  const std::string one = dir / "one.safetensors";
  lora::save_quantized(one, {{"w", weights.at("nf4dq.7x9.weight")}});
  CHECK(lora::load_quantized(one).size() == 1);

  // bitsandbytes' names and dtypes (see io/quantized.hpp).
  const auto file = lora::SafetensorsReader::open(path);
  CHECK(file.at("nf4dq.7x9.weight").dtype == lora::Dtype::U8);
  CHECK(file.at("nf4dq.7x9.weight").shape == std::vector<std::uint64_t>{32, 1});
  CHECK(file.at("nf4dq.7x9.weight.absmax").dtype == lora::Dtype::U8);
  CHECK(file.at("nf4.7x9.weight.absmax").dtype == lora::Dtype::F32);
  CHECK(file.at("nf4dq.7x9.weight.nested_absmax").shape == std::vector<std::uint64_t>{1});
  CHECK(file.at("nf4small.45x70.weight.nested_absmax").shape == std::vector<std::uint64_t>{(525 + 2) / 3});
  CHECK(file.at("int8.7x9.weight").dtype == lora::Dtype::I8);
  CHECK(file.metadata_value("nf4dq.45x70.weight.blocksize") == std::string("64"));
  CHECK(file.metadata_value("nf4dq.45x70.weight.nested_blocksize") == std::string("256"));
  CHECK(file.metadata_value("int8.3x128.weight.shape") == std::string("3,128"));

  // A QuantizedBase over the loaded weight computes the same outputs, bit for bit.
  for (const char* name : {"nf4dq.45x70.weight", "nf4.45x70.weight", "int8.45x70.weight"}) {
    INFO(name);
    const quant::QuantizedBase<float> a(weights.at(name)), b(loaded.at(name));
    lora::BaseWorkspace<float> work;
    for (const Index n : {Index(3), Index(20)}) {
      const Matrix<float> X = random_matrix<float>(n, 70, 51);
      Matrix<float> Ya(n, 45), Yb(n, 45);
      a.forward(X.data(), n, Ya.data(), work, false);
      b.forward(X.data(), n, Yb.data(), work, false);
      CHECK(std::memcmp(Ya.data(), Yb.data(), static_cast<std::size_t>(Ya.size()) * 4) == 0);
    }
  }

  // An inconsistent weight is refused before anything is written.
  quant::QuantizedWeight broken = weights.at("nf4dq.7x9.weight");
  broken.qabsmax.pop_back();
  const std::string refused = dir / "refused.safetensors";
  CHECK(contains(message_of([&] { lora::save_quantized(refused, {{"w", broken}}); }),
                 "save_quantized: weight 'w': qabsmax has 0 entries, expected 1"));
  CHECK(!std::filesystem::exists(refused));
}

TEST_CASE("quantized base files: every bad file is an io_error naming the file, the tensor and both values", "[quant][io]") {
  lora::testing::TempDir dir;
  const Matrix<float> W = random_matrix<float>(5, 40, 61);  // 200 weights: 4 blocks of 64, the last short
  quant::Nf4Options plain;
  plain.double_quant = false;
  const std::string good = dir / "good.safetensors";
  lora::save_quantized(good, {{"dq", quant::quantize_nf4(W)}, {"nf4", quant::quantize_nf4(W, plain)},
                              {"i8", quant::quantize_int8(W)}});
  REQUIRE(lora::load_quantized(good).size() == 3);
  const RawFile base(lora::SafetensorsReader::open(good));
  const std::string bad = dir / "bad.safetensors";
  auto refusal = [&](auto edit) {
    RawFile f = base;
    edit(f);
    f.write(bad);
    return io_message_of(bad);
  };
  const std::string prefix = "load_quantized: " + bad + ": ";

  SECTION("truncated file") {
    const std::string bytes = lora::testing::read_file(good);
    lora::testing::write_file(bad, bytes.substr(0, bytes.size() - 7));
    CHECK(contains(io_message_of(bad), bad));
    CHECK(contains(io_message_of(bad), "reach past the end of the data section"));
  }
  SECTION("wrong dtype") {
    CHECK(refusal([](RawFile& f) {
            auto& t = f.tensors.at("nf4.absmax");
            t.dtype = lora::Dtype::I32;
          }) == prefix + "tensor 'nf4.absmax': dtype I32, expected F32");
    CHECK(contains(refusal([](RawFile& f) { f.tensors.at("i8").dtype = lora::Dtype::U8; }),
                   "tensor 'i8': dtype U8, expected I8"));
  }
  SECTION("wrong codes length") {
    CHECK(refusal([](RawFile& f) {
            auto& t = f.tensors.at("dq");
            t.shape = {99, 1};
            t.bytes.resize(99);
          }) == prefix + "tensor 'dq': shape [99, 1], expected [100, 1]");
  }
  SECTION("absmax count") {
    CHECK(refusal([](RawFile& f) {
            auto& t = f.tensors.at("dq.absmax");
            t.shape = {3};
            t.bytes.resize(3);
          }) == prefix + "tensor 'dq.absmax': shape [3], expected [4]");
    CHECK(contains(refusal([](RawFile& f) {
                     auto& t = f.tensors.at("i8.absmax");
                     t.shape = {6};
                     t.bytes.resize(24);
                   }),
                   "tensor 'i8.absmax': shape [6], expected [5]"));
  }
  SECTION("unknown format") {
    CHECK(refusal([](RawFile& f) { f.metadata["nf4.quant_type"] = "fp4"; }) ==
          prefix + "__metadata__ 'nf4.quant_type': unknown quant_type 'fp4', expected 'nf4' or 'int8'");
  }
  SECTION("zero, odd, huge or malformed block sizes") {
    CHECK(refusal([](RawFile& f) { f.metadata["nf4.blocksize"] = "0"; }) ==
          prefix + "__metadata__ 'nf4.blocksize': expected a value in [2, 1048576], found 0");
    CHECK(contains(refusal([](RawFile& f) { f.metadata["dq.nested_blocksize"] = "0"; }),
                   "'dq.nested_blocksize': expected a value in [1, 1048576], found 0"));
    CHECK(contains(refusal([](RawFile& f) { f.metadata["nf4.blocksize"] = "63"; }), "blocksize must be even, found 63"));
    CHECK(contains(refusal([](RawFile& f) { f.metadata["nf4.blocksize"] = "99999999999999999999"; }),
                   "expected a non-negative integer, found '99999999999999999999'"));
    CHECK(contains(refusal([](RawFile& f) { f.metadata["nf4.blocksize"] = " 64"; }),
                   "expected a non-negative integer, found ' 64'"));
  }
  SECTION("missing tensor") {
    CHECK(refusal([](RawFile& f) { f.tensors.erase("dq.nested_absmax"); }) ==
          prefix + "tensor 'dq.nested_absmax': missing (weight 'dq' expects F32 [1])");
    CHECK(contains(refusal([](RawFile& f) { f.tensors.erase("nf4.quant_map"); }),
                   "tensor 'nf4.quant_map': missing (weight 'nf4' expects F32 [16])"));
  }
  SECTION("metadata missing") {
    CHECK(refusal([](RawFile& f) { f.metadata.erase("i8.shape"); }) ==
          prefix + "__metadata__ 'i8.shape' is missing (weight 'i8')");
    CHECK(contains(refusal([](RawFile& f) { f.metadata.erase("dq.nested_offset"); }),
                   "__metadata__ 'dq.nested_offset' is missing"));
    CHECK(refusal([](RawFile& f) {
            for (const char* w : {"dq", "nf4", "i8"}) f.metadata.erase(std::string(w) + ".quant_type");
          }) == prefix + "no quantized weight: __metadata__ has no '<name>.quant_type' key");
  }
  SECTION("bad shapes, offsets, scales and maps") {
    CHECK(contains(refusal([](RawFile& f) { f.metadata["i8.shape"] = "5;40"; }), "expected \"out,in\""));
    CHECK(contains(refusal([](RawFile& f) { f.metadata["i8.shape"] = "0,40"; }),
                   "each entry must be in [1, 2^48], found 0,40"));
    CHECK(contains(refusal([](RawFile& f) { f.metadata["i8.shape"] = "281474976710656,281474976710656"; }),
                   "elements overflow"));
    CHECK(contains(refusal([](RawFile& f) { f.metadata["dq.nested_offset"] = "nan"; }),
                   "'dq.nested_offset': expected a finite float, found 'nan'"));
    CHECK(contains(refusal([](RawFile& f) {
                     const float minus = -1.0f;
                     std::memcpy(f.tensors.at("nf4.absmax").bytes.data() + 8, &minus, 4);
                   }),
                   "tensor 'nf4.absmax': element 2 is -1, expected an absmax >= 0"));
    CHECK(contains(refusal([](RawFile& f) {
                     const float nan = std::nanf("");
                     std::memcpy(f.tensors.at("dq.nested_absmax").bytes.data(), &nan, 4);
                   }),
                   "tensor 'dq.nested_absmax': element 0 is NaN or Inf"));
    CHECK(contains(refusal([](RawFile& f) { f.tensors.at("dq.nested_quant_map").bytes[4 * 7] ^= 1; }),
                   "tensor 'dq.nested_quant_map': element 7 is"));
    CHECK(contains(refusal([](RawFile& f) { f.tensors.at("nf4.quant_map").bytes[4 * 3 + 1] ^= 1; }),
                   "(bitsandbytes' NF4 levels)"));
  }
}

TEST_CASE("quantizing a base read from F32, F16 and BF16 safetensors equals quantizing the converted floats", "[quant][io]") {
  lora::testing::TempDir dir;
  lora::NamedTensors<float> base;
  base.matrices["fc1.weight"] = random_matrix<float>(9, 70, 71);
  base.matrices["fc2.weight"] = random_matrix<float>(4, 9, 72) * 3.0f;
  base.vectors["fc1.bias"] = random_matrix<float>(9, 1, 73);
  for (const lora::Dtype dtype : {lora::Dtype::F32, lora::Dtype::F16, lora::Dtype::BF16}) {
    INFO(lora::to_string(dtype));
    const std::string path = dir / "base.safetensors";
    lora::save_base_weights(path, base, dtype);
    const lora::NamedTensors<float> read = lora::load_base_weights<float>(path);
    for (const quant::Format format : {quant::Format::nf4, quant::Format::int8}) {
      const lora::QuantizedWeights q = lora::quantize_matrices(read, format);
      REQUIRE(q.size() == 2);
      for (const auto& kv : base.matrices) {
        INFO(kv.first);
        // The floats each dtype holds, converted by Eigen's own half and bfloat16 (round to nearest even).
        Matrix<float> converted = kv.second;
        if (dtype == lora::Dtype::F16) converted = kv.second.cast<Eigen::half>().cast<float>();
        if (dtype == lora::Dtype::BF16) converted = kv.second.cast<Eigen::bfloat16>().cast<float>();
        if (dtype != lora::Dtype::F32) CHECK(converted != kv.second);
        const quant::QuantizedWeight ref =
            format == quant::Format::nf4 ? quant::quantize_nf4(converted) : quant::quantize_int8(converted);
        check_same_weight(ref, q.at(kv.first));
      }
      const std::string qpath = dir / "quantized.safetensors";
      lora::save_quantized(qpath, q);
      const lora::QuantizedWeights back = lora::load_quantized(qpath);
      for (const auto& kv : q) check_same_weight(kv.second, back.at(kv.first));
    }
  }
}
