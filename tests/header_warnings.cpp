// Compiled with -Wall -Wextra -Wpedantic -Werror -Wshadow -Wconversion: the public headers must stay clean.
#include <lora/lora.hpp>

int main() {
  lora::Matrix<float> W = lora::Matrix<float>::Random(8, 6);
  lora::LoraConfig config;
  config.rank = 2;
  lora::LoraLinearf layer(W, config);
  lora::Matrix<float> X = lora::Matrix<float>::Random(3, 6);
  const lora::Matrix<float>& Y = layer.forward(X);
  layer.backward(Y);
  layer.eval();
  layer.merge();
  layer.forward(X);
  layer.unmerge();
  lora::LoraLineard layer_d(W.cast<double>(), config);
  return layer_d.forward(X.cast<double>()).allFinite() ? 0 : 1;
}
