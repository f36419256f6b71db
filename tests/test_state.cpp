// The layer's state and ownership: the frozen base as a shared object, fixed-shape checked views, the
// cached forward that backward relies on, aliasing inputs, exception safety, merges over shared bases and
// all-or-none model merges. Each regression test names the bug it guards against.
#include <lora/lora.hpp>

#include "instances.hpp"
#include "gradient_check.hpp"

#include <catch2/catch.hpp>

#include <limits>
#include <memory>
#include <stdexcept>
#include <string>

using lora::Index;
using lora::LoraConfig;
using lora::LoraLinear;
using lora::Matrix;
using lora::Vector;
using lora::testing::contains;
using lora::testing::message_of;
using lora::testing::random_matrix;
using lora::testing::relative_error;

namespace {

LoraConfig trained_adapter(int rank, std::uint64_t seed = 3) {
  LoraConfig c;
  c.rank = rank;
  c.alpha = 2.0 * rank;
  c.init = lora::InitMethod::random;  // B != 0: the adapter changes the output
  c.seed = seed;
  return c;
}

// Y = X (W0 + sum s_i B_i A_i)^T + b over the active adapters, formed densely.
Matrix<double> dense_reference(const LoraLinear<double>& layer, const Matrix<double>& X) {
  Matrix<double> W = layer.base_weight();
  if (!layer.merged())
    for (const std::string& name : layer.active_adapters())
      W += layer.scaling(name) * layer.adapter_scale(name) * layer.B(name) * layer.A(name);
  Matrix<double> Y = X * W.transpose();
  if (layer.has_bias()) Y.rowwise() += layer.bias().transpose();
  return Y;
}

}  // namespace

TEST_CASE("one base serves two layers that train different adapters, with no copy of W0", "[state][base]") {
  const Matrix<double> W0 = random_matrix<double>(12, 9, 1);
  const Vector<double> b = Vector<double>::Random(12);
  const auto base = lora::make_base<double>(W0, b);
  LoraLinear<double> first(base, trained_adapter(2, 1)), second(base, trained_adapter(3, 2));
  CHECK(base.use_count() == 3);
  CHECK(first.base().dense_weight() == second.base().dense_weight());  // the same storage
  CHECK(first.base_weight() == W0);

  const Matrix<double> X = random_matrix<double>(5, 9, 3), R = random_matrix<double>(5, 12, 4);
  for (int step = 0; step < 3; ++step)
    for (LoraLinear<double>* layer : {&first, &second}) {
      layer->zero_grad();
      layer->forward(X);
      layer->backward(R);
      layer->A() -= 0.1 * layer->grad_A();
      layer->B() -= 0.1 * layer->grad_B();
    }
  CHECK(first.base_weight() == W0);  // training never writes the base
  CHECK(relative_error(first.forward(X), dense_reference(first, X)) < 1e-13);
  CHECK(relative_error(second.forward(X), dense_reference(second, X)) < 1e-13);

  // Merging a shared base goes to a private copy: the other layer keeps the base function.
  first.eval();
  second.eval();
  const Matrix<double> second_before = second.forward(X);
  const Matrix<double> first_before = first.forward(X);
  first.merge();
  CHECK(base->weight() == W0);
  CHECK(second.forward(X) == second_before);
  CHECK(relative_error(first.forward(X), first_before) < 1e-13);
  first.unmerge();
  CHECK(first.forward(X) == first_before);  // exact: the copy is dropped
  CHECK_THROWS_WITH(second.set_base(lora::make_base<double>(Matrix<double>::Zero(12, 8), b)),
                    Catch::Contains("LoraLinear::set_base: the new base is 12 x 8, the layer is 12 x 9"));
}

