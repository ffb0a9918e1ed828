// pte_run: run an ExecuTorch program (.pte) on ExecuTorch's C++ runtime, with no Python and no torch.
//
//   pte_run MODEL.pte --out DIR [--runs N] [--warmup N] [--method forward] INPUT.npy...
//
// Each input is a NumPy .npy file (little-endian float32/float64/int64/int32/int8/uint8/bool, C order),
// given in the order of the method's inputs. Each output is written as DIR/output_<i>.npy. The last
// line on stdout is JSON: {"outputs": [{"file", "dtype", "shape"}...], "runs", "latency_ms"} where
// latency_ms is the median wall time of `runs` timed executions after `warmup` untimed ones (the
// statistic of the job's report). Errors go to stderr with exit status 1 (2 for a usage error).
//
// It links only ExecuTorch's own shared libraries (the executorch wheel's lib/: runtime, XNNPACK
// delegate, optimized and quantized kernels), the same runtime a phone or board runs. Build it with
// `make pte-runner` (scripts/build-pte-runner.sh); ModelPress's tests build and use it to show a .pte
// artifact runs torch-free.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

using executorch::aten::ScalarType;
using executorch::extension::TensorPtr;
using executorch::extension::make_tensor_ptr;
using executorch::extension::module::Module;
using executorch::runtime::EValue;

namespace {

struct DType {
  const char* descr;  // NumPy's descr, e.g. "<f4"
  ScalarType type;
  size_t size;
};

const DType kTypes[] = {
    {"<f4", ScalarType::Float, 4}, {"<f8", ScalarType::Double, 8}, {"<i8", ScalarType::Long, 8},
    {"<i4", ScalarType::Int, 4},   {"|i1", ScalarType::Char, 1},   {"|u1", ScalarType::Byte, 1},
    {"|b1", ScalarType::Bool, 1},
};

[[noreturn]] void fail(const std::string& message, int status = 1) {
  std::cerr << "pte_run: " << message << std::endl;
  std::exit(status);
}

const DType& by_descr(const std::string& descr) {
  for (const auto& t : kTypes)
    if (descr == t.descr) return t;
  fail("unsupported .npy dtype " + descr + " (float32, float64, int64, int32, int8, uint8, bool)");
}

const DType& by_type(ScalarType type) {
  for (const auto& t : kTypes)
    if (type == t.type) return t;
  fail("unsupported output scalar type " + std::to_string(static_cast<int>(type)));
}

// The value of 'key' in a .npy header dict, as written by NumPy: {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }
std::string header_field(const std::string& header, const std::string& key) {
  auto at = header.find("'" + key + "'");
  if (at == std::string::npos) fail(".npy header has no '" + key + "'");
  at = header.find(':', at) + 1;
  while (at < header.size() && header[at] == ' ') ++at;
  if (header[at] == '\'') return header.substr(at + 1, header.find('\'', at + 1) - at - 1);
  if (header[at] == '(') return header.substr(at + 1, header.find(')', at) - at - 1);
  return header.substr(at, header.find_first_of(",}", at) - at);
}

struct Array {
  const DType* dtype;
  std::vector<executorch::aten::SizesType> shape;
  std::vector<uint8_t> data;
};

Array read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot open " + path);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) fail(path + " is not a .npy file");
  uint32_t header_length = 0;
  if (magic[6] == 1) {
    uint16_t length16 = 0;
    in.read(reinterpret_cast<char*>(&length16), 2);
    header_length = length16;
  } else {
    in.read(reinterpret_cast<char*>(&header_length), 4);
  }
  if (header_length > 65536) fail(path + ": .npy header too long");
  std::string header(header_length, '\0');
  in.read(header.data(), header_length);
  if (header_field(header, "fortran_order") != "False") fail(path + ": Fortran-ordered arrays are not supported");
  Array array;
  array.dtype = &by_descr(header_field(header, "descr"));
  std::stringstream dims(header_field(header, "shape"));
  std::string dim;
  size_t count = 1;
  while (std::getline(dims, dim, ','))
    if (dim.find_first_not_of(' ') != std::string::npos) {
      array.shape.push_back(static_cast<executorch::aten::SizesType>(std::stol(dim)));
      count *= array.shape.back();
    }
  array.data.resize(count * array.dtype->size);
  in.read(reinterpret_cast<char*>(array.data.data()), static_cast<std::streamsize>(array.data.size()));
  if (static_cast<size_t>(in.gcount()) != array.data.size()) fail(path + ": fewer bytes than its shape says");
  return array;
}

