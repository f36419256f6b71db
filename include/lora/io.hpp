// lora.hpp: file I/O, the umbrella. #include <lora/io.hpp> and link lora::io (it needs nlohmann_json;
// the core library <lora/lora.hpp> does not).
//   safetensors files (io/safetensors.hpp), PEFT adapter directories (io/adapter_dir.hpp),
//   base weights (io/base_weights.hpp), adapter_config.json (io/peft_config.hpp),
//   quantized bases (io/quantized.hpp), Hugging Face checkpoint directories (io/hf_checkpoint.hpp).
// Every reader validates before use and throws lora::io_error (io/error.hpp); every writer is atomic.
#pragma once

#include <lora/lora.hpp>

#include <lora/io/adapter_dir.hpp>
#include <lora/io/base_weights.hpp>
#include <lora/io/bert.hpp>
#include <lora/io/dtype.hpp>
#include <lora/io/error.hpp>
#include <lora/io/file.hpp>
#include <lora/io/hf_checkpoint.hpp>
#include <lora/io/model.hpp>
#include <lora/io/peft_config.hpp>
#include <lora/io/quantized.hpp>
#include <lora/io/safetensors.hpp>
