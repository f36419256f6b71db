// Transformer building blocks: LayerNorm, RMSNorm, Embedding (with LoRA), TokenBatch.
#include <lora/nn/embedding.hpp>
#include <lora/nn/norm.hpp>
#include <lora/nn/token_batch.hpp>

#include "gradient_check.hpp"
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

using lora::Index;
using lora::Matrix;
using lora::testing::check_module_gradients;
using lora::testing::contains;
using lora::testing::message_of;
using lora::testing::numerical_gradient;
using lora::testing::random_matrix;
using lora::testing::relative_error;

TEST_CASE("LayerNorm: reference values, eps, affine parameters", "[transformer][norm]") {
  lora::nn::LayerNorm<double> ln(3, 0.0 + 1e-300);
  Matrix<double> X(2, 3);
  X << 1, 2, 3, -4, 0, 4;
  const Matrix<double> Y = ln.forward(X);
  // (x - mean) / sqrt(biased var): var of [1,2,3] = 2/3, of [-4,0,4] = 32/3.
  const double a = 1.0 / std::sqrt(2.0 / 3.0), b = 4.0 / std::sqrt(32.0 / 3.0);
  CHECK(std::abs(Y(0, 0) + a) < 1e-12);
  CHECK(std::abs(Y(0, 1)) < 1e-12);
  CHECK(std::abs(Y(0, 2) - a) < 1e-12);
  CHECK(std::abs(Y(1, 0) + b) < 1e-12);
  CHECK(std::abs(Y(1, 2) - b) < 1e-12);

  // eps enters under the root: a constant row gives 0, and eps = 1 shrinks [1,2,3] by sqrt(2/3 / (2/3 + 1)).
  lora::nn::LayerNorm<double> ln1(3, 1.0);
  const Matrix<double> Y1 = ln1.forward(X);
  CHECK(std::abs(Y1(0, 2) - 1.0 / std::sqrt(2.0 / 3.0 + 1.0)) < 1e-12);

  ln.weight() = (Matrix<double>(3, 1) << 2, 3, 4).finished();
  ln.bias() = (Matrix<double>(3, 1) << 1, 1, 1).finished();
  const Matrix<double> Z = ln.forward(X);
  CHECK(std::abs(Z(0, 0) - (1 - 2 * a)) < 1e-12);
  CHECK(std::abs(Z(0, 2) - (1 + 4 * a)) < 1e-12);

  lora::ParameterList<double> params;
  ln.collect_parameters(params, "encoder.layer.0.output.LayerNorm.");
  REQUIRE(params.size() == 2);
  CHECK(params[0].name == "encoder.layer.0.output.LayerNorm.weight");
  CHECK(params[1].name == "encoder.layer.0.output.LayerNorm.bias");
  CHECK(ln.num_parameters() == 6);
}

TEST_CASE("RMSNorm: reference values, no bias", "[transformer][norm]") {
  lora::nn::RMSNorm<double> rn(2, 1e-300);
  Matrix<double> X(1, 2);
  X << 3, 4;
  const Matrix<double> Y = rn.forward(X);
  const double rms = std::sqrt(12.5);
  CHECK(std::abs(Y(0, 0) - 3 / rms) < 1e-12);
  CHECK(std::abs(Y(0, 1) - 4 / rms) < 1e-12);
  lora::ParameterList<double> params;
  rn.collect_parameters(params, "");
  REQUIRE(params.size() == 1);
  CHECK(params[0].name == "weight");
  CHECK_FALSE(rn.has_bias());
}

TEST_CASE("LayerNorm and RMSNorm: gradient check in double", "[transformer][norm][gradcheck]") {
  for (double eps : {1e-5, 0.5}) {
    INFO("eps " << eps);
    lora::nn::LayerNorm<double> ln(5, eps);
    ln.weight() = random_matrix<double>(5, 1, 11);
    ln.bias() = random_matrix<double>(5, 1, 12);
    check_module_gradients(ln, random_matrix<double>(4, 5, 13), 14);
    lora::nn::RMSNorm<double> rn(5, eps);
    rn.weight() = random_matrix<double>(5, 1, 15);
    check_module_gradients(rn, random_matrix<double>(4, 5, 16), 17);
  }
}

