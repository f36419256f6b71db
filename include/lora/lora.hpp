// lora.hpp: the umbrella header. #include <lora/lora.hpp> for everything.
#pragma once

#include <lora/adapters.hpp>
#include <lora/common.hpp>
#include <lora/config.hpp>
#include <lora/data.hpp>
#include <lora/init.hpp>
#include <lora/linear.hpp>
#include <lora/mixed_batch.hpp>
#include <lora/nn/activation.hpp>
#include <lora/nn/config.hpp>
#include <lora/nn/inject.hpp>
#include <lora/nn/linear.hpp>
#include <lora/nn/lora_layer.hpp>
#include <lora/nn/loss.hpp>
#include <lora/nn/module.hpp>
#include <lora/nn/sequential.hpp>
#include <lora/nn/train.hpp>
#include <lora/optim.hpp>
#include <lora/parameter.hpp>
