#include <lora/lora.hpp>

#include <iostream>

int main() {
  lora::Matrix<float> W0 = lora::Matrix<float>::Random(16, 12);
  lora::LoraConfig config;
  config.rank = 4;
  lora::LoraLinearf layer(W0, config);
  const lora::Matrix<float> X = lora::Matrix<float>::Random(5, 12);
  const bool ok = (layer.forward(X) - X * W0.transpose()).norm() < 1e-5f;  // B starts at zero
  std::cout << "consumer: " << (ok ? "ok" : "FAILED") << ", trainable = " << layer.num_trainable_parameters() << "\n";
  return ok ? 0 : 1;
}
