// The C++ side of scripts/interop.sh: runs one case described by a JSON spec, with lora::io only, and
// writes the model's outputs for tests/interop/peft_interop.py to compare with PEFT's.
//
//   interop_driver SPEC.json
//
// The spec:
//   "model":   {"name": "layers", "modules": [M, ...]}, M = {"type": "linear", "in": 12, "out": 16,
//              "bias": true} | {"type": "relu" | "gelu" | "tanh"} | {"type": "sequential", "modules": [M, ...]},
//              each with an optional "name" (default: its position), as nn::Sequential names its children
//   "base":    a safetensors file with the base weights under their plain names ("layers.0.weight")
//   "inputs":  a safetensors file with the input "x" [n, in]
//   "outputs": the safetensors file written: "y.K" (the unmerged model) and "merged.K" (after merge())
//              with the adapters of evaluate[K] active
//   "mode":    "load": from_pretrained(adapters[0].dir) as "default", then load_adapter() of the others
//              "save": inject_lora with "inject" (an adapter_config.json's fields), random adapter
//              weights (and trained biases and modules_to_save), save_adapter of each adapter
//   "adapters": [{"name": ..., "dir": ..., and for "save": "dtype" (F32 | F16 | BF16), "seed",
//                 "r" and "lora_alpha" for the adapters after the first}]
//   "evaluate": [["default"], ["default", "other"], ...]
// Any error ends the program with status 1 and the message on stderr.
#include <lora/io.hpp>

#include <nlohmann/json.hpp>

#include <cstdio>
#include <exception>
#include <fstream>
#include <random>
#include <string>
#include <vector>

