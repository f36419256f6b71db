// BertForSequenceClassification: the whole encoder under Hugging Face's names, dropout, gradient checks in
// double (plain, with LoRA on q and v, with dropout), the frozen-bottom backward, errors.
#include <lora/io.hpp>
#include <lora/io/bert.hpp>
#include <lora/lora.hpp>
#include <lora/nn/bert_model.hpp>
#include <lora/nn/dropout.hpp>

#include "gradient_check.hpp"
#include "transformer_common.hpp"  // examples/: the word-list reader
#include "instances.hpp"
#include "temp_files.hpp"
#include <catch2/catch.hpp>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <cmath>
#include <string>
#include <vector>

using lora::Index;
using lora::Matrix;
using lora::testing::contains;
using lora::testing::message_of;
using lora::testing::numerical_gradient;
using lora::testing::random_matrix;
using lora::testing::relative_error;

namespace {

lora::nn::BertConfig tiny_config() {
  lora::nn::BertConfig c;
  c.vocab_size = 17;
  c.hidden_size = 4;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.intermediate_size = 6;
  c.max_position_embeddings = 8;
  c.num_labels = 3;
  c.hidden_dropout_prob = 0;
  c.attention_probs_dropout_prob = 0;
  return c;
}

// Makes every parameter non-trivial (the initialisation zeroes biases and one embedding row).
void perturb(lora::nn::Sequential<double>& model, unsigned seed) {
  for (const std::string& name : model.base_tensor_names()) {
    const Matrix<double> v = model.base_tensor(name);
    Matrix<double> w = v + 0.3 * random_matrix<double>(v.rows(), v.cols(), seed++);
    if (lora::testing::contains(name, "LayerNorm.weight")) w = Matrix<double>::Ones(v.rows(), v.cols()) + 0.3 * random_matrix<double>(v.rows(), v.cols(), seed++);
    model.set_base_tensor(name, w);
  }
}

lora::nn::TokenBatch tiny_batch() { return lora::nn::TokenBatch({{3, 1, 4, 1, 5}, {9, 2}, {6}}, 17); }

// The mean cross-entropy of the model on the batch, and its backward (gradients accumulated).
double loss_of(lora::nn::BertForSequenceClassification<double>& model, const lora::nn::TokenBatch& batch,
               const std::vector<int>& labels, bool backward = false) {
  lora::nn::SoftmaxCrossEntropy<double> ce;
  const double loss = ce.forward(model.forward(batch), labels);
  if (backward) model.backward(ce.backward());
  return loss;
}

// Every trainable parameter's gradient against central differences; `before` runs before each forward
// (dropout tests reseed there, so that every evaluation draws the same masks).
template <class Before>
void check_model_gradients(lora::nn::BertForSequenceClassification<double>& model, Before&& before, double tol = 1e-6) {
  const lora::nn::TokenBatch batch = tiny_batch();
  const std::vector<int> labels = {2, 0, 1};
  model.train();
  model.zero_grad();
  before();
  loss_of(model, batch, labels, true);
  auto loss = [&] {
    before();
    return loss_of(model, batch, labels);
  };
  lora::ParameterList<double> params = model.parameters();
  REQUIRE(!params.empty());
  for (auto& p : params) {
    INFO(p.name);
    const Matrix<double> analytic = p.grad;
    const Matrix<double> numeric = numerical_gradient(p.value, loss);
    if (contains(p.name, "attention.self.key.bias")) {
      // Softmax is invariant to adding q . b_k to every score of a row: the key bias has no gradient.
      CHECK(analytic.norm() < 1e-12);
      CHECK(numeric.norm() < 1e-8);
      continue;
    }
    CHECK(relative_error(analytic, numeric) < tol);
    CHECK(numeric.norm() > 1e-6);
  }
}

}  // namespace

