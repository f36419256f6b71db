// Explicit instantiations of the library's class templates for float (see instances.hpp).
#define LORA_TEST_INSTANTIATE
#include "instances.hpp"

LORA_TEST_INSTANCES(float)
