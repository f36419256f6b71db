// lora.hpp: the umbrella header. #include <lora/lora.hpp> for everything.
#pragma once

#include <lora/adapters.hpp>
#include <lora/common.hpp>
#include <lora/config.hpp>
#include <lora/init.hpp>
#include <lora/linear.hpp>
#include <lora/mixed_batch.hpp>
#include <lora/parameter.hpp>