TEST_CASE("BertForSequenceClassification: Hugging Face's tensor names, tree, parameters", "[transformer][bert_model]") {
  const lora::nn::BertConfig c = tiny_config();
  lora::nn::BertForSequenceClassification<double> model(c, 3);
  const std::vector<std::string> names = model.base_tensor_names();
  REQUIRE(names.size() == 5 + 2 * 16 + 4);
  CHECK(names[0] == "bert.embeddings.word_embeddings.weight");
  CHECK(names[3] == "bert.embeddings.LayerNorm.weight");
  CHECK(names[5] == "bert.encoder.layer.0.attention.self.query.weight");
  CHECK(names[5 + 16] == "bert.encoder.layer.1.attention.self.query.weight");
  CHECK(names[5 + 16 + 15] == "bert.encoder.layer.1.output.LayerNorm.bias");
  CHECK(names[37] == "bert.pooler.dense.weight");
  CHECK(names[39] == "classifier.weight");
  CHECK(names[40] == "classifier.bias");
  CHECK(model.base_tensor("classifier.weight").rows() == 3);
  CHECK(model.base_tensor("bert.embeddings.position_embeddings.weight").rows() == 8);
  const Index h = c.hidden_size, layer_params = 4 * (h * h + h) + 2 * h * c.intermediate_size + c.intermediate_size + h + 4 * h;
  CHECK(model.num_parameters() == (17 + 8 + 2) * h + 2 * h + 2 * layer_params + h * h + h + 3 * h + 3);
  CHECK(model.num_trainable_parameters() == model.num_parameters());

  // Hugging Face's initialisation: N(0, 0.02), zero biases, zero padding row, LayerNorm 1 / 0.
  const Matrix<double> word = model.base_tensor("bert.embeddings.word_embeddings.weight");
  CHECK(word.row(c.pad_token_id).isZero(0));
  const Matrix<double> q = model.base_tensor("bert.encoder.layer.0.attention.self.query.weight");
  CHECK(std::abs(q.norm() / std::sqrt(static_cast<double>(q.size())) - 0.02) < 0.012);
  CHECK(model.base_tensor("bert.encoder.layer.0.attention.self.query.bias").isZero(0));
  CHECK(model.base_tensor("bert.embeddings.LayerNorm.weight").isOnes(0));
  // Seeded: the same seed gives the same model, another seed another one.
  lora::nn::BertForSequenceClassification<double> same(c, 3), other(c, 4);
  CHECK(same.base_tensor("bert.encoder.layer.1.output.dense.weight") == model.base_tensor("bert.encoder.layer.1.output.dense.weight"));
  CHECK(other.base_tensor("bert.encoder.layer.1.output.dense.weight") != model.base_tensor("bert.encoder.layer.1.output.dense.weight"));

  // The tree lists the leaves under their paths; a clone is a BertForSequenceClassification of its own.
  CHECK(model.module("bert.embeddings.word_embeddings").type_name() == "Embedding");
  CHECK(model.module("bert.encoder.layer.1.attention.self.value").type_name() == "Linear");
  CHECK(model.module("bert.pooler.dense").type_name() == "Linear");
  auto copy = model.clone();
  auto* typed = dynamic_cast<lora::nn::BertForSequenceClassification<double>*>(copy.get());
  REQUIRE(typed);
  const lora::nn::TokenBatch batch = tiny_batch();
  perturb(model, 11);
  const Matrix<double> logits = model.forward(batch);
  CHECK(relative_error(typed->forward(batch), logits) > 1e-3);  // independent values
  CHECK(logits.rows() == 3);
  CHECK(logits.cols() == 3);
  CHECK(model.last_hidden_state().rows() == 15);
  CHECK(model.pooler_output().rows() == 3);
}

TEST_CASE("BertForSequenceClassification: forward against the parts run by hand, padding changes nothing",
          "[transformer][bert_model]") {
  lora::nn::BertForSequenceClassification<double> model(tiny_config(), 5);
  perturb(model, 21);
  model.train(false);
  const lora::nn::TokenBatch batch = tiny_batch();
  const Matrix<double> logits = model.forward(batch);
  const Matrix<double> hidden = model.last_hidden_state();

  // By hand: embeddings summed and normalised, each layer, the first token, tanh(pooler), classifier.
  const Index T = batch.seq_len(), n = batch.num_rows(), d = 4;
  Matrix<double> sum(n, d);
  const Matrix<double> word = model.base_tensor("bert.embeddings.word_embeddings.weight");
  const Matrix<double> pos = model.base_tensor("bert.embeddings.position_embeddings.weight");
  const Matrix<double> type = model.base_tensor("bert.embeddings.token_type_embeddings.weight");
  for (Index i = 0; i < n; ++i) sum.row(i) = word.row(batch.ids()[static_cast<std::size_t>(i)]) + pos.row(i % T) + type.row(0);
  lora::nn::LayerNorm<double> ln(d, 1e-12);
  ln.weight() = model.base_tensor("bert.embeddings.LayerNorm.weight");
  ln.bias() = model.base_tensor("bert.embeddings.LayerNorm.bias");
  ln.train(false);
  Matrix<double> H = ln.forward(sum);
  for (Index l = 0; l < 2; ++l) {
    lora::nn::BertLayer<double> layer = model.layer(l);
    layer.train(false);
    layer.set_layout(batch);
    H = layer.forward(H);
  }
  CHECK(relative_error(H, hidden) < 1e-15);
  Matrix<double> first(3, d);
  for (Index b = 0; b < 3; ++b) first.row(b) = H.row(b * T);
  const Matrix<double> pooled =
      ((first * model.base_tensor("bert.pooler.dense.weight").transpose()).rowwise() +
       model.base_tensor("bert.pooler.dense.bias").col(0).transpose()).array().tanh().matrix();
  CHECK(relative_error(pooled, model.pooler_output()) < 1e-15);
  const Matrix<double> want = (pooled * model.base_tensor("classifier.weight").transpose()).rowwise() +
                              model.base_tensor("classifier.bias").col(0).transpose();
  CHECK(relative_error(logits, want) < 1e-15);

  // A sequence's logits do not depend on the padding around it or on the other sequences.
  const Matrix<double> alone = model.forward(lora::nn::TokenBatch({{9, 2}}, 17));
  CHECK(relative_error(alone.row(0), logits.row(1)) < 1e-13);
}