namespace {

using Scalar = float;
using Model = lora::nn::Sequential<Scalar>;
using lora::Index;
using Json = nlohmann::json;

void add_modules(Model& into, const Json& modules) {
  for (const Json& m : modules) {
    const std::string type = m.at("type").get<std::string>();
    const std::string name = m.value("name", std::to_string(into.size()));
    if (type == "linear") {
      // The values come from the base file; the seed only fills the layer until then.
      const Index in = m.at("in").get<Index>(), out = m.at("out").get<Index>();
      into.add(name, lora::nn::Linear<Scalar>(in, out, m.value("bias", true)));
    } else if (type == "relu") {
      into.add(name, lora::nn::ReLU<Scalar>());
    } else if (type == "gelu") {
      into.add(name, lora::nn::GELU<Scalar>());
    } else if (type == "tanh") {
      into.add(name, lora::nn::Tanh<Scalar>());
    } else if (type == "sequential") {
      Model nested;
      add_modules(nested, m.at("modules"));
      into.add(name, std::move(nested));
    } else {
      throw std::invalid_argument("unknown module type '" + type + "'");
    }
  }
}

Model build_model(const Json& spec) {
  Model model(spec.value("name", std::string("layers")));
  add_modules(model, spec.at("modules"));
  return model;
}

lora::Dtype dtype_of(const std::string& name) {
  lora::Dtype d{};
  if (!lora::parse_dtype(name, d)) throw std::invalid_argument("unknown dtype '" + name + "'");
  return d;
}

// The value a tensor of `dtype` holds for v, so that what the model computes with is what the file holds.
Scalar representable(Scalar v, lora::Dtype dtype) {
  if (dtype == lora::Dtype::F16) return static_cast<Scalar>(Eigen::half(v));
  if (dtype == lora::Dtype::BF16) return static_cast<Scalar>(Eigen::bfloat16(v));
  return v;
}

// Deterministic "trained" values: uniform in [-bound, bound], rounded to the file's dtype.
lora::Matrix<Scalar> random_matrix(std::mt19937& rng, Index rows, Index cols, double bound, lora::Dtype dtype) {
  std::uniform_real_distribution<double> u(-bound, bound);
  lora::Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = representable(static_cast<Scalar>(u(rng)), dtype);
  return m;
}

lora::Matrix<Scalar> shifted(std::mt19937& rng, const lora::Matrix<Scalar>& value, double bound, lora::Dtype dtype) {
  lora::Matrix<Scalar> m = value + random_matrix(rng, value.rows(), value.cols(), bound, lora::Dtype::F32);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = representable(m.data()[i], dtype);
  return m;
}

void save_mode(const Json& spec, Model& model) {
  const Json& adapters = spec.at("adapters");
  const lora::PeftLoraConfig peft = lora::PeftLoraConfig::parse(spec.at("inject").dump(), "spec.inject");
  lora::nn::LoraInjectConfig inject = peft.to_inject_config();
  lora::nn::inject_lora(model, inject);
  for (std::size_t k = 0; k < adapters.size(); ++k) {
    const Json& a = adapters[k];
    const std::string name = a.at("name").get<std::string>();
    const lora::Dtype dtype = dtype_of(a.value("dtype", std::string("F32")));
    std::mt19937 rng(a.value("seed", 1u));
    if (k > 0) {
      lora::LoraConfig c;
      c.rank = a.at("r").get<int>();
      c.alpha = a.at("lora_alpha").get<double>();
      c.use_rslora = peft.use_rslora;
      c.dropout = peft.lora_dropout;
      lora::add_adapter(model, name, c);
    }
    for (const auto& [path, layer] : model.lora_layers()) {
      layer->A(name) = random_matrix(rng, layer->rank(name), layer->in_features(), 0.5, dtype);
      layer->B(name) = random_matrix(rng, layer->out_features(), layer->rank(name), 0.5, dtype);
    }
    // What training would have changed besides A and B: the trainable biases (shared by the adapters)
    // and the adapter's own copies of the saved modules. (The first adapter only.)
    if (k == 0) {
      for (const auto& [path, layer] : model.lora_layers())
        if (layer->bias_trainable()) layer->set_bias(shifted(rng, layer->bias(), 0.3, dtype));
      for (const auto& [path, wrapper] : model.saved_modules()) {
        lora::nn::Linear<Scalar>& copy = wrapper->copy(name);
        copy.set_weight(shifted(rng, copy.weight(), 0.3, dtype));
        if (copy.has_bias()) copy.set_bias(shifted(rng, copy.bias(), 0.3, dtype));
      }
      for (const auto& [mpath, m] : model.named_modules())  // bias = all: the plain layers' biases train too
        if (auto* linear = dynamic_cast<lora::nn::Linear<Scalar>*>(m);
            linear && linear->bias_trainable() && !linear->weight_trainable())
          linear->set_bias(shifted(rng, linear->bias(), 0.3, dtype));
    }
    lora::AdapterSaveOptions options;
    options.dtype = dtype;
    lora::save_adapter(a.at("dir").get<std::string>(), model, name, options);
  }
}

void load_mode(const Json& spec, Model& model) {
  const Json& adapters = spec.at("adapters");
  for (std::size_t k = 0; k < adapters.size(); ++k) {
    const std::string dir = adapters[k].at("dir").get<std::string>();
    const std::string name = adapters[k].at("name").get<std::string>();
    if (k == 0) {
      if (name != "default") throw std::invalid_argument("the first adapter is PEFT's 'default'");
      lora::from_pretrained(model, dir);
    } else {
      lora::load_adapter(dir, model, name);
    }
  }
}

int run(const std::string& spec_path) {
  std::ifstream f(spec_path);
  if (!f) throw std::runtime_error("cannot open " + spec_path);
  const Json spec = Json::parse(f);
  Model model = build_model(spec.at("model"));
  lora::load_base_weights(spec.at("base").get<std::string>(), model);
  const auto inputs = lora::load_base_weights<Scalar>(spec.at("inputs").get<std::string>());
  const lora::Matrix<Scalar>& X = inputs.matrices.at("x");

  const std::string mode = spec.at("mode").get<std::string>();
  if (mode == "save") save_mode(spec, model);
  else if (mode == "load") load_mode(spec, model);
  else throw std::invalid_argument("mode must be 'load' or 'save', got '" + mode + "'");

  model.eval();
  lora::NamedTensors<Scalar> out;
  const Json& sets = spec.at("evaluate");
  for (std::size_t k = 0; k < sets.size(); ++k) {
    lora::set_active_adapters(model, sets[k].get<std::vector<std::string>>());
    out.matrices["y." + std::to_string(k)] = model.forward(X);
    model.merge();
    out.matrices["merged." + std::to_string(k)] = model.forward(X);
    model.unmerge();
  }
  lora::save_base_weights(spec.at("outputs").get<std::string>(), out);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SPEC.json\n", argv[0]);
    return 2;
  }
  try {
    return run(argv[1]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "interop_driver: %s\n", e.what());
    return 1;
  }
}
