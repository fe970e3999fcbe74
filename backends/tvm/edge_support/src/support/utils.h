// splice: the helper TVM's thread pool includes from "support/utils.h" (it parses the CPU ids of
// TVM_BIND_THREADS-style settings).
#ifndef SPLICE_TVM_SUPPORT_UTILS_H_
#define SPLICE_TVM_SUPPORT_UTILS_H_

#include <string>

namespace tvm {
namespace support {

// true for a non-empty string of decimal digits only
inline bool IsNumber(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

}  // namespace support
}  // namespace tvm

#endif  // SPLICE_TVM_SUPPORT_UTILS_H_