TEST_CASE("LayerNorm: gradients accumulate, infer matches forward, frozen has no parameters", "[transformer][norm]") {
  lora::nn::LayerNorm<double> ln(4);
  ln.weight() = random_matrix<double>(4, 1, 21);
  const Matrix<double> X = random_matrix<double>(3, 4, 22), R = random_matrix<double>(3, 4, 23);
  ln.forward(X);
  ln.backward(R);
  const Matrix<double> g1 = ln.grad_weight();
  ln.forward(X);
  ln.backward(R);
  CHECK(relative_error(ln.grad_weight(), 2 * g1) < 1e-15);

  const Matrix<double> Y = ln.forward(X);
  lora::nn::InferenceContext<double> ctx;
  CHECK(relative_error(ln.infer(X, ctx), Y) < 1e-15);

  ln.set_trainable(false);
  lora::ParameterList<double> params;
  ln.collect_parameters(params, "");
  CHECK(params.empty());
  CHECK(ln.num_trainable_parameters() == 0);
  auto copy = ln.clone();
  CHECK(relative_error(copy->forward(X), Y) < 1e-15);
}

TEST_CASE("LayerNorm: errors", "[transformer][norm]") {
  CHECK(contains(message_of([] { lora::nn::LayerNorm<double>(0); }), "dim must be >= 1"));
  CHECK(contains(message_of([] { lora::nn::LayerNorm<double>(3, -1.0); }), "eps must be positive"));
  CHECK(contains(message_of([] { lora::nn::RMSNorm<double>(3, std::nan("")); }), "RMSNorm::RMSNorm"));
  lora::nn::LayerNorm<double> ln(3);
  CHECK(contains(message_of([&] { ln.backward(Matrix<double>::Zero(2, 3)); }), "no cached forward"));
  CHECK(contains(message_of([&] { ln.forward(Matrix<double>::Zero(2, 4)); }), "LayerNorm::forward"));
  ln.forward(Matrix<double>::Ones(2, 3));
  CHECK(contains(message_of([&] { ln.backward(Matrix<double>::Zero(3, 3)); }), "grad_output"));
  CHECK(contains(message_of([&] { ln.weight() = Matrix<double>::Ones(4, 1); }), "fixed shape"));
}

namespace {
// <forward(ids), R>, the scalar the embedding's gradient checks differentiate.
double embedding_loss(lora::nn::Embedding<double>& e, const std::vector<Index>& ids, const Matrix<double>& R) {
  return e.forward(ids).cwiseProduct(R).sum();
}
}  // namespace

TEST_CASE("Embedding: lookup, PEFT LoRA init, dense reference, merge/unmerge", "[transformer][embedding]") {
  const Matrix<double> E = random_matrix<double>(7, 4, 31);
  lora::nn::Embedding<double> emb(E);
  const std::vector<Index> ids = {3, 0, 3, 6, 1};
  const Matrix<double> Y0 = emb.forward(ids);
  for (Index i = 0; i < 5; ++i) CHECK(Y0.row(i) == E.row(ids[static_cast<std::size_t>(i)]));

  emb.add_lora(2, 8.0, "default", 5);
  CHECK(emb.scaling() == 4.0);
  CHECK_FALSE(emb.trainable());
  // PEFT's init for embeddings: A = 0, B ~ N(0, 1); the adapted table starts equal to the base.
  CHECK(emb.lora_A().isZero(0));
  CHECK(emb.lora_B().norm() > 0);
  CHECK(emb.forward(ids) == Y0);

  emb.lora_A() = random_matrix<double>(2, 7, 32);
  const Matrix<double> A = emb.lora_A(), B = emb.lora_B();
  const Matrix<double> dense = E + 4.0 * (B * A).transpose();
  const Matrix<double> Y = emb.forward(ids);
  for (Index i = 0; i < 5; ++i) CHECK(relative_error(Y.row(i), dense.row(ids[static_cast<std::size_t>(i)])) < 1e-15);

  emb.merge();
  CHECK(relative_error(emb.weight(), dense) < 1e-15);
  CHECK(relative_error(emb.forward(ids), Y) < 1e-15);
  CHECK(contains(message_of([&] { emb.lora_A() = A; }), "merged"));
  CHECK(contains(message_of([&] { emb.backward(Y); }), "unmerge() before training"));
  CHECK(contains(message_of([&] { emb.merge(); }), "already merged"));
  emb.unmerge();
  CHECK(relative_error(emb.weight(), E) < 1e-15);
  CHECK(relative_error(emb.forward(ids), Y) < 1e-15);

  lora::ParameterList<double> params;
  emb.collect_parameters(params, "embeddings.word_embeddings.");
  REQUIRE(params.size() == 2);
  CHECK(params[0].name == "embeddings.word_embeddings.lora_embedding_A.default");
  CHECK(params[0].role == lora::ParameterRole::lora_A);
  CHECK(params[1].name == "embeddings.word_embeddings.lora_embedding_B.default");
}