TEST_CASE("a borrowed base reads the caller's memory in place", "[state][base]") {
  Matrix<float> storage = random_matrix<float>(6, 4, 5);
  const auto base = lora::borrow_base<float>(storage.data(), 6, 4);
  CHECK(base->dense_weight() == storage.data());
  CHECK(base->owned_bytes() == 0);
  LoraLinear<float> layer(base, trained_adapter(2));
  const Matrix<float> X = random_matrix<float>(3, 4, 6);
  layer.eval();
  const Matrix<float> before = layer.forward(X);
  layer.merge();  // never into the caller's memory
  CHECK(storage == Matrix<float>(base->weight()));
  layer.unmerge();
  CHECK(layer.forward(X) == before);
  CHECK_THROWS_WITH(lora::borrow_base<float>(nullptr, 6, 4), Catch::Contains("borrow_base: W0 is a null pointer"));
}

TEST_CASE("views have a fixed shape: assigning another shape throws", "[state][views][regression]") {
  // Regression: a 16 x 9 B could be assigned to a rank-4 adapter, and an NDEBUG build ran on it.
  LoraLinear<double> layer(random_matrix<double>(8, 9, 7), trained_adapter(4));
  const Matrix<double> B_before = layer.B();
  std::string m = message_of([&] { layer.B() = Matrix<double>::Zero(16, 9); });
  CHECK(contains(m, "ParamRef::operator=: 'lora_B.default' has shape 8 x 4; a view has a fixed shape and cannot take a 16 x 9 value"));
  CHECK(layer.B() == B_before);
  CHECK(layer.rank() == 4);
  m = message_of([&] { layer.A() += Matrix<double>::Ones(3, 3); });
  CHECK(contains(m, "'lora_A.default' has shape 4 x 9"));
  m = message_of([&] { (void)layer.A().coeffRef(4, 0); });
  CHECK(contains(m, "index (4, 0) is outside 4 x 9"));
  CHECK_THROWS_WITH(layer.set_adapter_weights("default", Matrix<double>::Zero(4, 9), Matrix<double>::Zero(8, 3)),
                    Catch::Contains("LoraLinear::set_adapter_weights: B has shape 8 x 3, expected 8 x 4"));

  // nn::Linear's weight and bias are views of the same kind.
  lora::nn::Linear<double> linear(4, 3, true, 1);
  m = message_of([&] { linear.weight() = Matrix<double>::Zero(4, 4); });
  CHECK(contains(m, "'weight' has shape 3 x 4"));
  m = message_of([&] { linear.bias() = Vector<double>::Zero(2); });
  CHECK(contains(m, "'bias' has shape 3 x 1"));
}

TEST_CASE("views: assignment copies in place or through a temporary, modify() writes in place", "[state][views]") {
  lora::nn::Linear<double> linear(4, 4, true, 1);
  const Matrix<double> W = linear.weight();
  const double* storage = linear.weight().data();
  linear.weight() = linear.weight().transpose();  // reads the tensor itself: through a temporary
  CHECK(Matrix<double>(linear.weight()) == Matrix<double>(W.transpose()));
  linear.weight() = W;  // other memory: copied directly
  CHECK(Matrix<double>(linear.weight()) == W);
  CHECK(linear.weight().data() == storage);
  linear.weight().modify([](auto& values) { values.row(1).setConstant(2.5); });
  CHECK(linear.weight()(1, 3) == 2.5);
  CHECK(linear.weight()(0, 0) == W(0, 0));
  CHECK(linear.weight().data() == storage);

  // modify() is a write like the others: checked against the guard, and seen by the layer's caches.
  LoraLinear<double> layer(random_matrix<double>(8, 9, 7), trained_adapter(4));
  const Matrix<double> X = random_matrix<double>(3, 9, 2);
  layer.forward(X);
  layer.A().modify([](auto& A) { A(0, 0) += 1.0; });
  CHECK(contains(message_of([&] { layer.backward(Matrix<double>::Ones(3, 8)); }), "the layer changed after the forward"));
  layer.merge();
  CHECK(contains(message_of([&] { layer.A().modify([](auto& A) { A.setZero(); }); }), "cannot be written: the layer is merged"));
  layer.unmerge();
}

