// lora.hpp: optimisers (SGD, AdamW, LoRA+), gradient clipping and learning-rate schedules.
// They act on a ParameterList, which a model fills with collect_parameters(list, prefix).
#pragma once

#include <lora/optim/adamw.hpp>
#include <lora/optim/clip.hpp>
#include <lora/optim/schedule.hpp>
#include <lora/optim/sgd.hpp>
#include <lora/optim/state.hpp>
