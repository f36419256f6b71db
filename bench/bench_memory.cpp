// Peak resident memory and optimiser-state bytes of one training setup, LoRA or full fine-tuning:
//   bench_memory lora|full [in out rank batch steps]
//       a single out x in linear layer trained with Adam (two moments per trainable value);
//   bench_memory classifier-lora|classifier-lora-nf4|classifier-lora-int8|classifier-full [epochs]
//       the toy classifier of examples/finetune_classifier (32 -> 1024 -> 1024 -> 10 MLP, LoRA r = 8 on the
//       hidden layers with the head trainable, over the float base or the hidden layers quantized to NF4
//       or int8 (quant::quantize_model), or every weight trainable), AdamW, batch 128, task B.
// Run one mode per process: peak RSS (getrusage) is per process.
#include "classifier_common.hpp"

#include <lora/data.hpp>
#include <lora/lora.hpp>

#include <sys/resource.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

using Mat = lora::Matrix<float>;

long peak_rss_kib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;  // KiB on Linux
}

// Adam on one tensor: m, v are the optimiser state.
struct Adam {
  Mat m, v;
  int t = 0;
  explicit Adam(const Mat& like) : m(Mat::Zero(like.rows(), like.cols())), v(Mat::Zero(like.rows(), like.cols())) {}
  template <class Param>
  void step(Param&& p, const Mat& g, float lr = 1e-3f) {
    ++t;
    m = 0.9f * m + 0.1f * g;
    v = 0.999f * v + 0.001f * g.cwiseAbs2();
    const float c1 = 1 - std::pow(0.9f, static_cast<float>(t)), c2 = 1 - std::pow(0.999f, static_cast<float>(t));
    Mat updated = p;  // a ParamRef is written whole (its checked assignment), not through array()
    updated.array() -= lr * (m.array() / c1) / ((v.array() / c2).sqrt() + 1e-8f);
    p = updated;
  }
  std::size_t bytes() const { return sizeof(float) * static_cast<std::size_t>(m.size() + v.size()); }
};

}  // namespace

// The classifier example's fine-tuning run on task B, from an untrained base (the weights' values do not
// change the memory), without the example's other methods in the same process. The training peak is read
// before the held-out evaluation, whose 4,000-row batches need more activation memory than training.
// quant: "" (float base), "nf4" or "int8"; the float model is built first and quantized, so its float
// weights (4.2 MiB) count in the peak.
int classifier(bool use_lora, int epochs, const std::string& quant) {
  using namespace example;
  const long rss_start = peak_rss_kib();
  threads_from_args(0, nullptr);
  const Setup setup = make_setup();
  Model model = make_base();
  if (!quant.empty()) {
    lora::quant::QuantizeModelConfig qc;
    qc.format = quant == "nf4" ? lora::quant::Format::nf4 : lora::quant::Format::int8;
    qc.skip_modules = {"layers.4"};
    lora::quant::quantize_model(model, qc);
  }
  if (use_lora) lora::nn::inject_lora(model, lora_config(8));
  lora::optim::AdamWOptions options;
  options.lr = use_lora ? kLrLora : kLrFull;
  lora::optim::AdamW<Scalar> optimizer(options);
  auto params = model.parameters();
  lora::data::MiniBatches<Scalar> batches(setup.b_train, kBatch, /*seed=*/11);
  for (int epoch = 0; epoch < epochs; ++epoch) {
    batches.shuffle();
    lora::nn::train_epoch(model, batches, [&] { optimizer.step(params); });
  }
  const long rss_train = peak_rss_kib();
  const double accuracy = lora::nn::evaluate_accuracy(model, setup.b_test);
  std::printf("{\"mode\": \"classifier-%s%s%s\", \"epochs\": %d, \"trainable\": %ld, \"optimizer_state_bytes\": %zu, "
              "\"base_bytes\": %zu, \"peak_rss_kib\": %ld, \"peak_rss_with_eval_kib\": %ld, \"rss_before_kib\": %ld, "
              "\"accuracy_b\": %.4f}\n",
              use_lora ? "lora" : "full", quant.empty() ? "" : "-", quant.c_str(), epochs,
              static_cast<long>(model.num_trainable_parameters()), optimizer.state_bytes(), lora::quant::base_bytes(model),
              rss_train, peak_rss_kib(), rss_start, accuracy);
  return 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  const int epochs = argc > 2 ? std::max(1, std::atoi(argv[2])) : 2;
  if (mode == "classifier-lora" || mode == "classifier-full") return classifier(mode == "classifier-lora", epochs, "");
  if (mode == "classifier-lora-nf4") return classifier(true, epochs, "nf4");
  if (mode == "classifier-lora-int8") return classifier(true, epochs, "int8");
  if (mode != "lora" && mode != "full") {
    std::fprintf(stderr, "usage: %s lora|full [in out rank batch steps]\n       %s classifier-lora|classifier-lora-nf4|classifier-lora-int8|classifier-full [epochs]\n",
                 argv[0], argv[0]);
    return 2;
  }
  const bool use_lora = std::strcmp(argv[1], "lora") == 0;
  const lora::Index in = argc > 2 ? std::atol(argv[2]) : 4096, out = argc > 3 ? std::atol(argv[3]) : 4096;
  const int rank = argc > 4 ? std::atoi(argv[4]) : 16;
  const lora::Index batch = argc > 5 ? std::atol(argv[5]) : 512;
  const int steps = argc > 6 ? std::atoi(argv[6]) : 3;
  const long rss_start = peak_rss_kib();

  const Mat X = Mat::Random(batch, in), dY = Mat::Random(batch, out) * 1e-3f;
  std::size_t state_bytes = 0, trainable = 0;
  double checksum = 0;
  if (use_lora) {
    lora::LoraConfig config;
    config.rank = rank;
    lora::LoraLinearf layer(Mat::Random(out, in) * 0.02f, config);
    Adam adam_A(layer.grad_A()), adam_B(layer.grad_B());
    for (int s = 0; s < steps; ++s) {
      layer.zero_grad();
      layer.forward(X);
      checksum += layer.backward(dY).sum();
      adam_A.step(layer.A(), layer.grad_A());
      adam_B.step(layer.B(), layer.grad_B());
    }
    state_bytes = adam_A.bytes() + adam_B.bytes();
    trainable = static_cast<std::size_t>(layer.num_trainable_parameters());
  } else {
    Mat W = Mat::Random(out, in) * 0.02f, dW = Mat::Zero(out, in), Y(batch, out), dX(batch, in);
    Adam adam(W);
    for (int s = 0; s < steps; ++s) {
      dW.setZero();
      Y.noalias() = X * W.transpose();
      dW.noalias() += dY.transpose() * X;
      dX.noalias() = dY * W;
      checksum += dX.sum();
      adam.step(W, dW);
    }
    state_bytes = adam.bytes();
    trainable = static_cast<std::size_t>(W.size());
  }
  std::printf("{\"mode\": \"%s\", \"in\": %ld, \"out\": %ld, \"rank\": %d, \"batch\": %ld, \"trainable\": %zu, "
              "\"optimizer_state_bytes\": %zu, \"peak_rss_kib\": %ld, \"rss_before_kib\": %ld, \"checksum\": %g}\n",
              argv[1], static_cast<long>(in), static_cast<long>(out), use_lora ? rank : 0, static_cast<long>(batch),
              trainable, state_bytes, peak_rss_kib(), rss_start, checksum);
  return 0;
}
