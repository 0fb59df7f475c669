// A minimal artifact runner for machines without Python: the TVM runtime only.
//
// Built by pipeline/runtime/cross.py with a cross compiler (aarch64-linux-gnu-g++) against the
// target's own libtvm_runtime.so / libtvm_ffi.so, and run under qemu-user to check an
// artifact built for another CPU without the board:
//
//     tvm_runner model.so output.npy input.npy [param0.npy ...] [--repeat N]
//
// It loads the library, starts the Relax VM on the CPU, calls "main" with the input
// (and, for params_mode="separate", the weights in the order the metadata lists them),
// writes the output as .npy and prints one JSON line with the latencies.
//
// Only little-endian, C-ordered .npy files of plain numeric dtypes are read or written.

// Only tvm_ffi's headers: the TVM wheel ships an incomplete tvm/runtime include tree.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using tvm::ffi::Tensor;

// Host memory for input tensors; 64-byte aligned as TVM's kernels expect.
struct HostAlloc {
  void AllocData(DLTensor* tensor) {
    size_t bytes = (tvm::ffi::GetDataSize(*tensor) + 63) / 64 * 64;
    tensor->data = std::aligned_alloc(64, bytes == 0 ? 64 : bytes);
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

struct NpyArray {
  std::string descr;            // numpy dtype string, e.g. "<f4"
  std::vector<int64_t> shape;
  std::vector<char> data;
};

// numpy dtype string <-> DLPack dtype, for the dtypes a vision model takes or returns.
DLDataType DTypeOf(const std::string& descr) {
  struct Entry { const char* descr; uint8_t code; uint8_t bits; };
  static const Entry table[] = {
      {"<f4", kDLFloat, 32}, {"<f2", kDLFloat, 16}, {"<f8", kDLFloat, 64},
      {"<i4", kDLInt, 32},   {"<i8", kDLInt, 64},   {"|i1", kDLInt, 8},
      {"|u1", kDLUInt, 8},   {"<u2", kDLUInt, 16},  {"<i2", kDLInt, 16},
  };
  for (const Entry& e : table) {
    if (descr == e.descr) return DLDataType{e.code, e.bits, 1};
  }
  throw std::runtime_error("unsupported .npy dtype " + descr);
}

std::string DescrOf(DLDataType t) {
  if (t.lanes != 1) throw std::runtime_error("vector dtypes are not supported");
  if (t.code == kDLFloat) return "<f" + std::to_string(t.bits / 8);
  const char* order = t.bits == 8 ? "|" : "<";
  if (t.code == kDLInt) return order + std::string("i") + std::to_string(t.bits / 8);
  if (t.code == kDLUInt) return order + std::string("u") + std::to_string(t.bits / 8);
  throw std::runtime_error("unsupported output dtype code " + std::to_string(t.code));
}

// The value of 'key' in a .npy header dict such as {'descr': '<f4', 'shape': (1, 3), }.
std::string HeaderField(const std::string& header, const std::string& key) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw std::runtime_error("npy header has no " + key);
  at = header.find(':', at) + 1;
  while (header[at] == ' ') ++at;
  char close = header[at] == '(' ? ')' : header[at] == '\'' ? '\'' : ',';
  size_t end = header.find(close, at + 1);
  return header.substr(at, end - at + 1);
}

NpyArray ReadNpy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  char magic[8];
  in.read(magic, 8);
  if (!in || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + " is not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t len16;
    in.read(reinterpret_cast<char*>(&len16), 2);
    header_len = len16;
  } else {
    in.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, '\0');
  in.read(&header[0], header_len);
  if (HeaderField(header, "fortran_order").find("True") != std::string::npos) {
    throw std::runtime_error(path + " is Fortran-ordered; save it C-ordered");
  }
  NpyArray array;
  std::string descr = HeaderField(header, "descr");
  array.descr = descr.substr(1, descr.size() - 2);
  std::string shape = HeaderField(header, "shape");
  std::stringstream dims(shape.substr(1, shape.size() - 2));
  std::string dim;
  size_t count = 1;
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_not_of(' ') == std::string::npos) continue;
    array.shape.push_back(std::stoll(dim));
    count *= static_cast<size_t>(array.shape.back());
  }
  DLDataType dtype = DTypeOf(array.descr);
  array.data.resize(count * dtype.bits / 8);
  in.read(array.data.data(), static_cast<std::streamsize>(array.data.size()));
  if (!in) throw std::runtime_error(path + " is truncated");
  return array;
}

