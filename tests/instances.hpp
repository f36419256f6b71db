// The library's class templates, instantiated once for float and once for double in the static library
// lora_test_instances (instances_float.cpp, instances_double.cpp) instead of in every test translation
// unit that uses them (test_nn.cpp at -O2: 163 s without, 77 s with this header).
//
// A TU compiled with other macros than the library (test_optim: EIGEN_RUNTIME_NO_MALLOC, asserts on)
// must not include it, or it would run members compiled without those checks.
#pragma once

#include <lora/lora.hpp>

#ifdef LORA_TEST_INSTANTIATE
#define LORA_TEST_EXTERN
#else
#define LORA_TEST_EXTERN extern
#endif

#define LORA_TEST_INSTANCES(S)                                                 \
  LORA_TEST_EXTERN template class lora::LoraLinear<S>;                         \
  LORA_TEST_EXTERN template class lora::nn::Linear<S>;                         \
  LORA_TEST_EXTERN template class lora::nn::LoraLayer<S>;                      \
  LORA_TEST_EXTERN template class lora::nn::Sequential<S>;                     \
  LORA_TEST_EXTERN template class lora::nn::MultiHeadSelfAttention<S>;         \
  LORA_TEST_EXTERN template class lora::nn::detail_norm::Norm<S, true>;        \
  LORA_TEST_EXTERN template class lora::nn::detail_norm::Norm<S, false>;       \
  LORA_TEST_EXTERN template class lora::nn::Embedding<S>;                      \
  LORA_TEST_EXTERN template class lora::nn::ModulesToSave<S>;                  \
  LORA_TEST_EXTERN template class lora::nn::InferenceContext<S>;               \
  LORA_TEST_EXTERN template class lora::nn::SoftmaxCrossEntropy<S>;            \
  LORA_TEST_EXTERN template class lora::MixedBatchForward<S>;                  \
  LORA_TEST_EXTERN template class lora::optim::AdamW<S>;                       \
  LORA_TEST_EXTERN template class lora::optim::SGD<S>;

#ifndef LORA_TEST_INSTANTIATE
LORA_TEST_INSTANCES(float)
LORA_TEST_INSTANCES(double)
#endif
