// splice: the byte stream interface that TVM's runtime sources include as <tvm/support/io.h>
// (the apache-tvm wheel ships those sources but not this header). Written for splice from what
// the compiled runtime sources call: a Stream with virtual raw Read/Write and typed Read/Write
// dispatched to Serializer<T> (serializer.h), whose byte layout is the one TVM's x86 build
// writes into an exported library.
#ifndef SPLICE_TVM_SUPPORT_IO_H_
#define SPLICE_TVM_SUPPORT_IO_H_

#include <cstddef>
#include <cstdint>

namespace tvm {
namespace support {

// Serializer<T>::Write(Stream*, const T&) and ::Read(Stream*, T*) -> bool; specialised in
// serializer.h. The second parameter lets a specialisation select a family of types.
template <typename T, typename Enable = void>
struct Serializer;

class Stream {
 public:
  virtual ~Stream() = default;
  // Raw bytes: the number of bytes read (0 at the end of the stream) or written.
  virtual size_t Read(void* ptr, size_t size) = 0;
  virtual size_t Write(const void* ptr, size_t size) = 0;

  template <typename T>
  void Write(const T& value) {
    Serializer<T>::Write(this, value);
  }
  template <typename T>
  bool Read(T* value) {
    return Serializer<T>::Read(this, value);
  }
  template <typename T>
  void WriteArray(const T* values, size_t n) {
    for (size_t i = 0; i < n; ++i) Write(values[i]);
  }
  template <typename T>
  bool ReadArray(T* values, size_t n) {
    for (size_t i = 0; i < n; ++i) {
      if (!Read(values + i)) return false;
    }
    return true;
  }
};

}  // namespace support
}  // namespace tvm

#include <tvm/support/serializer.h>

#endif  // SPLICE_TVM_SUPPORT_IO_H_