TEST_CASE("BertForSequenceClassification: gradient check in double, every parameter", "[transformer][bert_model][gradcheck]") {
  lora::nn::BertForSequenceClassification<double> model(tiny_config(), 7);
  perturb(model, 31);
  check_model_gradients(model, [] {});
}

TEST_CASE("BertForSequenceClassification: gradient check with dropout on (fixed masks)", "[transformer][bert_model][gradcheck]") {
  lora::nn::BertForSequenceClassification<double> model(tiny_config(), 8);
  perturb(model, 41);
  // Reseeding before every forward draws the same masks each time: the loss is then a smooth function
  // of the parameters, and the masks are not all ones (checked below).
  check_model_gradients(model, [&] { model.set_dropout(0.25, 0.3, 99); });
  model.set_dropout(0.25, 0.3, 99);
  const Matrix<double> dropped = model.forward(tiny_batch());
  model.set_dropout(0, 0, 99);
  const Matrix<double> plain = model.forward(tiny_batch());
  CHECK(relative_error(dropped, plain) > 1e-3);
  // Eval mode: no dropout.
  model.set_dropout(0.25, 0.3, 99);
  model.train(false);
  CHECK(relative_error(model.forward(tiny_batch()), plain) < 1e-15);
}

TEST_CASE("BertForSequenceClassification: LoRA on query and value by PEFT's names, classifier saved",
          "[transformer][bert_model][gradcheck]") {
  lora::nn::BertForSequenceClassification<double> model(tiny_config(), 9);
  perturb(model, 51);
  const Matrix<double> before = model.forward(tiny_batch());
  lora::nn::LoraInjectConfig config;
  config.target_modules = {"query", "value"};
  config.modules_to_save = {"classifier"};
  config.rank = 2;
  config.alpha = 4;
  config.init = lora::InitMethod::random;  // B non-zero, so that dA is non-zero too
  lora::nn::inject_lora(model, config);
  CHECK(model.lora_layers().size() == 4);
  CHECK(model.lora_layers()[0].first == "bert.encoder.layer.0.attention.self.query");
  CHECK(model.lora_layers()[3].first == "bert.encoder.layer.1.attention.self.value");
  // Trainable: 4 adapters (A, B) and the classifier copy (weight, bias); everything else frozen.
  lora::ParameterList<double> params = model.parameters();
  CHECK(params.size() == 4 * 2 + 2);
  CHECK(model.num_trainable_parameters() == 4 * 2 * (4 + 4) + 3 * 4 + 3);
  CHECK(model.embeddings().num_trainable_parameters() == 0);
  CHECK(relative_error(model.forward(tiny_batch()), before) > 1e-6);  // random B: the adapters act
  check_model_gradients(model, [] {});

  // The adapter files carry PEFT's keys for a BertForSequenceClassification.
  const lora::testing::TempDir dir;
  lora::save_adapter(dir.path.string(), model);
  const lora::SafetensorsReader file = lora::SafetensorsReader::open((dir.path / "adapter_model.safetensors").string());
  std::vector<std::string> keys;
  for (const auto& t : file.tensors()) keys.push_back(t.name);
  std::sort(keys.begin(), keys.end());
  CHECK(std::find(keys.begin(), keys.end(), "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight") != keys.end());
  CHECK(std::find(keys.begin(), keys.end(), "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight") != keys.end());
  CHECK(std::find(keys.begin(), keys.end(), "base_model.model.classifier.weight") != keys.end());
  CHECK(keys.size() == 4 * 2 + 2);

  // merge_and_unload gives plain Linear layers with the same logits.
  model.train(false);
  const Matrix<double> adapted = model.forward(tiny_batch());
  lora::nn::merge_and_unload(model);
  CHECK(model.lora_layers().empty());
  CHECK(relative_error(model.forward(tiny_batch()), adapted) < 1e-14);
}