TEST_CASE("Embedding: gradient check of the table and of LoRA A and B (repeated ids)", "[transformer][embedding][gradcheck]") {
  lora::nn::Embedding<double> emb(6, 3, 41);
  const std::vector<Index> ids = {2, 5, 2, 0, 2};
  const Matrix<double> R = random_matrix<double>(5, 3, 42);
  auto loss = [&] { return embedding_loss(emb, ids, R); };
  emb.forward(ids);
  emb.backward(R);
  CHECK(relative_error(emb.grad_weight(), numerical_gradient(emb.weight(), loss)) < 1e-9);
  // Rows never looked up get no gradient.
  CHECK(emb.grad_weight().row(1).isZero(0));

  emb.add_lora(2, 3.0, "default", 43);
  emb.lora_A() = random_matrix<double>(2, 6, 44);
  emb.zero_grad();
  emb.forward(ids);
  emb.backward(R);
  CHECK(relative_error(emb.grad_lora_A(), numerical_gradient(emb.lora_A(), loss)) < 1e-9);
  CHECK(relative_error(emb.grad_lora_B(), numerical_gradient(emb.lora_B(), loss)) < 1e-9);
  // Accumulation.
  const Matrix<double> gB = emb.grad_lora_B();
  emb.forward(ids);
  emb.backward(R);
  CHECK(relative_error(emb.grad_lora_B(), 2 * gB) < 1e-15);
}

TEST_CASE("Embedding: errors", "[transformer][embedding]") {
  lora::nn::Embedding<double> emb(5, 2);
  const std::string bad = message_of([&] { emb.forward({1, 5}); });
  CHECK(contains(bad, "position 1"));
  CHECK(contains(bad, "id 5"));
  CHECK(contains(bad, "num_embeddings = 5"));
  CHECK(contains(message_of([&] { emb.forward({-1}); }), "id -1"));
  CHECK(contains(message_of([&] { emb.backward(Matrix<double>::Zero(1, 2)); }), "no cached forward"));
  emb.forward({0, 1});
  CHECK(contains(message_of([&] { emb.backward(Matrix<double>::Zero(3, 2)); }), "grad_output"));
  CHECK(contains(message_of([&] { emb.merge(); }), "no adapter"));
  CHECK(contains(message_of([&] { emb.add_lora(0, 1.0); }), "r must be >= 1"));
  CHECK(contains(message_of([&] { emb.add_lora(2, 1.0, "a.b"); }), "no '.'"));
  emb.add_lora(2, 1.0);
  CHECK(contains(message_of([&] { emb.add_lora(2, 1.0); }), "already has adapter"));
  CHECK(contains(message_of([] { lora::nn::Embedding<double>(0, 3); }), "num_embeddings and dim"));
}

TEST_CASE("TokenBatch: padding, lengths, mask and id checks", "[transformer][batch]") {
  const lora::nn::TokenBatch batch({{5, 6, 7}, {8}, {9, 1}}, 10, 0);
  CHECK(batch.batch_size() == 3);
  CHECK(batch.seq_len() == 3);
  CHECK(batch.num_rows() == 9);
  CHECK(batch.ids() == std::vector<Index>{5, 6, 7, 8, 0, 0, 9, 1, 0});
  CHECK(batch.lengths() == std::vector<Index>{3, 1, 2});
  CHECK(batch.mask(0, 2));
  CHECK_FALSE(batch.mask(1, 1));
  CHECK(batch.mask(2, 1));
  CHECK_FALSE(batch.mask(2, 2));

  const std::string bad = message_of([] { lora::nn::TokenBatch({{1, 2}, {3, 10}}, 10); });
  CHECK(contains(bad, "sequence 1, position 1"));
  CHECK(contains(bad, "token id 10"));
  CHECK(contains(bad, "[0, 10)"));
  CHECK(contains(message_of([] { lora::nn::TokenBatch({{1}, {}}, 10); }), "sequence 1 is empty"));
  CHECK(contains(message_of([] { lora::nn::TokenBatch({}, 10); }), "no sequences"));
  CHECK(contains(message_of([] { lora::nn::TokenBatch({{1}}, 10, 10); }), "pad_id 10"));
  CHECK(contains(message_of([&] { batch.length(3); }), "sequence 3"));
}
