// Transformer building blocks: LayerNorm, RMSNorm, Embedding (with LoRA), TokenBatch, attention, BertLayer.
#include <lora/io.hpp>
#include <lora/lora.hpp>
#include <lora/nn/attention.hpp>
#include <lora/nn/bert.hpp>
#include <lora/nn/embedding.hpp>
#include <lora/nn/norm.hpp>
#include <lora/nn/token_batch.hpp>

#include "instances.hpp"
#include "gradient_check.hpp"
#include "temp_files.hpp"
#include <catch2/catch.hpp>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <memory>
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

TEST_CASE("LayerNorm and RMSNorm: backward writes dX over the cache, once per forward", "[transformer][norm]") {
  const Matrix<double> X = random_matrix<double>(5, 6, 24), R = random_matrix<double>(5, 6, 25);
  lora::nn::LayerNorm<double> ln(6);
  lora::nn::RMSNorm<double> rms(6);
  ln.weight() = random_matrix<double>(6, 1, 26);
  rms.weight() = random_matrix<double>(6, 1, 27);
  for (lora::nn::Module<double>* m : {static_cast<lora::nn::Module<double>*>(&ln), static_cast<lora::nn::Module<double>*>(&rms)}) {
    const Matrix<double> Y = m->forward(X);
    const Matrix<double> dX = m->backward(R);
    CHECK(m->forward(X) == Y);  // the forward after a backward is whole again
    CHECK(m->backward(R) == dX);
    const std::string second = message_of([&] { m->backward(R); });
    CHECK(contains(second, m->type_name() + "::backward"));
    CHECK(contains(second, "already ran"));
    m->forward(X);
    CHECK(m->backward(R) == dX);
  }
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

TEST_CASE("Embedding as a Module: ids read from a matrix, in a Sequential, base tensors, clone", "[transformer][embedding]") {
  const Matrix<double> E = random_matrix<double>(9, 3, 35);
  lora::nn::Sequential<double> model("");
  model.add("emb", lora::nn::Embedding<double>(E));
  model.add("norm", lora::nn::LayerNorm<double>(3));
  model.add("out", lora::nn::Linear<double>(3, 2, true, 36));
  CHECK(model.in_features() == -1);
  // ids [2 x 3] -> 6 token rows, row-major: row i * 3 + j embeds X(i, j).
  Matrix<double> X(2, 3);
  X << 4, 0, 8, 4, 1, 2;
  const Matrix<double> Y = model.forward(X);
  REQUIRE(Y.rows() == 6);
  auto& emb = dynamic_cast<lora::nn::Embedding<double>&>(model.module("emb"));
  CHECK(emb.forward(X).row(3) == E.row(4));
  CHECK(emb.forward(X).row(5) == E.row(2));
  CHECK(relative_error(model.forward(X), Y) == 0);

  // The table, the norm's weight and bias are base tensors, by name.
  CHECK(model.base_tensor_names() == std::vector<std::string>{"emb.weight", "norm.weight", "norm.bias", "out.weight", "out.bias"});
  CHECK(model.base_tensor("emb.weight") == E);
  const Matrix<double> gamma = random_matrix<double>(1, 3, 37);
  model.set_base_tensor("norm.weight", gamma);  // a row is accepted for a vector
  CHECK(model.base_tensor("norm.weight") == Matrix<double>(gamma.transpose()));
  CHECK(contains(message_of([&] { model.set_base_tensor("emb.weight", Matrix<double>::Zero(8, 3)); }), "expected 9 x 3"));
  CHECK(contains(message_of([&] { model.set_base_tensor("norm.bias", Matrix<double>::Zero(4, 1)); }), "expected 3 values"));

  // Gradients through the whole model, the table included (central differences).
  check_module_gradients(model, X, 38, false);

  // A clone is independent.
  auto copy = model.clone();
  emb.set_weight(Matrix<double>::Zero(9, 3));
  CHECK(relative_error(copy->forward(X), Y) > 0);

  // Ids that are not integers in range name their row and column.
  Matrix<double> bad = X;
  bad(1, 2) = 2.5;
  CHECK(contains(message_of([&] { model.forward(bad); }), "row 1, column 2: id 2.5 is not an integer in [0, num_embeddings = 9)"));
  bad(1, 2) = 9;
  CHECK(contains(message_of([&] { model.forward(bad); }), "id 9"));
  bad(1, 2) = std::nan("");
  CHECK(contains(message_of([&] { model.forward(bad); }), "id nan"));
  model.train(false);
  model.forward(X);
  CHECK(contains(message_of([&] { emb.backward(Matrix<double>::Zero(6, 3)); }), "training mode"));
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

namespace {
// Attention written out entry by entry (loops, explicit exp-normalisation), to compare with the module.
Matrix<double> naive_attention(lora::nn::MultiHeadSelfAttention<double>& att, const Matrix<double>& X, Index batch,
                               Index T, const std::vector<Index>& lengths, Index heads, bool causal) {
  auto lin = [&](const char* name) -> lora::nn::Linear<double>& {
    return dynamic_cast<lora::nn::Linear<double>&>(att.child(name));
  };
  auto project = [&](lora::nn::Linear<double>& l, const Matrix<double>& in) {
    Matrix<double> out = in * Matrix<double>(l.weight()).transpose();
    out.rowwise() += Matrix<double>(l.bias()).transpose().row(0);
    return out;
  };
  const Matrix<double> Q = project(lin("query"), X), K = project(lin("key"), X), V = project(lin("value"), X);
  const Index H = X.cols(), d = H / heads;
  Matrix<double> C = Matrix<double>::Zero(X.rows(), H);
  for (Index b = 0; b < batch; ++b)
    for (Index h = 0; h < heads; ++h)
      for (Index i = 0; i < T; ++i) {
        std::vector<double> w(static_cast<std::size_t>(T), 0.0);
        double total = 0;
        for (Index j = 0; j < T; ++j) {
          if (j >= lengths[static_cast<std::size_t>(b)] || (causal && j > i)) continue;
          double s = 0;
          for (Index c = 0; c < d; ++c) s += Q(b * T + i, h * d + c) * K(b * T + j, h * d + c);
          w[static_cast<std::size_t>(j)] = std::exp(s / std::sqrt(static_cast<double>(d)));
          total += w[static_cast<std::size_t>(j)];
        }
        for (Index j = 0; j < T; ++j)
          for (Index c = 0; c < d; ++c)
            C(b * T + i, h * d + c) += w[static_cast<std::size_t>(j)] / total * V(b * T + j, h * d + c);
      }
  return project(lin("dense"), C);
}
}  // namespace

TEST_CASE("MultiHeadSelfAttention: matches a loop reference with padding, with and without causal mask",
          "[transformer][attention]") {
  for (bool causal : {false, true}) {
    INFO("causal " << causal);
    lora::nn::MultiHeadSelfAttention<double> att(6, 2, causal, 51);
    const std::vector<Index> lengths = {4, 2, 3};
    att.set_layout(3, 4, lengths);
    const Matrix<double> X = random_matrix<double>(12, 6, 52);
    const Matrix<double> Y = att.forward(X);
    CHECK(relative_error(Y, naive_attention(att, X, 3, 4, lengths, 2, causal)) < 1e-13);
    // Padding rows of X do not reach the real rows' outputs.
    Matrix<double> X2 = X;
    X2.row(4 + 2).setConstant(7.0);  // sequence 1, position 2 (padding)
    X2.row(8 + 3).setConstant(-3.0);  // sequence 2, position 3 (padding)
    const Matrix<double> Y2 = att.forward(X2);
    CHECK(relative_error(Y2.topRows(6), Y.topRows(6)) < 1e-15);
    CHECK(relative_error(Y2.block(8, 0, 3, 6), Y.block(8, 0, 3, 6)) < 1e-15);
  }
}

TEST_CASE("MultiHeadSelfAttention: gradient check in double with padding and causal mask",
          "[transformer][attention][gradcheck]") {
  for (bool causal : {false, true}) {
    INFO("causal " << causal);
    lora::nn::MultiHeadSelfAttention<double> att(4, 2, causal, 61);
    const lora::nn::TokenBatch tokens({{1, 2, 3}, {4}}, 10);
    att.set_layout(tokens);
    // check_module_gradients, except for key.bias: adding a vector to every key shifts each score row by a
    // constant, which softmax ignores, so its gradient is exactly 0 (checked to be ~0 instead).
    Matrix<double> X = random_matrix<double>(6, 4, 62);
    const Matrix<double> R = random_matrix<double>(6, 4, 63);
    auto loss = [&] { return att.forward(X).cwiseProduct(R).sum(); };
    att.zero_grad();
    att.forward(X);
    const Matrix<double> dX = att.backward(R);
    CHECK(dX.norm() > 0);
    CHECK(relative_error(dX, numerical_gradient(X, loss)) < 1e-8);
    lora::ParameterList<double> params;
    att.collect_parameters(params, "");
    REQUIRE(params.size() == 8);
    for (auto& p : params) {
      INFO(p.name);
      const Matrix<double> analytic = p.grad;
      if (p.name == "key.bias") {
        CHECK(analytic.norm() < 1e-12);
        CHECK(numerical_gradient(p.value, loss).norm() < 1e-8);
        continue;
      }
      CHECK(analytic.norm() > 0);
      CHECK(relative_error(analytic, numerical_gradient(p.value, loss)) < 1e-8);
    }
  }
}

TEST_CASE("MultiHeadSelfAttention: the per-head loop split over two threads gives one thread's values",
          "[transformer][attention][threads]") {
  // With dropout on the probabilities (its masks are drawn before the loop, in one order) and padding:
  // each (sequence, head) pair is computed alone, on whichever thread. The projections' products split
  // too, so the values agree to rounding; a pair computed twice, skipped or given another's mask or
  // scratch would be off by far more.
  for (bool causal : {false, true}) {
    INFO("causal " << causal);
    const std::vector<Index> lengths = {6, 2, 5, 1, 4};
    const Matrix<float> X = random_matrix<float>(30, 12, 71), R = random_matrix<float>(30, 12, 72);
    auto run = [&](double work_per_thread, Matrix<float>& Y, Matrix<float>& dX, Matrix<float>& dWq) {
      const lora::testing::ThreadSmallWork small_work(work_per_thread);
      lora::nn::MultiHeadSelfAttention<float> att(12, 3, causal, 73);
      att.set_layout(5, 6, lengths);
      att.set_dropout(0.3, 74);
      att.zero_grad();
      Y = att.forward(X);
      dX = att.backward(R);
      lora::ParameterList<float> params;
      att.collect_parameters(params, "");
      dWq = params.front().grad;
    };
#ifdef _OPENMP
    omp_set_num_threads(2);
#endif
    Matrix<float> Y1, dX1, dW1, Y2, dX2, dW2;
    run(1e300, Y1, dX1, dW1);  // one thread
    run(1, Y2, dX2, dW2);      // every loop split (threads_for: all threads)
#ifdef _OPENMP
    omp_set_num_threads(omp_get_num_procs());
#endif
    CHECK(Y1.norm() > 0);
    CHECK(relative_error(Y2, Y1) < 1e-6);
    CHECK(relative_error(dX2, dX1) < 1e-6);
    CHECK(relative_error(dW2, dW1) < 1e-6);
  }
}

TEST_CASE("MultiHeadSelfAttention: named children, replacement, parameters, errors", "[transformer][attention]") {
  lora::nn::MultiHeadSelfAttention<double> att(4, 2, false, 71);
  std::vector<std::string> names;
  att.for_each_child([&](const std::string& name, lora::nn::Module<double>& m) {
    names.push_back(name);
    CHECK(m.type_name() == "Linear");
  });
  CHECK(names == std::vector<std::string>{"query", "key", "value", "dense"});
  lora::ParameterList<double> params;
  att.collect_parameters(params, "encoder.layer.0.attention.self.");
  REQUIRE(params.size() == 8);
  CHECK(params[0].name == "encoder.layer.0.attention.self.query.weight");
  CHECK(params[7].name == "encoder.layer.0.attention.self.dense.bias");
  CHECK(att.num_parameters() == 4 * (16 + 4));

  CHECK(contains(message_of([&] { att.forward(Matrix<double>::Zero(2, 4)); }), "no layout"));
  att.set_layout(1, 2, {2});
  CHECK(contains(message_of([&] { att.forward(Matrix<double>::Zero(3, 4)); }), "input"));
  CHECK(contains(message_of([&] { att.backward(Matrix<double>::Zero(2, 4)); }), "no cached forward"));
  CHECK(contains(message_of([&] { att.set_layout(2, 3, {1, 4}); }), "sequence 1 has length 4"));
  CHECK(contains(message_of([&] { att.set_layout(2, 3, {1}); }), "expected batch = 2"));
  CHECK(contains(message_of([&] { att.child("output"); }), "no child 'output'"));
  CHECK(contains(message_of([&] { att.replace_child("query", std::make_unique<lora::nn::Linear<double>>(4, 3)); }),
                 "expected 4 -> 4"));
  CHECK(contains(message_of([] { lora::nn::MultiHeadSelfAttention<double>(5, 2); }), "not divisible"));

  // A replaced child is used: a zero value projection makes the output the dense bias.
  auto zero = std::make_unique<lora::nn::Linear<double>>(Matrix<double>::Zero(4, 4), Matrix<double>::Zero(4, 1));
  att.replace_child("value", std::move(zero));
  const Matrix<double> Y = att.forward(random_matrix<double>(2, 4, 72));
  const Matrix<double> bias = dynamic_cast<lora::nn::Linear<double>&>(att.child("dense")).bias();
  CHECK(relative_error(Y.row(0).transpose(), bias) < 1e-15);
  auto copy = att.clone();
  CHECK(copy->num_parameters() == att.num_parameters());
}

// ---- the module tree: containers walk any module with children ---------------------------------------

namespace {

// layers.0 Linear 3 -> 4, layers.1 attention (hidden 4, 2 heads), layers.2 Linear 4 -> 2.
lora::nn::Sequential<double> attention_model(unsigned seed) {
  lora::nn::Sequential<double> m;
  m.add(lora::nn::Linear<double>(3, 4, true, seed));
  m.add(lora::nn::MultiHeadSelfAttention<double>(4, 2, false, seed + 1));
  m.add(lora::nn::Linear<double>(4, 2, true, seed + 10));
  return m;
}

lora::nn::MultiHeadSelfAttention<double>& attention_of(lora::nn::Sequential<double>& m) {
  return dynamic_cast<lora::nn::MultiHeadSelfAttention<double>&>(m[1]);
}

lora::nn::LoraInjectConfig query_value_config() {
  lora::nn::LoraInjectConfig c;
  c.target_modules = {"query", "value"};
  c.rank = 2;
  c.alpha = 4;
  c.init = lora::InitMethod::random;  // B != 0: the adapters change the output
  return c;
}

}  // namespace

TEST_CASE("Module tree: a Sequential lists, finds and replaces the children of an attention block",
          "[transformer][tree]") {
  auto m = attention_model(80);
  CHECK(m.module_names() == std::vector<std::string>{"layers.0", "layers.1.query", "layers.1.key", "layers.1.value",
                                                      "layers.1.dense", "layers.2"});
  CHECK(m.num_children() == 3);
  CHECK(m.child_name(1) == "1");
  CHECK(m.child(1).num_children() == 4);
  CHECK(m.child(1).child_name(3) == "dense");
  CHECK(&m.module("layers.1.key") == &attention_of(m).child("key"));
  CHECK(m.base_tensor_names().size() == 12);
  CHECK(m.base_tensor("layers.1.value.bias") == dynamic_cast<lora::nn::Linear<double>&>(attention_of(m).child("value")).bias());

  // Replacement through the tree keeps the widths check and hands back the old module.
  CHECK(contains(message_of([&] { m.replace_module("layers.1.key", std::make_unique<lora::nn::Linear<double>>(4, 3)); }),
                 "expected 4 -> 4"));
  CHECK(contains(message_of([&] { m.child(1).replace_child(4, std::make_unique<lora::nn::Linear<double>>(4, 4)); }),
                 "no child 4"));
  CHECK(contains(message_of([&] { m.replace_child(0, nullptr); }), "null"));
  auto fresh = std::make_unique<lora::nn::Linear<double>>(4, 4, true, 5);
  const lora::nn::Module<double>* fresh_ptr = fresh.get();
  const lora::nn::Module<double>* old_ptr = &m.module("layers.1.key");
  auto old = m.replace_module("layers.1.key", std::move(fresh));
  CHECK(old.get() == old_ptr);
  CHECK(&m.module("layers.1.key") == fresh_ptr);

  // set_requires_grad on a sub-tree reaches the children of the attention block.
  m.set_requires_grad("layers.1", false);
  CHECK(m.child(1).num_trainable_parameters() == 0);
  CHECK(m.child(0).num_trainable_parameters() == 16);
  m.set_requires_grad("layers.1.dense", true);
  CHECK(m.child(1).num_trainable_parameters() == 20);
}

TEST_CASE("Module tree: inject_lora by PEFT names into attention, gradients, merge/unmerge, adapter files",
          "[transformer][tree][gradcheck]") {
  auto model = attention_model(90);
  lora::nn::inject_lora(model, query_value_config());
  std::vector<std::string> adapted;
  for (const auto& entry : model.lora_layers()) adapted.push_back(entry.first);
  CHECK(adapted == std::vector<std::string>{"layers.1.query", "layers.1.value"});
  CHECK(dynamic_cast<lora::nn::LoraLayer<double>*>(&attention_of(model).child("query")) != nullptr);
  CHECK(dynamic_cast<lora::nn::Linear<double>*>(&attention_of(model).child("key")) != nullptr);

  // Only A and B of the two adapters train; the gradient check runs through the injected model.
  lora::ParameterList<double> params = model.parameters();
  std::vector<std::string> names;
  for (const auto& p : params) names.push_back(p.name);
  CHECK(names == std::vector<std::string>{"layers.1.query.lora_A.default.weight", "layers.1.query.lora_B.default.weight",
                                          "layers.1.value.lora_A.default.weight", "layers.1.value.lora_B.default.weight"});
  const lora::nn::TokenBatch tokens({{1, 2, 3}, {4}}, 10);
  attention_of(model).set_layout(tokens);
  check_module_gradients(model, random_matrix<double>(6, 3, 91), 92);

  // merge folds the adapters into W0 (same output), unmerge restores the base.
  model.eval();
  const Matrix<double> X = random_matrix<double>(6, 3, 93);
  const Matrix<double> Y = model.forward(X);
  const Matrix<double> W0 = model.base_tensor("layers.1.query.weight");
  model.merge();
  CHECK(model.merged());
  CHECK(relative_error(model.forward(X), Y) < 1e-12);
  model.unmerge();
  CHECK(!model.merged());
  CHECK(relative_error(model.base_tensor("layers.1.query.weight"), W0) < 1e-14);
  CHECK(relative_error(model.forward(X), Y) < 1e-12);

  // The adapter file holds PEFT's keys for the paths under the attention block and reloads to the
  // same outputs into a fresh model with the same base.
  lora::testing::TempDir dir;
  lora::AdapterSaveOptions f64;
  f64.dtype = lora::Dtype::F64;
  lora::save_adapter(dir / "adapter", model, "default", f64);
  std::vector<std::string> keys;
  const lora::SafetensorsReader file = lora::SafetensorsReader::open(dir / "adapter/adapter_model.safetensors");
  for (const auto& t : file.tensors())
    keys.push_back(t.name);
  std::sort(keys.begin(), keys.end());
  CHECK(keys == std::vector<std::string>{"base_model.model.layers.1.query.lora_A.weight",
                                         "base_model.model.layers.1.query.lora_B.weight",
                                         "base_model.model.layers.1.value.lora_A.weight",
                                         "base_model.model.layers.1.value.lora_B.weight"});
  auto reloaded = attention_model(90);
  lora::from_pretrained(reloaded, dir / "adapter");
  reloaded.eval();
  attention_of(reloaded).set_layout(tokens);
  CHECK(reloaded.forward(X) == Y);

  // load_adapter as a second adapter into the injected model reaches the attention children too.
  lora::load_adapter(dir / "adapter", reloaded, "second");
  CHECK(reloaded.lora_layers().front().second->has_adapter("second"));
}

TEST_CASE("Module tree: modules_to_save on an attention child, errors name the paths", "[transformer][tree]") {
  auto model = attention_model(100);
  lora::nn::LoraInjectConfig c = query_value_config();
  c.modules_to_save = {"dense"};
  lora::nn::inject_lora(model, c);
  const auto saved = model.saved_modules();
  REQUIRE(saved.size() == 1);
  CHECK(saved.front().first == "layers.1.dense");
  CHECK(dynamic_cast<lora::nn::ModulesToSave<double>*>(&attention_of(model).child("dense")) != nullptr);
  // The trainable copy's parameters are under the PEFT path.
  bool found = false;
  for (const auto& p : model.parameters()) found = found || p.name == "layers.1.dense.modules_to_save.default.weight";
  CHECK(found);

  // A target that matches nothing names the paths that exist, the attention children among them.
  auto other = attention_model(101);
  lora::nn::LoraInjectConfig bad = query_value_config();
  bad.target_modules = {"q_proj"};
  const std::string message = message_of([&] { lora::nn::inject_lora(other, bad); });
  CHECK(contains(message, "q_proj"));
  CHECK(contains(message, "layers.1.query"));
  CHECK(other.lora_layers().empty());
  CHECK(contains(message_of([&] { other.module("layers.1.output"); }), "layers.1.dense"));
}

namespace {

lora::nn::Linear<double>& linear_at(lora::nn::Sequential<double>& model, const std::string& path) {
  return dynamic_cast<lora::nn::Linear<double>&>(model.module(path));
}

// LayerNorm over rows, written out: (x - mean) / sqrt(biased var + eps) * w + b.
Matrix<double> naive_layer_norm(const Matrix<double>& X, const lora::nn::LayerNorm<double>& ln, double eps) {
  Matrix<double> Y(X.rows(), X.cols());
  for (Index i = 0; i < X.rows(); ++i) {
    const double mean = X.row(i).mean();
    const double var = (X.row(i).array() - mean).square().mean();
    for (Index j = 0; j < X.cols(); ++j)
      Y(i, j) = (X(i, j) - mean) / std::sqrt(var + eps) * ln.weight()(j) + ln.bias()(j);
  }
  return Y;
}

// A BertLayer at "layer.0" of an encoder Sequential, its LayerNorms given random affine parameters.
lora::nn::Sequential<double> bert_encoder(Index hidden, Index heads, Index intermediate, double eps, unsigned seed) {
  lora::nn::Sequential<double> encoder("encoder");
  lora::nn::Sequential<double> layers("layer");
  layers.add(lora::nn::BertLayer<double>(hidden, heads, intermediate, eps, seed));
  encoder.add("layer", std::move(layers));
  for (const char* ln : {"encoder.layer.0.attention.output.LayerNorm", "encoder.layer.0.output.LayerNorm"}) {
    auto& norm = dynamic_cast<lora::nn::LayerNorm<double>&>(encoder.module(ln));
    norm.weight() = Matrix<double>(Matrix<double>::Ones(hidden, 1) + 0.3 * random_matrix<double>(hidden, 1, seed + 7));
    norm.bias() = Matrix<double>(0.2 * random_matrix<double>(hidden, 1, seed + 8));
  }
  return encoder;
}

lora::nn::BertLayer<double>& bert_layer(lora::nn::Sequential<double>& encoder) {
  return dynamic_cast<lora::nn::BertLayer<double>&>(
      dynamic_cast<lora::nn::Sequential<double>&>(encoder[0])[0]);
}

}  // namespace

TEST_CASE("BertLayer: Hugging Face's paths and names, and a written-out reference with padding", "[transformer][bert]") {
  const Index hidden = 6, heads = 2, inter = 10;
  const double eps = 1e-12;
  lora::nn::Sequential<double> encoder = bert_encoder(hidden, heads, inter, eps, 81);
  const std::vector<std::string> want = {
      "encoder.layer.0.attention.self.query",      "encoder.layer.0.attention.self.key",
      "encoder.layer.0.attention.self.value",      "encoder.layer.0.attention.output.dense",
      "encoder.layer.0.attention.output.LayerNorm", "encoder.layer.0.intermediate.dense",
      "encoder.layer.0.output.dense",              "encoder.layer.0.output.LayerNorm"};
  CHECK(encoder.module_names() == want);
  lora::ParameterList<double> params;
  encoder.collect_parameters(params, "");
  REQUIRE(params.size() == 16);
  CHECK(params[0].name == "layer.0.attention.self.query.weight");
  CHECK(params[11].name == "layer.0.intermediate.dense.bias");
  CHECK(params[15].name == "layer.0.output.LayerNorm.bias");
  CHECK(encoder.num_parameters() == 4 * (hidden * hidden + hidden) + 2 * (inter * hidden) + inter + hidden + 4 * hidden);

  const std::vector<Index> lengths = {4, 2};
  bert_layer(encoder).set_layout(2, 4, lengths);
  const Matrix<double> X = random_matrix<double>(8, hidden, 82);
  const Matrix<double> Y = encoder.forward(X);

  // The reference: attention with its output projection (the module tested above against loops), then
  // the residuals, LayerNorms and the GELU MLP written out.
  lora::nn::MultiHeadSelfAttention<double> att(hidden, heads, false, 0);
  for (const char* p : {"query", "key", "value"}) {
    auto& from = linear_at(encoder, std::string("encoder.layer.0.attention.self.") + p);
    auto& to = dynamic_cast<lora::nn::Linear<double>&>(att.child(p));
    to.set_weight(from.weight());
    to.set_bias(from.bias());
  }
  auto& dense = dynamic_cast<lora::nn::Linear<double>&>(att.child("dense"));
  dense.set_weight(linear_at(encoder, "encoder.layer.0.attention.output.dense").weight());
  dense.set_bias(linear_at(encoder, "encoder.layer.0.attention.output.dense").bias());
  auto& ln1 = dynamic_cast<lora::nn::LayerNorm<double>&>(encoder.module("encoder.layer.0.attention.output.LayerNorm"));
  auto& ln2 = dynamic_cast<lora::nn::LayerNorm<double>&>(encoder.module("encoder.layer.0.output.LayerNorm"));
  const Matrix<double> H1 = naive_layer_norm(naive_attention(att, X, 2, 4, lengths, heads, false) + X, ln1, eps);
  auto affine = [&](const std::string& path, const Matrix<double>& in) {
    auto& l = linear_at(encoder, path);
    Matrix<double> out = in * Matrix<double>(l.weight()).transpose();
    out.rowwise() += Matrix<double>(l.bias()).transpose().row(0);
    return out;
  };
  Matrix<double> G = affine("encoder.layer.0.intermediate.dense", H1);
  G = G.unaryExpr([](double u) { return 0.5 * u * (1.0 + std::erf(u / std::sqrt(2.0))); });
  const Matrix<double> expect = naive_layer_norm(affine("encoder.layer.0.output.dense", G) + H1, ln2, eps);
  CHECK(relative_error(Y, expect) < 1e-12);

  // Errors.
  CHECK(contains(message_of([&] { bert_layer(encoder).forward(Matrix<double>::Zero(8, 5)); }), "BertLayer::forward"));
  CHECK(contains(message_of([&] { bert_layer(encoder).replace_child(0, std::make_unique<lora::nn::Linear<double>>(6, 6)); }),
                 "'attention' groups modules; replace those instead"));
  CHECK(contains(message_of([] { lora::nn::BertLayer<double>(6, 4, 10); }), "not divisible"));
  CHECK(contains(message_of([] { lora::nn::BertLayer<double>(6, 2, 0); }), "intermediate must be >= 1"));
  lora::nn::Sequential<double> fresh = bert_encoder(hidden, heads, inter, eps, 83);
  fresh.train();
  CHECK(contains(message_of([&] { fresh.backward(Matrix<double>::Zero(8, hidden)); }), "no cached forward"));
  CHECK(contains(message_of([&] { fresh.forward(X); }), "no layout"));
}

TEST_CASE("BertLayer: gradient check in double, plain and with LoRA on query and value by PEFT's names",
          "[transformer][bert][gradcheck]") {
  for (const bool with_lora : {false, true}) {
    INFO("LoRA " << with_lora);
    lora::nn::Sequential<double> encoder = bert_encoder(4, 2, 6, 1e-5, 91);
    if (with_lora) {
      lora::nn::LoraInjectConfig config;
      config.target_modules = {"query", "value"};
      config.rank = 2;
      config.alpha = 4;
      config.init = lora::InitMethod::random;
      config.seed = 92;
      lora::nn::inject_lora(encoder, config);
      const auto layers = encoder.lora_layers();
      REQUIRE(layers.size() == 2);
      CHECK(layers[0].first == "encoder.layer.0.attention.self.query");
      CHECK(layers[1].first == "encoder.layer.0.attention.self.value");
    }
    const lora::nn::TokenBatch tokens({{1, 2, 3}, {4}}, 10);
    bert_layer(encoder).set_layout(tokens);
    Matrix<double> X = random_matrix<double>(6, 4, 93);
    const Matrix<double> R = random_matrix<double>(6, 4, 94);
    encoder.train();
    auto loss = [&] { return encoder.forward(X).cwiseProduct(R).sum(); };
    encoder.zero_grad();
    encoder.forward(X);
    const Matrix<double> dX = encoder.backward(R);
    CHECK(dX.norm() > 0);
    CHECK(relative_error(dX, numerical_gradient(X, loss)) < 1e-7);
    lora::ParameterList<double> params;
    encoder.collect_parameters(params, "");
    CHECK(params.size() == (with_lora ? 4u : 16u));
    for (auto& p : params) {
      INFO(p.name);
      const Matrix<double> analytic = p.grad;
      if (contains(p.name, "key.bias")) {  // softmax ignores a shift of every score in a row: exactly 0
        CHECK(analytic.norm() < 1e-12);
        continue;
      }
      CHECK(analytic.norm() > 0);
      CHECK(relative_error(analytic, numerical_gradient(p.value, loss)) < 1e-7);
    }
  }
}
