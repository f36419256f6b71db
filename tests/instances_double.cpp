// Explicit instantiations of the library's class templates for double (see instances.hpp).
#define LORA_TEST_INSTANTIATE
#include "instances.hpp"

LORA_TEST_INSTANCES(double)
