// splice: <tvm/support/cuda/nvtx.h> as the CPU-only runtime needs it. The VM opens an NVTX range
// around each call for NVIDIA's profilers; a runner without CUDA has no profiler to tell, so the
// range only holds its name.
#ifndef SPLICE_TVM_SUPPORT_CUDA_NVTX_H_
#define SPLICE_TVM_SUPPORT_CUDA_NVTX_H_

#include <string>
#include <utility>

namespace tvm {
namespace support {

class NVTXScopedRange {
 public:
  explicit NVTXScopedRange(std::string name) : name_(std::move(name)) {}
  NVTXScopedRange(const NVTXScopedRange&) = delete;
  NVTXScopedRange& operator=(const NVTXScopedRange&) = delete;

 private:
  std::string name_;
};

}  // namespace support
}  // namespace tvm

#endif  // SPLICE_TVM_SUPPORT_CUDA_NVTX_H_