TEST_CASE("views of one adapter survive changes to the others", "[state][views]") {
  LoraLinear<double> layer(random_matrix<double>(8, 6, 8), trained_adapter(2));
  auto A = layer.A("default");
  const double* before = A.data();
  for (int i = 0; i < 5; ++i) layer.add_adapter("extra" + std::to_string(i), trained_adapter(3, 10 + i));
  layer.delete_adapter("extra2");
  CHECK(layer.A("default").data() == before);  // storage never moved
  A.set(0, 0, 1.5);
  CHECK(layer.A("default")(0, 0) == 1.5);
  // A view of a deleted adapter refuses writes instead of writing freed memory.
  auto gone = layer.B("extra1");
  layer.delete_adapter("extra1");
  CHECK(contains(message_of([&] { gone.setZero(); }), "'lora_B.extra1' no longer exists"));
}

TEST_CASE("writes while merged are refused, so unmerge restores the base", "[state][merge][regression]") {
  // Regression: A, B and the optimiser's parameter views stayed writable while merged; one AdamW step with
  // zero gradients then moved W0 by 9.4e-6 after unmerge.
  const Matrix<float> W0 = random_matrix<float>(10, 7, 9);
  LoraLinear<float> layer(W0, trained_adapter(3));
  lora::ParameterList<float> params;
  layer.collect_parameters(params);
  lora::optim::AdamW<float> adam(lora::optim::AdamWOptions{});
  layer.merge();
  CHECK(contains(message_of([&] { layer.A().setZero(); }), "cannot be written: the layer is merged"));
  CHECK(contains(message_of([&] { layer.B() *= 2.0f; }), "cannot be written: the layer is merged"));
  CHECK(contains(message_of([&] { adam.step(params); }),
                 "AdamW::step: 'lora_A.default.weight' cannot be written: the layer is merged; call unmerge() first"));
  layer.unmerge();
  CHECK((layer.base_weight() - W0).cwiseAbs().maxCoeff() <= 2 * std::numeric_limits<float>::epsilon());
  adam.step(params);  // unmerged: accepted again
}

TEST_CASE("backward refuses a forward whose inputs changed since", "[state][cache][regression]") {
  // Regression: set_adapter_scale between a training forward and its backward silently scaled grad_B (x3).
  LoraLinear<double> layer(random_matrix<double>(6, 5, 10), trained_adapter(2));
  const Matrix<double> X = random_matrix<double>(4, 5, 11), R = random_matrix<double>(4, 6, 12);
  auto expect_stale = [&](auto&& change) {
    layer.forward(X);
    change();
    CHECK(contains(message_of([&] { layer.backward(R); }),
                   "LoraLinear::backward: the layer changed after the forward"));
  };
  expect_stale([&] { layer.set_adapter_scale("default", 3.0); });
  expect_stale([&] { layer.B() *= 2.0; });
  expect_stale([&] { layer.A().set(0, 0, 0.25); });
  expect_stale([&] { layer.add_adapter("more", trained_adapter(1)); });
  expect_stale([&] { layer.set_active_adapters({"default", "more"}); });
  lora::ParameterList<double> params;
  layer.collect_parameters(params);
  lora::optim::SGD<double> sgd(lora::optim::SGDOptions{});
  expect_stale([&] { sgd.step(params); });
  // Unchanged: backward runs, and its gradient uses the scale the forward saw.
  layer.set_adapter_scale("default", 3.0);
  layer.zero_grad();
  layer.forward(X);
  layer.backward(R);
  const Matrix<double> T = X * layer.A("default").transpose();
  CHECK(relative_error(layer.grad_B("default"), 3.0 * layer.scaling("default") * R.transpose() * T) < 1e-13);
}