TEST_CASE("BertForSequenceClassification: the layers share transient buffers, with the unshared model's values",
          "[transformer][bert_model]") {
  lora::nn::BertConfig c = tiny_config();
  c.num_hidden_layers = 3;
  lora::nn::BertForSequenceClassification<double> shared(c, 12);
  perturb(shared, 71);
  const bool lora = GENERATE(false, true);
  CAPTURE(lora);
  if (lora) {
    lora::nn::LoraInjectConfig config;
    config.target_modules = {"query", "value", "intermediate.dense"};
    config.layers_to_transform = {0, 2};  // layer 1 keeps plain Linear layers there: those do not share
    config.rank = 2;
    config.init = lora::InitMethod::random;
    lora::nn::inject_lora(shared, config);
  }
  shared.set_dropout(0.2, 0.1, 5);
  lora::nn::BertForSequenceClassification<double> own(shared);
  own.set_share_layer_buffers(false);
  CHECK(shared.share_layer_buffers());
  CHECK(!own.share_layer_buffers());
  const lora::nn::TokenBatch batch = tiny_batch();
  const std::vector<int> labels = {1, 2, 0};
  for (int step = 0; step < 2; ++step) {  // the second step runs over buffers the first one sized
    shared.zero_grad();
    own.zero_grad();
    const double a = loss_of(shared, batch, labels, true), b = loss_of(own, batch, labels, true);
    CHECK(a == b);
    CHECK(shared.last_hidden_state() == own.last_hidden_state());
    lora::ParameterList<double> ps = shared.parameters(), po = own.parameters();
    REQUIRE(ps.size() == po.size());
    for (std::size_t i = 0; i < ps.size(); ++i) {
      INFO(ps[i].name);
      CHECK(Matrix<double>(ps[i].grad) == Matrix<double>(po[i].grad));
    }
  }
  // The same buffer serves the intermediate.dense output of layers 0 and 2 in the shared model (not in
  // the other one), and of layer 1 unless a LoRA layer replaced it in 0 and 2.
  auto dense = [](lora::nn::BertForSequenceClassification<double>& m, Index l) -> lora::nn::Module<double>& {
    return m.layer(l).child(1).child(0);
  };
  const Matrix<double> H = random_matrix<double>(batch.num_rows(), c.hidden_size, 3);
  auto output_of = [&](lora::nn::BertForSequenceClassification<double>& m, Index l) { return &dense(m, l).forward(H); };
  CHECK(output_of(shared, 0) == output_of(shared, 2));
  CHECK((output_of(shared, 0) == output_of(shared, 1)) == !lora);
  CHECK(output_of(own, 0) != output_of(own, 2));
  // A clone (or copy) never shares with its original; it links its own layers on its first forward.
  std::unique_ptr<lora::nn::Module<double>> copy = shared.clone();
  auto& cloned = static_cast<lora::nn::BertForSequenceClassification<double>&>(*copy);
  CHECK(output_of(cloned, 0) != output_of(shared, 0));
  loss_of(cloned, batch, labels);
  CHECK(output_of(cloned, 0) == output_of(cloned, 2));
  // Switched off, every layer has buffers of its own again.
  shared.set_share_layer_buffers(false);
  loss_of(shared, batch, labels);
  CHECK(output_of(shared, 0) != output_of(shared, 2));
}

TEST_CASE("Module::share_transient_buffers: only between modules of one type and shape", "[transformer][bert_model]") {
  lora::nn::Linear<double> a(4, 5, true, 1), b(4, 5, true, 2), wide(4, 6, true, 3);
  lora::nn::GELU<double> g;
  CHECK(a.share_transient_buffers(&wide) == 0);
  CHECK(a.share_transient_buffers(&g) == 0);
  CHECK(a.share_transient_buffers(&a) == 0);
  const Matrix<double> X = random_matrix<double>(3, 4, 1);
  CHECK(&a.forward(X) != &b.forward(X));
  CHECK(a.share_transient_buffers(&b) == 1);
  const Matrix<double>& ya = a.forward(X);
  const Matrix<double> kept = ya;
  CHECK(&b.forward(X) == &ya);  // b's output now overwrites a's
  CHECK(ya != kept);
  CHECK(a.share_transient_buffers(nullptr) == 1);
  CHECK(&a.forward(X) != &b.forward(X));
}

