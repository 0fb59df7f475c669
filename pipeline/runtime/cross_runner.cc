// A minimal artifact runner for machines without Python: the TVM runtime only.
//
// Built by pipeline/runtime/cross.py with a cross compiler (aarch64-linux-gnu-g++) against the
// target's own libtvm_runtime.so / libtvm_ffi.so, and run under qemu-user to check an
// artifact built for another CPU without the board:
//
//     tvm_runner model.so output.npy input.npy [param0.npy ...] [--repeat N]
//     tvm_runner model.so output.npy images.npy [param0.npy ...] --batch B
//
// It loads the library, starts the Relax VM on the CPU, calls "main" with the input
// (and, for params_mode="separate", the weights in the order the metadata lists them),
// writes the output as .npy and prints one JSON line with the latencies.
//
// With --batch B, images.npy holds many batches of the compiled batch size B stacked
// along the first axis: each is run once, in order, and the outputs are written stacked
// the same way. One process for a whole data set: under qemu, starting the runtime and
// loading the library costs far more than one small image. Every 64 batches it prints
// "progress N" (images done) on stdout.
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

// Batch `index` of `images` (batches of `batch` images along the first axis) as a tensor.
Tensor BatchOf(const NpyArray& images, int64_t batch, int64_t index, DLDevice device) {
  std::vector<int64_t> shape = images.shape;
  shape[0] = batch;
  Tensor tensor = Tensor::FromNDAlloc(HostAlloc(), tvm::ffi::Shape(shape), DTypeOf(images.descr), device);
  size_t bytes = images.data.size() / static_cast<size_t>(images.shape[0]) * static_cast<size_t>(batch);
  std::memcpy(tensor.data_ptr(), images.data.data() + bytes * static_cast<size_t>(index), bytes);
  return tensor;
}

// The batched mode: every batch of `images` through `main_fn`, outputs stacked into one .npy.
int RunBatches(tvm::ffi::Function main_fn, const NpyArray& images, std::vector<Tensor> weights,
               int64_t batch, const std::string& output_path) {
  if (images.shape.empty() || batch < 1 || images.shape[0] % batch != 0) {
    throw std::runtime_error("--batch " + std::to_string(batch) + " does not divide the input's " +
                             (images.shape.empty() ? std::string("shape") : std::to_string(images.shape[0]) + " images"));
  }
  DLDevice cpu{kDLCPU, 0};
  int64_t batches = images.shape[0] / batch;
  std::vector<char> stacked;
  std::vector<int64_t> out_shape;
  DLDataType out_dtype{};
  for (int64_t index = 0; index < batches; ++index) {
    std::vector<Tensor> args{BatchOf(images, batch, index, cpu)};
    args.insert(args.end(), weights.begin(), weights.end());
    std::vector<tvm::ffi::AnyView> packed(args.begin(), args.end());
    tvm::ffi::Any result;
    main_fn.CallPacked(packed.data(), static_cast<int>(packed.size()), &result);
    Tensor out = result.cast<Tensor>();
    if (!out.IsContiguous()) throw std::runtime_error("the output is not a contiguous CPU tensor");
    size_t nbytes = static_cast<size_t>(out.numel()) * out.dtype().bits / 8;
    if (index == 0) {
      out_shape.assign(out.shape().begin(), out.shape().end());
      out_dtype = out.dtype();
      stacked.reserve(nbytes * static_cast<size_t>(batches));
    }
    const char* data = static_cast<const char*>(out.data_ptr()) + out.byte_offset();
    stacked.insert(stacked.end(), data, data + nbytes);
    if ((index + 1) % 64 == 0 || index + 1 == batches) {
      std::printf("progress %lld\n", static_cast<long long>((index + 1) * batch));
      std::fflush(stdout);
    }
  }
  out_shape[0] *= batches;
  Tensor all = Tensor::FromNDAlloc(HostAlloc(), tvm::ffi::Shape(out_shape), out_dtype, cpu);
  std::memcpy(all.data_ptr(), stacked.data(), stacked.size());
  WriteNpy(output_path, all);
  std::printf("{\"images\": %lld}\n", static_cast<long long>(images.shape[0]));
  return 0;
}

int Run(int argc, char** argv) {
  std::vector<std::string> positional;
  int repeat = 1;
  int64_t batch = 0;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--repeat" && i + 1 < argc) {
      repeat = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--batch" && i + 1 < argc) {
      batch = std::atoll(argv[++i]);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 3) {
    std::cerr << "usage: tvm_runner model.so output.npy input.npy [param.npy ...] [--repeat N | --batch B]\n";
    return 2;
  }
  DLDevice cpu{kDLCPU, 0};
  std::vector<Tensor> args;
  // In the batched mode the images are sliced per batch; only the weights go to the device whole.
  NpyArray images;
  if (batch > 0) images = ReadNpy(positional[2]);
  for (size_t i = batch > 0 ? 3 : 2; i < positional.size(); ++i) args.push_back(ToDevice(ReadNpy(positional[i]), cpu));

  tvm::ffi::Module library = tvm::ffi::Module::LoadFromFile(positional[0]);
  tvm::ffi::Module vm = library->GetFunction("vm_load_executable").value()().cast<tvm::ffi::Module>();
  // (device type, device id, allocator): 2 is the pooled allocator, as the Python VM uses.
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
  tvm::ffi::Function main_fn = vm->GetFunction("main").value();
  if (batch > 0) return RunBatches(main_fn, images, args, batch, positional[1]);

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
