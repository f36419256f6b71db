// lora.hpp: base (pretrained) weights as a plain safetensors file: tensor names are the parameter
// names themselves ("encoder.fc1.weight", "encoder.fc1.bias"), with no PEFT prefix.
#pragma once

#include <lora/io/safetensors.hpp>

#include <map>
#include <string>

namespace lora {

// Named weights: matrices are 2-D tensors [rows, cols], vectors 1-D tensors [n]. A name is in at most
// one of the two maps.
template <class Scalar>
struct NamedTensors {
  std::map<std::string, Matrix<Scalar>> matrices;
  std::map<std::string, Vector<Scalar>> vectors;
};

// Writes every tensor atomically in `dtype` (F32 by default). Throws std::invalid_argument for a name in
// both maps, NaN/Inf or values beyond the dtype's range, io_error for file-system failures.
template <class Scalar>
void save_base_weights(const std::string& path, const NamedTensors<Scalar>& tensors, Dtype dtype = Dtype::F32) {
  SafetensorsWriter writer;
  for (const auto& kv : tensors.matrices) writer.add(kv.first, kv.second, dtype);
  for (const auto& kv : tensors.vectors) writer.add_vector(kv.first, kv.second, dtype);
  writer.save(path);
}

// Reads every tensor, converted to Scalar. Throws io_error for an invalid file, a tensor that is not
// 1-D or 2-D, or a dtype other than F64/F32/F16/BF16.
template <class Scalar>
NamedTensors<Scalar> load_base_weights(const std::string& path) {
  constexpr const char* where = "load_base_weights";
  const SafetensorsReader file = SafetensorsReader::open(path);
  NamedTensors<Scalar> out;
  for (const TensorInfo& t : file.tensors()) {
    if (t.shape.size() == 2) out.matrices.emplace(t.name, file.matrix<Scalar>(t.name, where));
    else if (t.shape.size() == 1) out.vectors.emplace(t.name, file.vector<Scalar>(t.name, where));
    else detail::io_fail(where, path, t.name, "shape ", shape_string(t.shape), " is neither 1-D nor 2-D");
  }
  return out;
}

}  // namespace lora