TEST_CASE("BertForSequenceClassification: a frozen bottom is not run backward, and changes no gradient",
          "[transformer][bert_model]") {
  lora::nn::BertForSequenceClassification<double> full(tiny_config(), 10);
  perturb(full, 61);
  lora::nn::BertForSequenceClassification<double> head = full;
  head.set_requires_grad(false);
  dynamic_cast<lora::nn::Linear<double>&>(head.classifier()).set_trainable(true);
  const lora::nn::TokenBatch batch = tiny_batch();
  const std::vector<int> labels = {1, 1, 0};
  full.zero_grad();
  head.zero_grad();
  loss_of(full, batch, labels, true);
  loss_of(head, batch, labels, true);
  const auto& a = dynamic_cast<lora::nn::Linear<double>&>(full.classifier());
  const auto& b = dynamic_cast<lora::nn::Linear<double>&>(head.classifier());
  CHECK(relative_error(a.grad_weight(), b.grad_weight()) < 1e-15);
  CHECK(head.parameters().size() == 2);
  // Only the top layer trains: its gradients match the full model's.
  lora::nn::BertForSequenceClassification<double> top = full;
  top.set_requires_grad(false);
  top.layer(1).set_requires_grad(true);
  top.zero_grad();
  full.zero_grad();
  loss_of(full, batch, labels, true);
  loss_of(top, batch, labels, true);
  const auto& fq = dynamic_cast<lora::nn::Linear<double>&>(full.module("bert.encoder.layer.1.attention.self.query"));
  const auto& tq = dynamic_cast<lora::nn::Linear<double>&>(top.module("bert.encoder.layer.1.attention.self.query"));
  CHECK(relative_error(fq.grad_weight(), tq.grad_weight()) < 1e-15);
  CHECK(tq.grad_weight().norm() > 0);
}

TEST_CASE("BertForSequenceClassification: errors name the function and the values", "[transformer][bert_model]") {
  lora::nn::BertConfig c = tiny_config();
  lora::nn::BertForSequenceClassification<double> model(c, 1);
  CHECK(contains(message_of([&] { model.forward(Matrix<double>::Zero(2, 4)); }), "forward(TokenBatch)"));
  CHECK(contains(message_of([&] { model.forward(lora::nn::TokenBatch({{1, 2}}, 18)); }), "vocabulary of 18"));
  CHECK(contains(message_of([&] { model.forward(lora::nn::TokenBatch({std::vector<Index>(9, 1)}, 17)); }),
                 "exceed max_position_embeddings = 8"));
  CHECK(contains(message_of([&] { model.backward(Matrix<double>::Zero(1, 3)); }), "no cached forward"));
  model.forward(tiny_batch());
  CHECK(contains(message_of([&] { model.backward(Matrix<double>::Zero(2, 3)); }), "grad_logits"));
  CHECK(contains(message_of([&] { model.set_dropout(1.0, 0.1); }), "hidden_p must be in [0, 1), got 1"));
  CHECK(contains(message_of([&] { model.layer(2); }), "layer 2 is outside [0, 2)"));
  CHECK(contains(message_of([&] { model.replace_module("bert.embeddings.word_embeddings",
                                                        std::make_unique<lora::nn::Embedding<double>>(16, 4)); }),
                 "expected an Embedding(17, 4)"));
  lora::nn::BertConfig bad = c;
  bad.num_attention_heads = 3;
  CHECK(contains(message_of([&] { lora::nn::BertForSequenceClassification<double> m(bad); }),
                 "hidden_size (4) is not a multiple of num_attention_heads (3)"));
  bad = c;
  bad.hidden_act = "relu";
  CHECK(contains(message_of([&] { lora::nn::BertForSequenceClassification<double> m(bad); }), "hidden_act 'relu'"));
  bad = c;
  bad.pad_token_id = 17;
  CHECK(contains(message_of([&] { lora::nn::BertForSequenceClassification<double> m(bad); }), "pad_token_id 17"));
  CHECK(contains(message_of([] { lora::nn::Dropout<double> d(-0.1); }), "p must be in [0, 1), got -0.1"));
}

