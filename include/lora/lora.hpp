// lora.hpp: the umbrella header. #include <lora/lora.hpp> for the library (file I/O: <lora/io.hpp>;
// the LoRA paper's analysis of adapters, which brings in Eigen's SVD: <lora/analysis.hpp>; the synthetic
// tasks of the examples: <lora/data.hpp>).
#pragma once

#include <lora/adapters.hpp>
#include <lora/base.hpp>
#include <lora/common.hpp>
#include <lora/config.hpp>
#include <lora/init.hpp>
#include <lora/linear.hpp>
#include <lora/math.hpp>
#include <lora/mixed_batch.hpp>
#include <lora/nn/activation.hpp>
#include <lora/nn/adapters.hpp>
#include <lora/nn/attention.hpp>
#include <lora/nn/bert.hpp>
#include <lora/nn/bert_config.hpp>
#include <lora/nn/bert_model.hpp>
#include <lora/nn/config.hpp>
#include <lora/nn/dropout.hpp>
#include <lora/nn/embedding.hpp>
#include <lora/nn/inject.hpp>
#include <lora/nn/linear.hpp>
#include <lora/nn/lora_layer.hpp>
#include <lora/nn/loss.hpp>
#include <lora/nn/module.hpp>
#include <lora/nn/modules_to_save.hpp>
#include <lora/nn/norm.hpp>
#include <lora/nn/reshape.hpp>
#include <lora/nn/sequential.hpp>
#include <lora/nn/token_batch.hpp>
#include <lora/nn/train.hpp>
#include <lora/optim.hpp>
#include <lora/parameter.hpp>
#include <lora/quant/merge.hpp>
#include <lora/quant/model.hpp>
#include <lora/quant/quant.hpp>
#include <lora/threads.hpp>
#include <lora/transient.hpp>