std::string shape_text(const executorch::aten::Tensor& tensor, bool python) {
  std::string text = python ? "(" : "[";
  for (ssize_t i = 0; i < tensor.dim(); ++i) text += (i ? ", " : "") + std::to_string(tensor.size(i));
  if (python && tensor.dim() == 1) text += ",";
  return text + (python ? ")" : "]");
}

void write_npy(const std::string& path, const executorch::aten::Tensor& tensor) {
  const DType& dtype = by_type(tensor.scalar_type());
  std::string header = std::string("{'descr': '") + dtype.descr + "', 'fortran_order': False, 'shape': " +
                       shape_text(tensor, true) + ", }";
  header.append(64 - (10 + header.size() + 1) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  out.write("\x93NUMPY\x01\x00", 8);
  const uint16_t length = static_cast<uint16_t>(header.size());
  out.write(reinterpret_cast<const char*>(&length), 2);
  out << header;
  out.write(static_cast<const char*>(tensor.const_data_ptr()), static_cast<std::streamsize>(tensor.nbytes()));
  if (!out) fail("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  std::string model, out_dir, method = "forward";
  int runs = 0, warmup = 0;
  std::vector<std::string> input_paths;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(arg + " needs a value", 2);
      return argv[++i];
    };
    if (arg == "--out") out_dir = value();
    else if (arg == "--runs") runs = std::stoi(value());
    else if (arg == "--warmup") warmup = std::stoi(value());
    else if (arg == "--method") method = value();
    else if (model.empty()) model = arg;
    else input_paths.push_back(arg);
  }
  if (model.empty() || out_dir.empty())
    fail("usage: pte_run MODEL.pte --out DIR [--runs N] [--warmup N] [--method NAME] INPUT.npy...", 2);

  Module module(model, Module::LoadMode::Mmap);
  if (module.load_method(method) != executorch::runtime::Error::Ok)
    fail("cannot load method '" + method + "' of " + model);

  std::vector<Array> arrays;
  std::vector<TensorPtr> tensors;
  std::vector<EValue> inputs;
  for (const auto& path : input_paths) {
    arrays.push_back(read_npy(path));
    Array& array = arrays.back();
    tensors.push_back(make_tensor_ptr(array.shape, array.data.data(), array.dtype->type));
    inputs.emplace_back(*tensors.back());
  }

  auto execute = [&]() {
    auto result = module.execute(method, inputs);
    if (!result.ok()) fail("executing '" + method + "' failed with error " + std::to_string(static_cast<int>(result.error())));
    return std::move(*result);
  };
  auto outputs = execute();
  std::string listed;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (!outputs[i].isTensor()) fail("output " + std::to_string(i) + " is not a tensor");
    const auto& tensor = outputs[i].toTensor();
    const std::string file = out_dir + "/output_" + std::to_string(i) + ".npy";
    write_npy(file, tensor);
    listed += std::string(i ? ", " : "") + "{\"file\": \"output_" + std::to_string(i) + ".npy\", \"dtype\": \"" +
              by_type(tensor.scalar_type()).descr + "\", \"shape\": " + shape_text(tensor, false) + "}";
  }

  for (int i = 0; i < warmup; ++i) execute();
  std::vector<double> times;
  for (int i = 0; i < runs; ++i) {
    auto start = std::chrono::steady_clock::now();
    execute();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::string latency = "null";
  if (!times.empty()) {
    std::sort(times.begin(), times.end());
    const size_t n = times.size();
    const double median = n % 2 ? times[n / 2] : (times[n / 2 - 1] + times[n / 2]) / 2;
    char buffer[64];
    std::snprintf(buffer, sizeof buffer, "%.6g", median);
    latency = buffer;
  }
  std::cout << "{\"outputs\": [" << listed << "], \"runs\": " << runs << ", \"latency_ms\": " << latency << "}"
            << std::endl;
  return 0;
}