TEST_CASE("Dropout: masks, scaling, backward, eval", "[transformer][dropout]") {
  lora::nn::Dropout<double> drop(0.4, 3);
  const Matrix<double> X = random_matrix<double>(50, 40, 71);
  const Matrix<double> Y = drop.forward(X);
  Index zeros = 0;
  for (Index i = 0; i < X.size(); ++i) {
    if (Y(i) == 0) {
      ++zeros;
    } else {
      CHECK(std::abs(Y(i) - X(i) / 0.6) < 1e-15);
    }
  }
  CHECK(std::abs(static_cast<double>(zeros) / static_cast<double>(X.size()) - 0.4) < 0.05);
  const Matrix<double> dY = random_matrix<double>(50, 40, 72);
  const Matrix<double> dX = drop.backward(dY);
  for (Index i = 0; i < X.size(); ++i) CHECK(dX(i) == (Y(i) == 0 ? 0.0 : dY(i) / 0.6));
  // dX was written over the mask: a second backward for the same forward is an error, not garbage.
  CHECK(contains(message_of([&] { drop.backward(dY); }), "Dropout::backward: no cached forward"));
  CHECK(contains(message_of([&] { drop.backward(dY); }), "backward() already ran for the last forward()"));
  drop.reseed(3);
  CHECK(drop.forward(X) == Y);  // the same stream again
  CHECK(drop.backward(dY) == dX);
  lora::nn::Dropout<double> none(0.0);  // p = 0 passes dY through, as often as asked
  none.forward(X);
  CHECK(none.backward(dY) == dY);
  CHECK(none.backward(dY) == dY);
  drop.reseed(3);
  drop.forward(X);
  drop.train(false);
  CHECK(drop.forward(X) == X);
  CHECK(contains(message_of([&] { drop.backward(dY); }), "training mode"));
}

namespace {

// The fixture of tests/data/make_bert_fixture.py: its batch and labels.
struct Fixture {
  std::string dir = std::string(LORA_TEST_DATA_DIR) + "/bert_fixture";
  lora::SafetensorsReader reference = lora::SafetensorsReader::open(dir + "/reference.safetensors");
  lora::nn::TokenBatch batch{{{7, 23, 41, 5, 12}, {33, 2, 48}, {19}}, 50};
  std::vector<int> labels = {2, 0, 1};

  Matrix<double> tensor(const std::string& name) const {
    for (const auto& t : reference.tensors())
      if (t.name == name) {
        if (t.shape.size() == 2) return reference.matrix<double>(name, "fixture");
        const std::vector<double> v = reference.values<double>(name, "fixture");
        return Eigen::Map<const Matrix<double>>(v.data(), static_cast<Index>(v.size()), 1);
      }
    FAIL("the fixture has no tensor " << name);
    return {};
  }
};

// max |a - b| / max |b|: every entry against the tensor's scale.
double scaled_error(const Matrix<double>& a, const Matrix<double>& b) {
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  const double scale = b.cwiseAbs().maxCoeff();
  return scale == 0 ? (a - b).cwiseAbs().maxCoeff() : (a - b).cwiseAbs().maxCoeff() / scale;
}

// Forward, loss and backward in training mode without dropout, as the fixture computed them.
double run_fixture(lora::nn::BertForSequenceClassification<double>& model, const Fixture& f) {
  model.set_dropout(0, 0);
  model.train();
  model.zero_grad();
  return loss_of(model, f.batch, f.labels, true);
}

}  // namespace

TEST_CASE("load_bert: a checkpoint of plain PyTorch's BERT, logits, hidden states and every gradient to 1e-10",
          "[transformer][bert_model][hf]") {
  const Fixture f;
  lora::BertLoadReport report;
  auto model = lora::load_bert<double>(f.dir, {}, &report);
  CHECK(report.initialized.empty());
  CHECK(report.skipped == std::vector<std::string>{"bert.embeddings.position_ids"});
  CHECK(model->config().num_labels == 3);
  CHECK(model->config().hidden_dropout_prob == 0.1);
  const double loss = run_fixture(*model, f);
  CHECK(std::abs(loss - f.tensor("loss")(0)) < 1e-12 * std::abs(f.tensor("loss")(0)));
  CHECK(scaled_error(model->last_hidden_state(), f.tensor("last_hidden_state")) < 1e-10);
  CHECK(scaled_error(model->pooler_output(), f.tensor("pooled")) < 1e-10);
  model->train(false);
  CHECK(scaled_error(model->forward(f.batch), f.tensor("logits")) < 1e-10);
  int compared = 0;
  for (const auto& p : model->parameters()) {
    INFO(p.name);
    const Matrix<double> want = f.tensor("grad." + p.name);
    const Matrix<double> got = p.grad;
    if (contains(p.name, "attention.self.key.bias")) {  // 0 in exact arithmetic, rounding noise in both
      CHECK(got.cwiseAbs().maxCoeff() < 1e-14);
      CHECK(want.cwiseAbs().maxCoeff() < 1e-14);
    } else {
      CHECK(scaled_error(got, want) < 1e-10);
    }
    ++compared;
  }
  CHECK(compared == 41);
}

