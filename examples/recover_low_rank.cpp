// Trains one LoraLinear to recover a known rank-4 change of a frozen layer: the teacher is
// W0 + U V^T, the student sees only W0 and learns A and B with plain SGD. The loss falls to ~0 and
// the learned s B A approaches U V^T.
#include <lora/lora.hpp>

#include <chrono>
#include <cstdio>

int main() {
  using Mat = lora::Matrix<float>;
  const int in = 64, out = 48, true_rank = 4, n = 256;
  std::srand(1);
  const Mat W0 = Mat::Random(out, in) * 0.3f;
  const Mat change = Mat::Random(out, true_rank) * Mat::Random(true_rank, in) * 0.25f;  // U V^T
  const Mat X = Mat::Random(n, in);
  const Mat target = X * (W0 + change).transpose();

  lora::LoraConfig config;
  config.rank = 8;
  config.alpha = 8;
  config.init_std = 0.1;  // larger than the default 1/r: with B = 0 the first steps move B only
  config.seed = 42;
  lora::LoraLinearf layer(W0, config);
  std::printf("LoraLinear %d -> %d, rank %d: %ld trainable parameters vs %ld frozen\n", in, out, config.rank,
              static_cast<long>(layer.num_trainable_parameters()), static_cast<long>(layer.num_frozen_parameters()));

  const float lr = 0.03f;
  Mat grad(n, out);
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step <= 400; ++step) {
    const Mat& Y = layer.forward(X);
    grad = (Y - target) / static_cast<float>(n);  // d(0.5 mean-over-rows ||Y - target||^2) / dY
    const float loss = 0.5f * grad.squaredNorm() * static_cast<float>(n);
    layer.zero_grad();
    layer.backward(grad);
    layer.A() -= lr * layer.grad_A();
    layer.B() -= lr * layer.grad_B();
    if (step % 40 == 0) {
      const Mat learned = static_cast<float>(layer.scaling()) * layer.B() * layer.A();
      std::printf("step %4d  loss %.6f  |sBA - UV^T| / |UV^T| = %.4f\n", step, loss,
                  (learned - change).norm() / change.norm());
    }
  }
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  layer.eval();
  const Mat before = layer.forward(X);
  layer.merge();
  std::printf("trained in %.0f ms; merged forward differs from unmerged by %.2g (max abs)\n", ms,
              (layer.forward(X) - before).cwiseAbs().maxCoeff());
  return 0;
}
