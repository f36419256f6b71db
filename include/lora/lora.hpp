// lora.hpp: the umbrella header. #include <lora/lora.hpp> for everything.
#pragma once

#include <lora/common.hpp>
#include <lora/config.hpp>
#include <lora/init.hpp>
#include <lora/linear.hpp>
#include <lora/optim.hpp>
#include <lora/parameter.hpp>