TEST_CASE("load_bert + from_pretrained: the fixture's PEFT adapter on q and v, computed the PEFT way, to 1e-10",
          "[transformer][bert_model][hf]") {
  const Fixture f;
  auto model = lora::load_bert<double>(f.dir);
  lora::from_pretrained(*model, f.dir + "/adapter");
  CHECK(model->lora_layers().size() == 4);
  const double loss = run_fixture(*model, f);
  CHECK(std::abs(loss - f.tensor("lora.loss")(0)) < 1e-12 * std::abs(f.tensor("lora.loss")(0)));
  CHECK(scaled_error(model->last_hidden_state(), f.tensor("lora.last_hidden_state")) < 1e-10);
  model->train(false);
  CHECK(scaled_error(model->forward(f.batch), f.tensor("lora.logits")) < 1e-10);
  // The trainable tensors are the adapter file's, under its names without the adapter name.
  int compared = 0;
  for (const auto& p : model->parameters()) {
    std::string name = p.name;
    for (const char* drop : {".modules_to_save.default", ".default"}) {
      const std::size_t at = name.find(drop);
      if (at != std::string::npos) name.erase(at, std::string(drop).size());
    }
    INFO(p.name << " as " << name);
    CHECK(scaled_error(Matrix<double>(p.grad), f.tensor("lora.grad." + name)) < 1e-10);
    ++compared;
  }
  CHECK(compared == 10);
}