void WriteNpy(const std::string& path, const Tensor& tensor) {
  std::string shape = "(";
  for (int i = 0; i < tensor.ndim(); ++i) {
    shape += std::to_string(tensor.size(i)) + (tensor.ndim() == 1 ? "," : i + 1 < tensor.ndim() ? ", " : "");
  }
  shape += ")";
  std::string header = "{'descr': '" + DescrOf(tensor.dtype()) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  // Magic (6) + version (2) + length (2) + header + padding + '\n' is a multiple of 64.
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  if (tensor.device().device_type != kDLCPU || !tensor.IsContiguous()) {
    throw std::runtime_error("the output is not a contiguous CPU tensor");
  }
  const char* data = static_cast<const char*>(tensor.data_ptr()) + tensor.byte_offset();
  size_t nbytes = static_cast<size_t>(tensor.numel()) * tensor.dtype().bits / 8;
  std::ofstream out(path, std::ios::binary);
  uint16_t header_len = static_cast<uint16_t>(header.size());
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char*>(&header_len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(data, static_cast<std::streamsize>(nbytes));
  if (!out) throw std::runtime_error("cannot write " + path);
}

Tensor ToDevice(const NpyArray& array, DLDevice device) {
  Tensor tensor = Tensor::FromNDAlloc(HostAlloc(), tvm::ffi::Shape(array.shape), DTypeOf(array.descr), device);
  std::memcpy(tensor.data_ptr(), array.data.data(), array.data.size());
  return tensor;
}

int Run(int argc, char** argv) {
  std::vector<std::string> positional;
  int repeat = 1;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--repeat" && i + 1 < argc) {
      repeat = std::max(1, std::atoi(argv[++i]));
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 3) {
    std::cerr << "usage: tvm_runner model.so output.npy input.npy [param.npy ...] [--repeat N]\n";
    return 2;
  }
  DLDevice cpu{kDLCPU, 0};
  std::vector<Tensor> args;
  for (size_t i = 2; i < positional.size(); ++i) args.push_back(ToDevice(ReadNpy(positional[i]), cpu));

  tvm::ffi::Module library = tvm::ffi::Module::LoadFromFile(positional[0]);
  tvm::ffi::Module vm = library->GetFunction("vm_load_executable").value()().cast<tvm::ffi::Module>();
  // (device type, device id, allocator): 2 is the pooled allocator, as the Python VM uses.
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  tvm::ffi::Function main_fn = vm->GetFunction("main").value();

  std::vector<tvm::ffi::AnyView> packed(args.begin(), args.end());
  tvm::ffi::Any result;
  std::vector<double> times_ms;
  // One untimed run first: the first call allocates the memory pool.
  for (int i = 0; i <= repeat; ++i) {
    auto start = std::chrono::steady_clock::now();
    main_fn.CallPacked(packed.data(), static_cast<int>(packed.size()), &result);
    auto stop = std::chrono::steady_clock::now();
    if (i > 0) times_ms.push_back(std::chrono::duration<double, std::milli>(stop - start).count());
  }
  WriteNpy(positional[1], result.cast<Tensor>());
  std::sort(times_ms.begin(), times_ms.end());
  std::printf("{\"runs\": %zu, \"median_ms\": %.4f, \"min_ms\": %.4f}\n", times_ms.size(),
              times_ms[times_ms.size() / 2], times_ms.front());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "tvm_runner: " << e.what() << "\n";
    return 1;
  }
}
