// lora.hpp: optimisers (SGD, AdamW, AdamW with 8-bit states, LoRA+), gradient clipping and learning-rate schedules.
// They act on a ParameterList, which a model fills with collect_parameters(list, prefix).
#pragma once

#include <lora/optim/adamw.hpp>
#include <lora/optim/adamw8bit.hpp>
#include <lora/optim/clip.hpp>
#include <lora/optim/schedule.hpp>
#include <lora/optim/sgd.hpp>
#include <lora/optim/state.hpp>