TEST_CASE("load_bert: a BertModel checkpoint, save_bert round trip, errors name the tensor", "[transformer][bert_model][hf]") {
  const Fixture f;
  auto model = lora::load_bert<double>(f.dir);
  model->set_dropout(0, 0);
  model->train(false);
  const Matrix<double> logits = model->forward(f.batch);
  const Matrix<double> hidden = model->last_hidden_state();

  // save_bert writes config.json + model.safetensors; F64 reads back exactly, F32 to float rounding.
  const lora::testing::TempDir tmp;
  const std::string saved = (tmp.path / "saved").string();
  lora::save_bert(saved, *model, lora::Dtype::F64);
  auto back = lora::load_bert<double>(saved);
  back->set_dropout(0, 0);
  back->train(false);
  CHECK(back->forward(f.batch) == logits);

  // Without "bert." and without the classifier (a BertModel checkpoint): the encoder loads, the head is
  // fresh and reported.
  lora::NamedTensors<double> tensors;
  for (const std::string& name : model->base_tensor_names()) {
    if (name.rfind("classifier.", 0) == 0) continue;
    const Matrix<double> v = model->base_tensor(name);
    const std::string bare = name.substr(5);
    if (contains(name, ".bias") || contains(name, "LayerNorm.weight"))
      tensors.vectors.emplace(bare, v.col(0));
    else
      tensors.matrices.emplace(bare, v);
  }
  const std::string bare_dir = (tmp.path / "bare").string();
  std::filesystem::create_directories(bare_dir);
  std::filesystem::copy_file(f.dir + "/config.json", bare_dir + "/config.json");
  lora::save_base_weights(bare_dir + "/model.safetensors", tensors, lora::Dtype::F64);
  lora::BertLoadReport report;
  lora::BertLoadOptions options;
  options.num_labels = 5;
  auto encoder = lora::load_bert<double>(bare_dir, options, &report);
  CHECK(report.initialized == std::vector<std::string>{"classifier.weight", "classifier.bias"});
  CHECK(encoder->config().num_labels == 5);
  encoder->set_dropout(0, 0);
  encoder->train(false);
  encoder->forward(f.batch);
  CHECK(encoder->last_hidden_state() == hidden);

  // Without the pooler either (BertForMaskedLM's checkpoints): a fresh pooler, reported, as transformers
  // does; refused when allow_missing_pooler is off.
  lora::NamedTensors<double> no_pooler = tensors;
  no_pooler.matrices.erase("pooler.dense.weight");
  no_pooler.vectors.erase("pooler.dense.bias");
  lora::save_base_weights(bare_dir + "/model.safetensors", no_pooler, lora::Dtype::F64);
  auto fresh_pooler = lora::load_bert<double>(bare_dir, options, &report);
  CHECK(report.initialized ==
        std::vector<std::string>{"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"});
  fresh_pooler->set_dropout(0, 0);
  fresh_pooler->train(false);
  fresh_pooler->forward(f.batch);
  CHECK(fresh_pooler->last_hidden_state() == hidden);
  options.allow_missing_pooler = false;
  CHECK_THROWS_WITH(lora::load_bert<double>(bare_dir, options),
                    Catch::Contains("lacks tensors of the model: pooler.dense.weight, pooler.dense.bias"));
  options.allow_missing_pooler = true;

  // A missing tensor, an unknown one, a wrong shape: errors naming them; nothing is returned.
  auto message = [](const std::function<void()>& call) {
    try {
      call();
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("(no exception)");
  };
  lora::NamedTensors<double> missing = tensors;
  missing.matrices.erase("encoder.layer.1.output.dense.weight");
  lora::save_base_weights(bare_dir + "/model.safetensors", missing, lora::Dtype::F64);
  CHECK(contains(message([&] { lora::load_bert<double>(bare_dir); }), "lacks tensors of the model: encoder.layer.1.output.dense.weight"));
  lora::NamedTensors<double> extra = tensors;
  extra.matrices.emplace("encoder.layer.7.output.dense.weight", Matrix<double>::Zero(8, 12));
  lora::save_base_weights(bare_dir + "/model.safetensors", extra, lora::Dtype::F64);
  CHECK(contains(message([&] { lora::load_bert<double>(bare_dir); }), "does not have: encoder.layer.7.output.dense.weight"));
  lora::NamedTensors<double> shape = tensors;
  shape.matrices["encoder.layer.0.intermediate.dense.weight"] = Matrix<double>::Zero(11, 8);
  lora::save_base_weights(bare_dir + "/model.safetensors", shape, lora::Dtype::F64);
  const std::string wrong = message([&] { lora::load_bert<double>(bare_dir); });
  CHECK(contains(wrong, "encoder.layer.0.intermediate.dense.weight"));
  CHECK(contains(wrong, "expected 12 x 8"));
}

// The examples' word lists: Debian's swedish and bokmaal are ISO-8859-1. A line that is not valid UTF-8 is
// read as Latin-1 (it was dropped, and with it every word with a non-ASCII letter of those languages).
TEST_CASE("finetune_transformer's make_split: ISO-8859-1 lists are read as Latin-1, affix flags and CR dropped",
          "[transformer][examples]") {
  const lora::testing::TempDir dict;
  // "one" in ISO-8859-1: käse, möwe/XY (flags), haus\r, ålder, ÅLDER (capitals: not kept), a UTF-8 line too.
  lora::testing::write_file(dict / "one", "k\xe4se\nm\xf6we/XY\nhaus\r\n\xe5lder\n\xc5LDER\nfl\xc3\xb6te\n");
  // "two" in UTF-8: casa, caña, and käse, which makes the Latin-1 käse of "one" ambiguous (the same word).
  lora::testing::write_file(dict / "two", "casa\nca\xc3\xb1" "a\nk\xc3\xa4se\n");
  const std::vector<example::Language> languages = {{"aa", "one", "pkg-one"}, {"bb", "two", "pkg-two"}};
  const example::Split split = example::make_split(languages, 10, 0, 1, dict.path.string());
  std::vector<std::string> one, two;
  for (const example::Word& w : split.train) (w.label == 0 ? one : two).push_back(w.text);
  std::sort(one.begin(), one.end());
  std::sort(two.begin(), two.end());
  CHECK(one == std::vector<std::string>{"fl\xc3\xb6te", "haus", "m\xc3\xb6we", "\xc3\xa5lder"});
  CHECK(two == std::vector<std::string>{"casa", "ca\xc3\xb1" "a"});
  CHECK(split.test.empty());
  const std::vector<example::Language> missing = {{"cc", "three", "pkg-three"}};
  const std::string error = message_of([&] { example::make_split(missing, 10, 0, 1, dict.path.string()); });
  CHECK(contains(error, "make_split"));
  CHECK(contains(error, "pkg-three"));
}
