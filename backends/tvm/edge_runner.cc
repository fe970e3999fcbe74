// splice TVM edge runner: load a TVM artefact with TVM's C++ runtime alone (no Python) and run
// a greedy generation from prompt ids; what an edge device without Python runs, and what the
// aarch64 test runs under qemu-user (backends/tvm/cross.py builds it with TVM's runtime sources).
//
//   edge_runner ARTEFACT_DIR STEPS ID [ID ...]
//
// Prints "logits v0 v1 ..." (the prefill's last row) and "tokens t1 ... tSTEPS" (greedy). The
// library and parameters are the artefact's; their sha256 were checked by whoever copied the
// artefact (runtime/manifest.py does it in Python), this runner only reads them.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/runtime/tensor.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
using tvm::runtime::Tensor;

static std::string ReadFile(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

static ffi::json::Object Field(const ffi::json::Object& obj, const char* key) {
  return obj.at(ffi::String(key)).cast<ffi::json::Object>();
}

static DLDataType DType(const std::string& name) {
  if (name == "float32" || name == "F32") return DLDataType{kDLFloat, 32, 1};
  if (name == "uint8" || name == "U8") return DLDataType{kDLUInt, 8, 1};
  throw std::runtime_error("unsupported dtype " + name);
}

static std::vector<int64_t> Ints(const ffi::Any& value) {
  std::vector<int64_t> out;
  for (const ffi::Any& v : value.cast<ffi::json::Array>()) out.push_back(v.cast<int64_t>());
  return out;
}

// The parameters in the manifest's order, from params.safetensors (an 8-byte header length,
// a JSON header of name -> dtype, shape, data offsets, then the raw data).
static ffi::Array<ffi::Any> LoadParams(const std::string& dir, const ffi::json::Object& section,
                                       DLDevice dev) {
  std::string blob = ReadFile(dir + "/" + section.at(ffi::String("params")).cast<ffi::String>());
  uint64_t header_len = 0;
  std::memcpy(&header_len, blob.data(), 8);
  ffi::json::Object header = ffi::json::Parse(blob.substr(8, header_len)).cast<ffi::json::Object>();
  const char* data = blob.data() + 8 + header_len;
  ffi::Array<ffi::Any> params;
  for (const ffi::Any& spec : section.at(ffi::String("param_list")).cast<ffi::json::Array>()) {
    ffi::json::Object p = spec.cast<ffi::json::Object>();
    std::string name = p.at(ffi::String("name")).cast<ffi::String>();
    ffi::json::Object entry = Field(header, name.c_str());
    std::vector<int64_t> shape = Ints(p.at(ffi::String("shape")));
    std::vector<int64_t> offsets = Ints(entry.at(ffi::String("data_offsets")));
    Tensor t = Tensor::Empty(ffi::Shape(shape.begin(), shape.end()),
                             DType(p.at(ffi::String("dtype")).cast<ffi::String>()), dev);
    t.CopyFromBytes(data + offsets[0], offsets[1] - offsets[0]);
    params.push_back(t);
  }
  return params;
}

static Tensor Ids(const std::vector<int64_t>& values, DLDevice dev) {
  Tensor t = Tensor::Empty(ffi::Shape({1, static_cast<int64_t>(values.size())}),
                           DLDataType{kDLInt, 64, 1}, dev);
  t.CopyFromBytes(values.data(), values.size() * sizeof(int64_t));
  return t;
}

static std::vector<float> LastRow(const Tensor& logits) {
  int64_t seq = logits->shape[1], vocab = logits->shape[2];
  std::vector<float> all(seq * vocab);
  logits.CopyToBytes(all.data(), all.size() * sizeof(float));
  return std::vector<float>(all.end() - vocab, all.end());
}

static int64_t Argmax(const std::vector<float>& row) {
  int64_t best = 0;
  for (size_t i = 1; i < row.size(); ++i)
    if (row[i] > row[best]) best = static_cast<int64_t>(i);
  return best;
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: edge_runner ARTEFACT_DIR STEPS ID [ID ...]\n";
    return 2;
  }
  try {
    std::string dir = argv[1];
    int steps = std::stoi(argv[2]);
    std::vector<int64_t> prompt;
    for (int i = 3; i < argc; ++i) prompt.push_back(std::stoll(argv[i]));
    ffi::json::Object manifest =
        ffi::json::Parse(ReadFile(dir + "/manifest.json")).cast<ffi::json::Object>();
    ffi::json::Object section = Field(manifest, "tvm");
    DLDevice dev{kDLCPU, 0};
    ffi::Module lib = ffi::Module::LoadFromFile(
        dir + "/" + std::string(section.at(ffi::String("library")).cast<ffi::String>()));
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2);
    ffi::Function prefill = vm->GetFunction("prefill").value();
    ffi::Function decode = vm->GetFunction("decode").value();
    ffi::Array<ffi::Any> params = LoadParams(dir, section, dev);

    int64_t multiple = Field(section, "cache").at(ffi::String("capacity_multiple")).cast<int64_t>();
    int64_t needed = static_cast<int64_t>(prompt.size()) + steps;
    int64_t capacity = (needed + multiple - 1) / multiple * multiple;
    ffi::Array<ffi::Any> cache;
    for (const ffi::Any& layer : Field(manifest, "io").at(ffi::String("past")).cast<ffi::json::Array>()) {
      ffi::json::Object l = layer.cast<ffi::json::Object>();
      int64_t kv = l.at(ffi::String("kv_heads")).cast<int64_t>();
      int64_t hd = l.at(ffi::String("head_dim")).cast<int64_t>();
      for (int which = 0; which < 2; ++which) {  // keys transposed: [b, kv, hd, capacity]
        ffi::Shape shape = which == 0 ? ffi::Shape({1, kv, hd, capacity})
                                      : ffi::Shape({1, kv, capacity, hd});
        Tensor t = Tensor::Empty(shape, DLDataType{kDLFloat, 32, 1}, dev);
        std::vector<float> zeros(static_cast<size_t>(kv * hd * capacity), 0.0f);
        t.CopyFromBytes(zeros.data(), zeros.size() * sizeof(float));
        cache.push_back(t);
      }
    }
    std::vector<int64_t> pos(prompt.size());
    for (size_t i = 0; i < pos.size(); ++i) pos[i] = static_cast<int64_t>(i);
    Tensor logits = prefill(Ids(prompt, dev), Ids(pos, dev), ffi::Shape({0}), cache, params)
                        .cast<Tensor>();
    std::vector<float> row = LastRow(logits);
    std::printf("logits");
    for (float v : row) std::printf(" %.9g", v);
    std::printf("\ntokens");
    int64_t past = static_cast<int64_t>(prompt.size());
    for (int s = 0; s < steps; ++s) {
      int64_t tok = Argmax(row);
      std::printf(" %lld", static_cast<long long>(tok));
      row = LastRow(decode(Ids({tok}, dev), Ids({past}, dev), ffi::Shape({past}), cache, params)
                        .cast<Tensor>());
      ++past;
    }
    std::printf("\n");
  } catch (const std::exception& e) {
    std::cerr << "edge_runner: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