TEST_CASE("inputs that alias the layer's own buffers give the right values", "[state][alias][regression]") {
  // Regression: forward(forward(X)) in eval mode returned wrong values (errors up to 7e3), and
  // forward(Y.topRows(16)) on the layer's own output read freed memory.
  LoraLinear<double> layer(random_matrix<double>(32, 32, 13), Vector<double>::Random(32), trained_adapter(4));
  const Matrix<double> X = random_matrix<double>(40, 32, 14);
  for (bool training : {false, true}) {
    layer.train(training);
    const Matrix<double> once = dense_reference(layer, X);
    const Matrix<double> twice = dense_reference(layer, once);
    CHECK(relative_error(layer.forward(layer.forward(X)), twice) < 1e-13);
    const Matrix<double>& Y = layer.forward(X);
    CHECK(relative_error(layer.forward(Y.topRows(16)), dense_reference(layer, once.topRows(16))) < 1e-13);
  }
  // backward with the layer's own dX as its gradient (a square layer)
  layer.train();
  const Matrix<double> R = random_matrix<double>(40, 32, 15);
  layer.forward(X);
  const Matrix<double> dX = layer.backward(R);
  layer.forward(X);
  const Matrix<double> expected = layer.backward(dX);  // from a copy
  layer.forward(X);
  const Matrix<double>& own = layer.backward(R);
  layer.forward(X);
  CHECK(relative_error(layer.backward(own), expected) < 1e-13);  // from the layer's own buffer
  CHECK(relative_error(layer.backward(layer.backward(R).topRows(40)), expected) < 1e-13);

  // nn::Linear has the same pattern.
  lora::nn::Linear<double> linear(random_matrix<double>(32, 32, 16), Vector<double>::Random(32));
  linear.eval();
  const Matrix<double> once = X * linear.weight().transpose() + Matrix<double>::Ones(40, 1) * linear.bias().transpose();
  const Matrix<double> twice = once * linear.weight().transpose() + Matrix<double>::Ones(40, 1) * linear.bias().transpose();
  CHECK(relative_error(linear.forward(linear.forward(X)), twice) < 1e-13);
  const Matrix<double>& Y = linear.forward(X);
  CHECK(relative_error(linear.forward(Y.topRows(16)), twice.topRows(16)) < 1e-13);
}

TEST_CASE("a forward that throws leaves nothing cached, and a failed add_adapter leaves the layer", "[state][exceptions][regression]") {
  // Regression: forward overwrote its cached input before invalidating the cache, so a throw while reading
  // the input left a half-written input that backward used silently.
  LoraLinear<double> layer(random_matrix<double>(6, 5, 17), trained_adapter(2));
  const Matrix<double> X = random_matrix<double>(4, 5, 18), R = random_matrix<double>(4, 6, 19);
  layer.forward(X);
  const auto throwing = Matrix<double>::NullaryExpr(4, 5, [](Index i, Index j) -> double {
    if (i == 2 && j == 1) throw std::runtime_error("input not available");
    return 1.0;
  });
  CHECK_THROWS_WITH(layer.forward(throwing), "input not available");
  CHECK(contains(message_of([&] { layer.backward(R); }), "LoraLinear::backward: no cached input"));

  LoraConfig bad = trained_adapter(2);
  bad.alpha = -1;
  const auto names = layer.adapter_names();
  layer.eval();
  const Matrix<double> before = layer.forward(X);
  CHECK_THROWS(layer.add_adapter("new", bad));
  CHECK(layer.adapter_names() == names);
  CHECK(layer.forward(X) == before);
  CHECK_THROWS(layer.replace_adapter("default", trained_adapter(3), Matrix<double>::Zero(3, 5), Matrix<double>::Zero(6, 2)));
  CHECK(layer.forward(X) == before);
}

TEST_CASE("model merges are all or none, exactly, with one semantics", "[state][merge][regression]") {
  // Regression: Sequential::merge and merge_adapters disagreed (layers without an active adapter, which
  // exceptions roll back) and rolled back by subtraction, which is not exact.
  auto build = [] {
    lora::nn::Sequential<float> model;
    model.add(lora::nn::Linear<float>(6, 8, true, 1));
    model.add(lora::nn::ReLU<float>());
    model.add(lora::nn::Linear<float>(8, 8, true, 2));
    model.add(lora::nn::ReLU<float>());
    model.add(lora::nn::Linear<float>(8, 3, true, 3));
    lora::nn::LoraInjectConfig c;
    c.target_modules = {"layers.0", "layers.2", "layers.4"};
    c.rank = 2;
    c.init = lora::InitMethod::random;
    lora::nn::inject_lora(model, c);
    return model;
  };
  for (int way = 0; way < 2; ++way) {
    CAPTURE(way);
    auto model = build();
    auto layers = model.lora_layers();
    layers[1].second->set_active_adapters({});  // a layer with no active adapter is left as it is
    const Matrix<float> W0 = layers[0].second->base_weight();
    // The last layer cannot merge: its merged weight would overflow.
    layers[2].second->A().setConstant(std::numeric_limits<float>::max() / 2);
    layers[2].second->B().setConstant(std::numeric_limits<float>::max() / 2);
    lora::LoraModelView<float> view;
    for (auto& [path, layer] : layers) view.lora_modules.push_back({path, layer});
    const std::string m = message_of([&] {
      if (way == 0)
        model.merge();
      else
        lora::merge_adapters(view);
    });
    CHECK(contains(m, "module 'layers.4'"));
    CHECK(contains(m, "the merged weight would contain NaN or Inf"));
    CHECK_FALSE(model.merged());
    CHECK(layers[0].second->base_weight() == W0);  // bit for bit: nothing was written
    layers[2].second->B().setZero();
    if (way == 0)
      model.merge();
    else
      lora::merge_adapters(view);
    CHECK(layers[0].second->merged());
    CHECK_FALSE(layers[1].second->merged());
    CHECK(layers[2].second->merged());
    model.unmerge();
    CHECK_FALSE(model.merged());
  }
  auto model = build();
  for (auto& [path, layer] : model.lora_layers()) layer->set_active_adapters({});
  CHECK(contains(message_of([&] { model.merge(); }), "Sequential::merge: no LoRA layer has an active adapter to merge"));
}

TEST_CASE("optimisers refuse a parameter list that no longer matches the model", "[state][optim]") {
  lora::nn::Linear<double> linear(4, 3, true, 1);
  lora::ParameterList<double> params;
  linear.collect_parameters(params, "");
  linear.set_trainable(false);
  lora::optim::SGD<double> sgd(lora::optim::SGDOptions{});
  const Matrix<double> W = linear.weight();
  CHECK(contains(message_of([&] { sgd.step(params); }), "SGD::step: 'weight' no longer exists as it was"));
  CHECK(linear.weight() == W);  // the frozen weight did not move

  LoraLinear<double> layer(random_matrix<double>(5, 4, 20), trained_adapter(2));
  lora::ParameterList<double> lora_params;
  layer.collect_parameters(lora_params);
  layer.replace_adapter("default", trained_adapter(2), Matrix<double>::Zero(2, 4), Matrix<double>::Zero(5, 2));
  CHECK(contains(message_of([&] { sgd.step(lora_params); }), "'lora_A.default.weight' no longer exists"));
  CHECK(contains(message_of([&] { lora::optim::clip_grad_norm(lora_params, 1.0); }), "clip_grad_norm: 'lora_A.default.weight' no longer exists"));
  {
    LoraLinear<double> temporary(random_matrix<double>(5, 4, 21), trained_adapter(2));
    lora_params.clear();
    temporary.collect_parameters(lora_params);
  }
  CHECK(contains(message_of([&] { sgd.step(lora_params); }), "no longer exists"));  // the layer is gone
}
